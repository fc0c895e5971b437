"""Import a Hugging Face CLIP vision tower (CLIPVisionModel, CLIPVisionModelWithProjection or the vision half of
a CLIPModel) into DRIP: weights, shape, activation, and the folder's preprocessing (mean/std, size).

With compression 1 the result computes the same hidden states as transformers' CLIPVisionModel (pre-LN,
QuickGELU for OpenAI's weights). Overrides such as compression=4.0 add a fresh boundary predictor on top of the
pretrained ViT. The key renames are declared in `CLIP_VISION_RENAMES`; q/k/v are concatenated into DRIP's qkv.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .config import DripVisionConfig, get_preset_config

CLIP_MODEL_TYPES = ("clip", "clip_vision_model")
# HF CLIPVisionTransformer key (relative to `vision_model.`) -> DRIP key. Regexes, applied in order.
CLIP_VISION_RENAMES = {
    r"^embeddings\.class_embedding$": "class_embedding",
    r"^embeddings\.patch_embedding\.weight$": "patch_embed.weight",
    r"^embeddings\.position_embedding\.weight$": "positional_embedding",
    r"^pre_layrnorm\.": "ln_pre.",
    r"^post_layernorm\.": "ln_post.",
    r"^encoder\.layers\.(\d+)\.layer_norm1\.": r"blocks.\1.ln_1.",
    r"^encoder\.layers\.(\d+)\.layer_norm2\.": r"blocks.\1.ln_2.",
    r"^encoder\.layers\.(\d+)\.mlp\.fc1\.": r"blocks.\1.mlp.0.",
    r"^encoder\.layers\.(\d+)\.mlp\.fc2\.": r"blocks.\1.mlp.2.",
    r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.": r"blocks.\1.attn.proj.",
}
# q, k, v projections, concatenated in this order into blocks.N.attn.qkv.{weight,bias}
_QKV = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}  # HF hidden_act -> DRIP act (HF "gelu" is the exact erf GELU)
_SHAPE_KEYS = ("patch_size", "hidden_size", "depth", "num_heads", "embed_dim")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


# ---------------------------------------------------------------------------------------------- folder reading
def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def weight_files(folder: Path) -> list[Path]:
    """The weight files of an HF folder: one file, or the shards named by its index (safetensors first)."""
    folder = Path(folder)
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            shards = sorted(set(read_json(folder / index)["weight_map"].values()))
            return [folder / s for s in shards]
    raise FileNotFoundError(f"{folder} holds no weights (looked for {', '.join(WEIGHT_FILES)}; found "
                            f"{sorted(p.name for p in folder.iterdir()) if folder.is_dir() else 'no folder'})")


def load_folder_state(folder: Path, keep: Callable[[str], bool] = lambda k: True) -> dict[str, torch.Tensor]:
    """The tensors of an HF folder whose names pass `keep` (safetensors read lazily; .bin via weights_only)."""
    out: dict[str, torch.Tensor] = {}
    for f in weight_files(folder):
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    if keep(k):
                        out[k] = sf.get_tensor(k)
        else:
            state = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
            out.update({k: v for k, v in state.items() if keep(k)})
    return out


def is_hf_clip_folder(path: Path) -> bool:
    """True when `path` holds a config.json of model_type clip / clip_vision_model."""
    cfg = Path(path) / "config.json"
    return cfg.is_file() and read_json(cfg).get("model_type") in CLIP_MODEL_TYPES


# ---------------------------------------------------------------------------------------------- conversion
def vision_config_dict(config: dict) -> dict:
    """The vision part of a CLIP config dict (a CLIPConfig holds it as `vision_config`, projection_dim on top)."""
    if config.get("model_type") == "clip":
        return {**config.get("vision_config", {}), "projection_dim": config.get("projection_dim", 512)}
    if config.get("model_type") == "clip_vision_model":
        return config
    raise ValueError(f"not a CLIP config: model_type={config.get('model_type')!r} (expected one of {CLIP_MODEL_TYPES})")


def vision_keys(model_type: str) -> Callable[[str], bool]:
    """Which keys of a CLIP state dict belong to the vision tower: a CLIPModel prefixes them `vision_model.`;
    a CLIPVisionModel saved by transformers 5 has no prefix (older versions wrote `vision_model.`)."""
    if model_type == "clip":
        return lambda k: k.startswith("vision_model.") or k == "visual_projection.weight"
    return lambda k: True


def strip_vision_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("vision_model."):] if k.startswith("vision_model.") else k: v for k, v in state.items()}


def drip_config_from_clip(vision: dict, preprocessor: Optional[dict] = None, preset: Optional[str] = None,
                          **overrides) -> DripVisionConfig:
    """DripVisionConfig with the CLIP tower's shape; DRIP fields (compression, n_pre, ...) from `preset` (its shape
    must agree, except image_size: the checkpoint's positions decide it) and `overrides`."""
    act = vision.get("hidden_act", "quick_gelu")
    if act not in _ACTS:
        raise ValueError(f"CLIP hidden_act {act!r} has no DRIP equivalent (supported: {sorted(_ACTS)})")
    hidden = vision["hidden_size"]
    shape = dict(image_size=vision["image_size"], patch_size=vision["patch_size"], hidden_size=hidden,
                 depth=vision["num_hidden_layers"], num_heads=vision["num_attention_heads"],
                 mlp_ratio=vision["intermediate_size"] / hidden, embed_dim=vision.get("projection_dim", 512),
                 act=_ACTS[act], layer_norm_eps=vision.get("layer_norm_eps", 1e-5), pool="cls", class_token=True)
    if preprocessor:
        if "image_mean" in preprocessor and "image_std" in preprocessor:
            shape.update(image_mean=tuple(preprocessor["image_mean"]), image_std=tuple(preprocessor["image_std"]))
        crop = preprocessor.get("crop_size")
        crop = crop.get("height") if isinstance(crop, dict) else crop
        if crop is not None and crop != shape["image_size"]:
            raise ValueError(f"preprocessor_config.json crops to {crop} px but the CLIP tower takes "
                             f"{shape['image_size']} px")
    if preset is not None:
        base = get_preset_config(preset).to_dict()
        diff = {k: (base[k], shape[k]) for k in _SHAPE_KEYS if base[k] != shape[k]}
        if diff:
            raise ValueError(f"preset {preset!r} does not match the CLIP tower (field: (preset, CLIP)): {diff}")
        known = DripVisionConfig().to_dict()
        shape = {**{k: v for k, v in base.items() if k in known and k not in shape}, **shape}
    return DripVisionConfig(**{**shape, **overrides})


