"""MACs per image of DRIP / ViT presets: an analytic formula and torch's FlopCounterMode, side by side.

Why both: fvcore's counts on open_clip models (ViT-B/32 "2.96 GFLOPs", ViT-B/16 "11.33") miss the fused
attention of the ViT baselines (2.96 is MLP + patch embedding only; the full figure is ~4.41 GMACs). The
analytic count is the reference that trainers and reports log; the counted one checks it against the real module
graph.

Counted = FlopCounterMode FLOPs / 2, with SDPA forced onto its MATH backend (the fused CPU/GPU kernels are
not counted). Both counts cover matmuls, convolutions and einsums only: LayerNorm, GELU, softmax, the
segment-weight construction and other element-wise work are not counted (they are O(N*D), below 1%).

MACs per image (D width, H = mlp_ratio*D, N tokens incl. CLS, L patches, S segments, E embed dim):
  block(N)   = 4*N*D^2 (qkv + out proj) + 2*N*D*H (MLP) + 2*N^2*D (QK^T and AV)   [= 12*N*D^2 + 2*N^2*D at H=4D]
  ViT        = L*3*p^2*D + depth*block(1+L) + D*E
  DRIP       = L*3*p^2*D + n_pre*block(1+L) + (L*D*D_inner + L*D_inner) [predictor] + L*S*D [pooling]
               + n_short*block(1+S) + D*E
  other tower families (`config.family`): `FAMILY_MACS[family](config)`, each documented at its function;
  their token counts per block are fixed by the config in eval mode, so no `tokens_short` is taken (A-ViT's
  and DVT's depend on the image: the config's figure is at its reference counts / exit, which `counted_macs`
  forces).
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Optional, Sequence

import torch

from .config import DripVisionConfig, create_config, get_preset_config, list_presets

# logits written by the counting hook: far beyond any threshold in (0, 1) after the sigmoid
_FORCE_LOGIT = 30.0


def default_tokens_short(config: DripVisionConfig) -> int:
    """Segments per image at the preset's target rate (L for a plain ViT)."""
    L = config.num_patches
    if not config.is_drip:
        return L
    return max(1, min(L, int(round(L * config.target_rate))))


def block_macs(config: DripVisionConfig, n: float, n_mlp: Optional[float] = None) -> float:
    """One Block: attention (qkv + out projection + QK^T + AV) on n tokens, MLP on n_mlp (default n)."""
    D, H = config.hidden_size, int(config.hidden_size * config.mlp_ratio)
    n_mlp = n if n_mlp is None else n_mlp
    return 4 * n * D * D + 2 * n * n * D + 2 * n_mlp * D * H


