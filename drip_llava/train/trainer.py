"""The HF Trainer subclass for both stages: modality/length-grouped sampling with real visual token counts, the
projector's own learning rate, DRIP's rate loss when the tower trains, token throughput, stage-1 checkpoints without
the frozen LLM, and callbacks for the JSONL log and the recipe's checkpoint files."""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional

import torch
from accelerate.utils import DeepSpeedSchedulerWrapper
from peft import PeftModel
from torch.utils.data import Sampler, SequentialSampler
from transformers import Trainer, TrainerCallback
from transformers.trainer import SCHEDULER_NAME
from transformers.trainer_pt_utils import get_length_grouped_indices

from ..constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

logger = logging.getLogger(__name__)


def modality_length_grouped_indices(lengths: list[int], batch_size: int, generator=None) -> list[int]:
    """Indices such that each run of `batch_size` holds one modality (image: length > 0, text-only: < 0) and
    similar lengths. Full groups of both modalities are shuffled together; the two partial tail groups go last."""
    mm = [i for i, n in enumerate(lengths) if n > 0]
    lang = [i for i, n in enumerate(lengths) if n < 0]
    if not mm or not lang:
        return get_length_grouped_indices([abs(n) for n in lengths], batch_size, generator=generator)
    groups, tails = [], []
    for idx in (mm, lang):
        order = get_length_grouped_indices([abs(lengths[i]) for i in idx], batch_size, generator=generator)
        order = [idx[j] for j in order]
        chunks = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        if len(chunks[-1]) < batch_size:
            tails.append(chunks.pop())
        groups.extend(chunks)
    perm = torch.randperm(len(groups), generator=generator).tolist()
    return [i for g in perm for i in groups[g]] + [i for t in tails for i in t]


class ModalityLengthGroupedSampler(Sampler):
    def __init__(self, lengths: list[int], batch_size: int, generator=None):
        self.lengths, self.batch_size, self.generator = list(lengths), batch_size, generator

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        return iter(modality_length_grouped_indices(self.lengths, self.batch_size, self.generator))


