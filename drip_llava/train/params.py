"""Command-line arguments of the LLaVA trainer: LLaVA's flag names and defaults, grouped as Model / Data / Training.

Flags LLaVA scripts pass that transformers 5 renamed (--warmup_ratio, --evaluation_strategy) are still accepted;
LLaVA flags for features we do not have (--mm_use_im_start_end True, ...) are rejected with a reason rather than
silently ignored.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

import transformers

RECIPE_NAMES = ("stage1", "full", "lora", "qlora")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "LLM folder (any Llama-architecture HF model), or a saved "
                                              "DripLlava folder to continue from"})
    version: str = field(default="v1", metadata={"help": "conversation template: plain (stage 1), v1/vicuna_v1, "
                                                 "llava_v1, chat_template (the tokenizer's own)"})
    vision_tower: Optional[str] = field(default=None, metadata={"help": "DripVisionModel folder (e.g. a CLIP run's "
                                                                "RUN/vision_tower), open_clip:NAME:PRETRAINED, or a "
                                                                "preset name (random weights: needs "
                                                                "--allow_random_vision_tower); None: the one in "
                                                                "model_name_or_path"})
    allow_random_vision_tower: bool = field(default=False, metadata={
        "help": "accept a --vision_tower with random weights (a preset name, open_clip:NAME without weights): "
                "for tests and smoke runs; LLaVA trained on a random tower learns nothing from images"})
    vision_override: list[str] = field(default_factory=list, metadata={
        "help": "override the tower's config fields, KEY=VALUE (JSON value), e.g. compression=4 n_pre=4: on a "
                "pretrained ViT (an HF CLIP folder, open_clip:NAME:TAG) compression > 1 adds a fresh boundary "
                "predictor; train it (CLIP finetune first, or --unfreeze_mm_vision_tower)", "nargs": "*"})
    unfreeze_mm_vision_tower: bool = field(default=False, metadata={
        "help": "stage 2: train the DRIP tower too (full and lora recipes); its rate loss, weighted by "
                "--rate_loss_weight, is added to the loss and logged"})
    mm_vision_select_layer: int = field(default=-2, metadata={"help": "tower block whose segment tokens are used"})
    mm_projector_type: str = field(default="mlp2x_gelu", metadata={"help": "linear, mlpNx_gelu, identity"})
    pretrain_mm_mlp_adapter: Optional[str] = field(default=None, metadata={"help": "stage-1 mm_projector.safetensors"
                                                                           " (or its folder, or LLaVA's .bin)"})
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "stage 1: train only the projector"})
    freeze_backbone: bool = field(default=False, metadata={"help": "freeze the LLM (full recipe: projector only)"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa (default), eager, flash_attention_2"})
    recipe: Optional[str] = field(default=None, metadata={"help": f"one of {RECIPE_NAMES}; default from the LLaVA "
                                                          "flags (tune_mm_mlp_adapter -> stage1, lora_enable -> lora, "
                                                          "+ bits 4/8 -> qlora, else full)"})
    # LLaVA flags kept so existing scripts run; only their default values are supported.
    mm_use_im_start_end: bool = field(default=False, metadata={"help": "unsupported (must stay False)"})
    mm_use_im_patch_token: bool = field(default=False, metadata={"help": "unsupported (must stay False)"})
    mm_vision_select_feature: str = field(default="patch", metadata={"help": "only 'patch' (CLS is dropped)"})
    mm_patch_merge_type: str = field(default="flat", metadata={"help": "only 'flat' (LLaVA-1.5: the tokens in "
                                                               "order); LLaVA-NeXT's spatial merges need AnyRes tiles"})


@dataclass
class DataArguments:
    data_path: Optional[str] = field(default=None, metadata={"help": "LLaVA JSON (or JSONL) training data"})
    image_folder: Optional[str] = field(default=None, metadata={"help": "root of the 'image' paths in the data"})
    lazy_preprocess: bool = field(default=False, metadata={"help": "tokenize on the fly instead of all at start"})
    is_multimodal: bool = field(default=True, metadata={"help": "accepted for LLaVA compatibility (always on)"})
    image_aspect_ratio: str = field(default="square", metadata={"help": "square (resize+crop) or pad (to square)"})
    skip_bad_samples: bool = field(default=True, metadata={"help": "skip and count unreadable images and samples "
                                                           "left without supervised tokens (False: raise)"})
    visual_token_count: str = field(default="auto", metadata={
        "help": "image token counts used for truncation and length grouping: 'exact' runs the tower once (eval "
                "mode, sharded over ranks, images decoded by --dataloader_num_workers processes) over the data "
                "and caches the counts; 'max' uses the tower's maximum for truncation and num_patches*target_rate "
                "for grouping, with no pass over the images; 'auto' = the cached exact counts when the cache "
                "matches this tower, else 'max'"})
    visual_token_cache: Optional[str] = field(default=None, metadata={
        "help": "JSON cache of the exact counts (default OUTPUT_DIR/visual_token_counts.json)"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: Optional[str] = field(default=None)
    optim: str = field(default="adamw_torch")
    remove_unused_columns: bool = field(default=False)
    freeze_mm_mlp_adapter: bool = field(default=False, metadata={"help": "keep the projector frozen"})
    model_max_length: int = field(default=512, metadata={"help": "max sequence length after image splicing"})
    double_quant: bool = field(default=True, metadata={"help": "QLoRA: quantize the quantization constants"})
    quant_type: str = field(default="nf4", metadata={"help": "QLoRA 4-bit type: nf4 or fp4"})
    bits: int = field(default=16, metadata={"help": "LLM load precision for training: 16 (bf16/fp16/fp32 from "
                                            "--bf16/--fp16), 8 or 4 (QLoRA)"})
    lora_enable: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_weight_path: str = ""
    lora_bias: str = field(default="none", metadata={"help": "none, all, lora_only"})
    mm_projector_lr: Optional[float] = field(default=None, metadata={"help": "projector learning rate (own "
                                                                     "optimizer group); default --learning_rate"})
    rate_loss_weight: Optional[float] = field(default=None, metadata={
        "help": "with --unfreeze_mm_vision_tower: weight of DRIP's rate loss (default: the tower config's "
                "rate_loss_weight)"})
    group_by_modality_length: bool = field(default=False, metadata={"help": "batches of one modality and similar "
                                                                    "length (with real visual token counts)"})
    keep_data_order: bool = field(default=False, metadata={"help": "train in the JSON's order instead of shuffled "
                                                           "(a curriculum written into the data)"})
    metrics_file: str = field(default="metrics.jsonl", metadata={"help": "JSONL log in output_dir"})
    # transformers 5 folded these into other flags; LLaVA scripts still pass them.
    warmup_ratio: Optional[float] = field(default=None, metadata={"help": "alias: --warmup_steps RATIO"})
    evaluation_strategy: Optional[str] = field(default=None, metadata={"help": "alias of --eval_strategy"})

    def __post_init__(self):
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            if self.warmup_steps == 0:
                self.warmup_steps = self.warmup_ratio
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        super().__post_init__()


def resolve_recipe(model_args: ModelArguments, training_args: TrainingArguments) -> str:
    """The recipe name from LLaVA's flags, or the explicit --recipe checked against them."""
    if training_args.bits not in (4, 8, 16):
        raise ValueError(f"--bits must be 4, 8 or 16, got {training_args.bits}")
    if model_args.tune_mm_mlp_adapter:
        derived = "stage1"
    elif training_args.lora_enable:
        derived = "qlora" if training_args.bits in (4, 8) else "lora"
    else:
        derived = "full"
    name = model_args.recipe or derived
    if name not in RECIPE_NAMES:
        raise ValueError(f"unknown --recipe {name!r}; valid: {', '.join(RECIPE_NAMES)}")
    if name != derived:
        raise ValueError(f"--recipe {name} contradicts the other flags (they mean {derived!r}: tune_mm_mlp_adapter="
                         f"{model_args.tune_mm_mlp_adapter}, lora_enable={training_args.lora_enable}, "
                         f"bits={training_args.bits})")
    if training_args.bits in (4, 8) and name != "qlora":
        raise ValueError(f"--bits {training_args.bits} trains only LoRA adapters: add --lora_enable True")
    return name


