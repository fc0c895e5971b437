"""LLaVA-JSON supervised dataset, its collator, and the per-image visual token counts of a DRIP tower.

Records are LLaVA's {id, image (relative to image_folder, optional), conversations: [{from, value}]}; text-only
records mix with image records. A DRIP tower gives each image its own number of tokens, so the length of a sample
after the model splices the image in is len(input_ids) - 1 + n_image_tokens. Truncation to model_max_length
subtracts that (the exact count when known, else the tower's maximum), so the answer is never pushed out after
splicing (LLaVA truncates after splicing: a long image could leave nothing to train on, loss 0 or NaN).
A sample left without a supervised token is skipped and counted, as are unreadable images and malformed
conversations (or they raise naming the sample and the path when skip_bad_samples is off).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from ..jsonl import read_jsonl
from .conversation import (
    ConversationError,
    ConversationTemplate,
    TokenizationMismatch,
    get_template,
    preprocess_conversation,
)
from .image_processor import OPENAI_MEAN, DripLlavaImageProcessor

logger = logging.getLogger(__name__)

SKIP_REASONS = ("bad_image", "no_supervised_tokens", "image_truncated", "bad_conversation",
                "tokenization_mismatch")
MAX_CONSECUTIVE_SKIPS = 50


class BadSampleError(ValueError):
    """A sample that cannot be used (unreadable image, ...); the message names the sample and the file."""


def load_llava_json(path: str) -> list[dict]:
    """A LLaVA JSON list, or JSON Lines with one record per line."""
    if path.endswith(".jsonl"):
        records = read_jsonl(path)
    else:
        with open(path, encoding="utf-8") as f:
            records = json.load(f)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of {{id, image, conversations}} records")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or "conversations" not in r:
            raise ValueError(f"{path}: record {i} (id {r.get('id') if isinstance(r, dict) else None!r}) "
                             "has no 'conversations'")
    return records


class ImageLoader:
    """path (relative to image_folder) -> [3,H,W] through one DripLlavaImageProcessor: EXIF orientation, alpha on
    white, pad/square, the tower transform; the processor a checkpoint saves and serving and eval load.
    A bare PIL -> tensor transform (e.g. DripVisionModel.preprocess) gets the processor's first steps in front of
    it, with `aspect_ratio` and the pad colour from `image_mean`."""

    def __init__(self, image_folder: Optional[str], processor: Callable, aspect_ratio: Optional[str] = None,
                 image_mean: Optional[Sequence[float]] = None):
        if isinstance(processor, DripLlavaImageProcessor):
            if aspect_ratio is not None or image_mean is not None:
                raise ValueError("aspect_ratio / image_mean are fields of the DripLlavaImageProcessor given")
        else:
            processor = DripLlavaImageProcessor.with_transform(processor, aspect_ratio or "square",
                                                               image_mean if image_mean is not None else OPENAI_MEAN)
        self.image_folder, self.processor = image_folder, processor

    @property
    def aspect_ratio(self) -> str:
        return self.processor.aspect_ratio

    def path(self, rel: str) -> str:
        return os.path.join(self.image_folder, rel) if self.image_folder else rel

    def __call__(self, rel: str) -> torch.Tensor:
        return self.processor(self.path(rel))


class SkipCounter:
    """Skip counts per reason in shared memory, so DataLoader worker processes add to the same numbers."""

    def __init__(self):
        self._counts = multiprocessing.Array("q", len(SKIP_REASONS))

    def add(self, reason: str, n: int = 1):
        with self._counts.get_lock():
            self._counts[SKIP_REASONS.index(reason)] += n

    def as_dict(self) -> dict:
        return {r: int(self._counts[i]) for i, r in enumerate(SKIP_REASONS)}


@dataclass
class VisualTokenBudget:
    """What the dataset knows about image token counts: exact per-image counts (from the tower, eval mode) when
    computed, otherwise the tower's maximum for truncation and an estimate (num_patches * target_rate) for grouping."""

    max_tokens: int
    estimate: int
    counts: Optional[dict] = None  # image path (as in the JSON) -> tokens

    @classmethod
    def from_vision_config(cls, config, counts: Optional[dict] = None,
                           max_tokens: Optional[int] = None) -> "VisualTokenBudget":
        """`max_tokens`: the tower's bound at the block LLaVA reads (DripVisionTower.max_tokens), when it differs
        from the config's bound after the last block (token-merging families)."""
        if max_tokens is None:
            max_tokens = int(getattr(config, "max_tokens", config.num_patches))
        est = int(math.ceil(config.num_patches * getattr(config, "target_rate", 1.0)))
        return cls(max_tokens=max_tokens, estimate=min(est, max_tokens), counts=counts)

    def truncation(self, image: str) -> int:
        if self.counts is not None and image in self.counts:
            return int(self.counts[image])
        return self.max_tokens

    def grouping(self, image: str) -> int:
        if self.counts is not None and image in self.counts:
            return int(self.counts[image])
        return self.estimate


