"""Shapes world: a synthetic dataset that really teaches, generated offline in seconds.

Each image holds 1-3 shapes (8 colours x 5 shapes, 3 sizes, 9 grid positions) over a plain or
textured muted background. The class is the colour + shape of the largest object, which is made
clearly largest (>= ~2x the area of any other), so classification and zero-shot have one right
answer. Everything else (captions, LLaVA conversations, ScienceQA / LLaVA-Bench questions) is
written from the same scene description, so every answer is exact.

Determinism: scene, caption and class of (seed, split, index) come from an RNG seeded with that
triple only, so the output does not depend on the number of workers and reruns are byte-identical.

Library API: ``generate``, ``sample_scene``, ``render_scene``, ``CLASSNAMES`` / ``class_names()``,
``COLOURS``, ``SHAPES``. CLI: ``python -m drip_demo.synthetic --out DIR``.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

FORMAT_VERSION = 4  # 2: stage-1 JSON carries the short alt text; 3: held-out val_pretrain/val_instruct JSON;
# 4: instruct.json is shuffled, after an optional reading warm-up block (n_warmup)

# Saturated, well-separated object colours (name -> RGB).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 20),
    "yellow": (245, 225, 30),
    "green": (40, 170, 50),
    "cyan": (30, 215, 225),
    "blue": (35, 65, 225),
    "purple": (145, 45, 190),
    "white": (250, 250, 250),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon")
SIZES: tuple[str, ...] = ("small", "medium", "large")
# Row-major 3x3 grid; index = 3 * row + col.
POSITIONS: tuple[str, ...] = (
    "top-left", "top", "top-right",
    "left", "center", "right",
    "bottom-left", "bottom", "bottom-right",
)
# Sorted so that torchvision's ImageFolder (alphabetical folders) gives the same indices.
CLASSNAMES: list[str] = sorted(f"{c} {s}" for c in COLOURS for s in SHAPES)

# Muted background colours: low saturation, mid luminance, so every object colour stands out.
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "beige": (168, 158, 132),
    "slate": (98, 108, 124),
    "sage": (122, 138, 112),
    "taupe": (132, 118, 108),
    "sand": (160, 146, 118),
    "mauve": (138, 112, 128),
    "teal-grey": (102, 128, 128),
}
TEXTURES: tuple[str, ...] = ("plain", "stripes", "checker", "noise")

# Equivalent-area radius r (area = pi r^2) as a fraction of the image side. Ranges are chosen so
# that large/medium and medium/small area ratios are >= 2 whatever the shapes.
SIZE_RADIUS = {"small": (0.039, 0.047), "medium": (0.066, 0.074), "large": (0.105, 0.125)}
# Circumradius / equivalent-area radius per shape: equal r -> equal area, so "largest" is by area.
_STAR_INNER = 0.5
EXTENT = {
    "circle": 1.0,
    "square": math.sqrt(math.pi / 2.0),
    "triangle": math.sqrt(4.0 * math.pi / (3.0 * math.sqrt(3.0))),
    "star": math.sqrt(math.pi / (5.0 * _STAR_INNER * math.sin(math.radians(36)))),
    "hexagon": math.sqrt(2.0 * math.pi / (3.0 * math.sqrt(3.0))),
}
_SPLIT_CODE = {"train": 0, "val": 1}
_OUTPUTS = ("imagefolder", "llava", "scienceqa", "llavabench", "classnames.json", "README.md")


def class_names() -> list[str]:
    """Class names in label order ("blue circle", ...): index = label of the largest object."""
    return list(CLASSNAMES)


def class_index(colour: str, shape: str) -> int:
    name = f"{colour} {shape}"
    if name not in CLASSNAMES:
        raise ValueError(f"unknown class {name!r}; colours {list(COLOURS)}, shapes {list(SHAPES)}")
    return CLASSNAMES.index(name)


def item_rng(seed: int, split: str, index: int, purpose: str = "scene") -> random.Random:
    """Independent RNG for one sample and purpose (string seeds hash deterministically)."""
    return random.Random(f"shapes-world/{seed}/{split}/{index}/{purpose}")


def balanced_class(seed: int, split: str, index: int) -> int:
    """Class of sample `index`: a fresh permutation of the 40 classes per block of 40 (balanced)."""
    perm = list(range(len(CLASSNAMES)))
    item_rng(seed, split, index // len(CLASSNAMES), "class-perm").shuffle(perm)
    return perm[index % len(CLASSNAMES)]


def _as_random(rng) -> random.Random:
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, np.random.Generator):
        return random.Random(int(rng.integers(0, 2**63 - 1)))
    if isinstance(rng, int):
        return random.Random(rng)
    raise TypeError(f"rng must be random.Random, numpy Generator or int, got {type(rng).__name__}")


def _jitter_rgb(rng: random.Random, rgb, amount: int) -> list[int]:
    return [int(min(255, max(0, c + rng.randint(-amount, amount)))) for c in rgb]


def _sample_background(rng: random.Random) -> dict:
    name = rng.choice(list(BACKGROUND_COLOURS))
    base = _jitter_rgb(rng, BACKGROUND_COLOURS[name], 8)
    kind = rng.choice(TEXTURES)
    bg = {"texture": kind, "colour": name, "rgb": base}
    if kind in ("stripes", "checker"):
        delta = rng.choice((-1, 1)) * rng.randint(18, 32)
        bg["rgb2"] = [int(min(255, max(0, c + delta))) for c in base]
        bg["period"] = round(rng.uniform(0.06, 0.14), 4)  # fraction of the image side
        if kind == "stripes":
            bg["orientation"] = rng.choice(("horizontal", "vertical", "diagonal"))
    elif kind == "noise":
        bg["amplitude"] = rng.randint(8, 18)
        bg["noise_seed"] = rng.getrandbits(32)
    return bg


def _place(rng: random.Random, objs: list[dict], jitter: float) -> bool:
    """Give each object a centre inside its grid cell and the image; False if two overlap."""
    cell = 1.0 / 3.0
    margin = 0.01
    for o in objs:
        row, col = divmod(o["cell"], 3)
        ext = o["extent"]
        cx = (col + 0.5) * cell + rng.uniform(-jitter, jitter) * cell
        cy = (row + 0.5) * cell + rng.uniform(-jitter, jitter) * cell
        # Stay inside the image, then inside the cell (the position label must stay true).
        cx = min(max(cx, ext + margin), 1.0 - ext - margin)
        cy = min(max(cy, ext + margin), 1.0 - ext - margin)
        cx = min(max(cx, col * cell + 0.02), (col + 1) * cell - 0.02)
        cy = min(max(cy, row * cell + 0.02), (row + 1) * cell - 0.02)
        o["center"] = [round(cx, 4), round(cy, 4)]
    for i in range(len(objs)):
        for j in range(i + 1, len(objs)):
            (xi, yi), (xj, yj) = objs[i]["center"], objs[j]["center"]
            if math.hypot(xi - xj, yi - yj) < objs[i]["extent"] + objs[j]["extent"] + 0.015:
                return False
    return True


def sample_scene(rng, cls: int | None = None, n_objects: int | None = None) -> dict:
    """Sample a scene description (pure data; render with `render_scene`).

    `rng`: random.Random (or numpy Generator / int seed). `cls` fixes the largest object's class.
    Objects are listed largest first; (colour, shape) pairs are unique within a scene and every
    object sits in its own grid cell, so questions about "the red circle" or "the top-left shape"
    have exactly one answer.
    """
    rng = _as_random(rng)
    if cls is None:
        cls = rng.randrange(len(CLASSNAMES))
    if not 0 <= cls < len(CLASSNAMES):
        raise ValueError(f"cls must be in [0, {len(CLASSNAMES)}), got {cls}")
    n = n_objects if n_objects is not None else rng.choices((1, 2, 3), weights=(0.3, 0.35, 0.35))[0]
    if not 1 <= n <= 3:
        raise ValueError(f"n_objects must be 1..3, got {n}")
    colour, shape = CLASSNAMES[cls].split(" ")
    top = "large" if rng.random() < 0.75 else "medium"
    sizes = [top] + [rng.choice(SIZES[: SIZES.index(top)]) for _ in range(n - 1)]
    sizes[1:] = sorted(sizes[1:], key=SIZES.index, reverse=True)
    others = rng.sample([c for c in CLASSNAMES if c != CLASSNAMES[cls]], n - 1)
    kinds = [(colour, shape)] + [tuple(c.split(" ")) for c in others]
    cells = rng.sample(range(9), n)
    objs = []
    for (col, shp), size, cell in zip(kinds, sizes, cells):
        r = rng.uniform(*SIZE_RADIUS[size])
        objs.append({
            "colour": col, "shape": shp, "size": size, "position": POSITIONS[cell], "cell": cell,
            "radius": round(r, 4), "extent": round(r * EXTENT[shp], 4),
            "rotation": round(rng.uniform(-15.0, 15.0), 2) if shp != "circle" else 0.0,
            "rgb": _jitter_rgb(rng, COLOURS[col], 10),
        })
    placed = any(_place(rng, objs, 0.12) for _ in range(30))
    while not placed:
        # Rare (a big triangle next to a medium one): shrink the others, drop the smallest last.
        for o in objs[1:]:
            o["radius"] = SIZE_RADIUS[o["size"]][0]
            o["extent"] = round(o["radius"] * EXTENT[o["shape"]], 4)
        placed = _place(rng, objs, 0.0)
        if not placed:
            objs.pop()
    for o in objs:
        o["area"] = round(math.pi * o["radius"] ** 2, 6)
    return {
        "objects": objs,
        "background": _sample_background(rng),
        "label": cls,
        "classname": CLASSNAMES[cls],
        "num_objects": len(objs),
    }


def _background_image(bg: dict, size: int) -> Image.Image:
    kind = bg["texture"]
    if kind == "plain":
        return Image.new("RGB", (size, size), tuple(bg["rgb"]))
    if kind == "noise":
        noise = np.random.default_rng(bg["noise_seed"]).normal(0.0, bg["amplitude"], (size, size, 1))
        return Image.fromarray(np.clip(np.asarray(bg["rgb"], np.float32) + noise, 0, 255).astype(np.uint8), "RGB")
    period = max(2, int(round(bg["period"] * size)))
    r = np.arange(size)
    y, x = r[:, None], r[None, :]
    if kind == "checker":
        sel = ((x // period) + (y // period)) % 2
    else:
        coord = {"horizontal": y + 0 * x, "vertical": x + 0 * y, "diagonal": x + y}[bg["orientation"]]
        sel = (coord // max(1, period // 2)) % 2
    # Two-colour palette image: much cheaper than blending float arrays.
    img = Image.fromarray(sel.astype(np.uint8), "P")
    img.putpalette(list(bg["rgb"]) + list(bg["rgb2"]))
    return img.convert("RGB")


def _vertices(shape: str, cx: float, cy: float, ext: float, rotation: float) -> list[tuple]:
    if shape == "square":
        angles, radii = [45 + 90 * k for k in range(4)], [ext] * 4
    elif shape == "triangle":
        angles, radii = [-90 + 120 * k for k in range(3)], [ext] * 3
    elif shape == "hexagon":
        angles, radii = [60 * k for k in range(6)], [ext] * 6
    elif shape == "star":
        angles = [-90 + 36 * k for k in range(10)]
        radii = [ext if k % 2 == 0 else ext * _STAR_INNER for k in range(10)]
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return [(cx + rad * math.cos(math.radians(a + rotation)), cy + rad * math.sin(math.radians(a + rotation)))
            for a, rad in zip(angles, radii)]


def render_scene(scene: dict, image_size: int = 128, supersample: int = 2) -> Image.Image:
    """Draw a scene as an RGB image (shapes drawn at `supersample`x, then box-filtered: antialiased)."""
    big = image_size * supersample
    bg = _background_image(scene["background"], image_size)
    img = bg.resize((big, big), Image.NEAREST) if supersample > 1 else bg
    draw = ImageDraw.Draw(img)
    for o in sorted(scene["objects"], key=lambda o: o["area"]):
        cx, cy = o["center"][0] * big, o["center"][1] * big
        ext, fill = o["extent"] * big, tuple(o["rgb"])
        if o["shape"] == "circle":
            draw.ellipse((cx - ext, cy - ext, cx + ext, cy + ext), fill=fill)
        else:
            draw.polygon(_vertices(o["shape"], cx, cy, ext, o["rotation"]), fill=fill)
    return img.reduce(supersample) if supersample > 1 else img


def make_sample(seed: int, split: str, index: int, image_size: int = 128) -> tuple[dict, Image.Image]:
    """The record (scene + key, caption, cls) and image of one sample; same inputs -> same output."""
    from drip_demo.synthetic_questions import alt_text, caption

    rng = item_rng(seed, split, index)
    scene = sample_scene(rng, cls=balanced_class(seed, split, index))
    rec = {"key": f"{index:06d}", "split": split, "index": index, "image_size": image_size, **scene}
    rec["caption"] = caption(scene, rng)
    rec["alt_text"] = alt_text(scene, rng)
    return rec, render_scene(scene, image_size)


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata -> reproducible bytes
    tar.addfile(info, io.BytesIO(data))


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def shard_spec(out: str | Path, split: str) -> str:
    """The brace pattern of a generated split's shards ('OUT/train-{000000..000002}.tar'), for --train-data."""
    n = len(list(Path(out).glob(f"{split}-*.tar")))
    if n == 0:
        raise FileNotFoundError(f"{out}: no {split}-*.tar shards (python -m drip_demo.synthetic --out {out})")
    return str(Path(out) / f"{split}-{{000000..{n - 1:06d}}}.tar")


