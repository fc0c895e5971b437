"""Does the model use the image? Answer loss with the right image vs another sample's image vs a blank one.

    python -m drip_llava.eval.image_use --model-path OUT/stage1 --model-base LLM_DIR \\
        --data-path val_pretrain.json --image-folder IMAGES [--version plain] [--n 256] [--json gap.json]

Runs LLaVA-format conversations (the training JSON) through the model three times, teacher-forced: with each
sample's own image, with the image of the next sample (a derangement: every sample gets a wrong image), and
with a flat grey image. It reports the mean loss per supervised token (nats) of each and the gaps
`wrong - right` and `blank - right`. A model that reads the image has a clearly positive wrong-image gap;
one that ignores it has a gap near 0 whatever its loss. Unlike accuracy on a few hundred generated answers
this is measured on every supervised token, so a short stage 1 already shows whether it reads (a stage-1
projector on its own: caption loss with the image is all there is to look at, and most of its fall is the
caption style, which any image gives). `--version` defaults to the template the checkpoint was trained with;
images go through the checkpoint's image processor (preprocessor_config.json), the pixels training used.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

BLANK_GREY = 0.5  # the flat image, as a fraction of the pixel range (what the demo's blank-image control uses)


def trained_template(model_path: str | Path) -> str | None:
    """The --version a checkpoint was trained with (drip_llava_args.json written by the trainer), if known."""
    args = Path(model_path) / "drip_llava_args.json"
    return json.loads(args.read_text())["model"]["version"] if args.is_file() else None


def blank_pil_image(size: tuple[int, int]):
    """The flat grey image of every blank-image control (this check, the demo's ScienceQA control)."""
    from PIL import Image

    return Image.new("RGB", size, (int(round(255 * BLANK_GREY)),) * 3)


def blank_image(processor) -> torch.Tensor:
    """A flat grey square image through the same image processor as the real images."""
    return processor(blank_pil_image((processor.image_size, processor.image_size)))


@torch.no_grad()
def image_use(model, dataset, collator, batch_size: int = 16, device: str | torch.device = "cpu") -> dict:
    """Summed answer loss over `dataset` under the three image conditions (see module doc)."""
    model.eval()
    n = len(dataset)
    if n < 2:
        raise ValueError("need at least 2 samples (the wrong image of a sample is another sample's)")
    blank = blank_image(dataset.image_loader.processor)
    totals = {"right": 0.0, "wrong": 0.0, "blank": 0.0}
    n_tokens, batch_gaps = 0, []
    for start in tqdm(range(0, n, batch_size), desc="image use", mininterval=2.0):
        idx = list(range(start, min(start + batch_size, n)))
        items = [dataset[i] for i in idx]
        if any(it["image"] is None for it in items):
            raise ValueError(f"samples {idx[0]}..{idx[-1]}: text-only sample in the data; image use needs images")
        batch = collator(items)
        # sample i gets sample i+1's image: the batch's own images shifted, plus the first of the next batch
        wrong = torch.stack([it["image"] for it in items[1:]] + [dataset[(idx[-1] + 1) % n]["image"]])
        images = {"right": batch["images"], "wrong": wrong, "blank": blank.expand_as(batch["images"]).clone()}
        k = int((batch["labels"][:, 1:] != -100).sum())
        losses = {}
        for tag, imgs in images.items():
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                        labels=batch["labels"].to(device), images=imgs.to(device=device, dtype=model.dtype))
            losses[tag] = float(out.loss)
            totals[tag] += losses[tag] * k
        batch_gaps.append(losses["wrong"] - losses["right"])
        n_tokens += k
    loss = {tag: v / n_tokens for tag, v in totals.items()}
    # spread of the gap between batches: a rough standard error, to tell a small gap from noise
    se = statistics.stdev(batch_gaps) / math.sqrt(len(batch_gaps)) if len(batch_gaps) > 1 else float("nan")
    return {"loss": loss, "gap_wrong": loss["wrong"] - loss["right"], "gap_wrong_se": se,
            "gap_blank": loss["blank"] - loss["right"], "samples": n, "tokens": n_tokens}


def main(argv=None) -> dict:
    from drip_llava.data.dataset import (
        DataCollatorForSupervisedDataset,
        ImageLoader,
        LazySupervisedDataset,
        load_llava_json,
    )
    from drip_llava.model.builder import load_pretrained_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True)
    p.add_argument("--model-base", default=None, help="the LLM, for projector-only or LoRA folders")
    p.add_argument("--data-path", required=True, help="LLaVA-format JSON with images (held-out conversations)")
    p.add_argument("--image-folder", required=True)
    p.add_argument("--version", default=None, help="conversation template (default: the checkpoint's own)")
    p.add_argument("--n", type=int, default=256, help="first N samples of the JSON")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--model-max-length", type=int, default=512)
    p.add_argument("--image-aspect-ratio", default=None, choices=("square", "pad"),
                   help="override the checkpoint's pad/square policy (default: its saved image processor)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    p.add_argument("--json", default=None, help="write the result here")
    args = p.parse_args(argv)

    version = args.version or trained_template(args.model_path)
    if version is None:
        raise SystemExit(f"{args.model_path}: no drip_llava_args.json to read the template from; pass --version")
    lm = load_pretrained_model(args.model_path, args.model_base, device=args.device,
                               torch_dtype=getattr(torch, args.dtype) if args.dtype else None)
    processor = lm.image_processor
    if args.image_aspect_ratio is not None:
        processor = processor.with_aspect_ratio(args.image_aspect_ratio)
    loader = ImageLoader(args.image_folder, processor)
    records = [r for r in load_llava_json(args.data_path) if r.get("image") is not None][: args.n]
    dataset = LazySupervisedDataset(records, lm.tokenizer, version, loader, args.model_max_length,
                                    skip_bad_samples=False)
    result = image_use(lm.model, dataset, DataCollatorForSupervisedDataset(pad_token_id=lm.tokenizer.pad_token_id),
                       args.batch_size, lm.model.device)
    result.update(model=str(args.model_path), data=str(args.data_path), version=version)
    loss = result["loss"]
    print(f"answer loss (nats/token) over {result['tokens']} tokens of {result['samples']} samples: right image "
          f"{loss['right']:.3f}, wrong image {loss['wrong']:.3f} (gap {result['gap_wrong']:+.3f} "
          f"+- {result['gap_wrong_se']:.3f}), blank "
          f"{loss['blank']:.3f} (gap {result['gap_blank']:+.3f})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
