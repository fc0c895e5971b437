"""ViT vs DRIP CLIP towers side by side at equal steps: zero-shot top-1/top-5, tokens, GMACs, step time.

    python -m drip_demo.compare_clip --data playground/demo/data --out playground/compare_clip \\
        --presets vit-tiny-16 drip-tiny-16-2x drip-tiny-16-4x drip-tiny-16-10x --steps 240 --batch-size 64

Every run gets the same data, seed, schedule and step count (vision_pretrain.clip in this process, one after
the other, so step times are measured under the same load). Writes OUT/compare.json, OUT/compare.md and
OUT/compare.png (loss curves; top-1 vs GMACs). Re-running skips presets whose run already finished.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from drip_demo.synthetic import shard_spec
from drip_llava.jsonl import read_jsonl
from vision_pretrain import clip
from vision_pretrain.runlog import summarize_clip_run


def run_preset(preset: str, args, run: Path) -> dict:
    log = run / "log.jsonl"
    done = log.is_file() and any(r.get("event") == "end" for r in read_jsonl(log))
    if not done:
        data = Path(args.data)
        clip.main(["--train-data", shard_spec(data, "train"), "--model", preset,
                   "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--lr", str(args.lr),
                   "--warmup", str(args.warmup), "--seed", str(args.seed), "--output", str(run),
                   "--resume", "auto", "--save-every", str(max(10, args.steps // 4)), "--log-every", "5",
                   "--zeroshot-dir", str(data / "imagefolder" / "val"),
                   "--classnames", str(data / "classnames.json"), *args.extra])
    return summarize_clip_run(run)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="python -m drip_demo.synthetic output folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--presets", nargs="+",
                    default=["vit-tiny-16", "drip-tiny-16-2x", "drip-tiny-16-4x", "drip-tiny-16-10x"])
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more vision_pretrain.clip flags for every run")
    args = ap.parse_args(argv)
    args.extra = [a for a in args.extra if a != "--"]
    out = Path(args.out)
    results = {p: run_preset(p, args, out / p) for p in args.presets}
    (out / "compare.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    from drip_demo.report import clip_table, plot_clip_comparison

    n_classes = len(json.loads((Path(args.data) / "classnames.json").read_text()))
    table = "\n".join(clip_table(results)) + f"\n\nChance is {100 / n_classes:.1f}% ({n_classes} classes).\n"
    (out / "compare.md").write_text(table)
    print(table)

    plot_clip_comparison({"clip": results}, out / "compare.png")
    print(f"wrote {out / 'compare.md'} and {out / 'compare.png'}")


if __name__ == "__main__":
    main()
