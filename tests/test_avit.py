"""A-ViT tower family (drip_llava.vision.avit): halting off is the plain ViT, eval skipping equals training
masking, the auxiliary loss steers the halting depth, a fully halted batch is finite, MACs at the realised token
counts. Forward/backward, every parameter used, batch invariance, save/load and the config's MAC figure are in
test_tower_families.py (avit-tiny-16 is one of its tiny presets)."""
import pytest
import torch

from drip_llava.vision import create_model, flops


def images(n, size=128, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _model(spec="avit-tiny-16", **kw):
    torch.manual_seed(0)
    return create_model(spec, **kw)


def test_halting_disabled_is_the_plain_vit():
    vit = _model("vit-tiny-16").eval()
    avit = create_model(vit.config.to_dict(), family="avit", halt_gamma=0.0, halt_beta=-1e4)
    missing, _ = avit.load_state_dict(vit.state_dict(), strict=False)
    assert sorted(missing) == ["halt_beta", "halt_gamma"]
    x = images(2)
    with torch.no_grad():
        a = vit(x, output_hidden_states=True)
        for mode in (False, True):
            b = avit.train(mode)(x, output_hidden_states=True)
            assert torch.equal(a.features, b.features) and torch.equal(a.pooled, b.pooled)
            assert all(torch.equal(h, g) for h, g in zip(a.hidden_states, b.hidden_states))
            assert (b.token_depth == 6).all() and b.mask.all()


def test_eval_skipping_equals_training_masking():
    m = _model(halt_beta=-6.0)
    x = images(3)
    with torch.no_grad():
        ev = m.eval()(x, output_hidden_states=True)
        tr = m.train()(x, output_hidden_states=True)
    depth = ev.token_depth
    assert torch.equal(depth, tr.token_depth) and 1.5 < depth.float().mean() < 5.5  # some tokens halt early
    assert (ev.features - tr.features).abs().max() < 1e-4
    assert (ev.rate_loss - tr.rate_loss).abs() < 1e-5
    for i in range(1, 7):  # a halted token keeps the state it halted with
        done = depth < i
        assert torch.equal(ev.hidden_states[i][done], ev.hidden_states[i - 1][done])


def test_halted_tokens_do_not_reach_running_ones_in_training():
    m = _model(halt_beta=-6.0).train()
    x = images(2)
    out = m(x, output_hidden_states=True)
    halted = out.token_depth < 5  # halted before the last block (index 5)

    def scramble(module, args):
        h = args[0]
        return (torch.where(halted[..., None], 10 * torch.randn_like(h), h),) + tuple(args[1:])

    handle = m.blocks[-1].register_forward_pre_hook(scramble)
    try:
        again = m(x, output_hidden_states=True)
    finally:
        handle.remove()
    assert halted.any() and not halted.all()
    assert (again.hidden_states[-1] - out.hidden_states[-1])[~halted].abs().max() < 1e-4


def test_every_token_halting_at_block_one_gives_no_nan():
    m = _model(halt_beta=50.0).train()
    out = m(images(2), output_hidden_states=True)
    assert (out.token_depth == 1).all()
    loss = out.pooled.square().mean() + out.rate_loss
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(out.features).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    with torch.no_grad():
        ev = m.eval()(images(2), output_hidden_states=True)
    assert torch.isfinite(ev.features).all() and (ev.token_depth == 1).all()
    assert torch.equal(ev.hidden_states[1], ev.hidden_states[-1])  # nothing ran after block 1
    assert (ev.features - out.features.detach()).abs().max() < 1e-4


def test_auxiliary_loss_moves_mean_depth_to_target():
    m = _model(hidden_size=64, num_heads=2, depth=6, target_depth=3.0, halt_beta=-10.0).train()
    x = images(4)
    with torch.no_grad():
        start = m(x).token_depth.float().mean().item()
    opt = torch.optim.Adam(m.parameters(), lr=3e-2)
    for _ in range(40):
        out = m(x)
        opt.zero_grad()
        out.rate_loss.backward()
        opt.step()
    with torch.no_grad():
        end = m.eval()(x).token_depth.float().mean().item()
    assert start > 5 and abs(end - 3.0) < 1.0, (start, end)


def test_drop_halted_before_hides_early_tokens_from_the_llm():
    m = _model(halt_beta=-6.0, drop_halted_before=3).eval()
    with torch.no_grad():
        out = m(images(2), output_hidden_states=True)
    d = out.patch_depth
    assert torch.equal(out.mask, d > 3) and torch.equal(out.num_tokens, (d > 3).sum(1))
    assert 0 < int(out.num_tokens.min()) and int(out.num_tokens.max()) < 64
    assert torch.equal(out.patch_token >= 0, out.mask)
    for i, hm in enumerate(out.hidden_masks):
        assert torch.equal(hm, out.token_depth > min(i, 3))
    with pytest.raises(ValueError, match="drop_halted_before"):
        _model(drop_halted_before=6)


def test_macs_at_the_realised_token_counts():
    m = _model(halt_beta=-6.0).eval()
    for seed in range(2):
        x = images(1, seed=seed)
        counted, _ = flops.count_forward_macs(m, x)
        with torch.no_grad():
            depth = m(x).token_depth[0]
        tokens = [int((depth > i).sum()) for i in range(m.config.depth)]
        assert tokens[0] == 65 and tokens[-1] < 65
        analytic = sum(v for k, v in flops.avit_macs(m.config, tokens).items() if not k.startswith("tokens"))
        assert counted == analytic
    # the config's figure: patches halting as the target distribution says
    assert m.config.reference_tokens() == [65, 65, 61, 46, 20, 4]
    assert flops.counted_macs(m) == flops.analytic_macs(m.config)


def test_visualize_draws_the_halting_depth(tmp_path):
    from drip_llava.vision import visualize

    res = visualize.main(["--model", "avit-tiny-16", "--image", "example:coffee", "--out", str(tmp_path / "d.png")])
    assert (tmp_path / "d.png").is_file() and res["num_tokens"] == [64]


def test_avit_as_llava_tower(tiny_llm_dir):
    """Through the one spec function into LLaVA: each image gives the LLM its tokens that did not halt before
    `drop_halted_before` (at the block LLaVA reads), and the LLM trains on them."""
    from drip_llava.constants import IMAGE_TOKEN_INDEX
    from drip_llava.model.llava_llama import DripLlavaForCausalLM

    torch.manual_seed(0)
    model = DripLlavaForCausalLM.from_pretrained(str(tiny_llm_dir), dtype=torch.float32)
    model.initialize_vision_modules("avit-tiny-16", halt_beta=-6.0, drop_halted_before=2)
    tower = model.get_vision_tower()
    assert tower.model.config.family == "avit" and tower.max_tokens == 64
    x = images(2)
    with torch.no_grad():
        depth = tower.model.eval()(x).patch_depth
    expected = (depth > 2).sum(1).tolist()  # LLaVA reads block depth-1 (select_layer -2), after block 2
    assert [t.shape[0] for t in model.encode_images(x)] == expected and min(expected) < 64
    ids = torch.tensor([[5, IMAGE_TOKEN_INDEX, 7, 8, 9]] * 2)
    model.train()
    out = model(input_ids=ids, labels=ids.clamp(min=0), images=x)
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_loss_stopped_at_a_block_is_the_loss_of_the_truncated_depths():
    """Forced halting depths (one-hot halting distributions, remainder 1 at the halting block): stopped at block
    k, the loss is ponder (min(depth, k) + 1) and KL(target folded at k || histogram of min(depth, k))."""
    m = _model().eval()
    c = m.config
    depths = torch.tensor([c.depth] + c.reference_depths())  # CLS first, it runs every block
    target = c.target_distribution()
    with torch.no_grad(), m.reference_tokens():
        for k in range(1, c.depth + 1):
            out = m.forward_features(images(2), output_layer=k)
            d = depths.clamp(max=k)
            assert torch.equal(out.token_depth, d.expand(2, -1)), k
            hist = torch.bincount(d - 1, minlength=k).float() / d.numel()
            folded = torch.cat([target[:k - 1], target[k - 1:].sum(0, keepdim=True)])
            kl = (folded * (folded.log() - hist.clamp(min=1e-6).log())).sum()
            expected = c.ponder_weight * (d.float().mean() + 1) + c.distr_weight * kl
            assert torch.allclose(out.rate_loss, expected, atol=1e-6), k
