"""The one way from a tower spec to a DripVisionModel, for every consumer (LLaVA, CLIP, classification, LR finder,
the prefill bench)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from torch import nn

from .config import DripVisionConfig, list_presets
from .families import create_model, from_pretrained
from .hf_clip_import import CLIP_MODEL_TYPES, is_hf_clip_folder
from .model import DripVisionModel

OPEN_CLIP_PREFIX = "open_clip:"


def load_drip_model(spec: Any, preset: Optional[str] = None, **overrides) -> DripVisionModel:
    """A tower of any family (DRIP, plain ViT, ToMe, DynamicViT: a DripVisionModel) from: an instance, a
    DripVisionConfig / config dict (random weights, to be filled from a checkpoint; its `family` picks the class),
    a tower folder (any family), an HF CLIP folder or model (config model_type clip /
    clip_vision_model, e.g. openai/clip-vit-large-patch14-336 downloaded), an open_clip model (or its `.visual`),
    `open_clip:NAME[:PRETRAINED]` (PRETRAINED = tag or local file), or a preset name. For the pretrained ViTs
    (HF CLIP, open_clip) `preset` gives the DRIP fields to import into and `overrides` such as compression=4.0
    add a fresh boundary predictor: DRIP."""
    if isinstance(spec, DripVisionModel):
        if overrides:
            raise ValueError("config overrides cannot be applied to an already built DripVisionModel")
        return spec
    config_type = getattr(getattr(spec, "config", None), "model_type", None)
    if isinstance(spec, nn.Module) and config_type in CLIP_MODEL_TYPES:  # transformers' CLIP(Vision)Model
        return DripVisionModel.from_hf_clip(spec, preset=preset, **overrides)
    if isinstance(spec, nn.Module):  # an open_clip CLIP model or its .visual ViT: the plain-ViT LLaVA baseline
        return DripVisionModel.from_open_clip(spec, preset=preset, **overrides)
    if isinstance(spec, (DripVisionConfig, dict)):  # the config's `family` picks the class
        return create_model(spec, **overrides)
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"vision tower spec must be a folder, preset name, config dict, DripVisionModel or open_clip "
                        f"model, got {type(spec)}")
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"vision tower folder {path} has no config.json (found: "
                                    f"{sorted(p.name for p in path.iterdir())})")
        if is_hf_clip_folder(path):
            return DripVisionModel.from_hf_clip(path, preset=preset, **overrides)
        return from_pretrained(path, **overrides)
    if text.startswith(OPEN_CLIP_PREFIX):
        name, _, pretrained = text[len(OPEN_CLIP_PREFIX):].partition(":")
        source = (name, pretrained) if pretrained else name
        return DripVisionModel.from_open_clip(source, preset=preset, **overrides)
    presets = list_presets(None)
    if text in presets:
        return create_model(text, **overrides)
    raise ValueError(f"vision tower {text!r} is not a folder, not '{OPEN_CLIP_PREFIX}NAME[:PRETRAINED]' and not a "
                     f"preset (valid presets: {', '.join(presets)})")


# Fields that make two towers the same architecture: a checkpoint or a stage-1 projector trained on one tower
# needs all of them to agree in the tower it is loaded with (same width but e.g. another compression would
# silently mis-align the tokens).
ARCHITECTURE_FIELDS = ("image_size", "patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio", "n_pre",
                       "compression", "class_token", "act", "predictor_ratio", "boundary_threshold")


def architecture_diff(trained: dict, found: dict) -> dict:
    """{field: (trained, found)} for the ARCHITECTURE_FIELDS on which two tower configs (dicts) differ."""
    return {k: (trained.get(k), found.get(k)) for k in ARCHITECTURE_FIELDS if trained.get(k) != found.get(k)}
