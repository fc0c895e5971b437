"""One image processor for training, serving and every eval command: the same image gives the same pixels.

`DripLlavaImageProcessor(image)` (a PIL image or a path) -> normalised float tensor [3, S, S], in this order:
  1. EXIF orientation applied (ImageOps.exif_transpose: a phone photo stands upright)
  2. transparency composited onto white (RGBA, LA, PA, P with a transparent colour); any other mode -> RGB
  3. aspect_ratio "pad": centred on a square of `pad_color` (LLaVA-1.5's expand2square; default LLaVA's colour,
     the mean truncated: tuple(int(255 * m) for m in image_mean)); "square": nothing here
  4. the tower's transform, the same steps as DripVisionModel.preprocess: resize the shorter side to image_size
     (bicubic), center crop to image_size, to tensor, normalise with image_mean / image_std

It lives with the data code because the dataset is its first user and it needs nothing from the model package.
A checkpoint folder stores it as preprocessor_config.json next to config.json (the file name transformers uses);
`load_pretrained_model` reads it, so a model is served and evaluated with the preprocessing it was trained with.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from PIL import Image, ImageOps

from drip_llava.vision.config import OPENAI_MEAN, OPENAI_STD

PROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_TYPE = "DripLlavaImageProcessor"
ASPECT_RATIOS = ("square", "pad")
ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels become white, as a browser shows them
HF_PROCESSOR_TYPES = ("CLIPImageProcessor", "CLIPImageProcessorFast", "LlavaImageProcessor",
                      "LlavaImageProcessorFast")
_SAVED_FIELDS = ("image_size", "image_mean", "image_std", "aspect_ratio", "pad_color")

ImageInput = Union[Image.Image, str, os.PathLike]


def to_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied and transparency composited onto white (a plain convert("RGB") keeps the colour
    under transparent pixels, often black). Idempotent: the result carries no orientation tag."""
    im = ImageOps.exif_transpose(image)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        flat.alpha_composite(rgba)
        return flat.convert("RGB")
    return im.convert("RGB")


def expand2square(img: Image.Image, background: tuple) -> Image.Image:
    """Pad to a centred square with `background` (LLaVA-1.5's --image_aspect_ratio pad): nothing is cropped away."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), background)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def llava_pad_color(image_mean: Sequence[float]) -> tuple[int, int, int]:
    """LLaVA's pad colour: the mean in 0..255, truncated (int(x * 255), not rounded)."""
    return tuple(int(x * 255) for x in image_mean)


