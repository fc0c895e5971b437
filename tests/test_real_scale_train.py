"""What a LLaVA-1.5-scale stage-2 run needs beyond the small tests of test_llava_train.py: ranks whose micro-batch
has no image still run the vision tower (ZeRO-3 gathers its weights collectively), gradient accumulation gives the
large batch's update, the full recipe and a trained DRIP tower (with its rate loss) train under DeepSpeed, and the
flags / defaults of a real run (random towers refused, QLoRA under ZeRO-3 refused, upstream flags accepted)."""
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from test_llava_train import REPO, ds_env, read_metrics, run

from drip_llava.distributed import free_port

COLOURS = {"red": (220, 30, 30), "blue": (35, 65, 225), "green": (40, 170, 50), "yellow": (245, 225, 30)}


def write_alternating_data(d: Path, n: int) -> Path:
    """n records alternating image (even index) / text-only (odd). In file order with a micro-batch of 1 on 2
    ranks, every step gives rank 0 an image sample and rank 1 a text-only one."""
    (d / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    records = []
    for i in range(n):
        if i % 2 == 0:
            c = rng.choice(list(COLOURS))
            im = Image.new("RGB", (64, 64), (128, 128, 128))
            x, y = rng.randint(4, 28), rng.randint(4, 28)
            ImageDraw.Draw(im).ellipse([x, y, x + 30, y + 30], fill=COLOURS[c])
            im.save(d / "images" / f"{i}.png")
            records.append({"id": f"img{i}", "image": f"{i}.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat color is the circle?"},
                {"from": "gpt", "value": f"It is {c}."}]})
        else:
            records.append({"id": f"txt{i}", "conversations": [
                {"from": "human", "value": f"Count to {i % 5 + 1}."},
                {"from": "gpt", "value": " ".join(map(str, range(1, i % 5 + 2)))}]})
    path = d / "alternating.json"
    path.write_text(json.dumps(records))
    return path


# ---------------------------------------------------------------------------------------------- fast tests
def test_text_only_training_batch_runs_the_whole_tower_with_zero_weight(tiny_llm_dir, tiny_drip_dir):
    """A frozen tower too: under ZeRO-3 a rank that skips it issues fewer weight gathers than a rank encoding
    images. The pass must not change the loss; a trained tower reports its rate loss per forward."""
    from drip_llava.model import DripLlavaForCausalLM

    torch.manual_seed(0)
    model = DripLlavaForCausalLM.from_pretrained(str(tiny_llm_dir))
    model.initialize_vision_modules(str(tiny_drip_dir))
    calls = []
    # the last block the tower runs: select layer -2 = the output of blocks[-2] (the final block is never run)
    model.vision_tower.model.blocks[-2].register_forward_hook(lambda *a: calls.append(1))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    labels = torch.tensor([[-100, -100, 7, 8, 9]])
    model.train()
    out = model(input_ids=ids, labels=labels)
    assert calls == [1], "the text-only training batch skipped the vision tower"
    assert out.num_images == 0 and out.visual_tokens == 0 and out.rate_loss is None  # frozen: no rate loss
    out.loss.backward()
    assert all(p.grad is not None for p in model.mm_projector.parameters())
    with torch.no_grad():  # same loss as without the pass (it is weighted 0)
        model.eval()
        ref = model(input_ids=ids, labels=labels).loss
    assert calls == [1], "a no-grad forward without ZeRO-3 has no reason to run the tower"
    torch.testing.assert_close(out.loss.detach(), ref)

    model.vision_tower.set_frozen(False)
    model.train()
    image = torch.rand(1, 3, model.vision_tower.config.image_size, model.vision_tower.config.image_size)
    with_img = model(input_ids=torch.tensor([[5, -200, 7, 8]]), labels=torch.tensor([[-100, -100, 7, 8]]),
                     images=image)
    assert with_img.num_images == 1 and with_img.visual_tokens >= 1
    assert with_img.rate_loss is not None and with_img.rate_loss.requires_grad
    text = model(input_ids=ids, labels=labels)
    assert text.num_images == 0 and float(text.rate_loss.detach()) == 0.0 and text.rate_loss.requires_grad


