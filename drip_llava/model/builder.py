"""Load a drip-llava checkpoint for inference, deciding what it is from the files present (never its name).

  full       config.json (model_type drip_llava_llama) + model.safetensors[.index.json]
  lora       adapter_config.json (+ model_base, + non_lora_trainables.safetensors, config.json); merged with peft
  projector  mm_projector.safetensors (+ model_base, + config.json of the stage-1 run)
  llava_hf / llava_upstream  LLaVA-1.5 folders (config.json model_type llava / llava_llama), converted on load
             by drip_llava.model.convert_llava: the tower becomes DRIP at compression 1 (the CLIP ViT as it is)

For lora/projector folders the tower weights come from, in order: the folder's `vision_tower/` (written by
DripLlavaForCausalLM.save_mm_projector), `vision_tower.*` keys in non_lora_trainables, or the DRIP folder
recorded in config.mm_vision_tower. 4/8-bit loading keeps the projector, the tower and lm_head unquantized.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from drip_llava.data.image_processor import load_image_processor
from drip_llava.model.convert_llava import LLAVA_KINDS, detect_llava_layout, load_llava
from drip_llava.model.llava_llama import DripLlavaConfig, DripLlavaForCausalLM
from drip_llava.model.projector import PROJECTOR_FILE
from drip_llava.vision.hf_clip_import import weight_files
from drip_llava.vision.spec import architecture_diff

logger = logging.getLogger(__name__)

MODEL_TYPE = DripLlavaConfig.model_type
NON_QUANTIZED_MODULES = ["mm_projector", "vision_tower", "lm_head"]
NON_LORA_FILE = "non_lora_trainables.safetensors"


@dataclass
class LoadedModel:
    tokenizer: Any
    model: Any
    image_processor: Any  # DripLlavaImageProcessor: PIL image or path -> normalised [3,H,W] tensor
    context_len: int
    kind: str = "full"  # which layout was found: full | lora | projector
    model_path: str = ""
    notes: list[str] = field(default_factory=list)

    def __iter__(self):  # LLaVA habit: tokenizer, model, image_processor, context_len = load_pretrained_model(...)
        return iter((self.tokenizer, self.model, self.image_processor, self.context_len))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def detect_checkpoint_kind(model_path: str | Path) -> str:
    """'lora' | 'full' | 'projector' | 'llava_hf' | 'llava_upstream' (LLaVA-1.5 layouts, converted on load by
    drip_llava.model.convert_llava), from the files in `model_path`; a clear error otherwise."""
    folder = Path(model_path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model path {folder} is not a folder")
    names = set(_files(folder))
    if "adapter_config.json" in names:
        return "lora"
    has_weights = "model.safetensors" in names or "model.safetensors.index.json" in names
    model_type = _read_json(folder / "config.json").get("model_type") if "config.json" in names else None
    if has_weights and model_type == MODEL_TYPE:
        return "full"
    llava_kind = detect_llava_layout(_read_json(folder / "config.json")) if "config.json" in names else None
    if llava_kind is not None:
        weight_files(folder)  # a clear error when the folder has none
        return llava_kind
    if PROJECTOR_FILE in names or "mm_projector.bin" in names:
        return "projector"
    if has_weights and model_type is not None:
        raise ValueError(f"{folder} holds a plain {model_type!r} model (no vision modules); pass it as model_base "
                         f"next to a projector or LoRA folder")
    raise FileNotFoundError(
        f"{folder} is not a drip-llava checkpoint: expected config.json (model_type {MODEL_TYPE}) + "
        f"model.safetensors, or {PROJECTOR_FILE}, or adapter_config.json; found {sorted(names)}")


def _quantization_config(load_8bit: bool, load_4bit: bool, dtype: torch.dtype):
    if load_8bit and load_4bit:
        raise ValueError("choose one of load_8bit / load_4bit")
    if not (load_8bit or load_4bit):
        return None
    from transformers import BitsAndBytesConfig

    if load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=NON_QUANTIZED_MODULES)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True,
                              bnb_4bit_quant_type="nf4", llm_int8_skip_modules=NON_QUANTIZED_MODULES)


def _check_base(cfg: DripLlavaConfig, model_base: str, folder: Path) -> None:
    base = _read_json(Path(model_base) / "config.json")
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if key in base and base[key] != getattr(cfg, key):
            raise ValueError(f"model_base {model_base} has {key}={base[key]}, but {folder} was trained on an LLM with "
                             f"{key}={getattr(cfg, key)}: pass the base LLM used for training")


def _tower_state(cfg: DripLlavaConfig, folder: Path, non_lora: dict[str, torch.Tensor]) -> dict | None:
    """Tower weights for a lora/projector folder (None when non_lora_trainables carries them)."""
    from drip_llava.vision.families import from_pretrained as load_tower  # any tower family

    if any(k.startswith("vision_tower.") for k in non_lora):
        return None
    candidates = [folder / "vision_tower"]
    if cfg.mm_vision_tower:
        candidates.append(Path(cfg.mm_vision_tower).expanduser())
    for cand in candidates:
        if (cand / "config.json").is_file():
            tower = load_tower(cand)
            saved, found = cfg.vision_config, tower.config.to_dict()
            diff = architecture_diff(saved, found)
            if diff:
                raise ValueError(f"vision tower {cand} does not match the tower {folder} was trained with "
                                 f"(field: (trained, found)): {diff}")
            return tower.state_dict()
    raise FileNotFoundError(
        f"{folder}: no tower weights: no vision_tower/ folder, no vision_tower.* keys in {NON_LORA_FILE}, and "
        f"config.mm_vision_tower={cfg.mm_vision_tower!r} is not a DRIP folder (found: {_files(folder)})")


def _normalise_non_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as named in DripLlavaForCausalLM: drop peft's `base_model.model.` and LLaVA's `model.` before the
    vision modules."""
    out = {}
    for k, v in state.items():
        while k.startswith("base_model.model."):
            k = k[len("base_model.model."):]
        for mod in ("mm_projector.", "vision_tower."):
            if mod in k:
                k = mod + k.split(mod, 1)[1]
        out[k] = v
    return out


