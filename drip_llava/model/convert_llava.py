"""LLaVA-1.5 checkpoints as DripLlavaForCausalLM, the tower a DRIP model at compression 1 (the plain CLIP ViT).

Two layouts, told apart by config.json alone:
  llava_hf        transformers' LlavaForConditionalGeneration (llava-hf/llava-1.5-7b-hf): model_type "llava",
                  text_config (Llama) + vision_config (CLIP); LLM, projector and CLIP tower in one set of weights
  llava_upstream  haotian-liu/LLaVA's LlavaLlamaForCausalLM (liuhaotian/llava-v1.5-7b): model_type "llava_llama";
                  Llama + model.mm_projector.* weights; the tower is the HF CLIP folder named by mm_vision_tower

The LLM and projector load through transformers' from_pretrained with a declared key mapping (so dtype,
quantization and sharded/.bin files behave as for any HF model); the CLIP tower is converted by
drip_llava.vision.hf_clip_import. Both loads are strict: any key left over or missing is an error.

  python -m drip_llava.model.convert_llava SRC OUT [--vision-tower CLIP_DIR]   # writes a "full" DripLlava folder
"""
from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from drip_llava.model.llava_llama import DripLlavaConfig, DripLlavaForCausalLM
from drip_llava.model.projector import build_projector
from drip_llava.vision.hf_clip_import import (
    convert_clip_vision_state,
    drip_config_from_clip,
    is_hf_clip_folder,
    load_converted,
    load_folder_state,
    read_json,
    strip_vision_prefix,
    vision_config_dict,
    vision_keys,
    weight_files,
)

logger = logging.getLogger(__name__)

LLAVA_HF, LLAVA_UPSTREAM = "llava_hf", "llava_upstream"
LLAVA_KINDS = (LLAVA_HF, LLAVA_UPSTREAM)
CONV_MODE = "vicuna_v1"  # LLaVA-1.5's template (upstream evaluates with --conv-mode vicuna_v1)

# Checkpoint key -> DripLlavaForCausalLM key (transformers' key_mapping format: regex -> replacement).
# llava-hf folders exist in two spellings: the hub's (language_model.model.*, as transformers still saves) and
# transformers 5's module names (model.language_model.*).
LLAVA_HF_KEY_MAPPING = {
    r"^language_model\.lm_head\.": "lm_head.",
    r"^language_model\.model\.": "model.",
    r"^model\.language_model\.": "model.",
    r"^(?:model\.)?multi_modal_projector\.linear_1\.": "mm_projector.0.",
    r"^(?:model\.)?multi_modal_projector\.linear_2\.": "mm_projector.2.",
}
LLAVA_HF_VISION = re.compile(r"^(?:model\.)?vision_tower\.(?:vision_model\.)?")
LLAVA_UPSTREAM_KEY_MAPPING = {r"^model\.mm_projector\.": "mm_projector."}
LLAVA_UPSTREAM_VISION = re.compile(r"^model\.vision_tower\.vision_tower\.(?:vision_model\.)?")  # when unfrozen+saved

_LLAVA_ONLY_KEYS = ("mm_", "image_aspect_ratio", "tune_mm", "freeze_mm", "use_mm_proj", "unfreeze_mm", "s2",
                    "tokenizer_model_max_length", "tokenizer_padding_side", "image_grid_pinpoints")


def detect_llava_layout(config: dict) -> Optional[str]:
    """LLAVA_HF / LLAVA_UPSTREAM from a config.json dict (model_type, architectures), else None."""
    if config.get("model_type") == "llava":
        return LLAVA_HF
    if config.get("model_type") == "llava_llama" or "LlavaLlamaForCausalLM" in (config.get("architectures") or []):
        return LLAVA_UPSTREAM
    return None


@dataclass
class ConversionPlan:
    kind: str  # LLAVA_HF | LLAVA_UPSTREAM
    config: DripLlavaConfig
    key_mapping: dict[str, str]
    vision_folder: Path  # where the CLIP vision weights are read
    vision_keep: Callable[[str], bool]  # which of its keys are the tower's
    vision_prefix: Optional[re.Pattern]  # stripped from those keys (None: an HF CLIP folder, see hf_clip_import)
    notes: list[str] = field(default_factory=list)


