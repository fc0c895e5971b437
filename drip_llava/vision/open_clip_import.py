"""Import an open_clip ViT's weights into DRIP (patch embed, positions, blocks, norms, projection)."""
from __future__ import annotations

from typing import Optional

from torch import nn

from .config import DripVisionConfig, get_preset_config


def open_clip_create_kwargs(name: str, pretrained: Optional[str]) -> dict:
    """Extra create_model arguments so the activation matches the weights. OpenAI's CLIP weights (and others in
    open_clip's registry, e.g. laion400m, metaclip, dfn2b) were trained with QuickGELU, but open_clip's plain
    configs (e.g. ViT-L-14-336) build GELU and only warn: ask for QuickGELU, what the `-quickgelu` configs do.
    A local weight file records nothing about its activation: pick the `-quickgelu` config name yourself."""
    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}
    model_cfg = open_clip.get_model_config(name) or {}
    if tag_cfg.get("quick_gelu", False) and not model_cfg.get("quick_gelu", False):
        return {"force_quick_gelu": True}
    return {}


def create_open_clip(name: str, pretrained: Optional[str] = None):
    """open_clip.create_model with the activation its pretrained tag needs (downloads a tag when online)."""
    import open_clip

    return open_clip.create_model(name, pretrained=pretrained or None, **open_clip_create_kwargs(name, pretrained))


def _open_clip_visual(model_or_name):
    if isinstance(model_or_name, (tuple, list)):  # ('ViT-B-32', 'laion2b_s34b_b79k')
        model_or_name = create_open_clip(*model_or_name)
    elif isinstance(model_or_name, str):
        model_or_name = create_open_clip(model_or_name)
    return getattr(model_or_name, "visual", model_or_name)


def config_from_visual(visual, preset: Optional[str] = None, **overrides) -> DripVisionConfig:
    """Shape fields come from the open_clip tower; DRIP fields (compression, n_pre, ...) from the preset, whose
    shape must agree (except image_size: e.g. drip-l-14-4x on ViT-L-14-336)."""
    blocks = visual.transformer.resblocks
    width = visual.conv1.out_channels
    mlp_hidden = blocks[0].mlp.c_fc.out_features
    act = "quick_gelu" if type(blocks[0].mlp.gelu).__name__ == "QuickGELU" else "gelu"
    shape = dict(
        image_size=visual.image_size[0], patch_size=visual.patch_size[0], hidden_size=width,
        depth=len(blocks), num_heads=blocks[0].attn.num_heads, mlp_ratio=mlp_hidden / width,
        embed_dim=visual.proj.shape[1], act=act, pool="cls" if visual.pool_type == "tok" else "mean",
        class_token=True, layer_norm_eps=visual.ln_post.eps,
    )
    if preset is not None:
        base = get_preset_config(preset).to_dict()
        for k in ("patch_size", "hidden_size", "depth", "num_heads", "embed_dim"):  # resolution: the checkpoint's
            if base[k] != shape[k]:
                raise ValueError(f"preset {preset!r} has {k}={base[k]} but the open_clip tower has {shape[k]}")
        keep = {k: v for k, v in base.items() if k in DripVisionConfig().to_dict() and k not in shape}
        shape = {**keep, **shape}
    mean, std = getattr(visual, "image_mean", None), getattr(visual, "image_std", None)
    if mean is not None and std is not None:
        shape.update(image_mean=tuple(mean), image_std=tuple(std))
    return DripVisionConfig(**{**shape, **overrides})


def visual_state_dict_to_drip(visual) -> dict:
    sd = {
        "patch_embed.weight": visual.conv1.weight,
        "class_embedding": visual.class_embedding,
        "positional_embedding": visual.positional_embedding,
        "ln_pre.weight": visual.ln_pre.weight, "ln_pre.bias": visual.ln_pre.bias,
        "ln_post.weight": visual.ln_post.weight, "ln_post.bias": visual.ln_post.bias,
        "proj.weight": visual.proj.t(),
    }
    for i, blk in enumerate(visual.transformer.resblocks):
        if not isinstance(blk.ls_1, nn.Identity):
            raise ValueError("open_clip towers with LayerScale are not supported")
        p = f"blocks.{i}."
        sd.update({
            p + "ln_1.weight": blk.ln_1.weight, p + "ln_1.bias": blk.ln_1.bias,
            p + "attn.qkv.weight": blk.attn.in_proj_weight, p + "attn.qkv.bias": blk.attn.in_proj_bias,
            p + "attn.proj.weight": blk.attn.out_proj.weight, p + "attn.proj.bias": blk.attn.out_proj.bias,
            p + "ln_2.weight": blk.ln_2.weight, p + "ln_2.bias": blk.ln_2.bias,
            p + "mlp.0.weight": blk.mlp.c_fc.weight, p + "mlp.0.bias": blk.mlp.c_fc.bias,
            p + "mlp.2.weight": blk.mlp.c_proj.weight, p + "mlp.2.bias": blk.mlp.c_proj.bias,
        })
    return {k: v.detach().clone() for k, v in sd.items()}


def from_open_clip(cls, model_or_name, preset: Optional[str] = None, **overrides):
    visual = _open_clip_visual(model_or_name)
    model = cls(config_from_visual(visual, preset, **overrides))
    missing, unexpected = model.load_state_dict(visual_state_dict_to_drip(visual), strict=False)
    # only the (new) boundary predictor may be missing; anything else is a mapping bug
    missing = [k for k in missing if not k.startswith("boundary_predictor.")]
    if missing or unexpected:
        raise RuntimeError(f"open_clip import: missing {missing}, unexpected {unexpected}")
    return model