def _write_shard(task: dict) -> list[dict]:
    """Worker: render one shard, write its tar + ImageFolder files (+ eval images); return records."""
    out, split = Path(task["out"]), task["split"]
    shard_path = out / f"{split}-{task['shard']:06d}.tar"
    tmp = shard_path.with_suffix(".tar.tmp")
    records = []
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for index in range(task["start"], task["end"]):
            rec, img = make_sample(task["seed"], split, index, task["image_size"])
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=task["jpeg_quality"])
            jpg = buf.getvalue()
            key = rec["key"]
            _tar_add(tar, f"{key}.cls", str(rec["label"]).encode())
            _tar_add(tar, f"{key}.jpg", jpg)
            _tar_add(tar, f"{key}.json", _json_bytes(rec))
            _tar_add(tar, f"{key}.txt", rec["alt_text"].encode())
            (out / "imagefolder" / split / rec["classname"] / f"{key}.jpg").write_bytes(jpg)
            if split == "val" and index < task["n_sqa_image"]:
                pdir = out / "scienceqa" / "images" / "test" / sqa_pid(index)
                pdir.mkdir(parents=True, exist_ok=True)
                img.save(pdir / "image.png", format="PNG")
            if split == "val" and index < task["n_bench_images"]:
                (out / "llavabench" / "images" / f"{key}.jpg").write_bytes(jpg)
            records.append(rec)
    os.replace(tmp, shard_path)
    return records


