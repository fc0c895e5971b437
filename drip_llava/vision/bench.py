"""Speed benchmark of DRIP vs ViT presets (inference or a training step), interleaved in one process.

Why interleaved: the presets run round-robin (warm-up rounds, then `repeats` timed rounds, median), so a
slow-down of the machine hits every preset alike and the ratios stay fair.
Why calibrated: a random-init predictor does not produce the target boundary rate, so by default the
predictor's last bias is set so the boundary rate on the benchmark batch equals the target (eval: the
config's eval rule, threshold or expected count; train: expected Gumbel-Sigmoid rate). The achieved tokens
per image are measured and printed.

A preset may carry the shortened blocks' path as a suffix, `drip-b-16-4x@padded` (reference) or `@packed`
(default `auto`: packed when the batch has padding), to compare both in one run, and config overrides after `+`:
`dvt-b-16+exit_policy=fixed:1`, `tome-b-16-r8+merge_r=12`.

Per-part profile (`--profile`, and printed whenever a DRIP preset stays below the goal fraction of its MAC
ratio, `GOALS`): extra steps with a stage callback in the model time embedding + pre blocks, predictor,
pooling, shortened blocks and head (+ the optimizer in train mode), next to each part's analytic MACs. In
train mode the backward is split by gradient-hook timestamps at the stage boundaries.

`--llava-tower`: the LLaVA tower's forward (frozen, select layer -2) on a ViT-L/14-336-shaped encoder at batch
16 by default, the full hidden-states path (every block, all depth+1 hidden states kept) against stopping at
the selected block: time and peak memory side by side.

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
from .config import list_presets, parse_overrides
from .families import create_model
from .flops import analytic_macs, default_tokens_short, macs_breakdown, training_macs

# wall: perf_counter (what a user sees). cpu: process CPU time, robust when other jobs share the cores; use it
# with --threads 1 (with more threads, OpenMP spin-waiting is counted as well)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
# goals of speed ratio / MAC ratio vs the ViT; below them the per-part profile is printed
GOALS = {"infer": 0.95, "train": 0.92}
SHORT_PATHS = ("auto", "packed", "padded")


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


def vm_kb(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux: "5" to /proc/self/clear_refs); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return vm_kb("VmHWM") is not None


class PeakMemory:
    """Context manager: `.peak_mb` after exit = peak memory of the enclosed step (see module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = float("nan")
        if device.type == "cuda":
            self.method = "cuda max_memory_allocated"
        elif reset_peak_rss():
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
            self._base = vm_kb("VmRSS") * 1024
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
            self.peak_mb = max(0, vm_kb("VmHWM") * 1024 - self._base) / 2 ** 20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(0, self._peak - self._base) / 2 ** 20
        return False


def make_adamw(params, lr: float) -> torch.optim.Optimizer:
    """AdamW with the fused kernel (one pass over all parameters; on CPU ~7x faster than the default per-tensor
    loop at ViT-B size, measured), which weighs the same for every preset; the default one where unsupported."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr)


# ---- one preset --------------------------------------------------------------------------------
def split_spec(spec: str) -> tuple[str, str, dict]:
    """'PRESET[@PATH][+KEY=VALUE...]' -> (preset, path or '', config overrides)."""
    head, *pairs = spec.split("+")
    name, _, path = head.partition("@")
    return name, path, parse_overrides(pairs)


def target_tokens(config) -> int:
    """Visual tokens per image a tower's config aims to output (what an LLM fed with its output gets): DRIP
    L / compression, the plain ViT L, ToMe / DynamicViT their fixed count, A-ViT the patches whose reference
    halting depth is past `drop_halted_before` (all L without it); any other family its `max_tokens`."""
    if config.family == "drip":
        return default_tokens_short(config)
    if config.family == "avit" and config.drop_halted_before is not None:
        return sum(d > config.drop_halted_before for d in config.reference_depths())
    return config.max_tokens


class Runner:
    """A random-init model + optimizer + fixed batch; `step()` runs one timed infer / train step."""

    def __init__(self, preset: str, mode: str, batch: int, device: torch.device, image_size=None,
                 bf16: bool = False, calibrate: bool = True, seed: int = 0, lr: float = 1e-6, clock: str = "wall"):

        torch.manual_seed(seed)
        overrides = {"image_size": image_size} if image_size else {}
        self.preset, self.mode, self.device, self.clock = preset, mode, device, CLOCKS[clock]
        name, path, fields = split_spec(preset)
        self.model = create_model(name, **overrides, **fields).to(device)
        self.model.short_path = path or "auto"
        c = self.model.config
        g = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(batch, 3, c.image_size, c.image_size, generator=g).to(device)
        self.target_tokens = target_tokens(c)
        self.bias = calibrate_boundary_bias(self.model, self.x, mode) if (calibrate and c.is_drip) else None
        self.model.train(mode == "train")
        # lr is tiny on purpose: the step's cost is what is measured; the calibrated rate must not drift
        self.opt = make_adamw(self.model.parameters(), lr) if mode == "train" else None
        self.autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16
                         else contextlib.nullcontext())
        self.times, self.mem_mb, self.tokens, self.padded, self.counts = [], [], [], [], []

    def _run(self, timer: Optional["StageTimer"] = None):
        if self.mode == "infer":
            with torch.no_grad(), self.autocast:
                out = self.model(self.x)
        else:
            self.opt.zero_grad(set_to_none=True)
            with self.autocast:
                out = self.model(self.x)
                loss = out.pooled.float().square().mean() + self.model.config.rate_loss_weight * out.rate_loss
            if timer is not None:
                timer.backward_start()
            loss.backward()
            if timer is not None:
                timer.optimizer_start()
            self.opt.step()
        return out

    def profile_step(self, timer: "StageTimer") -> dict:
        """One step with the stage callback on: seconds per part (see `StageTimer`)."""
        self.model.stage_hook = timer
        try:
            timer.start()
            self._run(timer)
            return timer.finish()
        finally:
            self.model.stage_hook = None

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
            self.counts += out.num_tokens.tolist()
            self.padded.append(int(out.mask.shape[1]))
        return dt

    def summary(self, batch: int) -> dict:
        c = self.model.config
        macs = training_macs if self.mode == "train" else analytic_macs  # what the timed step computes
        med = statistics.median(self.times)
        best = min(self.times)
        tokens = statistics.fmean(self.tokens)
        padded = statistics.fmean(self.padded)
        return {
            "preset": self.preset, "median_s": med, "min_s": best, "images_per_s": batch / med,
            "times_s": self.times,
            "tokens_target": self.target_tokens, "tokens_mean": tokens, "tokens_min": min(self.counts),
            "tokens_max": max(self.counts), "tokens_padded": padded, "calibrated_bias": self.bias,
            "gmacs": macs(c, tokens if c.is_drip else None) / 1e9,
            "gmacs_padded": macs(c, padded if c.is_drip else None) / 1e9,
            "peak_mem_mb": max(self.mem_mb),
            "short_path": self.model.short_path,
        }


# ---- per-part profile ------------------------------------------------------------------------------
PARTS = ("pre blocks", "predictor", "pooling", "shortened blocks", "head", "optimizer")
# model stage (DripVisionModel._stage names) -> profile part; the patch embedding counts with the pre blocks
STAGE_PART = {"embed": "pre blocks", "pre_blocks": "pre blocks", "predictor": "predictor", "pooling": "pooling",
              "short_blocks": "shortened blocks", "head": "head"}


def mac_parts(config, tokens_short: Optional[float]) -> dict:
    """Analytic MACs per image by profile part (flops.macs_breakdown, the patch embedding in 'pre blocks')."""
    m = macs_breakdown(config, tokens_short if config.is_drip else None)
    return {"pre blocks": m["patch_embed"] + m["blocks_pre"], "predictor": m["predictor"], "pooling": m["pooling"],
            "shortened blocks": m["blocks_short"], "head": m["projection"], "optimizer": 0}


class StageTimer:
    """The model's `stage_hook`: clock marks at the end of each forward stage; in training a gradient hook on each
    stage's output marks when the backward of everything after it is done, so the backward is split by stage too.
    A step = forward marks, `backward_start()`, hooks, `optimizer_start()`, `finish()`."""

    def __init__(self, clock, device: torch.device):
        self.clock, self.device = clock, device

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.clock()

    def start(self):
        self.fwd, self.bwd, self.t_bwd, self.t_opt = [("", self._now())], [], None, None

    def __call__(self, name: str, x: torch.Tensor):
        self.fwd.append((name, self._now()))
        if x.requires_grad:
            x.register_hook(lambda g, name=name: self.bwd.append((name, self._now())))

    def backward_start(self):
        self.t_bwd = self._now()

    def optimizer_start(self):
        self.t_opt = self._now()

    def finish(self) -> dict:
        end = self._now()
        parts = dict.fromkeys(PARTS, 0.0)
        names = [n for n, _ in self.fwd[1:]]
        for (_, t0), (name, t1) in zip(self.fwd, self.fwd[1:]):  # forward: time up to a stage's mark is that stage
            parts[STAGE_PART[name]] += t1 - t0
        last_fwd = self.fwd[-1][1]
        if self.t_bwd is None:
            parts["head"] += end - last_fwd  # output handling after the last mark
            return parts
        parts["head"] += self.t_bwd - last_fwd  # the loss
        # backward: the gradient of stage k's output is complete once the stages after k are done
        after = {n: names[i + 1] if i + 1 < len(names) else n for i, n in enumerate(names)}
        t_prev = self.t_bwd
        for name, t in self.bwd:
            parts[STAGE_PART[after[name]]] += t - t_prev
            t_prev = t
        parts[STAGE_PART[self.bwd[-1][0]] if self.bwd else "head"] += self.t_opt - t_prev
        parts["optimizer"] += end - self.t_opt
        return parts


def run_profile(runners: Sequence["Runner"], repeats: int, clock: str) -> list:
    """Per-part seconds (median over `repeats` round-robin steps) and analytic MACs for each runner."""
    timer = StageTimer(CLOCKS[clock], runners[0].device)
    steps = {id(r): [] for r in runners}
    for _ in range(repeats):
        for r in runners:
            steps[id(r)].append(r.profile_step(timer))
    rows = []
    for r in runners:
        c = r.model.config
        tokens = statistics.fmean(r.tokens) if r.tokens else None
        secs = {p: statistics.median(s[p] for s in steps[id(r)]) for p in PARTS}
        rows.append({"preset": r.preset, "seconds": secs, "total_s": sum(secs.values()),
                     "gmacs": {p: v / 1e9 for p, v in mac_parts(c, tokens).items()}})
    return rows


def profile_table(rows: list) -> str:
    """One line per preset and part: time and MACs with their shares, and the time per GMAC relative to the
    first preset's pre blocks (the ViT's blocks: 1.00 = as fast per MAC, above = slower per MAC)."""
    base = rows[0]
    ref = base["seconds"]["pre blocks"] / max(base["gmacs"]["pre blocks"], 1e-12)
    lines = ["| preset | part | s/step | time % | GMACs/img | MAC % | s per GMAC vs ViT blocks |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        tot_g = sum(r["gmacs"].values())
        for p in PARTS:
            s, g = r["seconds"][p], r["gmacs"][p]
            if s == 0 and g == 0:
                continue
            eff = f"{s / g / ref:.2f}" if g > 0 else "-"
            lines.append(f"| {r['preset']} | {p} | {s:.3f} | {100 * s / r['total_s']:.1f} | {g:.3f} | "
                         f"{100 * g / tot_g:.1f} | {eff} |")
        expected = tot_g * ref
        lines.append(f"| {r['preset']} | **total** | {r['total_s']:.3f} | 100 | {tot_g:.3f} | 100 | "
                     f"{r['total_s'] / expected:.2f} |")
    lines.append("\ntimes from extra steps with the stage callback (forward marks; in train the backward split by "
                 "gradient-hook timestamps); 'total' s per GMAC vs ViT blocks = step time over (MACs x the ViT "
                 "blocks' s per GMAC): the overheads MACs do not count")
    return "\n".join(lines)


def run_benchmark(presets: Sequence[str], mode: str = "infer", batch: int = 8, repeats: int = 3,
                  warmup: int = 1, image_size: Optional[int] = None, bf16: bool = False, calibrate: bool = True,
                  device: Optional[str] = None, seed: int = 0, clock: str = "wall",
                  profile: Optional[bool] = None) -> dict:
    """Round-robin over presets: `warmup` untimed rounds then `repeats` timed rounds. Ratios vs presets[0].
    profile: True = always add the per-part profile, None = when a DRIP preset's speed / MAC is below GOALS."""
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
    goal = GOALS[mode]
    below = [r["preset"] for r, run in zip(rows, runners) if run.model.config.is_drip and r["speed_over_mac"] < goal]
    prof = None
    if profile or (profile is None and below):
        # the parts are DRIP's stages (ViT = DRIP at compression 1); other families are timed whole
        prof = run_profile([r for r in runners if r.model.config.family == "drip"], repeats, clock)
    return {
        "goal_speed_over_mac": goal, "below_goal": below, "profile": prof,
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
        "| preset | tokens/img target | tokens/img mean (min-max) | padded S | median s/step | images/s | "
        "speed ratio (min) | MAC ratio (padded) | speed / MAC | GMACs/img | peak mem MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["results"]:
        lines.append(
            f"| {r['preset']} | {r['tokens_target']} | {r['tokens_mean']:.1f} ({r['tokens_min']}-{r['tokens_max']}) | "
            f"{r['tokens_padded']:.0f} | "
            f"{r['median_s']:.3f} | {r['images_per_s']:.1f} | {r['speed_ratio']:.2f} ({r['speed_ratio_min']:.2f}) | "
            f"{r['mac_ratio']:.2f} ({r['mac_ratio_padded']:.2f}) | "
            f"{r['speed_over_mac']:.2f} | {r['gmacs']:.2f} | {r['peak_mem_mb']:.0f} |")
    lines.append(f"\ntokens/img: visual tokens per image in the tower's output (what an LLM fed with it gets), the "
                 f"config's target and the realised count over the bench batch's images and timed steps; "
                 f"ratios vs {res['results'][0]['preset']} (speed: median step time, in brackets: fastest step; "
                 f"MACs: at the mean tokens per image, in brackets: at the padded batch length); "
                 f"memory: {res['memory_method']}")
    if "goal_speed_over_mac" in res:
        below = res["below_goal"]
        lines.append(f"goal: speed / MAC >= {res['goal_speed_over_mac']:.2f}: "
                     + (f"not reached by {', '.join(below)}" if below else "reached"))
    if res.get("profile"):
        lines += ["", "per-part profile:", "", profile_table(res["profile"])]
    return "\n".join(lines)


# ---- the LLaVA tower: hidden states of every block vs stopping at the selected one --------------------------
TOWER_PATHS = ("hidden states", "stop at layer")


def run_tower_benchmark(preset: str = "vit-l-14", image_size: Optional[int] = 336, batch: int = 16,
                        select_layer: int = -2, repeats: int = 3, warmup: int = 1, device: Optional[str] = None,
                        seed: int = 0, clock: str = "wall", bf16: bool = False) -> dict:
    """The frozen LLaVA tower's forward two ways, interleaved: all blocks with every hidden state kept, then the
    selected one taken (`forward_features(output_hidden_states=True)`), against `DripVisionTower.forward`, which
    stops at the selected block. Checks both give the same tokens."""
    from drip_llava.model.vision_tower import DripVisionTower


    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if clock == "cpu" and dev.type == "cuda":
        raise ValueError("--clock cpu measures host CPU time; use wall on GPU")
    torch.manual_seed(seed)
    name, path, fields = split_spec(preset)
    model = create_model(name, **({"image_size": image_size} if image_size else {}), **fields)
    model.short_path = path or "auto"
    model = model.to(device=dev, dtype=torch.bfloat16 if bf16 else torch.float32)
    c = model.config
    x = torch.randn(batch, 3, c.image_size, c.image_size, generator=torch.Generator().manual_seed(seed + 1))
    x = x.to(device=dev, dtype=model.dtype)
    if c.is_drip:
        calibrate_boundary_bias(model, x, "infer")
    tower = DripVisionTower(model, select_layer=select_layer).eval()
    n_cls = int(c.class_token)

    def hidden_states_path():
        out = model.forward_features(x, output_hidden_states=True)
        return out.hidden_states[tower.layer_index][:, n_cls:], out.hidden_masks[tower.layer_index][:, n_cls:]

    fns = {"hidden states": hidden_states_path, "stop at layer": tower}
    tick, mem = CLOCKS[clock], PeakMemory(dev)
    times, mems, outs = {p: [] for p in fns}, {p: [] for p in fns}, {}
    with torch.no_grad():
        for r in range(warmup + repeats):
            for p, fn in fns.items():
                outs.pop(p, None)
                with mem:
                    t0 = tick()
                    outs[p] = fn(x) if p == "stop at layer" else fn()
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    dt = tick() - t0
                if r >= warmup:
                    times[p].append(dt)
                    mems[p].append(mem.peak_mb)
    (fa, ma), (fb, mb) = outs["hidden states"], outs["stop at layer"]
    max_diff = float((fa[ma].float() - fb[mb].float()).abs().max()) if torch.equal(ma, mb) else float("inf")
    rows = [{"path": p, "blocks_run": c.depth if p == "hidden states" else tower.layer_index,
             "median_s": statistics.median(times[p]), "min_s": min(times[p]), "peak_mem_mb": max(mems[p])}
            for p in fns]
    for r in rows:
        r["time_saved"] = 1 - r["median_s"] / rows[0]["median_s"]
        r["mem_saved"] = 1 - r["peak_mem_mb"] / rows[0]["peak_mem_mb"] if rows[0]["peak_mem_mb"] > 0 else 0.0
    return {"preset": preset, "image_size": c.image_size, "batch": batch, "select_layer": select_layer,
            "layer_index": tower.layer_index, "depth": c.depth, "device": str(dev), "clock": clock,
            "threads": torch.get_num_threads(), "dtype": "bf16" if bf16 else "fp32", "repeats": repeats,
            "memory_method": mem.method, "max_abs_diff": max_diff, "results": rows}


def tower_table(res: dict) -> str:
    lines = [f"LLaVA tower: {res['preset']} at {res['image_size']} px, batch {res['batch']}, select layer "
             f"{res['select_layer']} (block {res['layer_index']} of {res['depth']}), device={res['device']} "
             f"threads={res['threads']} dtype={res['dtype']} clock={res['clock']}", "",
             "| path | blocks run | median s | peak mem MB | time saved | memory saved |", "|---|---|---|---|---|---|"]
    for r in res["results"]:
        lines.append(f"| {r['path']} | {r['blocks_run']} | {r['median_s']:.3f} | {r['peak_mem_mb']:.0f} | "
                     f"{100 * r['time_saved']:.1f}% | {100 * r['mem_saved']:.1f}% |")
    lines.append(f"\nsame tokens: max |diff| {res['max_abs_diff']:.2e}; memory: {res['memory_method']}")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m drip_llava.vision.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default="vit-b-16,drip-b-16-4x,drip-b-16-10x",
                    help="comma-separated; ratios are relative to the first")
    ap.add_argument("--mode", choices=MODES, default="infer",
                    help="infer = eval + no_grad; train = fwd + bwd + AdamW step (Gumbel boundaries)")
    ap.add_argument("--batch", type=int, default=None, help="default 8 (16 with --llava-tower)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--image-size", type=int, default=None, help="default: the preset's (336 with --llava-tower)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (predictor stays fp32)")
    ap.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                    help="set the predictor bias so the boundary rate equals the target on the batch")
    ap.add_argument("--device", default=None, help="default: cuda if available else cpu")
    ap.add_argument("--clock", choices=list(CLOCKS), default="wall",
                    help="wall time, or process CPU time (robust on a shared machine; use with --threads 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                    help="per-part profile (default: only when a DRIP preset misses its goal)")
    ap.add_argument("--llava-tower", action="store_true",
                    help="bench the LLaVA tower instead: every hidden state vs stopping at the selected block")
    ap.add_argument("--tower-preset", default="vit-l-14", help="--llava-tower encoder (default: ViT-L/14 at 336)")
    ap.add_argument("--select-layer", type=int, default=-2, help="--llava-tower: mm_vision_select_layer")
    ap.add_argument("--json", metavar="OUT", help="write the results as JSON")
    args = ap.parse_args(argv)
    args.presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    specs = args.presets + ([args.tower_preset] if args.llava_tower else [])
    try:
        parsed = [split_spec(p) for p in specs]
    except ValueError as e:
        ap.error(str(e))
    unknown = [p for p, (name, _, _) in zip(specs, parsed) if name not in list_presets(None)]
    if unknown:
        ap.error(f"unknown preset(s) {unknown}; valid: {', '.join(list_presets(None))}")
    bad_path = [p for p, (_, path, _) in zip(specs, parsed) if path not in ("",) + SHORT_PATHS]
    if bad_path:
        ap.error(f"unknown path suffix in {bad_path}; valid: @{', @'.join(SHORT_PATHS)}")
    if args.batch is None:
        args.batch = 16 if args.llava_tower else 8
    if args.llava_tower and args.image_size is None:
        args.image_size = 336
    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        ap.error("--batch and --repeats must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.llava_tower:
        res = run_tower_benchmark(args.tower_preset, args.image_size, args.batch, args.select_layer, args.repeats,
                                  args.warmup, args.device, args.seed, args.clock, args.bf16)
        print(tower_table(res))
    else:
        res = run_benchmark(args.presets, args.mode, args.batch, args.repeats, args.warmup, args.image_size,
                            args.bf16, args.calibrate, args.device, args.seed, args.clock, args.profile)
        print(markdown_table(res))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
