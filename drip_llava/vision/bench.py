"""Speed benchmark of DRIP vs ViT presets (inference or a training step), interleaved in one process.

Why interleaved: the presets run round-robin (warm-up rounds, then `repeats` timed rounds, median), so a
slow-down of the machine hits every preset alike and the ratios stay fair.
Why calibrated: a random-init predictor does not produce the target boundary rate, so by default the
predictor's last bias is set so the boundary rate on the benchmark batch equals the target (eval: the
config's eval rule, threshold or expected count; train: expected Gumbel-Sigmoid rate). The achieved tokens
per image are measured and printed.

Peak memory: CUDA `max_memory_allocated` (absolute, weights included) on GPU. On CPU the peak RSS growth
during one step above the RSS just before it: Linux's VmHWM is reset through /proc/self/clear_refs ("5")
before the step and read after it (exact); elsewhere a psutil thread samples RSS every 1 ms. Freed heap is
returned to the OS first (gc + glibc malloc_trim) so an earlier, larger preset does not hide the growth.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .calibrate import MODES, calibrate_boundary_bias
from .config import list_presets
from .flops import analytic_macs, default_tokens_short

# wall: perf_counter (what a user sees). cpu: process CPU time, robust when other jobs share the cores; use it
# with --threads 1 (with more threads, OpenMP spin-waiting is counted as well)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


# ---- memory ------------------------------------------------------------------------------------
def _malloc_trim():
    gc.collect()
    if sys.platform.startswith("linux"):
        libc_name = ctypes.util.find_library("c")
        if libc_name:
            try:
                ctypes.CDLL(libc_name).malloc_trim(0)
            except (OSError, AttributeError):
                return  # not glibc: RSS may include cached free heap (documented)


def _vm_kb(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _can_reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _vm_kb("VmHWM") is not None


class PeakMemory:
    """Context manager: `.peak_mb` after exit = peak memory of the enclosed step (see module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = float("nan")
        if device.type == "cuda":
            self.method = "cuda max_memory_allocated"
        elif _can_reset_hwm():
            self.method = "peak RSS growth (VmHWM reset via /proc/self/clear_refs)"
        else:
            self.method = "peak RSS growth (psutil sampling, 1 ms)"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        _malloc_trim()
        if "clear_refs" in self.method:
            Path("/proc/self/clear_refs").write_text("5")
            self._base = _vm_kb("VmRSS") * 1024
        else:
            import psutil

            proc = psutil.Process(os.getpid())
            self._base = self._peak = proc.memory_info().rss
            self._stop = threading.Event()

            def sample():
                while not self._stop.is_set():
                    self._peak = max(self._peak, proc.memory_info().rss)
                    time.sleep(0.001)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        elif "clear_refs" in self.method:
            self.peak_mb = max(0, _vm_kb("VmHWM") * 1024 - self._base) / 2 ** 20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(0, self._peak - self._base) / 2 ** 20
        return False


# ---- one preset --------------------------------------------------------------------------------
class Runner:
    """A random-init model + optimizer + fixed batch; `step()` runs one timed infer / train step."""

    def __init__(self, preset: str, mode: str, batch: int, device: torch.device, image_size=None,
                 bf16: bool = False, calibrate: bool = True, seed: int = 0, lr: float = 1e-6, clock: str = "wall"):
        from .model import DripVisionModel

        torch.manual_seed(seed)
        overrides = {"image_size": image_size} if image_size else {}
        self.preset, self.mode, self.device, self.clock = preset, mode, device, CLOCKS[clock]
        self.model = DripVisionModel.from_preset(preset, **overrides).to(device)
        c = self.model.config
        g = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(batch, 3, c.image_size, c.image_size, generator=g).to(device)
        self.target_tokens = default_tokens_short(c)
        self.bias = calibrate_boundary_bias(self.model, self.x, mode) if (calibrate and c.is_drip) else None
        self.model.train(mode == "train")
        # lr is tiny on purpose: the step's cost is what is measured; the calibrated rate must not drift
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr) if mode == "train" else None
        self.autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16
                         else contextlib.nullcontext())
        self.times, self.mem_mb, self.tokens, self.padded = [], [], [], []

    def _run(self):
        if self.mode == "infer":
            with torch.no_grad(), self.autocast:
                out = self.model(self.x)
        else:
            self.opt.zero_grad(set_to_none=True)
            with self.autocast:
                out = self.model(self.x)
                loss = out.pooled.float().square().mean() + self.model.config.rate_loss_weight * out.rate_loss
            loss.backward()
            self.opt.step()
        return out

    def step(self, record: bool, mem: PeakMemory):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        with mem:
            t0 = self.clock()
            out = self._run()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            dt = self.clock() - t0
        if record:
            self.times.append(dt)
            self.mem_mb.append(mem.peak_mb)
            n = out.num_tokens.float()
            self.tokens.append(float(n.mean()))
            self.padded.append(int(out.mask.shape[1]))
        return dt

    def summary(self, batch: int) -> dict:
        c = self.model.config
        med = statistics.median(self.times)
        best = min(self.times)
        tokens = statistics.fmean(self.tokens)
        padded = statistics.fmean(self.padded)
        return {
            "preset": self.preset, "median_s": med, "min_s": best, "images_per_s": batch / med,
            "times_s": self.times,
            "tokens_target": self.target_tokens if c.is_drip else c.num_patches,
            "tokens_mean": tokens, "tokens_padded": padded, "calibrated_bias": self.bias,
            "gmacs": analytic_macs(c, tokens if c.is_drip else None) / 1e9,
            "gmacs_padded": analytic_macs(c, padded if c.is_drip else None) / 1e9,
            "peak_mem_mb": max(self.mem_mb),
        }


