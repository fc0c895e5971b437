"""Packed shortened blocks (real tokens only, attention per image) against the padded reference path, the
variable-length attention kernels, and stopping the encoder at a layer (what the LLaVA tower runs)."""
import pytest
import torch

from drip_llava.vision import DripVisionModel
from drip_llava.vision import model as vmodel
from drip_llava.vision.flops import even_boundaries

TOL = 1e-5


def images(n, size=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def uneven_boundaries(B=4, L=64, seed=0):
    """Boundaries with very different segment counts per image (1 .. L), so the padded batch is mostly padding."""
    g = torch.Generator().manual_seed(seed)
    counts = [1, 5, 17, L][:B]
    b = torch.cat([even_boundaries(L, n) for n in counts])
    return b[torch.randperm(B, generator=g)]


def _model(preset="drip-tiny-16-4x", **kw):
    torch.manual_seed(0)
    return DripVisionModel.from_preset(preset, **kw)


def _run(m, path, x, **kw):
    m.short_path = path
    return m(x, **kw)


def _close_on_real(a, b, out):
    m = out.mask
    assert torch.allclose(a.features[m], b.features[m], atol=TOL, rtol=0)
    if a.cls_token is not None:
        assert torch.allclose(a.cls_token, b.cls_token, atol=TOL, rtol=0)
    assert torch.allclose(a.pooled, b.pooled, atol=TOL, rtol=0)


@pytest.mark.parametrize("kw", [{}, {"pool": "mean", "class_token": False}])
def test_packed_equals_padded_eval(kw):
    m = _model(**kw).eval()
    x, b = images(4), uneven_boundaries()
    with torch.no_grad():
        ref = _run(m, "padded", x, boundaries=b, output_hidden_states=True)
        out = _run(m, "packed", x, boundaries=b, output_hidden_states=True)
    assert torch.equal(ref.mask, out.mask) and torch.equal(ref.num_tokens, out.num_tokens)
    _close_on_real(ref, out, out)
    assert not out.features[~out.mask].any()  # packed: the padding is zeros
    for h_ref, h, hm in zip(ref.hidden_states, out.hidden_states, out.hidden_masks):
        assert torch.allclose(h_ref[hm], h[hm], atol=TOL, rtol=0)
    # with the predictor's own boundaries too
    with torch.no_grad():
        _close_on_real(_run(m, "padded", x), _run(m, "packed", x), out=_run(m, "auto", x))


@pytest.mark.parametrize("boundary_mode", ["hard", "soft"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_equals_padded_train_with_gradients(boundary_mode, checkpointing):
    """Same Gumbel noise (same seed) -> same boundaries; then outputs, rate loss and every gradient agree."""
    grads, outs = {}, {}
    for path in ("padded", "packed"):
        m = _model(boundary_mode=boundary_mode).train()
        if checkpointing:
            m.gradient_checkpointing_enable()
        torch.manual_seed(1)
        out = _run(m, path, images(5))
        assert int(out.num_tokens.min()) < int(out.num_tokens.max())  # the batch really has padding
        loss = out.pooled.square().mean() + out.features[out.mask].square().mean() + 10 * out.rate_loss
        loss.backward()
        grads[path] = {n: p.grad for n, p in m.named_parameters()}
        outs[path] = out
    ref, out = outs["padded"], outs["packed"]
    assert torch.equal(ref.boundaries, out.boundaries)
    _close_on_real(ref, out, out)
    assert torch.allclose(ref.rate_loss, out.rate_loss)
    for n, g in grads["padded"].items():
        assert g is not None and grads["packed"][n] is not None, n
        scale = g.abs().max().clamp(min=1e-3)
        assert ((g - grads["packed"][n]).abs().max() / scale) < 1e-4, n


def test_packed_is_batch_invariant():
    m = _model().eval()
    m.short_path = "packed"
    x, b = images(4, seed=3), uneven_boundaries(seed=3)
    with torch.no_grad():
        batch = m(x, boundaries=b)
        for i in range(4):
            one = m(x[i:i + 1], boundaries=b[i:i + 1])
            n = int(one.num_tokens[0])
            assert int(batch.num_tokens[i]) == n
            assert torch.allclose(batch.features[i, :n], one.features[0, :n], atol=TOL, rtol=0)
            assert torch.allclose(batch.pooled[i], one.pooled[0], atol=TOL, rtol=0)


def test_auto_packs_only_when_there_is_padding():
    m = _model().eval()
    seen = []
    m.stage_hook = lambda name, t: seen.append((name, t.dim())) if name == "pooling" else None
    with torch.no_grad():
        m(images(4), boundaries=uneven_boundaries())
        m(images(4), boundaries=even_boundaries(64, 9, batch=4))
    assert seen == [("pooling", 2), ("pooling", 3)]  # packed [N,D], then padded [B,S,D] without padding
    m.short_path = "sideways"
    with pytest.raises(ValueError, match="short_path"):
        m(images(2))


def test_varlen_kernels_agree():
    torch.manual_seed(0)
    lengths = [3, 11, 1, 7]
    pack = vmodel.Packing.from_lengths(lengths, 11, torch.device("cpu"))
    q, k, v = (torch.randn(sum(lengths), 4, 8, requires_grad=True) for _ in range(3))
    ref = []
    for kernel in ("loop", "nested"):
        pack.kernel = kernel
        out = vmodel.varlen_attention(q, k, v, pack)
        (g,) = torch.autograd.grad(out.square().sum(), q)
        ref.append((out, g))
    (o1, g1), (o2, g2) = ref
    assert torch.allclose(o1, o2, atol=TOL) and torch.allclose(g1, g2, atol=1e-4)
    # against plain SDPA image by image
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        exp = torch.nn.functional.scaled_dot_product_attention(*(t[sl].transpose(0, 1) for t in (q, k, v)))
        assert torch.allclose(o1[sl], exp.transpose(0, 1), atol=TOL)
        start += n


def test_varlen_kernel_choice(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert vmodel.resolve_varlen_kernel(cpu, torch.float32) == "loop"
    monkeypatch.setattr(vmodel, "_flash_varlen", lambda: None)
    assert vmodel.resolve_varlen_kernel(cuda, torch.bfloat16) == "nested"
    monkeypatch.setattr(vmodel, "_flash_varlen", lambda: object())
    assert vmodel.resolve_varlen_kernel(cuda, torch.bfloat16) == "flash"
    assert vmodel.resolve_varlen_kernel(cuda, torch.float32) == "nested"  # flash-attn has no fp32
    assert vmodel.resolve_varlen_kernel(cuda, torch.float16, "loop") == "loop"
    with pytest.raises(ValueError, match="varlen kernel"):
        vmodel.resolve_varlen_kernel(cpu, torch.float32, "magic")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_equals_padded_cuda(dtype):
    m = _model().eval().cuda().to(dtype)
    x, b = images(4).cuda(), uneven_boundaries().cuda()
    with torch.no_grad():
        ref, out = _run(m, "padded", x, boundaries=b), _run(m, "packed", x, boundaries=b)
    tol = TOL if dtype == torch.float32 else 5e-2
    assert torch.allclose(ref.features[out.mask].float(), out.features[out.mask].float(), atol=tol, rtol=tol)


# ---- stopping at a layer ---------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["drip-tiny-16-4x", "vit-tiny-16"])
@pytest.mark.parametrize("path", ["padded", "packed"])
def test_output_layer_equals_hidden_states(preset, path):
    m = _model(preset).eval()
    m.short_path = path
    x = images(3, seed=2)
    n_cls = int(m.config.class_token)
    with torch.no_grad():
        full = m.forward_features(x, output_hidden_states=True)
        depth = m.config.depth
        for k in list(range(depth + 1)) + [-1, -2]:
            out = m.forward_features(x, output_layer=k)
            assert out.hidden_states is None
            idx = k % (depth + 1)
            ref, ref_mask = full.hidden_states[idx], full.hidden_masks[idx][:, n_cls:]
            assert torch.equal(out.mask, ref_mask), k
            assert torch.allclose(out.features[ref_mask], ref[:, n_cls:][ref_mask], atol=TOL, rtol=0), k
            assert torch.allclose(out.cls_token, ref[:, 0], atol=TOL, rtol=0), k
            if m.config.is_drip and idx > m.config.n_pre:
                assert torch.equal(out.num_tokens, full.num_tokens) and torch.equal(out.rate_loss, full.rate_loss)
        with pytest.raises(ValueError, match="output_layer"):
            m.forward_features(x, output_layer=depth + 1)


def test_output_layer_skips_later_blocks():
    m = _model().eval()
    ran = []
    for i, blk in enumerate(m.blocks):
        blk.register_forward_hook(lambda mod, a, o, i=i: ran.append(i))
    with torch.no_grad():
        m.forward_features(images(2), output_layer=-2)
    assert ran == list(range(m.config.depth - 1))
    ran.clear()
    with torch.no_grad():  # before pooling: the predictor does not run either
        out = m.forward_features(images(2), output_layer=m.config.n_pre)
    assert ran == list(range(m.config.n_pre)) and out.boundaries is None
    assert out.features.shape[1] == m.config.num_patches and bool(out.mask.all())


@pytest.mark.parametrize("frozen", [True, False])
def test_tower_stops_at_its_layer_and_returns_the_rate_loss(frozen):
    from drip_llava.model.vision_tower import DripVisionTower

    tower = DripVisionTower(_model(), select_layer=-2, frozen=frozen).train()
    m = tower.model
    x = images(3, seed=5)
    torch.manual_seed(4)
    feats, mask, rate = tower(x, return_rate_loss=True)
    torch.manual_seed(4)
    ref = m.forward_features(x, output_hidden_states=True)
    idx = tower.layer_index
    assert torch.equal(mask, ref.hidden_masks[idx][:, 1:])
    assert torch.allclose(feats[mask], ref.hidden_states[idx][:, 1:][mask], atol=TOL, rtol=0)
    assert torch.allclose(rate, ref.rate_loss)
    assert rate.requires_grad == (not frozen)
    feats2, mask2 = tower(x)
    assert feats2.shape[0] == 3 and mask2.dtype == torch.bool


def test_tower_takes_the_hidden_state_from_an_encoder_without_output_layer():
    from drip_llava.model.vision_tower import DripVisionTower

    class NoStop(DripVisionModel):
        def forward_features(self, pixel_values, boundaries=None, output_hidden_states=False):
            return super().forward_features(pixel_values, boundaries, output_hidden_states)

    torch.manual_seed(0)
    ref_model = _model()
    other = NoStop(ref_model.config)
    other.load_state_dict(ref_model.state_dict())
    x = images(3, seed=6)
    with torch.no_grad():
        (fa, ma, ra), (fb, mb, rb) = (DripVisionTower(m)(x, return_rate_loss=True) for m in (ref_model, other))
    assert not DripVisionTower(other)._stops_at_layer and torch.equal(ma, mb)
    assert torch.allclose(fa[ma], fb[mb], atol=TOL, rtol=0) and torch.equal(ra, rb)
