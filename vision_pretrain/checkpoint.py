"""Atomic training checkpoints and `--resume auto`.

A checkpoint is a folder RUN/checkpoints/step_00000120/ holding
  model.safetensors     the whole trained module (CLIP model, or tower + head)
  trainer_state.pt      optimizer, scheduler, scaler, step, epoch, data position, counters, args
  rng_rank{r}.pt        every rank's RNG states (torch, cuda, python, numpy)
It is written into a hidden temporary folder and renamed in one os.replace, so a run killed mid-save leaves
either the previous complete checkpoint or the new one, never a half-written folder that `--resume auto` picks.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from drip_llava.distributed import DistInfo, barrier

_STEP_DIR = re.compile(r"^step_(\d{8})$")
REQUIRED = ("model.safetensors", "trainer_state.pt", "rng_rank0.pt")


def ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # numpy's state holds an ndarray; stored as a tensor so torch.load(weights_only=True) accepts it
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = ckpt_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)
             and all((p / f).is_file() for f in REQUIRED)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def resolve_resume(resume: Optional[str], run_dir: str | Path) -> Optional[Path]:
    """'auto' -> latest complete checkpoint of the run (None if there is none); a path -> that folder."""
    if not resume or resume == "none":
        return None
    if resume == "auto":
        ckpts = list_checkpoints(run_dir)
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (missing {missing})")
    return path


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, trainer_state: dict,
                    info: DistInfo, keep: int = 2) -> Path:
    """Collective: every rank calls it (each stores its RNG state); rank 0 writes the rest and renames."""
    root = ckpt_root(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # leftover of a run killed mid-save
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier(info)
    torch.save(rng_state(), tmp / f"rng_rank{info.rank}.pt")
    if info.is_main:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save({**trainer_state, "world_size": info.world_size}, tmp / "trainer_state.pt")
    barrier(info)
    if info.is_main:
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # same step saved twice (e.g. end of run == periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    barrier(info)
    return final


def load_checkpoint(path: Path, model: torch.nn.Module, info: DistInfo) -> dict:
    """Loads weights strictly into `model`, restores this rank's RNG; returns trainer_state."""
    load_model(model, str(path / "model.safetensors"), strict=True)  # raises naming missing/unexpected keys
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    rng_file = path / f"rng_rank{info.rank}.pt"
    if state.get("world_size") != info.world_size or not rng_file.is_file():
        raise RuntimeError(f"{path} was saved with world size {state.get('world_size')}, this run has "
                           f"{info.world_size}: exact resume needs the same world size")
    set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return state


def export_atomic(save_fn, target: Path) -> None:
    """Runs save_fn(tmp_dir) and swaps the result into `target` (a folder replaced as a whole)."""
    target = Path(target)
    tmp = target.with_name(f".tmp-{target.name}")
    old = target.with_name(f".old-{target.name}")
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    save_fn(tmp)
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)
