"""Data for the trainers: webdataset image-text shards (CLIP) and ImageFolder trees (classification, zero-shot).

Bad data never stops a run: an unreadable shard, a corrupt image or a sample without a caption is skipped and
counted by kind; every batch carries the skips seen since the previous batch, so the trainer can log totals
(counts are per rank and summed across ranks).

Exact resume, as far as a stream allows: the sample stream of (epoch, rank) is a pure function of the seed,
the epoch, the rank, the world size and the worker count (deterministic shard order, seeded shuffle buffer,
no global-RNG use). Resuming in the middle of an epoch rebuilds that stream and fast-forwards over the batches
already consumed (they are read and decoded again, then dropped), so the run continues with exactly the batch
it would have seen. The price is re-reading part of one epoch; changing --workers or the world size between
runs changes the stream.
"""
from __future__ import annotations

import io
import json
import random
import tarfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info
from torchvision import datasets
from torchvision import transforms as T

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
CAPTION_KEY = "txt"
SKIP_KINDS = ("bad_shard", "corrupt_image", "missing_image", "missing_caption")


class SampleError(Exception):
    """A bad sample; `kind` is one of SKIP_KINDS."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """'DIR/train-{000000..000009}.tar' (brace ranges, '::' joins several specs) -> list of shard paths."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls = [u for s in specs for u in wds.shardlists.expand_urls(s)]
    if not urls:
        raise ValueError(f"no shards in {spec!r}")
    return urls


def count_samples(urls: Sequence[str]) -> int:
    """Samples in local shards (sizes.json next to the shards if present, else by listing the tars)."""
    total = 0
    for url in urls:
        sizes = Path(url).parent / "sizes.json"
        if sizes.is_file():
            known = json.loads(sizes.read_text())
            if Path(url).name in known:
                total += int(known[Path(url).name])
                continue
        try:
            with tarfile.open(url) as tar:
                total += len({m.name.split(".", 1)[0] for m in tar.getmembers() if m.isreg()})
        except (OSError, tarfile.TarError) as e:
            warnings.warn(f"cannot count samples in shard {url}: {e}", stacklevel=2)
    return total


def load_image(data: bytes, name: str) -> Image.Image:
    """Decodes fully (PIL opens lazily, so truncated files only fail on load())."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise SampleError("corrupt_image", f"{name}: cannot decode image ({e})") from e


def decode_clip_sample(sample: dict, transform: Callable, tokenizer: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    name = f"{sample.get('__url__')}:{sample.get('__key__')}"
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        keys = sorted(k for k in sample if not k.startswith("__"))
        raise SampleError("missing_image", f"{name}: no image (keys {keys})")
    if CAPTION_KEY not in sample:
        raise SampleError("missing_caption", f"{name}: no {CAPTION_KEY} caption")
    caption = sample[CAPTION_KEY].decode("utf-8", errors="replace").strip()
    if not caption:
        raise SampleError("missing_caption", f"{name}: empty caption")
    image = transform(load_image(sample[key], name))
    return image, tokenizer([caption])[0]


def _seed_of(*parts) -> int:
    """A stable 63-bit seed from ints (FNV-style), the same in every process and Python version."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


