"""CLIP pretraining of a DRIP (or plain ViT) image tower on webdataset image-text shards.

  torchrun --nproc_per_node N -m vision_pretrain.clip --train-data 'DIR/train-{000000..000009}.tar' \
      --model drip-tiny-16-4x --text-model tiny --batch-size 64 --steps 200 --lr 1e-3 --warmup 20 \
      --output RUN --resume auto --zeroshot-dir DIR/imagefolder/val --classnames DIR/classnames.json
(`python -m vision_pretrain.clip ...` runs the same on one process.)
From a pretrained CLIP, both towers start from its weights (--init-text auto) and DRIP fields come from overrides:
  ... --init-vision /models/clip-vit-large-patch14-336 --vision-override compression=4 n_pre=4   (HF CLIPModel folder)
  ... --init-vision open_clip:ViT-L-14-336:openai --model drip-l-14-4x                            (open_clip)

Loss = open_clip ClipLoss (embeddings gathered across ranks: pooled, fixed-shape, never segment tokens)
     + w * DRIP rate loss (w = --rate-loss-weight, default the model config's rate_loss_weight).
A DVT cascade sums ClipLoss over its exits' embeddings (the paper's joint training; clip_loss_exitK logged).
An epoch is --samples-per-epoch // (batch x world) steps of a deterministic shard stream (see data.py for
what "exact resume" means for webdataset). Outputs in RUN/: log.jsonl, args.json, checkpoints/step_*/,
vision_tower/ (DripVisionModel folder: what LLaVA and classify load), text_tower/ (for zero-shot).
"""
from __future__ import annotations

import math
from pathlib import Path

import open_clip
import torch
from open_clip.loss import ClipLoss

from drip_llava.distributed import broadcast_object, cleanup, exit_after_main
from drip_llava.vision import DripVisionModel
from drip_llava.vision.config import parse_overrides
from drip_llava.vision.hf_clip_import import is_hf_clip_folder, read_json
from drip_llava.vision.open_clip_import import create_open_clip
from drip_llava.vision.spec import OPEN_CLIP_PREFIX, load_drip_model

from . import zeroshot
from .checkpoint import export_atomic
from .clip_model import DripCLIP, build_tokenizer, get_text_config, text_init_from_hf_clip, text_init_from_open_clip
from .data import clip_loader, count_samples, expand_urls
from .loop import Task, fit, start_run
from .params import ClipArgs, ClipDataArgs, ClipModelArgs, TrainArgs, parse_grouped, to_dict

LOGIT_SCALE_MAX = math.log(100)
DEFAULT_PRESET = "drip-tiny-16-4x"


def parse_args(argv=None) -> ClipArgs:
    return parse_grouped(argv, ClipArgs, {"model": ClipModelArgs, "data": ClipDataArgs, "train": TrainArgs},
                         "CLIP pretraining of a DRIP image tower", defaults={"train": {"wd": 0.2}})


def build_vision(name: str | None, init, overrides: dict) -> DripVisionModel:
    """Preset `name` (random init) without `init`; else `init` as drip_llava.vision.spec.load_drip_model reads it,
    pretrained ViTs taking their shape from the checkpoint and DRIP fields from the preset (when given) + overrides."""
    if init is None:
        return load_drip_model(name or DEFAULT_PRESET, **overrides)
    return load_drip_model(init, preset=name, **overrides)


def pretrained_clip(init: str | None, init_text: str):
    """(image-tower source, TextInit or None) for --init-vision / --init-text: an open_clip spec is created once
    and serves both towers; an HF CLIPModel folder gives its text half."""
    if init_text not in ("auto", "none"):
        raise ValueError(f"--init-text {init_text!r}: expected 'auto' or 'none'")
    if init is None:
        return None, None
    if init.startswith(OPEN_CLIP_PREFIX):
        _, oc_name, tag = init.split(":", 2)
        if init_text == "none":
            return init, None
        oc = create_open_clip(oc_name, tag)
        return oc, text_init_from_open_clip(oc, oc_name)
    if init_text == "auto" and is_hf_clip_folder(Path(init)) and read_json(Path(init) / "config.json").get(
            "model_type") == "clip":
        return init, text_init_from_hf_clip(init)
    return init, None


def gmacs(config, tokens_per_img: float | None) -> float | None:
    from drip_llava.vision.flops import analytic_macs

    short = tokens_per_img if (config.is_drip and tokens_per_img is not None) else None
    return analytic_macs(config, tokens_short=short) / 1e9