def tome_macs(config) -> dict:
    """ToMe: per block, attention on the T tokens entering it, then the matching (ceil(T/2) x floor(T/2) cosine
    scores of the head-averaged keys, width D/heads) when it merges r > 0, then the MLP on T - r tokens."""
    c = config
    L, D = c.num_patches, c.hidden_size
    blocks = matching = 0
    for T, r in c.merge_schedule():
        blocks += block_macs(c, T, T - r)
        if r > 0:
            matching += ((T + 1) // 2) * (T // 2) * (D // c.num_heads)
    return {"patch_embed": L * 3 * c.patch_size ** 2 * D, "blocks": blocks, "matching": matching,
            "projection": D * c.embed_dim, "tokens_out": c.max_tokens}


def dynamicvit_macs(config) -> dict:
    """DynamicViT at inference: blocks on 1+N tokens, N = L until the first stage, then the stage's top-k count;
    each stage's predictor on the N tokens it scores: N*D*D (in_conv) + N*(D*D/2 + D/2*D/4 + D/4*2) (out_conv)."""
    c = config
    L, D, n_cls = c.num_patches, c.hidden_size, int(c.class_token)
    stage_keep = dict(zip(c.prune_locations, c.keep_counts()))
    N, blocks, predictors = L, 0, 0
    for i in range(c.depth):
        if i in stage_keep:
            predictors += N * D * D + N * (D * (D // 2) + (D // 2) * (D // 4) + (D // 4) * 2)
            N = stage_keep[i]
        blocks += block_macs(c, N + n_cls)
    return {"patch_embed": L * 3 * c.patch_size ** 2 * D, "blocks": blocks, "predictors": predictors,
            "projection": D * c.embed_dim, "tokens_out": c.max_tokens}


def avit_macs(config, tokens_per_block: Optional[Sequence[int]] = None) -> dict:
    """A-ViT at inference: block i on the tokens still running when it starts (CLS included); the halting
    neuron is element-wise (not counted). Token counts are per image: `tokens_per_block` (e.g. from an output's
    `token_depth`), by default `config.reference_tokens()` (patches halting as the target distribution says)."""
    c = config
    L, D = c.num_patches, c.hidden_size
    n = list(c.reference_tokens() if tokens_per_block is None else tokens_per_block)
    if len(n) != c.depth:
        raise ValueError(f"tokens_per_block needs one count per block ({c.depth}), got {len(n)}")
    return {"patch_embed": L * 3 * c.patch_size ** 2 * D, "blocks": sum(block_macs(c, t) for t in n),
            "projection": D * c.embed_dim, "tokens_out": c.max_tokens}


def dvt_exit_macs(config, num_classes: int = 0) -> list[dict]:
    """DVT: per exit k (not cumulative), the work of running exit k on an image: its patch embedding
    (g_k^2 patches of image_size/g_k px), depth blocks on 1 + g_k^2 tokens, its projection (every exit run computes
    its embedding), for k > 0 the reuse of exit k-1 (feature: per block an MLP D -> Fh -> Fd on exit k-1's g_{k-1}^2
    patch tokens + Fd -> mlp hidden on exit k's; relation: the 1x1 MLP C -> rC -> C, C = depth*heads, on
    exit k-1's (1 + g_{k-1}^2)^2 logit positions; resampling is pooling, not counted) and, with `num_classes`, the
    exit classifier (num_classes*E) that decides whether the image leaves (every exit but the last)."""
    c = config
    D, E, H = c.hidden_size, c.embed_dim, int(c.hidden_size * c.mlp_ratio)
    n_cls, tokens = int(c.class_token), c.exit_tokens()
    C = c.depth * c.num_heads
    out = []
    for k, L in enumerate(tokens):
        row = {"patch_embed": L * 3 * c.exit_patch_size(k) ** 2 * D, "blocks": c.depth * block_macs(c, L + n_cls),
               "feature_reuse": 0, "relation_reuse": 0, "projection": D * E,
               "classifier": num_classes * E if k < len(tokens) - 1 else 0}
        if k > 0 and c.feature_reuse:
            Fh, Fd = c.feature_reuse_hidden, c.feature_reuse_dim
            row["feature_reuse"] = c.depth * (tokens[k - 1] * (D * Fh + Fh * Fd) + L * Fd * H)
        if k > 0 and c.relation_reuse:
            row["relation_reuse"] = (tokens[k - 1] + n_cls) ** 2 * 2 * c.relation_reuse_ratio * C * C
        out.append(row)
    return out


def dvt_macs(config, exit: Optional[int] = None, num_classes: int = 0) -> dict:
    """DVT: MACs of an image that leaves at `exit` (default `config.reference_exit()`: the fixed exit, or the last
    one, the worst case, under the threshold policy): the sum over the exits it ran (`dvt_exit_macs`)."""
    k = config.reference_exit() if exit is None else exit
    rows = dvt_exit_macs(config, num_classes)[:k + 1]
    out = {key: sum(r[key] for r in rows) for key in rows[0]}
    out["tokens_out"] = config.exit_tokens()[k]
    return out


def dvt_cumulative_macs(config, num_classes: int = 0) -> list[float]:
    """[K] MACs of an image leaving at each exit (what `dvt.fit_exit_thresholds` takes)."""
    return [float(total_macs(dvt_macs(config, k, num_classes))) for k in range(config.num_exits)]


def total_macs(parts: dict):
    """The MACs of a family's per-part breakdown (its `tokens*` entries are counts, not MACs)."""
    return sum(v for k, v in parts.items() if not k.startswith("tokens"))


FAMILY_MACS = {"tome": tome_macs, "dynamicvit": dynamicvit_macs, "avit": avit_macs, "dvt": dvt_macs}


def macs_breakdown(config: DripVisionConfig, tokens_short: Optional[float] = None) -> dict:
    """Analytic MACs per image by stage (see module docstring). `tokens_short` may be a float (a mean)."""
    c = config
    if c.family != "drip":
        if tokens_short is not None:
            raise ValueError(f"family {c.family!r}: token counts come from the config, tokens_short must be None")
        if c.family not in FAMILY_MACS:
            raise KeyError(f"no MAC formula for family {c.family!r}; valid: drip, {', '.join(sorted(FAMILY_MACS))}")
        out = FAMILY_MACS[c.family](c)
        out["total"] = total_macs(out)
        return out
    L, D, n_cls = c.num_patches, c.hidden_size, int(c.class_token)
    H = int(D * c.mlp_ratio)

    def block(n):
        return 4 * n * D * D + 2 * n * D * H + 2 * n * n * D

    out = {"patch_embed": L * 3 * c.patch_size ** 2 * D, "projection": D * c.embed_dim}
    if not c.is_drip:
        if tokens_short is not None and tokens_short != L:
            raise ValueError(f"a plain ViT keeps every patch: tokens_short must be None or {L}, got {tokens_short}")
        out.update(blocks_pre=c.depth * block(L + n_cls), predictor=0, pooling=0, blocks_short=0)
        S = L
    else:
        S = default_tokens_short(c) if tokens_short is None else tokens_short
        if not 1 <= S <= L:
            raise ValueError(f"tokens_short must be in 1..{L}, got {S}")
        Di = int(D * c.predictor_ratio)
        out.update(blocks_pre=c.n_pre * block(L + n_cls), predictor=L * D * Di + L * Di, pooling=L * S * D,
                   blocks_short=c.n_short * block(S + n_cls))
    out["total"] = sum(out.values())
    out["tokens_pre"], out["tokens_short"] = L, S
    return out


def analytic_macs(config: DripVisionConfig, tokens_short: Optional[float] = None) -> float:
    """MACs per image; tokens_short defaults to round(L * target_rate) (L for a ViT)."""
    return float(macs_breakdown(config, tokens_short)["total"])


def training_macs(config: DripVisionConfig, tokens_short: Optional[float] = None) -> float:
    """MACs per image of a training forward. DynamicViT and A-ViT mask dropped / halted tokens instead of removing
    them (every block runs on every token; DynamicViT's predictors score all L patches) and DVT runs every exit, so
    they train at more than their inference figure; DRIP, the ViT and ToMe train on the tokens they infer on."""
    c = config
    if c.family == "dynamicvit":
        return analytic_macs(create_config({**c.to_dict(), "keep_rate": 1.0}))
    if c.family == "avit":
        return float(total_macs(avit_macs(c, [c.num_patches + int(c.class_token)] * c.depth)))
    if c.family == "dvt":
        return dvt_cumulative_macs(c)[-1]
    return analytic_macs(c, tokens_short)


def even_boundaries(num_patches: int, num_segments: int, batch: int = 1) -> torch.Tensor:
    """[batch, L] float boundaries with exactly `num_segments` segments of near-equal length (last patch = 1)."""
    if not 1 <= num_segments <= num_patches:
        raise ValueError(f"num_segments must be in 1..{num_patches}, got {num_segments}")
    b = torch.zeros(batch, num_patches)
    ends = [(k + 1) * num_patches // num_segments - 1 for k in range(num_segments)]
    b[:, ends] = 1.0
    return b


@contextmanager
def forced_boundaries(model, boundaries: torch.Tensor):
    """Make the boundary predictor's OUTPUT equal `boundaries` while its MLP still runs (and gets counted)."""
    pred = model.boundary_predictor
    if pred is None:
        raise ValueError("forced_boundaries needs a DRIP model (compression > 1)")

    def hook(module, args, logits):
        b = boundaries.to(device=logits.device, dtype=logits.dtype).expand_as(logits)
        return torch.where(b > 0.5, _FORCE_LOGIT, -_FORCE_LOGIT).to(logits.dtype)

    handle = pred.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _dummy_pixels(model, image_size: Optional[int]) -> torch.Tensor:
    size = model.config.image_size
    if image_size is not None and image_size != size:
        raise ValueError(f"model is built for image_size {size}, got {image_size} (build it with image_size=...)")
    p = next(model.parameters())
    return torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype)


def count_forward_macs(model, pixel_values: torch.Tensor, boundaries: Optional[torch.Tensor] = None):
    """(MACs of one eval forward of `pixel_values`, num_tokens) with FlopCounterMode and MATH SDPA.

    Per image only when the batch has no padding (use batch 1 for real boundaries)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            if boundaries is not None:
                with forced_boundaries(model, boundaries):
                    out = model(pixel_values)
            else:
                out = model(pixel_values)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / pixel_values.shape[0], out.num_tokens


def counted_macs(model, image_size: Optional[int] = None, tokens_short: Optional[int] = None) -> float:
    """MACs per image counted by FlopCounterMode, with exactly `tokens_short` segments (default: target rate).

    DRIP: the predictor runs for real, its output is replaced by evenly spread boundaries so the count uses
    the same S as `analytic_macs`. ViT: a plain forward (tokens_short must be None or L)."""
    c = model.config
    x = _dummy_pixels(model, image_size)
    if c.family != "drip":  # token counts are fixed by the config in eval mode (or forced to its reference)
        if tokens_short is not None:
            raise ValueError(f"family {c.family!r}: token counts come from the config, tokens_short must be None")
        with (model.reference_tokens() if hasattr(model, "reference_tokens") else nullcontext()):
            macs, _ = count_forward_macs(model, x)
        return float(macs)
    if not c.is_drip:
        if tokens_short is not None and tokens_short != c.num_patches:
            raise ValueError(f"a plain ViT keeps every patch: tokens_short must be None or {c.num_patches}")
        macs, _ = count_forward_macs(model, x)
        return float(macs)
    S = default_tokens_short(c) if tokens_short is None else int(tokens_short)
    macs, n = count_forward_macs(model, x, even_boundaries(c.num_patches, S))
    if int(n[0]) != S:
        raise RuntimeError(f"forced {S} segments but the model made {int(n[0])}")
    return float(macs)


def _load_pixels(model, specs: Sequence[str]) -> list[torch.Tensor]:
    from .images import load_image

    p = next(model.parameters())
    return [model.preprocess(load_image(s))[None].to(device=p.device, dtype=p.dtype) for s in specs]


def build_model(preset: str, image_size: Optional[int] = None, seed: int = 0):
    """A random-init model of a preset, of its family (MACs do not depend on weights; tokens on real images do)."""
    from .families import create_model

    torch.manual_seed(seed)
    overrides = {"image_size": image_size} if image_size else {}
    return create_model(preset, **overrides).eval()


def report(preset: str, image_size: Optional[int] = None, images: Sequence[str] = (),
           tokens_short: Optional[int] = None, model=None, seed: int = 0) -> dict:
    """One row: analytic and counted MACs per image (mean over `images` when given, with real boundaries)."""
    model = model if model is not None else build_model(preset, image_size, seed)
    c = model.config
    if c.family != "drip":
        if images or tokens_short is not None:
            raise ValueError(f"family {c.family!r}: --images / --tokens-short apply to DRIP only")
        breakdown = macs_breakdown(c)
        a, m, S = breakdown["total"], counted_macs(model), breakdown["tokens_out"]
    elif images:
        analytic, counted, tokens = [], [], []
        for x in _load_pixels(model, images):
            macs, n = count_forward_macs(model, x)
            S = int(n[0]) if c.is_drip else None
            analytic.append(analytic_macs(c, S))
            counted.append(macs)
            tokens.append(int(n[0]))
        a, m, S = (sum(v) / len(v) for v in (analytic, counted, tokens))
    else:
        S = tokens_short if tokens_short is not None else default_tokens_short(c)
        a = analytic_macs(c, S if c.is_drip else None)
        m = counted_macs(model, tokens_short=S if c.is_drip else None)
    vit = analytic_macs(DripVisionConfig(**{**c.to_dict(), "compression": 1.0, "family": "drip"}))
    return {
        "preset": preset, "image_size": c.image_size,
        "gmacs_analytic": a / 1e9, "gmacs_counted": m / 1e9, "rel_diff": abs(a - m) / m,
        "tokens_pre": c.num_patches, "tokens_short": S, "compression": c.num_patches / S,
        "target_compression": c.compression, "vit_gmacs": vit / 1e9, "macs_reduction_vs_vit": vit / a,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "source": "images" if images else "target_rate",
    }


def markdown_table(rows: Sequence[dict]) -> str:
    head = ("| preset | image | tokens pre | tokens short | compression | GMACs analytic | GMACs counted | diff "
            "| x fewer than ViT | params (M) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['image_size']} | {r['tokens_pre']} | {r['tokens_short']:g} | "
            f"{r['compression']:.2f} | {r['gmacs_analytic']:.3f} | {r['gmacs_counted']:.3f} | "
            f"{100 * r['rel_diff']:.2f}% | {r['macs_reduction_vs_vit']:.2f} | {r['params_m']:.1f} |")
    return "\n".join(lines)


def plot_gmacs_vs_compression(path: str, width_preset: str = "drip-b-{p}-{c}x", patches=(16, 32),
                              image_size: Optional[int] = None) -> Path:
    """GMACs per image against compression (1..10) for B width, patch 16 and 32; ViT as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rates = np.linspace(1, 10, 181)
    for i, p in enumerate(patches):
        color = f"C{i}"
        overrides = {"image_size": image_size} if image_size else {}
        cfg = get_preset_config(width_preset.format(p=p, c=2), **overrides)
        L = cfg.num_patches
        ax.plot(rates, [analytic_macs(cfg, L / r) / 1e9 for r in rates], color=color,  # S = L / rate
                label=f"DRIP-B/{p} ({cfg.n_pre} pre + {cfg.n_short} short)")
        for comp in (2, 4, 10):
            pc = get_preset_config(width_preset.format(p=p, c=comp), **overrides)
            g = analytic_macs(pc) / 1e9
            ax.plot([comp], [g], "o", color=color)
            ax.annotate(f"{g:.2f}", (comp, g), textcoords="offset points", xytext=(4, 6), fontsize=8)
        vit = analytic_macs(DripVisionConfig(**{**cfg.to_dict(), "compression": 1.0})) / 1e9
        ax.axhline(vit, color=color, ls="--", lw=1, label=f"ViT-B/{p}: {vit:.2f} GMACs")
    ax.set_xlabel("compression rate (patches per segment)")
    ax.set_ylabel("GMACs per image")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks([1, 2, 3, 5, 10, 20])
    ax.set_title(f"DRIP vs ViT, {cfg.image_size} px (analytic MACs; attention included)")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_ylim(top=60)
    ax.set_xlim(0.6, 10.9)
    ax.legend(fontsize=8, loc="upper right", ncol=2)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _preset_order(name: str):
    c = get_preset_config(name)
    return (c.hidden_size, -c.patch_size, c.compression)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m drip_llava.vision.flops", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", help=f"one of: {', '.join(list_presets(None))}")
    ap.add_argument("--all", action="store_true", help="table for every preset of every family")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--images", nargs="+", default=(), metavar="PATH",
                    help="image files or example:NAME; tokens_short = mean real segment count (eval mode)")
    ap.add_argument("--tokens-short", type=int, default=None, help="override S (default: round(L*target_rate))")
    ap.add_argument("--seed", type=int, default=0, help="init seed (matters only for real-image boundaries)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--plot", metavar="PNG", help="draw GMACs vs compression rate for patch 16 and 32")
    args = ap.parse_args(argv)
    if not (args.preset or args.all or args.plot):
        ap.error("give --preset NAME, --all, or --plot PNG")
    if args.preset and args.preset not in list_presets(None):
        ap.error(f"unknown preset {args.preset!r}; valid: {', '.join(list_presets(None))}")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    names = sorted(list_presets(None), key=_preset_order) if args.all else ([args.preset] if args.preset else [])
    rows = []
    if names:
        from tqdm import tqdm

        for name in tqdm(names, desc="flops", disable=len(names) == 1, file=sys.stderr):
            rows.append(report(name, args.image_size, args.images, args.tokens_short, seed=args.seed))
        if args.json:
            print(json.dumps(rows if args.all else rows[0], indent=2))
        else:
            print(markdown_table(rows))
    if args.plot:
        out = plot_gmacs_vs_compression(args.plot, image_size=args.image_size)
        print(f"wrote {out}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