def run_benchmark(presets: Sequence[str], mode: str = "infer", batch: int = 8, repeats: int = 3,
                  warmup: int = 1, image_size: Optional[int] = None, bf16: bool = False, calibrate: bool = True,
                  device: Optional[str] = None, seed: int = 0, clock: str = "wall") -> dict:
    """Round-robin over presets: `warmup` untimed rounds then `repeats` timed rounds. Ratios vs presets[0]."""
    from tqdm import tqdm

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {list(CLOCKS)}, got {clock!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if clock == "cpu" and dev.type == "cuda":
        raise ValueError("--clock cpu measures host CPU time; use wall on GPU")
    runners = [Runner(p, mode, batch, dev, image_size, bf16, calibrate, seed, clock=clock) for p in presets]
    mem = PeakMemory(dev)
    rounds = [(r >= warmup) for r in range(warmup + repeats)]
    with tqdm(total=len(rounds) * len(runners), desc=f"bench {mode}", file=sys.stderr) as bar:
        for record in rounds:
            for runner in runners:
                dt = runner.step(record, mem)
                bar.set_postfix_str(f"{runner.preset} {dt:.2f}s")
                bar.update()
    rows = [r.summary(batch) for r in runners]
    base = rows[0]
    for r in rows:
        r["speed_ratio"] = base["median_s"] / r["median_s"]
        r["speed_ratio_min"] = base["min_s"] / r["min_s"]  # less sensitive to other load on a shared machine
        r["mac_ratio"] = base["gmacs"] / r["gmacs"]
        r["mac_ratio_padded"] = base["gmacs_padded"] / r["gmacs_padded"]
        r["speed_over_mac"] = r["speed_ratio"] / r["mac_ratio"]
    return {
        "mode": mode, "batch": batch, "repeats": repeats, "warmup": warmup, "device": str(dev),
        "threads": torch.get_num_threads(), "dtype": "bf16-autocast" if bf16 else "fp32",
        "calibrate": calibrate, "clock": clock, "memory_method": mem.method, "torch": torch.__version__,
        "results": rows,
    }


def markdown_table(res: dict) -> str:
    lines = [
        f"mode={res['mode']} batch={res['batch']} repeats={res['repeats']} device={res['device']} "
        f"threads={res['threads']} dtype={res['dtype']} calibrated={res['calibrate']} clock={res['clock']}",
        "",
        "| preset | tokens/img (target) | padded S | median s/step | images/s | speed ratio (min) | MAC ratio "
        "(padded) | speed / MAC | GMACs/img | peak mem MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["results"]:
        lines.append(
            f"| {r['preset']} | {r['tokens_mean']:.1f} ({r['tokens_target']}) | {r['tokens_padded']:.0f} | "
            f"{r['median_s']:.3f} | {r['images_per_s']:.1f} | {r['speed_ratio']:.2f} ({r['speed_ratio_min']:.2f}) | "
            f"{r['mac_ratio']:.2f} ({r['mac_ratio_padded']:.2f}) | "
            f"{r['speed_over_mac']:.2f} | {r['gmacs']:.2f} | {r['peak_mem_mb']:.0f} |")
    lines.append(f"\nratios vs {res['results'][0]['preset']} (speed: median step time, in brackets: fastest step; "
                 f"MACs: at the mean tokens per image, in brackets: at the padded batch length); "
                 f"memory: {res['memory_method']}")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m drip_llava.vision.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="vit-b-16,drip-b-16-4x,drip-b-16-10x",
                    help="comma-separated; ratios are relative to the first")
    ap.add_argument("--mode", choices=MODES, default="infer",
                    help="infer = eval + no_grad; train = fwd + bwd + AdamW step (Gumbel boundaries)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (predictor stays fp32)")
    ap.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                    help="set the predictor bias so the boundary rate equals the target on the batch")
    ap.add_argument("--device", default=None, help="default: cuda if available else cpu")
    ap.add_argument("--clock", choices=list(CLOCKS), default="wall",
                    help="wall time, or process CPU time (robust on a shared machine; use with --threads 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="OUT", help="write the results as JSON")
    args = ap.parse_args(argv)
    args.presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in args.presets if p not in list_presets()]
    if unknown:
        ap.error(f"unknown preset(s) {unknown}; valid: {', '.join(list_presets())}")
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        ap.error("--batch and --repeats must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run_benchmark(args.presets, args.mode, args.batch, args.repeats, args.warmup, args.image_size,
                        args.bf16, args.calibrate, args.device, args.seed, args.clock)
    print(markdown_table(res))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
