"""Training recipes as named strategy classes: how to load the model, what to freeze or wrap, what to save.

  stage1  projector only (LLaVA stage 1): LLM and tower frozen; writes mm_projector.safetensors + config.json
          + vision_tower/ (so `load_pretrained_model(OUT, model_base=LLM)` works).
  full    LLM + projector trained; the Trainer writes the whole model (config + safetensors).
  lora    LoRA on the LLM's linear layers, projector trained at --mm_projector_lr; writes the peft adapter +
          non_lora_trainables.safetensors + config.json + vision_tower/, at the end AND in every checkpoint-N.
  The tower is frozen unless --unfreeze_mm_vision_tower (full / lora / qlora): then all of it trains (at
  --learning_rate), its weights are saved (vision_tower/, and the full model), and DRIP's rate loss joins the loss.
  qlora   lora on a 4/8-bit LLM (bitsandbytes); the projector and the tower stay out of quantization.

Under ZeRO-3 every parameter is partitioned (an empty tensor on each rank), so the saved weights are gathered
first with deepspeed.zero.GatheredParameters, on every rank (it is a collective), written by the main rank.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import re
from contextlib import contextmanager

import torch
from torch import nn

from ..data.image_processor import DripLlavaImageProcessor
from ..model.builder import NON_LORA_FILE
from ..model.llava_llama import DripLlavaForCausalLM
from ..model.vision_tower import DripVisionTower
from ..vision.config import parse_overrides
from ..vision.spec import architecture_diff

logger = logging.getLogger(__name__)

RECIPES: dict[str, type] = {}


def register_recipe(name: str):
    def deco(cls):
        if name in RECIPES:
            raise KeyError(f"recipe {name!r} registered twice")
        cls.name = name
        RECIPES[name] = cls
        return cls
    return deco


def get_recipe(name: str, model_args, data_args, training_args) -> "Recipe":
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; valid: {', '.join(sorted(RECIPES))}")
    return RECIPES[name](model_args, data_args, training_args)


def unwrap(model: nn.Module) -> DripLlavaForCausalLM:
    """The DripLlavaForCausalLM inside a peft wrapper (or the model itself)."""
    while not isinstance(model, DripLlavaForCausalLM):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module"):
            model = model.module
        else:
            raise TypeError(f"{type(model).__name__} does not wrap a DripLlavaForCausalLM")
    return model


@contextmanager
def gathered(params: list):
    """Full parameters inside the block on every rank under ZeRO-3 (read-only); a no-op otherwise."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def gathered_state(named: list[tuple[str, torch.Tensor]]) -> dict:
    """{name: full CPU copy} of (possibly ZeRO-3 partitioned) parameters; call on every rank."""
    with gathered([p for _, p in named]):
        return {n: p.detach().cpu().clone() for n, p in named}


def compute_dtype(training_args) -> torch.dtype:
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return torch.float32


def save_model_config(config, out_dir: str, conv_mode: str | None = None) -> None:
    """The DripLlava config as an inference config: without the training-time quantization (a QLoRA run must not
    make its readers quantize the base), with the KV cache on, and recording the conversation template trained
    with (`conv_mode`, which serving and eval use by default)."""
    clean = copy.deepcopy(config)
    if hasattr(clean, "quantization_config"):
        del clean.quantization_config
    clean.use_cache = True
    if conv_mode is not None:
        clean.conv_mode = conv_mode
    clean.save_pretrained(out_dir)


def check_stage1_tower(config, adapter: str) -> None:
    """A stage-1 projector was aligned to one tower's tokens: refuse another tower architecture or feature block
    (same width but e.g. another compression would silently mis-align; LLaVA only caught width changes)."""
    folder = adapter if os.path.isdir(adapter) else os.path.dirname(os.path.abspath(adapter))
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return  # a bare projector file (e.g. LLaVA's mm_projector.bin): only the widths were checked
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    if not saved.get("vision_config"):
        return
    now = config.vision_config or {}
    diff = architecture_diff(saved["vision_config"], now)
    if saved.get("mm_vision_select_layer", config.mm_vision_select_layer) != config.mm_vision_select_layer:
        diff["mm_vision_select_layer"] = (saved["mm_vision_select_layer"], config.mm_vision_select_layer)
    if diff:
        raise ValueError(f"--pretrain_mm_mlp_adapter {adapter} was trained with another vision tower "
                         f"(field: (stage 1, now)): {diff}; use that tower or retrain stage 1")