def main(argv=None) -> dict:
    args = parse_args(argv)
    m, d, t = args.model, args.data, args.train
    info, run = start_run(args, t)

    torch.manual_seed(t.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    vision_source, text_init = pretrained_clip(m.init_vision, m.init_text)
    visual = build_vision(m.model, vision_source, parse_overrides(m.vision_override))
    if text_init is not None:  # both towers from the same pretrained CLIP
        text_cfg = {**text_init.cfg, **parse_overrides(m.text_override)}
        model = DripCLIP(visual, text_cfg)
        model.load_text_init(text_init)
        if info.is_main:
            print(f"text tower and logit scale from {text_init.source} (--text-model unused)", flush=True)
    else:
        text_cfg = {**get_text_config(m.text_model), **parse_overrides(m.text_override)}
        model = DripCLIP(visual, text_cfg, init_logit_scale=m.init_logit_scale)
    tokenizer = build_tokenizer(text_cfg)
    torch.manual_seed(t.seed + 1000 * info.rank)  # different Gumbel noise per rank

    urls = expand_urls(d.train_data)
    n_samples = d.samples_per_epoch or broadcast_object(count_samples(urls) if info.is_main else None, info)
    spe = n_samples // (t.batch_size * info.world_size)
    if spe == 0:
        raise ValueError(f"{n_samples} samples per epoch are fewer than one global batch "
                         f"({t.batch_size} x {info.world_size}) in {d.train_data}")
    rate_w = t.rate_loss_weight if t.rate_loss_weight is not None else visual.config.rate_loss_weight
    clip_loss = ClipLoss(local_loss=m.local_loss, gather_with_grad=m.gather_with_grad, cache_labels=True,
                         rank=info.rank, world_size=info.world_size)

    def batches(epoch: int, skip: int):
        return clip_loader(urls, t.batch_size, visual.preprocess, tokenizer, seed=t.seed, epoch=epoch,
                           rank=info.rank, world_size=info.world_size, workers=t.workers, skip_batches=skip,
                           shuffle_buffer=d.shuffle_buffer)

    def loss(ddp_model, batch):
        out = ddp_model(batch["images"].to(info.device, non_blocking=True), batch["texts"].to(info.device))
        per_exit = [clip_loss(f, out["text_features"], out["logit_scale"])
                    for f in out.get("exit_image_features", out["image_features"][None])]
        c = sum(per_exit)
        total = c + rate_w * out["rate_loss"]
        stats = {"clip_loss": c.detach(), "rate_loss": out["rate_loss"].detach(),
                 "boundary_rate": out["boundary_rate"], "tokens_per_img": out["num_tokens"].float().mean(),
                 "rank_max_tokens": out["num_tokens"].max().float(), "logit_scale": out["logit_scale"].detach()}
        if len(per_exit) > 1:
            stats.update({f"clip_loss_exit{k}": v.detach() for k, v in enumerate(per_exit)})
        return total, stats

    def evaluate(epoch: int) -> dict:
        res = {"target_rate": visual.config.target_rate if visual.config.is_drip else 1.0}
        if d.zeroshot_dir:
            res.update(zeroshot.evaluate(model, tokenizer, d.zeroshot_dir, d.classnames, d.zeroshot_templates,
                                         d.eval_batch_size, info, workers=t.workers))
            res["gmacs"] = gmacs(visual.config, res["zeroshot_tokens_per_img"])
        else:
            res["gmacs"] = gmacs(visual.config, None)
        return res

    def export():
        export_atomic(visual.save_pretrained, run / "vision_tower")
        export_atomic(model.save_text_tower, run / "text_tower")

    def clamp_logit_scale():
        with torch.no_grad():
            model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)

    task = Task(model=model, steps_per_epoch=spe, batches=batches, loss=loss,
                batch_size=lambda b: b["images"].shape[0], evaluate=evaluate, export=export,
                after_step=clamp_logit_scale, args_dict={**to_dict(args), "samples_per_epoch": n_samples,
                                                         "rate_loss_weight_used": rate_w,
                                                         "open_clip": open_clip.__version__})
    result = fit(task, t, info)
    cleanup(info)  # only after success: a barrier after one rank's crash would just hang the others
    return result


if __name__ == "__main__":
    exit_after_main(main)