def test_real_run_flags(tiny_llm_dir, tiny_drip_dir, tmp_path):
    """Upstream flags parse (--mm_patch_merge_type flat); a random tower needs --allow_random_vision_tower;
    --report_to names a missing package; stage 1 refuses to unfreeze the tower."""
    import importlib.util

    from drip_llava.train.params import parse_args

    data = write_alternating_data(tmp_path, 2)
    common = ["--model_name_or_path", str(tiny_llm_dir), "--data_path", str(data), "--image_folder",
              str(tmp_path / "images"), "--output_dir", str(tmp_path / "out"), "--use_cpu", "True"]
    m, _, _ = parse_args(common + ["--vision_tower", str(tiny_drip_dir), "--mm_patch_merge_type", "flat"])
    assert m.mm_patch_merge_type == "flat" and not m.unfreeze_mm_vision_tower
    with pytest.raises(ValueError, match="only 'flat'"):
        parse_args(common + ["--vision_tower", str(tiny_drip_dir), "--mm_patch_merge_type", "spatial_unpad"])
    for spec in ("drip-l-14-4x", "open_clip:ViT-B-32"):
        with pytest.raises(ValueError, match="random weights.*--allow_random_vision_tower True"):
            parse_args(common + ["--vision_tower", spec])
    m, _, _ = parse_args(common + ["--vision_tower", "drip-tiny-16-4x", "--allow_random_vision_tower", "True"])
    assert m.allow_random_vision_tower
    parse_args(common + ["--vision_tower", "open_clip:ViT-B-32:openai"])  # weights named: accepted at parse time
    with pytest.raises(ValueError, match="stage 1 trains the projector only"):
        parse_args(common + ["--vision_tower", str(tiny_drip_dir), "--tune_mm_mlp_adapter", "True",
                             "--unfreeze_mm_vision_tower", "True"])
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ValueError, match=r"--report_to wandb needs the optional package\(s\) wandb.*pip install"):
            parse_args(common + ["--vision_tower", str(tiny_drip_dir), "--report_to", "wandb"])