@dataclasses.dataclass
class DripLlavaImageProcessor:
    """PIL image or path -> [3, image_size, image_size] (see the module doc for the steps). Picklable, so it runs
    in DataLoader workers."""

    image_size: int = 224
    image_mean: Sequence[float] = OPENAI_MEAN
    image_std: Sequence[float] = OPENAI_STD
    aspect_ratio: str = "square"  # "square": resize + center crop (LLaVA's default); "pad": pad to a square first
    pad_color: Optional[Sequence[int]] = None  # None: llava_pad_color(image_mean)

    def __post_init__(self):
        if self.aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(f"image_aspect_ratio {self.aspect_ratio!r}; valid: {', '.join(ASPECT_RATIOS)}")
        self.image_size = int(self.image_size)
        self.image_mean = tuple(float(x) for x in self.image_mean)
        self.image_std = tuple(float(x) for x in self.image_std)
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError(f"image_mean / image_std need 3 values, got {self.image_mean} / {self.image_std}")
        self.pad_color = tuple(int(x) for x in (self.pad_color if self.pad_color is not None
                                                 else llava_pad_color(self.image_mean)))
        self._custom_transform = False
        self.transform = self._tower_transform()

    def _tower_transform(self) -> Callable:
        from torchvision import transforms as T

        return T.Compose([
            T.Resize(self.image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(self.image_size),
            T.ToTensor(),
            T.Normalize(self.image_mean, self.image_std),
        ])

    # ---- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_vision_config(cls, config: Any, aspect_ratio: str = "square") -> "DripLlavaImageProcessor":
        """From a DripVisionConfig (or its dict): the tower's size and statistics, plus the aspect-ratio policy."""
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        return cls(image_size=get("image_size"), image_mean=get("image_mean", OPENAI_MEAN),
                   image_std=get("image_std", OPENAI_STD), aspect_ratio=aspect_ratio)

    @classmethod
    def with_transform(cls, transform: Callable, aspect_ratio: str = "square",
                       image_mean: Sequence[float] = OPENAI_MEAN) -> "DripLlavaImageProcessor":
        """Steps 1-3 of this processor in front of another PIL -> tensor transform (e.g. a tower's `preprocess`).
        Such a processor cannot be saved: its last step is not described by the saved fields."""
        proc = cls(aspect_ratio=aspect_ratio, image_mean=image_mean)
        proc.transform, proc._custom_transform = transform, True
        return proc

    def with_aspect_ratio(self, aspect_ratio: str) -> "DripLlavaImageProcessor":
        """A copy with another aspect-ratio policy (an eval command's explicit override)."""
        if self._custom_transform:
            return self.with_transform(self.transform, aspect_ratio, self.image_mean)
        return dataclasses.replace(self, aspect_ratio=aspect_ratio)

    # ---- processing -----------------------------------------------------------------------------------
    def prepare(self, image: Image.Image) -> Image.Image:
        """Steps 1-3: the RGB image the tower transform gets (also what a segment overlay should be drawn on)."""
        im = to_rgb(image)
        return expand2square(im, self.pad_color) if self.aspect_ratio == "pad" else im

    def __call__(self, image: ImageInput) -> torch.Tensor:
        if isinstance(image, Image.Image):
            return self.transform(self.prepare(image))
        with Image.open(image) as im:
            return self.transform(self.prepare(im))

    # ---- files ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        if self._custom_transform:
            raise ValueError("this processor wraps a custom transform; build it with from_vision_config to save it")
        d = {k: getattr(self, k) for k in _SAVED_FIELDS}
        return {"image_processor_type": PROCESSOR_TYPE, **{k: list(v) if isinstance(v, tuple) else v
                                                            for k, v in d.items()}}

    @classmethod
    def from_dict(cls, d: dict, source: str = "the processor config") -> "DripLlavaImageProcessor":
        """Our own fields, or a transformers CLIPImageProcessor / LlavaImageProcessor config (llava-hf folders)
        when it describes the same steps (bicubic shorter-side resize and a square center crop of one size)."""
        kind = d.get("image_processor_type")
        if kind in HF_PROCESSOR_TYPES:
            return cls._from_hf_dict(d, source)
        if kind != PROCESSOR_TYPE:
            raise ValueError(f"{source}: image_processor_type {kind!r}; readable: {PROCESSOR_TYPE}, "
                             f"{', '.join(HF_PROCESSOR_TYPES)}")
        unknown = sorted(set(d) - set(_SAVED_FIELDS) - {"image_processor_type"})
        if unknown:
            raise ValueError(f"{source}: unknown fields {unknown} (known: {', '.join(_SAVED_FIELDS)})")
        return cls(**{k: d[k] for k in _SAVED_FIELDS if k in d})

    @classmethod
    def _from_hf_dict(cls, d: dict, source: str) -> "DripLlavaImageProcessor":
        def side(v):
            if isinstance(v, dict):
                if "shortest_edge" in v:
                    return int(v["shortest_edge"])
                if v.get("height") == v.get("width"):
                    return int(v["height"])
                return None
            return int(v) if v is not None else None

        size, crop = side(d.get("size")), side(d.get("crop_size", d.get("size")))
        steps_ok = (d.get("do_resize", True) and d.get("do_center_crop", True) and d.get("do_normalize", True)
                    and d.get("resample", 3) == 3 and size is not None and size == crop)
        if not steps_ok:
            raise ValueError(f"{source}: a {d.get('image_processor_type')} whose steps differ from a bicubic resize "
                             f"and a square center crop of one size (size {d.get('size')}, crop_size "
                             f"{d.get('crop_size')}, resample {d.get('resample')})")
        return cls(image_size=size, image_mean=d.get("image_mean", OPENAI_MEAN),
                   image_std=d.get("image_std", OPENAI_STD), aspect_ratio="pad" if d.get("do_pad") else "square")

    def save_pretrained(self, out_dir: Union[str, os.PathLike]) -> Path:
        """Write OUT_DIR/preprocessor_config.json (atomically); returns its path."""
        path = Path(out_dir) / PROCESSOR_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike]) -> "DripLlavaImageProcessor":
        """From a folder holding preprocessor_config.json, or from the JSON file itself."""
        path = Path(path)
        if path.is_dir():
            path = path / PROCESSOR_FILE
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {path}: {e}") from e
        return cls.from_dict(d, str(path))


def load_image_processor(folder: Union[str, os.PathLike], vision_config: Any,
                         model_config: Any = None) -> tuple[DripLlavaImageProcessor, Optional[str]]:
    """(processor, note or None) for a checkpoint folder whose tower has `vision_config`.

    preprocessor_config.json when present; else the aspect ratio recorded in config.json (`image_aspect_ratio`,
    as LLaVA writes it) or in the trainer's drip_llava_args.json, with the tower's size and statistics; else
    "square". The note says which fallback was used."""
    folder = Path(folder)
    tower_size = int(vision_config["image_size"] if isinstance(vision_config, dict) else vision_config.image_size)
    if (folder / PROCESSOR_FILE).is_file():
        proc = DripLlavaImageProcessor.from_pretrained(folder)
        if proc.image_size != tower_size:
            raise ValueError(f"{folder / PROCESSOR_FILE}: image_size {proc.image_size}, but the vision tower takes "
                             f"{tower_size} px images")
        return proc, None
    aspect, source = getattr(model_config, "image_aspect_ratio", None), "config.json"
    args_file = folder / "drip_llava_args.json"
    if aspect is None and args_file.is_file():
        try:
            aspect = json.loads(args_file.read_text(encoding="utf-8")).get("data", {}).get("image_aspect_ratio")
        except (OSError, json.JSONDecodeError, AttributeError):
            aspect = None
        source = args_file.name
    if aspect not in ASPECT_RATIOS:
        return (DripLlavaImageProcessor.from_vision_config(vision_config, "square"),
                f"no {PROCESSOR_FILE} and no image_aspect_ratio recorded in {folder}: images are resized and "
                f"center-cropped (square); save the processor trained with there if it padded")
    return (DripLlavaImageProcessor.from_vision_config(vision_config, aspect),
            f"no {PROCESSOR_FILE} in {folder}: image_aspect_ratio {aspect!r} from {source}")
