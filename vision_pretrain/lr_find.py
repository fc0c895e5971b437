"""Learning-rate range test (Smith, 2015) for the classification setup: the LR grows geometrically from
--start-lr to --end-lr over --num-steps AdamW steps; the plot shows the smoothed loss against the LR.

  python -m vision_pretrain.lr_find --model drip-tiny-16-4x --train-dir DIR/imagefolder/train --out lr.png

Suggested LR: where the smoothed loss falls fastest (steepest negative slope in log-LR), a common, slightly
conservative pick; the LR of the minimum loss divided by 10 is printed too. The run stops early once the
loss diverges (4x the best smoothed loss).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from drip_llava.distributed import pick_device

from .classify import Classifier, build_tower
from .data import ImageFolderData, build_transform, folder_train_loader, steps_per_epoch_folder
from .loop import param_groups
from .params import ClassifyModelArgs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="preset (scratch) or DRIP layout for open_clip imports")
    p.add_argument("--vision-override", nargs="*", default=[], help="override preset fields, KEY=VALUE")
    p.add_argument("--init", default=None, help="CLIP run / DripVisionModel folder / open_clip:NAME:TAG")
    p.add_argument("--mode", default="scratch", choices=("linear-probe", "finetune", "scratch"))
    p.add_argument("--train-dir", required=True)
    p.add_argument("--out", required=True, help="PNG plot (a JSON with the curve is written next to it)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--start-lr", type=float, default=1e-6)
    p.add_argument("--end-lr", type=float, default=1.0)
    p.add_argument("--num-steps", type=int, default=100)
    p.add_argument("--wd", type=float, default=0.05)
    p.add_argument("--smooth", type=float, default=0.9, help="EMA factor of the plotted loss")
    p.add_argument("--aug", default="none", choices=("none", "basic", "randaug"))
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    return p.parse_args(argv)


def suggest(lrs: list[float], losses: list[float]) -> dict:
    """Steepest descent of the smoothed loss over log(lr), and min-loss LR / 10."""
    if len(lrs) < 3:
        raise ValueError(f"only {len(lrs)} points: run more --num-steps")
    slope = np.gradient(np.asarray(losses), np.log(np.asarray(lrs)))
    i_min = int(np.argmin(losses))
    i_steep = int(np.argmin(slope[: max(1, i_min)])) if i_min > 0 else 0
    return {"steepest": lrs[i_steep], "min_loss_div10": lrs[i_min] / 10, "min_loss_lr": lrs[i_min]}


def plot(lrs, losses, raw, sugg: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, raw, color="0.8", lw=1, label="loss")
    ax.plot(lrs, losses, lw=2, label="smoothed loss")
    ax.axvline(sugg["steepest"], color="C3", ls="--", label=f"suggested {sugg['steepest']:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = pick_device(device=args.device)
    torch.manual_seed(args.seed)
    tower = build_tower(ClassifyModelArgs(mode=args.mode, init=args.init, model=args.model,
                                           vision_override=args.vision_override))
    c = tower.config
    ds = ImageFolderData(args.train_dir, build_transform(tower.preprocess, c.image_size, c.image_mean, c.image_std,
                                                         args.aug), seed=args.seed)
    model = Classifier(tower, len(ds.classes), train_tower=args.mode != "linear-probe").to(device).train()
    opt = torch.optim.AdamW(param_groups(model, args.wd), lr=args.start_lr)
    gamma = (args.end_lr / args.start_lr) ** (1 / max(1, args.num_steps - 1))
    rate_w = c.rate_loss_weight if args.mode != "linear-probe" else 0.0
    spe = steps_per_epoch_folder(len(ds), args.batch_size, 1)

    def stream():
        for epoch in range(10 ** 6):
            yield from folder_train_loader(ds, args.batch_size, seed=args.seed, epoch=epoch, rank=0, world_size=1,
                                           workers=args.workers)

    lrs, raw, smooth, ema, best = [], [], [], None, math.inf
    batches = stream()
    for i in tqdm(range(args.num_steps), desc="lr_find", dynamic_ncols=True):
        lr = args.start_lr * gamma ** i
        for g in opt.param_groups:
            g["lr"] = lr
        batch = next(batches)
        logits, out = model(batch["images"].to(device))
        loss = F.cross_entropy(logits, batch["labels"].to(device))
        opt.zero_grad(set_to_none=True)
        (loss + rate_w * out.rate_loss).backward()
        opt.step()
        value = loss.item()
        if not math.isfinite(value):
            break
        ema = value if ema is None else args.smooth * ema + (1 - args.smooth) * value
        debiased = ema / (1 - args.smooth ** (i + 1))
        lrs.append(lr)
        raw.append(value)
        smooth.append(debiased)
        best = min(best, debiased)
        if debiased > 4 * best and i > 5:
            break
    sugg = suggest(lrs, smooth)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(lrs, smooth, raw, sugg, out)
    result = {"suggested_lr": sugg["steepest"], **sugg, "steps_run": len(lrs), "steps_per_epoch": spe,
              "lrs": lrs, "losses": raw, "smoothed": smooth}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(f"suggested lr {sugg['steepest']:.2e} (steepest descent); min-loss lr / 10 = {sugg['min_loss_div10']:.2e}; "
          f"plot {out}")
    return result


if __name__ == "__main__":
    main()
