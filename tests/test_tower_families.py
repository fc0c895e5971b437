"""Tower families (drip_llava.vision.families): the registry, and per family the properties DRIP's tests check
(batch invariance in eval, every parameter used, FLOPs exact, the auxiliary loss reaching its target)."""
import pytest
import torch

from drip_llava.jsonl import read_jsonl
from drip_llava.vision import DripVisionConfig, DripVisionModel, flops, get_preset_config, list_presets
from drip_llava.vision.families import create_model, from_pretrained, get_family, list_families

# the tiny presets of every registered family but DRIP (a preset whose family module is not registered is skipped)
TINY = [p for f in list_families() if f != "drip" for p in list_presets(f) if "tiny" in p]


def images(n, size=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def _model(spec, **kw):
    torch.manual_seed(0)
    return create_model(spec, **kw)


# ---- registry -----------------------------------------------------------------------------------
def test_registry_and_presets():
    assert {"drip", "tome", "dynamicvit"} <= set(list_families())
    assert get_family("drip") is DripVisionModel
    with pytest.raises(KeyError, match="tome"):
        get_family("tokenlearner")
    # DRIP / ViT presets: listed by default, same class, family recorded
    assert all(get_preset_config(p).family == "drip" for p in list_presets())
    assert "tome-tiny-16-r8" not in list_presets() and "tome-tiny-16-r8" in list_presets(None)
    assert type(get_preset_config("drip-tiny-16-4x")) is DripVisionConfig
    assert type(create_model("drip-tiny-16-4x")) is DripVisionModel
    for name in list_presets(None):
        cfg = get_preset_config(name)
        assert type(cfg) is get_family(cfg.family).config_class
    with pytest.raises(ValueError, match="family 'tome'"):
        DripVisionConfig(family="tome")


def test_saved_drip_config_without_family_loads_as_drip(tmp_path):
    m = _model("drip-tiny-16-4x")
    m.save_pretrained(tmp_path)
    cfg = (tmp_path / "config.json").read_text()
    (tmp_path / "config.json").write_text(cfg.replace('"family": "drip",', ""))
    assert '"family"' not in (tmp_path / "config.json").read_text()
    assert type(from_pretrained(tmp_path)) is DripVisionModel
    assert DripVisionModel.from_pretrained(tmp_path).config.family == "drip"


@pytest.mark.parametrize("preset", TINY)
def test_every_tiny_family_preset_forward_backward_uses_every_parameter(preset, tmp_path):
    m = _model(preset).train()
    out = m(images(3))
    B, S, D = out.features.shape
    assert (B, D) == (3, m.config.hidden_size) and out.mask.shape == (3, S)
    assert out.pooled.shape == (3, m.config.embed_dim) and torch.equal(out.mask.sum(1), out.num_tokens)
    assert out.patch_token.shape == out.patch_depth.shape == (3, m.config.num_patches)
    assert torch.isfinite(out.features).all() and torch.isfinite(out.rate_loss)
    with torch.no_grad():  # the LLaVA tower's token bound for any select_layer, from the config
        hs = m.eval()(images(1), output_hidden_states=True).hidden_states
    n_cls = int(m.config.class_token)
    assert [h.shape[1] - n_cls for h in hs] == [m.config.tokens_after_block(i) for i in range(len(hs))]
    assert m.config.tokens_after_block(-1) == m.config.max_tokens
    m.train()
    (out.pooled.square().mean() + out.rate_loss).backward()
    unused = [n for n, p in m.named_parameters() if p.grad is None]
    assert not unused, f"parameters without gradient (DDP would fail): {unused}"
    # save / load keeps the family
    m.eval().save_pretrained(tmp_path)
    m2 = from_pretrained(tmp_path).eval()
    assert type(m2) is type(m)
    with torch.no_grad():
        assert torch.equal(m(images(2)).pooled, m2(images(2)).pooled)


@pytest.mark.parametrize("preset", TINY)
def test_eval_is_batch_invariant(preset):
    m = _model(preset).eval()
    x = images(4)
    with torch.no_grad():
        batch = m(x)
        for i in range(4):
            alone = m(x[i:i + 1])
            n = int(alone.num_tokens)
            assert n == int(batch.num_tokens[i])
            assert torch.equal(alone.patch_token[0], batch.patch_token[i])
            assert (alone.features[0, :n] - batch.features[i, :n]).abs().max() <= 1e-5
            assert (alone.pooled[0] - batch.pooled[i]).abs().max() <= 1e-5


@pytest.mark.parametrize("preset", TINY)
def test_analytic_macs_match_flop_counter(preset):
    m = _model(preset).eval()
    a, counted = flops.analytic_macs(m.config), flops.counted_macs(m)
    assert counted == pytest.approx(a, rel=0.01)
    vit = flops.analytic_macs(get_preset_config("vit-tiny-16"))
    assert a < vit


# ---- stopping at a block (what the LLaVA tower reads) -----------------------------------------------
# A-ViT with tokens halting at different depths and some hidden from the LLM, so masks and states vary by block
STOP_OVERRIDES = {"avit": {"halt_beta": -6.0, "drop_halted_before": 3}}


def _stop_model(preset):
    return _model(preset, **STOP_OVERRIDES.get(get_preset_config(preset).family, {}))


def _count_blocks(m):
    """(list the forward hooks fill with (body, block) of each block run, handles). Bodies: a cascade's exits
    (DVT's `exit_bodies`), else the model. Hooked on the attention's qkv, which every path calls (ToMe merges
    between a block's attention and MLP, DVT's relationship reuse reads the attention logits)."""
    ran = []
    bodies = getattr(m, "exit_bodies", [m])
    return ran, [b.attn.qkv.register_forward_hook(lambda mod, a, o, j=j, i=i: ran.append((j, i)))
                 for j, body in enumerate(bodies) for i, b in enumerate(body.blocks)]


def _blocks_to_run(m, out, idx):
    """(body, block) pairs a forward stopped at hidden state idx may run: blocks 1..idx of the model, or for a
    cascade (the output says which exits ran: `exit_ran`) every block of the exits before the last one run (they
    decide or feed its reuse) and blocks 1..idx of that last one."""
    if getattr(out, "exit_ran", None) is None:
        return [(0, i) for i in range(idx)]
    exits = out.exit_ran.any(0).nonzero().flatten().tolist()
    return [(j, i) for j in exits[:-1] for i in range(m.config.depth)] + [(exits[-1], i) for i in range(idx)]


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("preset", TINY)
def test_output_layer_is_the_hidden_state_and_runs_no_later_block(preset, train):
    m = _stop_model(preset).train(train)
    c, x = m.config, images(3, seed=2)
    n_cls, depth = int(m.config.class_token), m.config.depth
    with torch.no_grad():
        torch.manual_seed(5)  # DynamicViT's Gumbel draws: the stages both runs share get the same noise
        full = m.forward_features(x, output_hidden_states=True)
        ran, handles = _count_blocks(m)
        for k in list(range(depth + 1)) + [-2]:
            ran.clear()
            torch.manual_seed(5)
            out = m.forward_features(x, output_layer=k)
            idx = k % (depth + 1)
            assert ran == _blocks_to_run(m, out, idx) and out.hidden_states is None, k
            if getattr(out, "exit_index", None) is not None:  # a cascade: each image's state of the same exit
                assert torch.equal(out.exit_index, full.exit_index), k
            ref, ref_mask = full.hidden_states[idx], full.hidden_masks[idx][:, n_cls:]
            assert torch.equal(out.mask, ref_mask) and torch.equal(out.num_tokens, ref_mask.sum(1)), k
            assert torch.allclose(out.features, ref[:, n_cls:], atol=1e-6, rtol=0), k
            assert torch.allclose(out.cls_token, ref[:, 0], atol=1e-6, rtol=0), k
            assert out.patch_token.shape == (3, c.num_patches) and int(out.patch_depth.max()) <= idx, k
            if not train:
                assert out.features.shape[1] == c.tokens_after_block(k), k
            assert torch.isfinite(out.rate_loss), k
        for h in handles:
            h.remove()
    torch.manual_seed(5)  # every block run: the full auxiliary loss
    assert torch.allclose(m.forward_features(x, output_layer=depth).rate_loss, full.rate_loss, atol=1e-7)
    with pytest.raises(ValueError, match="output_layer"):
        m.forward_features(x, output_layer=depth + 1)


@pytest.mark.parametrize("preset", TINY)
def test_llava_tower_stops_at_its_block_for_every_family(preset):
    from drip_llava.model.vision_tower import DripVisionTower

    tower = DripVisionTower(_stop_model(preset), select_layer=-2)
    m, x = tower.model, images(2, seed=3)
    assert tower._stops_at_layer
    ran, handles = _count_blocks(m)
    feats, mask, rate = tower(x, return_rate_loss=True)
    for h in handles:
        h.remove()
    with torch.no_grad():
        full = m.forward_features(x, output_hidden_states=True)
        # the exits a stopped forward runs (a cascade's), from the same stopped forward
        assert ran == _blocks_to_run(m, m.forward_features(x, output_layer=tower.layer_index), m.config.depth - 1)
    n_cls, idx = int(m.config.class_token), tower.layer_index
    assert torch.equal(mask, full.hidden_masks[idx][:, n_cls:])
    assert torch.allclose(feats, full.hidden_states[idx][:, n_cls:], atol=1e-6, rtol=0)
    assert feats.shape[1] <= tower.max_tokens and torch.isfinite(rate)


def test_bench_shows_target_and_realised_tokens_per_family(capsys):
    from drip_llava.vision import bench

    presets = ["vit-tiny-16", "tome-tiny-16-r8", "dynamicvit-tiny-16-rho0.5", "avit-tiny-16"]
    res = bench.main(["--presets", ",".join(presets), "--batch", "2", "--repeats", "1", "--warmup", "0"])
    rows = {r["preset"]: r for r in res["results"]}
    assert [(rows[p]["tokens_target"], rows[p]["tokens_min"], rows[p]["tokens_max"]) for p in presets] == [
        (64, 64, 64), (16, 16, 16), (8, 8, 8), (64, 64, 64)]
    assert rows["tome-tiny-16-r8"]["tokens_mean"] == 16
    assert "| tome-tiny-16-r8 | 16 | 16.0 (16-16) |" in capsys.readouterr().out
    # A-ViT hiding early-halted tokens: the target counts the reference depths past drop_halted_before
    cfg = get_preset_config("avit-tiny-16", drop_halted_before=3)
    assert bench.target_tokens(cfg) == sum(d > 3 for d in cfg.reference_depths()) < 64
    assert bench.target_tokens(get_preset_config("drip-tiny-16-4x")) == 16


# ---- ToMe ---------------------------------------------------------------------------------------
def test_tome_r0_is_the_plain_vit_exactly():
    vit = _model("vit-tiny-16").eval()
    tome = create_model(vit.config.to_dict(), family="tome", merge_r=0).eval()
    tome.load_state_dict(vit.state_dict(), strict=True)
    x = images(2)
    with torch.no_grad():
        a, b = vit(x, output_hidden_states=True), tome(x, output_hidden_states=True)
    assert torch.equal(a.features, b.features) and torch.equal(a.pooled, b.pooled)
    assert all(torch.equal(h, g) for h, g in zip(a.hidden_states, b.hidden_states))
    assert torch.equal(b.patch_token[0], torch.arange(64))


def test_tome_merges_r_per_block_and_tracks_sizes():
    m = _model("tome-tiny-16-r8").eval()
    with torch.no_grad():
        out = m(images(2), output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [65, 57, 49, 41, 33, 25, 17]
    assert out.features.shape[1] == m.config.max_tokens == 16 and out.mask.all()
    for i in range(2):  # every output token holds >= 1 patch, every patch is in exactly one token
        sizes = torch.bincount(out.patch_token[i], minlength=16)
        assert sizes.sum() == 64 and (sizes >= 1).all()
    # a per-block schedule and r clipped to what bipartite matching allows
    cfg = get_preset_config("tome-tiny-16-r8", merge_r=[40, 40, 0, 0, 0, 0])
    assert [r for _, r in cfg.merge_schedule()] == [32, 16, 0, 0, 0, 0] and cfg.max_tokens == 16
    with pytest.raises(ValueError, match="one entry per block"):
        get_preset_config("tome-tiny-16-r8", merge_r=[1, 2])


def test_tome_runs_on_a_trained_vit_folder_without_training(tmp_path):
    vit = _model("vit-tiny-16").eval()
    vit.save_pretrained(tmp_path)
    tome = from_pretrained(tmp_path, family="tome", merge_r=4).eval()
    assert tome.config.family == "tome" and tome.config.merge_r == 4
    assert all(torch.equal(p, q) for p, q in zip(vit.state_dict().values(), tome.state_dict().values()))
    x = images(2)
    with torch.no_grad():
        full, merged = vit(x), tome(x)
    assert merged.features.shape[1] == 64 - 6 * 4
    cos = torch.nn.functional.cosine_similarity(full.pooled, merged.pooled)
    assert (cos > 0.5).all()  # merging similar tokens keeps the embedding close


@pytest.mark.parametrize("preset", [*TINY, "vit-tiny-16"])
def test_training_macs_match_flop_counter_on_a_training_forward(preset):
    """The bench's train-mode MAC ratio: DynamicViT and A-ViT (masking) and DVT (every exit) train at more than
    their inference MACs; ToMe and the ViT at the same."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    m = _model(preset).train()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        m(images(1))
    counted, t = counter.get_total_flops() / 2, flops.training_macs(m.config)
    assert counted == pytest.approx(t, rel=0.01)
    inference = flops.analytic_macs(m.config)
    assert (t > 1.1 * inference) == (m.config.family in ("dynamicvit", "avit", "dvt"))


def test_tome_proportional_attention_and_mean_pool_flops():
    for kw in ({"proportional_attention": False}, {"pool": "mean", "class_token": False},
               {"merge_r": [0, 16, 0, 8, 8, 0]}):
        m = _model("tome-tiny-16-r8", **kw).eval()
        assert flops.counted_macs(m) == pytest.approx(flops.analytic_macs(m.config), rel=0.01)


# ---- DynamicViT ---------------------------------------------------------------------------------
def test_dynamicvit_training_masks_attention_and_keeps_the_sequence():
    m = _model("dynamicvit-tiny-16-rho0.7").train()
    x = images(2)
    torch.manual_seed(3)
    out = m(x, output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [65] * 7 and out.features.shape[1] == 64
    assert not out.mask.all() and torch.equal(out.mask, out.patch_token >= 0)
    dropped = ~out.hidden_masks[-2]  # [B,T] after the last stage (block 4 of 6)

    def scramble(module, args):  # large changes to the dropped tokens entering the last block
        h = args[0]
        return (torch.where(dropped[..., None], 10 * torch.randn_like(h), h),) + tuple(args[1:])

    handle = m.blocks[-1].register_forward_pre_hook(scramble)
    try:
        torch.manual_seed(3)  # same Gumbel noise, same decisions
        again = m(x)
    finally:
        handle.remove()
    assert torch.equal(again.mask, out.mask)
    assert (again.features - out.features)[out.mask].abs().max() < 1e-3  # kept tokens never saw them


def test_dynamicvit_eval_removes_tokens_top_k():
    m = _model("dynamicvit-tiny-16-rho0.5").eval()
    with torch.no_grad():
        out = m(images(3), output_hidden_states=True)
    k = m.config.keep_counts()
    assert k == [32, 16, 8] and m.config.prune_locations == [1, 3, 4]
    assert [h.shape[1] for h in out.hidden_states] == [65, 65, 33, 33, 17, 9, 9]
    assert out.features.shape[1] == 8 and out.mask.all() and (out.num_tokens == 8).all()
    for i in range(3):  # each kept patch appears once; dropped patches record the block they stopped before
        kept = out.patch_token[i] >= 0
        assert torch.equal(out.patch_token[i][kept].sort().values, torch.arange(8))
        assert set(out.patch_depth[i][~kept].tolist()) == {1, 3, 4} and (out.patch_depth[i][kept] == 6).all()


def test_dynamicvit_policy_that_keeps_nothing_gives_no_nan():
    m = _model("dynamicvit-tiny-16-rho0.7").train()
    for p in m.predictors:
        torch.nn.init.zeros_(p.out_conv[-1].weight)
        p.out_conv[-1].bias.data = torch.tensor([-50.0, 50.0])  # drop everything
    out = m(images(2))
    assert (out.num_tokens == 0).all()
    loss = out.pooled.square().mean() + out.rate_loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    with torch.no_grad():
        assert (m.eval()(images(2)).num_tokens == m.config.max_tokens).all()


def test_dynamicvit_task_loss_alone_reaches_every_predictor():
    m = _model("dynamicvit-tiny-16-rho0.7").train()
    m(images(2)).pooled.square().mean().backward()
    for p in m.predictors:
        assert p.out_conv[-1].weight.grad is not None and p.out_conv[-1].weight.grad.abs().sum() > 0


def test_dynamicvit_ratio_loss_moves_keep_rates_to_target():
    m = _model("dynamicvit-tiny-16-rho0.5", depth=4, prune_locations=[1, 2, 3], hidden_size=64, num_heads=2).train()
    opt = torch.optim.Adam(m.predictors.parameters(), lr=1e-2)
    x = images(8)
    for _ in range(40):
        out = m(x)
        opt.zero_grad()
        out.rate_loss.backward()
        opt.step()
    rates = torch.zeros(3)
    with torch.no_grad():
        for _ in range(5):
            depth = m(x).patch_depth.float()  # a patch dropped before block b has depth b
            rates += torch.stack([(depth > loc).float().mean() for loc in (1, 2, 3)]) / 5
    assert torch.allclose(rates, torch.tensor([0.5, 0.25, 0.125]), atol=0.06), rates


def test_dynamicvit_distillation_to_the_unpruned_vit():
    from drip_llava.vision.dynamicvit import distillation_loss, unpruned_teacher

    x = images(3)
    m = _model("dynamicvit-tiny-16-rho0.7", keep_rate=1.0).eval()
    teacher = unpruned_teacher(m)
    assert type(teacher) is DripVisionModel and not any(p.requires_grad for p in teacher.parameters())
    head = torch.nn.Linear(m.config.embed_dim, 5)
    with torch.no_grad():  # keeping every patch, the student is its teacher
        s, t = m(x), teacher(x)
        kl, mse = distillation_loss(s, t, head(s.pooled), head(t.pooled))
    assert kl.abs() < 1e-6 and mse < 1e-10
    with pytest.raises(ValueError, match="every|all 64"):
        distillation_loss(s, _model("tome-tiny-16-r8").eval()(x), head(s.pooled), head(t.pooled))

    m = _model("dynamicvit-tiny-16-rho0.5")
    teacher = unpruned_teacher(m)
    with torch.no_grad():  # pruned: positive in eval (tokens removed) and training (tokens masked)
        t = teacher(x)
        t_logits = head(t.pooled)
        for mode in (False, True):
            torch.manual_seed(0)
            s = m.train(mode)(x)
            kl, mse = distillation_loss(s, t, head(s.pooled), t_logits)
            assert kl > 1e-6 and mse > 1e-4, mode

    def loss(seed):
        torch.manual_seed(seed)
        s = m(x)
        kl, mse = distillation_loss(s, t, head(s.pooled), t_logits)
        return kl + mse

    m.train()
    with torch.no_grad():
        before = sum(loss(seed) for seed in range(3)) / 3
    opt = torch.optim.Adam(m.parameters(), lr=1e-4)
    for step in range(6):
        opt.zero_grad()
        loss(step).backward()
        opt.step()
    with torch.no_grad():
        after = sum(loss(seed) for seed in range(3)) / 3
    assert after < 0.75 * before, (before, after)  # measured: 0.026 -> 0.014


def test_classify_distils_dynamicvit_to_a_teacher(tmp_path):
    """vision_pretrain.classify --distill-teacher: `self` (the initial ViT weights) and a classify run of the ViT
    (its tower and head); the logged terms are positive; the wrong setups are errors."""
    from PIL import Image

    from vision_pretrain import classify

    g = torch.Generator().manual_seed(0)
    for i, (name, rgb) in enumerate([("red", (200, 30, 30)), ("blue", (35, 65, 200))] * 3):
        (tmp_path / "data" / name).mkdir(parents=True, exist_ok=True)
        pixels = torch.tensor(rgb) + torch.randint(0, 50, (64, 64, 3), generator=g)  # a colour + noise
        Image.fromarray(pixels.to(torch.uint8).numpy()).save(tmp_path / "data" / name / f"{i}.png")
    vit = tmp_path / "vit"
    torch.manual_seed(0)
    create_model("vit-tiny-16", image_size=64, patch_size=8, hidden_size=64, depth=4, num_heads=2,
                 embed_dim=32).save_pretrained(vit)
    common = ["--train-dir", str(tmp_path / "data"), "--batch-size", "4", "--steps", "2", "--log-every", "1",
              "--no-tqdm"]
    dyn = ["--mode", "finetune", "--init", str(vit), "--vision-override", 'family="dynamicvit"', "keep_rate=0.5"]

    def step_logs(run):
        return [r for r in read_jsonl(run / "log.jsonl") if r["event"] == "step"]

    classify.main(dyn + ["--distill-teacher", "self", "--output", str(tmp_path / "self"), *common])
    logs = step_logs(tmp_path / "self")
    assert len(logs) == 2 and all(r["distill_kl"] >= 0 and r["distill_mse"] > 0 for r in logs)
    assert from_pretrained(tmp_path / "self" / "vision_tower").config.family == "dynamicvit"
    # a classify run of the ViT as the teacher: its own head gives the teacher's class distribution
    classify.main(["--mode", "finetune", "--init", str(vit), "--output", str(tmp_path / "teacher"), *common])
    classify.main(dyn + ["--distill-teacher", str(tmp_path / "teacher"), "--output", str(tmp_path / "run"), *common])
    assert all(r["distill_kl"] > 0 and r["distill_mse"] > 0 for r in step_logs(tmp_path / "run"))
    for argv, match in [(["--mode", "linear-probe", "--init", str(vit), "--distill-teacher", "self"], "finetune or"),
                        (["--mode", "finetune", "--init", str(vit), "--distill-teacher", "self"], "token-reducing"),
                        (dyn + ["--distill-teacher", str(tmp_path / "self")], "plain ViT")]:  # a pruned teacher
        args = classify.parse_args(argv + ["--train-dir", "x", "--output", "y"])
        with pytest.raises(ValueError, match=match):
            classify.build_teacher(args.model, classify.build_tower(args.model), ["blue", "red"])


# ---- pictures -----------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["tome-tiny-16-r8", "dynamicvit-tiny-16-rho0.5"])
def test_visualize_draws_merged_and_dropped_patches(preset, tmp_path):
    from drip_llava.vision import images as example_images
    from drip_llava.vision import visualize

    model = _model(preset).eval()
    im = example_images.load_image("example:astronaut")
    labels, n = visualize.segment_labels(model, im)
    pic, n2 = visualize.segment_overlay(model, im)
    assert n == n2 == model.config.max_tokens and labels.shape == (8, 8)
    assert sorted(set(labels[labels >= 0].tolist())) == list(range(n))
    assert int((labels < 0).sum()) == (0 if model.config.family == "tome" else 64 - n)
    res = visualize.main(["--model", preset, "--image", "example:coffee", "--out", str(tmp_path / "p.png")])
    assert (tmp_path / "p.png").is_file() and res["num_tokens"] == [n]


def test_one_figure_shows_every_family_on_the_same_photos(tmp_path):
    """make compare's picture: a row per tower, the same images in the columns, each panel's count the tower's."""
    from drip_llava.vision import images as example_images
    from drip_llava.vision import visualize

    models = {p: _model(p).eval() for p in ("vit-tiny-16", "tome-tiny-16-r8", "avit-tiny-16", "dvt-tiny-16")}
    specs = ["example:astronaut", "example:coffee"]
    ims = [example_images.load_image(s) for s in specs]
    path, counts = visualize.render_towers(models, ims, [example_images.image_label(s) for s in specs],
                                           str(tmp_path / "towers.png"))
    assert path.stat().st_size > 0 and list(counts) == list(models)
    assert counts == {p: [visualize.segment_overlay(m, im)[1] for im in ims] for p, m in models.items()}
    assert counts["vit-tiny-16"] == [64, 64] and counts["tome-tiny-16-r8"] == [16, 16]
    assert counts["dvt-tiny-16"] == [16, 16]  # its preset's fixed exit: the 4 x 4 grid


@pytest.mark.parametrize("preset,family", [("tome-tiny-16-r8", "tome"), ("dynamicvit-tiny-16-rho0.5", "dynamicvit")])
def test_family_as_llava_tower(preset, family, tiny_llm_dir):
    """A family preset goes through the one spec function into LLaVA: the frozen tower (eval mode) gives each
    image the token count its config states for the block LLaVA reads, and the LLM trains on it."""
    from drip_llava.constants import IMAGE_TOKEN_INDEX
    from drip_llava.model.llava_llama import DripLlavaForCausalLM

    torch.manual_seed(0)
    model = DripLlavaForCausalLM.from_pretrained(str(tiny_llm_dir), dtype=torch.float32)
    model.initialize_vision_modules(preset)
    tower = model.get_vision_tower()
    assert tower.model.config.family == family
    n = tower.model.config.tokens_after_block(-2)
    assert tower.max_tokens == n
    images = torch.randn(2, 3, 128, 128)
    assert [t.shape[0] for t in model.encode_images(images)] == [n, n]
    ids = torch.tensor([[5, IMAGE_TOKEN_INDEX, 7, 8, 9]] * 2)
    model.train()
    out = model(input_ids=ids, labels=ids.clamp(min=0), images=images)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in model.mm_projector.parameters())