def _load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    ref = model.state_dict()
    unknown = sorted(k for k in state if k not in ref)
    if unknown:
        more = " ..." if len(unknown) > 10 else ""
        raise ValueError(f"{where}: keys that the model does not have: {unknown[:10]}{more}")
    for k, v in state.items():
        if v.shape != ref[k].shape:
            raise ValueError(f"{where}: {k} has shape {tuple(v.shape)}, the model expects {tuple(ref[k].shape)}")
    model.load_state_dict({k: v.to(ref[k].dtype) for k, v in state.items()}, strict=False)


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


def _load_with_base(folder: Path, kind: str, model_base: str | None, load_kwargs: dict) -> DripLlavaForCausalLM:
    from safetensors.torch import load_file

    names = set(_files(folder))
    if model_base is None and kind == "lora":
        base = _read_json(folder / "adapter_config.json").get("base_model_name_or_path")
        model_base = base if base and Path(base).is_dir() else None
    if model_base is None:
        raise ValueError(f"{folder} holds only {'a LoRA adapter' if kind == 'lora' else 'a projector'} "
                         f"(files: {sorted(names)}); pass model_base=<the base LLM folder>")
    if "config.json" not in names:
        raise FileNotFoundError(f"{folder} lacks config.json (the {MODEL_TYPE} config that describes the tower and "
                                f"projector); found {sorted(names)}")
    cfg = DripLlavaConfig.from_pretrained(str(folder))
    if cfg.vision_config is None:
        raise ValueError(f"{folder}/config.json has no vision_config; it was not written by a drip-llava run")
    _check_base(cfg, model_base, folder)
    non_lora: dict[str, torch.Tensor] = {}
    if kind == "lora":
        if NON_LORA_FILE not in names:
            raise FileNotFoundError(f"{folder} has adapter_config.json but no {NON_LORA_FILE} (projector weights); "
                                    f"found {sorted(names)}")
        non_lora = _normalise_non_lora(load_file(str(folder / NON_LORA_FILE)))
    tower_state = _tower_state(cfg, folder, non_lora)  # fail on missing tower weights before the big load
    # The tower / projector are reported missing from the base LLM; they are filled right below.
    with _quiet_transformers():
        model = DripLlavaForCausalLM.from_pretrained(model_base, config=cfg, **load_kwargs)
    logger.info("loaded base LLM %s; vision tower and projector weights from %s", model_base, folder)
    if tower_state is not None:
        _load_into(model.vision_tower.model, tower_state, f"vision tower for {folder}")
    if kind == "projector":
        model.load_mm_projector(folder)
    else:
        if not any(k.startswith("mm_projector.") for k in non_lora) and len(list(model.mm_projector.parameters())):
            raise ValueError(f"{folder / NON_LORA_FILE} holds no mm_projector.* weights")
        _load_into(model, non_lora, str(folder / NON_LORA_FILE))
    return model


