"""What the visual tokens cost: tokens per image, vision and LLM-prefill compute, time to first token.

    python -m drip_llava.eval.efficiency --model-path checkpoints/vit --model-path-b checkpoints/drip-10x \\
        --images DIR [--max-images 50] [--json report.json]

For each model (side by side when --model-path-b is given), over the same images (a folder, or "examples"
for the offline photos):
  visual tokens per image   the real count the LLM reads (mean / min / max)
  vision GMACs per image    analytic MACs of the tower's forward up to the block the LLM reads
                            (drip_llava.vision.flops.macs_breakdown with the image's own segment count, without
                            the later blocks and the unused projection head) + the projector
  LLM prefill GMACs         analytic, counted per layer from the LLM config: q/k/v/o and MLP matmuls for
                            every prompt token, attention scores and weighted sum as a full n x n product
                            (a causal kernel may skip about half of those), lm_head for the last position only
                            (generate's prefill computes one row of logits). Matmuls only, like the vision count.
  time to first token       measured: image preprocessing + tower + projector + prefill + first token, through
                            the same engine as the chat demo; medians after one warm-up; the vision / prefill
                            split is reported too.
MACs, not FLOPs (1 MAC = 2 FLOPs). The tower sweep (ViT vs DRIP towers in front of one LLM, with training
throughput) is drip_llava.eval.payoff, over these same functions.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path
from typing import Optional

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_QUESTION = "Describe this image in detail."


def llm_prefill_macs(config, n_tokens: int, logits_rows: int = 1) -> float:
    """MACs of one prefill forward of a Llama-style decoder over `n_tokens` (see module doc)."""
    D = config.hidden_size
    H = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or H
    hd = getattr(config, "head_dim", None) or D // H
    inter = config.intermediate_size
    n = int(n_tokens)
    proj = n * D * (H * hd) + 2 * n * D * (kv * hd) + n * (H * hd) * D
    mlp = 3 * n * D * inter
    attn = 2 * n * n * H * hd
    return float(config.num_hidden_layers * (proj + mlp + attn) + logits_rows * D * config.vocab_size)


def projector_macs_per_token(projector) -> float:
    import torch

    return float(sum(m.in_features * m.out_features for m in projector.modules() if isinstance(m, torch.nn.Linear)))


def vision_macs(tower_config, n_tokens: int, layer_index: Optional[int] = None) -> float:
    """Tower forward MACs for one image with `n_tokens` segments (L for a plain ViT), without the projection
    head (LLaVA reads hidden states, never the pooled embedding). `layer_index` (DripVisionTower.layer_index):
    the tower stops after that many blocks (select layer -2 skips the last one), so later blocks are not counted;
    None counts every block (other tower families are always counted whole)."""
    from drip_llava.vision.flops import macs_breakdown

    c = tower_config
    b = macs_breakdown(c, n_tokens if c.is_drip else None)
    total = float(b["total"] - b["projection"])
    if layer_index is not None and c.family == "drip" and layer_index < c.depth:
        # the skipped blocks are after pooling for DRIP (the tower refuses a layer before it)
        per_block = b["blocks_short"] / c.n_short if c.is_drip else b["blocks_pre"] / c.depth
        total -= (c.depth - layer_index) * per_block
    return total


def list_images(spec: str, max_images: Optional[int]) -> list[tuple[str, object]]:
    """[(name, path or PIL image)] from a folder (sorted), "examples" (the offline photos), or a comma-separated
    list of example photo names and image paths."""
    from drip_llava.vision.images import example_image, list_examples

    if spec == "examples":
        items = [(n, example_image(n)) for n in list_examples()]
    elif "," in spec or spec in list_examples() or Path(spec).is_file():
        items = []
        for part in (s.strip() for s in spec.split(",") if s.strip()):
            if Path(part).is_file():
                items.append((Path(part).name, Path(part)))
            elif part in list_examples():
                items.append((part, example_image(part)))
            else:
                raise FileNotFoundError(f"--images: {part!r} is neither an image file nor an example photo "
                                        f"({', '.join(list_examples())})")
    else:
        folder = Path(spec)
        if not folder.is_dir():
            raise FileNotFoundError(f"--images {spec}: not a folder (or use 'examples')")
        items = [(p.name, p) for p in sorted(folder.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        if not items:
            raise FileNotFoundError(f"--images {spec}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return items[:max_images] if max_images else items


def measure_model(model_path: str, images: list, question: str, model_base: Optional[str] = None,
                  conv_mode: Optional[str] = None, device: Optional[str] = None, repeats: int = 1,
                  load_4bit: bool = False, load_8bit: bool = False) -> dict:
    from drip_llava.inference import ChatEngine

    engine = ChatEngine.from_pretrained(model_path, model_base=model_base, conv_mode=conv_mode, device=device,
                                        load_4bit=load_4bit, load_8bit=load_8bit)
    summary = measure_engine(engine, images, question, repeats=repeats, name=Path(model_path).name)
    summary.update(model_path=str(model_path), kind=engine.loaded.kind)
    del engine
    gc.collect()
    return summary


def measure_engine(engine, images: list, question: str, repeats: int = 1, name: str = "", clock=None) -> dict:
    """Tokens, analytic MACs and measured TTFT of one loaded model over `images` (see module doc): the summary and
    its per-image rows. `clock` (optional, e.g. payoff.LayerClock) is reset before each timed reply and read
    after it: `layers_ms` per image, the time spent inside the LLM's decoder layers during the prefill."""
    from tqdm import tqdm

    from drip_llava.inference import GenerationSettings, ImageRejected

    settings = GenerationSettings(temperature=0.0, max_new_tokens=1)
    messages = [{"role": "user", "content": question}]
    tower_cfg = engine.tower.config
    proj_per_token = projector_macs_per_token(engine.inner.mm_projector)
    rows, skipped = [], []
    warmed = False
    for img_name, src in tqdm(images, desc=f"efficiency {name}", dynamic_ncols=True):
        try:
            image, _ = engine.load_image(src, name=img_name)
        except ImageRejected as e:
            skipped.append({"image": img_name, "reason": str(e)})
            continue
        if not warmed:
            engine.generate(messages, image, settings)
            warmed = True
        replies, layer_ms = [], []
        for _ in range(max(1, repeats)):
            if clock is not None:
                clock.reset()
            replies.append(engine.generate(messages, image, settings))
            if clock is not None:
                layer_ms.append(1000 * clock.seconds)
        r = replies[0]
        n = r.visual_tokens
        rows.append({
            "image": img_name, "visual_tokens": n, "prompt_tokens": r.prompt_tokens,
            "vision_gmacs": (vision_macs(tower_cfg, n, engine.tower.layer_index) + n * proj_per_token) / 1e9,
            "prefill_gmacs": llm_prefill_macs(engine.inner.config, r.prompt_tokens) / 1e9,
            "ttft_ms": statistics.median(x.ttft_ms for x in replies),
            "vision_ms": statistics.median(x.vision_ms for x in replies),
            "prefill_ms": statistics.median(x.prefill_ms for x in replies),
            **({"layers_ms": statistics.median(layer_ms)} if layer_ms else {}),
        })
    if not rows:
        raise ValueError(f"{name}: no usable image ({len(skipped)} skipped: {skipped[:3]})")
    tokens = [x["visual_tokens"] for x in rows]

    def mean(key):
        return statistics.mean(x[key] for x in rows)

    summary = {
        "model_path": name, "conv_mode": engine.conv_mode,
        "tower": "DRIP" if tower_cfg.is_drip else "ViT", "compression": tower_cfg.compression,
        "image_size": tower_cfg.image_size, "patches": tower_cfg.num_patches,
        "images": len(rows), "skipped": skipped,
        "visual_tokens_mean": statistics.mean(tokens), "visual_tokens_min": min(tokens),
        "visual_tokens_max": max(tokens), "prompt_tokens_mean": mean("prompt_tokens"),
        "vision_gmacs_mean": mean("vision_gmacs"), "prefill_gmacs_mean": mean("prefill_gmacs"),
        "ttft_ms_median": statistics.median(x["ttft_ms"] for x in rows),
        "vision_ms_median": statistics.median(x["vision_ms"] for x in rows),
        "prefill_ms_median": statistics.median(x["prefill_ms"] for x in rows),
        "device": str(engine.device), "per_image": rows,
    }
    if clock is not None:
        summary["layers_ms_median"] = statistics.median(x["layers_ms"] for x in rows)
    return summary


