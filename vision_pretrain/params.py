"""Command-line arguments of the trainers as grouped dataclasses (model / data / train).

Every field is a flag (`lr_find_steps` -> `--lr-find-steps`); the resolved arguments are saved in each run
folder (args.json) and in every checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional, get_type_hints


def _f(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainArgs:
    output: str = _f(None, "run folder (logs, checkpoints, exported towers)", required=True)
    batch_size: int = _f(64, "per-rank batch size")
    epochs: int = _f(1, "epochs (ignored when --steps is given)")
    steps: Optional[int] = _f(None, "total optimizer steps (overrides --epochs)")
    lr: float = _f(5e-4, "peak learning rate")
    wd: float = _f(0.1, "AdamW weight decay (not applied to biases, norms, embeddings, logit scale)")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.98, "AdamW beta2")
    eps: float = _f(1e-6, "AdamW epsilon")
    schedule: str = _f("cosine", "learning-rate schedule after warmup", choices=("constant", "cosine"))
    warmup: int = _f(0, "linear warmup steps")
    clip_grad: Optional[float] = _f(None, "clip the gradient norm to this value")
    precision: str = _f("fp32", "fp32; bf16 = bf16 autocast (CPU or GPU); amp = fp16 autocast + GradScaler "
                                "on GPU, bf16 autocast on CPU", choices=("fp32", "bf16", "amp"))
    rate_loss_weight: Optional[float] = _f(None, "weight of the DRIP rate loss (default: the model config's)")
    workers: int = _f(0, "data-loader worker processes per rank")
    seed: int = _f(0, "random seed")
    log_every: int = _f(10, "write a step record to the JSONL log every N steps")
    save_every: int = _f(0, "checkpoint every N steps (0: only at the end of each epoch)")
    keep_checkpoints: int = _f(2, "keep the last N checkpoints")
    resume: Optional[str] = _f(None, "'auto' (latest complete checkpoint of --output, if any) or a checkpoint folder")
    device: Optional[str] = _f(None, "device (default: cuda if available, else cpu)")
    no_tqdm: bool = _f(False, "disable the progress bar")


@dataclass
class ClipModelArgs:
    model: Optional[str] = _f(None, "DRIP/ViT preset of the image tower (drip_llava.vision.list_presets()); default "
                                    "drip-tiny-16-4x, or with a pretrained --init-vision the DRIP fields' defaults "
                                    "(a preset there supplies compression, n_pre, ...; its shape must match)")
    vision_override: list = _f([], "override preset fields, KEY=VALUE (JSON value), e.g. rate_loss=\"binomial\"; "
                                   "compression=4 n_pre=4 on a pretrained ViT = a fresh boundary predictor",
                               nargs="*")
    init_vision: Optional[str] = _f(None, "start the image tower from a DripVisionModel folder, an HF CLIP folder "
                                          "(e.g. openai/clip-vit-large-patch14-336 downloaded) or open_clip:NAME:TAG "
                                          "(loaded from the local cache)")
    init_text: str = _f("auto", "text tower start: 'auto' = the --init-vision CLIP's own text tower when it has "
                                "one (HF CLIPModel folder, open_clip:NAME:TAG; --text-model is then unused), else "
                                "random from --text-model; 'none' = always random from --text-model")
    text_model: str = _f("tiny", "text tower config: vision_pretrain/text_configs.json or an open_clip model name")
    text_override: list = _f([], "override text config fields, KEY=VALUE (JSON value), e.g. context_length=64",
                             nargs="*")
    init_logit_scale: float = _f(math.log(1 / 0.07), "initial log of the logit scale (CLIP: ln(1/0.07)); higher "
                                 "= sharper softmax from step 1, which shortens the initial ln(batch) plateau")
    local_loss: bool = _f(False, "ClipLoss local_loss (each rank's logits against all gathered features)")
    gather_with_grad: bool = _f(False, "ClipLoss gather_with_grad (full gradient through the all_gather)")


@dataclass
class ClipDataArgs:
    train_data: str = _f(None, "webdataset shards, e.g. 'DIR/train-{000000..000009}.tar' ('::' joins specs)",
                         required=True)
    samples_per_epoch: Optional[int] = _f(None, "samples per epoch (default: counted from the shards)")
    shuffle_buffer: int = _f(1000, "per-worker shuffle buffer (samples)")
    zeroshot_dir: Optional[str] = _f(None, "ImageFolder for zero-shot top-1/top-5 after each epoch")
    classnames: Optional[str] = _f(None, "class names JSON (list or {folder: name}) or 'imagenet'")
    zeroshot_templates: str = _f("auto", "prompt templates (auto: openai for ImageNet class names, else short)",
                                 choices=("auto", "openai", "simple", "short"))
    eval_batch_size: int = _f(64, "batch size of the zero-shot evaluation")


@dataclass
class ClassifyModelArgs:
    mode: str = _f("linear-probe", "linear-probe: frozen tower + linear head; finetune: all weights from "
                                   "--init; scratch: random init from --model",
                   choices=("linear-probe", "finetune", "scratch"))
    init: Optional[str] = _f(None, "CLIP run folder, DripVisionModel folder, or open_clip:NAME:TAG")
    model: Optional[str] = _f(None, "preset (scratch; or the DRIP layout for open_clip:NAME:TAG imports)")
    vision_override: list = _f([], "override preset fields, KEY=VALUE (JSON value)", nargs="*")
    label_smoothing: float = _f(0.0, "cross-entropy label smoothing")


@dataclass
class ClassifyDataArgs:
    train_dir: str = _f(None, "ImageFolder with the training images", required=True)
    val_dir: Optional[str] = _f(None, "ImageFolder with the validation images")
    aug: str = _f("none", "training augmentation", choices=("none", "basic", "randaug"))
    eval_batch_size: int = _f(64, "batch size of the evaluation")


@dataclass
class ClipArgs:
    model: ClipModelArgs
    data: ClipDataArgs
    train: TrainArgs


@dataclass
class ClassifyArgs:
    model: ClassifyModelArgs
    data: ClassifyDataArgs
    train: TrainArgs


def add_dataclass_args(parser: argparse.ArgumentParser, cls, title: str, defaults: dict | None = None) -> None:
    group = parser.add_argument_group(title)
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        flag = "--" + f.name.replace("_", "-")
        own = f.default_factory() if f.default is dataclasses.MISSING else f.default
        default = (defaults or {}).get(f.name, own)
        kw = {"help": meta.pop("help", ""), "dest": f"{title}.{f.name}", "default": default}
        typ = hints[f.name]
        if typ is bool:
            group.add_argument(flag, action="store_true", **kw)
            continue
        if typ in (Optional[int], int):
            kw["type"] = int
        elif typ in (Optional[float], float):
            kw["type"] = float
        group.add_argument(flag, **kw, **meta)


def build(cls, ns: argparse.Namespace, title: str):
    return cls(**{f.name: getattr(ns, f"{title}.{f.name}") for f in dataclasses.fields(cls)})


def parse_grouped(argv, top_cls, groups: dict, description: str, defaults: dict | None = None):
    parser = argparse.ArgumentParser(description=description)
    for title, cls in groups.items():
        add_dataclass_args(parser, cls, title, (defaults or {}).get(title))
    ns = parser.parse_args(argv)
    return top_cls(**{title: build(cls, ns, title) for title, cls in groups.items()})


def to_dict(args) -> dict:
    return dataclasses.asdict(args)
