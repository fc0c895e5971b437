"""CLIP trainer: single-process run + export, bad data counted, kill -9 + exact resume, 2-rank torchrun."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_model

from drip_demo.synthetic import generate
from drip_llava.jsonl import read_jsonl
from drip_llava.vision import DripVisionModel
from vision_pretrain import clip, zeroshot
from vision_pretrain.checkpoint import list_checkpoints
from vision_pretrain.clip_model import DripCLIP, build_tokenizer, get_text_config
from vision_pretrain.data import ClipShardStream, clip_loader

REPO = Path(__file__).resolve().parents[1]
# a micro DRIP-4x tower: 64 px, patch 8 (64 patches), 3 blocks of width 64
MICRO = ["--model", "drip-tiny-16-4x", "--vision-override", "image_size=64", "patch_size=8", "hidden_size=64",
         "depth=3", "num_heads=2", "n_pre=1", "embed_dim=32", "--text-model", "micro"]
MICRO_OVERRIDES = dict(image_size=64, patch_size=8, hidden_size=64, depth=3, num_heads=2, n_pre=1, embed_dim=32)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
       "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    generate(out, n_train=64, n_val=40, image_size=64, shard_size=16, progress=False)
    return out


def clip_argv(shapes: Path, run: Path, *extra: str) -> list[str]:
    return ["--train-data", str(shapes / "train-{000000..000003}.tar"), *MICRO, "--batch-size", "8",
            "--lr", "1e-3", "--output", str(run), "--samples-per-epoch", "32", "--shuffle-buffer", "8",
            "--log-every", "1", "--no-tqdm", *extra]


def steps_of(log: list[dict]) -> list[int]:
    return [r["step"] for r in log if r["event"] == "step"]


def test_clip_trains_logs_and_exports(shapes, tmp_path):
    run = tmp_path / "run"
    last = clip.main(clip_argv(shapes, run, "--steps", "6", "--warmup", "2", "--zeroshot-dir",
                               str(shapes / "imagefolder" / "val"), "--classnames", str(shapes / "classnames.json")))
    log = read_jsonl(run / "log.jsonl")
    assert steps_of(log) == [1, 2, 3, 4, 5, 6]
    step = next(r for r in log if r["event"] == "step")
    for key in ("loss", "clip_loss", "rate_loss", "boundary_rate", "tokens_per_img", "lr", "step_time",
                "samples_per_s", "peak_mem_mb", "skips"):
        assert key in step, key
    assert 0 < step["boundary_rate"] <= 1 and 1 <= step["tokens_per_img"] <= 64
    assert abs(step["loss"] - (step["clip_loss"] + 10.0 * step["rate_loss"])) < 1e-4  # config weight 10
    epochs = [r for r in log if r["event"] == "epoch"]
    assert [e["step"] for e in epochs] == [4, 6] and epochs[0]["complete"] and not epochs[1]["complete"]
    for key in ("avg_step_time", "avg_peak_mem_mb", "zeroshot_top1", "zeroshot_top5", "zeroshot_tokens_per_img",
                "gmacs"):
        assert epochs[-1][key] is not None, key
    assert epochs[-1]["zeroshot_images"] == 40 and last["step"] == 6

    # the exported tower = the trained tower (from the last checkpoint, i.e. the trainer's weights)
    exported = DripVisionModel.from_pretrained(str(run / "vision_tower")).eval()
    trained = DripCLIP(DripVisionModel.from_preset("drip-tiny-16-4x", **MICRO_OVERRIDES), get_text_config("micro"))
    load_model(trained, str(list_checkpoints(run)[-1] / "model.safetensors"))
    trained.eval()
    images = torch.stack([exported.preprocess(Image.open(p)) for p in
                          sorted((shapes / "imagefolder" / "val").rglob("*.jpg"))[:6]])
    with torch.no_grad():
        a, b = exported(images), trained.visual(images)
    assert torch.equal(a.num_tokens, b.num_tokens)
    torch.testing.assert_close(a.pooled, b.pooled, rtol=0, atol=1e-6)

    # zero-shot CLI on the exported towers reproduces the trainer's own evaluation
    res = zeroshot.main(["--model", str(run), "--data", str(shapes / "imagefolder" / "val"),
                         "--classnames", str(shapes / "classnames.json")])
    assert res["zeroshot_top1"] == pytest.approx(epochs[-1]["zeroshot_top1"])
    assert res["zeroshot_tokens_per_img"] == pytest.approx(epochs[-1]["zeroshot_tokens_per_img"])
    res2 = zeroshot.main(["--model", str(run / "vision_tower"), "--text-model-from", str(run),
                          "--data", str(shapes / "imagefolder" / "val"),
                          "--classnames", str(shapes / "classnames.json")])
    assert res2 == res


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, format="JPEG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def bad_shards(tmp_path) -> Path:
    """shard 0: 4 good samples around a corrupt JPEG, a sample without caption and one without image;
    shard 1: not a tar at all; shard 2: missing from disk."""
    d = tmp_path / "bad"
    d.mkdir()
    with tarfile.open(d / "s-000000.tar", "w") as tar:
        for i, kind in enumerate(["good", "corrupt", "good", "nocap", "good", "noimg", "good"]):
            if kind != "noimg":
                data = _jpeg((40 * i, 200, 90)) if kind != "corrupt" else _jpeg((1, 2, 3))[:-300] + b"\x00garbage"
                _add(tar, f"{i:04d}.jpg", data)
            if kind != "nocap":
                _add(tar, f"{i:04d}.txt", f"a picture of sample {i}".encode())
    (d / "s-000001.tar").write_bytes(b"this is not a tar file" * 50)
    return d


def test_stream_counts_each_kind_of_bad_data(bad_shards):
    model = DripVisionModel.from_preset("drip-tiny-16-4x", **MICRO_OVERRIDES)
    tok = build_tokenizer(get_text_config("micro"))
    stream = ClipShardStream([str(bad_shards / f"s-00000{i}.tar") for i in range(3)], 4, model.preprocess, tok,
                             shuffle_buffer=1)
    it = iter(stream)
    first, second = next(it), next(it)
    assert first["images"].shape == (4, 3, 64, 64) and first["texts"].shape == (4, 32)
    # one full pass over shard 0 per batch: each bad sample is counted exactly once per pass
    for batch in (first, second):
        assert batch["skips"]["corrupt_image"] == 1
        assert batch["skips"]["missing_caption"] == 1
        assert batch["skips"]["missing_image"] == 1
    assert 2 <= first["skips"].get("bad_shard", 0) + second["skips"].get("bad_shard", 0) <= 4


def test_clip_run_survives_bad_shards_and_logs_skips(bad_shards, tmp_path):
    run = tmp_path / "run"
    argv = clip_argv(bad_shards, run, "--steps", "2")
    argv[argv.index("--train-data") + 1] = str(bad_shards / "s-{000000..000002}.tar")
    argv[argv.index("--samples-per-epoch") + 1] = "8"
    argv[argv.index("--batch-size") + 1] = "4"
    with pytest.warns(UserWarning):
        clip.main(argv)
    log = read_jsonl(run / "log.jsonl")
    last = [r for r in log if r["event"] == "step"][-1]
    assert last["step"] == 2
    assert last["skips"]["corrupt_image"] >= 2 and last["skips"]["missing_caption"] >= 2
    assert last["skips"]["missing_image"] >= 2 and last["skips"]["bad_shard"] >= 2
    assert [r for r in log if r["event"] == "epoch"][-1]["skips"] == last["skips"]


def _wait_for(pred, proc, timeout, what):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited (rc {proc.returncode}) before {what}:\n{proc.stderr.read()[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.mark.slow
def test_kill9_then_resume_auto_is_exact(shapes, tmp_path):
    # 4 steps per epoch; checkpoints at 3, 4, 6, 8, 9, 12: the kill lands on a mid-epoch checkpoint (6 or 9)
    # unless the trainer runs two steps within one 0.2 s poll
    common = ["--steps", "12", "--save-every", "3", "--workers", "1", "--seed", "3"]
    ref = tmp_path / "ref"
    clip.main(clip_argv(shapes, ref, *common))

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "vision_pretrain.clip", *clip_argv(shapes, run, *common)],
                            cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log_file = run / "log.jsonl"

    def saved_step_6():
        return any(int(c.name.split("_")[1]) >= 6 for c in list_checkpoints(run))
    _wait_for(saved_step_6, proc, 300, "the step-6 checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    ckpt_step = int(list_checkpoints(run)[-1].name.split("_")[1])
    assert 6 <= ckpt_step < 12

    clip.main(clip_argv(shapes, run, *common, "--resume", "auto"))
    log = read_jsonl(log_file)
    assert steps_of(log) == list(range(1, 13))  # every optimizer step logged once: none lost, none repeated
    resume = [r for r in log if r["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == ckpt_step
    state = torch.load(list_checkpoints(run)[-1] / "trainer_state.pt", weights_only=True)
    assert state["step"] == 12
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {12}
    # same data, same noise, same updates: the resumed run ends where the uninterrupted one does (up to the
    # order of multi-threaded float reductions; a lost or repeated step, or different noise, is orders larger)
    a = {k: v for k, v in _load(ref).items()}
    b = _load(run)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    ref_losses = {r["step"]: r["loss"] for r in read_jsonl(ref / "log.jsonl") if r["event"] == "step"}
    got = {r["step"]: r["loss"] for r in log if r["event"] == "step"}
    assert got.keys() == ref_losses.keys()
    assert got == {k: pytest.approx(v, rel=1e-5) for k, v in ref_losses.items()}


def test_loaders_leave_the_global_rng_alone(shapes):
    """A loader that drew its base seed from the global RNG would shift the Gumbel noise after a mid-epoch resume."""
    tok = build_tokenizer(get_text_config("micro"))
    visual = DripVisionModel.from_preset("drip-tiny-16-4x", **MICRO_OVERRIDES)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    loader = clip_loader([str(shapes / "train-000000.tar")], 4, visual.preprocess, tok, seed=0, epoch=1, rank=0,
                         world_size=1, workers=0, skip_batches=1, shuffle_buffer=4)
    next(iter(loader))
    assert torch.equal(torch.get_rng_state(), before)


def _load(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(list_checkpoints(run)[-1] / "model.safetensors"))


@pytest.mark.slow
def test_two_rank_torchrun_cpu(shapes, tmp_path):
    run = tmp_path / "run2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "vision_pretrain.clip", *clip_argv(shapes, run, "--steps", "4", "--samples-per-epoch", "32",
                                                     "--zeroshot-dir", str(shapes / "imagefolder" / "val"),
                                                     "--classnames", str(shapes / "classnames.json"))]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = read_jsonl(run / "log.jsonl")
    steps = [r for r in log if r["event"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # 32 samples / (8 x 2 ranks) = 2 steps per epoch
    assert all(len(r["rank_max_tokens"]) == 2 for r in steps)
    # the ranks padded to different segment counts, and DDP (find_unused_parameters=False) did not mind
    assert any(r["rank_max_tokens"][0] != r["rank_max_tokens"][1] for r in steps)
    epochs = [r for r in log if r["event"] == "epoch"]
    assert len(epochs) == 2 and epochs[-1]["zeroshot_images"] == 40  # each val image scored once over 2 ranks
    assert json.loads((run / "vision_tower" / "config.json").read_text())["compression"] == 4.0
    state = torch.load(list_checkpoints(run)[-1] / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2 and (list_checkpoints(run)[-1] / "rng_rank1.pt").is_file()


def test_clip_finetune_from_hf_clip_folder_starts_both_towers_from_it(shapes, tmp_path):
    """--init-vision HF_CLIP_FOLDER + compression override: a DRIP tower on the pretrained ViT, the text tower and
    logit scale from the same CLIP (lr 0 here, so the exported text tower must still be the HF one exactly)."""
    import open_clip
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    hf = CLIPModel(CLIPConfig(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                           image_size=64, patch_size=8),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        projection_dim=32)).eval()
    hf.save_pretrained(tmp_path / "clip")
    run = tmp_path / "run"
    argv = ["--train-data", str(shapes / "train-{000000..000003}.tar"), "--init-vision", str(tmp_path / "clip"),
            "--vision-override", "compression=4", "n_pre=1", "--batch-size", "8", "--lr", "0", "--output", str(run),
            "--samples-per-epoch", "16", "--shuffle-buffer", "8", "--log-every", "1", "--no-tqdm", "--steps", "2",
            "--zeroshot-dir", str(shapes / "imagefolder" / "val"), "--classnames", str(shapes / "classnames.json")]
    clip.main(argv)
    log = read_jsonl(run / "log.jsonl")
    assert steps_of(log) == [1, 2]
    epoch = [r for r in log if r["event"] == "epoch"][-1]
    assert epoch["zeroshot_top1"] is not None and epoch["zeroshot_tokens_per_img"] < 64
    tower = DripVisionModel.from_pretrained(str(run / "vision_tower"))
    assert tower.config.compression == 4.0 and tower.config.act == "quick_gelu" and tower.config.n_pre == 1
    model = DripCLIP.from_towers(run / "vision_tower", run / "text_tower").eval()
    tokens = open_clip.SimpleTokenizer(context_length=77)(["a red circle", "a blue square"])
    with torch.no_grad():
        ref = hf.get_text_features(input_ids=tokens)
        torch.testing.assert_close(model.encode_text(tokens), getattr(ref, "pooler_output", ref), atol=1e-5, rtol=1e-5)
    assert model.logit_scale.item() == pytest.approx(hf.logit_scale.item())


# a micro DVT cascade: exits on 2x2 / 4x4 / 8x8 grids of a 64 px image, 2 blocks of width 64
DVT_OVERRIDES = dict(image_size=64, patch_size=8, hidden_size=64, depth=2, num_heads=2, embed_dim=32,
                     exit_grids=[2, 4, 8])


def _exit_params(tower) -> dict:
    """Per exit, a few parameters only that exit's loss reaches directly (patch embedding, a block, projection)."""
    return {k: [body.patch_embed.weight, body.blocks[0].attn.qkv.weight, body.proj.weight]
            for k, body in enumerate(tower.exit_bodies)}


