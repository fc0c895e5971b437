"""Token-reduction towers side by side at matched compute on the shapes world: one honest table.

    python -m drip_demo.compare [--quick] [--fresh] [--out playground/compare] [--match 4x[,10x]] [--stages ...]
                                [--methods vit,dvt@4x,...] [--no-llava]

Every method gets the same data, seed, schedule and step count (the demo's CLIP stage, torchrun x2, one method
after the other). ViT, DRIP-4x and DRIP-10x are presets; ToMe's merge_r, DynamicViT's keep_rate (rho) and
A-ViT's target_depth are chosen so their analytic GMACs per image (drip_llava.vision.flops) match DRIP-4x's
(and DRIP-10x's with --match 4x,10x) within MATCH_TOLERANCE; the matching is printed and kept in compare.json.
DVT (full plan) trains as a cascade (every exit, the CLIP stage), then its exit thresholds are fitted on the train
split so its mean MACs per image stay within DRIP-4x's analytic GMACs (stage exits-dvt@4x); the tower folder keeps
them, so the tower, speed and LLaVA stages run its budgeted early exit (a different token count per image).

Stages (each skipped on a rerun when done, like the demo's): data -> llm (the embedded SmolLM2, converted once) ->
clip-METHOD for each method (DVT: then exits-METHOD) -> probe (drip_demo.attribute_probe: linear probe on the
mean-pooled LLaVA tokens, colour and shape of the largest object) -> towers (on val images: tokens out of the tower
and tokens LLaVA reads, GMACs at the realised tokens, the auxiliary-loss target reached) -> speed
(drip_llava.vision.bench's Runner on the trained towers, interleaved, one real val batch: inference and a training
step) -> stage1-/stage2-/eval-METHOD (the demo's LLaVA stages with the same LLM and data; likelihood multiple choice
with the image vs a blank one, exact McNemar) -> prefill (the LLM's prefill time at each method's visual token
count) -> pictures (OUT/towers.png: what each trained tower did to val images and photos) -> report
(OUT/COMPARE.md, OUT/compare.json, OUT/compare.png).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from drip_demo.pipeline import ALPHA, ROOT, Budget, Demo, make_blank_images

MATCH_TOLERANCE = 0.10  # relative GMACs difference allowed between a matched method and its DRIP reference
DRIP_REFERENCES = {"4x": "drip-tiny-16-4x", "10x": "drip-tiny-16-10x"}
BASE = "vit-tiny-16"  # the ViT body every family is built on (same width, depth, patching)
# family -> (the config field set to match compute, its candidate values); the one whose analytic GMACs are
# closest to the reference is taken
KNOBS = {
    "tome": ("merge_r", tuple(range(0, 33))),
    "dynamicvit": ("keep_rate", tuple(round(0.05 + 0.005 * i, 3) for i in range(191))),
    "avit": ("target_depth", tuple(round(1 + 0.05 * i, 2) for i in range(101))),  # 1..6 blocks
}
FAMILIES = ("tome", "dynamicvit", "avit")
PICTURE_PHOTOS = ("astronaut", "coffee")  # bundled example photos (drip_llava.vision.images)
DVT_PRESET = "dvt-tiny-16"  # ViT-tiny's body as the last exit, exits on 2x2 / 4x4 / 8x8 grids (4 / 16 / 64 tokens)


@dataclass
class Plan:
    """The demo's budget (data, CLIP schedule, LLaVA stages) plus what the comparison adds."""

    demo: Budget
    families: tuple = FAMILIES  # matched-compute methods, in table order
    match: tuple = ("4x",)  # DRIP references the families are matched to
    drip: tuple = ("4x", "10x")  # DRIP presets trained besides the ViT
    dvt: tuple = ("4x",)  # DRIP references whose GMACs a DVT cascade's exit thresholds are fitted to
    tower_images: int = 400  # val images for token counts, realised GMACs and auxiliary targets
    exit_fit_images: int = 2000  # train images DVT's thresholds are fitted on (spread over the classes; every exit
    # runs on each: ~10 s per 64 images on the shared 2 cores)
    bench_batch: int = 16
    bench_repeats: int = 5
    prefill_repeats: int = 5
    llava: bool = True  # the second table (LLaVA stage 1 + 2 and the image-use test per method)


# CLIP as the demo (130 steps, batch 32 per rank); LLaVA per method shortened from the demo's (stage 1 40 -> 30
# steps, stage 2 60 -> 30 with 20 of colour warm-up, 180 image problems instead of 540). Seven towers take 38
# minutes on 2 cores (docs/results.md, "Tower comparison"): ~1.5-2 min of CLIP and ~3-4 min of LLaVA each.
FULL = Plan(demo=Budget(n_train=8000, n_val=800, clip_steps=130, clip_batch=32, clip_lr=5e-4, stage1_steps=30,
                        stage2_steps=30, stage2_warmup_steps=20, llava_batch=4, stage1_lr=1e-2, stage2_lr=5e-4,
                        lora_r=16, n_eval=180, n_letter=0, n_exact=0, probe_images=(800, 400), n_image_use=0))
QUICK = Plan(demo=Budget(n_train=1200, n_val=200, clip_steps=12, clip_batch=16, clip_lr=5e-4, stage1_steps=3,
                         stage2_steps=3, llava_batch=2, stage1_lr=1e-2, stage2_lr=5e-4, lora_r=8, n_eval=12,
                         n_letter=0, n_exact=0, probe_images=(200, 100), n_image_use=0),
             families=("tome",), drip=("4x",), dvt=(), tower_images=48, exit_fit_images=300, bench_batch=8,
             bench_repeats=2, prefill_repeats=2)


