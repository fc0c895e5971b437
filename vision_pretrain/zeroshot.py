"""Zero-shot classification of an ImageFolder with a DRIP CLIP model: top-1/top-5 and mean tokens per image.

The image tower alone cannot classify zero-shot: it needs the text tower trained with it. A CLIP run folder
holds both (vision_tower/ and text_tower/); for a bare vision tower folder, --text-model-from names the run.

  python -m vision_pretrain.zeroshot --model RUN --data DIR/imagefolder/val --classnames DIR/classnames.json
  python -m vision_pretrain.zeroshot --model RUN/vision_tower --text-model-from RUN --data ... --classnames ...
"""
from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

import open_clip
import torch

from drip_llava.distributed import DistInfo, pick_device

from .clip_model import DripCLIP, build_tokenizer, resolve_towers
from .data import ImageFolderData, folder_eval_loader, load_classnames
from .loop import evaluate_topk

# The synthetic captions read "A picture of a large red circle ...", "There is ...", "An image showing ..."
SHORT_TEMPLATES = ("a picture of a {}.", "there is a {}.", "an image showing a {}.", "a {}.")


def pick_templates(kind: str, classnames: Sequence[str]) -> Sequence:
    if kind == "auto":
        kind = "openai" if list(classnames) == list(open_clip.IMAGENET_CLASSNAMES) else "short"
    return {"openai": open_clip.OPENAI_IMAGENET_TEMPLATES, "simple": open_clip.SIMPLE_IMAGENET_TEMPLATES,
            "short": SHORT_TEMPLATES}[kind]


@torch.no_grad()
def evaluate(model: DripCLIP, tokenizer, data_dir: str, classnames_spec: Optional[str], templates: str = "auto",
             batch_size: int = 64, info: Optional[DistInfo] = None, workers: int = 0,
             show_progress: bool = False) -> dict:
    """Collective when distributed: each rank scores its share of the images, counts are summed."""
    info = info or DistInfo(device=pick_device())
    was_training = model.training
    model.eval()
    ds = ImageFolderData(data_dir, model.visual.preprocess)
    classnames = load_classnames(classnames_spec, ds.classes)
    weights = open_clip.build_zero_shot_classifier(model, tokenizer, classnames, pick_templates(templates, classnames),
                                                   num_classes_per_batch=10, device=info.device)  # [E, C]

    def predict(images):
        out = model.visual(images)
        return torch.nn.functional.normalize(out.pooled.float(), dim=-1) @ weights.float(), out.num_tokens

    loader = folder_eval_loader(ds, batch_size, rank=info.rank, world_size=info.world_size, workers=workers)
    res = evaluate_topk(predict, loader, len(classnames), info, prefix="zeroshot", progress=show_progress)
    model.train(was_training)
    return {**res, "num_classes": len(classnames)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="CLIP run folder or DripVisionModel folder")
    p.add_argument("--text-model-from", default=None,
                   help="CLIP run folder (or text_tower/) to take the text tower from")
    p.add_argument("--data", required=True, help="ImageFolder to classify")
    p.add_argument("--classnames", default=None, help="class names JSON (list or {folder: name}) or 'imagenet'")
    p.add_argument("--templates", default="auto", choices=("auto", "openai", "simple", "short"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--output-json", default=None, help="also write the metrics to this file")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    vision_dir, text_dir = resolve_towers(args.model, args.text_model_from)
    info = DistInfo(device=pick_device(device=args.device))
    model = DripCLIP.from_towers(vision_dir, text_dir).to(info.device)
    res = evaluate(model, build_tokenizer(model.text_cfg), args.data, args.classnames, args.templates,
                   args.batch_size, info, args.workers, show_progress=True)
    print(f"zero-shot {args.data}: top-1 {100 * res['zeroshot_top1']:.2f}%  top-5 {100 * res['zeroshot_top5']:.2f}%  "
          f"({res['zeroshot_images']} images, {res['num_classes']} classes, "
          f"{res['zeroshot_tokens_per_img']:.2f} tokens/image, {res['zeroshot_skipped']} unreadable skipped)")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