class DripLlavaTrainer(Trainer):
    """`recipe` knows the projector's parameters (own lr group) and what to save; see recipes.py.

    With a trained DRIP tower the loss is LLaVA's plus `rate_loss_weight` x DRIP's rate loss (the mean over the
    images of the optimizer step, on every rank and micro-batch: the same update with or without gradient
    accumulation), and the log gets `rate_loss` (unweighted)."""

    def __init__(self, *args, recipe=None, rate_loss_weight: Optional[float] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.recipe = recipe
        self.rate_loss_weight = rate_loss_weight
        # [text + visual tokens, supervised tokens, rate loss x images, images] since the last log
        self._tokens = torch.zeros(4, dtype=torch.float64)
        self._images_in_step: Optional[float] = None  # images in the current optimizer step, over all ranks
        self._last_log_time: Optional[float] = None
        self._in_checkpoint = False  # save_model is inside _save_checkpoint (see trainable-only checkpoints)

    # ---- rate loss -------------------------------------------------------------------------------
    def _tower_trains(self) -> bool:
        tower = self.recipe.vision_tower(self.model) if self.recipe is not None else None
        return tower is not None and any(p.requires_grad for p in tower.parameters())

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Also counts the images of the optimizer step over all ranks: the rate loss is averaged over them, as
        the LM loss is over the step's supervised tokens (num_items_in_batch)."""
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self._tower_trains():
            n = torch.tensor([float(sum(int((b["input_ids"] == IMAGE_TOKEN_INDEX).any(dim=1).sum())
                                        for b in batch_samples))], dtype=torch.float64)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                n = n.to(self.args.device)
                torch.distributed.all_reduce(n)
            self._images_in_step = float(n.item())
        return batch_samples, num_items

    # ---- data ------------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.keep_data_order:
            if self.args.group_by_modality_length:
                raise ValueError("--keep_data_order and --group_by_modality_length both choose the order: pick one")
            return SequentialSampler(ds)
        if self.args.group_by_modality_length and hasattr(ds, "modality_lengths"):
            global_batch = self.args.train_batch_size * self.args.world_size * self.args.gradient_accumulation_steps
            gen = torch.Generator()
            gen.manual_seed(self.args.seed if self.args.data_seed is None else self.args.data_seed)
            return ModalityLengthGroupedSampler(ds.modality_lengths, global_batch, generator=gen)
        return super()._get_train_sampler(train_dataset)

    # ---- optimizer -------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        """AdamW groups: (decay, no decay) x (projector at --mm_projector_lr, the rest at --learning_rate).
        Empty groups are dropped (DeepSpeed's optimizer wrappers choke on them)."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        proj_lr = self.args.mm_projector_lr
        proj_ids = set()
        if proj_lr is not None and self.recipe is not None:
            proj_ids = {id(p) for p in self.recipe.projector_parameters(opt_model)}
        decay = set(self.get_decay_parameter_names(opt_model))
        groups = {}
        for n, p in opt_model.named_parameters():
            if not p.requires_grad:
                continue
            key = (n in decay, id(p) in proj_ids)
            groups.setdefault(key, []).append(p)
        param_groups = []
        for (is_decay, is_proj), params in sorted(groups.items()):
            g = {"params": params, "weight_decay": self.args.weight_decay if is_decay else 0.0}
            if is_proj:
                g["lr"] = proj_lr
            param_groups.append(g)
        if not param_groups:
            raise ValueError("no trainable parameters: check the recipe flags")
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    # ---- throughput ------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._last_log_time is None:  # the clock starts at the first step, not before engine start-up
            self._last_log_time = time.perf_counter()
        mask, labels = inputs.get("attention_mask"), inputs.get("labels")
        if mask is not None:
            self._tokens[0] += float(mask.sum())
        if labels is not None:
            self._tokens[1] += float((labels[:, 1:] != IGNORE_INDEX).sum())
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if isinstance(outputs, dict):
            # the spliced visual tokens replace one placeholder each, which attention_mask already counted
            self._tokens[0] += float(outputs.get("visual_tokens", 0) or 0) - float(outputs.get("num_images", 0) or 0)
            rate = outputs.get("rate_loss")
            if rate is not None and model.training:
                loss = loss + self._weighted_rate_loss(rate, int(outputs.get("num_images", 0) or 0), num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _weighted_rate_loss(self, rate: torch.Tensor, n_images: int, num_items_in_batch) -> torch.Tensor:
        """weight x (this micro-batch's rate loss summed over its images) / (images in the optimizer step over all
        ranks), scaled as the Trainer scales the LM loss: x ranks (their gradients are averaged) and, when the
        Trainer divides the loss by the accumulation steps itself (no num_items_in_batch), x those steps."""
        weight = self.rate_loss_weight
        if weight is None:
            weight = float(self.recipe.vision_tower(self.model).config.rate_loss_weight)
        self._tokens[2] += float(rate.detach()) * n_images
        self._tokens[3] += n_images
        total = self._images_in_step
        if not n_images or not total or not weight:
            return rate * 0  # keeps the tower's graph identical on every rank
        scale = self.accelerator.num_processes
        if not (self.model_accepts_loss_kwargs and num_items_in_batch is not None):
            scale *= self.current_gradient_accumulation_steps
        return rate * (weight * n_images * scale / total)

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        """Training logs get tokens/s summed over ranks (every rank reaches a step log, so the reduce is safe)."""
        if "loss" in logs:
            now = time.perf_counter()
            tokens = self._tokens.clone()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                t = tokens.to(self.args.device)
                torch.distributed.all_reduce(t)
                tokens = t.cpu()
            if self._last_log_time is not None:
                dt = max(now - self._last_log_time, 1e-9)
                logs["tokens_per_s"] = round(float(tokens[0]) / dt, 2)
                logs["supervised_tokens_per_s"] = round(float(tokens[1]) / dt, 2)
            if float(tokens[3]) > 0:  # a trained DRIP tower: its rate loss, unweighted, mean over the images
                logs["rate_loss"] = round(float(tokens[2] / tokens[3]), 6)
            self._last_log_time = now
            self._tokens.zero_()
            ds = self.train_dataset
            if hasattr(ds, "skips"):
                logs.update({f"skipped_{k}": v for k, v in ds.skips.as_dict().items()})
        super().log(logs, start_time)

    def _inner_training_loop(self, *args, **kwargs):
        self._last_log_time = None
        return super()._inner_training_loop(*args, **kwargs)

    # ---- trainable-only checkpoints ------------------------------------------------------------------
    # Stage 1 trains a few MB of projector under a frozen LLM. The Trainer's checkpoint-N would hold that LLM
    # twice (model.safetensors and DeepSpeed's module states): ~27 GB per checkpoint for Vicuna-7B in bf16
    # (the QUICK demo: 596 MB against 13 MB). With recipe.trainable_only_checkpoints it holds the
    # recipe's files, the optimizer/scheduler/RNG state and the trainable parameters only; a resume rebuilds the
    # frozen part from the command line's model paths, as the run's start did.
    @property
    def _trainable_only(self) -> bool:
        return self.recipe is not None and self.recipe.trainable_only_checkpoints

    def _save_checkpoint(self, model, trial):
        self._in_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._in_checkpoint = False

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        if self._in_checkpoint and self._trainable_only:
            if self.args.should_save:  # the optimizer files still go there
                os.makedirs(output_dir, exist_ok=True)
            return
        super().save_model(output_dir, _internal_call)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """DeepSpeed state without frozen weights where the resume loads non-strictly: trainable-only checkpoints
        (see _prepare_for_training) and LoRA (the Trainer's own rule). DeepSpeed's exclude_frozen_parameters drops
        the frozen names named_parameters() lists, which holds a tied weight once: lm_head.weight (= the
        embeddings, 56 MB for SmolLM2) stayed. So keep exactly the trainable parameters and the buffers."""
        if not (self.is_deepspeed_enabled and (self._trainable_only or isinstance(self.model, PeftModel))):
            return super()._save_optimizer_and_scheduler(output_dir)
        module = self.model_wrapped.module
        keep = {n for n, p in module.named_parameters() if p.requires_grad} | {n for n, _ in module.named_buffers()}

        def only_trainable(mod, state_dict, prefix, local_metadata):
            for k in [k for k in state_dict if k not in keep]:
                del state_dict[k]

        handle = module.register_state_dict_post_hook(only_trainable)
        try:
            self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
        finally:
            handle.remove()
        # as the Trainer does: DeepSpeed's checkpoint holds only a scheduler it created itself
        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Without DeepSpeed: the recipe restores its trainable part (the Trainer would look for the whole model)."""
        if self._trainable_only:
            self.recipe.load_trainable(self.model if model is None else model, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        """Under DeepSpeed the Trainer loads module states strictly, which a trainable-only checkpoint fails: load
        them here, checking that every trainable parameter is there (the frozen ones are already in place)."""
        if not (self.is_deepspeed_enabled and self._trainable_only and resume_from_checkpoint is not None):
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        engine = self.model_wrapped

        def load_trainable(src: dict, dst) -> None:
            missing = [n for n, p in dst.named_parameters() if p.requires_grad and n not in src]
            if missing:
                raise ValueError(f"{resume_from_checkpoint}: checkpoint lacks trainable parameters {missing[:5]}")
            dst.load_state_dict(src, strict=False)

        path, _ = engine.load_checkpoint(resume_from_checkpoint, load_module_strict=False,
                                         custom_load_fn=load_trainable)
        if path is None:
            raise ValueError(f"[deepspeed] no checkpoint to resume from in {resume_from_checkpoint}")
        self._load_optimizer_and_scheduler(resume_from_checkpoint)
        self._load_scaler(resume_from_checkpoint)
        return model, train_dataloader


class MetricsJsonlCallback(TrainerCallback):
    """Appends every log (step, epoch, loss, lr, grad_norm, tokens/s, skip counts) to OUT/metrics.jsonl."""

    def __init__(self, path: str):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        rec = {"step": state.global_step, "time": round(time.time(), 3), **logs}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, default=float) + "\n")


class RecipeCheckpointCallback(TrainerCallback):
    """After the Trainer writes checkpoint-N (weights, optimizer, scheduler, RNG, state), the recipe adds its own
    files there (mm_projector.safetensors / adapter + non_lora_trainables + config), so every checkpoint loads
    with load_pretrained_model and resumes. Runs on every rank: ZeRO-3 gathering is collective."""

    def __init__(self, recipe):
        self.recipe = recipe

    def on_save(self, args, state, control, model=None, **kwargs):
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        self.recipe.save(model, ckpt, is_main=state.is_world_process_zero, final=False)
