"""Pictures of DRIP's segments: each segment (a run of patches in raster order) gets one translucent colour,
borders are drawn between neighbouring patches of different segments, and the token count goes in the title.
Other tower families are drawn from their `patch_token` map the same way: ToMe's merged groups each get a colour,
and patches a family dropped (DynamicViT) are darkened. A-ViT is drawn as a heat map of each patch's halting depth,
DVT as the token grid of the exit the image took (the title names the exit).

Eval mode only: the config's deterministic boundary rule (`eval_boundaries`; by default "expected", the
round(sum sigmoid) highest-logit patches of each image; "threshold", sigmoid > threshold), no Gumbel noise, so
the same image always gives the same picture.
"""
from __future__ import annotations

import argparse
import colorsys
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from .config import list_presets

DISPLAY_MIN_SIZE = 448  # tiny presets (128 px) are upscaled so borders stay readable


def load_model(spec: str, seed: int = 0, device: Optional[str] = None):
    """A tower of its config's family from a saved folder (config.json + model.safetensors) or a preset name
    (random init)."""
    from .families import create_model, from_pretrained

    path = Path(spec)
    if path.is_dir():
        model = from_pretrained(path)
    elif spec in list_presets(None):
        torch.manual_seed(seed)
        model = create_model(spec)
    else:
        raise FileNotFoundError(f"--model {spec!r} is neither a model folder nor a preset "
                                f"({', '.join(list_presets(None))})")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(dev).eval()


def model_view(model, pil_image: Image.Image) -> Image.Image:
    """The PIL image the model sees (resize + crop of `model.preprocess`, before ToTensor/normalise)."""
    transforms = getattr(model.preprocess, "transforms", None)
    if transforms is None:
        raise TypeError("model.preprocess is expected to be a torchvision Compose")
    view = pil_image
    for t in transforms:
        nxt = t(view)
        if not isinstance(nxt, Image.Image):
            break
        view = nxt
    return view.convert("RGB")


@torch.no_grad()
def segment_labels(model, pil_image: Image.Image) -> tuple[np.ndarray, int]:
    """(labels [g, g] int: segment / output token of every patch in raster order, -1 = dropped; num_tokens),
    in eval mode."""
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        x = model.preprocess(pil_image)[None].to(device=p.device, dtype=p.dtype)
        out = model.forward_features(x)
    finally:
        model.train(was_training)
    if out.boundaries is not None:
        b = out.boundaries[0].float()
        seg = (torch.cumsum(b, 0) - b).round().long().cpu().numpy()  # exclusive cumsum = segment id
    else:  # other families: the token each patch ended in (merged patches share one)
        seg = out.patch_token[0].cpu().numpy()
    g = model.config.grid_size
    return seg.reshape(g, g), int(out.num_tokens[0])


def segment_colours(n: int) -> np.ndarray:
    """[n, 3] uint8, golden-ratio hue steps so consecutive segments never look alike."""
    return np.array([[int(255 * v) for v in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95)]
                     for i in range(n)], dtype=np.uint8)


def draw_segments(view: Image.Image, labels: np.ndarray, alpha: float = 0.4,
                  border=(255, 255, 255)) -> Image.Image:
    """Colour overlay (one colour per label, black for label -1 = dropped) + borders between patches with
    different labels."""
    g = labels.shape[0]
    scale = max(1, math.ceil(DISPLAY_MIN_SIZE / view.width))
    size = view.width * scale
    base = view.resize((size, size), Image.BICUBIC) if scale > 1 else view.copy()
    cell = size / g
    colours = np.concatenate([segment_colours(int(labels.max()) + 1), np.zeros((1, 3), np.uint8)])
    overlay = Image.fromarray(colours[labels]).resize((size, size), Image.NEAREST)  # -1 picks the black row
    out = Image.blend(base, overlay, alpha)
    draw = ImageDraw.Draw(out)
    width = max(1, round(cell / 12))
    for r in range(g):
        for c in range(g):
            x0, y0, x1, y1 = c * cell, r * cell, (c + 1) * cell, (r + 1) * cell
            if c + 1 < g and labels[r, c] != labels[r, c + 1]:
                draw.line([(x1, y0), (x1, y1)], fill=border, width=width)
            if r + 1 < g and labels[r, c] != labels[r + 1, c]:
                draw.line([(x0, y1), (x1, y1)], fill=border, width=width)
    return out