def test_qlora_under_zero3_and_launchers_without_a_tower_are_refused(tiny_llm_dir, tiny_drip_dir, tmp_path):
    """In a subprocess: a --deepspeed TrainingArguments sets process-wide DeepSpeed state."""
    data = write_alternating_data(tmp_path, 2)
    code = ("import sys; from drip_llava.train.params import parse_args\n"
            "try:\n    parse_args(sys.argv[1:])\nexcept ValueError as e:\n    print('REFUSED', e); sys.exit(3)\n")
    args = ["--model_name_or_path", str(tiny_llm_dir), "--vision_tower", str(tiny_drip_dir), "--data_path", str(data),
            "--output_dir", str(tmp_path / "out"), "--use_cpu", "True", "--lora_enable", "True", "--bits", "4",
            "--deepspeed", str(REPO / "scripts" / "zero3.json")]
    proc = subprocess.run([sys.executable, "-c", code, *args], env=ds_env(), capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 3 and "(QLoRA) under ZeRO-3" in proc.stdout and "zero2.json" in proc.stdout, \
        proc.stdout + proc.stderr[-2000:]
    # the launchers have no random-weights default tower
    env = ds_env(PRETRAIN_ADAPTER=tmp_path / "nowhere" / "mm_projector.safetensors", PYTHON=sys.executable)
    for script in ("finetune_lora.sh", "pretrain_projector.sh"):
        proc = subprocess.run(["bash", str(REPO / "scripts" / script)], env=env, capture_output=True, text=True,
                              cwd=tmp_path, timeout=60)
        assert proc.returncode == 2 and "VISION_TOWER" in proc.stderr and "trained DripVisionModel folder" in \
            proc.stderr, (script, proc.stderr)


def test_visual_token_counts_default_to_the_estimate_and_reuse_a_matching_cache(tiny_drip_dir, tmp_path):
    """'auto' never runs the tower over the data (mix665k: 624K images before step 1); it reads exact counts
    cached by an earlier 'exact' run for the same tower. 'exact' computes (through loader workers) and caches."""
    from types import SimpleNamespace

    from drip_llava.data import ImageLoader
    from drip_llava.data.image_processor import DripLlavaImageProcessor
    from drip_llava.model.vision_tower import build_vision_tower
    from drip_llava.train.train import visual_token_counts

    data = write_alternating_data(tmp_path, 6)
    records = json.loads(data.read_text())
    tower = build_vision_tower(str(tiny_drip_dir))
    # the processor training builds (train.py: Recipe.image_processor), which the cache fingerprint includes
    loader = ImageLoader(str(tmp_path / "images"), DripLlavaImageProcessor.from_vision_config(tower.config, "square"))
    targs = SimpleNamespace(output_dir=str(tmp_path / "out"), device=torch.device("cpu"), process_index=0,
                            world_size=1, should_save=True, per_device_train_batch_size=2, dataloader_num_workers=2)

    def counts(mode):
        return visual_token_counts(tower, loader, records, SimpleNamespace(
            visual_token_count=mode, visual_token_cache=None, image_aspect_ratio="square"), targs)

    assert counts("auto") is None and not (tmp_path / "out" / "visual_token_counts.json").exists()
    exact = counts("exact")
    assert sorted(exact) == ["0.png", "2.png", "4.png"] and all(v >= 1 for v in exact.values())
    assert (tmp_path / "out" / "visual_token_counts.json").is_file()
    assert counts("auto") == exact and counts("max") is None


# ---------------------------------------------------------------------------------------------- DeepSpeed runs
@pytest.mark.slow
def test_zero3_lora_ranks_with_and_without_images_finish_and_save(tiny_llm_dir, tiny_drip_dir, tmp_path):
    """`bash scripts/finetune_lora.sh` on 2 ranks under ZeRO-3 (its default) with a frozen tower: every micro-batch
    gives rank 0 an image sample and rank 1 a text-only one, 13 samples (not a multiple of the global batch 4),
    the launcher's default SAVE_STEPS. It finishes the epoch and leaves checkpoints along the way."""
    data = write_alternating_data(tmp_path / "data", 13)
    out = tmp_path / "lora"
    port = free_port()
    env = dict(MODEL=tiny_llm_dir, VISION_TOWER=tiny_drip_dir, PRETRAIN_ADAPTER="", DATA_PATH=data,
               IMAGE_FOLDER=tmp_path / "data" / "images", OUTPUT_DIR=out, NUM_GPUS=2, MASTER_PORT=port,
               PER_DEVICE_BATCH=1, GLOBAL_BATCH=4, NUM_WORKERS=0, LORA_R=8, LORA_ALPHA=16, MODEL_MAX_LENGTH=256,
               SAVE_TOTAL_LIMIT=10, PYTHON=sys.executable)
    log = tmp_path / "run.log"
    # file order (one image and one text sample per micro-step) instead of the launcher's modality grouping
    run(["bash", str(REPO / "scripts" / "finetune_lora.sh"), "--group_by_modality_length", "False",
         "--keep_data_order", "True"], ds_env(**env), tmp_path, log)
    text = log.read_text()
    assert "zero3.json" in text and "2 x 1 x 2 (accumulation)" in text, text[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    steps = state["global_step"]
    logs = [r for r in read_metrics(out) if "loss" in r]
    assert steps >= 3 and [r["step"] for r in logs] == list(range(1, steps + 1))
    assert all(r["loss"] == r["loss"] for r in logs) and state["epoch"] >= 0.99  # no NaN; the whole epoch
    # each rank unlinked DeepSpeed's CPU allreduce segment (~69 MB of RAM each, left behind by DeepSpeed itself)
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    # default SAVE_STEPS = 10% of the run (rounded up): a checkpoint at every step of this short run
    ckpts = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert ckpts == list(range(1, steps + 1)), ckpts
    for d in (out, out / "checkpoint-1"):
        assert {"adapter_model.safetensors", "non_lora_trainables.safetensors", "config.json", "vision_tower"} <= \
            {p.name for p in d.iterdir()}, d
    nl = load_file(str(out / "non_lora_trainables.safetensors"))
    assert nl and all(v.numel() > 0 for v in nl.values())


ZERO3_EVAL = """
import sys, torch, deepspeed
from transformers.integrations import HfDeepSpeedConfig
from drip_llava.model import DripLlavaForCausalLM
llm, tower = [a for a in sys.argv[1:] if not a.startswith("--")]
deepspeed.init_distributed(dist_backend="gloo")
rank = torch.distributed.get_rank()
cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
       "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "zero_force_ds_cpu_optimizer": False}
keep = HfDeepSpeedConfig(cfg)  # from_pretrained partitions the LLM under zero.Init while this lives
m = DripLlavaForCausalLM.from_pretrained(llm)
m.initialize_vision_modules(tower)
engine, *_ = deepspeed.initialize(model=m, model_parameters=[p for p in m.parameters() if p.requires_grad], config=cfg)
assert all(p.numel() == 0 for p in m.vision_tower.parameters()), "tower not partitioned"
engine.eval()
s = m.vision_tower.config.image_size
image = torch.rand(1, 3, s, s) if rank == 0 else None
ids = torch.tensor([[5, -200, 7, 8]]) if rank == 0 else torch.tensor([[5, 6, 7, 8]])
with torch.no_grad():
    out = engine(input_ids=ids, images=image)
    gen = m.generate(ids, images=image, max_new_tokens=3, min_new_tokens=3, do_sample=False, synced_gpus=True)
print(f"rank {rank}: logits {tuple(out.logits.shape)}, generated {gen.shape[1]}", flush=True)
torch.distributed.barrier()
"""


@pytest.mark.slow
def test_zero3_no_grad_forward_and_generate_with_an_image_on_one_rank_only(tiny_llm_dir, tiny_drip_dir, tmp_path):
    """Eval under ZeRO-3 (no grad): rank 0 encodes an image, rank 1 has text only; rank 1 still runs the
    partitioned tower (its gathers are collectives), for a forward and for generate."""
    script = tmp_path / "zero3_eval.py"
    script.write_text(ZERO3_EVAL)
    log = tmp_path / "eval.log"
    run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(script), str(tiny_llm_dir),
         str(tiny_drip_dir)], ds_env(OMP_NUM_THREADS=1), tmp_path, log)
    text = log.read_text()
    assert "rank 0: logits (1, " in text and "rank 1: logits (1, 4, " in text and "generated 3" in text, text[-3000:]


