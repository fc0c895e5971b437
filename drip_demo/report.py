"""REPORT.md + PNG plots for drip_demo.pipeline, from its results.json (kept apart so the runner stays readable)."""
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
                    f"{_fmt(r.get('target_rate'), 3)} | {_fmt(r.get('gmacs'), 3)} | "
                    f"{_fmt(r.get('avg_step_time'), 2)} |")
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
        ax.plot([s for s, _ in losses], [loss for _, loss in losses], color="C3")
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
    names = [r["name"] for r in rows]
    ax.bar(names, [r["visual_tokens_mean"] for r in rows], color="C0", label="visual tokens / image")
    ax2 = ax.twinx()
    ax2.plot(names, [r["prefill_ms_median"] for r in rows], "o-", color="C3", label="LLM prefill ms")
    ax.set(ylabel="visual tokens per image (mean)", title="Visual tokens and SmolLM2 prefill time")
    ax2.set_ylabel("prefill ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def probe_section(probe: dict | None) -> list[str]:
    """What each tower's LLaVA tokens encode (drip_demo.attribute_probe): the reading the LLM can learn at
    best."""
    if not probe:
        return []
    from drip_demo.attribute_probe import markdown_table

    return ["## 2b. What the LLaVA tokens encode (attribute probes)", "",
            "Val accuracy % of a linear probe on the mean-pooled tokens / an attention-pooling probe, fitted on train "
            "images (`python -m drip_demo.attribute_probe`); majority class in brackets. Colour, shape and cell "
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


PROBE_MARGIN = 5.0  # points above the majority class from which an attribute probe counts as reading it
ATTRIBUTE_WORDS = {"colour": "colour", "count": "count", "cell": "position", "shape": "shape"}
LLAVA_TOWER = "drip-tiny-16-4x"  # drip_demo.pipeline's LLaVA tower


def seen_attributes(probe: dict | None, tower: str = LLAVA_TOWER) -> dict[str, bool]:
    """Attribute -> whether the tower's LLaVA tokens encode it: the better of its two probes (section 2b) at least
    PROBE_MARGIN points above the majority class. Empty without probe results."""
    row = (probe or {}).get(tower) or {}
    return {a: max(r["mean"], r["attn"]) >= r["chance"] + PROBE_MARGIN for a, r in row.items() if isinstance(r, dict)}


def _pair_cells(r: dict | None) -> str:
    if not r:
        return "- | -"
    return f"{r['only_a']} / {r['only_b']} | {r['p_value']:.2g}"


def eval_section(results: dict, budget: dict) -> list[str]:
    """Section 4: the verdict on image use (likelihood, exact McNemar), the protocols side by side, and the per-type
    table with which types the LLaVA tower can see."""
    from drip_demo.synthetic_questions import SQA_ATTRIBUTE, SQA_MIXES
    from drip_llava.eval.paired import combine

    sqa, ranked, test = (results.get(k) or {} for k in ("scienceqa", "scienceqa_ranked", "image_test"))
    if not (sqa or ranked):
        return []
    n_all = ranked.get("image", {}).get("n")
    n_letter = sqa.get("image", {}).get("n")
    L = ["## 4. Does LLaVA read the image? Held-out ScienceQA-format problems, with the image and with a blank one",
         ""]
    if test:
        L += [f"**{verdict_line(test)}**", ""]
    step = -(-n_all // n_letter) if n_all and n_letter else None  # drip_demo.pipeline's letter_split step
    runs = 2 * (n_all + n_letter) if n_all and n_letter else None
    mix = budget.get("sqa_mix", "uniform")
    weights = SQA_MIXES.get(mix)
    L += ["Primary protocol: likelihood (`python -m drip_llava.eval.rank_choices`): each option is scored as a "
          "short answer by its mean log-probability per token and the most probable one is the answer, the cloze "
          "formulation sub-1B language models are evaluated with (lm-evaluation-harness, OLMES). LLaVA's letter "
          "protocol (`python -m drip_llava.eval.generate`, the model writes a letter) is reported beside it. Both go "
          "through the same ScienceQA scorer, with the images and with every image replaced by a flat grey one.", "",
          f"Budget: likelihood on all {_fmt(n_all)} problems, letter on one problem in {_fmt(step)} "
          f"({_fmt(n_letter)}), each with the image and blank: {_fmt(runs)} answer runs. Letter generation costs "
          "about as much per problem as likelihood (~0.4 s on one core), the eval stage must keep the FULL demo "
          "within 20 minutes on 2 cores, so the large sample goes to the protocol that decides.", ""]
    if test:
        L += ["Test: exact McNemar (`drip_llava.eval.paired`) on the problems that have an image, pairing each "
              "problem's correctness with its image and with the blank one; only the discordant problems count. "
              "Two-sided: a model can also do worse with its image (a misreading), and a two-sided exact McNemar is "
              "what standard tools report, so the p-value can be checked elsewhere; the verdict also needs the "
              "direction. Text-only problems get the same input in both runs and are left out. "
              + ("The FULL demo passes at p < " + str(test["alpha"]) + "." if test.get("decisive") else
                 "QUICK prints the verdict line for information: its few problems cannot decide."), ""]
    if weights:
        share = {}
        for t, w in weights.items():
            share[ATTRIBUTE_WORDS[SQA_ATTRIBUTE[t]]] = share.get(ATTRIBUTE_WORDS[SQA_ATTRIBUTE[t]], 0) + w
        L += [f"The image problems are weighted toward what a tower learns in a few CPU minutes (question mix "
              f"`{mix}`: " + ", ".join(f"{100 * w:.0f}% {a}" for a, w in share.items()) + "; `python -m "
              "drip_demo.synthetic --sqa-mix`): the overall verdict is mostly about colour, by design, and "
              "the shape questions are a control that should not move. The table below separates the types.", ""]

    L += ["| protocol | with the image % | image replaced by a blank one % | chance % |", "|---|---|---|---|"]
    for name, r in ((f"likelihood, all {_fmt(n_all)} problems (primary)", ranked),
                    (f"letter, {_fmt(n_letter)} of them", sqa)):
        if r:
            im, bl = r.get("image", {}), r.get("blank", {})
            L.append(f"| {name} | {_fmt(im.get('acc'))} | {_fmt(bl.get('acc'))} | {_fmt(im.get('chance'))} |")
            L.append(f"| ... IMG (problems with an image) | {_fmt(im.get('img_acc'))} | {_fmt(bl.get('img_acc'))} "
                     "| |")
    em = results.get("exact_match", {})
    if em:
        L.append(f"| exact match, short answers ({em.get('n')} questions) | {_fmt(em.get('accuracy'))} | | |")
    L.append("")
    if test and test.get("letter", {}).get("overall", {}).get("n"):
        from drip_llava.eval.paired import format_line

        L += ["By letter (information): " + format_line(test["letter"]["overall"]) + ".", ""]

    seen = seen_attributes(results.get("probe"))
    types = ranked.get("image", {}).get("by_type") or sqa.get("image", {}).get("by_type") or {}
    order = list(SQA_ATTRIBUTE) + ["text_only"]  # grouped by attribute: colour, count, position, shape, no image
    types = dict(sorted(types.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    if types:
        lik_t = (test.get("likelihood") or {}).get("by_type", {})
        let_im, let_bl = (sqa.get(t, {}).get("by_type", {}) for t in ("image", "blank"))
        bl = ranked.get("blank", {}).get("by_type", {})

        def sees(t):
            a = SQA_ATTRIBUTE.get(t)
            return "no image" if a is None else (
                f"{ATTRIBUTE_WORDS[a]}: {'yes' if seen[a] else 'no'}" if a in seen else f"{ATTRIBUTE_WORDS[a]}: ?")

        L += ["Per question type. Likelihood on every problem (right only with the image / only blank, and the "
              "exact McNemar p of the type alone), letter on its subset; chance from each problem's option count. "
              "\"Tower sees\" is the attribute the type needs and whether the LLaVA tower's tokens encode it (its "
              f"attribute probes, section 2b: the better probe >= {PROBE_MARGIN:.0f} points above the majority "
              "class).", "",
              "| question type | tower sees | n | likelihood: image % | blank % | discordant | p | letter: n | "
              "image % | blank % | chance % |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for t, r in types.items():
            li = let_im.get(t, {})
            L.append(f"| {t} | {sees(t)} | {r['n']} | {_fmt(r['acc'])} | {_fmt(bl.get(t, {}).get('acc'))} | "
                     f"{_pair_cells(lik_t.get(t))} | {_fmt(li.get('n'))} | {_fmt(li.get('acc'))} | "
                     f"{_fmt(let_bl.get(t, {}).get('acc'))} | {_fmt(r['chance'])} |")
        L.append("")
        by_attr = (test.get("likelihood") or {}).get("by_attribute", {})
        if by_attr and seen:
            from drip_llava.eval.paired import format_line

            for label, want in (("types the tower sees", True), ("types it does not see yet", False)):
                attrs = [a for a in ATTRIBUTE_WORDS if a in by_attr and seen.get(a) is want]
                if attrs:
                    words = ", ".join(ATTRIBUTE_WORDS[a] for a in attrs)
                    L.append(f"- {label} ({words}), by likelihood: {format_line(combine([by_attr[a] for a in attrs]))}")
            L.append("")
        elif not seen:
            L += ["(No probe results: which types the tower can see is not known in this run.)", ""]
    return L


def verdict_line(test: dict) -> str:
    """The verdict on image use with its numbers (REPORT.md and the demo's console): PASS / FAIL in FULL,
    information only in QUICK."""
    from drip_llava.eval.paired import format_line

    r = test["likelihood"]["overall"]
    rule = f"PASS needs with-image > blank at p < {test['alpha']}"
    if test["decisive"]:
        head = f"verdict: {'PASS' if test['pass'] else 'FAIL'} ({rule})"
    else:
        head = (f"verdict for information only (QUICK: too few problems to decide; it "
                f"{'would pass' if test['pass'] else 'would not pass'} the FULL rule, {rule})")
    return f"Does LLaVA read the image? {head}. By likelihood, problems with an image: {format_line(r)}"


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

    L += eval_section(results, budget)

    if prefill:
        L += ["## 5. Efficiency: visual tokens and LLM prefill", "",
              "`python -m drip_llava.eval.payoff --no-train` (medians per image; vision = image processing + tower + "
              "projector; prefill GMACs analytic).", "",
              "| tower | visual tokens mean [min-max] | vision ms | prefill ms | TTFT ms | prefill GMACs | "
              "prefill vs ViT |", "|---|---|---|---|---|---|---|"]
        base = prefill[0]["prefill_ms_median"]
        for r in prefill:
            L.append(f"| {r['name']} | {r['visual_tokens_mean']:.1f} [{r['visual_tokens_min']}-"
                     f"{r['visual_tokens_max']}] | {r['vision_ms_median']:.1f} | {r['prefill_ms_median']:.1f} | "
                     f"{r['ttft_ms_median']:.1f} | {r['prefill_gmacs_mean']:.2f} | "
                     f"{base / r['prefill_ms_median']:.2f}x faster |")
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
