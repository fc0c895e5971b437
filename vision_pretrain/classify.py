"""Image classification with a DRIP (or ViT) tower: linear probe, fine-tuning, or training from scratch.

  python -m vision_pretrain.classify --mode linear-probe --init RUN --train-dir DIR/imagefolder/train \
      --val-dir DIR/imagefolder/val --epochs 5 --lr 1e-3 --output CLS_RUN
  python -m vision_pretrain.classify --mode scratch --model drip-tiny-16-4x --schedule cosine --warmup 100 ...
  python -m vision_pretrain.classify --mode finetune --init open_clip:ViT-B-32:laion2b_s34b_b79k \\
      --model drip-b-32-4x ...

The head is one nn.Linear on the tower's pooled embedding (out.pooled); a DVT cascade trains it on every exit's
embedding and sums the exits' CE losses (the paper's joint training; ce_loss_exitK logged). linear-probe freezes
the tower and keeps it in eval mode (deterministic boundaries); finetune/scratch train everything and add the weighted
rate loss. Same logging, checkpoints, resume and DDP as the CLIP trainer. Outputs in RUN/: log.jsonl,
checkpoints/, vision_tower/ (DripVisionModel folder), classifier/ (head.safetensors + classes.json).

--distill-teacher (DynamicViT's option, any token-reducing family): the loss adds --distill-weight x (KL of the
class distributions + MSE of the kept tokens against the teacher's tokens of the same patches), with a frozen
plain-ViT teacher that is not saved: a classify run (its tower and head), a tower folder or CLIP run (its tower,
read through the trained head), or `self` (the initial tower's ViT weights, read through the trained head):

  python -m vision_pretrain.classify --mode finetune --init VIT_RUN --vision-override family=\"dynamicvit\" \
      keep_rate=0.7 --distill-teacher self ...
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

from drip_llava.distributed import DistInfo, cleanup, exit_after_main
from drip_llava.vision import DripVisionModel
from drip_llava.vision.config import parse_overrides
from drip_llava.vision.dvt import task_embeddings
from drip_llava.vision.dynamicvit import distillation_loss, unpruned_teacher
from drip_llava.vision.spec import load_drip_model

from .checkpoint import export_atomic
from .clip import build_vision, gmacs
from .data import ImageFolderData, build_transform, folder_eval_loader, folder_train_loader, steps_per_epoch_folder
from .loop import Task, evaluate_topk, fit, start_run
from .params import ClassifyArgs, ClassifyDataArgs, ClassifyModelArgs, TrainArgs, _f, parse_grouped, to_dict


@dataclass
class DistillModelArgs(ClassifyModelArgs):
    distill_teacher: Optional[str] = _f(None, "distil to a frozen plain-ViT teacher (DynamicViT's option): a "
                                              "classify run folder (tower + head), a tower folder or CLIP run "
                                              "(read through the trained head), or 'self' (the initial tower's "
                                              "ViT weights, read through the trained head)")
    distill_weight: float = _f(0.5, "weight of the distillation loss (KL of the class distributions + MSE of the "
                                    "kept tokens; the paper's 0.5)")


class Classifier(nn.Module):
    def __init__(self, tower: DripVisionModel, num_classes: int, train_tower: bool = True):
        super().__init__()
        self.tower = tower
        self.head = nn.Linear(tower.config.embed_dim, num_classes)
        self.train_tower = train_tower
        if not train_tower:
            tower.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.train_tower:  # a frozen tower keeps eval behaviour: no Gumbel noise, fixed boundaries
            self.tower.eval()
        return self

    def forward(self, images: torch.Tensor, every_exit: bool = False):
        """(logits [B,C] of the tower's embedding, tower output); with `every_exit` the logits are a list, one
        [B,C] per embedding the task loss sums over (a cascade's exits, the last = the tower's; else one)."""
        with torch.set_grad_enabled(self.train_tower and torch.is_grad_enabled()):
            out = self.tower(images)
        if every_exit:
            return [self.head(z.float()) for z in task_embeddings(out)], out
        return self.head(out.pooled.float()), out


def parse_args(argv=None) -> ClassifyArgs:
    return parse_grouped(argv, ClassifyArgs, {"model": DistillModelArgs, "data": ClassifyDataArgs, "train": TrainArgs},
                         "Classification with a DRIP image tower", defaults={"train": {"wd": 0.05, "lr": 1e-3}})


def resolve_init(init: str | None) -> str | None:
    """A CLIP run folder means its exported vision_tower/."""
    if init is None or init.startswith("open_clip:"):
        return init
    path = Path(init)
    if (path / "vision_tower" / "config.json").is_file():
        return str(path / "vision_tower")
    if (path / "config.json").is_file():
        return str(path)
    raise FileNotFoundError(f"--init {init}: not a CLIP run folder, a DripVisionModel folder or open_clip:NAME:TAG")


def build_tower(m: ClassifyModelArgs) -> DripVisionModel:
    if m.mode == "scratch":
        if m.init is not None or m.model is None:
            raise ValueError("--mode scratch takes --model PRESET and no --init")
    elif m.init is None:
        raise ValueError(f"--mode {m.mode} needs --init (CLIP run, DripVisionModel folder or open_clip:NAME:TAG)")
    elif m.init.startswith("open_clip:") and m.model is None:
        raise ValueError("--init open_clip:NAME:TAG needs --model PRESET (the DRIP layout to import into)")
    return build_vision(m.model, resolve_init(m.init), parse_overrides(m.vision_override))


def build_teacher(m: DistillModelArgs, tower: DripVisionModel, classes: list) -> tuple:
    """(frozen plain-ViT teacher, its frozen head or None = read through the student's head) for
    --distill-teacher; `tower` is the student before training (the `self` teacher's weights)."""
    if m.mode == "linear-probe":
        raise ValueError("--distill-teacher trains the tower: use --mode finetune or scratch")
    if tower.config.family == "drip":
        raise ValueError("--distill-teacher needs a token-reducing tower family (e.g. --vision-override "
                         "family=\"dynamicvit\"); DRIP and the plain ViT keep no per-patch tokens to match")
    if m.distill_teacher == "self":
        if m.init is None:
            raise ValueError("--distill-teacher self needs --init (a random tower teaches nothing)")
        return unpruned_teacher(tower), None
    teacher = load_drip_model(resolve_init(m.distill_teacher)).requires_grad_(False).eval()
    if teacher.config.family != "drip" or teacher.config.is_drip:
        raise ValueError(f"--distill-teacher {m.distill_teacher}: the teacher must be a plain ViT (family drip, "
                         f"compression 1), got family {teacher.config.family!r}")
    head_dir = Path(m.distill_teacher) / "classifier"
    if not (head_dir / "head.safetensors").is_file():
        return teacher, None
    found = json.loads((head_dir / "classes.json").read_text())
    if found != classes:
        raise ValueError(f"--distill-teacher {m.distill_teacher}: its classes ({len(found)}) differ from the "
                         f"training folders' ({len(classes)})")
    head = nn.Linear(teacher.config.embed_dim, len(classes))
    load_model(head, str(head_dir / "head.safetensors"))
    return teacher, head.requires_grad_(False)


def evaluate(model: Classifier, ds: ImageFolderData, batch_size: int, info: DistInfo, workers: int = 0) -> dict:
    was_training = model.training
    model.eval()

    def predict(images):
        logits, out = model(images)
        return logits, out.num_tokens

    loader = folder_eval_loader(ds, batch_size, rank=info.rank, world_size=info.world_size, workers=workers)
    res = evaluate_topk(predict, loader, model.head.out_features, info, prefix="val")
    model.train(was_training)
    return res


def main(argv=None) -> dict:
    args = parse_args(argv)
    m, d, t = args.model, args.data, args.train
    info, run = start_run(args, t)

    torch.manual_seed(t.seed)
    tower = build_tower(m)
    c = tower.config
    train_ds = ImageFolderData(d.train_dir, build_transform(tower.preprocess, c.image_size, c.image_mean, c.image_std,
                                                            d.aug), seed=t.seed)
    val_ds = ImageFolderData(d.val_dir, tower.preprocess) if d.val_dir else None
    if val_ds is not None and val_ds.classes != train_ds.classes:
        raise ValueError(f"class folders differ between {d.train_dir} ({len(train_ds.classes)}) and {d.val_dir} "
                         f"({len(val_ds.classes)})")
    model = Classifier(tower, len(train_ds.classes), train_tower=m.mode != "linear-probe")
    teacher, teacher_head = build_teacher(m, tower, train_ds.classes) if m.distill_teacher else (None, None)
    if teacher is not None:  # frozen, outside the trained model: not in DDP, the optimizer or checkpoints
        teacher.to(info.device)
        teacher_head = teacher_head.to(info.device) if teacher_head is not None else None
    torch.manual_seed(t.seed + 1000 * info.rank)
    spe = steps_per_epoch_folder(len(train_ds), t.batch_size, info.world_size)
    rate_w = t.rate_loss_weight if t.rate_loss_weight is not None else c.rate_loss_weight
    if m.mode == "linear-probe":
        rate_w = 0.0  # frozen boundaries: the rate loss has nothing to train

    def batches(epoch: int, skip: int):
        return folder_train_loader(train_ds, t.batch_size, seed=t.seed, epoch=epoch, rank=info.rank,
                                   world_size=info.world_size, workers=t.workers, skip_batches=skip)

    def loss(ddp_model, batch):
        if batch["images"] is None:
            raise RuntimeError(f"a whole training batch of {d.train_dir} was unreadable")
        labels = batch["labels"].to(info.device)
        images = batch["images"].to(info.device, non_blocking=True)
        exit_logits, out = ddp_model(images, every_exit=True)
        logits = exit_logits[-1]
        per_exit = [F.cross_entropy(z.float(), labels, label_smoothing=m.label_smoothing) for z in exit_logits]
        ce = sum(per_exit)
        total = ce + rate_w * out.rate_loss if rate_w else ce
        stats = {"ce_loss": ce.detach(), "rate_loss": out.rate_loss.detach(),
                 "tokens_per_img": out.num_tokens.float().mean(),
                 "train_acc": (logits.argmax(-1) == labels).float().mean()}
        if len(per_exit) > 1:
            stats.update({f"ce_loss_exit{k}": v.detach() for k, v in enumerate(per_exit)})
        if out.boundaries is not None:  # DRIP; the other families decide tokens without boundaries
            stats["boundary_rate"] = out.boundaries.detach().float().mean()
        if teacher is not None:
            with torch.no_grad():
                t_out = teacher(images)
                t_logits = (teacher_head or model.head)(t_out.pooled.float())
            kl, mse = distillation_loss(out, t_out, logits, t_logits)
            total = total + m.distill_weight * (kl + mse)
            stats.update(distill_kl=kl.detach(), distill_mse=mse.detach())
        return total, stats

    def run_eval(epoch: int) -> dict:
        res = evaluate(model, val_ds, d.eval_batch_size, info, t.workers) if val_ds is not None else {}
        res["gmacs"] = gmacs(c, res.get("val_tokens_per_img"))
        return res

    def export():
        export_atomic(tower.save_pretrained, run / "vision_tower")

        def save_head(folder: Path):
            folder.mkdir(parents=True)
            save_model(model.head, str(folder / "head.safetensors"))
            (folder / "classes.json").write_text(json.dumps(train_ds.classes, indent=1))
        export_atomic(save_head, run / "classifier")

    task = Task(model=model, steps_per_epoch=spe, batches=batches, loss=loss,
                batch_size=lambda b: 0 if b["images"] is None else b["images"].shape[0], evaluate=run_eval,
                export=export, args_dict={**to_dict(args), "rate_loss_weight_used": rate_w,
                                          "num_classes": len(train_ds.classes)})
    result = fit(task, t, info)
    cleanup(info)
    return result


if __name__ == "__main__":
    exit_after_main(main)
