"""The LLaVA-side wrapper around DripVisionModel: features of one block, CLS dropped, a variable count per image.

LLaVA feeds the LLM the patch tokens of the second-to-last block (`mm_vision_select_layer = -2`). With DRIP the
blocks after pooling carry segment tokens, so the selected block must come after pooling: selecting a block
before pooling (index <= n_pre) would silently hand the LLM all L patch tokens and undo the compression, so it
is an error for DRIP towers (any block is fine for the plain ViT, compression 1).

Every tower family (DRIP, ViT, ToMe, DynamicViT, A-ViT) takes `forward_features(output_layer=k)`, so the tower
stops at the selected block for all of them; an encoder without the argument runs every block and the selected
hidden state is taken.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from drip_llava.vision import DripVisionConfig, DripVisionModel
from drip_llava.vision.spec import load_drip_model


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


class DripVisionTower(nn.Module):
    """`tower(pixel_values) -> (features [B,S,D], mask [B,S])`: tokens of the selected block, CLS dropped,
    padded to the batch's longest image (`return_rate_loss=True` adds the family's auxiliary loss). Frozen by
    default: eval mode whatever the parent's mode (no boundary noise, an image's tokens never depend on its
    batch-mates) and no autograd graph."""

    def __init__(self, model: DripVisionModel, select_layer: int = -2, frozen: bool = True):
        super().__init__()
        self.model = model
        self.select_layer = select_layer
        self.layer_index = resolve_select_layer(model.config, select_layer)
        self._stops_at_layer = "output_layer" in inspect.signature(model.forward_features).parameters
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
        """Upper bound of visual tokens per image at the selected block (for context budgets and truncation; the
        real count is per image). Families that shrink the sequence block by block (ToMe, DynamicViT in eval) know
        the count after each block; a tower in training mode may keep every patch (DynamicViT masks instead)."""
        c = self.model.config
        if hasattr(c, "tokens_after_block"):
            return c.tokens_after_block(self.select_layer) if not self.model.training else c.num_patches
        return c.max_tokens

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

    def forward(self, pixel_values: torch.Tensor, return_rate_loss: bool = False):
        """(features, mask), or with `return_rate_loss` (features, mask, the family's unweighted `rate_loss` of
        the batch up to the selected block: DRIP's rate loss, DynamicViT's ratio loss of the stages run, A-ViT's
        halting loss truncated there; 0 for a plain ViT and ToMe). The encoder stops at the selected block: the
        later blocks do not run and no hidden states are kept."""
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            if self._stops_at_layer:
                out = self.model.forward_features(pixel_values, output_layer=self.layer_index)
                feats, mask = out.features, out.mask
            else:  # an encoder without `output_layer`: every block, the selected hidden state taken
                out = self.model.forward_features(pixel_values, output_hidden_states=True)
                n_cls = int(self.config.class_token)
                feats = out.hidden_states[self.layer_index][:, n_cls:]
                mask = out.hidden_masks[self.layer_index][:, n_cls:]
        # features [B,S,D] (or [B,L,D] for a plain ViT), mask [B,S] bool
        return (feats, mask, out.rate_loss) if return_rate_loss else (feats, mask)


def build_vision_tower(spec: Any, select_layer: int = -2, frozen: bool = True, **overrides) -> DripVisionTower:
    """See `drip_llava.vision.spec.load_drip_model` for the accepted specs; `overrides` replace DRIP config fields."""
    return DripVisionTower(load_drip_model(spec, **overrides), select_layer=select_layer, frozen=frozen)