class Recipe:
    """Base: load the LLM into DripLlavaForCausalLM and attach/restore the vision modules."""

    name = ""
    saves_full_model = True  # whether the Trainer's own model save is a useful output at the end
    # checkpoint-N holds only what trains (recipe files + optimizer state); a resume takes the frozen rest from
    # --model_name_or_path / --vision_tower again instead of storing the whole LLM in every checkpoint
    trainable_only_checkpoints = False

    def __init__(self, model_args, data_args, training_args):
        self.model_args, self.data_args, self.args = model_args, data_args, training_args

    # ---- model ---------------------------------------------------------------------------------------
    def from_pretrained_kwargs(self) -> dict:
        return {"dtype": compute_dtype(self.args), "attn_implementation": self.model_args.attn_implementation,
                "cache_dir": self.args.cache_dir}

    def load_model(self) -> DripLlavaForCausalLM:
        m = self.model_args
        model = DripLlavaForCausalLM.from_pretrained(m.model_name_or_path, **self.from_pretrained_kwargs())
        model.config.use_cache = False
        if m.vision_tower is not None:
            model.initialize_vision_modules(m.vision_tower, projector_type=m.mm_projector_type,
                                            select_layer=m.mm_vision_select_layer,
                                            pretrain_mm_mlp_adapter=m.pretrain_mm_mlp_adapter,
                                            unfreeze_vision_tower=m.unfreeze_mm_vision_tower,
                                            **parse_overrides(m.vision_override))
            if m.vision_override and not m.unfreeze_mm_vision_tower:
                logger.warning("--vision_override %s on a frozen tower: a fresh boundary predictor stays untrained "
                               "(finetune the tower with vision_pretrain.clip first, or add "
                               "--unfreeze_mm_vision_tower True)", " ".join(m.vision_override))
        elif m.vision_override:
            raise ValueError("--vision_override needs --vision_tower: the tower of a saved model is rebuilt from its "
                             "own config")
        elif model.get_vision_tower() is None:
            raise ValueError(f"{m.model_name_or_path} has no vision tower: pass --vision_tower (a DripVisionModel "
                             "folder or preset)")
        else:
            if m.pretrain_mm_mlp_adapter:
                model.load_mm_projector(m.pretrain_mm_mlp_adapter)
            model.get_vision_tower().set_frozen(not m.unfreeze_mm_vision_tower)  # this run's flag, not the saved one
            if m.unfreeze_mm_vision_tower:  # trained weights in fp32 (autocast computes; DeepSpeed keeps a master)
                model.get_vision_tower().float()
            model.config.unfreeze_mm_vision_tower = m.unfreeze_mm_vision_tower
        if m.pretrain_mm_mlp_adapter:
            check_stage1_tower(model.config, m.pretrain_mm_mlp_adapter)
        return model

    def configure(self, model: DripLlavaForCausalLM) -> nn.Module:
        """Freeze / wrap; returns the model to train."""
        raise NotImplementedError

    def _enable_input_grads(self, model: nn.Module) -> None:
        """Checkpointed blocks need inputs that require grad when the embeddings are frozen."""
        if self.args.gradient_checkpointing:
            model.enable_input_require_grads()
            if self.args.gradient_checkpointing_kwargs is None:
                self.args.gradient_checkpointing_kwargs = {"use_reentrant": False}

    # ---- parts -----------------------------------------------------------------------------------------
    @staticmethod
    def vision_tower(model: nn.Module) -> DripVisionTower:
        return unwrap(model).get_vision_tower()

    def image_processor(self, model: nn.Module) -> DripLlavaImageProcessor:
        """The image preprocessing trained with (the tower's transform + --image_aspect_ratio); every save writes it
        as preprocessor_config.json, which serving and eval load."""
        return DripLlavaImageProcessor.from_vision_config(self.vision_tower(model).config,
                                                          self.data_args.image_aspect_ratio)

    @staticmethod
    def projector_parameters(model: nn.Module) -> list:
        return list(unwrap(model).mm_projector.parameters())

    def _set_projector_trainable(self, model: nn.Module) -> None:
        unwrap(model).mm_projector.requires_grad_(not self.args.freeze_mm_mlp_adapter)

    @staticmethod
    def _set_tower_trainable(model: nn.Module) -> None:
        """All of the tower trains when it was built unfrozen (--unfreeze_mm_vision_tower), none of it otherwise."""
        tower = unwrap(model).get_vision_tower()
        tower.requires_grad_(not tower.frozen)

    # ---- saving ----------------------------------------------------------------------------------------
    def save(self, model: nn.Module, out_dir: str, is_main: bool, final: bool) -> None:
        """Recipe files in `out_dir` (output_dir at the end, checkpoint-N during training)."""

    def load_trainable(self, model: nn.Module, ckpt_dir: str) -> None:
        """Restore what `save` wrote to checkpoint-N (resume without DeepSpeed, trainable_only_checkpoints)."""
        raise NotImplementedError(f"recipe {self.name!r} has no trainable-only checkpoints")

    def _save_config_and_tower(self, model: nn.Module, out_dir: str, is_main: bool) -> None:
        """config.json (the DripLlava config: tower config, select layer, projector kind) and vision_tower/
        (gathered weights), so the folder loads without the original tower path."""
        base = unwrap(model)
        tower = base.get_vision_tower().model
        state = gathered_state(list(tower.named_parameters()))
        if is_main:
            os.makedirs(out_dir, exist_ok=True)
            save_model_config(base.config, out_dir, self.model_args.version)
            self.image_processor(model).save_pretrained(out_dir)
            tower.save_pretrained(os.path.join(out_dir, "vision_tower"), state_dict=state)

    def _save_args(self, out_dir: str) -> None:
        from .params import args_to_json

        with open(os.path.join(out_dir, "drip_llava_args.json"), "w", encoding="utf-8") as f:
            f.write(args_to_json(self.model_args, self.data_args, self.args))