def load_pretrained_model(model_path: str | Path, model_base: str | Path | None = None, load_8bit: bool = False,
                          load_4bit: bool = False, device: str | torch.device | None = None,
                          torch_dtype: torch.dtype | None = None,
                          vision_tower: str | Path | None = None) -> LoadedModel:
    """Tokenizer + model + image processor for a full, LoRA or projector-only folder, or a LLaVA-1.5 folder in
    llava-hf or upstream layout (see module doc). LoRA adapters are merged, except on a quantized base (kept as
    a peft model: merging needs full weights). `vision_tower`: the local HF CLIP folder for an upstream
    checkpoint whose mm_vision_tower is a hub id."""
    from transformers import AutoTokenizer

    folder = Path(model_path).expanduser()
    kind = detect_checkpoint_kind(folder)
    device = torch.device(device) if device is not None else default_device()
    dtype = torch_dtype or default_dtype(device)
    quant = _quantization_config(load_8bit, load_4bit, dtype)
    load_kwargs: dict[str, Any] = {"dtype": dtype}
    if quant is not None:
        load_kwargs.update(quantization_config=quant, device_map={"": str(device)})
    base = str(Path(model_base).expanduser()) if model_base is not None else None

    notes = []
    if kind == "full":
        if base is not None:
            notes.append(f"model_base {base} ignored: {folder} is a full checkpoint")
            logger.warning(notes[-1])
        model = DripLlavaForCausalLM.from_pretrained(str(folder), **load_kwargs)
    elif kind in LLAVA_KINDS:
        model, llava_notes = load_llava(folder, vision_tower, **load_kwargs)
        notes.extend(llava_notes)
    else:
        model = _load_with_base(folder, kind, base, load_kwargs)
        if kind == "lora":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(folder))
            if quant is None:
                model = model.merge_and_unload()
            else:
                notes.append("LoRA kept unmerged on the quantized base")
    if quant is None:
        model = model.to(device)
    model.eval()

    tok_files = {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"}
    tok_src = folder if tok_files & set(_files(folder)) else (Path(base) if base else None)
    if tok_src is None:
        raise FileNotFoundError(f"no tokenizer files in {folder} (found {_files(folder)}) and no model_base")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_src))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    tower = inner.get_vision_tower()
    # the preprocessing trained with: preprocessor_config.json, else the recorded aspect ratio, else square
    image_processor, note = load_image_processor(folder, tower.config, inner.config)
    if note:
        notes.append(note)
        logger.info(note)
    context_len = int(getattr(inner.config, "max_position_embeddings", 2048) or 2048)
    return LoadedModel(tokenizer=tokenizer, model=model, image_processor=image_processor,
                       context_len=context_len, kind=kind, model_path=str(folder), notes=notes)