class ClipShardStream(IterableDataset):
    """Endless stream of CLIP batches for one (epoch, rank); the trainer takes steps_per_epoch of them.

    Shards are permuted by (seed, epoch, cycle) and dealt to the world_size * workers streams; when there are
    fewer shards than streams, every stream reads all shards and keeps every n-th sample instead.
    Each yielded batch: {"images" [B,3,H,W], "texts" [B,ctx], "skips" {kind: count since the previous batch}}.
    """

    def __init__(self, urls: Sequence[str], batch_size: int, transform: Callable, tokenizer: Callable, *,
                 seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 skip_batches: int = 0, shuffle_buffer: int = 1000):
        super().__init__()
        self.urls, self.batch_size = list(urls), batch_size
        self.transform, self.tokenizer = transform, tokenizer
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.num_workers = max(1, num_workers)
        self.skip_batches, self.shuffle_buffer = skip_batches, shuffle_buffer

    def _worker(self) -> int:
        info = get_worker_info()
        if info is None:
            return 0
        if info.num_workers != self.num_workers:
            raise RuntimeError(f"stream built for {self.num_workers} workers, loader has {info.num_workers}")
        return info.id

    def _samples(self, worker: int, skips: Counter):
        def count_shard_error(exn: Exception) -> bool:  # webdataset handler: True = skip and go on
            skips["bad_shard"] += 1
            warnings.warn(f"skipping unreadable shard data: {exn}", stacklevel=2)
            return True

        n_streams = self.world_size * self.num_workers
        stream_id = self.rank * self.num_workers + worker
        for cycle in range(10 ** 9):
            order = list(self.urls)
            random.Random(_seed_of(self.seed, self.epoch, cycle, 17)).shuffle(order)
            if len(order) >= n_streams:
                mine, keep_every, offset = order[stream_id::n_streams], 1, 0
            else:
                mine, keep_every, offset = order, n_streams, stream_id
            n_good = 0
            src = ({"url": u} for u in mine)
            for i, sample in enumerate(wds.tariterators.tarfile_samples(src, handler=count_shard_error)):
                if i % keep_every != offset:
                    continue
                try:
                    yield decode_clip_sample(sample, self.transform, self.tokenizer)
                    n_good += 1
                except SampleError as e:
                    skips[e.kind] += 1
            if n_good == 0:
                raise RuntimeError(f"no readable sample in shards {mine[:3]}{'...' if len(mine) > 3 else ''} "
                                   f"(skips so far: {dict(skips)})")

    def __iter__(self):
        worker = self._worker()
        rng = random.Random(_seed_of(self.seed, self.epoch, self.rank, worker, 29))
        skips: Counter = Counter()
        buf: list = []
        # batches of this worker that were already consumed before the resume: worker w serves the loader's
        # batches w, w + n, w + 2n, ... (DataLoader round-robin over workers)
        to_skip = max(0, -(-(self.skip_batches - worker) // self.num_workers))
        batch: list = []
        for sample in self._samples(worker, skips):
            if self.shuffle_buffer > 1:
                buf.append(sample)
                if len(buf) < self.shuffle_buffer:
                    continue
                sample = buf.pop(rng.randrange(len(buf)))
            batch.append(sample)
            if len(batch) == self.batch_size:
                images, texts = zip(*batch)
                out = {"images": torch.stack(images), "texts": torch.stack(texts), "skips": dict(skips)}
                batch = []
                skips.clear()
                if to_skip > 0:
                    to_skip -= 1
                    continue
                yield out


def _loader_generator() -> torch.Generator:
    """A private generator for a DataLoader's base seed. Without one, every `iter(loader)` draws from the global
    torch RNG, so a run resumed mid-epoch (which builds its loader after restoring the RNG, not before saving it)
    would get different Gumbel noise from the uninterrupted run. Our streams seed themselves explicitly."""
    return torch.Generator().manual_seed(0)


def clip_loader(urls, batch_size, transform, tokenizer, *, seed, epoch, rank, world_size, workers,
                skip_batches=0, shuffle_buffer=1000) -> DataLoader:
    # more workers than shards would only make workers read every n-th sample of the same shards
    ds = ClipShardStream(urls, batch_size, transform, tokenizer, seed=seed, epoch=epoch, rank=rank,
                         world_size=world_size, num_workers=workers, skip_batches=skip_batches,
                         shuffle_buffer=shuffle_buffer)
    return DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=False,
                      prefetch_factor=2 if workers > 0 else None, generator=_loader_generator())


# ---- ImageFolder --------------------------------------------------------------------------------------------

def build_transform(preprocess: Callable, image_size: int, mean, std, aug: str = "none") -> Callable:
    """'none': the model's eval transform; 'basic': random resized crop + flip; 'randaug': basic + RandAugment."""
    if aug == "none":
        return preprocess
    if aug not in ("basic", "randaug"):
        raise ValueError(f"--aug {aug!r}; valid: none, basic, randaug")
    ops = [T.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
           T.RandomHorizontalFlip()]
    if aug == "randaug":
        ops.append(T.RandAugment(num_ops=2, magnitude=9))
    return T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])