@register_recipe("stage1")
class Stage1Recipe(Recipe):
    """Feature alignment: only the projector learns."""

    saves_full_model = False
    trainable_only_checkpoints = True

    def configure(self, model):
        model.requires_grad_(False)
        unwrap(model).mm_projector.requires_grad_(True)
        self._enable_input_grads(model)
        return model

    def save(self, model, out_dir, is_main, final):
        base = unwrap(model)
        proj = gathered_state(list(base.mm_projector.named_parameters()))
        if is_main:
            base.save_mm_projector(out_dir, state_dict=proj, include_vision_tower=False)
        self._save_config_and_tower(model, out_dir, is_main)  # after: its inference config.json wins
        if is_main:
            self._save_args(out_dir)

    def load_trainable(self, model, ckpt_dir):
        unwrap(model).load_mm_projector(os.path.join(ckpt_dir, "mm_projector.safetensors"))


@register_recipe("full")
class FullRecipe(Recipe):
    """LLM + projector trained (+ the tower with --unfreeze_mm_vision_tower); --freeze_backbone keeps the LLM
    frozen."""

    def from_pretrained_kwargs(self):
        """Trained weights stay fp32 under autocast without DeepSpeed (fp16/bf16 weights updated by AdamW lose
        small updates; fp16 ones fail GradScaler's unscale); DeepSpeed keeps its own fp32 master copy."""
        kw = super().from_pretrained_kwargs()
        if not self.args.deepspeed and not self.model_args.freeze_backbone:
            kw["dtype"] = torch.float32
        return kw

    def configure(self, model):
        model.requires_grad_(not self.model_args.freeze_backbone)
        self._set_tower_trainable(model)
        self._set_projector_trainable(model)
        if self.model_args.freeze_backbone:
            self._enable_input_grads(model)
        return model

    def save(self, model, out_dir, is_main, final):
        if is_main:
            os.makedirs(out_dir, exist_ok=True)
            save_model_config(unwrap(model).config, out_dir, self.model_args.version)
            self.image_processor(model).save_pretrained(out_dir)
            self._save_args(out_dir)


def lora_target_regex(model: DripLlavaForCausalLM) -> str:
    """A full-name regex of the LLM decoder's linear layers (LoRA targets): the tower, the projector and lm_head
    are never matched, whatever their leaf names are."""
    leaves = set()
    for name, mod in model.model.named_modules():
        if isinstance(mod, nn.Linear) or type(mod).__name__ in ("Linear4bit", "Linear8bitLt"):
            leaves.add(name.rsplit(".", 1)[-1])
    if not leaves:
        raise ValueError("no linear layers found in the LLM for LoRA")
    return rf"^model\.layers\.\d+\..*\b(?:{'|'.join(sorted(map(re.escape, leaves)))})$"