def convert_clip_vision_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIP vision weights (keys relative to `vision_model.`, plus an optional `visual_projection.weight`)
    -> DRIP keys. Raises on any key the mapping does not know."""
    out, qkv, unknown = {}, {}, []
    for key, value in state.items():
        if key == "visual_projection.weight":
            out["proj.weight"] = value
            continue
        if key == "embeddings.position_ids":  # a buffer older transformers versions saved
            continue
        m = _QKV.match(key)
        if m:
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = value
            continue
        for pattern, repl in CLIP_VISION_RENAMES.items():
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"HF CLIP import: keys without a DRIP equivalent: {unknown[:10]}")
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"HF CLIP import: layer {layer} {kind} has only {sorted(parts)} of q/k/v")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def load_converted(model, state: dict[str, torch.Tensor], where: str) -> list[str]:
    """Strict load; only a new boundary predictor (and, for a tower saved without one, the projection) may be
    missing. Returns the missing keys that were left at their fresh initialisation."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = ("boundary_predictor.",) + (() if "proj.weight" in state else ("proj.",))
    bad = [k for k in missing if not k.startswith(allowed)]
    if bad or unexpected:
        raise RuntimeError(f"{where}: missing {bad}, unexpected {list(unexpected)}")
    return list(missing)


def _source(src: Any) -> tuple[dict, dict[str, torch.Tensor], Optional[dict], str]:
    """(vision config dict, vision state with `vision_model.` stripped [+ visual_projection.weight],
    preprocessor config or None, description) from a folder or an HF CLIP model instance."""
    if isinstance(src, (str, Path)):
        folder = Path(src).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: no config.json (expected an HF CLIP folder)")
        config = read_json(folder / "config.json")
        vision = vision_config_dict(config)
        state = load_folder_state(folder, vision_keys(config["model_type"]))
        pre = folder / "preprocessor_config.json"
        preprocessor = read_json(pre) if pre.is_file() else None
        where = str(folder)
    else:
        config = src.config.to_dict()
        vision = vision_config_dict(config)
        keep = vision_keys(config["model_type"])
        state = {k: v.detach() for k, v in src.state_dict().items() if keep(k)}
        preprocessor, where = None, type(src).__name__
    if not state:
        raise ValueError(f"{where}: no CLIP vision weights")
    return vision, strip_vision_prefix(state), preprocessor, where


def from_hf_clip(cls, src: Any, preset: Optional[str] = None, **overrides):
    """DripVisionModel from an HF CLIP folder or model (see module doc)."""
    vision, state, preprocessor, where = _source(src)
    model = cls(drip_config_from_clip(vision, preprocessor, preset, **overrides))
    load_converted(model, convert_clip_vision_state(state), f"HF CLIP import of {where}")
    return model
