"""Run logging: one JSONL file per run (records tagged "event": step / epoch / eval / resume / end), rank 0 only.

On resume the file is cut back to the checkpoint's step, so the log reads as one run in which every optimizer
step appears exactly once (the steps a killed run made after its last checkpoint are redone, and logged once).
"""
from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import torch

from drip_llava.jsonl import read_jsonl


class JsonlLogger:
    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, event: str, **record) -> dict:
        rec = {"event": event, "time": round(time.time(), 3), **record}
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec, default=_jsonable) + "\n")
        return rec

    def truncate_after(self, step: int) -> int:
        """Drops records with a step beyond `step` (written by a run killed after its last checkpoint)."""
        if not self.enabled or not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by kill -9
                dropped += 1
                continue
            if rec.get("step", 0) > step:
                dropped += 1
            else:
                kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, self.path)
        return dropped


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """GPU: peak allocated since the last reset (per step). CPU: the process's resident high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def summarize_clip_run(run: str | Path) -> dict:
    """A finished CLIP run in a few numbers (last epoch's zero-shot, GMACs, step time; the loss curve; the mean
    training boundary rate over the last quarter of the steps and its target), for side-by-side reports."""
    from drip_llava.vision.config import create_config

    run = Path(run)
    recs = read_jsonl(run / "log.jsonl")
    tower = create_config(json.loads((run / "vision_tower" / "config.json").read_text()))  # any tower family
    steps = [r for r in recs if r.get("event") == "step"]
    epochs = [r for r in recs if r.get("event") == "epoch"]
    last = epochs[-1] if epochs else {}
    tail = steps[-max(1, len(steps) // 4):]
    return {
        "steps": [{k: r.get(k) for k in ("step", "loss", "boundary_rate", "tokens_per_img", "step_time")}
                  for r in steps],
        "zeroshot_top1": last.get("zeroshot_top1"), "zeroshot_top5": last.get("zeroshot_top5"),
        "eval_tokens_per_img": last.get("zeroshot_tokens_per_img"), "gmacs": last.get("gmacs"),
        "avg_step_time": last.get("avg_step_time"),
        "train_boundary_rate": sum(r["boundary_rate"] for r in tail) / len(tail) if tail else None,
        "target_rate": tower.target_rate,
    }