class LazySupervisedDataset(Dataset):
    """LLaVA JSON -> dict(input_ids, labels, image). With `preprocess_text=True` (LLaVA's non-lazy mode) every
    conversation is tokenized once at start-up: malformed conversations and samples that cannot be supervised are
    dropped (and counted, under the same reasons as the lazy path) up front; images are always loaded lazily."""

    def __init__(self, records: Sequence[dict] | str, tokenizer, template: ConversationTemplate | str,
                 image_loader: Optional[ImageLoader], model_max_length: int,
                 budget: Optional[VisualTokenBudget] = None, skip_bad_samples: bool = True,
                 preprocess_text: bool = False):
        self.records = load_llava_json(records) if isinstance(records, str) else list(records)
        self.tokenizer = tokenizer
        self.template = get_template(template) if isinstance(template, str) else template
        self.image_loader, self.model_max_length = image_loader, model_max_length
        self.budget = budget or VisualTokenBudget(max_tokens=0, estimate=0)
        self.skip_bad_samples = skip_bad_samples
        self.skips = SkipCounter()
        self._last_skip = ""
        if any(r.get("image") is not None for r in self.records) and image_loader is None:
            raise ValueError("the data has image samples but no image loader (vision tower) was given")
        self.index = np.arange(len(self.records))
        self._tokens: Optional[list] = None
        if preprocess_text:
            keep, tokens = [], []
            for i in tqdm(range(len(self.records)), desc="tokenizing", mininterval=2.0):
                ids, labels, reason = self._tokenize(i)
                if reason is not None:
                    self.skips.add(reason)
                    continue
                keep.append(i)
                tokens.append((np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)))
            self.index, self._tokens = np.asarray(keep, dtype=np.int64), tokens
            if not len(keep):
                raise ValueError(f"no usable sample out of {len(self.records)} (skips: {self.skips.as_dict()}; "
                                 f"last: {self._last_skip})")

    def __len__(self) -> int:
        return len(self.index)

    def sample_id(self, i: int):
        return self.records[int(self.index[i])].get("id", i)

    # ---- text ----------------------------------------------------------------------------------------
    def _skip(self, reason: str, message: str) -> tuple[None, str]:
        """Log a skipped sample (the message names it) and keep the message for a run-of-skips error."""
        logger.warning("skipping %s", message)
        self._last_skip = message
        return None, reason

    def _tokenize(self, rec_idx: int):
        """-> (input_ids, labels, skip_reason or None). A malformed conversation ("bad_conversation": roles out of
        order, a misplaced or repeated <image>, ...) or a "tokenization_mismatch" is logged with the sample id and
        skipped, or raises (ConversationError / TokenizationMismatch naming the sample) when skip_bad_samples is
        off."""
        rec = self.records[rec_idx]
        sid = rec.get("id", rec_idx)
        has_image = rec.get("image") is not None
        try:
            ids, labels = preprocess_conversation(rec.get("conversations"), self.tokenizer, self.template, has_image,
                                                  sample_id=sid)
        except (ConversationError, TokenizationMismatch) as e:
            if not self.skip_bad_samples:
                raise
            reason = "tokenization_mismatch" if isinstance(e, TokenizationMismatch) else "bad_conversation"
            self._skip(reason, str(e))
            return None, None, reason
        limit = self.model_max_length
        if has_image:
            limit -= self.budget.truncation(rec["image"]) - 1  # the placeholder becomes n image tokens
        if len(ids) > limit:
            ids, labels = ids[:max(limit, 0)], labels[:max(limit, 0)]
        if all(lab == IGNORE_INDEX for lab in labels):
            return ids, labels, "no_supervised_tokens"
        if has_image and IMAGE_TOKEN_INDEX not in ids:  # answers before the image (unusual layouts) survive
            return ids, labels, "image_truncated"
        return ids, labels, None

    def text_length(self, i: int) -> int:
        if self._tokens is not None:
            return len(self._tokens[i][0])
        turns = self.records[int(self.index[i])]["conversations"]
        if not isinstance(turns, list):  # malformed: skipped and counted when loaded; it must not stop grouping
            return 0
        texts = (t.get("value", t.get("content")) for t in turns if isinstance(t, dict))
        return sum(len(v.split()) for v in texts if isinstance(v, str))

    @property
    def modality_lengths(self) -> list[int]:
        """Length per sample for length grouping: text (tokens if pre-tokenized, else LLaVA's word count) + the
        image's visual tokens; negative for text-only samples so batches do not mix modalities."""
        out = []
        for i in range(len(self)):
            rec = self.records[int(self.index[i])]
            n = self.text_length(i)
            out.append(n + self.budget.grouping(rec["image"]) if rec.get("image") is not None else -n)
        return out

    # ---- items ---------------------------------------------------------------------------------------
    def _item(self, i: int) -> tuple[Optional[dict], Optional[str]]:
        rec_idx = int(self.index[i])
        rec = self.records[rec_idx]
        if self._tokens is not None:
            ids, labels = self._tokens[i]
        else:
            ids, labels, reason = self._tokenize(rec_idx)
            if reason is not None:
                return None, reason
        image = None
        if rec.get("image") is not None:
            try:
                image = self.image_loader(rec["image"])
            except (OSError, ValueError, SyntaxError) as e:  # missing, truncated or undecodable files
                path = self.image_loader.path(rec["image"])
                msg = f"sample {rec.get('id', rec_idx)!r}: cannot read image {path}: {e}"
                if not self.skip_bad_samples:
                    raise BadSampleError(msg) from e
                return self._skip("bad_image", msg)
        return {"input_ids": torch.as_tensor(ids, dtype=torch.long),
                "labels": torch.as_tensor(labels, dtype=torch.long), "image": image}, None

    def __getitem__(self, i: int) -> dict:
        """A skipped sample is replaced by the next one (the count is kept); a long run of skips is an error."""
        for k in range(MAX_CONSECUTIVE_SKIPS):
            item, reason = self._item((i + k) % len(self))
            if item is not None:
                return item
            self.skips.add(reason)
        raise BadSampleError(f"{MAX_CONSECUTIVE_SKIPS} consecutive bad samples from id {self.sample_id(i)!r} "
                             f"(skips so far: {self.skips.as_dict()}; last: {self._last_skip}); check --data_path, "
                             "--image_folder and --version")


