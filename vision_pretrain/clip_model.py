"""CLIP = DRIP image tower + open_clip text tower + learnable logit scale.

The text tower is built by open_clip's own builder from a named text config (text_configs.json, or any
open_clip model config's `text_cfg`), and tokenised by open_clip's SimpleTokenizer. A CLIP run exports
  RUN/vision_tower/  DripVisionModel folder (config.json + model.safetensors): what LLaVA and classify load
  RUN/text_tower/    config.json (text config, embed_dim) + model.safetensors (text tower + logit_scale):
                     what zero-shot evaluation needs besides the image tower
A pretrained CLIP (an HF CLIPModel folder or an open_clip model) can start both towers: `TextInit` carries its
text tower as open_clip's TextTransformer (`text_init_from_hf_clip`, `text_init_from_open_clip`).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, _build_text_tower
from safetensors.torch import load_model, save_model
from torch import nn

from drip_llava.vision import DripVisionModel
from drip_llava.vision.dvt import task_embeddings
from drip_llava.vision.families import from_pretrained as load_tower

TEXT_CONFIGS = Path(__file__).with_name("text_configs.json")


def list_text_models() -> list[str]:
    return sorted(json.loads(TEXT_CONFIGS.read_text()))


def get_text_config(name: str) -> dict:
    """Named text config: ours (text_configs.json) first, then open_clip's model configs (e.g. 'ViT-B-16')."""
    ours = json.loads(TEXT_CONFIGS.read_text())
    if name in ours:
        return dict(ours[name])
    if name in open_clip.list_models():
        cfg = open_clip.get_model_config(name)
        text_cfg = dict(cfg["text_cfg"])
        if text_cfg.get("hf_model_name"):
            raise ValueError(f"text model {name!r} is a Hugging Face text tower; only open_clip's own "
                             "TextTransformer configs are supported (no network at run time)")
        if cfg.get("quick_gelu"):
            text_cfg["quick_gelu"] = True
        return text_cfg
    raise KeyError(f"unknown text model {name!r}; ours: {list_text_models()}, or any of open_clip.list_models()")


def build_tokenizer(text_cfg: dict):
    return open_clip.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))


# HF CLIPTextModel key (relative to `text_model.`) -> open_clip TextTransformer key. Regexes, applied in order;
# q/k/v are concatenated into in_proj_*, and text_projection.weight is transposed (open_clip: x @ proj).
HF_TEXT_RENAMES = {
    r"^embeddings\.token_embedding\.": "token_embedding.",
    r"^embeddings\.position_embedding\.weight$": "positional_embedding",
    r"^encoder\.layers\.(\d+)\.layer_norm1\.": r"transformer.resblocks.\1.ln_1.",
    r"^encoder\.layers\.(\d+)\.layer_norm2\.": r"transformer.resblocks.\1.ln_2.",
    r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.": r"transformer.resblocks.\1.attn.out_proj.",
    r"^encoder\.layers\.(\d+)\.mlp\.fc1\.": r"transformer.resblocks.\1.mlp.c_fc.",
    r"^encoder\.layers\.(\d+)\.mlp\.fc2\.": r"transformer.resblocks.\1.mlp.c_proj.",
    r"^final_layer_norm\.": "ln_final.",
}
_HF_QKV = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
OPENAI_VOCAB = 49408  # open_clip.SimpleTokenizer = OpenAI's BPE, what this trainer tokenises with


@dataclass
class TextInit:
    """A pretrained text tower for DripCLIP: open_clip text config, TextTransformer state, logit scale."""
    cfg: dict
    state: dict
    logit_scale: float
    source: str