@register_recipe("lora")
class LoraRecipe(Recipe):
    """LoRA adapters on the LLM + the projector at its own lr; the tower frozen unless --unfreeze_mm_vision_tower
    (then its weights are among the non-LoRA trainables and in vision_tower/)."""

    saves_full_model = False

    def lora_config(self, model):
        from peft import LoraConfig

        a = self.args
        return LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout, bias=a.lora_bias,
                          target_modules=lora_target_regex(model), task_type="CAUSAL_LM")

    def configure(self, model):
        from peft import PeftModel, get_peft_model

        model.requires_grad_(False)
        self._enable_input_grads(model)
        if self.args.lora_weight_path:
            model = PeftModel.from_pretrained(model, self.args.lora_weight_path, is_trainable=True)
        else:
            model = get_peft_model(model, self.lora_config(model))
        self._set_projector_trainable(model)
        self._set_tower_trainable(model)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        n_all = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
        logger.info("LoRA: %d trainable of %d parameters (%.2f%%)", n_train, n_all, 100 * n_train / max(n_all, 1))
        return model

    def save(self, model, out_dir, is_main, final):
        from safetensors.torch import save_file

        bias = self.args.lora_bias
        # the projector is saved even when frozen (--freeze_mm_mlp_adapter): the LoRA folder is loadable on its own
        proj = {id(p) for p in self.projector_parameters(model)}
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or id(p) in proj]
        state = gathered_state(named)
        self._save_config_and_tower(model, out_dir, is_main)
        if not is_main:
            return
        prefix = "base_model.model."
        lora = {n: t for n, t in state.items() if "lora_" in n or (bias != "none" and n.endswith(".bias"))}
        # non-LoRA trainables (the projector) keyed as in the DripLlava model: "mm_projector.0.weight"
        non_lora = {n[len(prefix):] if n.startswith(prefix) else n: t.contiguous()
                    for n, t in state.items() if "lora_" not in n}
        model.save_pretrained(out_dir, state_dict=lora)
        save_file(non_lora, os.path.join(out_dir, NON_LORA_FILE), metadata={"format": "pt"})
        self._save_args(out_dir)


@register_recipe("qlora")
class QLoraRecipe(LoraRecipe):
    """LoRA on a bitsandbytes 4-bit (NF4) or 8-bit LLM."""

    def from_pretrained_kwargs(self):
        from transformers import BitsAndBytesConfig

        a = self.args
        kw = super().from_pretrained_kwargs()
        # keep the vision modules (and lm_head) in full precision: 4-bit projector weights were LLaVA's bug
        skip = ["mm_projector", "vision_tower", "lm_head"]
        if a.bits == 4:
            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute_dtype(a),
                                   bnb_4bit_use_double_quant=a.double_quant, bnb_4bit_quant_type=a.quant_type,
                                   llm_int8_skip_modules=skip)
        else:
            q = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        kw.update(quantization_config=q, device_map={"": a.device})
        return kw

    def configure(self, model):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=self.args.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs
                                                or {"use_reentrant": False})
        logger.info("quantized linear layers: %s", quantized_layers(model))
        return super().configure(model)


def quantized_layers(model: nn.Module) -> dict[str, int]:
    """{bitsandbytes layer class: count}, e.g. {'Linear4bit': 14}: what --bits really did to the model."""
    import bitsandbytes as bnb

    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, kinds):
            out[type(m).__name__] = out.get(type(m).__name__, 0) + 1
    return out


def describe_trainable(model: nn.Module) -> dict:
    """{top-level part: trainable parameter count} for the start-up log."""
    out: dict = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            key = "projector" if "mm_projector" in n else "vision_tower" if "vision_tower" in n else \
                "lora" if "lora_" in n else "llm"
            out[key] = out.get(key, 0) + p.numel()
    return out


__all__ = ["RECIPES", "Recipe", "get_recipe", "register_recipe", "unwrap", "gathered", "gathered_state",
           "describe_trainable", "lora_target_regex", "compute_dtype"]