@dataclass
class DataCollatorForSupervisedDataset:
    """Right-pads input_ids (pad id) and labels (IGNORE_INDEX); attention_mask from lengths, never from the pad id
    (pad may equal EOS). images: [B,3,H,W] with zeros for text-only samples, or None when no sample has one."""

    pad_token_id: int

    def __call__(self, instances: Sequence[dict]) -> dict:
        n = max(len(x["input_ids"]) for x in instances)
        B = len(instances)
        input_ids = torch.full((B, n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, n), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((B, n), dtype=torch.long)
        for b, x in enumerate(instances):
            k = len(x["input_ids"])
            input_ids[b, :k], labels[b, :k], attention_mask[b, :k] = x["input_ids"], x["labels"], 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "images": None}
        imgs = [x.get("image") for x in instances]
        ref = next((im for im in imgs if im is not None), None)
        if ref is not None:
            batch["images"] = torch.stack([im if im is not None else torch.zeros_like(ref) for im in imgs])
        return batch


# ---- exact visual token counts -------------------------------------------------------------------------
def tower_fingerprint(vision_config: dict, select_layer: int, image_processor: dict) -> str:
    """Identifies what the cached counts depend on: the tower, the block read and every preprocessing step."""
    blob = json.dumps({"v": vision_config, "layer": select_layer, "processor": image_processor}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _ImagesToCount(Dataset):
    """compute_image_token_counts' images for its loader workers: (name, tensor, or None when unreadable)."""

    def __init__(self, names: Sequence[str], loader: ImageLoader):
        self.names, self.loader = list(names), loader

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        name = self.names[i]
        try:
            return name, self.loader(name)
        except (OSError, ValueError, SyntaxError) as e:
            logger.warning("visual token count: cannot read %s: %s", self.loader.path(name), e)
            return name, None


@torch.no_grad()
def compute_image_token_counts(tower: torch.nn.Module, images: Sequence[str], loader: ImageLoader,
                               batch_size: int = 32, rank: int = 0, world_size: int = 1,
                               device: Optional[torch.device] = None, num_workers: int = 0) -> dict:
    """Token count per image with the tower in eval mode (deterministic, batch-independent). Each rank encodes
    a strided shard, its images decoded by `num_workers` loader processes; the shards are merged with
    all_gather_object. Unreadable images are left out."""
    from torch.utils.data import DataLoader

    device = device or next(tower.parameters()).device
    dtype = next(tower.parameters()).dtype
    mine = sorted(set(images))[rank::world_size]
    batches = DataLoader(_ImagesToCount(mine, loader), batch_size=batch_size, num_workers=num_workers,
                         collate_fn=list)
    was_training = tower.training
    tower.eval()
    counts = {}
    try:
        for batch in tqdm(batches, desc="visual tokens", disable=rank != 0, mininterval=2.0):
            batch = [(name, pix) for name, pix in batch if pix is not None]
            if not batch:
                continue
            _, mask = tower(torch.stack([pix for _, pix in batch]).to(device=device, dtype=dtype))
            counts.update(zip([name for name, _ in batch], mask.sum(dim=1).tolist()))
    finally:
        tower.train(was_training)
    if world_size > 1:
        gathered = [None] * world_size
        torch.distributed.all_gather_object(gathered, counts)
        counts = {k: v for part in gathered for k, v in part.items()}
    return counts


def load_or_compute_counts(cache_path: Optional[str], fingerprint: str, compute: Callable[[], dict],
                           is_main: bool = True, read_cache: bool = True) -> dict:
    """Counts cached as JSON {fingerprint, counts}; recomputed when the tower (fingerprint) changed, or always
    with read_cache=False (then only written)."""
    if read_cache and cache_path and os.path.isfile(cache_path):
        with open(cache_path, encoding="utf-8") as f:
            cached = json.load(f)
        if cached.get("fingerprint") == fingerprint:
            return cached["counts"]
        logger.info("visual token cache %s is for another tower", cache_path)
    counts = compute()
    if cache_path and is_main:
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        tmp = cache_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"fingerprint": fingerprint, "counts": counts}, f)
        os.replace(tmp, cache_path)
    return counts