def _unsupported(folder: Path, what: str) -> ValueError:
    return ValueError(f"{folder}: {what} is not supported (DripLlava loads LLaVA-1.5: one 336-px CLIP image, "
                      "patch features of one layer, an MLP projector)")


def _drip_config(llama: dict, vision: dict, preprocessor: Optional[dict], select_layer: int, projector: str,
                 source: str, **extra) -> DripLlavaConfig:
    tower = drip_config_from_clip(vision, preprocessor)  # compression 1: the pretrained ViT as it is
    build_projector(projector, tower.hidden_size, llama["hidden_size"])  # an unknown kind fails here, early
    llama = {k: v for k, v in llama.items() if k not in ("model_type", "architectures", "transformers_version",
                                                         "_name_or_path", "auto_map")}
    return DripLlavaConfig(**{**llama, **extra}, vision_config=tower.to_dict(), mm_vision_select_layer=select_layer,
                           mm_projector_type=projector, mm_hidden_size=tower.hidden_size, mm_vision_tower=source,
                           architectures=["DripLlavaForCausalLM"])


def plan_llava_hf(folder: Path) -> ConversionPlan:
    from transformers import CLIPVisionConfig, LlamaConfig

    cfg = read_json(folder / "config.json")
    text, vision = dict(cfg.get("text_config") or {}), dict(cfg.get("vision_config") or {})
    if text.get("model_type", "llama") != "llama":
        raise _unsupported(folder, f"a {text.get('model_type')!r} LLM (DripLlava is Llama-architecture)")
    if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise _unsupported(folder, f"a {vision.get('model_type')!r} vision tower")
    if cfg.get("vision_feature_select_strategy", "default") != "default":
        raise _unsupported(folder, f"vision_feature_select_strategy={cfg['vision_feature_select_strategy']!r} "
                                   "(CLS kept)")
    layer = cfg.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise _unsupported(folder, f"vision_feature_layer={layer!r} (several layers)")
    if cfg.get("projector_hidden_act", "gelu") != "gelu" or not cfg.get("multimodal_projector_bias", True):
        raise _unsupported(folder, "a projector other than Linear-GELU-Linear with biases")
    llama = LlamaConfig(**{k: v for k, v in text.items() if k != "model_type"}).to_dict()
    vision = vision_config_dict({**CLIPVisionConfig(**{k: v for k, v in vision.items() if k != "model_type"})
                                .to_dict(), "model_type": "clip_vision_model"})
    pre = folder / "preprocessor_config.json"
    config = _drip_config(llama, vision, read_json(pre) if pre.is_file() else None, layer, "mlp2x_gelu",
                          source=str(folder), conv_mode=CONV_MODE, tie_word_embeddings=cfg.get(
                              "tie_word_embeddings", llama.get("tie_word_embeddings", False)))
    return ConversionPlan(LLAVA_HF, config, LLAVA_HF_KEY_MAPPING, folder, lambda k: bool(LLAVA_HF_VISION.match(k)),
                          LLAVA_HF_VISION)


def resolve_clip_folder(name: str, model_folder: Path, override: Optional[str | Path] = None) -> Path:
    """The local HF CLIP folder for upstream's mm_vision_tower: `override`, else the path as written (relative
    to the working directory, then to the checkpoint), else the hub id's snapshot in the local HF cache."""
    if override is not None:
        candidates = [Path(override).expanduser()]
    else:
        p = Path(name).expanduser()
        candidates = [p] if p.is_absolute() else [Path.cwd() / p, model_folder / p]
        try:
            from huggingface_hub import snapshot_download

            candidates.append(Path(snapshot_download(name, local_files_only=True)))
        except Exception:  # not a hub id, or not in the local cache: no network is used here
            pass
    for cand in candidates:
        if is_hf_clip_folder(cand):
            return cand
    if override is not None:
        raise FileNotFoundError(f"vision_tower {override}: not an HF CLIP folder (config.json with model_type clip "
                                "or clip_vision_model)")
    raise FileNotFoundError(
        f"{model_folder}/config.json names the vision tower {name!r}, which is not a local HF CLIP folder (looked "
        f"in {', '.join(str(c) for c in candidates)}). Download it once (e.g. `huggingface-cli download {name} "
        f"--local-dir DIR`) and pass the folder: load_pretrained_model(..., vision_tower=DIR) or "
        f"`python -m drip_llava.model.convert_llava {model_folder} OUT --vision-tower DIR`")


