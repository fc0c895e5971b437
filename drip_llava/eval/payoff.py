"""The LLaVA payoff of fewer visual tokens: ViT vs DRIP towers in front of one LLM, on the same images, one run.

    python -m drip_llava.eval.payoff --llm LLM_DIR \\
        --towers vit-tiny-16,drip-tiny-16-2x,drip-tiny-16-4x,drip-tiny-16-10x --png payoff.png --json payoff.json
    python -m drip_llava.eval.payoff --llm-shape llama-7b --llm-layers 2 --tokenizer TOKENIZER_DIR \\
        --towers vit-l-14,drip-l-14-2x,drip-l-14-4x,drip-l-14-10x --tower-override image_size=336 \\
        --max-images 3 --repeats 1 --train-steps 2 --extrapolate-layers 32

Towers are presets (random weights; a DRIP boundary predictor is calibrated on the bench images to the preset's
rate, since a random one keeps about half the patches whatever its compression; --no-calibrate keeps it raw) or
DripVisionModel folders (used as trained). The first tower is the baseline of every ratio.

  inference   per tower, through ChatEngine (eval.efficiency.measure_engine, one warm-up, median of --repeats):
              visual tokens per image, analytic vision and LLM-prefill GMACs, time to first token (TTFT) and
              its vision / prefill split. Speed-ups are baseline / tower; "TTFT / prefill-MAC" is the TTFT
              speed-up over the analytic prefill-MAC speed-up (goal >= 0.8), also given over the
              (vision + prefill)-MAC speed-up.
  training    stage 1 (the `stage1` recipe: projector only) and stage 2 (the `lora` recipe: LoRA on the decoder's
              linear layers, r 128 / alpha 256 / dropout 0.05 as scripts/finetune_lora.sh, + the projector):
              --train-steps AdamW steps after one warm-up step, batch --train-batch, on the same conversations
              (one per image: the question and a fixed answer, template --conv-mode) for every tower, no
              gradient checkpointing. samples/s, LLM tokens/s (text + visual, as the trainer logs them) and peak
              memory. Each (tower, stage) runs in a fresh process: CUDA reports torch.cuda.max_memory_allocated,
              CPU the peak RSS during the steps (Linux: VmHWM reset before the first step, so model building
              does not count; weights, activations, optimizer state, Python + torch), else the max RSS.
  extrapolated  --extrapolate-layers N on a few-layer LLM (--llm-shape): MACs analytic at N layers; times scaled
              by layer count: the time inside the decoder layers (measured by module hooks, forward and
              backward) times N / layers, the rest (tower, embeddings, lm_head, optimizer) as measured. Peak
              memory is not extrapolated. Labelled EXTRAPOLATED wherever printed.

--llm-shape llama-7b builds a Llama-2-7B-shaped decoder (hidden 4096, 32 heads, MLP 11008, vocab 32000) with
random weights and --llm-layers layers. Its input embedding gets one row per id of --tokenizer when that
tokenizer is larger (a lookup, no MACs); the output layer keeps the 32000 rows the MAC count uses.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import copy
import gc
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from .efficiency import DEFAULT_QUESTION, list_images, llm_prefill_macs, measure_engine

LLM_SHAPES = {"llama-7b": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32,
                               intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096,
                               rms_norm_eps=1e-5, tie_word_embeddings=False)}
DEFAULT_TOWERS = "vit-tiny-16,drip-tiny-16-2x,drip-tiny-16-4x,drip-tiny-16-10x"
TRAIN_ANSWER = "The photo shows a scene with several objects in natural light, and the main subject is in the middle."
STAGES = {"1": "stage1", "2": "lora"}
LORA = dict(lora_r=128, lora_alpha=256, lora_dropout=0.05)  # scripts/finetune_lora.sh's defaults
STAGE_LR = {"stage1": 1e-3, "lora": 2e-4}


# ---------------------------------------------------------------------------------------------- building
def build_llm(llm: Optional[str], shape: Optional[str], layers: Optional[int], vocab_rows: int,
              device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A DripLlavaForCausalLM without a tower: the LLM folder `llm`, or a random `shape` with `layers` layers."""
    from drip_llava.model.llava_llama import DripLlavaConfig, DripLlavaForCausalLM

    if shape is None:
        return DripLlavaForCausalLM.from_pretrained(llm, dtype=dtype).to(device)
    if shape not in LLM_SHAPES:
        raise KeyError(f"unknown --llm-shape {shape!r}; valid: {', '.join(LLM_SHAPES)}")
    torch.manual_seed(seed)
    config = DripLlavaConfig(**LLM_SHAPES[shape], num_hidden_layers=layers or 2, pad_token_id=0, bos_token_id=1,
                             eos_token_id=2)
    model = DripLlavaForCausalLM(config)
    if vocab_rows > config.vocab_size:  # tokenizer ids beyond the LLM's vocab still look up a row
        model.model.embed_tokens = torch.nn.Embedding(vocab_rows, config.hidden_size)
    return model.to(device=device, dtype=dtype)