class ImageFolderData(Dataset):
    """torchvision ImageFolder whose bad files become counted skips, and whose random augmentation is seeded
    by (seed, epoch, index): the same sample gets the same crop however many workers run, and after a resume."""

    def __init__(self, root: str | Path, transform: Callable, seed: int = 0):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        self.folder = datasets.ImageFolder(str(root), loader=_read_bytes)
        self.transform, self.seed, self.epoch = transform, seed, 0

    @property
    def classes(self) -> list[str]:
        return self.folder.classes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int):
        path, label = self.folder.samples[index]
        try:
            image = load_image(_read_bytes(path), path)
        except SampleError as e:
            warnings.warn(str(e), stacklevel=2)
            return None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed_of(self.seed, self.epoch, index))
            return self.transform(image), label


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def collate_skipping(batch: list) -> dict:
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return {"images": None, "labels": None, "skips": {"corrupt_image": skipped}}
    images, labels = zip(*good)
    return {"images": torch.stack(images), "labels": torch.tensor(labels), "skips": {"corrupt_image": skipped}}


class EpochSampler(Sampler):
    """This rank's indices of one epoch: a (seed, epoch) permutation dealt round-robin to ranks, truncated to
    whole batches so every rank takes the same number of steps, minus the batches consumed before a resume."""

    def __init__(self, n: int, batch_size: int, *, seed: int, epoch: int, rank: int, world_size: int,
                 skip_batches: int = 0, shuffle: bool = True):
        g = torch.Generator().manual_seed(_seed_of(seed, epoch, 41))
        order = torch.randperm(n, generator=g).tolist() if shuffle else list(range(n))
        self.steps = len(order) // (batch_size * world_size)
        mine = order[rank::world_size][: self.steps * batch_size]
        self.indices = mine[skip_batches * batch_size:]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def steps_per_epoch_folder(n: int, batch_size: int, world_size: int) -> int:
    steps = n // (batch_size * world_size)
    if steps == 0:
        raise ValueError(f"{n} training images are fewer than one global batch ({batch_size} x {world_size})")
    return steps


def folder_train_loader(ds: ImageFolderData, batch_size: int, *, seed, epoch, rank, world_size, workers,
                        skip_batches=0) -> DataLoader:
    ds.set_epoch(epoch)
    sampler = EpochSampler(len(ds), batch_size, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                           skip_batches=skip_batches)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      collate_fn=collate_skipping, drop_last=False, generator=_loader_generator())


def folder_eval_loader(ds: ImageFolderData, batch_size: int, *, rank: int, world_size: int, workers: int) -> DataLoader:
    """Every image exactly once over all ranks (no padding duplicates); results are summed across ranks."""
    subset = torch.utils.data.Subset(ds, list(range(rank, len(ds), world_size)))
    return DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_skipping,
                      generator=_loader_generator())


def load_classnames(spec: str | Path | None, folder_classes: Sequence[str]) -> list[str]:
    """Class names in the ImageFolder's label order.

    spec: 'imagenet' (open_clip's IMAGENET_CLASSNAMES, folders are sorted wnids), a JSON file holding a list
    (matched to folder names when they agree, else taken in sorted-folder order) or a {folder: name} dict;
    None: the folder names themselves (underscores read as spaces).
    """
    folder_classes = list(folder_classes)
    if spec is None:
        return [c.replace("_", " ") for c in folder_classes]
    if str(spec) == "imagenet":
        import open_clip

        names = list(open_clip.IMAGENET_CLASSNAMES)
    else:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"classnames file {path} does not exist")
        names = json.loads(path.read_text())
    if isinstance(names, dict):
        missing = [c for c in folder_classes if c not in names]
        if missing:
            raise ValueError(f"{spec}: no class name for folders {missing[:5]}")
        return [names[c] for c in folder_classes]
    norm = {n.replace("_", " "): n for n in names}
    if all(c.replace("_", " ") in norm for c in folder_classes):
        return [norm[c.replace("_", " ")] for c in folder_classes]
    if len(names) != len(folder_classes):
        raise ValueError(f"{spec}: {len(names)} class names for {len(folder_classes)} class folders")
    return list(names)