def plan_llava_upstream(folder: Path, vision_tower: Optional[str | Path] = None) -> ConversionPlan:
    from transformers import LlamaConfig

    cfg = read_json(folder / "config.json")
    if cfg.get("model_type", "llava_llama") != "llava_llama":
        raise _unsupported(folder, f"model_type {cfg.get('model_type')!r} (only LlavaLlamaForCausalLM)")
    checks = {"mm_use_im_start_end": (False, None), "mm_vision_select_feature": ("patch", None),
              "mm_patch_merge_type": ("flat", None), "s2": (False, None),
              "image_aspect_ratio": ("pad", "square", None)}
    for key, allowed in checks.items():
        if cfg.get(key) not in allowed:
            raise _unsupported(folder, f"{key}={cfg[key]!r}")
    name = cfg.get("mm_vision_tower") or cfg.get("vision_tower")
    if not name:
        raise ValueError(f"{folder}/config.json has no mm_vision_tower: not a multimodal LLaVA checkpoint")
    clip_dir = resolve_clip_folder(name, folder, vision_tower)
    clip_cfg = read_json(clip_dir / "config.json")
    width = vision_config_dict(clip_cfg)["hidden_size"]
    if cfg.get("mm_hidden_size") not in (None, width):
        raise ValueError(f"mm_hidden_size mismatch: {folder} was trained on a tower of width {cfg['mm_hidden_size']}, "
                         f"the CLIP folder {clip_dir} has width {width}")
    pre = clip_dir / "preprocessor_config.json"
    llama_fields = set(LlamaConfig().to_dict())
    llama = {k: v for k, v in cfg.items() if k in llama_fields and not k.startswith(_LLAVA_ONLY_KEYS)}
    llama = LlamaConfig(**llama).to_dict()
    config = _drip_config(llama, vision_config_dict(clip_cfg), read_json(pre) if pre.is_file() else None,
                          cfg.get("mm_vision_select_layer", -2), cfg.get("mm_projector_type", "linear"),
                          source=str(clip_dir), conv_mode=CONV_MODE,
                          image_aspect_ratio=cfg.get("image_aspect_ratio", "square"))
    # The tower's weights are the CLIP folder's, unless the checkpoint saved its own (an unfrozen tower).
    has_own = any(LLAVA_UPSTREAM_VISION.match(k) for k in _weight_names(folder))
    notes = [f"vision tower weights from {'the checkpoint' if has_own else clip_dir}"]
    if has_own:
        return ConversionPlan(LLAVA_UPSTREAM, config, LLAVA_UPSTREAM_KEY_MAPPING, folder,
                              lambda k: bool(LLAVA_UPSTREAM_VISION.match(k)), LLAVA_UPSTREAM_VISION, notes)
    return ConversionPlan(LLAVA_UPSTREAM, config, LLAVA_UPSTREAM_KEY_MAPPING, clip_dir,
                          vision_keys(clip_cfg["model_type"]), None, notes)


def _weight_names(folder: Path) -> list[str]:
    index = [f for f in ("model.safetensors.index.json", "pytorch_model.bin.index.json") if (folder / f).is_file()]
    if index:
        return list(read_json(folder / index[0])["weight_map"])
    names: list[str] = []
    for f in weight_files(folder):
        if f.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as sf:
                names.extend(sf.keys())
        else:
            names.extend(torch.load(str(f), map_location="meta", weights_only=True, mmap=True))
    return names


