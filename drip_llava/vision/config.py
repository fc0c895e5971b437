"""DRIP encoder configuration and the named presets (presets are data: model_configs/*.json).

Every tower family (drip_llava.vision.families) shares these ViT fields; a config's `family` says which model
class builds it ("drip", the default, is DRIP and the plain ViT, so configs saved without the field load as before).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Optional

from transformers import PretrainedConfig

PRESET_DIR = Path(__file__).parent / "model_configs"
RATE_LOSSES = ("binomial", "hinge", "squared")
BOUNDARY_MODES = ("hard", "soft")
EVAL_BOUNDARIES = ("expected", "threshold")
POOLS = ("cls", "mean")
ACTS = ("gelu", "quick_gelu")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class DripVisionConfig(PretrainedConfig):
    """A ViT whose patch tokens are pooled into image-dependent segments after `n_pre` blocks.

    `compression == 1` is the plain ViT: no boundary predictor, every patch its own token. Otherwise the
    predictor targets a boundary rate of `1 / compression` (2x, 4x, 10x -> 0.5, 0.25, 0.1).

    `eval_boundaries`: how eval mode decides, without noise. "threshold" is sigmoid(logit) > threshold.
    "expected" (default) keeps, per image, the k highest-logit patches with k = round(sum sigmoid(logit)),
    the expected boundary count under the training noise: the rate loss only constrains that expectation,
    and logits that hover just below 0 would otherwise give ~1 token per image at eval (measured on CLIP).

    `initializer_range`: None (default) = PyTorch's default Linear/Conv init, as open_clip's VisionTransformer;
    a float = normal(0, std) as timm/HF. With std 0.02 a random tower's CLS output is nearly image-independent
    (cosine 0.99 between images vs 0.83) and tiny CLIP runs sat on the ln(batch) plateau for 100+ steps;
    with the default it broke after ~40 steps (drip-tiny-16-4x, batch 64, measured).
    """

    model_type = "drip_vision"
    family = "drip"  # class default; family configs (tome, dynamicvit, ...) subclass this one and set their own

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        embed_dim: int = 512,
        n_pre: int = 2,
        compression: float = 1.0,
        predictor_ratio: float = 4.0,
        boundary_temperature: float = 0.5,
        boundary_threshold: float = 0.5,
        boundary_mode: str = "hard",
        eval_boundaries: str = "expected",
        rate_loss: str = "squared",
        rate_loss_weight: float = 10.0,
        rate_hinge_margin: float = 0.0,
        pool: str = "cls",
        class_token: bool = True,
        act: str = "gelu",
        layer_norm_eps: float = 1e-5,
        image_mean: tuple = OPENAI_MEAN,
        image_std: tuple = OPENAI_STD,
        initializer_range: Optional[float] = None,
        **kwargs,
    ):
        family = kwargs.pop("family", type(self).family)
        if family != type(self).family:  # a saved tome/dynamicvit/... config must not silently build DRIP
            raise ValueError(f"config of family {family!r} given to {type(self).__name__} (family "
                             f"{type(self).family!r}); build it with drip_llava.vision.create_config / create_model")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        if compression < 1:
            raise ValueError(f"compression must be >= 1 (1 = plain ViT), got {compression}")
        if compression > 1 and not 0 < n_pre < depth:
            raise ValueError(f"n_pre must be in 1..depth-1 for DRIP, got n_pre={n_pre}, depth={depth}")
        for name, value, allowed in (("rate_loss", rate_loss, RATE_LOSSES), ("boundary_mode", boundary_mode,
                                     BOUNDARY_MODES), ("eval_boundaries", eval_boundaries, EVAL_BOUNDARIES),
                                    ("pool", pool, POOLS), ("act", act, ACTS)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}; valid: {allowed}")
        if pool == "cls" and not class_token:
            raise ValueError("pool='cls' needs class_token=True")
        self.image_size, self.patch_size = image_size, patch_size
        self.hidden_size, self.depth, self.num_heads, self.mlp_ratio = hidden_size, depth, num_heads, mlp_ratio
        self.embed_dim, self.n_pre, self.compression = embed_dim, n_pre, float(compression)
        self.predictor_ratio = predictor_ratio
        self.boundary_temperature, self.boundary_threshold = boundary_temperature, boundary_threshold
        self.eval_boundaries = eval_boundaries
        self.boundary_mode, self.rate_loss, self.rate_loss_weight = boundary_mode, rate_loss, rate_loss_weight
        self.rate_hinge_margin = rate_hinge_margin
        self.pool, self.class_token, self.act, self.layer_norm_eps = pool, class_token, act, layer_norm_eps
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        self.initializer_range = initializer_range
        self.family = family  # an instance field so that to_dict / config.json record it
        super().__init__(**kwargs)

    @property
    def is_drip(self) -> bool:
        return self.compression > 1

    @property
    def target_rate(self) -> float:
        return 1.0 / self.compression

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def n_short(self) -> int:
        return self.depth - self.n_pre if self.is_drip else 0

    @property
    def max_tokens(self) -> int:
        """Upper bound of segment tokens per image (every patch its own segment)."""
        return self.num_patches


def list_presets(family: Optional[str] = "drip") -> list[str]:
    """Preset names of one family (default "drip": DRIP and the plain ViT), or of every family with None."""
    names = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
    if family is None:
        return names
    return [n for n in names if _preset_dict(n).get("family", "drip") == family]


@lru_cache(maxsize=None)
def _preset_dict(name: str) -> dict:
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise KeyError(f"unknown preset {name!r}; valid: {', '.join(list_presets(None))}")
    return json.loads(path.read_text())


def create_config(values: dict) -> DripVisionConfig:
    """The config class of `values["family"]` (default "drip") built from a dict (a preset, a config.json)."""
    family = values.get("family", "drip")
    if family == "drip":
        return DripVisionConfig(**values)
    from .families import get_family  # the family modules import this one

    return get_family(family).config_class(**values)


def get_preset_config(name: str, **overrides) -> DripVisionConfig:
    """Config of a named preset; keyword overrides replace single fields (e.g. n_pre=4, rate_loss='binomial').

    `family=...` in the overrides re-reads a preset as another family (e.g. a ViT preset as ToMe)."""
    return create_config({**_preset_dict(name), **overrides})


def parse_overrides(pairs: list[str]) -> dict:
    """['rate_loss="binomial"', 'n_pre=4'] -> {'rate_loss': 'binomial', 'n_pre': 4} (bare words are strings)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"override {pair!r} is not KEY=VALUE")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
