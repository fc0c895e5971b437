"""The LLaVA trainer: flags, recipes (freezing, LoRA targets, QLoRA keeps the vision modules out of quantization),
optimizer groups, an in-process smoke run, and (slow) DeepSpeed runs on 2 CPU ranks: stage 1 under ZeRO-2 and
ZeRO-3 (trainable-only checkpoints, exact resume), stage-2 LoRA under ZeRO-3 with resume and merge, under ZeRO-3 with
CPU offload, QLoRA (4- and 8-bit) under ZeRO-2."""
import json
import os
import random
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from drip_llava.distributed import free_port
from drip_llava.jsonl import read_jsonl

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
COLOURS = {"red": (220, 30, 30), "blue": (35, 65, 225), "green": (40, 170, 50), "yellow": (245, 225, 30)}
SHAPES = ("circle", "square")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Shape images, stage-1 captions (plain) and stage-2 conversations (v1) with text-only samples mixed in."""
    d = tmp_path_factory.mktemp("llava_data")
    (d / "images").mkdir()
    rng = random.Random(0)
    pre, ft = [], []
    for i in range(32):
        c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        im = Image.new("RGB", (64, 64), (128, 128, 128))
        x, y = rng.randint(4, 28), rng.randint(4, 28)
        (ImageDraw.Draw(im).ellipse if s == "circle" else ImageDraw.Draw(im).rectangle)([x, y, x + 30, y + 30],
                                                                                       fill=COLOURS[c])
        im.save(d / "images" / f"{i}.png")
        pre.append({"id": f"p{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": f"a {c} {s}"}]})
        ft.append({"id": f"f{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the shape?"}, {"from": "gpt", "value": f"It is {c}."},
            {"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": f"It is a {s}."}]})
    for i in range(8):
        ft.append({"id": f"t{i}", "conversations": [{"from": "human", "value": f"Count to {i + 1}."},
                                                    {"from": "gpt", "value": " ".join(map(str, range(1, i + 2)))}]})
    (d / "pretrain.json").write_text(json.dumps(pre))
    (d / "finetune.json").write_text(json.dumps(ft))
    return d


def base_args(tiny_llm_dir, tiny_drip_dir, data_dir, out, data="pretrain.json"):
    return ["--model_name_or_path", str(tiny_llm_dir), "--vision_tower", str(tiny_drip_dir),
            "--data_path", str(data_dir / data), "--image_folder", str(data_dir / "images"),
            "--output_dir", str(out), "--report_to", "none", "--logging_steps", "1"]


# ---------------------------------------------------------------------------------------------- fast tests
def test_llava_flags_parse_and_pick_recipes(tiny_llm_dir, tiny_drip_dir, data_dir, tmp_path):
    from drip_llava.train.params import parse_args, resolve_recipe

    common = base_args(tiny_llm_dir, tiny_drip_dir, data_dir, tmp_path) + ["--use_cpu", "True"]
    m, d, t = parse_args(common + ["--tune_mm_mlp_adapter", "True", "--warmup_ratio", "0.03", "--evaluation_strategy",
                                   "no", "--mm_use_im_start_end", "False", "--lazy_preprocess", "True"])
    assert resolve_recipe(m, t) == "stage1" and t.warmup_steps == 0.03 and t.eval_strategy == "no"
    assert m.mm_projector_type == "mlp2x_gelu" and m.mm_vision_select_layer == -2 and not t.remove_unused_columns
    m, _, t = parse_args(common + ["--lora_enable", "True", "--bits", "4"])
    assert resolve_recipe(m, t) == "qlora"
    m, _, t = parse_args(common + ["--lora_enable", "True"])
    assert resolve_recipe(m, t) == "lora" and t.lora_r == 64 and t.lora_alpha == 16  # LLaVA's dataclass defaults
    assert resolve_recipe(*parse_args(common)[::2]) == "full"
    with pytest.raises(ValueError, match="contradicts"):
        parse_args(common + ["--recipe", "lora"])
    with pytest.raises(ValueError, match="add --lora_enable True"):
        parse_args(common + ["--bits", "4"])
    with pytest.raises(ValueError, match="not supported"):
        parse_args(common + ["--mm_use_im_start_end", "True"])
    with pytest.raises(FileNotFoundError, match="nope.json"):
        parse_args(common + ["--data_path", str(tmp_path / "nope.json")])


def test_stage1_projector_from_another_tower_is_refused(tmp_path):
    from types import SimpleNamespace

    from drip_llava.train.recipes import check_stage1_tower
    from drip_llava.vision import get_preset_config

    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    (stage1 / "mm_projector.safetensors").write_bytes(b"")
    (stage1 / "config.json").write_text(json.dumps({
        "vision_config": get_preset_config("drip-tiny-16-4x").to_dict(), "mm_vision_select_layer": -2}))
    same = SimpleNamespace(vision_config=get_preset_config("drip-tiny-16-4x").to_dict(), mm_vision_select_layer=-2)
    check_stage1_tower(same, str(stage1 / "mm_projector.safetensors"))
    other = SimpleNamespace(vision_config=get_preset_config("drip-tiny-16-10x").to_dict(), mm_vision_select_layer=-2)
    with pytest.raises(ValueError, match=r"another vision tower.*'compression': \(4\.0, 10\.0\)"):
        check_stage1_tower(other, str(stage1))
    with pytest.raises(ValueError, match="mm_vision_select_layer"):
        check_stage1_tower(SimpleNamespace(vision_config=same.vision_config, mm_vision_select_layer=-1), str(stage1))


def make_trainer(tiny_llm_dir, tiny_drip_dir, data_dir, out, extra):
    from drip_llava.data import DataCollatorForSupervisedDataset, ImageLoader, LazySupervisedDataset
    from drip_llava.train.params import parse_args, resolve_recipe
    from drip_llava.train.recipes import get_recipe
    from drip_llava.train.train import load_tokenizer
    from drip_llava.train.trainer import DripLlavaTrainer

    m, d, t = parse_args(base_args(tiny_llm_dir, tiny_drip_dir, data_dir, out, "finetune.json")
                         + ["--use_cpu", "True", "--version", "v1"] + extra)
    recipe = get_recipe(resolve_recipe(m, t), m, d, t)
    model = recipe.configure(recipe.load_model())
    tok = load_tokenizer(m, t)
    tower = recipe.vision_tower(model)
    ds = LazySupervisedDataset(d.data_path, tok, m.version, ImageLoader(d.image_folder, tower.image_processor), 256)
    trainer = DripLlavaTrainer(model=model, args=t, train_dataset=ds, recipe=recipe,
                               data_collator=DataCollatorForSupervisedDataset(tok.pad_token_id))
    return trainer, recipe, model


def test_lora_recipe_targets_llm_only_and_projector_gets_its_lr(tiny_llm_dir, tiny_drip_dir, data_dir, tmp_path):
    trainer, recipe, model = make_trainer(tiny_llm_dir, tiny_drip_dir, data_dir, tmp_path, [
        "--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8", "--learning_rate", "2e-4",
        "--mm_projector_lr", "2e-5", "--weight_decay", "0.1"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "mm_projector" in n for n in trainable)
    assert any("mm_projector" in n for n in trainable)
    assert not any("vision_tower" in n or "lm_head" in n or "embed_tokens" in n for n in trainable)
    lora_modules = {n.rsplit(".lora_", 1)[0] for n in trainable if "lora_" in n}
    assert all(".layers." in n for n in lora_modules) and len(lora_modules) == 2 * 7  # q,k,v,o,gate,up,down x 2
    opt = trainer.create_optimizer()
    proj = {id(p) for p in recipe.projector_parameters(model)}
    groups = [(g.get("lr", 2e-4), g["weight_decay"], {id(p) for p in g["params"]}) for g in opt.param_groups]
    assert all(g[2] for g in groups)  # no empty group
    assert {lr for lr, _, ids in groups if ids & proj} == {2e-5}
    assert {lr for lr, _, ids in groups if not ids & proj} == {2e-4}
    covered = set().union(*(ids for _, _, ids in groups))
    assert covered == {id(p) for p in model.parameters() if p.requires_grad}
    # biases never decay
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(not names[i].endswith("bias") for _, wd, ids in groups if wd > 0 for i in ids)


def test_lora_with_frozen_projector_saves_a_loadable_folder_and_keeps_data_order(tiny_llm_dir, tiny_drip_dir,
                                                                                     data_dir, tmp_path):
    """--freeze_mm_mlp_adapter: the stage-1 projector is not trained but still saved (the folder loads on its own);
    --keep_data_order: the JSON's order is the training order (a curriculum), and it refuses a second ordering."""
    from torch.utils.data import SequentialSampler

    from drip_llava.model import load_pretrained_model

    out = tmp_path / "lora"
    trainer, recipe, model = make_trainer(tiny_llm_dir, tiny_drip_dir, data_dir, out, [
        "--lora_enable", "True", "--lora_r", "4", "--lora_alpha", "8", "--freeze_mm_mlp_adapter", "True",
        "--keep_data_order", "True"])
    assert not any(p.requires_grad for p in recipe.projector_parameters(model))
    assert isinstance(trainer._get_train_sampler(), SequentialSampler)
    recipe.save(model, str(out), is_main=True, final=True)
    assert {k.split(".")[0] for k in load_file(str(out / "non_lora_trainables.safetensors"))} == {"mm_projector"}
    loaded = load_pretrained_model(str(out), model_base=str(tiny_llm_dir), device="cpu")
    want = recipe.projector_parameters(model)
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.mm_projector.parameters(), want))
    trainer.args.group_by_modality_length = True
    with pytest.raises(ValueError, match="keep_data_order"):
        trainer._get_train_sampler()