@dataclass
class Method:
    """One row: a folder name, the preset it starts from and the config overrides (KEY=VALUE) it trains with."""

    name: str
    preset: str
    overrides: tuple = ()
    match: dict = field(default_factory=dict)  # for matched methods: reference, knob, value, GMACs, error
    budgeted: bool = False  # a DVT cascade: exit thresholds fitted to match["target_gmacs"] after CLIP training


# ---- matched compute ---------------------------------------------------------------------------------------
def gmacs_of(preset: str, **overrides) -> float:
    from drip_llava.vision.config import get_preset_config
    from drip_llava.vision.flops import analytic_macs

    return analytic_macs(get_preset_config(preset, **overrides)) / 1e9


def match_setting(family: str, target_gmacs: float, base: str = BASE) -> dict:
    """The family's knob value whose analytic GMACs per image are closest to target_gmacs (first on ties)."""
    knob, grid = KNOBS[family]
    found = [(abs(gmacs_of(base, family=family, **{knob: v}) - target_gmacs), v) for v in grid]
    _, value = min(found, key=lambda t: t[0])
    g = gmacs_of(base, family=family, **{knob: value})
    return {"knob": knob, "value": value, "gmacs": g, "target_gmacs": target_gmacs,
            "rel_err": abs(g - target_gmacs) / target_gmacs}


def plan_methods(plan: Plan) -> list[Method]:
    """ViT, the DRIP presets, then each family at each matched reference; fails when a match is out of
    tolerance (a knob grid that cannot reach the reference)."""
    methods = [Method("vit", BASE)] + [Method(f"drip-{r}", DRIP_REFERENCES[r]) for r in plan.drip]
    for ref in plan.match:
        target = gmacs_of(DRIP_REFERENCES[ref])
        for fam in plan.families:
            m = match_setting(fam, target)
            if m["rel_err"] > MATCH_TOLERANCE:
                raise SystemExit(f"compare: {fam} cannot match drip-{ref}'s {target:.4f} GMACs within "
                                 f"{MATCH_TOLERANCE:.0%} (best {m['knob']}={m['value']}: {m['gmacs']:.4f})")
            methods.append(Method(f"{fam}@{ref}", BASE, (f"family={fam}", f"{m['knob']}={m['value']}"),
                                  {"reference": f"drip-{ref}", **m}))
        if ref in plan.dvt:
            methods.append(Method(f"dvt@{ref}", DVT_PRESET, (), {"reference": f"drip-{ref}", "knob": "exit_thresholds",
                                                                 "value": "fitted", "target_gmacs": target},
                                  budgeted=True))
    return methods


def all_methods(plan: Plan) -> list[Method]:
    """Every method a plan's budget can run: each family, each DRIP preset and DVT at the plan's references
    (what --methods picks from)."""
    return plan_methods(Plan(**{**asdict(plan), "demo": plan.demo, "families": FAMILIES,
                                "drip": tuple(DRIP_REFERENCES), "dvt": plan.match}))


def matching_lines(methods: list[Method], exits: dict | None = None) -> list[str]:
    """The matched-compute table; DVT's row gives its fitted mean GMACs on the train split once `exits` (the
    exits-METHOD stages' results) has it."""
    rows = ["| method | setting | analytic GMACs / image | reference | reference GMACs | difference |",
            "|---|---|---|---|---|---|"]
    for m in methods:
        if m.budgeted:
            x, fit = m.match, (exits or {}).get(m.name)
            t = x["target_gmacs"]
            g = fit["train"]["mean_macs"] / 1e9 if fit else None
            shown, diff = ("(fitted after CLIP)", "-") if g is None else (f"{g:.4f} (mean on train)",
                                                                         f"{100 * (g / t - 1):+.1f}%")
            rows.append(f"| {m.name} | exit thresholds fitted on the train split to <= the reference | {shown} | "
                        f"{x['reference']} | {t:.4f} | {diff} |")
        elif m.match:
            x = m.match
            rows.append(f"| {m.name} | {x['knob']}={x['value']} | {x['gmacs']:.4f} | {x['reference']} | "
                        f"{x['target_gmacs']:.4f} | {100 * (x['gmacs'] / x['target_gmacs'] - 1):+.1f}% |")
        else:
            rows.append(f"| {m.name} | preset {m.preset} | {gmacs_of(m.preset):.4f} | - | - | - |")
    return rows