@torch.no_grad()
def depth_overlay(model, pil_image: Image.Image, alpha: float = 0.5) -> tuple[Image.Image, int]:
    """(heat map of each patch's depth, `patch_depth`: blocks run before it halted (A-ViT), dark = few, bright =
    every block, on the model's view of the image; number of tokens), in eval mode."""
    from matplotlib import colormaps

    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        out = model.forward_features(model.preprocess(pil_image)[None].to(device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
    g, depth = model.config.grid_size, model.config.depth
    d = out.patch_depth[0].float().cpu().numpy().reshape(g, g)
    heat = (colormaps["viridis"]((d - 1) / max(1, depth - 1))[..., :3] * 255).astype(np.uint8)
    view = model_view(model, pil_image)
    size = view.width * max(1, math.ceil(DISPLAY_MIN_SIZE / view.width))
    base = view.resize((size, size), Image.BICUBIC)
    return Image.blend(base, Image.fromarray(heat).resize((size, size), Image.NEAREST), alpha), int(out.num_tokens[0])


def segment_overlay(model, pil_image: Image.Image) -> tuple[Image.Image, int]:
    """(picture of the segments on the model's view of the image, number of tokens). Used by the Gradio app.
    A-ViT towers (nothing merged or pooled, tokens halt) get their depth heat map (`depth_overlay`); DVT towers the
    grid of the exit the image took, one colour per token of that exit."""
    if model.config.family == "avit":
        return depth_overlay(model, pil_image)
    if model.config.family == "dvt":  # an exit's tokens are its own g x g grid, not groups of the last exit's patches
        _, n = segment_labels(model, pil_image)
        g = math.isqrt(n)
        return draw_segments(model_view(model, pil_image), np.arange(n).reshape(g, g)), n
    labels, n = segment_labels(model, pil_image)
    if int(labels.max()) + 1 != n:
        raise RuntimeError(f"segment ids ({int(labels.max()) + 1}) disagree with num_tokens ({n})")
    return draw_segments(model_view(model, pil_image), labels), n


def calibrate_on_images(model, images: Sequence[Image.Image]) -> float:
    """Random-init presets only: set the predictor bias so these images get the config's target boundary rate."""
    from .calibrate import calibrate_boundary_bias

    p = next(model.parameters())
    x = torch.stack([model.preprocess(im) for im in images]).to(device=p.device, dtype=p.dtype)
    return calibrate_boundary_bias(model, x, mode="infer")


def render_figure(model, images: Sequence[Image.Image], names: Sequence[str], out: str, cols: Optional[int] = None,
                  title: Optional[str] = None) -> tuple[Path, list[int]]:
    """Grid of overlays, one per image, titles with the token count; returns (path, counts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = max(1, min(cols or min(n, 3), n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.5 * rows), squeeze=False)
    counts = []
    for ax, im, name in zip(axes.flat, images, names):
        pic, k = segment_overlay(model, im)
        counts.append(k)
        ax.imshow(pic)
        ax.set_title(overlay_title(model, name, k), fontsize=10)
    return _save_figure(fig, axes, out, title), counts


def render_towers(models: dict, images: Sequence[Image.Image], names: Sequence[str], out: str,
                  title: Optional[str] = None) -> tuple[Path, dict]:
    """One row per tower (name -> model), one column per image: what each method did to the same images.
    Returns (path, name -> token counts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(models), len(images)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.7 * rows), squeeze=False)
    counts = {}
    for row, (tower, model) in zip(axes, models.items()):
        counts[tower] = []
        for ax, im, name in zip(row, images, names):
            pic, k = segment_overlay(model, im)
            counts[tower].append(k)
            ax.imshow(pic)
            ax.set_title(f"{tower}\n{overlay_title(model, name, k)}", fontsize=8)
    return _save_figure(fig, axes, out, title), counts


def overlay_title(model, name: str, k: int) -> str:
    """'name: [exit e, ]k tokens / L patches (ratio)' for one overlay."""
    L = model.config.num_patches
    exit_note = f"exit {model.config.exit_tokens().index(k)}, " if model.config.family == "dvt" else ""
    return f"{name}: {exit_note}{k} tokens / {L} patches ({L / k:.1f}x)"


def _save_figure(fig, axes, out: str, title: Optional[str]) -> Path:
    import matplotlib.pyplot as plt

    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.98) if title else None)  # the title above the panels' own
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m drip_llava.vision.visualize", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="model folder (save_pretrained) or preset name (random init)")
    ap.add_argument("--image", action="append", required=True,
                    help="image path or example:NAME (astronaut, chelsea, coffee, rocket, camera, grace_hopper); "
                         "repeat")
    ap.add_argument("--out", required=True, help="output PNG")
    ap.add_argument("--cols", type=int, default=None, help="grid columns (default: up to 3)")
    ap.add_argument("--seed", type=int, default=0, help="init seed for a preset")
    ap.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=None,
                    help="set the predictor bias so the images get the target rate (default: on for presets)")
    ap.add_argument("--device", default=None)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    from .images import image_label, load_image

    args = parse_args(argv)
    model = load_model(args.model, args.seed, args.device)
    images = [load_image(s) for s in args.image]
    names = [image_label(s) for s in args.image]
    calibrate = args.calibrate if args.calibrate is not None else not Path(args.model).is_dir()
    if calibrate and model.config.is_drip:
        calibrate_on_images(model, images)
    title = f"{args.model}" + (" (random init, calibrated to the target rate)" if calibrate and model.config.is_drip
                               else "")
    path, counts = render_figure(model, images, names, args.out, args.cols, title)
    for name, k in zip(names, counts):
        print(f"{name}: {k} tokens")
    print(f"wrote {path}", file=sys.stderr)
    return {"out": str(path), "num_tokens": counts}


if __name__ == "__main__":
    main()