def test_dvt_clip_sums_the_exits_losses_and_trains_every_exit(shapes, tmp_path):
    """No weight decay: a parameter moves only if its loss has a gradient, so the coarse exits move only through
    their own ClipLoss terms (with the last exit's loss alone, their heads get none)."""
    from drip_llava.vision import create_model

    overrides = [f"{k}={json.dumps(v)}" for k, v in DVT_OVERRIDES.items()]
    run = tmp_path / "dvt"
    clip.main(["--train-data", str(shapes / "train-{000000..000003}.tar"), "--model", "dvt-tiny-16",
               "--vision-override", *overrides, "--text-model", "micro", "--batch-size", "8", "--lr", "1e-3",
               "--wd", "0", "--output", str(run), "--samples-per-epoch", "32", "--shuffle-buffer", "8",
               "--log-every", "1", "--no-tqdm", "--steps", "2"])
    steps = [r for r in read_jsonl(run / "log.jsonl") if r["event"] == "step"]
    assert len(steps) == 2
    for r in steps:
        per_exit = [r[f"clip_loss_exit{k}"] for k in range(3)]
        assert all(v > 0 for v in per_exit) and r["clip_loss"] == pytest.approx(sum(per_exit), rel=1e-5)
    torch.manual_seed(0)  # the trainer's seed: its initial tower
    start = clip.build_vision("dvt-tiny-16", None, DVT_OVERRIDES)
    from drip_llava.vision.families import from_pretrained

    end = from_pretrained(run / "vision_tower")
    for k, (before, after) in enumerate(zip(_exit_params(start).values(), _exit_params(end).values())):
        assert all(not torch.equal(a, b) for a, b in zip(before, after)), k
    # DRIP's forward carries no exit embeddings: its loss stays one ClipLoss of `image_features`
    model = DripCLIP(create_model("drip-tiny-16-4x", **MICRO_OVERRIDES), get_text_config("micro")).train()
    out = model(torch.randn(2, 3, 64, 64), torch.randint(1, 100, (2, 32)))
    assert "exit_image_features" not in out
    cascade = DripCLIP(create_model("dvt-tiny-16", **DVT_OVERRIDES), get_text_config("micro")).train()
    out = cascade(torch.randn(2, 3, 64, 64), torch.randint(1, 100, (2, 32)))
    assert out["exit_image_features"].shape == (3, 2, 32)
    assert torch.allclose(out["exit_image_features"][-1], out["image_features"])