# ---- DVT: exit thresholds for the budget -------------------------------------------------------------------
def fit_dvt_exits(run: Path, data: Path, budget_gmacs: float, batch: int = 64, n_train: int | None = None) -> dict:
    """Budgeted early exit for the CLIP-trained DVT cascade in `run` (vision_tower/ + text_tower/): the exit
    classifier is the zero-shot eval's class prototypes (open_clip.build_zero_shot_classifier over the shapes
    world's class names, CLIP's logit scale, normalised embeddings); thresholds are fitted on the train split's
    per-exit confidences (`n_train` images, every k-th of the sorted folder; None = all) so the mean MACs per image
    (exit classifier included) stay <= budget_gmacs (dvt.fit_exit_thresholds), and vision_tower/ is saved with
    policy "threshold" and them. Returns the thresholds, the per-exit MACs, the train split's fitted exit mix and
    mean MACs, the val split's anytime top-1 per exit and budgeted top-1 / mix, and the zero-shot eval of the
    budgeted tower (val)."""
    import open_clip
    import torch

    from drip_llava.vision import dvt, flops
    from vision_pretrain.clip_model import DripCLIP, build_tokenizer
    from vision_pretrain.data import ImageFolderData, folder_eval_loader, load_classnames
    from vision_pretrain.zeroshot import evaluate, pick_templates

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = DripCLIP.from_towers(run / "vision_tower", run / "text_tower").to(dev).eval()
    tower, tokenizer = model.visual, build_tokenizer(model.text_cfg)
    names = data / "classnames.json"
    splits = {s: ImageFolderData(data / "imagefolder" / s, tower.preprocess) for s in ("train", "val")}
    classnames = load_classnames(names, splits["train"].classes)
    with torch.no_grad():
        weights = open_clip.build_zero_shot_classifier(model, tokenizer, classnames, pick_templates("auto", classnames),
                                                       num_classes_per_batch=10, device=dev)  # [E,C]
    tower.set_exit_classifier(weights.T, logit_scale=float(model.logit_scale.detach().exp()), normalize=True)

    if n_train is not None and n_train < len(splits["train"]):
        step = len(splits["train"]) // n_train
        splits["train"] = torch.utils.data.Subset(splits["train"], range(0, step * n_train, step))

    def batches(ds):
        loader = folder_eval_loader(ds, batch, rank=0, world_size=1, workers=0)
        return ((b["images"], b["labels"]) for b in loader if b["images"] is not None)

    preds = {s: dvt.exit_predictions(tower, batches(ds)) for s, ds in splits.items()}
    macs = flops.dvt_cumulative_macs(tower.config, num_classes=len(classnames))
    thresholds = dvt.fit_exit_thresholds(preds["train"].confidence, macs, budget_gmacs * 1e9)
    tower.config.exit_policy, tower.config.exit_thresholds = "threshold", thresholds
    tower.save_pretrained(run / "vision_tower")
    zeroshot = evaluate(model, tokenizer, str(data / "imagefolder" / "val"), str(names), batch_size=batch)
    return {"budget_gmacs": budget_gmacs, "thresholds": thresholds, "exit_macs": macs,
            "exit_tokens": tower.config.exit_tokens(), "num_classes": len(classnames),
            "train": {"images": len(preds["train"].labels), **preds["train"].budgeted(thresholds, macs)},
            "val": {"images": len(preds["val"].labels), "anytime_top1": preds["val"].anytime_top1(),
                    **preds["val"].budgeted(thresholds, macs)},
            "zeroshot": zeroshot}


