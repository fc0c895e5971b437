"""Every tower family under torch DDP (2 gloo ranks on CPU, find_unused_parameters=False): each parameter gets a
gradient in every training step, so DDP raises no "unused parameters" error, and the ranks' weights stay equal
although their images (and so their kept / merged / halted tokens) differ."""
import datetime
import faulthandler
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from drip_llava.distributed import free_port
from drip_llava.vision import create_model, list_presets
from drip_llava.vision.families import list_families

# one tiny preset per registered family other than DRIP (DRIP's own DDP test is in test_vision_encoder.py)
PRESETS = [ps[0] for f in list_families() if f != "drip" and (ps := [p for p in list_presets(f) if "tiny" in p])]
# A-ViT with tokens halting at different depths (its default start runs almost every token to the end)
OVERRIDES = {"avit-tiny-16": {"halt_beta": -6.0}}


def _worker(rank: int, world: int, port: int, preset: str, result):
    faulthandler.dump_traceback_later(240, exit=True)  # a stuck rank prints where it is and fails the test
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    torch.manual_seed(0)  # same initial weights on both ranks
    model = create_model(preset, **OVERRIDES.get(preset, {})).train()
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(rank))  # different images per rank
    torch.manual_seed(1 + rank)  # different Gumbel noise per rank (DynamicViT)
    w = model.config.rate_loss_weight
    for _ in range(2):  # DDP reports parameters left out of step 1's reduction in step 2's forward
        out = ddp(x)
        loss = out.pooled.square().mean() + w * out.rate_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    result[rank] = {"weights_diff": float((gathered[0] - gathered[1]).abs().max()),
                    "num_tokens": out.num_tokens.tolist(), "rate_loss": out.rate_loss.item()}
    dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()


@pytest.mark.parametrize("preset", PRESETS)
def test_family_trains_under_ddp_with_every_parameter_used(preset):
    result = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_worker, args=(2, free_port(), preset, result), nprocs=2, join=True, start_method="spawn")
    assert result[0]["weights_diff"] == 0.0 and result[1]["weights_diff"] == 0.0  # parameters stay in sync
    assert all(torch.isfinite(torch.tensor(result[r]["rate_loss"])) for r in (0, 1))


def test_every_family_is_covered():
    assert {"tome", "dynamicvit", "avit"} <= {create_model(p).config.family for p in PRESETS}


@pytest.mark.parametrize("preset", ["drip-tiny-16-4x", *PRESETS])
def test_every_parameter_survives_deepspeeds_byte_broadcast_in_bf16(preset):
    """DeepSpeed's engine start broadcasts each parameter as `p.data.view(torch.uint8)`; a 0-dim bf16 parameter
    cannot be viewed so and stops stage 1 before its first step."""
    model = create_model(preset).to(torch.bfloat16)
    for name, p in model.named_parameters():
        assert p.data.view(torch.uint8).numel() == 2 * p.numel(), name
