"""Offline example photos (bundled with scikit-image and matplotlib), so pictures and tests need no network;
and the root of drip_llava's local caches, where the photos are written as files when a UI needs paths."""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

# name -> skimage.data function name; all of these ship inside the scikit-image wheel (no pooch download)
_SKIMAGE = {"astronaut": "astronaut", "chelsea": "chelsea", "coffee": "coffee", "rocket": "rocket",
            "camera": "camera"}
_MATPLOTLIB = {"grace_hopper": "grace_hopper.jpg"}
EXAMPLE_PREFIX = "example:"


def default_cache_dir() -> Path:
    """Root of drip_llava's local caches (env DRIP_LLAVA_CACHE overrides ~/.cache/drip_llava)."""
    return Path(os.environ.get("DRIP_LLAVA_CACHE", Path.home() / ".cache" / "drip_llava")).expanduser()


def _matplotlib_sample(filename: str) -> Path | None:
    import matplotlib.cbook as cbook

    try:
        path = cbook.get_sample_data(filename, asfileobj=False)
    except (FileNotFoundError, ValueError, OSError):
        return None
    path = Path(path)
    return path if path.is_file() else None


def list_examples() -> list[str]:
    """Names accepted by `example_image` (grace_hopper only when matplotlib ships its sample data)."""
    names = list(_SKIMAGE)
    names += [n for n, f in _MATPLOTLIB.items() if _matplotlib_sample(f) is not None]
    return names


def example_image(name: str) -> Image.Image:
    """An RGB PIL image by name (astronaut, chelsea, coffee, rocket, camera, grace_hopper)."""
    if name in _SKIMAGE:
        import skimage.data

        array = getattr(skimage.data, _SKIMAGE[name])()
        return Image.fromarray(array).convert("RGB")
    if name in _MATPLOTLIB:
        path = _matplotlib_sample(_MATPLOTLIB[name])
        if path is None:
            raise FileNotFoundError(f"matplotlib's sample data {_MATPLOTLIB[name]!r} is not installed")
        with Image.open(path) as im:
            return im.convert("RGB")
    raise KeyError(f"unknown example image {name!r}; valid: {', '.join(list_examples())}")


def example_file(name: str, folder: str | os.PathLike | None = None) -> Path:
    """The example photo `name` as a JPEG file in `folder` (default: <cache root>/examples), written once."""
    folder = Path(folder) if folder is not None else default_cache_dir() / "examples"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jpg"
    if not path.is_file():
        tmp = folder / f".{name}.{os.getpid()}.jpg"
        example_image(name).save(tmp, quality=92)
        os.replace(tmp, path)  # atomic: concurrent first starts never see half a file
    return path


def load_image(spec: str) -> Image.Image:
    """`example:NAME` or a path to an image file -> RGB PIL image; a bad path raises naming the file."""
    if spec.startswith(EXAMPLE_PREFIX):
        return example_image(spec[len(EXAMPLE_PREFIX):])
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {spec} (or use example:NAME, NAME in {list_examples()})")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as e:
        raise ValueError(f"cannot read image {spec}: {e}") from e


def image_label(spec: str) -> str:
    """Short name for titles: the example name or the file stem."""
    return spec[len(EXAMPLE_PREFIX):] if spec.startswith(EXAMPLE_PREFIX) else Path(spec).stem
