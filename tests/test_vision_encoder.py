"""DRIP encoder: the properties every consumer relies on (batch invariance, gradients, masks, rates, import)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from drip_llava.distributed import free_port
from drip_llava.vision import DripVisionConfig, DripVisionModel, get_preset_config, list_presets

TINY = [p for p in list_presets() if "tiny" in p]


def images(n, size=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def test_all_presets_load_and_are_consistent():
    names = list_presets()
    for arch in ("b-32", "b-16", "l-14", "tiny-16"):
        assert f"vit-{arch}" in names
        for c in ("2x", "4x", "10x"):
            cfg = get_preset_config(f"drip-{arch}-{c}")
            assert cfg.target_rate == pytest.approx(1 / float(c[:-1]))
            assert 0 < cfg.n_pre < cfg.depth
    assert get_preset_config("vit-b-16").is_drip is False
    assert get_preset_config("drip-b-16-4x", n_pre=4).n_short == 8


def test_unknown_preset_lists_valid_names():
    with pytest.raises(KeyError, match="drip-tiny-16-4x"):
        DripVisionModel.from_preset("drip-huge-3x")


def test_bad_config_values_are_errors():
    with pytest.raises(ValueError, match="rate_loss"):
        DripVisionConfig(rate_loss="cubic")
    with pytest.raises(ValueError, match="patch_size"):
        DripVisionConfig(image_size=100, patch_size=16)


@pytest.mark.parametrize("preset", TINY)
def test_forward_backward_every_tiny_preset_uses_every_parameter(preset):
    torch.manual_seed(0)
    m = DripVisionModel.from_preset(preset).train()
    out = m(images(3))
    B, S, D = out.features.shape
    assert (B, D) == (3, m.config.hidden_size) and out.mask.shape == (3, S)
    assert out.pooled.shape == (3, m.config.embed_dim)
    assert torch.equal(out.mask.sum(1), out.num_tokens) and int(out.num_tokens.max()) == S
    assert (out.num_tokens >= 1).all() and (out.boundaries[:, -1] == 1).all()
    (out.pooled.square().mean() + out.rate_loss).backward()
    unused = [n for n, p in m.named_parameters() if p.grad is None]
    assert not unused, f"parameters without gradient (DDP would fail): {unused}"


def test_eval_is_batch_invariant_and_seed_independent():
    m = DripVisionModel.from_preset("drip-tiny-16-4x").eval()
    x = images(6)
    with torch.no_grad():
        torch.manual_seed(1)
        batch = m(x)
        torch.manual_seed(2)
        counts = set()
        for i in range(6):
            alone = m(x[i:i + 1])
            n = int(alone.num_tokens)
            counts.add(n)
            assert n == int(batch.num_tokens[i])
            assert torch.equal(alone.boundaries[0], batch.boundaries[i])
            assert (alone.features[0] - batch.features[i, :n]).abs().max() <= 1e-5
            assert (alone.pooled[0] - batch.pooled[i]).abs().max() <= 1e-5
            assert not batch.mask[i, n:].any()
        # mixed batch in another order: same answer
        perm = torch.tensor([5, 0, 3, 1, 4, 2])
        shuffled = m(x[perm])
        assert (shuffled.pooled - batch.pooled[perm]).abs().max() <= 1e-5
    assert len(counts) > 1, "the test needs images with different token counts"


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_task_loss_alone_reaches_the_boundary_predictor(pool):
    torch.manual_seed(0)
    m = DripVisionModel.from_preset("drip-tiny-16-4x", pool=pool).train()
    out = m(images(4))
    out.pooled.square().sum().backward()  # no rate loss: gradient must come through the pooling matrix
    g = m.boundary_predictor.mlp[0].weight.grad
    assert g is not None and g.abs().sum() > 0


def test_soft_boundary_mode_trains_and_reaches_predictor():
    torch.manual_seed(0)
    m = DripVisionModel.from_preset("drip-tiny-16-4x", boundary_mode="soft").train()
    out = m(images(4))
    out.pooled.square().sum().backward()
    assert m.boundary_predictor.mlp[0].weight.grad.abs().sum() > 0
    assert torch.isfinite(out.pooled).all()


@pytest.mark.parametrize("kind,weight", [("binomial", 1.0), ("hinge", 1.0), ("squared", 10.0)])
@pytest.mark.parametrize("preset", ["drip-tiny-16-2x", "drip-tiny-16-10x"])
def test_rate_loss_drives_hard_rate_to_target(kind, weight, preset):
    """Toy optimisation on the rate loss alone: the hard boundary rate must move to the target."""
    torch.manual_seed(0)
    m = DripVisionModel.from_preset(preset, rate_loss=kind, depth=2, n_pre=1, hidden_size=64, num_heads=2).train()
    opt = torch.optim.Adam(m.boundary_predictor.parameters(), lr=2e-2)
    x = images(8)
    target = m.config.target_rate
    with torch.no_grad():  # start far from the target so the loss has to do the work
        m.boundary_predictor.mlp[2].bias.fill_(3.0 if target < 0.3 else -3.0)
    rates = []
    for _ in range(80):
        out = m(x)
        opt.zero_grad()
        (weight * out.rate_loss).backward()
        opt.step()
        rates.append(out.boundaries.detach().mean().item())
    start, end = rates[0], sum(rates[-30:]) / 30  # training rate (Gumbel); the end averaged over steps
    assert abs(start - target) > 0.3
    assert abs(end - target) <= 0.2 * target + 1 / 64, (kind, start, end, target)


def test_eval_boundary_count_matches_the_training_expectation():
    """Logits just below 0 would give ~1 token at eval under a plain threshold; 'expected' keeps the count."""
    m = DripVisionModel.from_preset("drip-tiny-16-4x").eval()
    with torch.no_grad():
        m.boundary_predictor.mlp[2].bias.fill_(-1.2)  # sigmoid ~ 0.23 on average: ~15 of 64 patches
        x = images(4)
        hidden = m.forward_features(x, output_hidden_states=True).hidden_states
        logits = m.boundary_predictor(hidden[m.config.n_pre][:, 1:])
        expected = torch.sigmoid(logits[:, :-1]).sum(1).round() + 1
        out = m(x)
        assert torch.equal(out.num_tokens, expected.long())
        # the kept boundaries are the most probable ones
        for i in range(4):
            kept = logits[i, :-1][out.boundaries[i, :-1] == 1]
            dropped = logits[i, :-1][out.boundaries[i, :-1] == 0]
            assert kept.min() >= dropped.max()
        m.config.eval_boundaries = "threshold"
        thr = m(x)
        assert torch.equal(thr.boundaries, (torch.sigmoid(logits) > 0.5).float().index_fill(1, torch.tensor([63]), 1))


def test_mask_extremes_single_segment_and_every_patch():
    m = DripVisionModel.from_preset("drip-tiny-16-4x").eval()
    x = images(2)
    L = m.config.num_patches
    with torch.no_grad():
        one = m(x, boundaries=torch.zeros(2, L))  # last patch forced: exactly one segment
        assert one.features.shape[1] == 1 and one.num_tokens.tolist() == [1, 1] and one.mask.all()
        assert torch.isfinite(one.pooled).all()
        full = m(x, boundaries=torch.ones(2, L))
        assert full.features.shape[1] == L and full.mask.all()
        mixed = torch.stack([torch.zeros(L), torch.ones(L)])
        both = m(x, boundaries=mixed)
        assert both.num_tokens.tolist() == [1, L]
        assert (both.pooled[0] - one.pooled[0]).abs().max() <= 1e-5
        assert (both.pooled[1] - full.pooled[1]).abs().max() <= 1e-5
        # with the 'mean' pool, padding must not enter the average
    mean_model = DripVisionModel.from_preset("drip-tiny-16-4x", pool="mean").eval()
    with torch.no_grad():
        a = mean_model(x[:1], boundaries=torch.zeros(1, L)).pooled
        b = mean_model(x, boundaries=mixed).pooled[:1]
    assert (a - b).abs().max() <= 1e-5


def test_hidden_states_and_masks_line_up():
    m = DripVisionModel.from_preset("drip-tiny-16-4x").eval()
    with torch.no_grad():
        out = m(images(3), output_hidden_states=True)
    c = m.config
    assert len(out.hidden_states) == len(out.hidden_masks) == c.depth + 1
    for i, (h, mk) in enumerate(zip(out.hidden_states, out.hidden_masks)):
        assert h.shape[:2] == mk.shape
        expect = 1 + (c.num_patches if i <= c.n_pre else out.features.shape[1])
        assert h.shape[1] == expect
    assert torch.equal(out.hidden_masks[-1][:, 1:], out.mask)


def test_save_load_round_trip(tmp_path):
    m = DripVisionModel.from_preset("drip-tiny-16-10x", rate_loss="binomial").eval()
    m.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    m2 = DripVisionModel.from_pretrained(tmp_path).eval()
    assert m2.config.compression == 10 and m2.config.rate_loss == "binomial"
    x = images(2)
    with torch.no_grad():
        a, b = m(x), m2(x)
    assert torch.equal(a.num_tokens, b.num_tokens) and (a.pooled - b.pooled).abs().max() == 0


@pytest.mark.parametrize("patch,size", [(16, 64), (32, 96), (64, 128), (32, 100)])
def test_patch_embedding_is_the_conv_whichever_form_runs(patch, size):
    """On CPU patches of CPU_MATMUL_PATCH px and more are embedded by a matmul: same values and gradients as the
    conv, pixels past the last whole patch ignored as the conv does."""
    from drip_llava.vision.model import CPU_MATMUL_PATCH

    m = DripVisionModel(DripVisionConfig(image_size=size - size % patch, patch_size=patch, hidden_size=32, depth=1,
                                         num_heads=2, embed_dim=16, n_pre=1))
    x = images(2, size).requires_grad_()
    got = m.patchify(x)
    ref = m.patch_embed(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    g_got = torch.autograd.grad(got.square().sum(), (x, m.patch_embed.weight))
    g_ref = torch.autograd.grad(ref.square().sum(), (x, m.patch_embed.weight))
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    if patch < CPU_MATMUL_PATCH:
        assert torch.equal(got, ref)  # the conv itself


def test_bf16_autocast_forward_on_cpu():
    m = DripVisionModel.from_preset("drip-tiny-16-4x").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(images(2))
        loss = out.pooled.float().square().mean() + out.rate_loss
    loss.backward()
    assert out.rate_loss.dtype == torch.float32 and torch.isfinite(loss)


def test_open_clip_import_matches_open_clip_visual():
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    oc = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    for p in oc.visual.parameters():  # open_clip zero-inits some biases; randomise so the map is checked
        p.data.add_(0.02 * torch.randn_like(p))
    d = DripVisionModel.from_open_clip(oc, preset="drip-b-32-4x").eval()
    assert d.config.compression == 4 and d.config.n_pre == 2
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = oc.visual(x)
        ours = d(x, boundaries=torch.ones(2, d.config.num_patches)).pooled
        plain = DripVisionModel.from_open_clip(oc).eval()(x).pooled
    assert (ref - ours).abs().max() <= 1e-4
    assert (ref - plain).abs().max() <= 1e-4


def _ddp_worker(rank, world, port, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    m = torch.nn.parallel.DistributedDataParallel(DripVisionModel.from_preset("drip-tiny-16-4x").train())
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    # rank 1 sees a flat image (few segments likely), rank 0 noise: different segment counts per rank
    x = images(2, seed=rank) if rank == 0 else torch.zeros(2, 3, 128, 128)
    for _ in range(2):
        out = m(x)
        loss = out.pooled.square().mean() + out.rate_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    flat = torch.cat([p.detach().flatten() for p in m.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    result[rank] = (int(out.features.shape[1]), float((gathered[0] - gathered[1]).abs().max()))
    dist.destroy_process_group()


def test_ddp_two_ranks_with_different_segment_counts():
    ctx = mp.get_context("spawn")
    result = ctx.Manager().dict()
    mp.start_processes(_ddp_worker, args=(2, free_port(), result), nprocs=2, join=True, start_method="spawn")
    assert result[0][1] == 0.0 and result[1][1] == 0.0  # parameters stay in sync
