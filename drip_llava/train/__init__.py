"""One trainer for LLaVA stage 1 (projector) and stage 2 (full / LoRA / QLoRA): HF Trainer + DeepSpeed + peft."""
from .params import DataArguments, ModelArguments, TrainingArguments, parse_args
from .recipes import RECIPES, get_recipe

__all__ = ["DataArguments", "ModelArguments", "RECIPES", "TrainingArguments", "get_recipe", "parse_args"]
