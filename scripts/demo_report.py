"""REPORT.md + PNG plots for scripts/demo.py, from its results.json (kept apart so the runner stays readable)."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CHANCE_CLIP = 100 / 40  # 40 synthetic classes


def _fmt(x, nd=1):
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def _pct(fraction):
    return None if fraction is None else 100 * fraction


def clip_table(clip_results: dict) -> list[str]:
    """Markdown rows of vision_pretrain.runlog.summarize_clip_run summaries, one tower per row."""
    rows = ["| tower | zero-shot top-1 % | top-5 % | tokens/img (eval) | boundary rate (train, last quarter) | "
            "target rate | vision GMACs | avg step s |", "|---|---|---|---|---|---|---|---|"]
    for name, r in clip_results.items():
        rows.append(f"| {name} | {_fmt(_pct(r.get('zeroshot_top1')))} | {_fmt(_pct(r.get('zeroshot_top5')))} | "
                    f"{_fmt(r.get('eval_tokens_per_img'))} | {_fmt(r.get('train_boundary_rate'), 3)} | "
                    f"{_fmt(r.get('target_rate'), 3)} | {_fmt(r.get('gmacs'), 3)} | {_fmt(r.get('avg_step_time'), 2)} |")
    return rows


def _clip_losses(ax, results: dict):
    for name, r in results.get("clip", {}).items():
        st = [s for s in r["steps"] if s.get("loss") is not None]
        ax.plot([s["step"] for s in st], [s["loss"] for s in st], label=name)
    ax.set(title="CLIP pretraining loss", xlabel="step", ylabel="loss")
    ax.legend()


def plot_curves(results: dict, path: Path):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    _clip_losses(axes[0], results)
    for ax, stage, title in ((axes[1], "stage1", "LLaVA stage 1 (projector)"),
                             (axes[2], "stage2", "LLaVA stage 2 (LoRA)")):
        losses = results.get(stage, {}).get("losses", [])
        ax.plot([s for s, _ in losses], [l for _, l in losses], color="C3")
        ax.set(title=title, xlabel="step", ylabel="loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _top1_vs_macs(ax, results: dict):
    for name, r in results.get("clip", {}).items():
        if r.get("gmacs") is not None and r.get("zeroshot_top1") is not None:
            top1 = _pct(r["zeroshot_top1"])  # the trainer logs fractions
            ax.scatter(r["gmacs"], top1, s=60)
            ax.annotate(name, (r["gmacs"], top1), textcoords="offset points", xytext=(5, 5))
    ax.axhline(CHANCE_CLIP, ls="--", color="gray", label="chance")
    ax.set(xlabel="vision GMACs / image (at eval token counts)", ylabel="zero-shot top-1 (%)",
           title="Zero-shot top-1 vs compute, equal steps")
    ax.legend()


def plot_top1_vs_macs(results: dict, path: Path):
    fig, ax = plt.subplots(figsize=(5.5, 4))
    _top1_vs_macs(ax, results)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_clip_comparison(results: dict, path: Path):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    _clip_losses(axes[0], results)
    _top1_vs_macs(axes[1], results)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tokens(rows: list, path: Path):
    fig, ax = plt.subplots(figsize=(6, 4))
    names = [Path(r["tower"]).parent.name if "/" in r["tower"] else r["tower"] for r in rows]
    ax.bar(names, [r["visual_tokens_mean"] for r in rows], color="C0", label="visual tokens / image")
    ax2 = ax.twinx()
    ax2.plot(names, [r["prefill_ms"] for r in rows], "o-", color="C3", label="LLM prefill ms")
    ax.set(ylabel="visual tokens per image (mean)", title="Visual tokens and SmolLM2 prefill time")
    ax2.set_ylabel("prefill ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def probe_section(probe: dict | None) -> list[str]:
    """What each tower's LLaVA tokens encode (vision_pretrain.attribute_probe): the reading the LLM can learn at
    best."""
    if not probe:
        return []
    from vision_pretrain.attribute_probe import markdown_table

    return ["## 2b. What the LLaVA tokens encode (attribute probes)", "",
            "Val accuracy % of a linear probe on the mean-pooled tokens / an attention-pooling probe, fitted on train "
            "images (`python -m vision_pretrain.attribute_probe`); majority class in brackets. Colour, shape and cell "
            "are those of the largest shape. An attribute at chance here cannot be read by the LLM either, whatever "
            "the LLaVA recipe.", "", *markdown_table(probe), ""]


def image_use_section(image_use: dict | None) -> list[str]:
    if not image_use:
        return []
    L = ["Does each stage read the image? Answer loss (nats/token, teacher-forced) on held-out val conversations "
         "with each sample's own image, with another sample's, and with a blank one "
         "(`python -m drip_llava.eval.image_use`); a model that ignores the image has a wrong-image gap of ~0.", "",
         "| after | data | samples | loss, right image | wrong image | blank | wrong-image gap (+- se) |",
         "|---|---|---|---|---|---|---|"]
    for stage, r in image_use.items():
        loss = r["loss"]
        L.append(f"| {stage} | {Path(r['data']).name} | {r['samples']} | {loss['right']:.3f} | {loss['wrong']:.3f} | "
                 f"{loss['blank']:.3f} | {r['gap_wrong']:+.3f} +- {r['gap_wrong_se']:.3f} |")
    return L + [""]


def write_report(out: Path, results: dict, budget: dict, quick: bool):
    rep = out / "report"
    rep.mkdir(parents=True, exist_ok=True)
    plot_curves(results, rep / "training_curves.png")
    plot_top1_vs_macs(results, rep / "top1_vs_macs.png")
    prefill = results.get("prefill", [])
    if prefill:
        plot_tokens(prefill, rep / "tokens_prefill.png")

    L = [f"# DRIP-LLaVA demo report ({'QUICK' if quick else 'full'} budget)", ""]
    L += ["Everything below was produced by `make demo" + (" QUICK=1" if quick else "") + "` on this machine's CPU "
          "from the synthetic shapes world and the embedded SmolLM2-135M-Instruct.", ""]
    L += ["Budget: " + ", ".join(f"{k}={v}" for k, v in budget.items()), ""]
    secs = results.get("seconds", {})
    L += ["Stage times (s): " + ", ".join(f"{k} {v}" for k, v in secs.items())]
    if results.get("llm_conversion_seconds") is not None:
        L += [f"(the LLM conversion took {results['llm_conversion_seconds']} s beside earlier stages; the llm "
              "stage only waits for it)"]
    L += [""]

    L += ["## 1. CLIP pretraining at equal steps (2 ranks, torchrun)", ""] + clip_table(results.get("clip", {}))
    L += ["", f"Chance is {CHANCE_CLIP:.1f}% (40 classes).", "",
          "![training curves](report/training_curves.png)", "", "![top-1 vs MACs](report/top1_vs_macs.png)", ""]
    L += ["## 2. Boundaries (what DRIP pooled)", ""]
    for p in sorted(rep.glob("boundaries_*.png")):
        L += [f"![{p.stem}](report/{p.name})", ""]

    L += probe_section(results.get("probe"))

    s1, s2 = results.get("stage1", {}), results.get("stage2", {})
    L += ["## 3. LLaVA stages (DRIP-tiny-16-4x tower, SmolLM2-135M-Instruct)", "",
          "| stage | command | loss first -> last | tokens/s |", "|---|---|---|---|"]
    for name, r, cmd in (("1: projector", s1, "deepspeed scripts/pretrain_projector.py (zero2, 2 ranks)"),
                         ("2: LoRA", s2, "bash scripts/finetune_lora.sh (2 ranks)")):
        losses = r.get("losses") or []
        fl = f"{losses[0][1]:.3f} -> {losses[-1][1]:.3f}" if losses else "-"
        L.append(f"| {name} | `{cmd}` | {fl} | {_fmt(r.get('tokens_per_s'))} |")
    L.append("")
    L += image_use_section(results.get("image_use"))

    sqa = results.get("scienceqa", {})
    L += ["## 4. Evaluation on held-out synthetic questions", "",
          "| eval | with the image | image replaced by a blank one | chance |", "|---|---|---|---|"]
    if sqa:
        im, bl = sqa.get("image", {}), sqa.get("blank", {})
        L.append(f"| ScienceQA-format MC accuracy % (scorer: drip_llava.eval.scienceqa) | {_fmt(im.get('acc'))} | "
                 f"{_fmt(bl.get('acc'))} | {_fmt(im.get('chance'))} |")
        L.append(f"| ... IMG accuracy % | {_fmt(im.get('img_acc'))} | {_fmt(bl.get('img_acc'))} | |")
    ranked = results.get("scienceqa_ranked", {})
    if ranked:
        im, bl = ranked.get("image", {}), ranked.get("blank", {})
        L.append(f"| the same MC by answer likelihood % (drip_llava.eval.rank_choices, same scorer) | "
                 f"{_fmt(im.get('acc'))} | {_fmt(bl.get('acc'))} | {_fmt(im.get('chance'))} |")
        L.append(f"| ... IMG accuracy % | {_fmt(im.get('img_acc'))} | {_fmt(bl.get('img_acc'))} | |")
    em = results.get("exact_match", {})
    if em:
        L.append(f"| exact match %, short answers ({em.get('n')} questions) | {_fmt(em.get('accuracy'))} | | |")
    L.append("")
    skills = sqa.get("image", {}).get("by_skill") if sqa else None
    if skills:
        blank = sqa.get("blank", {}).get("by_skill", {})
        r_im, r_bl = ({} if not ranked else ranked.get(t, {}).get("by_skill", {}) for t in ("image", "blank"))
        L += ["MC accuracy % by question type (ScienceQA `skill`), by letter and by likelihood:", "",
              "| question type | n | letter: with the image | letter: blank image | likelihood: with the image | "
              "likelihood: blank image | chance |", "|---|---|---|---|---|---|---|"]
        for k, r in skills.items():
            L.append(f"| {k} | {r['n']} | {_fmt(r['acc'])} | {_fmt(blank.get(k, {}).get('acc'))} | "
                     f"{_fmt(r_im.get(k, {}).get('acc'))} | {_fmt(r_bl.get(k, {}).get('acc'))} | "
                     f"{_fmt(r['chance'])} |")
        L.append("")

    if prefill:
        L += ["## 5. Efficiency: visual tokens and LLM prefill", "",
              "| tower | visual tokens mean [min-max] | tower ms | prefill ms | prefill vs ViT |", "|---|---|---|---|---|"]
        base = prefill[0]["prefill_ms"]
        for r in prefill:
            name = Path(r["tower"]).parent.name if "/" in r["tower"] else r["tower"]
            L.append(f"| {name} | {r['visual_tokens_mean']:.1f} [{r['visual_tokens_min']}-{r['visual_tokens_max']}] | "
                     f"{r['tower_ms']:.1f} | {r['prefill_ms']:.1f} | {base / r['prefill_ms']:.2f}x faster |")
        L += ["", "![tokens and prefill](report/tokens_prefill.png)", ""]
    eff = results.get("efficiency")
    if eff:
        L += ["Efficiency report of the trained model (`python -m drip_llava.eval.efficiency`):", "", "```",
              json.dumps({k: v for k, v in (eff.get("models", [eff])[0] if isinstance(eff, dict) else {}).items()
                          if k != "per_image"}, indent=1)[:1500], "```", ""]
    L += ["LLaVA-Bench review runs when a judge endpoint is configured: see eval/README.md (`eval/llavabench.sh`).", "",
          "## Chat with the trained model", "", "```",
          f"python -m drip_llava.serve.gradio_app --model-path {out / 'stage2'} --model-base {results.get('llm')}",
          "```", ""]
    (out / "REPORT.md").write_text("\n".join(L))
