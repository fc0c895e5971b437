"""Projectors from the vision tower's width (mm_hidden_size) to the LLM's width (hidden_size).

A registry keyed by exact name plus patterns (`mlp{N}x_gelu`, LLaVA's semantics: Linear, then (GELU, Linear)
x (N-1)). Projector weights travel as `mm_projector.safetensors`; the file records the widths it was trained
for, so loading it next to another tower fails with both widths named (LLaVA's "mm_hidden_size mismatch").
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ProjectorFactory = Callable[[int, int], nn.Module]

PROJECTORS: dict[str, ProjectorFactory] = {}
# (regex, human-readable form, factory taking the match first)
_PATTERN_PROJECTORS: list[tuple[re.Pattern, str, Callable[..., nn.Module]]] = []

PROJECTOR_FILE = "mm_projector.safetensors"


def register_projector(name: str):
    """Decorator registering `factory(mm_hidden_size, hidden_size) -> nn.Module` under an exact name."""

    def deco(factory: ProjectorFactory) -> ProjectorFactory:
        if name in PROJECTORS:
            raise ValueError(f"projector {name!r} is already registered")
        PROJECTORS[name] = factory
        return factory

    return deco


def register_projector_pattern(pattern: str, display: str):
    """Decorator for a family of kinds: `factory(match, mm_hidden_size, hidden_size)`."""

    def deco(factory):
        _PATTERN_PROJECTORS.append((re.compile(pattern), display, factory))
        return factory

    return deco


def list_projectors() -> list[str]:
    return sorted(PROJECTORS) + [display for _, display, _ in _PATTERN_PROJECTORS]


class IdentityProjector(nn.Module):
    """No parameters: the tower's features go to the LLM as they are (widths must agree)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@register_projector("linear")
def _linear(mm_hidden_size: int, hidden_size: int) -> nn.Module:
    return nn.Linear(mm_hidden_size, hidden_size)


@register_projector("identity")
def _identity(mm_hidden_size: int, hidden_size: int) -> nn.Module:
    if mm_hidden_size != hidden_size:
        raise ValueError(f"projector 'identity' needs equal widths, got vision {mm_hidden_size} vs LLM {hidden_size}")
    return IdentityProjector()


# A fresh MLP projector's output layer starts at this fraction of PyTorch's default init. With the default, the
# visual tokens of our tiny DRIP tower came out ~3x the norm of SmolLM2's word embeddings (8.9 vs 3.2), and a short
# stage 1 (40 steps, batch 8, lr 1e-2) ended at caption loss ~3.6; at 0.3 the tokens start near the embedding
# scale and the same run ends at ~2.7. (Output layers started small are the GPT-2 / adapter convention.)
MLP_OUT_INIT_SCALE = 0.3


