"""Calibrate a random-init boundary predictor to its target rate.

A boundary predictor with random weights does not produce the target boundary rate, so benchmarks, boundary
pictures of untrained towers and tests set the predictor's last bias so a batch gets the intended number of
segments: under the config's eval rule ("threshold" or "expected" count) for inference, or the expected
Gumbel-Sigmoid count for training.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .flops import default_tokens_short

MODES = ("infer", "train")


def _predictor_bias(model) -> torch.nn.Parameter:
    linears = [m for m in model.boundary_predictor.modules() if isinstance(m, torch.nn.Linear)]
    if not linears or linears[-1].bias is None or linears[-1].out_features != 1:
        raise ValueError("boundary predictor has no final Linear(., 1) with a bias to calibrate")
    return linears[-1].bias


@torch.no_grad()
def _bias_free_logits(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Predictor logits on the batch minus the current final bias, [B, L] fp32 (eval mode, deterministic)."""
    captured = {}
    handle = model.boundary_predictor.register_forward_hook(lambda m, a, out: captured.setdefault("z", out))
    was_training = model.training
    model.eval()
    try:
        model.forward_features(pixel_values)
    finally:
        handle.remove()
        model.train(was_training)
    return captured["z"].float() - _predictor_bias(model).float()


def calibrate_boundary_bias(model, pixel_values: torch.Tensor, mode: str = "infer",
                            tokens_short: Optional[float] = None) -> float:
    """Set the predictor's last bias so the batch has `tokens_short` segments per image on average.

    infer: the eval rule of the config (`eval_boundaries`): "threshold" counts sigmoid(logit) > threshold
    (solved exactly by sorting); "expected" keeps round(sum sigmoid(logit)) patches per image (bisection).
    train: expected count under Gumbel-Sigmoid, P(boundary) = sigmoid(logit - temperature * logit(threshold)),
    solved by bisection. The last patch is always a boundary, so the other L-1 positions must supply
    tokens_short - 1 per image. Returns the new bias. A plain ViT (no predictor) is left untouched (nan).
    """
    if model.boundary_predictor is None:
        return float("nan")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    c = model.config
    y = _bias_free_logits(model, pixel_values)[:, :-1].double()  # the last patch is forced anyway
    B, Lm1 = y.shape
    S = default_tokens_short(c) if tokens_short is None else tokens_short
    k = max(0, min(B * Lm1, int(round(B * (S - 1)))))  # boundaries wanted on the free positions
    thr_logit = math.log(c.boundary_threshold / (1 - c.boundary_threshold))
    rule = "gumbel" if mode == "train" else getattr(c, "eval_boundaries", "threshold")
    if rule == "threshold":
        v = torch.sort(y.flatten(), descending=True).values
        if k == 0:
            cut = float(v[0]) + 1.0
        elif k == v.numel():
            cut = float(v[-1]) - 1.0
        else:
            cut = float(v[k - 1] + v[k]) / 2  # boundary iff y + bias > thr_logit iff y > cut
        bias = thr_logit - cut
    else:
        if rule == "gumbel":
            def count(b):
                return float(torch.sigmoid(y + b - c.boundary_temperature * thr_logit).sum())
        else:  # "expected": per image round(sum sigmoid(logit)) boundaries
            def count(b):
                return float(torch.sigmoid(y + b).sum(dim=1).round().sum())
        lo, hi = -60.0 - float(y.max()), 60.0 - float(y.min())
        for _ in range(100):
            mid = (lo + hi) / 2
            if count(mid) < k:
                lo = mid
            else:
                hi = mid
        bias = (lo + hi) / 2
    with torch.no_grad():
        _predictor_bias(model).fill_(bias)
    return bias