def sqa_pid(val_index: int) -> str:
    """ScienceQA problem id of the image question about val image `val_index` (numeric, 1-based)."""
    return str(val_index + 1)


def _gen_args(n_train, n_val, image_size, seed, shard_size, jpeg_quality, n_sqa, n_bench_images, n_warmup,
              sqa_mix) -> dict:
    return {"format_version": FORMAT_VERSION, "n_train": n_train, "n_val": n_val, "image_size": image_size,
            "seed": seed, "shard_size": shard_size, "jpeg_quality": jpeg_quality, "n_sqa": n_sqa,
            "n_bench_images": n_bench_images, "n_warmup": n_warmup, "sqa_mix": sqa_mix}


def _clean_outputs(out: Path) -> None:
    """Remove what a previous run wrote (only our own names), so no stale shard survives."""
    for p in list(out.glob("train-*.tar*")) + list(out.glob("val-*.tar*")):
        p.unlink()
    for name in _OUTPUTS + ("meta.json",):
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def generate(out_dir, n_train: int, n_val: int, image_size: int = 128, seed: int = 0, shard_size: int = 1000,
             workers: int = 2, jpeg_quality: int = 90, n_sqa: int | None = None, n_bench_images: int = 20,
             n_warmup: int = 0, sqa_mix: str = "uniform", overwrite: bool = False, progress: bool = True) -> dict:
    """Write the whole shapes world into `out_dir` and return its meta (also in out_dir/meta.json).

    If out_dir/meta.json records the same generation arguments, nothing is rewritten and the stored
    meta is returned with meta["reused"] = True. Different arguments need overwrite=True.
    `n_sqa`: ScienceQA image questions (default min(n_val, 1000)), plus ~10% text-only ones.
    `n_bench_images`: val images used for LLaVA-Bench (3 questions each).
    `n_warmup`: colour-only conversations on the first n_warmup train images, put first in instruct.json (the
    mix after them is shuffled): trained in file order (--keep_data_order) they are a reading warm-up.
    `sqa_mix`: the question-type mix of the ScienceQA image questions (synthetic_questions.SQA_MIXES).
    """
    from tqdm import tqdm

    from drip_demo import synthetic_questions as sq

    if n_train < 0 or n_val < 0 or n_train + n_val == 0:
        raise ValueError(f"need n_train, n_val >= 0 and at least one sample, got {n_train}, {n_val}")
    if shard_size < 1 or image_size < 16:
        raise ValueError(f"shard_size must be >= 1 and image_size >= 16, got {shard_size}, {image_size}")
    n_sqa = min(n_val, 1000) if n_sqa is None else min(n_sqa, n_val)
    n_bench_images = min(n_bench_images, n_val)
    out = Path(out_dir)
    n_warmup = min(n_warmup, n_train)
    if sqa_mix not in sq.SQA_MIXES:
        raise ValueError(f"unknown sqa_mix {sqa_mix!r}; one of {sorted(sq.SQA_MIXES)}")
    args = _gen_args(n_train, n_val, image_size, seed, shard_size, jpeg_quality, n_sqa, n_bench_images, n_warmup,
                     sqa_mix)
    meta_path = out / "meta.json"
    if meta_path.exists() and not overwrite:
        old = json.loads(meta_path.read_text())
        if old.get("args") == args:
            return {**old, "reused": True}
        raise FileExistsError(f"{meta_path} was generated with different arguments {old.get('args')}; "
                              f"pass overwrite=True (--overwrite) to regenerate with {args}")
    out.mkdir(parents=True, exist_ok=True)
    _clean_outputs(out)
    t0 = time.perf_counter()
    for split in ("train", "val"):
        for name in CLASSNAMES:  # every class folder exists, so ImageFolder indices == CLASSNAMES
            (out / "imagefolder" / split / name).mkdir(parents=True, exist_ok=True)
    (out / "llavabench" / "images").mkdir(parents=True, exist_ok=True)
    common = {"out": str(out), "seed": seed, "image_size": image_size, "jpeg_quality": jpeg_quality,
              "n_sqa_image": n_sqa, "n_bench_images": n_bench_images}
    tasks = [{**common, "split": split, "shard": s, "start": start, "end": min(start + shard_size, n)}
             for split, n in (("train", n_train), ("val", n_val))
             for s, start in enumerate(range(0, n, shard_size))]
    records: list[dict] = []
    bar = tqdm(total=n_train + n_val, desc="shapes world", unit="img", disable=not progress)
    if workers > 1 and len(tasks) > 1:
        with mp.get_context().Pool(min(workers, len(tasks))) as pool:
            for recs in pool.imap_unordered(_write_shard, tasks):
                records.extend(recs)
                bar.update(len(recs))
    else:
        for task in tasks:
            recs = _write_shard(task)
            records.extend(recs)
            bar.update(len(recs))
    bar.close()
    t_images = time.perf_counter() - t0
    records.sort(key=lambda r: (_SPLIT_CODE[r["split"]], r["index"]))
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]

    (out / "classnames.json").write_text(json.dumps(CLASSNAMES, indent=1))
    llava = out / "llava"
    llava.mkdir(exist_ok=True)
    pretrain, instruct = sq.pretrain_records(train, seed), sq.instruct_records(train, seed)
    random.Random(f"shapes-world/{seed}/instruct-order").shuffle(instruct)  # text-only ones among the rest
    instruct = sq.warmup_records(train[:n_warmup], seed) + instruct
    (llava / "pretrain.json").write_text(json.dumps(pretrain, indent=1))
    (llava / "instruct.json").write_text(json.dumps(instruct, indent=1))
    # the same conversations on val images: held-out data for drip_llava.eval.image_use
    (llava / "val_pretrain.json").write_text(json.dumps(sq.pretrain_records(val, seed), indent=1))
    (llava / "val_instruct.json").write_text(json.dumps(sq.instruct_records(val, seed, text_only_frac=0.0), indent=1))
    val_questions = sq.short_answer_questions(val, seed)
    _write_jsonl(llava / "val_questions.jsonl", val_questions)
    problems, pid_splits = sq.scienceqa_problems(val[:n_sqa], seed, sqa_pid, mix=sqa_mix)
    (out / "scienceqa" / "images" / "test").mkdir(parents=True, exist_ok=True)
    (out / "scienceqa" / "problems.json").write_text(json.dumps(problems, indent=1))
    (out / "scienceqa" / "pid_splits.json").write_text(json.dumps(pid_splits, indent=1))
    bench = sq.llavabench(val[:n_bench_images], seed)
    for name, rows in bench.items():
        if name == "rule":
            (out / "llavabench" / "rule.json").write_text(json.dumps(rows, indent=1))
        else:
            _write_jsonl(out / "llavabench" / f"{name}.jsonl", rows)

    counts = {
        "train": len(train), "val": len(val),
        "train_shards": sum(t["split"] == "train" for t in tasks),
        "val_shards": sum(t["split"] == "val" for t in tasks),
        "llava_pretrain": len(pretrain), "llava_instruct": len(instruct), "llava_warmup": n_warmup,
        "llava_val_questions": len(val_questions),
        "scienceqa": len(problems), "scienceqa_with_image": sum(p["image"] is not None for p in problems.values()),
        "llavabench_questions": len(bench["questions"]),
    }
    meta = {
        "args": args, "counts": counts, "classnames": CLASSNAMES, "colours": list(COLOURS),
        "shapes": list(SHAPES), "positions": list(POSITIONS), "sizes": list(SIZES),
        "seconds_images": round(t_images, 2), "seconds_total": round(time.perf_counter() - t0, 2),
        "workers": workers,
    }
    (out / "README.md").write_text(sq.readme(meta))
    tmp = meta_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)  # written last: its presence means the dataset is complete
    return {**meta, "reused": False}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m drip_demo.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n-train", type=int, default=18000)
    p.add_argument("--n-val", type=int, default=2000)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--n-sqa", type=int, default=None, help="ScienceQA image questions (default min(n_val, 1000))")
    p.add_argument("--n-bench-images", type=int, default=20, help="val images for LLaVA-Bench (3 questions each)")
    p.add_argument("--n-warmup", type=int, default=0, help="colour-only stage-2 conversations first in instruct.json "
                                                           "(a reading warm-up when trained in order)")
    p.add_argument("--sqa-mix", default="uniform", choices=("uniform", "readable"),
                   help="question types of the ScienceQA image problems: each equally likely, or weighted toward "
                        "what a tower reads after minutes of CLIP (70%% colour; synthetic_questions.SQA_MIXES)")
    p.add_argument("--overwrite", action="store_true", help="regenerate even if DIR/meta.json exists")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    meta = generate(a.out, a.n_train, a.n_val, image_size=a.image_size, seed=a.seed, shard_size=a.shard_size,
                    workers=a.workers, jpeg_quality=a.jpeg_quality, n_sqa=a.n_sqa,
                    n_bench_images=a.n_bench_images, n_warmup=a.n_warmup, sqa_mix=a.sqa_mix, overwrite=a.overwrite,
                    progress=not a.no_progress)
    c = meta["counts"]
    if meta["reused"]:
        print(f"{a.out}: already generated with the same arguments (meta.json); skipping. Use --overwrite to redo.")
    else:
        n = c["train"] + c["val"]
        print(f"{a.out}: {c['train']} train + {c['val']} val images ({c['train_shards']}+{c['val_shards']} shards) "
              f"in {meta['seconds_images']:.1f} s ({n / max(meta['seconds_images'], 1e-9):.0f} img/s, "
              f"{a.workers} workers); total {meta['seconds_total']:.1f} s")
    print(f"  ScienceQA problems: {c['scienceqa']} ({c['scienceqa_with_image']} with image); "
          f"LLaVA-Bench questions: {c['llavabench_questions']}; classes: {len(CLASSNAMES)}")
    return meta


if __name__ == "__main__":
    main()