# ---- trained towers on val images --------------------------------------------------------------------------
def val_images(data: Path, n: int) -> list[Path]:
    """n val images spread over the classes (every k-th of the sorted folder)."""
    from drip_llava.eval.efficiency import list_images

    items = list_images(str(data / "imagefolder" / "val"), None)
    return [p for _, p in items[:: max(1, len(items) // n)][:n]]


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.pstdev(values), "min": min(values),
            "max": max(values)}


def tower_stats(folder: Path, images: list[Path], batch: int = 50, seed: int = 0,
                budget_gmacs: float | None = None) -> dict:
    """On val images, eval mode: tokens out of the tower, GMACs at the realised tokens (DRIP: each image's
    segments; A-ViT: each image's running tokens per block; DVT: the cumulative MACs of each image's exit, exit
    classifier included; others are fixed by the config), tokens the LLaVA tower (select layer -2) passes to the
    LLM, and the auxiliary-loss target reached: DRIP eval boundary rate vs target rate, DynamicViT training-mode
    keep ratio of the last stage vs rho^s, A-ViT mean halting depth vs target depth, DVT realised mean GMACs vs
    `budget_gmacs` (plus its exit mix), ToMe none."""
    import torch
    from PIL import Image

    from drip_llava.model.vision_tower import build_vision_tower
    from drip_llava.vision.families import from_pretrained
    from drip_llava.vision.flops import analytic_macs, avit_macs, dvt_cumulative_macs, total_macs

    torch.manual_seed(seed)  # DynamicViT's training-mode keep decisions are Gumbel samples
    model = from_pretrained(folder).eval()
    llava = build_vision_tower(str(folder), select_layer=-2).eval()
    c = model.config
    tokens, llava_tokens, macs, aux, exits = [], [], [], [], []
    exit_macs = dvt_cumulative_macs(c, num_classes=c.exit_num_classes) if c.family == "dvt" else None
    with torch.no_grad():
        for start in range(0, len(images), batch):
            pil = [Image.open(p).convert("RGB") for p in images[start:start + batch]]
            x = torch.stack([model.preprocess(im) for im in pil])
            out = model(x)
            n = out.num_tokens.tolist()
            tokens += n
            if c.family == "avit":  # tokens entering block i: those halting after it (CLS included)
                for d in out.token_depth:
                    parts = avit_macs(c, [int((d > i).sum()) for i in range(c.depth)])
                    macs.append(total_macs(parts))
                aux += out.token_depth.float().mean(1).tolist()
            elif c.family == "dvt":
                exits += out.exit_index.tolist()
                macs += [exit_macs[k] for k in out.exit_index.tolist()]
            elif c.family == "drip":
                macs += [analytic_macs(c, k if c.is_drip else None) for k in n]
                aux += [k / c.num_patches for k in n]
            else:
                macs += [analytic_macs(c)] * len(n)
            if c.family == "dynamicvit":
                model.train()
                tr = model(x, output_hidden_states=True)
                model.eval()
                last = tr.hidden_masks[c.prune_locations[-1] + 1][:, int(c.class_token):]
                aux += last.float().mean(1).tolist()
            px = torch.stack([llava.image_processor(im) for im in pil])
            _, mask = llava(px)
            llava_tokens += mask.sum(1).tolist()
    target = {"drip": c.target_rate if c.is_drip else None, "avit": getattr(c, "target_depth", None),
              "dynamicvit": getattr(c, "keep_rate", 1.0) ** len(getattr(c, "prune_locations", ()))}.get(c.family)
    what = {"drip": "eval boundary rate", "avit": "mean halting depth (eval)",
            "dynamicvit": "keep ratio, last stage (training mode)"}.get(c.family)
    if c.family == "dvt":
        what, target = "realised GMACs vs budget", budget_gmacs
        aux = [statistics.fmean(macs) / 1e9]
    extra = ({"exit_fractions": [exits.count(k) / len(exits) for k in range(c.num_exits)]}
             if c.family == "dvt" else {})
    return {**extra, "family": c.family, "images": len(images), "tokens": _spread(tokens),
            "llava_tokens": _spread(llava_tokens),
            "gmacs_analytic": analytic_macs(c) / 1e9, "gmacs_realised": statistics.fmean(macs) / 1e9,
            "aux": ({"what": what, "reached": statistics.fmean(aux), "target": target}
                    if what and target is not None else None)}


def bench_towers(folders: dict[str, Path], images: list[Path], mode: str, batch: int, repeats: int,
                 bf16: bool, warmup: int = 1) -> dict:
    """Seconds per step of each trained tower on the same real batch, round-robin (drip_llava.vision.bench:
    Runner's step, its AdamW and training loss), ratios vs the first tower. A Runner is built from the ViT preset,
    then given the trained tower and the batch: speed depends on what the tower learned (DRIP's boundaries, A-ViT's
    halting), which a random-init preset does not have."""
    import torch
    from PIL import Image

    from drip_llava.vision.bench import PeakMemory, Runner, make_adamw
    from drip_llava.vision.families import from_pretrained

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runners = []
    for name, folder in folders.items():
        r = Runner(BASE, mode, batch, dev, bf16=bf16, calibrate=False)
        r.preset, r.model = name, from_pretrained(folder).to(dev).train(mode == "train")
        r.opt = make_adamw(r.model.parameters(), 1e-6) if mode == "train" else None
        r.x = torch.stack([r.model.preprocess(Image.open(p).convert("RGB")) for p in images[:batch]]).to(dev)
        r.target_tokens = r.model.config.max_tokens
        runners.append(r)
    mem = PeakMemory(dev)
    for record in [False] * warmup + [True] * repeats:
        for r in runners:
            r.step(record, mem)
    rows = {r.preset: r.summary(batch) for r in runners}
    base = next(iter(rows.values()))
    return {name: {"median_s": r["median_s"], "images_per_s": r["images_per_s"],
                   "speed_ratio": base["median_s"] / r["median_s"], "speed_ratio_min": base["min_s"] / r["min_s"]}
            for name, r in rows.items()}


def prefill_times(llm_dir: str, n_tokens: dict[str, int], repeats: int) -> dict:
    """The LLM's prefill (one forward over the prompt, KV cache kept) at each method's token count, median ms,
    round-robin; analytic prefill GMACs beside (drip_llava.eval.efficiency.llm_prefill_macs)."""
    import torch
    from transformers import AutoModelForCausalLM

    from drip_llava.eval.efficiency import llm_prefill_macs

    llm = AutoModelForCausalLM.from_pretrained(llm_dir, torch_dtype=torch.float32).eval()
    D = llm.config.hidden_size
    g = torch.Generator().manual_seed(0)
    embeds = {k: torch.randn(1, n, D, generator=g) * 0.02 for k, n in n_tokens.items()}
    times = {k: [] for k in n_tokens}
    with torch.no_grad():
        for r in range(repeats + 1):  # round 0 warms up
            for k, e in embeds.items():
                t = time.perf_counter()
                llm(inputs_embeds=e, use_cache=True, logits_to_keep=1)
                if r:
                    times[k].append(time.perf_counter() - t)
    return {k: {"tokens": n_tokens[k], "prefill_ms": 1000 * statistics.median(times[k]),
                "prefill_gmacs": llm_prefill_macs(llm.config, n_tokens[k]) / 1e9} for k in n_tokens}


def prompt_tokens(llm_dir: str, sqa: Path) -> int:
    """Text tokens of the first ScienceQA-format problem (question and options in the chat template): the prompt
    the visual tokens join in the eval."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llm_dir)
    p = next(iter(json.loads((sqa / "problems.json").read_text()).values()))
    text = p["question"] + "\n" + "\n".join(f"{'ABCDE'[i]}. {c}" for i, c in enumerate(p["choices"]))
    prompt = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    return len(tok(prompt, add_special_tokens=False)["input_ids"])


# ---- the tables --------------------------------------------------------------------------------------------
def _pct(x):
    return None if x is None else 100 * x


def _first_last(curve: list) -> list:
    return [curve[0][1], curve[-1][1]] if curve else [None, None]


def table_rows(r: dict, methods: list[Method]) -> list[dict]:
    """One row per trained tower: compute, tokens, zero-shot, linear probe, speed, auxiliary target."""
    rows = []
    for m in methods:
        clip, tw, probe = r["clip"][m.name], r["towers"][m.name], r["probe"][m.name]
        inf, tr = r["speed"]["infer"][m.name], r["speed"]["train"][m.name]
        fit = r.get("exits", {}).get(m.name)
        zs = fit["zeroshot"] if fit else clip  # DVT: the budgeted tower's (the CLIP stage evaluated its preset exit)
        rows.append({
            "method": m.name, "setting": (f"preset {m.preset}, exit thresholds {_fmt_list(fit['thresholds'], 3)}"
                                          if fit else " ".join(m.overrides) or f"preset {m.preset}"),
            "gmacs": fit["train"]["mean_macs"] / 1e9 if fit else tw["gmacs_analytic"],
            "gmacs_realised": tw["gmacs_realised"], "exit_fractions": tw.get("exit_fractions"),
            "match_rel_err": m.match.get("rel_err"), "reference": m.match.get("reference"),
            "tokens": tw["tokens"], "llava_tokens": tw["llava_tokens"],
            "zeroshot_top1": _pct(zs["zeroshot_top1"]), "zeroshot_top5": _pct(zs["zeroshot_top5"]),
            "probe_colour": probe["colour"]["mean"], "probe_shape": probe["shape"]["mean"],
            "probe_chance": {a: probe[a]["chance"] for a in ("colour", "shape")},
            "infer_images_per_s": inf["images_per_s"], "infer_speed_ratio": inf["speed_ratio"],
            "train_images_per_s": tr["images_per_s"], "train_speed_ratio": tr["speed_ratio"],
            "clip_step_s": clip["avg_step_time"],
            "clip_loss_last": clip["steps"][-1]["loss"] if clip["steps"] else None,
            "aux": tw["aux"],
        })
    return rows


def llava_table_rows(r: dict, methods: list[Method]) -> list[dict]:
    """One row per method that went through LLaVA stage 1 + 2: losses, image-use test, prefill."""
    if "prefill" not in r:
        return []
    pre = r["prefill"]["methods"]
    base = pre[methods[0].name]["prefill_ms"]
    rows = []
    for m in methods:
        use = r["image_use"][m.name]
        t = use["test"]
        rows.append({
            "method": m.name, "visual_tokens": r["towers"][m.name]["llava_tokens"]["mean"],
            "stage1_loss": _first_last(r["stage1"][m.name]["losses"]),
            "stage2_loss": _first_last(r["stage2"][m.name]["losses"]),
            "acc_image": t["acc_a"], "acc_blank": t["acc_b"], "n_image_problems": t["n"],
            "only_image": t["only_a"], "only_blank": t["only_b"], "p_value": t["p_value"], "pass": use["pass"],
            "acc_all_image": use["acc"]["image"]["acc"], "acc_all_blank": use["acc"]["blank"]["acc"],
            "prefill_tokens": pre[m.name]["tokens"], "prefill_ms": pre[m.name]["prefill_ms"],
            "prefill_speedup": base / pre[m.name]["prefill_ms"], "prefill_gmacs": pre[m.name]["prefill_gmacs"],
        })
    return rows


def _f(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def _fmt_list(xs, nd=1, scale=1.0) -> str:
    return "[" + ", ".join(f"{scale * x:.{nd}f}" for x in xs) + "]"


def dvt_notes(r: dict, methods: list[Method]) -> list[str]:
    """COMPARE.md lines on each budgeted DVT: thresholds, exit mix and GMACs (train fit, val), anytime top-1."""
    from drip_llava.vision.config import get_preset_config

    L = []
    for m in methods:
        fit = r.get("exits", {}).get(m.name)
        if not fit:
            continue
        tr, va, tw = fit["train"], fit["val"], r["towers"][m.name]
        L += [f"**{m.name}** (`{m.preset}`, exits of {_fmt_list(fit['exit_tokens'], 0)} tokens, "
              f"{_fmt_list(fit['exit_macs'], 4, 1e-9)} cumulative GMACs with the {fit['num_classes']}-class exit "
              f"classifier): the exit classifier is the zero-shot eval's class prototypes (CLIP logit scale); "
              f"thresholds {_fmt_list(fit['thresholds'], 3)} fitted on {tr['images']} train images to a budget of "
              f"{fit['budget_gmacs']:.4f} GMACs ({m.match['reference']}'s analytic figure): exit mix "
              f"{_fmt_list(tr['exit_fractions'], 0, 100)} %, mean {tr['mean_macs'] / 1e9:.4f} GMACs on train; on "
              f"{va['images']} val images {_fmt_list(va['exit_fractions'], 0, 100)} %, "
              f"{va['mean_macs'] / 1e9:.4f} GMACs, budgeted zero-shot top-1 {100 * va['top1']:.1f}% "
              f"(tower table, {tw['images']} val images: exit mix {_fmt_list(tw['exit_fractions'], 0, 100)} %, "
              f"{tw['gmacs_realised']:.4f} GMACs). Anytime zero-shot top-1 per exit (every val image through every "
              f"exit): {_fmt_list(va['anytime_top1'], 1, 100)} %. The CLIP stage's own eval (preset policy "
              f"{get_preset_config(m.preset).exit_policy}) gave "
              f"{_pct(r['clip'][m.name]['zeroshot_top1']):.1f}% top-1.", ""]
    return L


def markdown(r: dict, methods: list[Method], rows: list[dict], llava_rows: list[dict], quick: bool) -> list[str]:
    plan, secs = r["plan"], r.get("seconds", {})
    b = plan["demo"]
    L = [f"# Token-reduction towers at matched compute ({'QUICK' if quick else 'full'} budget)", "",
         f"`{r.get('command') or 'python -m drip_demo.compare' + (' --quick' if quick else '')}` on "
         f"{r.get('date')}, {plan['machine']}; "
         f"{sum(secs.values()):.0f} s of stages ({', '.join(f'{k} {v:.0f}' for k, v in secs.items())}).", "",
         f"Every tower: CLIP on the shapes world ({b['n_train']} train images), {b['clip_steps']} steps of batch "
         f"{b['clip_batch']} x 2 ranks, lr {b['clip_lr']}, seed 0, the same data order (`vision_pretrain.clip`, "
         "the demo's stage).", "", "## Matched compute", "",
         f"Each family's knob is set so its analytic GMACs per image (`drip_llava.vision.flops`, at the config's "
         f"token counts) are the closest to the DRIP reference's; tolerance {MATCH_TOLERANCE:.0%}.", "",
         *matching_lines(methods, r.get("exits")), "", "## 1. Towers", "",
         f"Zero-shot: CLIP top-1 / top-5 over the {b['n_val']} val images (40 classes, chance 2.5%). Linear probe: "
         "`drip_demo.attribute_probe`'s linear probe on the mean-pooled LLaVA tokens (block -2), colour and shape "
         f"of the largest object, {b['probe_images'][0]} train / {b['probe_images'][1]} val images (majority class "
         f"in brackets). Tokens: out of the tower (eval) and read by LLaVA (block -2), over {plan['tower_images']} "
         f"val images. Speed: `drip_llava.vision.bench`'s step on the trained towers, round-robin, one val batch of "
         f"{plan['bench_batch']}, median of {plan['bench_repeats']}, ratio vs ViT (> 1 = faster). GMACs realised: at "
         "each image's own tokens (DRIP segments, A-ViT running tokens per block).", "",
         "| method | setting | GMACs (realised) | tokens out mean +- sd [min-max] | LLaVA tokens | zero-shot top-1 / "
         "top-5 % | probe colour % | probe shape % | infer img/s (vs ViT) | train img/s (vs ViT) | "
         "aux target: reached / target |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        t, lt, aux = x["tokens"], x["llava_tokens"], x["aux"]
        ch = x["probe_chance"]
        L.append(f"| {x['method']} | {x['setting']} | {x['gmacs']:.4f} ({x['gmacs_realised']:.4f}) | "
                 f"{t['mean']:.1f} +- {t['sd']:.1f} [{t['min']:.0f}-{t['max']:.0f}] | "
                 f"{lt['mean']:.1f} +- {lt['sd']:.1f} | "
                 f"{_f(x['zeroshot_top1'])} / {_f(x['zeroshot_top5'])} | {x['probe_colour']} ({ch['colour']}) | "
                 f"{x['probe_shape']} ({ch['shape']}) | "
                 f"{x['infer_images_per_s']:.0f} ({x['infer_speed_ratio']:.2f}x) | "
                 f"{x['train_images_per_s']:.0f} ({x['train_speed_ratio']:.2f}x) | "
                 + (f"{aux['what']}: {aux['reached']:.3f} / {aux['target']:.3f}" if aux else "none")
                 + (f", exit mix {_fmt_list(x['exit_fractions'], 0, 100)} % |" if x["exit_fractions"] else " |"))
    L += ["", "![accuracy vs compute and speed](compare.png)", "", *dvt_notes(r, methods)]
    if "pictures" in r:
        L += ["What each tower did to the same images (eval; colours = tokens, black = dropped, A-ViT: halting "
              "depth, dark = early; DVT: the grid of the exit taken):", "", "![what each tower did](towers.png)", ""]
    if llava_rows:
        L += ["## 2. Each tower in LLaVA (SmolLM2-135M-Instruct)", "",
              f"The demo's stages with each tower: stage 1 {b['stage1_steps']} steps (projector), stage 2 "
              f"{b['stage2_steps']} steps (LoRA r {b['lora_r']}, the first {b['stage2_warmup_steps']} on colour "
              f"questions), batch {b['llava_batch']} x 2 ranks. Image use: likelihood multiple choice "
              "(`drip_llava.eval.rank_choices`) on the ScienceQA-format problems with an image, with the image and "
              f"with a blank one; exact McNemar (`drip_llava.eval.paired`), PASS at two-sided p < {ALPHA} and "
              "with-image more accurate. Prefill: the LLM's forward over the first problem's prompt "
              f"({r['prefill']['prompt_text_tokens']} text tokens) plus the method's mean LLaVA tokens, median of "
              f"{plan['prefill_repeats']}, fp32.", "",
              "| method | visual tokens | stage 1 loss | stage 2 loss | with image % | blank % | only image / only "
              "blank | McNemar p | verdict | prefill tokens | prefill ms (vs ViT) | prefill GMACs |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for x in llava_rows:
            s1, s2 = x["stage1_loss"], x["stage2_loss"]
            L.append(f"| {x['method']} | {x['visual_tokens']:.1f} | {_f(s1[0], 2)} -> {_f(s1[1], 2)} | "
                     f"{_f(s2[0], 2)} -> {_f(s2[1], 2)} | {x['acc_image']:.1f} | {x['acc_blank']:.1f} | "
                     f"{x['only_image']} / {x['only_blank']} | {x['p_value']:.2g} | "
                     f"{'PASS' if x['pass'] else 'no'} ({x['n_image_problems']} problems) | {x['prefill_tokens']} | "
                     f"{x['prefill_ms']:.1f} ({x['prefill_speedup']:.2f}x) | {x['prefill_gmacs']:.2f} |")
        L.append("")
    return L


def plot(rows: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "gmacs", "analytic GMACs / image"),
                           (axes[1], "infer_images_per_s", "measured inference images/s (batch, trained tower)")):
        for i, x in enumerate(rows):
            ax.scatter(x[key], x["zeroshot_top1"], s=60, color=f"C{i}")
            ax.annotate(x["method"], (x[key], x["zeroshot_top1"]), textcoords="offset points",
                        xytext=(5, 5 if i % 2 == 0 else -12))  # alternate sides: matched methods share a spot
        ax.axhline(100 / 40, ls="--", color="gray", label="chance")
        ax.set(xlabel=label, ylabel="CLIP zero-shot top-1 (%)")
        ax.legend()
    axes[0].set_title("Accuracy vs compute")
    axes[1].set_title("Accuracy vs speed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the run --------------------------------------------------------------------------------------------------
class Compare:
    def __init__(self, out: Path, plan: Plan, quick: bool, methods: list[Method] | None = None):
        self.out, self.plan, self.quick = out, plan, quick
        self.demo = Demo(out, plan.demo, quick)  # its stage / run / save machinery and results.json
        self.demo.restart_hint = "make compare FRESH=1"
        self.r = self.demo.results
        self.methods = plan_methods(plan) if methods is None else methods

    def tower(self, m: Method) -> Path:
        return self.out / "clip" / m.name / "vision_tower"

    def clip(self, m: Method):
        self.r.setdefault("clip", {})[m.name] = self.demo.train_clip(m.name, m.preset, m.overrides)

    def exits(self, m: Method):
        self.r.setdefault("exits", {})[m.name] = fit_dvt_exits(self.out / "clip" / m.name, self.demo.data,
                                                               m.match["target_gmacs"],
                                                               n_train=self.plan.exit_fit_images)

    def probe(self):
        self.r["probe"] = self.demo.probe_towers({m.name: str(self.tower(m)) for m in self.methods})

    def towers(self):
        images = val_images(self.demo.data, self.plan.tower_images)
        self.r["towers"] = {m.name: tower_stats(self.tower(m), images,
                                                budget_gmacs=m.match["target_gmacs"] if m.budgeted else None)
                            for m in self.methods}

    def speed(self):
        images = val_images(self.demo.data, self.plan.bench_batch)
        folders = {m.name: self.tower(m) for m in self.methods}
        p = self.plan
        self.r["speed"] = {mode: bench_towers(folders, images, mode, p.bench_batch, p.bench_repeats,
                                              self.demo.precision == "bf16")
                           for mode in ("infer", "train")}

    def llava_dir(self, m: Method) -> Path:
        return self.out / "llava" / m.name

    def stage1(self, m: Method):
        d = self.llava_dir(m)
        self.r.setdefault("stage1", {})[m.name] = self.demo.train_stage1(self.tower(m), d / "stage1",
                                                                         log=f"stage1-{m.name}")

    def stage2(self, m: Method):
        d = self.llava_dir(m)
        self.r.setdefault("stage2", {})[m.name] = self.demo.train_stage2(self.tower(m), d / "stage1", d / "stage2",
                                                                         log=f"stage2-{m.name}")

    def evaluate(self, m: Method):
        """Likelihood multiple choice on every ScienceQA-format problem, with the image and with a blank one, both
        runs side by side; exact McNemar over the problems with an image."""
        from drip_llava.eval import paired as pt

        b = self.plan.demo
        self.demo.check_data(n_sqa=min(b.n_eval, b.n_val), sqa_mix=b.sqa_mix)
        sqa = self.demo.data / "scienceqa"
        ev = self.llava_dir(m) / "eval"
        ev.mkdir(parents=True, exist_ok=True)
        blank = make_blank_images(sqa / "images" / "test", self.out / "eval" / "blank_images")
        tags = (("image", sqa / "images" / "test"), ("blank", blank))
        self.demo.run_parallel(self.demo.rank_jobs(self.llava_dir(m) / "stage2", ev, tags, log=f"rank-{m.name}"))
        acc = {tag: self.demo.score_sqa(ev, f"ranked_{tag}", sqa, log=f"score-{m.name}") for tag, _ in tags}
        a, bl = (pt.read_correct(ev / f"sqa_scored_ranked_{tag}.jsonl", image_only=True) for tag, _ in tags)
        test = pt.paired(a, bl)
        self.r.setdefault("image_use", {})[m.name] = {"acc": acc, "test": test, "pass": pt.verdict(test, ALPHA)}

    def prefill(self):
        n_text = prompt_tokens(self.demo.llm_dir, self.demo.data / "scienceqa")
        n = {m.name: n_text + round(self.r["towers"][m.name]["llava_tokens"]["mean"]) for m in self.methods}
        self.r["prefill"] = {"prompt_text_tokens": n_text,
                             "methods": prefill_times(self.demo.llm_dir, n, self.plan.prefill_repeats)}

    def pictures(self):
        """One figure, a row per method, the same val images and photos in the columns: segments, merged groups,
        dropped patches, halting depth, the exit taken (drip_llava.vision.visualize)."""
        from drip_llava.vision.families import from_pretrained
        from drip_llava.vision.images import image_label, load_image
        from drip_llava.vision.visualize import render_towers

        specs = [str(p) for p in val_images(self.demo.data, 2)] + [f"example:{n}" for n in PICTURE_PHOTOS]
        models = {m.name: from_pretrained(self.tower(m)).eval() for m in self.methods}
        _, counts = render_towers(models, [load_image(s) for s in specs], [image_label(s) for s in specs],
                                  self.out / "towers.png", title="What each tower did (eval)")
        self.r["pictures"] = {"images": [image_label(s) for s in specs], "tokens": counts}

    def report(self):
        rows, llava_rows = table_rows(self.r, self.methods), llava_table_rows(self.r, self.methods)
        (self.out / "compare.json").write_text(json.dumps(
            {"date": self.r.get("date"), "plan": self.r["plan"], "matching": self.r["matching"],
             "seconds": self.r.get("seconds"), "towers": rows, "llava": llava_rows}, indent=1))
        plot(rows, self.out / "compare.png")
        (self.out / "COMPARE.md").write_text("\n".join(markdown(self.r, self.methods, rows, llava_rows, self.quick)))

    def stages(self) -> list:
        d = self.demo
        s = [("data", d.make_data)]
        for m in self.methods:
            s += [(f"clip-{m.name}", lambda m=m: self.clip(m))]
            if m.budgeted:
                s += [(f"exits-{m.name}", lambda m=m: self.exits(m))]
        s += [("probe", self.probe), ("towers", self.towers), ("speed", self.speed)]
        if self.plan.llava:
            s += [("llm", d.llm)]
            for m in self.methods:
                s += [(f"stage1-{m.name}", lambda m=m: self.stage1(m)),
                      (f"stage2-{m.name}", lambda m=m: self.stage2(m)),
                      (f"eval-{m.name}", lambda m=m: self.evaluate(m))]
            s += [("prefill", self.prefill)]
        return s + [("pictures", self.pictures), ("report", self.report)]


TABLE_STAGES = ("probe", "towers", "speed", "prefill", "pictures")  # stages whose one result covers every method


def forget_stale_table_stages(results: dict, names: list[str]) -> list[str]:
    """A finished table stage is redone when the method list changed since it ran (a method added to the plan
    would otherwise be missing from its table on a resumed run); returns the stages forgotten."""
    done, ran_with = results.setdefault("done", {}), results.setdefault("table_methods", {})
    stale = [st for st in TABLE_STAGES if done.get(st) and ran_with.get(st) != names]
    for st in stale:
        done.pop(st)
    return stale


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few steps, ViT / DRIP-4x / ToMe@4x (what the test runs)")
    p.add_argument("--fresh", action="store_true", help="delete OUT and start over")
    p.add_argument("--out", default=None, help="output folder (default playground/compare[-quick])")
    p.add_argument("--match", default=None, help="DRIP references to match the families to: 4x, 10x or 4x,10x")
    p.add_argument("--stages", default=None, help="comma-separated subset of stages (default: all)")
    p.add_argument("--no-llava", action="store_true", help="the tower table only (no LLaVA stages)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of methods, in table order, from every family / DRIP preset / DVT at "
                        "the plan's references (e.g. vit,dvt@4x; ratios are vs the first)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out or ROOT / "playground" / ("compare-quick" if args.quick else "compare")).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = QUICK if args.quick else FULL
    if args.match:
        plan = Plan(**{**asdict(plan), "demo": plan.demo, "match": tuple(args.match.split(","))})
    if args.no_llava:
        plan = Plan(**{**asdict(plan), "demo": plan.demo, "llava": False})
    methods = None
    if args.methods:
        known = {m.name: m for m in all_methods(plan)}
        picked = args.methods.split(",")
        unknown = [n for n in picked if n not in known]
        if unknown:
            raise SystemExit(f"compare: unknown methods {unknown}; valid: {', '.join(known)}")
        methods = [known[n] for n in picked]
    cmp = Compare(out, plan, args.quick, methods)
    print("[compare] matched compute (analytic GMACs per image, drip_llava.vision.flops):\n"
          + "\n".join(matching_lines(cmp.methods, cmp.r.get("exits"))), flush=True)
    cmp.r["matching"] = {m.name: {"preset": m.preset, "overrides": list(m.overrides), **m.match}
                         for m in cmp.methods}
    cmp.r["plan"] = {**asdict(plan), "machine": f"{platform.processor() or platform.machine()}, "
                                                f"{__import__('os').cpu_count()} cores"}
    wanted = set(args.stages.split(",")) if args.stages else None
    names = [m.name for m in cmp.methods]
    for st in forget_stale_table_stages(cmp.r, names):
        print(f"[compare] {st}: the methods changed since it ran; running it again", flush=True)
    t0 = time.time()
    for name, fn in cmp.stages():
        if wanted is None or name in wanted:
            cmp.demo.stage(name, fn)
            if name in TABLE_STAGES and cmp.r["done"].get(name):
                cmp.r["table_methods"][name] = names
    cmp.r["total_seconds_this_run"] = round(time.time() - t0, 1)
    cmp.r["date"] = datetime.date.today().isoformat()
    cmp.r["command"] = " ".join(["python -m drip_demo.compare", *(sys.argv[1:] if argv is None else argv)])
    cmp.demo.save()
    if wanted is None or "report" in wanted:
        cmp.report()
        print(f"[compare] finished in {time.time() - t0:.0f} s: {out / 'COMPARE.md'}")
    return cmp.r


if __name__ == "__main__":
    main()
