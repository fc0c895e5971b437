"""Visual tokens per image and prefill time of the LLM with different towers (plain ViT vs DRIP).

    python -m drip_demo.prefill_bench                      # embedded SmolLM2, tiny towers, 5 photos
    python -m drip_demo.prefill_bench --towers vit-b-16,drip-b-16-4x,DIR --repeats 5 --json out.json

Towers are presets (random weights) or DripVisionModel folders. A random boundary predictor fires on about
half the patches whatever its compression, so for presets the predictor's bias is calibrated on the bench
images to the preset's target rate (--no-calibrate keeps it raw); trained folders are used as they are.
Prefill = one forward of the spliced prompt with a fresh KV cache (batch 1), after the tower; the tower's
own time is reported apart. Medians over --repeats after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

DEFAULT_TOWERS = "vit-tiny-16,drip-tiny-16-4x,drip-tiny-16-10x"
DEFAULT_IMAGES = "astronaut,chelsea,coffee,rocket,camera"
DEFAULT_QUESTION = "Describe this image in detail. What objects are there and what colours do they have?"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llm", default=None, help="Llama-architecture LLM folder (default: the embedded SmolLM2)")
    p.add_argument("--towers", default=DEFAULT_TOWERS, help="comma-separated presets or DripVisionModel folders")
    p.add_argument("--images", default=DEFAULT_IMAGES, help="example photo names or image paths, comma-separated")
    p.add_argument("--question", default=DEFAULT_QUESTION)
    p.add_argument("--select-layer", type=int, default=-2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-calibrate", action="store_true", help="keep random predictors as they are")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="also write the rows here")
    return p.parse_args(argv)


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(args) -> list[dict]:
    from transformers import AutoTokenizer

    from drip_demo.embedded_llm import prepare_embedded_llm
    from drip_llava.constants import DEFAULT_IMAGE_TOKEN
    from drip_llava.data.conversation import tokenizer_image_token
    from drip_llava.model.llava_llama import DripLlavaForCausalLM
    from drip_llava.vision.calibrate import calibrate_boundary_bias
    from drip_llava.vision.images import load_image
    from drip_llava.vision.spec import load_drip_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    llm_dir = args.llm or str(prepare_embedded_llm())
    tok = AutoTokenizer.from_pretrained(llm_dir)
    model = DripLlavaForCausalLM.from_pretrained(llm_dir).to(device).eval()
    names = [s.strip() for s in args.images.split(",") if s.strip()]
    pil = [load_image(n if (":" in n or Path(n).exists()) else f"example:{n}") for n in names]
    messages = [{"role": "user", "content": f"{DEFAULT_IMAGE_TOKEN}\n{args.question}"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer_image_token(prompt, tok)], device=device)
    n_text = ids.shape[1] - 1

    rows = []
    for spec in [s.strip() for s in args.towers.split(",") if s.strip()]:
        drip = load_drip_model(spec)
        model.initialize_vision_modules(drip, "mlp2x_gelu", select_layer=args.select_layer)
        model.eval()
        tower = model.vision_tower
        pixels = torch.stack([tower.image_processor(im) for im in pil]).to(device)
        calibrated = not Path(spec).is_dir() and not args.no_calibrate and drip.boundary_predictor is not None
        if calibrated:
            calibrate_boundary_bias(drip, pixels.to(tower.dtype), mode="infer")
        counts = [t.shape[0] for t in model.encode_images(pixels)]
        tower_s, prefill_s = [], []
        for i in range(len(pil)):
            one = pixels[i:i + 1]
            tower_s.append(_median_time(lambda one=one: model.encode_images(one), args.repeats))
            embeds, mask, pos, _ = model.prepare_inputs_labels_for_multimodal(ids, None, None, one)
            prefill_s.append(_median_time(lambda e=embeds, m=mask, p=pos: model(
                inputs_embeds=e, attention_mask=m, position_ids=p, use_cache=True, logits_to_keep=1), args.repeats))
        c = drip.config
        rows.append({
            "tower": spec, "compression": c.compression, "patches": c.num_patches,
            "visual_tokens_mean": statistics.mean(counts), "visual_tokens_min": min(counts),
            "visual_tokens_max": max(counts), "text_tokens": n_text,
            "tower_ms": 1000 * statistics.median(tower_s), "prefill_ms": 1000 * statistics.median(prefill_s),
            "calibrated": calibrated, "llm": llm_dir, "threads": torch.get_num_threads(), "device": str(device),
        })
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'tower':<22} {'compr':>5} {'patches':>7} {'vis tok mean [min-max]':>22} {'text':>5} " \
           f"{'tower ms':>9} {'prefill ms':>10} {'vs first':>8}"
    lines = [head, "-" * len(head)]
    base = rows[0]["prefill_ms"] if rows else 1.0
    for r in rows:
        toks = f"{r['visual_tokens_mean']:.1f} [{r['visual_tokens_min']}-{r['visual_tokens_max']}]"
        lines.append(f"{r['tower']:<22} {r['compression']:>5.1f} {r['patches']:>7} {toks:>22} {r['text_tokens']:>5} "
                     f"{r['tower_ms']:>9.1f} {r['prefill_ms']:>10.1f} {r['prefill_ms'] / base:>7.2f}x")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    rows = run(args)
    print(format_table(rows))
    if rows:
        print(f"LLM: {rows[0]['llm']}  threads: {rows[0]['threads']}  device: {rows[0]['device']}  "
              f"calibrated random predictors: {any(r['calibrated'] for r in rows)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
