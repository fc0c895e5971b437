"""Classification trainer (linear probe, scratch, init from a CLIP run), LR finder, bad images in ImageFolders."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from drip_llava.jsonl import read_jsonl
from drip_llava.vision import DripVisionModel
from vision_pretrain import classify, lr_find
from vision_pretrain.checkpoint import list_checkpoints
from vision_pretrain.data import load_classnames

MICRO = dict(image_size=64, patch_size=8, hidden_size=64, depth=3, num_heads=2, n_pre=1, embed_dim=32)
MICRO_ARGS = ["--vision-override"] + [f"{k}={v}" for k, v in MICRO.items()]
COLOURS = {"red": (220, 30, 30), "green": (40, 170, 50), "blue": (35, 65, 225), "yellow": (245, 225, 30)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """4 colour classes: a coloured disc at a random place and size over a grey, noisy background."""
    root = tmp_path_factory.mktemp("colours")
    rng = random.Random(0)
    for split, n in (("train", 24), ("val", 10)):
        for name, rgb in COLOURS.items():
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                img = Image.new("RGB", (64, 64), tuple(rng.randint(100, 150) for _ in range(3)))
                r, x, y = rng.randint(10, 20), rng.randint(20, 44), rng.randint(20, 44)
                ImageDraw.Draw(img).ellipse([x - r, y - r, x + r, y + r], fill=rgb)
                img.save(d / f"{i:03d}.jpg")
    return root


@pytest.fixture(scope="module")
def random_tower(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tower") / "tower"
    # masked-mean pooling: a random tower's CLS output barely varies between images, the segment mean does
    DripVisionModel.from_preset("drip-tiny-16-4x", pool="mean", **MICRO).save_pretrained(str(path))
    return path


def test_linear_probe_learns_above_chance(folders, random_tower, tmp_path):
    run = tmp_path / "probe"
    last = classify.main(["--mode", "linear-probe", "--init", str(random_tower), "--train-dir", str(folders / "train"),
                          "--val-dir", str(folders / "val"), "--batch-size", "16", "--epochs", "4", "--lr", "1e-1",
                          "--schedule", "constant", "--output", str(run), "--log-every", "1", "--no-tqdm"])
    assert last["val_images"] == 40 and last["step"] == 24  # 96 images // 16 = 6 steps x 4 epochs
    assert last["val_top1"] >= 0.5  # chance is 0.25
    log = read_jsonl(run / "log.jsonl")
    # the frozen tower keeps deterministic boundaries and gets no rate-loss push
    tower_after = DripVisionModel.from_pretrained(str(run / "vision_tower"))
    tower_before = DripVisionModel.from_pretrained(str(random_tower))
    for (k, a), b in zip(tower_before.state_dict().items(), tower_after.state_dict().values()):
        assert torch.equal(a, b), k
    assert json.loads((run / "classifier" / "classes.json").read_text()) == sorted(COLOURS)
    assert all(r["step"] > 0 for r in log if r["event"] == "step")


def test_scratch_with_randaug_and_bad_images_counted(folders, tmp_path):
    data = tmp_path / "data"
    for split in ("train", "val"):
        for d in (folders / split).iterdir():
            (data / split / d.name).mkdir(parents=True)
            for f in sorted(d.iterdir())[:8]:
                (data / split / d.name / f.name).write_bytes(f.read_bytes())
    (data / "train" / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (data / "val" / "blue" / "broken.jpg").write_bytes(b"")
    run = tmp_path / "scratch"
    last = classify.main(["--mode", "scratch", "--model", "drip-tiny-16-10x", *MICRO_ARGS, "--train-dir",
                          str(data / "train"), "--val-dir", str(data / "val"), "--aug", "randaug", "--batch-size", "8",
                          "--steps", "5", "--warmup", "2", "--label-smoothing", "0.1", "--clip-grad", "1.0",
                          "--output", str(run), "--log-every", "1", "--no-tqdm"])
    assert last["val_skipped"] == 1 and last["val_images"] == 32
    assert last["skips"]["corrupt_image"] >= 1  # the broken training image (33 files, 4 steps per epoch)
    steps = [r for r in read_jsonl(run / "log.jsonl") if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert all(0 < r["boundary_rate"] <= 1 and "ce_loss" in r and "rate_loss" in r for r in steps)
    assert last["gmacs"] > 0 and last["val_tokens_per_img"] >= 1
    assert json.loads((run / "vision_tower" / "config.json").read_text())["compression"] == 10.0
    # resume auto of a finished run is a no-op that keeps the log consistent
    classify.main(["--mode", "scratch", "--model", "drip-tiny-16-10x", *MICRO_ARGS, "--train-dir", str(data / "train"),
                   "--steps", "5", "--batch-size", "8", "--output", str(run), "--resume", "auto", "--no-tqdm"])
    assert [r["step"] for r in read_jsonl(run / "log.jsonl") if r["event"] == "step"] == [1, 2, 3, 4, 5]
    assert len(list_checkpoints(run)) == 2


def test_finetune_from_clip_run_layout_and_errors(folders, random_tower, tmp_path):
    clip_run = tmp_path / "cliprun"
    clip_run.mkdir()
    (clip_run / "vision_tower").symlink_to(random_tower, target_is_directory=True)
    assert classify.resolve_init(str(clip_run)) == str(clip_run / "vision_tower")
    with pytest.raises(ValueError, match="needs --init"):
        classify.build_tower(classify.parse_args(["--mode", "finetune", "--train-dir", "x", "--output", "y"]).model)
    with pytest.raises(ValueError, match="no --init"):
        classify.build_tower(classify.parse_args(["--mode", "scratch", "--init", str(clip_run), "--model",
                                                  "vit-tiny-16", "--train-dir", "x", "--output", "y"]).model)
    last = classify.main(["--mode", "finetune", "--init", str(clip_run), "--train-dir", str(folders / "train"),
                          "--batch-size", "16", "--steps", "2", "--output", str(tmp_path / "ft"), "--no-tqdm"])
    assert last["step"] == 2 and "val_top1" not in last


def test_lr_find_writes_plot_and_suggestion(folders, tmp_path):
    out = tmp_path / "lr.png"
    res = lr_find.main(["--model", "drip-tiny-16-4x", *MICRO_ARGS, "--train-dir", str(folders / "train"),
                        "--out", str(out), "--batch-size", "16", "--num-steps", "12", "--start-lr", "1e-5",
                        "--end-lr", "1"])
    assert out.is_file() and out.stat().st_size > 1000 and out.read_bytes()[:4] == b"\x89PNG"
    assert 1e-5 <= res["suggested_lr"] <= 1 and len(res["losses"]) == res["steps_run"] >= 3
    assert json.loads(out.with_suffix(".json").read_text())["suggested_lr"] == res["suggested_lr"]


def test_classnames_mapping(tmp_path):
    f = tmp_path / "names.json"
    f.write_text(json.dumps(["red circle", "blue star"]))
    assert load_classnames(f, ["blue star", "red circle"]) == ["blue star", "red circle"]  # matched by name
    assert load_classnames(f, ["n01", "n02"]) == ["red circle", "blue star"]  # wnid-like folders: by order
    f.write_text(json.dumps({"n01": "tench", "n02": "goldfish"}))
    assert load_classnames(f, ["n02", "n01"]) == ["goldfish", "tench"]
    with pytest.raises(ValueError, match="no class name"):
        load_classnames(f, ["n03"])
    assert load_classnames(None, ["red_circle"]) == ["red circle"]


def test_dvt_classify_sums_the_exits_ce_and_trains_every_exit(folders, tmp_path):
    """No weight decay: the coarse exits move only through their own CE terms (one shared head); a DRIP tower's
    logits are the one term of its loss."""
    from drip_llava.vision import create_model
    from drip_llava.vision.families import from_pretrained

    dvt = dict(image_size=64, patch_size=8, hidden_size=64, depth=2, num_heads=2, embed_dim=32, exit_grids=[2, 4, 8])
    argv = ["--mode", "scratch", "--model", "dvt-tiny-16", "--vision-override",
            *[f"{k}={json.dumps(v)}" for k, v in dvt.items()], "--train-dir", str(folders / "train"),
            "--batch-size", "8", "--steps", "2", "--wd", "0", "--log-every", "1", "--no-tqdm",
            "--output", str(tmp_path / "run")]
    classify.main(argv)
    steps = [r for r in read_jsonl(tmp_path / "run" / "log.jsonl") if r["event"] == "step"]
    assert len(steps) == 2
    for r in steps:
        per_exit = [r[f"ce_loss_exit{k}"] for k in range(3)]
        assert all(v > 0 for v in per_exit) and r["ce_loss"] == pytest.approx(sum(per_exit), rel=1e-5)
    torch.manual_seed(0)  # the trainer's seed: its initial tower
    start = classify.build_tower(classify.parse_args(argv).model)
    end = from_pretrained(tmp_path / "run" / "vision_tower")
    for k, (a, b) in enumerate(zip(start.exit_bodies, end.exit_bodies)):
        for name in ("patch_embed.weight", "blocks.0.attn.qkv.weight", "proj.weight"):
            assert not torch.equal(a.get_parameter(name), b.get_parameter(name)), (k, name)
    x = torch.randn(2, 3, 64, 64)
    model = classify.Classifier(create_model("drip-tiny-16-4x", **MICRO), 4).eval()
    with torch.no_grad():
        (logits,), _ = model(x, every_exit=True)
        assert torch.equal(logits, model(x)[0])