def random_vision_tower(spec: Optional[str]) -> Optional[str]:
    """Why `spec` builds a tower with random weights (a sentence), or None when it loads trained weights (a folder,
    open_clip:NAME:PRETRAINED) or names no tower. Decided from what the spec is, as load_drip_model reads it."""
    if spec is None or os.path.isdir(os.path.expanduser(str(spec))):
        return None
    from ..vision import list_presets
    from ..vision.spec import OPEN_CLIP_PREFIX

    text = str(spec)
    if text.startswith(OPEN_CLIP_PREFIX):
        if text[len(OPEN_CLIP_PREFIX):].partition(":")[2]:
            return None
        return f"{text} names an open_clip architecture without pretrained weights (add :PRETRAINED): random weights"
    if text in list_presets():
        return f"{text} is a preset name: it builds a tower with random weights"
    return None  # not a tower spec at all: load_drip_model says so


def check_report_to(training_args) -> None:
    """Integrations in --report_to whose package is missing: one message naming it (the Trainer would fail later
    with a less direct one)."""
    import importlib.util

    wanted = training_args.report_to or []
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    packages = {"wandb": "wandb", "tensorboard": "tensorboard", "mlflow": "mlflow", "comet_ml": "comet_ml",
                "clearml": "clearml", "neptune": "neptune", "swanlab": "swanlab", "trackio": "trackio"}
    missing = [w for w in wanted if w in packages and importlib.util.find_spec(packages[w]) is None]
    if missing:
        names = " ".join(packages[m] for m in missing)
        raise ValueError(f"--report_to {','.join(missing)} needs the optional package(s) {names}, which are not "
                         f"installed: `pip install {names}`, or --report_to none (metrics always go to "
                         f"OUTPUT_DIR/{training_args.metrics_file})")


