"""Tower families: DRIP / plain ViT ("drip") and the other token-reduction methods, one module each.

Every family shares the ViT body of `DripVisionModel` (patch embedding, `Block`s, ln_post, projection; same
state-dict keys, so a trained ViT folder loads into any family) and its output contract (`TowerOutput`:
features [B,S,D] + mask [B,S] + num_tokens + an unweighted auxiliary loss in `rate_loss`, which trainers scale by
`config.rate_loss_weight`). The saved config's `family` field picks the class, never a name or a path:

    create_model("tome-tiny-16-r8")                       # a preset (random init)
    create_model("vit-tiny-16", family="tome", merge_r=8)  # a preset re-read as another family
    from_pretrained(folder, family="tome", merge_r=8)      # a trained ViT folder, merged without training
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch.utils.checkpoint import checkpoint

from .config import DripVisionConfig, create_config, get_preset_config
from .model import DripVisionModel, DripVisionOutput

# modules that register a family when imported (registration is explicit; nothing is discovered by name)
_FAMILY_MODULES = ("tome", "dynamicvit", "avit", "dvt")
_FAMILIES: dict[str, type] = {"drip": DripVisionModel}


@dataclass
class TowerOutput(DripVisionOutput):
    """DripVisionOutput plus what a family did to the patches (for pictures and statistics); `boundaries` is None.

    patch_token: [B,L] long, index in `features` of the token that holds each patch (merged patches share one),
        -1 = the patch was dropped.
    patch_depth: [B,L] long, how many blocks the patch's token went through before it was dropped or halted
        (the blocks run, depth or `output_layer`, when it reached the end).
    """

    patch_token: Optional[torch.Tensor] = None
    patch_depth: Optional[torch.Tensor] = None


def register_family(name: str):
    """Class decorator: `name` becomes a valid `config.family`; the class's `config_class.family` must equal it."""

    def deco(cls):
        if name in _FAMILIES:
            raise ValueError(f"tower family {name!r} is already registered ({_FAMILIES[name].__name__})")
        if cls.config_class.family != name:
            raise ValueError(f"{cls.__name__}.config_class.family is {cls.config_class.family!r}, not {name!r}")
        _FAMILIES[name] = cls
        return cls

    return deco


def _load_builtin() -> None:
    for mod in _FAMILY_MODULES:
        importlib.import_module(f"{__package__}.{mod}")


def list_families() -> list[str]:
    _load_builtin()
    return sorted(_FAMILIES)


def get_family(name: str) -> type:
    """The model class of a family, by exact name."""
    _load_builtin()
    if name not in _FAMILIES:
        raise KeyError(f"unknown tower family {name!r}; valid: {', '.join(sorted(_FAMILIES))}")
    return _FAMILIES[name]


def create_model(spec: Union[str, dict, DripVisionConfig], **overrides) -> DripVisionModel:
    """A randomly initialised tower of the right family from a preset name, a config dict or a config."""
    if isinstance(spec, str):
        config = get_preset_config(spec, **overrides)
    else:
        values = spec.to_dict() if isinstance(spec, DripVisionConfig) else dict(spec)
        config = create_config({**values, **overrides})
    return get_family(config.family)(config)


def from_pretrained(folder: Union[str, Path], **overrides) -> DripVisionModel:
    """A saved tower (config.json + model.safetensors) as the class its config's family names. Overrides may
    change the family: a plain ViT folder loads into ToMe as is, or into DynamicViT with fresh predictors."""
    values = json.loads((Path(folder) / "config.json").read_text())
    config = create_config({**values, **overrides})
    return get_family(config.family).from_pretrained(str(folder), config=config)


class FamilyVisionModel(DripVisionModel):
    """Base of the non-DRIP families: the ViT body of DripVisionModel (no boundary predictor) with helpers.

    Subclasses set `config_class` (a DripVisionConfig subclass with compression 1) and `forward_features`, which
    takes DripVisionModel's arguments, `output_layer` included: with `output_layer` = k (see `stop_index`) only
    blocks 1..k run and `features` / `mask` are hidden_states[k] without CLS, before ln_post."""

    def __init__(self, config: DripVisionConfig):
        if type(config) is not self.config_class:
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}"
                            " (build towers with drip_llava.vision.create_model)")
        super().__init__(config)

    def run_block(self, blk, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.gradient_checkpointing and self.training:
            return checkpoint(blk, x, attn_mask, use_reentrant=False)
        return blk(x, attn_mask)

    def stop_index(self, output_layer: Optional[int]) -> int:
        """Blocks to run: depth, or k for `output_layer` = k (an index into hidden_states, negative from the end)."""
        return self.config.depth if output_layer is None else self._output_index(output_layer)

    def begin(self, pixel_values: torch.Tensor, boundaries, output_layer: Optional[int]):
        """The start of every family's forward_features: (embedded tokens [B, n_cls + L, D], blocks to run, n_cls)."""
        self.check_no_boundaries(boundaries)
        return self.embed(pixel_values), self.stop_index(output_layer), int(self.config.class_token)

    @staticmethod
    def check_no_boundaries(boundaries) -> None:
        if boundaries is not None:
            raise ValueError("boundaries= is DRIP's argument; this tower family decides its tokens itself")

    def finish(self, x: torch.Tensor, mask: torch.Tensor, aux_loss: torch.Tensor, hidden, masks,
               patch_token: torch.Tensor, patch_depth: torch.Tensor, ln_post: bool = True) -> TowerOutput:
        """The output contract. x: [B, n_cls + S, D]; mask: [B, S] over the non-CLS tokens; `ln_post` False for a
        forward stopped at `output_layer` (a hidden state, as DripVisionModel returns it)."""
        n_cls = int(self.config.class_token)
        if ln_post:
            x = self.ln_post(x)
        return TowerOutput(
            features=x[:, n_cls:], mask=mask, num_tokens=mask.sum(1), boundaries=None, rate_loss=aux_loss,
            pooled=None, cls_token=x[:, 0] if n_cls else None,
            hidden_states=tuple(hidden) if hidden is not None else None,
            hidden_masks=tuple(masks) if masks is not None else None,
            patch_token=patch_token, patch_depth=patch_depth)


def check_family_config(config: DripVisionConfig) -> None:
    """Family configs reuse the ViT fields; DRIP's boundary predictor is not part of them."""
    if config.compression != 1.0:
        raise ValueError(f"family {config.family!r} has no boundary predictor: compression must be 1, "
                         f"got {config.compression}")
