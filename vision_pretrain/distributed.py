"""Process-group setup from torchrun's environment; a plain `python -m ...` run is world size 1.

Collectives here only ever move fixed-shape tensors (pooled embeddings, metric vectors). DRIP's segment count
varies per image, so a tensor sized by it differs between ranks, and torch.distributed's all_gather needs the same
shape on every rank: gathering such a tensor would hang or time out.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from drip_llava.distributed import end_process_group


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(local_rank: int = 0, device: str | None = None) -> torch.device:
    """cuda:<local_rank> when a GPU is present, else CPU (or what the user asked for)."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device: str | None = None, timeout_s: int = 1800) -> DistInfo:
    """Initialise from torchrun's RANK/WORLD_SIZE/LOCAL_RANK (nccl on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(local_rank, device)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def cleanup(info: DistInfo) -> None:
    if info.distributed:
        end_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_fixed(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """[*] -> [world, *]; every rank must pass the same shape."""
    if not info.distributed:
        return t[None]
    out = [torch.empty_like(t) for _ in range(info.world_size)]
    dist.all_gather(out, t.contiguous())
    return torch.stack(out)


def broadcast_object(obj, info: DistInfo, src: int = 0):
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