def deepspeed_zero_stage(training_args) -> Optional[int]:
    """The ZeRO stage of --deepspeed (a JSON path or dict), or None without DeepSpeed."""
    cfg = training_args.deepspeed
    if not cfg:
        return None
    if not isinstance(cfg, dict):
        with open(cfg, encoding="utf-8") as f:
            cfg = json.load(f)
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def validate(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> None:
    if model_args.mm_patch_merge_type != "flat":
        raise ValueError(f"--mm_patch_merge_type {model_args.mm_patch_merge_type!r}: only 'flat' is supported (one "
                         "image, its tokens in order, as LLaVA-1.5); spatial merges need LLaVA-NeXT's AnyRes tiles")
    reason = random_vision_tower(model_args.vision_tower)
    if reason and not model_args.allow_random_vision_tower:
        raise ValueError(f"--vision_tower {reason}; LLaVA trained on it learns nothing from the images. Pass a "
                         "trained tower (a DripVisionModel folder such as a CLIP run's RUN/vision_tower, or "
                         "open_clip:NAME:PRETRAINED), or add --allow_random_vision_tower True to train on random "
                         "weights on purpose")
    if model_args.mm_use_im_start_end or model_args.mm_use_im_patch_token:
        raise ValueError("--mm_use_im_start_end / --mm_use_im_patch_token are not supported: DRIP gives a "
                         "variable number of image tokens spliced at one placeholder")
    if model_args.mm_vision_select_feature != "patch":
        raise ValueError("--mm_vision_select_feature: only 'patch' is supported (segment tokens, CLS dropped)")
    if data_args.data_path is None:
        raise ValueError("--data_path is required")
    if not os.path.isfile(data_args.data_path):
        raise FileNotFoundError(f"--data_path {data_args.data_path} does not exist")
    if data_args.visual_token_count not in ("auto", "exact", "max"):
        raise ValueError(f"--visual_token_count {data_args.visual_token_count!r}; valid: auto, exact, max")
    if training_args.lora_bias not in ("none", "all", "lora_only"):
        raise ValueError(f"--lora_bias {training_args.lora_bias!r}; valid: none, all, lora_only")
    if model_args.pretrain_mm_mlp_adapter and not os.path.exists(model_args.pretrain_mm_mlp_adapter):
        raise FileNotFoundError(f"--pretrain_mm_mlp_adapter {model_args.pretrain_mm_mlp_adapter} does not exist")
    recipe = resolve_recipe(model_args, training_args)
    if recipe == "qlora" and deepspeed_zero_stage(training_args) == 3:
        raise ValueError(f"--bits {training_args.bits} (QLoRA) under ZeRO-3 ({training_args.deepspeed}) is not "
                         "supported: ZeRO-3 partitions every weight, and bitsandbytes' quantized weights load "
                         "whole on each device (device_map). Use scripts/zero2.json (finetune_lora.sh's default "
                         "for BITS=4/8): the 4-bit LLM fits on each GPU, ZeRO-2 shards the LoRA optimizer state")
    if model_args.unfreeze_mm_vision_tower and recipe == "stage1":
        raise ValueError("--unfreeze_mm_vision_tower: stage 1 trains the projector only; train the tower in stage 2 "
                         "(full, lora or qlora recipe)")
    check_report_to(training_args)


def parse_args(argv=None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    parser = transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    validate(model_args, data_args, training_args)
    return model_args, data_args, training_args


def args_to_json(model_args, data_args, training_args) -> str:
    """The resolved arguments, saved next to the outputs so a run can be repeated."""
    return json.dumps({"model": asdict(model_args), "data": asdict(data_args),
                       "training": training_args.to_dict()}, indent=2, default=str)