def tower_label(spec: str, overrides: dict) -> str:
    path = Path(spec)
    name = path.parent.name if path.name == "vision_tower" else path.name
    return name + "".join(f"@{k}={v}" for k, v in overrides.items())


def attach_tower(model, spec: str, overrides: dict, pil_images: list, calibrate: bool, select_layer: int = -2,
                 seed: int = 0) -> bool:
    """Put the tower `spec` (+ a fresh mlp2x_gelu projector) on `model`; a preset's boundary predictor is
    calibrated on `pil_images` to its rate under the eval rule. Seeded: every process builds the same tower.
    Returns whether it was calibrated."""
    from drip_llava.vision.calibrate import calibrate_boundary_bias
    from drip_llava.vision.spec import load_drip_model

    torch.manual_seed(seed)
    drip = load_drip_model(spec, **overrides).eval()
    calibrated = calibrate and drip.boundary_predictor is not None and not Path(spec).is_dir()
    if calibrated:
        calibrate_boundary_bias(drip, torch.stack([drip.preprocess(im) for im in pil_images]), mode="infer")
    torch.manual_seed(seed + 1)
    model.initialize_vision_modules(drip, "mlp2x_gelu", select_layer=select_layer)
    return calibrated


def image_files(spec: str, max_images: Optional[int]) -> list[tuple[str, str]]:
    """[(name, file path)]: eval.efficiency.list_images with the example photos as cached JPEG files, so a fresh
    process reads the same pixels."""
    from drip_llava.vision.images import example_file

    return [(name, str(src) if isinstance(src, (str, Path)) else str(example_file(name)))
            for name, src in list_images(spec, max_images)]


def load_pils(files: list[tuple[str, str]]) -> list:
    from drip_llava.inference import load_image_safely

    return [load_image_safely(path, name=name)[0] for name, path in files]


class LayerClock:
    """Seconds spent inside `modules` (the LLM's decoder layers) since reset(): forward calls, and with
    `backward` their backward passes too (full backward pre-hook to hook)."""

    def __init__(self, modules, backward: bool = False, sync: bool = False):
        self.seconds, self._start, self._sync = 0.0, {}, sync
        self.handles = []
        for m in modules:
            self.handles += [m.register_forward_pre_hook(lambda mod, args: self._begin(("f", id(mod)))),
                             m.register_forward_hook(lambda mod, args, out: self._end(("f", id(mod))))]
            if backward:
                self.handles += [
                    m.register_full_backward_pre_hook(lambda mod, g_out: self._begin(("b", id(mod)))),
                    m.register_full_backward_hook(lambda mod, g_in, g_out: self._end(("b", id(mod))))]

    def _now(self) -> float:
        if self._sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _begin(self, key):
        self._start[key] = self._now()

    def _end(self, key):
        self.seconds += self._now() - self._start.pop(key)

    def reset(self):
        self.seconds, self._start = 0.0, {}

    def remove(self):
        for h in self.handles:
            h.remove()


