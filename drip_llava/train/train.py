"""One trainer for both LLaVA stages: `python -m drip_llava.train.train ...` or, distributed,
`deepspeed [--num_gpus N] --module drip_llava.train.train ... --deepspeed scripts/zero3.json`.

The recipe (stage1 / full / lora / qlora, see recipes.py) follows from LLaVA's flags. `--resume_from_checkpoint`
takes `auto` (the last checkpoint-N in output_dir if any, else start fresh), `True` (the last one, which must
exist) or a path.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

import torch
import transformers
from transformers.trainer_utils import get_last_checkpoint

from ..data.dataset import (
    DataCollatorForSupervisedDataset,
    ImageLoader,
    LazySupervisedDataset,
    VisualTokenBudget,
    compute_image_token_counts,
    load_llava_json,
    load_or_compute_counts,
    tower_fingerprint,
)
from ..distributed import end_process_group, exit_after_main
from ..runtime import split_cpu_threads, trainer_device_args
from .params import args_to_json, parse_args, resolve_recipe
from .recipes import describe_trainable, gathered, get_recipe
from .trainer import DripLlavaTrainer, MetricsJsonlCallback, RecipeCheckpointCallback

logger = logging.getLogger("drip_llava.train")


def resolve_resume(value: Optional[str], output_dir: str) -> Optional[str]:
    if value is None or str(value).lower() in ("", "false", "none", "no"):
        return None
    last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    if str(value).lower() == "auto":
        return last
    if str(value).lower() == "true":
        if last is None:
            raise FileNotFoundError(f"--resume_from_checkpoint True: no checkpoint-N folder in {output_dir}")
        return last
    if not os.path.isdir(value):
        raise FileNotFoundError(f"--resume_from_checkpoint {value} is not a folder")
    return value


def init_deepspeed_comm(training_args) -> None:
    """With use_cpu HF sets up torch.distributed (gloo) but not deepspeed.comm; ZeRO-3's zero.Init inside
    from_pretrained then sees world size 1 and fails its batch-size check. Attach deepspeed.comm to the group."""
    if training_args.deepspeed and torch.distributed.is_available() and torch.distributed.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())


def load_tokenizer(model_args, training_args):
    tok = transformers.AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, cache_dir=training_args.cache_dir,
        model_max_length=training_args.model_max_length, padding_side="right")
    if tok.pad_token is None:  # Llama has none; LLaVA pads with unk, SmolLM2-style tokenizers with EOS
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def on_every_rank(flag: bool, device) -> bool:
    """True when `flag` holds on every rank (one all-reduce; the flag itself without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def visual_token_counts(tower, loader: ImageLoader, records: list, data_args, training_args) -> Optional[dict]:
    """Exact per-image token counts or None (the estimate: the tower's maximum for truncation and
    num_patches * target_rate for grouping). 'exact' computes them once (tower in eval mode, sharded over the
    ranks, images decoded by the loader workers) and caches them; 'auto' reads the cache when it matches this
    tower and never runs the pass (for mix665k it would take the tower over 624K images before step 1).
    The ranks agree on the choice: a cache that some node cannot see (no shared file system) is not used, since
    ranks with other counts would order and truncate the data differently."""
    mode = data_args.visual_token_count
    if mode == "max":
        return None
    images = [r["image"] for r in records if r.get("image") is not None]
    cache = data_args.visual_token_cache or os.path.join(training_args.output_dir, "visual_token_counts.json")
    fp = tower_fingerprint(tower.config.to_dict(), tower.select_layer, loader.processor.to_dict())
    cached = load_or_compute_counts(cache, fp, lambda: None, is_main=False)
    if on_every_rank(cached is not None, training_args.device):
        logger.info("visual tokens: exact counts from %s (%d of %d images)", cache, len(set(images) & set(cached)),
                    len(set(images)))
        return cached
    if mode == "auto":
        logger.info("visual tokens: estimated (num_patches * target_rate for grouping, the maximum for "
                    "truncation); --visual_token_count exact counts them once and caches them in %s", cache)
        return None
    params = list(tower.parameters())
    partitioned = any(hasattr(p, "ds_id") for p in params)
    device = training_args.device if not partitioned else None

    def compute():
        if device is not None:
            tower.to(device)
        with gathered(params):
            return compute_image_token_counts(
                tower, images, loader, batch_size=max(training_args.per_device_train_batch_size, 8),
                rank=training_args.process_index, world_size=training_args.world_size,
                device=device or torch.device("cpu"), num_workers=training_args.dataloader_num_workers)

    counts = load_or_compute_counts(cache, fp, compute, is_main=training_args.should_save, read_cache=False)
    if counts:
        vals = sorted(counts.values())
        logger.info("visual tokens per image (%d images): min %d, median %d, max %d", len(vals), vals[0],
                    vals[len(vals) // 2], vals[-1])
    return counts


def main(argv: Optional[list[str]] = None) -> dict:
    split_cpu_threads()
    argv = trainer_device_args(list(sys.argv[1:] if argv is None else argv))
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if training_args.should_log else logging.WARNING)
    transformers.set_seed(training_args.seed)
    init_deepspeed_comm(training_args)
    recipe_name = resolve_recipe(model_args, training_args)
    recipe = get_recipe(recipe_name, model_args, data_args, training_args)
    os.makedirs(training_args.output_dir, exist_ok=True)
    if training_args.should_save:
        with open(os.path.join(training_args.output_dir, "drip_llava_args.json"), "w", encoding="utf-8") as f:
            f.write(args_to_json(model_args, data_args, training_args))

    tokenizer = load_tokenizer(model_args, training_args)
    model = recipe.configure(recipe.load_model())
    logger.info("recipe %s; trainable parameters: %s", recipe_name, describe_trainable(model))

    tower = recipe.vision_tower(model)
    loader = ImageLoader(data_args.image_folder, recipe.image_processor(model))  # the one every save writes
    records = load_llava_json(data_args.data_path)
    counts = visual_token_counts(tower, loader, records, data_args, training_args)
    budget = VisualTokenBudget.from_vision_config(tower.config, counts, max_tokens=tower.max_tokens)
    dataset = LazySupervisedDataset(records, tokenizer, model_args.version, loader, training_args.model_max_length,
                                    budget=budget, skip_bad_samples=data_args.skip_bad_samples,
                                    preprocess_text=not data_args.lazy_preprocess)
    init_skips = dataset.skips.as_dict()  # text-level skips found at start-up: the same on every rank
    logger.info("%d training samples (%d records; skipped at start-up: %s)", len(dataset), len(records), init_skips)

    trainer = DripLlavaTrainer(
        model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer, recipe=recipe,
        rate_loss_weight=training_args.rate_loss_weight,
        data_collator=DataCollatorForSupervisedDataset(pad_token_id=tokenizer.pad_token_id),
        callbacks=[MetricsJsonlCallback(os.path.join(training_args.output_dir, training_args.metrics_file)),
                   RecipeCheckpointCallback(recipe)])
    resume = resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    if resume:
        logger.info("resuming from %s", resume)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_state()
    model.config.use_cache = True
    if recipe.saves_full_model:
        trainer.save_model(training_args.output_dir)
    elif training_args.should_save:
        tokenizer.save_pretrained(training_args.output_dir)
    recipe.save(trainer.model, training_args.output_dir, is_main=training_args.should_save, final=True)

    # skips while training happen on each rank's own samples: sum them over ranks
    now = dataset.skips.as_dict()
    runtime = torch.tensor([now[k] - init_skips[k] for k in now], dtype=torch.float64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        runtime = runtime.to(training_args.device)
        torch.distributed.all_reduce(runtime)
    skipped = {k: init_skips[k] + int(v) for k, v in zip(now, runtime.cpu().tolist())}
    summary = {"recipe": recipe_name, "global_step": trainer.state.global_step,
               "train_loss": result.training_loss, "skipped": skipped, **result.metrics}
    logger.info("done: %s", summary)
    end_process_group()
    return summary


if __name__ == "__main__":
    exit_after_main(main)
