"""Multi-process runs (torchrun or the deepspeed launcher): process-group setup and fixed-shape collectives, a free
rendezvous port, and an ending that reports a finished run as finished. Depends on torch only, so every layer
(vision_pretrain included) uses this one module.

Setup reads torchrun's environment; a plain `python -m ...` run is world size 1. The collectives only ever move
fixed-shape tensors (pooled embeddings, metric vectors): DRIP's segment count varies per image, so a tensor sized
by it differs between ranks, and torch.distributed's all_gather needs the same shape on every rank (gathering such
a tensor would hang or time out).

On CPU (gloo), a rank can abort while its interpreter shuts down, after all its work is written: a gloo worker
thread that still owns the last reference to a tensor of an async collective needs the GIL to free it, and a
thread asking for the GIL during interpreter finalization is stopped inside C++ code that cannot unwind
("terminate called without an active exception", exit -6). The launcher then kills the other ranks and fails
the run. `destroy_process_group()` is not enough: DeepSpeed (ZeRO-3's parameter groups) and accelerate keep their
own references to the groups, so the C++ objects and their threads outlive it. Seen twice in CI on ZeRO-3
stage 1 (0 of 15 runs on a slower machine here: timing-dependent). Launcher entry points therefore end with
`exit_after_main`: once `main` has returned on a multi-process run, flush, then leave without interpreter
teardown.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist


def end_process_group() -> None:
    """Leave the process group on every rank together (only after success: after one rank crashed, a barrier
    would just hang the others)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a launcher's rendezvous: fixed ports collide with a second run or a
    leftover one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_multiprocess() -> bool:
    """True under torchrun / the deepspeed launcher with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def deepspeed_shm_buffer() -> Path:
    """This rank's shared-memory segment of DeepSpeed's CPU allreduce (ops/csrc/cpu/comm/shm.cpp names it
    deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>). DeepSpeed never unlinks it: every
    CPU run would leave ~69 MB per rank in /dev/shm, which is RAM, until the machine runs out of it."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    rank = os.environ.get("RANK", "0")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_deepspeed_shm() -> None:
    """Unlink this rank's DeepSpeed allreduce segment, if there is one. Safe once the rank's collectives are over:
    the peers' mappings stay valid after the name is gone (POSIX shm), only the memory's owner list shrinks."""
    if hasattr(os, "getuid"):  # POSIX only; elsewhere DeepSpeed's CPU op is not built
        deepspeed_shm_buffer().unlink(missing_ok=True)


def orphan_deepspeed_shm(root: Path = Path("/dev/shm")) -> list[Path]:
    """This user's DeepSpeed allreduce segments of finished runs: left by ranks killed before `release_deepspeed_shm`
    (the deepspeed launcher SIGKILLs the other ranks when one fails). A segment counts as live while its run's
    rendezvous port (in its name) cannot be bound here (in use, or not this machine's address) or a process whose
    memory map is readable maps it."""
    if not hasattr(os, "getuid"):
        return []
    candidates = []
    for seg in sorted(root.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")):
        head, port, _rank = seg.name.rsplit("_", 2)
        addr = head[len(f"deepspeed_allreduce_buffer_{os.getuid()}_"):]
        if port.isdigit() and not _port_taken(addr, int(port)):
            candidates.append(seg)
    if not candidates:
        return []
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # exited meanwhile, or not readable (its rank would hold the port)
            continue
        mapped.update(seg for seg in candidates if str(seg) in text)
    return [seg for seg in candidates if seg not in mapped]


def _port_taken(addr: str, port: int) -> bool:
    try:
        with socket.socket() as s:
            s.bind((addr, port))
        return False
    except OSError:  # in use, or not an address of this machine
        return True


def release_orphan_deepspeed_shm(root: Path = Path("/dev/shm")) -> int:
    """Unlink `orphan_deepspeed_shm(root)`; returns how many."""
    orphans = orphan_deepspeed_shm(root)
    for seg in orphans:
        seg.unlink(missing_ok=True)
    return len(orphans)


def exit_after_main(main: Callable[[], Any]) -> None:
    """Run a launcher entry point; on a multi-process run that returned, flush and `os._exit(0)` so that teardown
    cannot fail the finished run. `main` has already left the group (every entry point ends with
    `end_process_group`). Exceptions propagate as usual (non-zero exit); single-process runs exit normally.
    Either way the rank's DeepSpeed shared-memory segment is released (`release_deepspeed_shm`)."""
    try:
        main()
    finally:
        release_deepspeed_shm()
    if not launched_multiprocess():
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)



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


def prebuild_deepspeed_ops() -> str:
    """Build the C++ ops DeepSpeed would otherwise JIT-compile at the first launch (`make install` calls this).

    On CPU, DeepSpeed's allreduce uses a shared-memory op it compiles on first use (~25 s on 2 cores, cached in
    TORCH_EXTENSIONS_DIR): compile work that belongs to installing, not to the first training run. Other
    accelerators need no such op here; returns what was done.

    The build runs with this environment's bin/ first on PATH, as the launchers run (`deepspeed`, torchrun, the
    demo, the tests): torch builds with the first `ninja` on PATH, and a system ninja (1.11) beside the venv's
    (1.13) each rejects the other's build log and recompiles everything (~37 s at every alternation)."""
    from deepspeed.accelerator import get_accelerator

    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

    accel = get_accelerator()
    builder = accel.create_op_builder("ShareMemCommBuilder")
    if builder is None or not builder.is_compatible():
        return f"no shared-memory comm op to build for accelerator {accel.device_name()!r}"
    builder.load()
    return f"built {builder.absolute_name()} for accelerator {accel.device_name()!r}"


if __name__ == "__main__":
    if sys.argv[1:] != ["--prebuild-ops"]:
        raise SystemExit("usage: python -m drip_llava.distributed --prebuild-ops")
    print(prebuild_deepspeed_ops())