# ---------------------------------------------------------------------------------------------- training
def training_records(files: list[tuple[str, str]], question: str) -> list[dict]:
    from drip_llava.constants import DEFAULT_IMAGE_TOKEN

    return [{"id": name, "image": path, "conversations": [
        {"from": "human", "value": f"{DEFAULT_IMAGE_TOKEN}\n{question}"},
        {"from": "gpt", "value": TRAIN_ANSWER}]} for name, path in files]


def train_throughput(job: dict) -> dict:
    """One (tower, stage) training run (see module doc); meant for a fresh process so that its peak memory is its
    own. `job["report_changed"]` also lists the parameters the steps changed (clones every weight: tiny models)."""
    import resource

    from transformers import AutoTokenizer

    from drip_llava.data.dataset import DataCollatorForSupervisedDataset, ImageLoader, LazySupervisedDataset
    from drip_llava.data.image_processor import DripLlavaImageProcessor
    from drip_llava.model.builder import default_dtype
    from drip_llava.train.params import DataArguments, ModelArguments, TrainingArguments
    from drip_llava.train.recipes import get_recipe, unwrap
    from drip_llava.vision.bench import reset_peak_rss, vm_kb

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    cuda = device.type == "cuda"
    tok = AutoTokenizer.from_pretrained(job["tokenizer"])
    model = build_llm(job["llm"], job["llm_shape"], job["llm_layers"], len(tok), device, default_dtype(device))
    files = [tuple(f) for f in job["images"]]
    attach_tower(model, job["tower"], job["overrides"], load_pils(files), job["calibrate"], job["select_layer"])
    model.config.use_cache = False
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, report_to="none", use_cpu=not cuda, **LORA)
        recipe = get_recipe(job["recipe"], ModelArguments(model_name_or_path=str(job["llm"] or job["llm_shape"])),
                            DataArguments(), targs)
        model = recipe.configure(model)
    model.train()
    proc = DripLlavaImageProcessor.from_vision_config(unwrap(model).vision_tower.config)
    data = LazySupervisedDataset(training_records(files, job["question"]), tok, job["conv_mode"],
                                 ImageLoader(None, proc), model_max_length=1 << 20, skip_bad_samples=False)
    collate = DataCollatorForSupervisedDataset(pad_token_id=tok.pad_token_id if tok.pad_token_id is not None
                                               else tok.eos_token_id)
    B, warmup, steps = job["batch"], 1, job["steps"]
    batches = [collate([data[(s * B + j) % len(data)] for j in range(B)]) for s in range(warmup + steps)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in model.named_parameters()} if job.get("report_changed") else None
    opt = torch.optim.AdamW(trainable, lr=STAGE_LR[job["recipe"]], weight_decay=0.0)
    clock = LayerClock(unwrap(model).model.layers, backward=True, sync=cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    rss_reset = False if cuda else reset_peak_rss()  # the steps' peak, not model building's
    step_s, layer_s, tokens, visual, losses = [], [], 0, [], []
    for i, batch in enumerate(batches):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        clock.reset()
        t0 = clock._now()
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = clock._now() - t0
        if i >= warmup:
            step_s.append(dt)
            layer_s.append(clock.seconds)
            tokens += int(batch["attention_mask"].sum()) - int(out.num_images) + int(out.visual_tokens)
        visual.append(int(out.visual_tokens))
        losses.append(float(out.loss.detach()))
    clock.remove()
    if cuda:
        peak, how = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    elif rss_reset:
        peak, how = vm_kb("VmHWM") * 1024, "peak RSS during the steps (VmHWM reset before them)"
    else:  # Linux reports kilobytes
        peak, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "max RSS of the process"
    total = sum(step_s)
    row = {"recipe": job["recipe"], "steps": steps, "warmup_steps": warmup, "batch": B,
           "step_s_mean": total / steps, "layers_s_mean": sum(layer_s) / steps,
           "samples_per_s": steps * B / total, "tokens_per_s": tokens / total, "tokens_per_step": tokens / steps,
           "visual_tokens_per_step": visual, "losses": losses, "peak_memory_gb": peak / 1e9, "peak_memory_how": how,
           "trainable_params": sum(p.numel() for p in trainable)}
    if before is not None:
        row["changed"] = sorted(n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach()))
    return row