@register_projector_pattern(r"^mlp(\d+)x_gelu$", "mlp{N}x_gelu")
def _mlp_gelu(match: re.Match, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    depth = int(match.group(1))
    if depth < 1:
        raise ValueError(f"mlp{depth}x_gelu: N must be >= 1")
    layers: list[nn.Module] = [nn.Linear(mm_hidden_size, hidden_size)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(hidden_size, hidden_size)]
    with torch.no_grad():
        layers[-1].weight.mul_(MLP_OUT_INIT_SCALE)
        layers[-1].bias.mul_(MLP_OUT_INIT_SCALE)
    return nn.Sequential(*layers)  # keys 0.weight, 2.weight, ... as in LLaVA's checkpoints


def build_projector(kind: str, mm_hidden_size: int, hidden_size: int) -> nn.Module:
    """Build the projector registered as `kind` (exact name or pattern); unknown kinds list the valid ones."""
    if kind in PROJECTORS:
        return PROJECTORS[kind](mm_hidden_size, hidden_size)
    for regex, _, factory in _PATTERN_PROJECTORS:
        m = regex.match(kind)
        if m:
            return factory(m, mm_hidden_size, hidden_size)
    raise ValueError(f"unknown projector type {kind!r}; valid: {', '.join(list_projectors())}")


# ---------------------------------------------------------------------------------------------- files

def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept keys as saved by us ("0.weight") or by LLaVA / a full state dict ("model.mm_projector.0.weight")."""
    if any("mm_projector." in k for k in state):
        return {k.split("mm_projector.", 1)[1]: v for k, v in state.items() if "mm_projector." in k}
    return dict(state)


def save_projector(projector: nn.Module, path: str | os.PathLike, *, kind: str, mm_hidden_size: int,
                   hidden_size: int, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `mm_projector.safetensors` (keys relative to the projector) with the widths as metadata.
    Pass `state_dict` when the parameters are gathered elsewhere (ZeRO-3)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir() or path.suffix != ".safetensors":
        path = path / PROJECTOR_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    state = state_dict if state_dict is not None else projector.state_dict()
    state = {k: v.detach().cpu().contiguous() for k, v in _strip_prefix(state).items()}
    meta = {"mm_projector_type": kind, "mm_hidden_size": str(mm_hidden_size), "hidden_size": str(hidden_size)}
    save_file(state, str(path), metadata=meta)
    return path


def load_projector_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read projector weights (+ metadata) from mm_projector.safetensors, or LLaVA's mm_projector.bin
    (loaded with weights_only=True). A folder means the file inside it."""
    path = Path(path)
    if path.is_dir():
        cand = [path / PROJECTOR_FILE, path / "mm_projector.bin"]
        found = [c for c in cand if c.is_file()]
        if not found:
            raise FileNotFoundError(f"no {PROJECTOR_FILE} or mm_projector.bin in {path} (found: "
                                    f"{sorted(p.name for p in path.iterdir())})")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"projector file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    else:
        state, meta = torch.load(path, map_location="cpu", weights_only=True), {}
    meta["path"] = str(path)
    return _strip_prefix(state), meta


def check_projector_widths(meta_or_state, mm_hidden_size: int, hidden_size: int, where: str = "projector") -> None:
    """Raise when saved projector weights were made for other widths (the tower changed since stage 1)."""
    if "mm_hidden_size" in meta_or_state:
        saved_in, saved_out = int(meta_or_state["mm_hidden_size"]), int(meta_or_state["hidden_size"])
    else:
        # No metadata (LLaVA's .bin): the first Linear's weight is [out, in]; identity has no weights.
        first = meta_or_state.get("0.weight", meta_or_state.get("weight"))
        if first is None:
            return
        saved_out, saved_in = first.shape
    if saved_in != mm_hidden_size:
        raise ValueError(
            f"mm_hidden_size mismatch: {where} was trained for a vision tower of width {saved_in}, but the current "
            f"vision tower has width {mm_hidden_size}; use the projector trained with this tower (or retrain stage 1)")
    if saved_out != hidden_size:
        raise ValueError(f"hidden_size mismatch: {where} outputs width {saved_out}, "
                         f"but the LLM has width {hidden_size}")


def load_projector_weights(projector: nn.Module, path: str | os.PathLike, mm_hidden_size: int,
                           hidden_size: int) -> dict[str, str]:
    """Load a saved projector into `projector` after checking widths and kind; strict key match."""
    state, meta = load_projector_file(path)
    where = meta["path"]
    check_projector_widths(meta if "mm_hidden_size" in meta else state, mm_hidden_size, hidden_size, where)
    ref = projector.state_dict()
    missing, unexpected = sorted(set(ref) - set(state)), sorted(set(state) - set(ref))
    if missing or unexpected:
        kind = meta.get("mm_projector_type", "?")
        raise ValueError(f"{where} (projector type {kind}) does not fit this projector: missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    for k, v in state.items():
        if v.shape != ref[k].shape:
            raise ValueError(f"{where}: {k} has shape {tuple(v.shape)}, the projector expects {tuple(ref[k].shape)}")
    projector.load_state_dict({k: v.to(ref[k].dtype) for k, v in state.items()}, strict=True)
    return meta