def saturated_tower(out: Path) -> Path:
    """drip-tiny-16-4x whose boundary predictor says "boundary" at every patch with logit 20: the training-time
    Gumbel noise (|logit noise| <= 13.8) cannot flip a decision, so two runs that draw different noise (other
    micro-batch layouts) compute the same tokens and rate loss (every patch a segment: rate 1, target 0.25)."""
    from drip_llava.vision import DripVisionModel

    torch.manual_seed(0)
    m = DripVisionModel.from_preset("drip-tiny-16-4x")
    fc2 = m.boundary_predictor.mlp[2]
    with torch.no_grad():
        fc2.weight.zero_()
        fc2.bias.fill_(20.0)
    m.save_pretrained(out)
    return out


@pytest.mark.slow
def test_gradient_accumulation_full_recipe_trained_tower_zero3(tiny_llm_dir, tmp_path):
    """The full (non-LoRA) stage-2 recipe with the DRIP tower unfrozen, 2 ranks under ZeRO-3, SGD (its update is
    proportional to the gradient, unlike Adam's first step): micro-batch 2 without accumulation and micro-batch 1
    with 2 accumulation steps see the same 4 samples per step and must give the same losses, gradient norms and
    weights. Half of the accumulated micro-batches hold no image: the rate loss is averaged over the images of the
    whole step, so it is the same in both runs, logged, and part of the loss."""
    tower = saturated_tower(tmp_path / "tower")
    data = write_alternating_data(tmp_path / "data", 8)
    runs = {}
    for name, (micro, accum) in {"batch": (2, 1), "accum": (1, 2)}.items():
        out = tmp_path / name
        cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "drip_llava.train.train",
               "--deepspeed", str(REPO / "scripts" / "zero3.json"), "--use_cpu", "True",
               "--model_name_or_path", str(tiny_llm_dir), "--vision_tower", str(tower), "--version", "v1",
               "--data_path", str(data), "--image_folder", str(tmp_path / "data" / "images"), "--output_dir", str(out),
               "--unfreeze_mm_vision_tower", "True", "--optim", "sgd", "--learning_rate", "0.05",
               "--lr_scheduler_type", "constant", "--weight_decay", "0", "--max_grad_norm", "1e9",
               "--keep_data_order", "True", "--max_steps", "2", "--save_strategy", "no", "--logging_steps", "1",
               "--report_to", "none", "--dataloader_num_workers", "0", "--model_max_length", "256",
               "--per_device_train_batch_size", str(micro), "--gradient_accumulation_steps", str(accum)]
        run(cmd, ds_env(), tmp_path, tmp_path / f"{name}.log")
        runs[name] = out
    logs = {k: [r for r in read_metrics(out) if "loss" in r] for k, out in runs.items()}
    for a, b in zip(logs["batch"], logs["accum"]):
        print(f"step {a['step']}: loss {a['loss']:.6f} / {b['loss']:.6f}, grad_norm {a['grad_norm']:.6f} / "
              f"{b['grad_norm']:.6f}, rate_loss {a.get('rate_loss')} / {b.get('rate_loss')}")
        assert a["rate_loss"] == pytest.approx(0.5625, abs=1e-6) and b["rate_loss"] == pytest.approx(0.5625, abs=1e-6)
        # the loss holds the LM loss (~ln(vocab) for this random LLM) + 10 (the config's weight) x the rate loss
        assert a["loss"] > math.log(49152) - 1 + 10 * 0.5625
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    assert len(logs["batch"]) == len(logs["accum"]) == 2
    wa, wb = (load_file(str(runs[k] / "model.safetensors")) for k in ("batch", "accum"))
    before = load_file(str(tower / "model.safetensors"))
    trained = 0
    for k, v in wa.items():
        torch.testing.assert_close(wb[k], v, atol=2e-5, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
        short = k.removeprefix("vision_tower.model.")
        if short != k and short in before and not torch.allclose(before[short], v):
            trained += 1
    assert trained > 10, "the unfrozen tower did not train"
    assert json.loads((runs["batch"] / "config.json").read_text())["unfreeze_mm_vision_tower"] is True