def run_fresh(job: dict) -> dict:
    """train_throughput in a new (spawned) process: its max RSS / CUDA peak belongs to this configuration only."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(train_throughput, job).result()


# ---------------------------------------------------------------------------------------------- ratios
def _per_image_extrapolated(row: dict, key: str, factor: float) -> float:
    return statistics.median(x[key] + (factor - 1) * x["layers_ms"] for x in row["per_image"])


def add_derived(rows: list[dict], llm_config, layers_to: Optional[int]) -> None:
    """Speed-ups against rows[0] and, with `layers_to`, the EXTRAPOLATED figures (module doc), in place."""
    n_layers = llm_config.num_hidden_layers
    if layers_to:
        factor = layers_to / n_layers
        big = copy.copy(llm_config)
        big.num_hidden_layers = layers_to
        for r in rows:
            x = r["extrapolated"] = {"layers": layers_to, "from_layers": n_layers}
            x["prefill_gmacs_mean"] = statistics.mean(llm_prefill_macs(big, p["prompt_tokens"]) / 1e9
                                                      for p in r["per_image"])
            x["vision_gmacs_mean"] = r["vision_gmacs_mean"]
            x["ttft_ms_median"] = _per_image_extrapolated(r, "ttft_ms", factor)
            x["prefill_ms_median"] = _per_image_extrapolated(r, "prefill_ms", factor)
            for stage, t in r.get("train", {}).items():
                step = t["step_s_mean"] + (factor - 1) * t["layers_s_mean"]
                x.setdefault("train", {})[stage] = {"step_s_mean": step, "samples_per_s": t["batch"] / step,
                                                    "tokens_per_s": t["tokens_per_step"] / step}
    for r in rows:
        for d in (r, r.get("extrapolated")):
            if d is not None:
                _speedups(d, rows[0] if d is r else rows[0]["extrapolated"])


def _speedups(d: dict, base: dict) -> None:
    mac = base["prefill_gmacs_mean"] / d["prefill_gmacs_mean"]
    vp = (base["prefill_gmacs_mean"] + base["vision_gmacs_mean"]) / (d["prefill_gmacs_mean"] + d["vision_gmacs_mean"])
    ttft = base["ttft_ms_median"] / d["ttft_ms_median"]
    prefill = base["prefill_ms_median"] / d["prefill_ms_median"]
    d["speedup"] = {"prefill_macs": mac, "vision_prefill_macs": vp, "ttft": ttft, "prefill_time": prefill,
                    "ttft_over_prefill_macs": ttft / mac, "ttft_over_vision_prefill_macs": ttft / vp,
                    "prefill_time_over_prefill_macs": prefill / mac}
    for stage, t in d.get("train", {}).items():
        d["speedup"][f"stage{stage}_samples"] = t["samples_per_s"] / base["train"][stage]["samples_per_s"]


# ---------------------------------------------------------------------------------------------- output
def _table(rows: list[dict], lines_spec: list, title: str) -> str:
    names = [r["name"] for r in rows]
    width = max(12, *(len(n) for n in names)) + 2
    head = f"{title:<44}" + "".join(f"{n:>{width}}" for n in names)
    out = [head, "-" * len(head)]
    for label, get in lines_spec:
        vals = []
        for r in rows:
            try:
                vals.append(get(r))
            except (KeyError, TypeError):
                vals.append("-")
        out.append(f"{label:<44}" + "".join(f"{v:>{width}}" for v in vals))
    return "\n".join(out)


def format_tables(rows: list[dict], stages: list[str]) -> str:
    s = [("compression", lambda r: f"{r['compression']:g}x"),
         ("visual tokens / image, mean [min-max]",
          lambda r: f"{r['visual_tokens_mean']:.1f} [{r['visual_tokens_min']}-{r['visual_tokens_max']}]"),
         ("LLM prompt tokens (mean)", lambda r: f"{r['prompt_tokens_mean']:.1f}"),
         ("vision GMACs / image (tower + projector)", lambda r: f"{r['vision_gmacs_mean']:.4g}"),
         ("LLM prefill GMACs / image", lambda r: f"{r['prefill_gmacs_mean']:.4g}"),
         ("TTFT ms (median)", lambda r: f"{r['ttft_ms_median']:.1f}"),
         ("  vision ms (image + tower + projector)", lambda r: f"{r['vision_ms_median']:.1f}"),
         ("  prefill ms", lambda r: f"{r['prefill_ms_median']:.1f}"),
         ("speed-up: prefill MACs", lambda r: f"{r['speedup']['prefill_macs']:.2f}x"),
         ("speed-up: vision + prefill MACs", lambda r: f"{r['speedup']['vision_prefill_macs']:.2f}x"),
         ("speed-up: TTFT", lambda r: f"{r['speedup']['ttft']:.2f}x"),
         ("TTFT / prefill-MAC speed-up (goal >= 0.8)", lambda r: f"{r['speedup']['ttft_over_prefill_macs']:.2f}"),
         ("TTFT / (vision+prefill)-MAC speed-up", lambda r: f"{r['speedup']['ttft_over_vision_prefill_macs']:.2f}"),
         ("prefill-time / prefill-MAC speed-up", lambda r: f"{r['speedup']['prefill_time_over_prefill_macs']:.2f}")]
    for st in stages:
        s += [(f"stage {st}: samples/s", lambda r, st=st: f"{r['train'][st]['samples_per_s']:.3f}"),
              (f"stage {st}: LLM tokens/s", lambda r, st=st: f"{r['train'][st]['tokens_per_s']:.1f}"),
              (f"stage {st}: peak memory GB", lambda r, st=st: f"{r['train'][st]['peak_memory_gb']:.2f}"),
              (f"stage {st}: samples/s speed-up", lambda r, st=st: f"{r['speedup'][f'stage{st}_samples']:.2f}x")]
    text = _table(rows, s, "MEASURED")
    if rows[0].get("extrapolated"):
        x = rows[0]["extrapolated"]
        e = [("LLM prefill GMACs / image", lambda r: f"{r['extrapolated']['prefill_gmacs_mean']:.4g}"),
             ("TTFT ms (median)", lambda r: f"{r['extrapolated']['ttft_ms_median']:.1f}"),
             ("  prefill ms", lambda r: f"{r['extrapolated']['prefill_ms_median']:.1f}"),
             ("speed-up: prefill MACs", lambda r: f"{r['extrapolated']['speedup']['prefill_macs']:.2f}x"),
             ("speed-up: vision + prefill MACs",
              lambda r: f"{r['extrapolated']['speedup']['vision_prefill_macs']:.2f}x"),
             ("speed-up: TTFT", lambda r: f"{r['extrapolated']['speedup']['ttft']:.2f}x"),
             ("TTFT / prefill-MAC speed-up (goal >= 0.8)",
              lambda r: f"{r['extrapolated']['speedup']['ttft_over_prefill_macs']:.2f}"),
             ("TTFT / (vision+prefill)-MAC speed-up",
              lambda r: f"{r['extrapolated']['speedup']['ttft_over_vision_prefill_macs']:.2f}")]
        for st in stages:
            e += [(f"stage {st}: samples/s",
                   lambda r, st=st: f"{r['extrapolated']['train'][st]['samples_per_s']:.4f}"),
                  (f"stage {st}: LLM tokens/s",
                   lambda r, st=st: f"{r['extrapolated']['train'][st]['tokens_per_s']:.1f}"),
                  (f"stage {st}: samples/s speed-up",
                   lambda r, st=st: f"{r['extrapolated']['speedup'][f'stage{st}_samples']:.2f}x")]
        text += "\n\n" + _table(rows, e, f"EXTRAPOLATED {x['from_layers']} -> {x['layers']} layers")
    return text


def plot_payoff(rows: list[dict], path: str, title: str) -> None:
    """Visual tokens and MACs (left), time per image / training sample (right) against compression."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["compression"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(x, [r["visual_tokens_mean"] for r in rows], "o-", color="C0", label="visual tokens / image")
    a.set(xscale="log", xlabel="compression", ylabel="visual tokens / image", title="tokens and MACs")
    a2 = a.twinx()
    a2.plot(x, [r["prefill_gmacs_mean"] for r in rows], "s--", color="C1", label="prefill GMACs")
    a2.plot(x, [r["vision_gmacs_mean"] for r in rows], "^--", color="C2", label="vision GMACs")
    a2.set_ylabel("GMACs / image")
    a.legend(handles=a.get_lines() + a2.get_lines(), fontsize=8)
    series = [("TTFT ms", [r["ttft_ms_median"] for r in rows], "o-")]
    series += [("prefill ms", [r["prefill_ms_median"] for r in rows], "s-")]
    for st in rows[0].get("train", {}):
        series.append((f"stage {st} ms / sample", [1000 / r["train"][st]["samples_per_s"] for r in rows], "^-"))
    if rows[0].get("extrapolated"):
        n = rows[0]["extrapolated"]["layers"]
        series.append((f"TTFT ms, EXTRAPOLATED to {n} layers", [r["extrapolated"]["ttft_ms_median"] for r in rows],
                       "o:"))
        for st in rows[0]["extrapolated"].get("train", {}):
            series.append((f"stage {st} ms / sample, EXTRAPOLATED",
                           [1000 / r["extrapolated"]["train"][st]["samples_per_s"] for r in rows], "^:"))
    for label, ys, style in series:
        b.plot(x, ys, style, label=label)
    b.set(xscale="log", yscale="log", xlabel="compression", ylabel="ms", title="time")
    b.legend(fontsize=7)
    for ax in (a, b):
        ax.set_xticks(x, [f"{c:g}" for c in x])
        ax.minorticks_off()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m drip_llava.eval.payoff", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    llm = p.add_mutually_exclusive_group(required=True)
    llm.add_argument("--llm", default=None, help="Llama-architecture LLM folder (weights + tokenizer)")
    llm.add_argument("--llm-shape", default=None, choices=sorted(LLM_SHAPES), help="random LLM of this shape")
    p.add_argument("--llm-layers", type=int, default=2, help="--llm-shape: decoder layers")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: --llm; required with --llm-shape)")
    p.add_argument("--towers", default=DEFAULT_TOWERS, help="comma-separated presets or DripVisionModel folders; "
                   "the first is the baseline")
    p.add_argument("--tower-override", nargs="*", default=[], metavar="KEY=VALUE",
                   help="tower config fields for every tower, e.g. image_size=336")
    p.add_argument("--images", default="examples", help="folder, 'examples', or comma-separated photo names / paths")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--question", default=DEFAULT_QUESTION)
    p.add_argument("--conv-mode", default="vicuna_v1")
    p.add_argument("--select-layer", type=int, default=-2)
    p.add_argument("--repeats", type=int, default=2, help="timed TTFT runs per image (median), after one warm-up")
    p.add_argument("--no-calibrate", action="store_true", help="keep random boundary predictors as they are")
    p.add_argument("--no-train", action="store_true", help="inference only")
    p.add_argument("--stages", default="1,2", help="training stages to time (1 = projector, 2 = LoRA + projector)")
    p.add_argument("--train-steps", type=int, default=3, help="timed optimizer steps per stage, after one warm-up")
    p.add_argument("--train-batch", type=int, default=1)
    p.add_argument("--extrapolate-layers", type=int, default=None, help="also report figures scaled to N layers")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (here and in the training processes)")
    p.add_argument("--json", default=None)
    p.add_argument("--png", default=None, help="time and tokens against compression")
    args = p.parse_args(argv)
    if args.llm_shape and not args.tokenizer:
        p.error("--llm-shape needs --tokenizer (a folder with a tokenizer)")
    bad = [s for s in args.stages.split(",") if s not in STAGES]
    if bad:
        p.error(f"--stages: unknown {bad}; valid: {', '.join(STAGES)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from drip_llava.data.image_processor import DripLlavaImageProcessor
    from drip_llava.inference import ChatEngine
    from drip_llava.model.builder import LoadedModel, default_dtype
    from drip_llava.vision.config import parse_overrides

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    overrides = parse_overrides(args.tower_override)
    towers = [s.strip() for s in args.towers.split(",") if s.strip()]
    stages = [] if args.no_train else [s for s in args.stages.split(",") if s]
    files = image_files(args.images, args.max_images)
    pils = load_pils(files)
    tok_dir = args.tokenizer or args.llm
    tok = AutoTokenizer.from_pretrained(tok_dir)
    model = build_llm(args.llm, args.llm_shape, args.llm_layers, len(tok), device, default_dtype(device))
    llm_config = copy.deepcopy(model.config)
    clock = LayerClock(model.model.layers, sync=device.type == "cuda")
    rows = []
    for spec in towers:
        calibrated = attach_tower(model, spec, overrides, pils, not args.no_calibrate, args.select_layer)
        model.eval()
        proc = DripLlavaImageProcessor.from_vision_config(model.vision_tower.config)
        loaded = LoadedModel(tokenizer=tok, model=model, image_processor=proc,
                             context_len=int(getattr(model.config, "max_position_embeddings", 2048)),
                             kind="sweep", model_path=spec)
        engine = ChatEngine(loaded, conv_mode=args.conv_mode)
        row = measure_engine(engine, files, args.question, repeats=args.repeats, name=tower_label(spec, overrides),
                             clock=clock)
        row.update(name=tower_label(spec, overrides), spec=spec, calibrated=calibrated)
        rows.append(row)
        del engine, loaded
    clock.remove()
    del model
    gc.collect()
    job = {"llm": args.llm, "llm_shape": args.llm_shape, "llm_layers": args.llm_layers, "tokenizer": tok_dir,
           "overrides": overrides, "images": files, "calibrate": not args.no_calibrate,
           "select_layer": args.select_layer, "question": args.question, "conv_mode": args.conv_mode,
           "device": str(device), "threads": torch.get_num_threads(), "batch": args.train_batch,
           "steps": args.train_steps}
    for row in rows:
        for st in stages:
            print(f"[payoff] training stage {st} with {row['name']} in a fresh process", file=sys.stderr, flush=True)
            row.setdefault("train", {})[st] = run_fresh({**job, "tower": row["spec"], "recipe": STAGES[st]})
    add_derived(rows, llm_config, args.extrapolate_layers if args.llm_shape else None)

    llm_desc = (f"{args.llm_shape}-shaped random LLM, {llm_config.num_hidden_layers} layers" if args.llm_shape
                else f"LLM {args.llm} ({llm_config.num_hidden_layers} layers)")
    training = (f"training: {args.train_steps} steps after 1 warm-up, batch {args.train_batch}, each (tower, stage) "
                "in a fresh process" if stages else "no training")
    setup = (f"{llm_desc}; {len(files)} images ({', '.join(n for n, _ in files)}); TTFT: median of {args.repeats} "
             f"after 1 warm-up, batch 1; {training}; device {device}, "
             f"{torch.get_num_threads()} threads; calibrated predictors: {any(r['calibrated'] for r in rows)}. "
             "MACs analytic (matmuls; 1 MAC = 2 FLOPs); speed-ups are baseline / tower.")
    print(format_tables(rows, stages))
    print(setup)
    if args.llm_shape and args.extrapolate_layers:
        print(f"EXTRAPOLATED = {llm_config.num_hidden_layers}-layer measurements scaled to "
              f"{args.extrapolate_layers} layers by layer count (decoder-layer time x {args.extrapolate_layers}/"
              f"{llm_config.num_hidden_layers}, the rest as measured); MACs analytic; memory not extrapolated.")
    report = {"setup": setup, "llm": llm_desc, "llm_layers": llm_config.num_hidden_layers, "stages": stages,
              "images": files, "threads": torch.get_num_threads(), "device": str(device), "towers": rows}
    if args.png:
        plot_payoff(rows, args.png, llm_desc)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