def test_qlora_keeps_vision_modules_out_of_quantization(tiny_llm_dir, tiny_drip_dir, data_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    _, _, model = make_trainer(tiny_llm_dir, tiny_drip_dir, data_dir, tmp_path, [
        "--lora_enable", "True", "--bits", "4", "--lora_r", "4", "--lora_alpha", "8"])
    import bitsandbytes as bnb

    quantized = [n for n, mod in model.named_modules() if isinstance(mod, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7 and all(".layers." in n and n.endswith("base_layer") for n in quantized)
    vision = [mod for n, mod in model.named_modules() if ("mm_projector" in n or "vision_tower" in n)
              and isinstance(mod, torch.nn.Linear)]
    assert vision and not any(isinstance(mod, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for mod in vision)
    base = model.get_base_model()
    assert all(p.dtype == torch.float32 for p in base.mm_projector.parameters())
    assert all(p.requires_grad for p in base.mm_projector.parameters())
    assert not any(p.requires_grad for p in base.vision_tower.parameters())


def read_metrics(out):
    return read_jsonl(Path(out) / "metrics.jsonl")


def test_main_smoke_stage1_in_process(tiny_llm_dir, tiny_drip_dir, data_dir, tmp_path):
    """One process, no DeepSpeed: stage 1 trains the projector only, logs JSONL, writes the stage-1 files."""
    from drip_llava.model import load_pretrained_model
    from drip_llava.train.train import main

    out = tmp_path / "stage1"
    summary = main(base_args(tiny_llm_dir, tiny_drip_dir, data_dir, out) + [
        "--version", "plain", "--tune_mm_mlp_adapter", "True", "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2", "--max_steps", "4", "--save_steps", "2", "--group_by_modality_length", "True",
        "--visual_token_count", "exact"])
    assert summary["recipe"] == "stage1" and summary["global_step"] == 4
    logs = [r for r in read_metrics(out) if "loss" in r]
    assert [r["step"] for r in logs] == [1, 2, 3, 4]
    assert all(r["tokens_per_s"] > 0 for r in logs[1:]) and "skipped_bad_image" in logs[0]
    assert {"mm_projector.safetensors", "config.json", "vision_tower", "visual_token_counts.json"} <= \
        {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["conv_mode"] == "plain"  # serving's default template
    proj = load_file(str(out / "mm_projector.safetensors"))
    loaded = load_pretrained_model(str(out), model_base=str(tiny_llm_dir), device="cpu")
    assert loaded.kind == "projector"
    state = loaded.model.mm_projector.state_dict()
    assert all(torch.equal(state[k], v) for k, v in proj.items())

    # checkpoint-2 holds the projector and the optimizer state, not the frozen LLM, and resumes exactly
    names = {p.name for p in (out / "checkpoint-2").iterdir()}
    assert {"mm_projector.safetensors", "optimizer.pt", "trainer_state.json"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin"}, names
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    main(base_args(tiny_llm_dir, tiny_drip_dir, data_dir, resumed) + [
        "--version", "plain", "--tune_mm_mlp_adapter", "True", "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2", "--max_steps", "4", "--save_steps", "2", "--group_by_modality_length", "True",
        "--resume_from_checkpoint", "auto", "--visual_token_cache", str(out / "visual_token_counts.json")])
    assert [r["step"] for r in read_metrics(resumed) if "loss" in r] == [3, 4]
    again = load_file(str(resumed / "mm_projector.safetensors"))
    for k, v in proj.items():
        torch.testing.assert_close(again[k], v, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- DeepSpeed runs
def ds_env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu",
               TOKENIZERS_PARALLELISM="false", PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("OMP_NUM_THREADS", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(cmd, env, cwd, log):
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, timeout=900)
    if proc.returncode != 0:
        tail = Path(log).read_text()[-4000:]
        raise AssertionError(f"{' '.join(map(str, cmd[:6]))} ... failed ({proc.returncode}):\n{tail}")


def test_exit_after_main_flushes_and_keeps_exit_codes(tmp_path):
    """Launcher entry points skip interpreter teardown after success (drip_llava/distributed.py): buffered output
    and log lines must still arrive, and a failing main must still exit non-zero."""
    code = ("import logging, sys; from drip_llava.distributed import exit_after_main\n"
            "logging.basicConfig(stream=sys.stdout, level=logging.INFO)\n"
            "def main():\n    print('buffered', end='')\n    logging.getLogger('x').info('logged')\n"
            "    if sys.argv[1] == 'fail':\n        raise RuntimeError('boom')\n"
            "exit_after_main(main)\n")
    env = dict(os.environ, WORLD_SIZE="2")
    ok = subprocess.run([sys.executable, "-c", code, "ok"], env=env, capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0 and "buffered" in ok.stdout and "logged" in ok.stdout, ok.stderr
    bad = subprocess.run([sys.executable, "-c", code, "fail"], env=env, capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 1 and "boom" in bad.stderr


@pytest.fixture(scope="module")
def stage1_runs(tiny_llm_dir, tiny_drip_dir, data_dir, tmp_path_factory):
    """`deepspeed --num_gpus 2 scripts/pretrain_projector.py` under ZeRO-2 and ZeRO-3 (same data, same seed)."""
    outs = {}
    for stage in ("zero2", "zero3"):
        out = tmp_path_factory.mktemp(f"stage1_{stage}")
        run(stage1_cmd(stage, out, tiny_llm_dir, tiny_drip_dir, data_dir), ds_env(), out, out / "run.log")
        outs[stage] = out
    return outs


def stage1_cmd(stage, out, tiny_llm_dir, tiny_drip_dir, data_dir, *extra):
    return ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()),
            str(REPO / "scripts" / "pretrain_projector.py"),
            *base_args(tiny_llm_dir, tiny_drip_dir, data_dir, out),
            "--deepspeed", str(REPO / "scripts" / f"{stage}.json"), "--per_device_train_batch_size", "4",
            "--learning_rate", "1e-2", "--max_steps", "8", "--save_steps", "4", "--save_total_limit", "2",
            # zero2 keeps the script's 4 loader workers (skip counters in shared memory), zero3 loads in-process
            *(["--dataloader_num_workers", "0"] if stage == "zero3" else []), *extra]


@pytest.mark.slow
def test_stage1_deepspeed_zero2_zero3(stage1_runs, tiny_llm_dir, tiny_drip_dir):
    from drip_llava.model import load_pretrained_model

    projs = {}
    for stage, out in stage1_runs.items():
        logs = [r for r in read_metrics(out) if "loss" in r]
        assert len(logs) == 8
        first, last = sum(r["loss"] for r in logs[:2]) / 2, sum(r["loss"] for r in logs[-2:]) / 2
        assert last < first - 0.05, f"{stage}: loss did not fall ({first:.3f} -> {last:.3f})"
        print(f"{stage}: loss {first:.3f} -> {last:.3f}; tokens/s {[r.get('tokens_per_s') for r in logs]}")
        projs[stage] = load_file(str(out / "mm_projector.safetensors"))
        assert all(v.numel() > 0 and v.abs().sum() > 0 for v in projs[stage].values())  # gathered, not [0]
        loaded = load_pretrained_model(str(out), model_base=str(tiny_llm_dir), device="cpu")
        state = loaded.model.mm_projector.state_dict()
        assert all(torch.equal(state[k], v) for k, v in projs[stage].items())
        # the saved tower is the (frozen) input tower, gathered under ZeRO-3
        ref, saved = load_file(str(tiny_drip_dir / "model.safetensors")), \
            load_file(str(out / "vision_tower" / "model.safetensors"))
        assert ref.keys() == saved.keys() and all(torch.equal(ref[k], saved[k]) for k in ref)
        assert (out / "checkpoint-8" / "mm_projector.safetensors").is_file()
    # same data, seed and batches: ZeRO-2 and ZeRO-3 agree
    for k in projs["zero2"]:
        torch.testing.assert_close(projs["zero2"][k], projs["zero3"][k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_stage1_checkpoints_hold_no_frozen_llm_and_resume_exactly(stage1_runs, tiny_llm_dir, tiny_drip_dir, data_dir,
                                                                  tmp_path):
    """checkpoint-N keeps the projector, its Adam state and the schedule, not the frozen LLM (which the Trainer +
    DeepSpeed would store twice); a copy of checkpoint-4 continues to step 8 as the run did."""
    llm_bytes = (tiny_llm_dir / "model.safetensors").stat().st_size
    for stage, out in stage1_runs.items():
        ckpt = out / "checkpoint-4"
        names = {p.name for p in ckpt.iterdir()}
        assert {"mm_projector.safetensors", "trainer_state.json", "global_step4"} <= names, (stage, names)
        assert not names & {"model.safetensors", "pytorch_model.bin"}, (stage, names)
        ds_bytes = sum(f.stat().st_size for f in (ckpt / "global_step4").rglob("*") if f.is_file())
        print(f"{stage}: DeepSpeed state in checkpoint-4 {ds_bytes / 1e6:.2f} MB; the LLM {llm_bytes / 1e6:.1f} MB")
        assert ds_bytes < llm_bytes / 10, (stage, ds_bytes, llm_bytes)

        resumed = tmp_path / f"resumed_{stage}"
        shutil.copytree(ckpt, resumed / "checkpoint-4")
        log = resumed / "run.log"
        run(stage1_cmd(stage, resumed, tiny_llm_dir, tiny_drip_dir, data_dir, "--resume_from_checkpoint", "auto"),
            ds_env(), resumed, log)
        assert "resuming from" in log.read_text()
        logs = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
        relogs = {r["step"]: r["loss"] for r in read_metrics(resumed) if "loss" in r}
        assert sorted(relogs) == [5, 6, 7, 8], (stage, sorted(relogs))
        for s in relogs:
            assert abs(relogs[s] - logs[s]) < 1e-4, (stage, s, relogs[s], logs[s])
        proj = load_file(str(out / "mm_projector.safetensors"))
        again = load_file(str(resumed / "mm_projector.safetensors"))
        for k in proj:
            torch.testing.assert_close(again[k], proj[k], atol=1e-5, rtol=1e-4)


def finetune(out, port, tiny_llm_dir, tiny_drip_dir, data_dir, adapter, log, **env):
    settings = dict(MODEL=tiny_llm_dir, VISION_TOWER=tiny_drip_dir, PRETRAIN_ADAPTER=adapter,
                    DATA_PATH=data_dir / "finetune.json", IMAGE_FOLDER=data_dir / "images", OUTPUT_DIR=out,
                    NUM_GPUS=2, MASTER_PORT=port, PER_DEVICE_BATCH=2, GLOBAL_BATCH=4, NUM_WORKERS=0, LORA_R=8,
                    LORA_ALPHA=16, MODEL_MAX_LENGTH=256, LR="5e-3", MM_PROJECTOR_LR="2e-3", PYTHON=sys.executable)
    settings.update(env)
    run(["bash", str(REPO / "scripts" / "finetune_lora.sh")], ds_env(**settings), out.parent, log)


@pytest.mark.slow
def test_stage2_lora_zero3_resume_merge_generate(stage1_runs, tiny_llm_dir, tiny_drip_dir, data_dir, tmp_path):
    from drip_llava.data import build_prompt, tokenizer_image_token
    from drip_llava.model import load_pretrained_model

    merge_lora = runpy.run_path(str(REPO / "scripts" / "merge_lora.py"))  # the script users run

    adapter = stage1_runs["zero3"] / "mm_projector.safetensors"
    full = tmp_path / "lora_full"
    # no LoRA dropout: the resumed losses must then match to float precision (weights, Adam state, LR schedule
    # and data position all restored), independent of how exactly the RNG streams are restored
    finetune(full, free_port(), tiny_llm_dir, tiny_drip_dir, data_dir, adapter, tmp_path / "full.log",
             MAX_STEPS=8, SAVE_STEPS=4, SAVE_TOTAL_LIMIT=2, LORA_DROPOUT=0)
    for d in (full, full / "checkpoint-4", full / "checkpoint-8"):
        names = {p.name for p in d.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "non_lora_trainables.safetensors",
                "config.json", "vision_tower"} <= names, d
    assert "global_step4" in {p.name for p in (full / "checkpoint-4").iterdir()}  # optimizer state for resume
    # without the frozen LLM (DeepSpeed's own exclusion kept the tied lm_head = the whole embedding matrix)
    ds_bytes = sum(f.stat().st_size for f in (full / "checkpoint-4" / "global_step4").rglob("*") if f.is_file())
    assert ds_bytes < (tiny_llm_dir / "model.safetensors").stat().st_size / 10, ds_bytes
    logs = {r["step"]: r["loss"] for r in read_metrics(full) if "loss" in r}
    assert sorted(logs) == list(range(1, 9))

    # resume: a copy of checkpoint-4 in a fresh folder continues to step 8 with the same losses
    resumed = tmp_path / "lora_resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-4", resumed / "checkpoint-4")
    finetune(resumed, free_port(), tiny_llm_dir, tiny_drip_dir, data_dir, adapter, tmp_path / "resume.log",
             MAX_STEPS=8, SAVE_STEPS=4, SAVE_TOTAL_LIMIT=2, LORA_DROPOUT=0)
    assert "resuming from" in (tmp_path / "resume.log").read_text()
    relogs = {r["step"]: r["loss"] for r in read_metrics(resumed) if "loss" in r}
    assert sorted(relogs) == [5, 6, 7, 8]
    for s in relogs:
        assert abs(relogs[s] - logs[s]) < 1e-4, (s, relogs[s], logs[s])

    # an intermediate checkpoint loads on its own (files decide, not the folder name)
    assert load_pretrained_model(str(full / "checkpoint-4"), model_base=str(tiny_llm_dir), device="cpu").kind == "lora"

    merged = tmp_path / "merged"
    merge_lora["main"](["--model-path", str(full), "--model-base", str(tiny_llm_dir), "--save-model-path", str(merged)])
    loaded = load_pretrained_model(str(merged), device="cpu")
    assert loaded.kind == "full" and loaded.model.config.conv_mode == "v1"
    m = loaded.model
    # merge = base + scale * B @ A, projector = non_lora_trainables
    base = load_file(str(tiny_llm_dir / "model.safetensors"))
    ad = load_file(str(full / "adapter_model.safetensors"))
    key = "model.layers.0.self_attn.q_proj"
    A, B = ad[f"base_model.model.{key}.lora_A.weight"], ad[f"base_model.model.{key}.lora_B.weight"]
    assert B.abs().max() > 0
    torch.testing.assert_close(m.state_dict()[f"{key}.weight"], base[f"{key}.weight"] + (16 / 8) * B @ A,
                               atol=1e-5, rtol=1e-4)
    nl = load_file(str(full / "non_lora_trainables.safetensors"))
    assert all(torch.equal(m.state_dict()[k], v) for k, v in nl.items())

    # the merged model answers about an image through the public inference path
    tok = loaded.tokenizer
    image = loaded.image_processor(Image.open(data_dir / "images" / "0.png"))[None]
    prompt = build_prompt("v1", [{"role": "user", "content": "<image>\nWhat color is the shape?"}], tok)
    ids = torch.tensor([tokenizer_image_token(prompt, tok)])
    out = m.generate(ids, images=image, max_new_tokens=6, do_sample=False)
    answer = tok.decode(out[0], skip_special_tokens=True)
    print("merged model answer:", repr(answer))
    assert out.shape[1] >= 1 and answer.strip()
    # and it learned the answer format: the trained reply is far likelier than before stage 2
    ref = tokenizer_image_token(prompt + " It is red." + tok.eos_token, tok)
    labels = torch.tensor([[-100] * ids.shape[1] + ref[ids.shape[1]:]])
    before = load_pretrained_model(str(stage1_runs["zero3"]), model_base=str(tiny_llm_dir), device="cpu").model
    with torch.no_grad():
        l_after = m(input_ids=torch.tensor([ref]), images=image, labels=labels).loss.item()
        l_before = before(input_ids=torch.tensor([ref]), images=image, labels=labels).loss.item()
    assert l_after < l_before - 0.1, (l_before, l_after)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_stage2_qlora_zero2(bits, stage1_runs, tiny_llm_dir, tiny_drip_dir, data_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    from drip_llava.model import load_pretrained_model

    out = tmp_path / "qlora"
    finetune(out, free_port(), tiny_llm_dir, tiny_drip_dir, data_dir, stage1_runs["zero2"], tmp_path / "qlora.log",
             BITS=bits, MAX_STEPS=3, SAVE_STEPS=2)
    log = (tmp_path / "qlora.log").read_text()
    assert f"BITS={bits}" in log and "zero2.json" in log
    # 2 decoder layers x 7 linear layers each; lm_head and the vision modules stay out
    layer = {4: "Linear4bit", 8: "Linear8bitLt"}[bits]
    assert f"quantized linear layers: {{'{layer}': 14}}" in log, [ln for ln in log.splitlines() if "quantized" in ln]
    assert len([r for r in read_metrics(out) if "loss" in r]) == 3
    nl = load_file(str(out / "non_lora_trainables.safetensors"))
    assert sorted(nl) == sorted(f"mm_projector.{i}.{w}" for i in (0, 2) for w in ("weight", "bias"))
    assert all(v.dtype == torch.float32 for v in nl.values())
    loaded = load_pretrained_model(str(out), model_base=str(tiny_llm_dir), device="cpu")
    assert loaded.kind == "lora" and (out / "checkpoint-3" / "adapter_model.safetensors").is_file()
    # under ZeRO-2 DeepSpeed's own frozen-parameter exclusion kept the tied lm_head (the whole embedding matrix)
    ds_bytes = sum(f.stat().st_size for f in (out / "checkpoint-3" / "global_step3").rglob("*") if f.is_file())
    assert ds_bytes < (tiny_llm_dir / "model.safetensors").stat().st_size / 10, ds_bytes


@pytest.mark.slow
def test_stage2_lora_zero3_offload(stage1_runs, tiny_llm_dir, tiny_drip_dir, data_dir, tmp_path):
    """scripts/zero3_offload.json (LLaVA's OOM preset: optimizer and parameters on the CPU) trains and saves."""
    out = tmp_path / "offload"
    finetune(out, free_port(), tiny_llm_dir, tiny_drip_dir, data_dir, stage1_runs["zero3"], tmp_path / "offload.log",
             DS_CONFIG=REPO / "scripts" / "zero3_offload.json", MAX_STEPS=3, SAVE_STEPS=2)
    assert "zero3_offload.json" in (tmp_path / "offload.log").read_text()
    logs = [r for r in read_metrics(out) if "loss" in r]
    assert len(logs) == 3 and all(r["loss"] == r["loss"] for r in logs)  # no NaN
    nl = load_file(str(out / "non_lora_trainables.safetensors"))
    assert nl and all(v.numel() > 0 for v in nl.values())  # gathered, not ZeRO-3's empty partitions