def plan_conversion(folder: str | Path, vision_tower: Optional[str | Path] = None) -> ConversionPlan:
    folder = Path(folder).expanduser()
    kind = detect_llava_layout(read_json(folder / "config.json"))
    if kind == LLAVA_HF:
        if vision_tower is not None:
            raise ValueError(f"{folder} is a llava-hf folder with its own CLIP weights; vision_tower is not used")
        return plan_llava_hf(folder)
    if kind == LLAVA_UPSTREAM:
        return plan_llava_upstream(folder, vision_tower)
    raise ValueError(f"{folder}/config.json is not a LLaVA-1.5 config (model_type llava or llava_llama)")


def load_llava(folder: str | Path, vision_tower: Optional[str | Path] = None,
               **load_kwargs) -> tuple[DripLlavaForCausalLM, list[str]]:
    """(DripLlavaForCausalLM, notes) from a llava-hf or upstream LLaVA-1.5 folder. `load_kwargs` go to
    from_pretrained (dtype, quantization_config, device_map). Strict: every checkpoint key is used and every
    model key is filled (a CLIPVisionModel has no projection, so the DRIP tower's unused `proj` stays fresh)."""
    from drip_llava.model.builder import _quiet_transformers

    folder = Path(folder).expanduser()
    plan = plan_conversion(folder, vision_tower)
    with _quiet_transformers():  # the tower is reported missing from the LLM load; it is filled right below
        model, info = DripLlavaForCausalLM.from_pretrained(str(folder), config=plan.config,
                                                           key_mapping=plan.key_mapping, output_loading_info=True,
                                                           **load_kwargs)
    # transformers remembers the key mapping to write the original names back on save_pretrained; a converted
    # model saves under its own (DripLlava) names
    model._weight_conversions = [c for c in (getattr(model, "_weight_conversions", None) or [])
                                 if not set(getattr(c, "source_patterns", ())) & set(plan.key_mapping)]
    vision_in_llm_files = plan.vision_folder == folder
    unexpected = [k for k in info["unexpected_keys"] if not (vision_in_llm_files and plan.vision_keep(k))]
    missing = [k for k in info["missing_keys"] if not k.startswith("vision_tower.")]
    if unexpected or missing or info.get("mismatched_keys"):
        raise RuntimeError(f"{folder}: checkpoint keys the model does not have {unexpected[:10]}, model keys the "
                           f"checkpoint lacks {missing[:10]}, shape mismatches {list(info.get('mismatched_keys'))[:5]}")
    state = load_folder_state(plan.vision_folder, plan.vision_keep)
    state = ({plan.vision_prefix.sub("", k): v for k, v in state.items()} if plan.vision_prefix is not None
             else strip_vision_prefix(state))
    tower = model.vision_tower.model
    fresh = load_converted(tower, convert_clip_vision_state(state), f"vision tower from {plan.vision_folder}")
    notes = plan.notes + [f"converted from the {plan.kind} layout"]
    if fresh:
        notes.append(f"tower keys without CLIP weights (unused by LLaVA): {fresh}")
    return model, notes


def convert(src: str | Path, out: str | Path, vision_tower: Optional[str | Path] = None,
            dtype: torch.dtype = torch.float16) -> Path:
    """Write `src` (llava-hf or upstream LLaVA-1.5) as a "full" DripLlava folder: config.json (+ conv_mode),
    model.safetensors, the tokenizer, and preprocessor_config.json (the image preprocessing `src` loads with)."""
    from transformers import AutoTokenizer

    from drip_llava.data.image_processor import load_image_processor

    src, out = Path(src).expanduser(), Path(out)
    model, notes = load_llava(src, vision_tower, dtype=dtype)
    processor, note = load_image_processor(src, model.config.vision_config, model.config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(out)
    processor.save_pretrained(out)
    notes += [note] if note else []
    for note in notes:
        logger.info(note)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="LLaVA-1.5 (llava-hf or upstream layout) -> a DripLlava folder")
    p.add_argument("src", help="llava-hf folder (LlavaForConditionalGeneration) or upstream LLaVA folder")
    p.add_argument("out", help="output folder (load it with load_pretrained_model, serve, eval)")
    p.add_argument("--vision-tower", default=None, help="local HF CLIP folder for an upstream checkpoint whose "
                                                        "mm_vision_tower is a hub id")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(convert(a.src, a.out, a.vision_tower, getattr(torch, a.dtype)))


if __name__ == "__main__":
    main()
