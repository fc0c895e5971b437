"""The LLaVA-side wrapper around DripVisionModel: features of one block, CLS dropped, a variable count per image.

LLaVA feeds the LLM the patch tokens of the second-to-last block (`mm_vision_select_layer = -2`). With DRIP the
blocks after pooling carry segment tokens, so the selected block must come after pooling: selecting a block
before pooling (index <= n_pre) would silently hand the LLM all L patch tokens and undo the compression, so it
is an error for DRIP towers (any block is fine for the plain ViT, compression 1).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from drip_llava.vision import DripVisionConfig, DripVisionModel, list_presets
from drip_llava.vision.hf_clip_import import CLIP_MODEL_TYPES, is_hf_clip_folder

OPEN_CLIP_PREFIX = "open_clip:"


def resolve_select_layer(config: DripVisionConfig, select_layer: int) -> int:
    """Index into out.hidden_states (depth+1 entries; 0 = embeddings) for `select_layer`, validated."""
    n = config.depth + 1
    idx = select_layer + n if select_layer < 0 else select_layer
    if not 0 <= idx < n:
        raise ValueError(f"mm_vision_select_layer={select_layer} is out of range for a tower of depth {config.depth} "
                         f"(valid: {-n}..{n - 1})")
    if config.is_drip and idx <= config.n_pre:
        first = config.n_pre + 1
        raise ValueError(
            f"mm_vision_select_layer={select_layer} (block output {idx}) is before DRIP's pooling (n_pre="
            f"{config.n_pre}): it would give the LLM all {config.num_patches} patch tokens. Choose a block after "
            f"pooling: {first}..{config.depth} or {first - n}..-1")
    return idx


def load_drip_model(spec: Any, **overrides) -> DripVisionModel:
    """A DripVisionModel from: an instance, a DripVisionConfig / config dict (random weights, to be filled from
    a checkpoint), a DripVisionModel folder, an HF CLIP folder or model (config model_type clip /
    clip_vision_model, e.g. openai/clip-vit-large-patch14-336 downloaded), an open_clip model (or its `.visual`),
    `open_clip:NAME[:PRETRAINED]` (PRETRAINED = tag or local file), or a preset name. For the pretrained ViTs
    (HF CLIP, open_clip) `overrides` such as compression=4.0 add a fresh boundary predictor: DRIP."""
    if isinstance(spec, DripVisionModel):
        if overrides:
            raise ValueError("config overrides cannot be applied to an already built DripVisionModel")
        return spec
    config_type = getattr(getattr(spec, "config", None), "model_type", None)
    if isinstance(spec, nn.Module) and config_type in CLIP_MODEL_TYPES:  # transformers' CLIP(Vision)Model
        return DripVisionModel.from_hf_clip(spec, **overrides)
    if isinstance(spec, nn.Module):  # an open_clip CLIP model or its .visual ViT: the plain-ViT LLaVA baseline
        return DripVisionModel.from_open_clip(spec, **overrides)
    if isinstance(spec, DripVisionConfig):
        return DripVisionModel(DripVisionConfig.from_dict({**spec.to_dict(), **overrides}))
    if isinstance(spec, dict):
        return DripVisionModel(DripVisionConfig.from_dict({**spec, **overrides}))
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
            return DripVisionModel.from_hf_clip(path, **overrides)
        return DripVisionModel.from_pretrained(str(path), **overrides)
    if text.startswith(OPEN_CLIP_PREFIX):
        name, _, pretrained = text[len(OPEN_CLIP_PREFIX):].partition(":")
        source = (name, pretrained) if pretrained else name
        return DripVisionModel.from_open_clip(source, **overrides)
    presets = list_presets()
    if text in presets:
        return DripVisionModel.from_preset(text, **overrides)
    raise ValueError(f"vision tower {text!r} is not a folder, not 'open_clip:NAME[:PRETRAINED]' and not a preset "
                     f"(valid presets: {', '.join(presets)})")


class DripVisionTower(nn.Module):
    """`tower(pixel_values) -> (features [B,S,D], mask [B,S])`: tokens of the selected block, CLS dropped,
    padded to the batch's longest image. Frozen by default: eval mode whatever the parent's mode (no
    boundary noise, an image's tokens never depend on its batch-mates) and no autograd graph."""

    def __init__(self, model: DripVisionModel, select_layer: int = -2, frozen: bool = True):
        super().__init__()
        self.model = model
        self.select_layer = select_layer
        self.layer_index = resolve_select_layer(model.config, select_layer)
        self.image_processor = model.preprocess
        self.set_frozen(frozen)

    # The HF-ish surface LLaVA code expects.
    @property
    def config(self) -> DripVisionConfig:
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def max_tokens(self) -> int:
        """Upper bound of visual tokens per image (for context budgets; the real count is per image)."""
        return self.model.config.max_tokens

    @property
    def dtype(self) -> torch.dtype:
        return self.model.patch_embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.patch_embed.weight.device

    def set_frozen(self, frozen: bool) -> None:
        self.frozen = frozen
        self.model.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True):
        self.training = mode
        self.model.train(mode and not self.frozen)
        return self

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.model.forward_features(pixel_values, output_hidden_states=True)
        n_cls = int(self.config.class_token)
        feats = out.hidden_states[self.layer_index][:, n_cls:]  # [B,S,D] (or [B,L,D] for a plain ViT)
        mask = out.hidden_masks[self.layer_index][:, n_cls:]  # [B,S] bool
        return feats, mask


def build_vision_tower(spec: Any, select_layer: int = -2, frozen: bool = True, **overrides) -> DripVisionTower:
    """See `load_drip_model` for the accepted specs; `overrides` replace DRIP config fields."""
    return DripVisionTower(load_drip_model(spec, **overrides), select_layer=select_layer, frozen=frozen)
