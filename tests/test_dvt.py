"""DVT tower family (drip_llava.vision.dvt): the last exit is the plain ViT, early exit per image (batch-invariant,
later exits skipped), thresholds fitted to a MAC budget, joint training of every exit, MACs per exit, save/load,
the picture and the LLaVA tower."""
import math

import pytest
import torch

import drip_llava.vision.dvt as dvt  # registers the family
from drip_llava.vision import create_model, flops
from drip_llava.vision.families import from_pretrained

N_CLASSES = 10
SMALL = {"hidden_size": 64, "num_heads": 2, "depth": 3, "embed_dim": 32}  # dvt-tiny-16's grids, a narrower body


def images(n, size=128, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _model(spec="dvt-tiny-16", **kw):
    torch.manual_seed(0)
    return create_model(spec, **kw)


def _with_classifier(m, seed=1):
    """A random exit classifier (shared prototypes, CLIP-style scoring) with a scale that spreads confidences."""
    w = torch.randn(N_CLASSES, m.config.embed_dim, generator=torch.Generator().manual_seed(seed))
    m.set_exit_classifier(torch.nn.functional.normalize(w, dim=-1), logit_scale=12.0, normalize=True)
    return m


def _confidences(m, x):
    with torch.no_grad():
        return dvt.exit_predictions(m, [(x, torch.zeros(len(x), dtype=torch.long))]).confidence


def _mixed(m, x):
    """Policy threshold with thresholds that send a third of `x` out at each exit."""
    m.config.exit_policy = "threshold"
    m.config.exit_thresholds = dvt.thresholds_for_fractions(_confidences(m, x), [1 / 3, 1 / 3, 1 / 3])
    return m.eval()


def test_last_exit_is_the_plain_vit():
    vit = _model("vit-tiny-16", **SMALL).eval()
    x = images(2)
    with torch.no_grad():
        a = vit(x, output_hidden_states=True)
    for reuse in (False, True):
        m = create_model(vit.config.to_dict(), family="dvt", exit_grids=[2, 4, 8], feature_reuse=reuse,
                         relation_reuse=reuse)
        missing, unexpected = m.load_state_dict(vit.state_dict(), strict=False)
        assert not unexpected and missing and all(k.split(".")[0] in ("coarse_exits", "feature_reuse",
                                                                       "relation_reuse") for k in missing)
        for mode in (False, True):
            with torch.no_grad():
                b = m.train(mode)(x, output_hidden_states=True)
            assert (b.exit_index == 2).all() and b.mask.all() and b.features.shape == a.features.shape
            if not reuse:  # the same modules in the same order: bit-identical
                assert torch.equal(a.features, b.features) and torch.equal(a.pooled, b.pooled)
                assert all(torch.equal(h, g) for h, g in zip(a.hidden_states, b.hidden_states))
            else:  # zero-initialised reuse adds exact zeros (SDPA with a zero bias may pick another kernel)
                assert (a.features - b.features).abs().max() <= 1e-6 and (a.pooled - b.pooled).abs().max() <= 1e-6


def test_a_vit_folder_loads_as_the_last_exit(tmp_path):
    vit = _model("vit-tiny-16", **SMALL).eval()
    vit.save_pretrained(tmp_path)
    m = from_pretrained(tmp_path, family="dvt").eval()
    assert type(m) is dvt.DVTVisionModel and m.config.exit_grids == [2, 4, 8]
    assert all(torch.equal(p, m.state_dict()[k]) for k, p in vit.state_dict().items())
    zero = [mod for mod in m.modules() if isinstance(mod, dvt.ZeroLinear)]
    assert zero and all(not z.weight.any() for z in zero)  # the fresh reuse paths add nothing
    with torch.no_grad():
        assert (vit(images(2)).pooled - m(images(2)).pooled).abs().max() <= 1e-6


def test_eval_with_mixed_exits_is_batch_invariant():
    m = _with_classifier(_model(**SMALL))
    x = images(6)
    _mixed(m, x)
    with torch.no_grad():
        batch = m(x, output_hidden_states=True)
    assert set(batch.exit_index.tolist()) == {0, 1, 2}
    assert batch.num_tokens.tolist() == [[4, 16, 64][k] for k in batch.exit_index.tolist()]
    assert batch.features.shape[1] == 64 and torch.equal(batch.mask.sum(1), batch.num_tokens)
    for i in range(6):
        with torch.no_grad():
            alone = m(x[i:i + 1], output_hidden_states=True)
        n = int(alone.num_tokens)
        assert int(alone.exit_index) == int(batch.exit_index[i]) and n == int(batch.num_tokens[i])
        assert (alone.features[0, :n] - batch.features[i, :n]).abs().max() <= 1e-5
        assert (alone.pooled[0] - batch.pooled[i]).abs().max() <= 1e-5
        assert torch.equal(alone.patch_token[0], batch.patch_token[i])
        assert (alone.hidden_states[-2][0, :1 + n] - batch.hidden_states[-2][i, :1 + n]).abs().max() <= 1e-5
        assert not batch.features[i, n:].any() and not batch.hidden_masks[-2][i, 1 + n:].any()


def test_early_exit_images_skip_later_exits():
    m = _with_classifier(_model(**SMALL))
    x = images(6)
    _mixed(m, x)
    rows = [0, 0, 0]
    hooks = [body.blocks[0].ln_1.register_forward_pre_hook(lambda mod, args, k=k: rows.__setitem__(k, rows[k] +
                                                                                                   args[0].shape[0]))
             for k, body in enumerate(m.exit_bodies)]
    try:
        with torch.no_grad():
            out = m(x)
    finally:
        for h in hooks:
            h.remove()
    exits = out.exit_index
    assert rows == [6, int((exits >= 1).sum()), int((exits == 2).sum())] and rows[2] < rows[1] < 6
    assert torch.equal(out.exit_ran, torch.arange(3)[None] <= exits[:, None])
    # the batch costs the sum of each image's exit (FlopCounterMode), exit classifier included
    counted, _ = flops.count_forward_macs(m, x)
    per_exit = flops.dvt_cumulative_macs(m.config, num_classes=N_CLASSES)
    assert counted * 6 == pytest.approx(sum(per_exit[k] for k in exits.tolist()), rel=1e-9)


def test_output_layer_gives_each_images_exit_state_and_runs_deciding_exits_in_full():
    m = _with_classifier(_model(**SMALL))
    x = images(6)
    _mixed(m, x)
    blocks = [[0] * 3 for _ in range(3)]  # images through each (exit, block)
    hooks = [b.attn.qkv.register_forward_hook(lambda mod, a, o, k=k, i=i: blocks[k].__setitem__(i, blocks[k][i] +
                                                                                                    a[0].shape[0]))
             for k, body in enumerate(m.exit_bodies) for i, b in enumerate(body.blocks)]
    with torch.no_grad():
        full = m(x, output_hidden_states=True)
        exits = full.exit_index
        reached = [int((exits >= k).sum()) for k in range(3)]
        for idx in (0, 1, 3, -2):
            for row in blocks:
                row[:] = [0, 0, 0]
            out = m.forward_features(x, output_layer=idx)
            i = idx % 4
            # exits 0 and 1 decide (every block, the images that reach them), the last exit stops after block i
            assert blocks == [[reached[0]] * 3, [reached[1]] * 3, [reached[2]] * i + [0] * (3 - i)], idx
            assert torch.equal(out.exit_index, exits) and out.exit_pooled is None and out.hidden_states is None
            assert torch.equal(out.mask, full.hidden_masks[i][:, 1:]) and (out.patch_depth == i).all()
            assert (out.features - full.hidden_states[i][:, 1:]).abs().max() <= 1e-5, idx
            for j in (0, 3):  # an image alone gets the same state
                alone = m.forward_features(x[j:j + 1], output_layer=idx)
                n = int(alone.num_tokens)
                assert (alone.features[0, :n] - out.features[j, :n]).abs().max() <= 1e-5
    for h in hooks:
        h.remove()
    # no decision and nothing reused at hidden state 0 / without reuse: the exits before the last one are skipped
    for kw, idx in (({}, 0), ({"feature_reuse": False, "relation_reuse": False}, 2)):
        m2 = _model(**SMALL, exit_policy="fixed:2", **kw).eval()
        with torch.no_grad():
            out = m2.forward_features(x, output_layer=idx)
            ref = m2(x, output_hidden_states=True).hidden_states[idx][:, 1:]
        assert out.exit_ran.tolist() == [[False, False, True]] * 6 and torch.equal(out.features, ref), kw


def test_fixed_policy_and_no_thresholds():
    m = _model(**SMALL).eval()  # dvt-tiny-16: fixed:1
    with torch.no_grad():
        out = m(images(3))
    assert (out.exit_index == 1).all() and out.features.shape[1] == 16 and not out.exit_ran[:, 2].any()
    m.config.exit_policy = "threshold"  # no thresholds: every image takes the last exit, no classifier needed
    with torch.no_grad():
        assert (m(images(3)).exit_index == 2).all()
    m.config.exit_thresholds = [0.5, 0.5]
    with pytest.raises(RuntimeError, match="set_exit_classifier"):
        m(images(1))


def test_config_checks():
    with pytest.raises(ValueError, match="exit_grids"):
        _model(exit_grids=[3, 8])  # 128 px is not a whole number of 3x3 patches
    with pytest.raises(ValueError, match="exit_grids"):
        _model(exit_grids=[4, 2, 8])
    with pytest.raises(ValueError, match="exit_policy"):
        _model(exit_policy="fixed:3")
    with pytest.raises(ValueError, match="exit_thresholds"):
        _model(exit_thresholds=[0.5])
    assert dvt.default_exit_grids(224, 14) == [4, 7, 14] and dvt.default_exit_grids(224, 16) == [4, 8, 16]


def test_threshold_fitting_meets_the_budget():
    g = torch.Generator().manual_seed(0)
    N = 2000
    conf = torch.rand(N, 3, generator=g).sort(dim=1).values  # later exits more confident, as trained cascades are
    macs = [1.0, 3.0, 10.0]
    for budget in (1.0, 1.5, 2.5, 4.0, 7.0, 9.9):
        T = dvt.fit_exit_thresholds(conf, macs, budget)
        exits = dvt.assign_exits(conf, T)
        cost = torch.tensor(macs)[exits].mean().item()
        assert cost <= budget + 1e-9 and cost >= budget - 0.2, (budget, cost)
    assert dvt.fit_exit_thresholds(conf, macs, 10.0) == [math.inf, math.inf]  # everyone reaches the last exit
    with pytest.raises(ValueError, match="below the first exit"):
        dvt.fit_exit_thresholds(conf, macs, 0.9)
    # the official rule: floor(N * p_k) samples leave at exit k (no ties in random confidences)
    exits = dvt.assign_exits(conf, dvt.thresholds_for_fractions(conf, [0.5, 0.3, 0.2]))
    assert torch.bincount(exits, minlength=3).tolist() == [1000, 600, 400]


def test_exit_predictions_anytime_and_budgeted_match_the_model():
    m = _with_classifier(_model(**SMALL))
    x = images(9)
    labels = torch.arange(9) % N_CLASSES
    preds = dvt.exit_predictions(m, [(x[:5], labels[:5]), (x[5:], labels[5:])])
    assert preds.confidence.shape == preds.prediction.shape == (9, 3)
    with torch.no_grad(), m.eval().forced_exit(2):
        out = m(x)
    for k in range(3):
        logits = m.exit_logits(out.exit_pooled[k], k)
        assert torch.equal(preds.prediction[:, k], logits.argmax(-1))
        assert preds.anytime_top1()[k] == pytest.approx((logits.argmax(-1) == labels).double().mean().item())
    macs = flops.dvt_cumulative_macs(m.config, num_classes=N_CLASSES)
    T = dvt.fit_exit_thresholds(preds.confidence, macs, (macs[0] + macs[2]) / 2)
    res = preds.budgeted(T, macs)
    m.config.exit_policy, m.config.exit_thresholds = "threshold", T
    with torch.no_grad():
        out = m(x)  # the model's own decisions equal the fitted rule on the same images
    assert torch.equal(out.exit_index, dvt.assign_exits(preds.confidence, T))
    assert res["mean_macs"] <= (macs[0] + macs[2]) / 2 and sum(res["exit_fractions"]) == pytest.approx(1.0)
    with torch.no_grad():
        pred = [int(m.exit_logits(out.pooled[i:i + 1], k).argmax()) for i, k in enumerate(out.exit_index.tolist())]
    assert res["top1"] == pytest.approx((torch.tensor(pred) == labels).double().mean().item())


def test_training_runs_every_exit_and_every_parameter_learns():
    m = _model(exit_policy="threshold", **SMALL).train()
    x = images(3)
    out = m(x)
    assert (out.exit_index == 2).all() and out.exit_ran.all()
    assert [p.shape for p in out.exit_pooled] == [(3, 32)] * 3
    assert [f.shape for f in out.exit_features] == [(3, 4, 64), (3, 16, 64), (3, 64, 64)]
    assert torch.equal(out.pooled, out.exit_pooled[-1]) and float(out.rate_loss) == 0
    loss = sum(p.square().mean() for p in out.exit_pooled)  # the paper's objective: the sum of the exits' losses
    loss.backward()
    unused = [n for n, p in m.named_parameters() if p.grad is None]
    assert not unused, unused
    # once the reuse paths are open, the last exit's loss alone reaches the first exit's blocks through both
    for z in m.modules():
        if isinstance(z, dvt.ZeroLinear):
            torch.nn.init.normal_(z.weight, std=0.02)
    for flags in ({"feature_reuse": False}, {"relation_reuse": False}):
        sub = create_model(m.config.to_dict(), **flags).train()
        sub.load_state_dict({k: v for k, v in m.state_dict().items() if k in sub.state_dict()})
        sub(x).exit_pooled[-1].square().mean().backward()
        assert sub.coarse_exits[0].blocks[0].attn.qkv.weight.grad.abs().sum() > 0, flags


@pytest.mark.parametrize("g_in,g_out,n_cls", [(2, 4, 1), (7, 14, 1), (4, 7, 1), (3, 7, 0), (6, 12, 1)])
def test_token_resampling_is_the_official_grid_resampling(g_in, g_out, n_cls):
    """Reuse resamples tokens and attention maps as the official code does on the [g, g] layout (nearest by
    ceil(g_out / g_in), then adaptive average pooling; CLS kept): exactly for whole factors, else to rounding."""
    import torch.nn.functional as F

    def grid(x):  # [N, g_in, g_in] -> [N, g_out, g_out], the official way
        f = -(-g_out // g_in)
        return F.adaptive_avg_pool2d(F.interpolate(x[:, None], scale_factor=f, mode="nearest"), g_out)[:, 0]

    torch.manual_seed(0)
    T, T2 = n_cls + g_in ** 2, n_cls + g_out ** 2
    r = torch.randn(2, 3, T, T)  # [B, C, queries, keys]
    ref = torch.zeros(2, 3, T2, T2)
    if n_cls:
        ref[..., :n_cls, :n_cls] = r[..., :n_cls, :n_cls]
        ref[..., :n_cls, n_cls:] = grid(r[..., :n_cls, n_cls:].reshape(-1, g_in, g_in)).reshape(2, 3, n_cls, -1)
        ref[..., n_cls:, :n_cls] = grid(r[..., n_cls:, :n_cls].transpose(-1, -2).reshape(-1, g_in, g_in)).reshape(
            2, 3, n_cls, -1).transpose(-1, -2)
    qk = r[..., n_cls:, n_cls:].reshape(2, 3, g_in, g_in, g_in, g_in)  # [B, C, qy, qx, ky, kx]
    keys = grid(qk.reshape(-1, g_in, g_in)).reshape(2, 3, g_in, g_in, g_out, g_out)
    both = grid(keys.permute(0, 1, 4, 5, 2, 3).reshape(-1, g_in, g_in)).reshape(2, 3, g_out, g_out, g_out, g_out)
    ref[..., n_cls:, n_cls:] = both.permute(0, 1, 4, 5, 2, 3).reshape(2, 3, g_out ** 2, g_out ** 2)
    out = dvt.resize_relation(r, g_in, g_out, n_cls)
    tokens = torch.randn(2, g_in ** 2, 5)
    ref_tokens = grid(tokens.transpose(1, 2).reshape(-1, g_in, g_in)).reshape(2, 5, -1).transpose(1, 2)
    if g_out % g_in == 0:
        assert torch.equal(out, ref) and torch.equal(dvt.resize_tokens(tokens, g_in, g_out), ref_tokens)
    else:
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(dvt.resize_tokens(tokens, g_in, g_out), ref_tokens)


def test_reuse_changes_the_next_exit():
    m = _model(exit_policy="threshold", **SMALL).eval()
    x = images(2)
    with torch.no_grad():
        before = m(x).exit_pooled
        for path in (m.feature_reuse[1][0].into_mlp, m.relation_reuse[1].mlp[2]):
            torch.nn.init.normal_(path.weight, std=0.5)
            after = m(x).exit_pooled
            assert torch.equal(before[1], after[1]) and (before[2] - after[2]).abs().max() > 1e-3
            torch.nn.init.zeros_(path.weight)


@pytest.mark.parametrize("kw", [{}, {"feature_reuse": False}, {"relation_reuse": False},
                                {"pool": "mean", "class_token": False}])
def test_analytic_macs_equal_flop_counter_per_exit(kw):
    m = _model(**SMALL, **kw).eval()
    per_exit = flops.dvt_cumulative_macs(m.config)
    for k in range(3):
        with m.forced_exit(k):
            counted, n = flops.count_forward_macs(m, images(1))
        assert counted == per_exit[k] and int(n) == m.config.exit_tokens()[k]
    assert per_exit[0] < per_exit[1] < per_exit[2]
    # the config's figure: fixed:1 for dvt-tiny-16
    assert flops.counted_macs(m) == flops.analytic_macs(m.config) == per_exit[1]
    assert flops.analytic_macs(m.config) < flops.analytic_macs(create_model("vit-tiny-16", **SMALL, **kw).config)


def test_save_load_round_trip(tmp_path):
    m = _with_classifier(_model(**SMALL))
    x = images(6)
    _mixed(m, x)
    m.save_pretrained(tmp_path)
    m2 = from_pretrained(tmp_path).eval()
    assert type(m2) is dvt.DVTVisionModel
    for f in ("exit_grids", "exit_policy", "exit_thresholds", "exit_num_classes", "exit_logit_scale",
              "exit_normalize"):
        assert getattr(m2.config, f) == getattr(m.config, f)
    assert torch.equal(m2.exit_head_weight, m.exit_head_weight)
    with torch.no_grad():
        a, b = m(x), m2(x)
    assert torch.equal(a.exit_index, b.exit_index) and len(set(a.exit_index.tolist())) > 1
    assert torch.equal(a.pooled, b.pooled) and torch.equal(a.features, b.features)


def test_visualize_draws_the_exit_grid(tmp_path):
    from drip_llava.vision import images as example_images
    from drip_llava.vision import visualize

    m = _model().eval()
    pic, n = visualize.segment_overlay(m, example_images.load_image("example:astronaut"))
    assert n == 16 and pic.size == (512, 512)
    res = visualize.main(["--model", "dvt-tiny-16", "--image", "example:coffee", "--image", "example:rocket",
                          "--out", str(tmp_path / "d.png")])
    assert (tmp_path / "d.png").is_file() and res["num_tokens"] == [16, 16]


def test_dvt_as_llava_tower(tiny_llm_dir):
    """Through the one spec function into LLaVA: each image gives the LLM the tokens of its exit at the selected
    block (a different count per image), and the LLM trains on them."""
    from drip_llava.constants import IMAGE_TOKEN_INDEX
    from drip_llava.model.llava_llama import DripLlavaForCausalLM

    torch.manual_seed(0)
    model = DripLlavaForCausalLM.from_pretrained(str(tiny_llm_dir), dtype=torch.float32)
    model.initialize_vision_modules("dvt-tiny-16", exit_policy="threshold", exit_num_classes=N_CLASSES, **SMALL)
    tower = model.get_vision_tower()
    assert tower.model.config.family == "dvt" and tower.max_tokens == 64
    x = images(3)
    _mixed(_with_classifier(tower.model), x)
    with torch.no_grad():
        ref = tower.model(x, output_hidden_states=True)
    exits = ref.exit_index.tolist()
    assert set(exits) == {0, 1, 2}
    feats = model.encode_images(x)
    assert [t.shape[0] for t in feats] == [[4, 16, 64][k] for k in exits]
    proj = model.mm_projector
    for i, t in enumerate(feats):  # select_layer -2: the chosen exit's hidden state after block depth-1
        n = t.shape[0]
        assert torch.allclose(t, proj(ref.hidden_states[-2][i, 1:1 + n]), atol=1e-5)
    ids = torch.tensor([[5, IMAGE_TOKEN_INDEX, 7, 8, 9]] * 3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(3):
        out = model(input_ids=ids, labels=ids.clamp(min=0), images=x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert all(p.grad is not None for p in model.mm_projector.parameters())


def test_dvt_folder_keeps_its_exit_rule_through_llava(tiny_llm_dir, tmp_path):
    """A tower folder with fitted thresholds (what `make compare`'s exits stage saves) keeps its exit classifier
    and thresholds in LLaVA: after initialize_vision_modules from the folder, in the saved config, and after
    saving and reloading the LLaVA model, every image takes the exit it takes in the folder's tower."""
    from drip_llava.model.llava_llama import DripLlavaForCausalLM

    m = _with_classifier(_model(**SMALL))
    x = images(6)
    _mixed(m, x)
    m.save_pretrained(tmp_path / "tower")
    with torch.no_grad():
        want = m(x).exit_index
    assert len(set(want.tolist())) > 1
    model = DripLlavaForCausalLM.from_pretrained(str(tiny_llm_dir), dtype=torch.float32)
    model.initialize_vision_modules(str(tmp_path / "tower"))
    vc = model.config.vision_config
    assert (vc["exit_policy"], vc["exit_thresholds"], vc["exit_num_classes"]) == ("threshold",
                                                                                  m.config.exit_thresholds, N_CLASSES)
    model.save_pretrained(tmp_path / "llava")
    again = DripLlavaForCausalLM.from_pretrained(str(tmp_path / "llava"), dtype=torch.float32)
    for tower in (model.get_vision_tower().model, again.get_vision_tower().model):
        assert torch.equal(tower.exit_head_weight, m.exit_head_weight)
        with torch.no_grad():
            assert torch.equal(tower.eval()(x).exit_index, want)