ROWS = [("visual tokens / image (mean)", "visual_tokens_mean", "{:.1f}"),
        ("visual tokens min", "visual_tokens_min", "{}"),
        ("visual tokens max", "visual_tokens_max", "{}"),
        ("LLM prompt tokens (mean)", "prompt_tokens_mean", "{:.1f}"),
        ("vision GMACs / image", "vision_gmacs_mean", "{:.4f}"),
        ("LLM prefill GMACs / image", "prefill_gmacs_mean", "{:.4f}"),
        ("time to first token, ms (median)", "ttft_ms_median", "{:.1f}"),
        ("  of which vision, ms", "vision_ms_median", "{:.1f}"),
        ("  of which prefill, ms", "prefill_ms_median", "{:.1f}")]


def format_table(results: list[dict]) -> str:
    names = [Path(r["model_path"]).name for r in results]
    width = max(12, *(len(n) for n in names))
    head = f"{'':<34}" + "".join(f"{n:>{width + 2}}" for n in names) + ("   B/A" if len(results) == 2 else "")
    lines = [head, "-" * len(head)]
    desc = "".join(f"{(r['tower'] + ' ' + format(r['compression'], 'g') + 'x'):>{width + 2}}" for r in results)
    lines.append(f"{'tower':<34}{desc}")
    for label, key, fmt in ROWS:
        line = f"{label:<34}" + "".join(f"{fmt.format(r[key]):>{width + 2}}" for r in results)
        if len(results) == 2 and results[0][key]:
            line += f"  {results[1][key] / results[0][key]:5.2f}"
        lines.append(line)
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m drip_llava.eval.efficiency", description=__doc__.split("\n")[0])
    p.add_argument("--model-path", required=True, help="model A")
    p.add_argument("--model-path-b", default=None, help="model B, reported side by side")
    p.add_argument("--model-base", default=None, help="base LLM of model A (LoRA / projector checkpoints)")
    p.add_argument("--model-base-b", default=None, help="base LLM of model B (default: --model-base)")
    p.add_argument("--images", required=True, help="folder of images, or 'examples' (offline photos)")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--question", default=DEFAULT_QUESTION)
    p.add_argument("--conv-mode", default=None)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per image (median)")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--load-4bit", action="store_true")
    p.add_argument("--load-8bit", action="store_true")
    p.add_argument("--json", default=None, help="write the full report (with per-image rows) here")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    images = list_images(args.images, args.max_images)
    specs = [(args.model_path, args.model_base)]
    if args.model_path_b:
        specs.append((args.model_path_b, args.model_base_b or args.model_base))
    results = [measure_model(path, images, args.question, model_base=base, conv_mode=args.conv_mode,
                             device=args.device, repeats=args.repeats, load_4bit=args.load_4bit,
                             load_8bit=args.load_8bit) for path, base in specs]
    print(format_table(results))
    print(f"{results[0]['images']} images from {args.images}; device {results[0]['device']}, "
          f"{torch.get_num_threads()} threads. MACs are analytic (matmuls only; 1 MAC = 2 FLOPs).")
    for r in results:
        if r["skipped"]:
            print(f"{r['model_path']}: skipped {len(r['skipped'])} images: {r['skipped'][:3]}", file=sys.stderr)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"question": args.question, "images": args.images,
                                               "threads": torch.get_num_threads(), "models": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