def text_init_from_hf_clip(folder: str | Path) -> TextInit:
    """The text half of an HF CLIPModel folder (e.g. openai/clip-vit-large-patch14-336) as open_clip's
    TextTransformer: same tokens in, same embedding out."""
    from transformers import CLIPTextConfig

    from drip_llava.vision.hf_clip_import import load_folder_state, read_json

    folder = Path(folder)
    cfg = read_json(folder / "config.json")
    if cfg.get("model_type") != "clip" or "text_config" not in cfg:
        raise ValueError(f"{folder}: no CLIP text tower (config model_type {cfg.get('model_type')!r}; a CLIPModel "
                         "folder holds both towers)")
    t = CLIPTextConfig(**{k: v for k, v in cfg["text_config"].items() if k != "model_type"})
    if t.hidden_act not in ("quick_gelu", "gelu"):
        raise ValueError(f"{folder}: text hidden_act {t.hidden_act!r} has no open_clip equivalent")
    if t.vocab_size != OPENAI_VOCAB or t.layer_norm_eps != 1e-5:
        raise ValueError(f"{folder}: text tower with vocab {t.vocab_size} / layer_norm_eps {t.layer_norm_eps}: only "
                         f"OpenAI's BPE ({OPENAI_VOCAB} tokens, open_clip's SimpleTokenizer) with eps 1e-5 "
                         "is supported")
    text_cfg = dict(context_length=t.max_position_embeddings, vocab_size=t.vocab_size, width=t.hidden_size,
                    heads=t.num_attention_heads, layers=t.num_hidden_layers,
                    mlp_ratio=t.intermediate_size / t.hidden_size, quick_gelu=t.hidden_act == "quick_gelu")
    raw = load_folder_state(folder, lambda k: k.startswith("text_model.") or k in ("text_projection.weight",
                                                                                 "logit_scale"))
    state, qkv, unknown = {}, {}, []
    for key, value in raw.items():
        if key in ("text_projection.weight", "logit_scale"):
            continue
        key = key[len("text_model."):]
        if key == "embeddings.position_ids":
            continue
        m = _HF_QKV.match(key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        for pattern, repl in HF_TEXT_RENAMES.items():
            new, n = re.subn(pattern, repl, key)
            if n:
                state[new] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{folder}: text keys without an open_clip equivalent: {unknown[:10]}")
    for (layer, kind), parts in qkv.items():
        state[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    state["text_projection"] = raw["text_projection.weight"].t().contiguous()
    return TextInit(text_cfg, state, float(raw["logit_scale"]), str(folder))


def text_init_from_open_clip(model, name: str) -> TextInit:
    """The text tower of an open_clip CLIP model (its config from open_clip's model registry)."""
    text_cfg = get_text_config(name)
    custom = hasattr(model, "text")  # CustomTextCLIP keeps its text tower under .text, CLIP at the top level
    tower_modules = model.text.modules() if custom else model.transformer.modules()
    if any(type(m).__name__ == "QuickGELU" for m in tower_modules):
        text_cfg["quick_gelu"] = True  # forced for OpenAI-style tags (see drip_llava.vision.open_clip_import)
    if custom:
        state = {k: v.detach() for k, v in model.text.state_dict().items()}
    else:
        state = {k: v.detach() for k, v in model.state_dict().items()
                 if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")}
    return TextInit(text_cfg, state, float(model.logit_scale.detach()), f"open_clip:{name}")


class DripCLIP(nn.Module):
    def __init__(self, visual: DripVisionModel, text_cfg: dict, init_logit_scale: float = math.log(1 / 0.07)):
        super().__init__()
        self.text_cfg = dict(text_cfg)
        cfg = dict(text_cfg)
        quick_gelu = cfg.pop("quick_gelu", False)
        self.visual = visual
        self.text = _build_text_tower(visual.config.embed_dim, CLIPTextCfg(**cfg), quick_gelu=quick_gelu)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

    @property
    def embed_dim(self) -> int:
        return self.visual.config.embed_dim

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.visual(images).pooled
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Same signature as open_clip's CLIP, so open_clip.build_zero_shot_classifier works on this model."""
        x = self.text(text)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> dict:
        """Fixed-shape outputs only ([B,E] embeddings, scalars, [B] counts), so DDP can gather them. A cascade
        (DVT) adds `exit_image_features` [K,B,E], every exit's normalised embedding (K fixed by the config), for the
        sum of the exits' losses; `image_features` is then the last exit's."""
        out = self.visual(images)
        exits = task_embeddings(out)
        res = {
            "image_features": F.normalize(out.pooled.float(), dim=-1),
            "text_features": F.normalize(self.text(text).float(), dim=-1),
            "logit_scale": self.logit_scale.exp(),
            "rate_loss": out.rate_loss,
            # families without boundaries (ToMe, DynamicViT, A-ViT, DVT): tokens kept per patch, DRIP's rate
            "boundary_rate": (out.boundaries.detach().float().mean() if out.boundaries is not None
                              else out.num_tokens.detach().float().mean() / self.visual.config.num_patches),
            "num_tokens": out.num_tokens,
        }
        if len(exits) > 1:
            res["exit_image_features"] = F.normalize(torch.stack(exits).float(), dim=-1)
        return res

    def load_text_init(self, init: TextInit) -> None:
        """Pretrained text weights and logit scale (strict: every TextTransformer key, nothing else)."""
        self.text.load_state_dict(init.state, strict=True)
        with torch.no_grad():
            self.logit_scale.fill_(init.logit_scale)

    # ---- export / import --------------------------------------------------------------------------
    def save_text_tower(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(
            {"text_cfg": self.text_cfg, "embed_dim": self.embed_dim, "tokenizer": "open_clip.SimpleTokenizer"},
            indent=2))
        holder = _TextHolder(self.text, self.logit_scale)
        save_model(holder, str(folder / "model.safetensors"))

    @classmethod
    def from_towers(cls, vision_dir: str | Path, text_dir: str | Path) -> "DripCLIP":
        """Rebuilds the CLIP model from exported towers (zero-shot evaluation of a finished run)."""
        visual = load_tower(vision_dir)  # the class of the folder's family (DRIP, ToMe, DVT, ...)
        text_dir = Path(text_dir)
        cfg_file = text_dir / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{text_dir}: no text tower config.json (expected a CLIP run's text_tower/)")
        meta = json.loads(cfg_file.read_text())
        if meta["embed_dim"] != visual.config.embed_dim:
            raise ValueError(f"text tower {text_dir} projects to {meta['embed_dim']} dims, image tower "
                             f"{vision_dir} to {visual.config.embed_dim}")
        model = cls(visual, meta["text_cfg"])
        load_model(_TextHolder(model.text, model.logit_scale), str(text_dir / "model.safetensors"), strict=True)
        return model


class _TextHolder(nn.Module):
    """The text half of a DripCLIP under stable names (text.*, logit_scale) for its own safetensors file."""

    def __init__(self, text: nn.Module, logit_scale: nn.Parameter):
        super().__init__()
        self.text = text
        self.logit_scale = logit_scale


def resolve_towers(model_path: str | Path, text_from: Optional[str | Path] = None) -> tuple[Path, Path]:
    """(vision_dir, text_dir) from a CLIP run folder or a vision tower folder (+ the run to take text from)."""
    model_path = Path(model_path)
    if (model_path / "vision_tower" / "config.json").is_file():
        vision_dir, run = model_path / "vision_tower", model_path
    elif (model_path / "config.json").is_file():
        vision_dir, run = model_path, model_path.parent
    else:
        raise FileNotFoundError(f"{model_path}: neither a CLIP run folder (vision_tower/) nor a DripVisionModel folder")
    text_run = Path(text_from) if text_from else run
    text_dir = text_run / "text_tower" if (text_run / "text_tower").is_dir() else text_run
    if not (text_dir / "config.json").is_file():
        raise FileNotFoundError(f"no text tower for {model_path}: pass --text-model-from RUN (a CLIP run folder "
                                f"with text_tower/); looked in {text_dir}")
    return vision_dir, text_dir
