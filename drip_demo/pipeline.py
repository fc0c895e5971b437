"""The whole DRIP-LLaVA pipeline on a laptop CPU, on the embedded default (synthetic shapes world + SmolLM2-135M).

    python -m drip_demo [--quick] [--fresh] [--out playground/demo]     (what `make demo [QUICK=1]` runs)

Stages (each runs the same command a user would type, and is skipped on a rerun when its output is complete):
  data -> clip (ViT-tiny, DRIP-tiny-4x with torchrun x2; DRIP-tiny-10x) -> boundaries -> probe (what the towers'
  LLaVA tokens encode) -> llm -> stage1 (deepspeed, zero2) -> stage2 (scripts/finetune_lora.sh) -> eval
  (ScienceQA-format MC by likelihood on every problem and by letter on a subset, each with the image and with a
  blank one; exact match, efficiency) -> report (REPORT.md + PNG plots). Results land in OUT/results.json, which
  the QUICK test asserts on.

The verdict on "does LLaVA read the image?" is an exact McNemar test (drip_llava.eval.paired) of per-problem
likelihood correctness with the image vs with a blank one, over the problems that have an image: FULL passes when
with-image is more accurate at a two-sided p < ALPHA (a FAIL exits with status 1 after the report); QUICK runs
the same code on 20 problems and prints the verdict line as information only.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from drip_llava.distributed import free_port, release_orphan_deepspeed_shm
from drip_llava.jsonl import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BIN = Path(PY).parent


@dataclass
class Budget:
    n_train: int
    n_val: int
    clip_steps: int
    clip_batch: int  # per rank (2 ranks)
    clip_lr: float
    stage1_steps: int
    stage2_steps: int
    llava_batch: int  # per rank (2 ranks)
    stage1_lr: float
    stage2_lr: float
    lora_r: int
    n_eval: int  # ScienceQA-format image problems (plus ~1/9 text-only ones), all answered by likelihood
    n_letter: int  # at most this many of them answered by letter too: every k-th problem (generation is the slow path)
    n_exact: int  # held-out short-answer questions
    bench_images: int = 6  # val images (plus 2 photos) in the prefill benchmark
    bench_repeats: int = 3  # timed runs per image (median)
    probe_images: tuple = (800, 400)  # train / val images of the attribute probes
    # held-out conversations of the image-use check (loss with right / wrong / blank image); 0 = skip (QUICK: its
    # 10 stage-2 steps cannot read, and the check costs ~40 s there)
    n_image_use: int = 48
    # stage 2 starts with this many steps of colour-only questions, in file order (instruct.json's warm-up block,
    # --keep_data_order), then the mix: of the stage-2 schedules measured, the one that reads colour (the shuffled
    # 13-type mix does not; docs/experiments.md, "Curriculum"). 0 = plain shuffled mix (QUICK: 10 steps are too
    # few for both, and its test asserts the loss falls)
    stage2_warmup_steps: int = 0
    # question types of the ScienceQA image problems (drip_demo.synthetic_questions.SQA_MIXES): weighted
    # toward colour, the attribute a tower reads after minutes of CLIP, so the with-image vs blank test has power
    sqa_mix: str = "readable"

    @property
    def n_warmup_records(self) -> int:
        """Warm-up conversations the data needs: one global batch (2 ranks) per warm-up step."""
        return 2 * self.llava_batch * self.stage2_warmup_steps


# Calibrated on 2 cores: tiny CLIP towers start on a loss plateau (~ln(batch)); DRIP leaves it after ~35 steps,
# ViT after ~50 (python -m drip_demo.compare_clip). Steps fit the time budget on the slower of the measured machines (an
# EPYC with AVX512-BF16 but no AMX: LLaVA steps 4.3-4.9 s, CLIP steps 0.85-1.1 s in bf16; on a Xeon with AMX, 2.3 s
# and ~0.65 s): FULL 16.4-19.9 min measured with a 222-problem eval (~+100 s estimated for the 600 below),
# zero-shot top-1 ViT 9.4%, DRIP-4x 9.1%, DRIP-10x 8.4% (chance 2.5%); QUICK ~6 min, DRIP-4x 9.3-9.75% at 70 CLIP
# steps (5.3% at 60: too close to the QUICK test's 5% floor). docs/results.md has the
# runs. Stage-1 lr 1e-2: tens of steps instead of LLaVA's ~2000 (at 1e-3 the caption loss stays flat). Stage 2: 60
# steps, 25 of colour-only warm-up then 35 of the mix: the stage-2 loss is flat by step ~45, the shuffled mix alone
# does not read the image (eval.image_use gap ~0), and the warm-up reads colour (held-out gap +0.012 +- 0.004,
# colour questions above the blank-image control by likelihood; docs/experiments.md).
# Eval: likelihood (one prompt pass, the options from its KV cache; ~0.4 s per problem on one core) on all 600
# problems (540 with an image), with the image and blank; letter generation, about as slow per problem, on one
# problem in 6 (100). Expected power, from the colour gain measured by likelihood at 222 problems (+12-13 points on
# 69 colour problems, docs/results.md) and an assumed discordance of ~1/3 per problem: with the colour-weighted mix,
# 540 image problems give z ~ 3.4 (two-sided p ~ 1e-3, ~80% power at p < 0.01); 200 uniform ones would give z ~ 1.1.
# Cost: 1400 answer runs against 888 at 222 problems by both protocols, ~+100 s on the eval stage (269 s measured).
FULL = Budget(n_train=8000, n_val=800, clip_steps=130, clip_batch=32, clip_lr=5e-4, stage1_steps=40,
              stage2_steps=60, stage2_warmup_steps=25, llava_batch=4, stage1_lr=1e-2, stage2_lr=5e-4, lora_r=16,
              n_eval=540, n_letter=100, n_exact=100)
QUICK = Budget(n_train=2400, n_val=400, clip_steps=70, clip_batch=16, clip_lr=5e-4, stage1_steps=8,
               stage2_steps=10, llava_batch=4, stage1_lr=1e-2, stage2_lr=5e-4, lora_r=16, n_eval=20, n_letter=12,
               n_exact=20, bench_images=1, bench_repeats=1, probe_images=(400, 200), n_image_use=0)
ALPHA = 0.01  # the FULL verdict's significance level (two-sided exact McNemar)
CLIP_MODELS = ("vit-tiny-16", "drip-tiny-16-4x", "drip-tiny-16-10x")
LLAVA_TOWER = "drip-tiny-16-4x"


def cpu_precision() -> str | None:
    """Precision on a CPU-only machine: bf16 where the CPU has bf16 matrix units, fp32 elsewhere (bf16 is emulated
    there, and slower). Measured on 2 cores: a Xeon with AMX, bf16 matmul 8x fp32 and LLaVA steps 2-3x faster; an
    EPYC with AVX512-BF16, matmul 2.5x and CLIP steps 0.98 -> 0.78 s. None with a GPU: the scripts' own defaults."""
    import torch

    if torch.cuda.is_available():
        return None
    return "bf16" if torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported() else "fp32"


class Demo:
    def __init__(self, out: Path, budget: Budget, quick: bool):
        self.out, self.b, self.quick = out, budget, quick
        self.precision = cpu_precision()
        self.data = out / "data"
        self.llm_job = None  # the LLM conversion, once started (start_llm)
        self.restart_hint = "make demo FRESH=1"  # printed when a finished stage is reused
        self.logs = out / "logs"
        self.report = out / "report"
        self.results_path = out / "results.json"
        self.results = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}
        self.results["budget"] = asdict(budget)
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
                    "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                    "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}

    # ---- plumbing ------------------------------------------------------------------------------
    def run(self, name: str, cmd: list, env: dict | None = None, prefix: str = ""):
        """Runs a command, its output shown live (each line after `prefix`) and kept in logs/NAME.log; a failure
        stops the demo with the log path."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        print(f"\n$ {' '.join(map(str, cmd))}", flush=True)
        with open(log, "w") as f:
            proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env={**self.env, **(env or {})},
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
            for line in proc.stdout:
                f.write(line)
                if not self.quiet_line(line):
                    sys.stdout.write(prefix + line)
                    sys.stdout.flush()
        if proc.wait() != 0:
            release_orphan_deepspeed_shm()  # the RAM of ranks the launcher killed
            raise SystemExit(f"demo: step '{name}' failed (exit {proc.returncode}); see {log}")

    def run_parallel(self, jobs: list[tuple[str, list]]):
        """Independent one-process jobs side by side, one per core (self.env gives each one thread): the eval's
        answer generation is batch-1 decoding, small ops that use a second core better as a second process."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
            futures = [pool.submit(self.run, name, cmd, None, f"[{name}] ") for name, cmd in jobs]
            for fut in futures:
                fut.result()

    @staticmethod
    def quiet_line(line: str) -> bool:
        return "[WARNING]" in line and "real_accelerator" in line

    def stage(self, name: str, fn):
        if self.results.get("done", {}).get(name):
            print(f"[demo] {name}: done in an earlier run, reusing ({self.restart_hint} to start over)")
            return
        print(f"\n[demo] ===== {name} =====", flush=True)
        seconds = timed(fn)
        self.results.setdefault("done", {})[name] = True
        self.results.setdefault("seconds", {})[name] = seconds
        self.save()

    def save(self):
        tmp = self.results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=2))
        os.replace(tmp, self.results_path)

    # ---- stages ----------------------------------------------------------------------------------
    def make_data(self):
        b = self.b
        self.run("data", [PY, "-m", "drip_demo.synthetic", "--out", self.data, "--n-train", b.n_train,
                          "--n-val", b.n_val, "--seed", "0", "--n-sqa", b.n_eval, "--workers", "2",
                          "--n-warmup", b.n_warmup_records, "--sqa-mix", b.sqa_mix])

    def clip(self):
        for preset in CLIP_MODELS:
            self.results.setdefault("clip", {})[preset] = self.train_clip(preset, preset)
            self.save()

    def train_clip(self, name: str, preset: str, overrides: tuple = ()) -> dict:
        """One CLIP tower (torchrun x2) in OUT/clip/NAME: `preset` with `overrides` (KEY=VALUE strings, e.g.
        family=tome merge_r=9), this budget's schedule; the run's summary (vision_pretrain.runlog)."""
        from drip_demo.synthetic import shard_spec
        from vision_pretrain.runlog import summarize_clip_run

        b = self.b
        run = self.out / "clip" / name
        self.run(f"clip-{name}", [
            BIN / "torchrun", "--nproc_per_node", "2", "--master_port", free_port(), "-m", "vision_pretrain.clip",
            "--train-data", shard_spec(self.data, "train"), "--model", preset, "--text-model", "tiny",
            *(["--vision-override", *overrides] if overrides else []),
            "--batch-size", b.clip_batch, "--steps", b.clip_steps, "--lr", b.clip_lr,
            "--warmup", max(5, b.clip_steps // 10), "--output", run, "--resume", "auto",
            "--save-every", max(35, b.clip_steps // 3), "--log-every", "5",  # a save + export costs ~1.5 s
            "--zeroshot-dir", self.data / "imagefolder" / "val", "--classnames", self.data / "classnames.json",
            *(["--precision", "bf16"] if self.precision == "bf16" else [])])
        return summarize_clip_run(run)

    def sample_images(self, n: int) -> list[str]:
        """n val images from different classes (deterministic)."""
        folders = sorted((self.data / "imagefolder" / "val").iterdir())
        return [str(sorted(f.glob("*.jpg"))[0]) for f in folders[:: max(1, len(folders) // n)][:n]]

    def boundaries(self):
        self.report.mkdir(parents=True, exist_ok=True)
        val = self.sample_images(4)
        self.run_parallel([(f"viz-{preset}", [PY, "-m", "drip_llava.vision.visualize",
                                              "--model", self.out / "clip" / preset / "vision_tower",
                                              *sum((["--image", p] for p in val), []),
                                              "--image", "example:astronaut", "--image", "example:coffee",
                                              "--out", self.report / f"boundaries_{preset}.png"])
                           for preset in CLIP_MODELS[1:]])

    def probe(self):
        """What the LLaVA tokens of each trained tower (and of an untrained DRIP-4x) encode: the image reading the
        LLM can learn at best, before spending the LLaVA stages on it."""
        towers = {p: str(self.out / "clip" / p / "vision_tower") for p in CLIP_MODELS}
        towers[f"{LLAVA_TOWER} (untrained)"] = LLAVA_TOWER  # a preset name: random weights
        self.results["probe"] = self.probe_towers(towers)

    def probe_towers(self, towers: dict[str, str]) -> dict:
        """name -> drip_demo.attribute_probe row, for towers (name -> folder or preset). Two processes, one per
        core."""
        n_train, n_val = self.b.probe_images
        names = list(towers)
        jobs = [names[0::2], names[1::2]]
        ev = self.out / "eval"
        ev.mkdir(parents=True, exist_ok=True)
        self.run_parallel([(f"probe-{i}", [PY, "-m", "drip_demo.attribute_probe",
                                           "--towers", ",".join(towers[n] for n in job), "--n-train", n_train,
                                           "--n-val", n_val, "--epochs", "15", "--json", ev / f"probe-{i}.json"])
                           for i, job in enumerate(jobs)])
        found = {}
        for i in range(len(jobs)):
            found.update(json.loads((ev / f"probe-{i}.json").read_text()))
        return {n: found[towers[n]] for n in names}

    def start_llm(self):
        """Start the LLM conversion on a worker thread (one process, one core; ~25 s on a first run). It needs
        nothing from the stages before it, so main() starts it beside the boundary pictures and the probes,
        independent one-process jobs that leave gaps on the cores. Not beside CLIP: a core shared with one of its
        two lock-step ranks slows both, and the CLIP stage lost more time (+44 s) than the conversion takes.
        Only the `llm` stage reads its result."""
        from concurrent.futures import ThreadPoolExecutor

        if self.llm_job is None and not self.results.get("done", {}).get("llm"):
            code = "from drip_demo.embedded_llm import prepare_embedded_llm; print(prepare_embedded_llm())"
            pool = ThreadPoolExecutor(1)
            self.llm_job = pool.submit(timed, self.run, "llm", [PY, "-c", code], None, "[llm] ")
            pool.shutdown(wait=False)  # the job still runs; the pool takes no more

    def llm(self):
        self.start_llm()
        # the stage's own time is only the wait; the report shows the conversion's (result() re-raises a failure)
        self.results["llm_conversion_seconds"] = self.llm_job.result()
        self.results["llm"] = (self.logs / "llm.log").read_text().strip().splitlines()[-1]

    @property
    def llm_dir(self) -> str:
        return self.results["llm"]

    @property
    def llava_tower(self) -> Path:
        return self.out / "clip" / LLAVA_TOWER / "vision_tower"

    def stage1(self):
        self.results["stage1"] = self.train_stage1(self.llava_tower, self.out / "stage1")

    def train_stage1(self, tower: Path, out: Path, log: str = "stage1") -> dict:
        """LLaVA stage 1 (the projector; deepspeed, zero2) on `tower` into `out`; its loss curve."""
        b = self.b
        self.run(log, [
            BIN / "deepspeed", "--num_gpus", "2", "--master_port", free_port(), "scripts/pretrain_projector.py",
            "--model_name_or_path", self.llm_dir, "--vision_tower", tower,
            # plain_eos: the caption ends with SmolLM2's end-of-turn token (see the template for the measurement)
            "--version", "plain_eos", "--data_path", self.data / "llava" / "pretrain.json",
            "--image_folder", self.data / "imagefolder", "--mm_projector_type", "mlp2x_gelu",
            "--deepspeed", "scripts/zero2.json", "--output_dir", out,
            "--per_device_train_batch_size", b.llava_batch, "--max_steps", b.stage1_steps,
            "--learning_rate", b.stage1_lr, "--model_max_length", "256", "--dataloader_num_workers", "0",
            "--save_steps", max(10, b.stage1_steps // 2), "--resume_from_checkpoint", "auto",
            "--gradient_checkpointing", "False",  # LLaVA's default saves GPU memory; here it only costs ~25% time
            *([] if self.precision is None else ["--use_cpu", "True", "--bf16", str(self.precision == "bf16")])])
        return summarize_hf_log(out)

    def check_data(self, **want):
        """Stop with the fix when the data was generated with other arguments than this budget needs (an older run
        or data format): the stages would silently train or evaluate on the wrong data."""
        args = json.loads((self.data / "meta.json").read_text())["args"]
        defaults = {"n_warmup": 0, "sqa_mix": "uniform"}  # what data without the argument was generated with
        for key, value in want.items():
            have = args.get(key, defaults.get(key))
            if have != value:
                raise SystemExit(f"demo: {self.data} was generated with {key}={have}, this budget needs {value} "
                                 "(an older run or data format); rerun with `make demo FRESH=1`")

    def check_warmup_data(self):
        """The warm-up schedule trains instruct.json in file order: a missing block, or one of another size, would
        train on the wrong order."""
        self.check_data(n_warmup=self.b.n_warmup_records)

    def stage2(self):
        self.results["stage2"] = self.train_stage2(self.llava_tower, self.out / "stage1", self.out / "stage2")

    def train_stage2(self, tower: Path, stage1: Path, out: Path, log: str = "stage2") -> dict:
        """LLaVA stage 2 (LoRA; scripts/finetune_lora.sh) on `tower` from stage 1's projector into `out`."""
        b = self.b
        if b.stage2_warmup_steps:
            self.check_warmup_data()
        env = dict(MODEL=self.llm_dir, VISION_TOWER=str(tower),
                   PRETRAIN_ADAPTER=str(stage1 / "mm_projector.safetensors"),
                   DATA_PATH=str(self.data / "llava" / "instruct.json"), IMAGE_FOLDER=str(self.data / "imagefolder"),
                   OUTPUT_DIR=str(out), VERSION="chat_template", NUM_GPUS="2",
                   MASTER_PORT=str(free_port()),
                   DS_CONFIG=str(ROOT / "scripts" / "zero2.json"), PER_DEVICE_BATCH=str(b.llava_batch),
                   GLOBAL_BATCH=str(2 * b.llava_batch), MAX_STEPS=str(b.stage2_steps),
                   SAVE_STEPS=str(max(10, b.stage2_steps // 2)), LR=str(b.stage2_lr),
                   MM_PROJECTOR_LR=str(b.stage1_lr / 5),
                   LORA_R=str(b.lora_r), LORA_ALPHA=str(2 * b.lora_r), LORA_DROPOUT="0", MODEL_MAX_LENGTH="384",
                   NUM_WORKERS="0", GRAD_CKPT="False", PYTHON=PY, DEEPSPEED=str(BIN / "deepspeed"))
        if self.precision is not None:
            env["PRECISION"] = self.precision
        # the warm-up block first, then the mix: the JSON's order is the training order
        order = ["--group_by_modality_length", "False", "--keep_data_order", "True"] if b.stage2_warmup_steps else []
        self.run(log, ["bash", "scripts/finetune_lora.sh", *order], env=env)
        return summarize_hf_log(out)

    def letter_split(self, sqa: Path, dst: Path) -> Path:
        """A ScienceQA folder (problems.json linked, pid_splits.json written) whose test split is every k-th problem
        of SQA's, at most n_letter: the subset answered by letter, scored by the same scorer."""
        pids = json.loads((sqa / "pid_splits.json").read_text())["test"]
        step = max(1, -(-len(pids) // max(1, self.b.n_letter)))
        dst.mkdir(parents=True, exist_ok=True)
        link = dst / "problems.json"
        link.unlink(missing_ok=True)  # a link left by an earlier run may point at other data
        link.symlink_to((sqa / "problems.json").resolve())
        (dst / "pid_splits.json").write_text(json.dumps({"train": [], "val": [], "test": pids[::step]}))
        return dst

    def evaluate(self):
        ev = self.out / "eval"
        ev.mkdir(parents=True, exist_ok=True)
        sqa = self.data / "scienceqa"
        self.check_data(n_sqa=min(self.b.n_eval, self.b.n_val), sqa_mix=self.b.sqa_mix)
        letter_dir = self.letter_split(sqa, ev / "sqa_letter")
        model = ["--model-path", self.out / "stage2", "--model-base", self.llm_dir]
        dtype = ["--dtype", "bfloat16"] if self.precision == "bf16" else []
        self.run("sqa-convert", [PY, "-m", "drip_llava.eval.scienceqa", "convert", "--base-dir", letter_dir,
                                 "--split", "test", "--out", ev / "sqa_questions.jsonl"])
        blank = make_blank_images(sqa / "images" / "test", ev / "blank_images")
        # exact match on held-out short-answer questions (val images)
        qfile = ev / "exact_questions.jsonl"
        lines = (self.data / "llava" / "val_questions.jsonl").read_text().splitlines()[: self.b.n_exact]
        qfile.write_text("\n".join(lines) + "\n")
        generate = [PY, "-m", "drip_llava.eval.generate", *model, "--temperature", "0", *dtype]
        tags = (("image", sqa / "images" / "test"), ("blank", blank))
        # does each LLaVA stage read the image? answer loss on held-out conversations, right vs wrong image
        image_use = {stage: [PY, "-m", "drip_llava.eval.image_use", "--model-path", self.out / stage,
                             "--model-base", self.llm_dir, "--data-path", self.data / "llava" / data,
                             "--image-folder", self.data / "imagefolder", "--n", self.b.n_image_use,
                             "--batch-size", "8",
                             *dtype,
                             "--json", ev / f"image_use_{stage}.json"]
                     for stage, data in (("stage1", "val_pretrain.json"), ("stage2", "val_instruct.json"))
                     if self.b.n_image_use}
        # the primary protocol, likelihood (which option the model finds most probable), on every problem: a 135M
        # LLM often knows an answer it cannot map onto its letter. The longest jobs go first into the pool.
        self.run_parallel(self.rank_jobs(self.out / "stage2", ev, tags) +
                          [(f"sqa-generate-{tag}", [*generate, "--question-file", ev / "sqa_questions.jsonl",
                                                     "--image-folder", images, "--max-new-tokens", "8",
                                                     "--answers-file", ev / f"sqa_answers_{tag}.jsonl"])
                           for tag, images in tags] +
                          [("exact-generate", [*generate, "--question-file", qfile, "--max-new-tokens", "16",
                                               "--image-folder", self.data / "imagefolder",
                                               "--answers-file", ev / "exact_answers.jsonl"])] +
                          [(f"image-use-{stage}", cmd) for stage, cmd in image_use.items()] +
                          # its time to first token is one thread's, beside one other single-thread job
                          [("efficiency", [PY, "-m", "drip_llava.eval.efficiency", *model, "--images", "examples",
                                           "--json", ev / "efficiency.json"])])
        if image_use:
            self.results["image_use"] = {stage: json.loads((ev / f"image_use_{stage}.json").read_text())
                                         for stage in image_use}
        self.score_mc(ev, sqa, letter_dir)
        self.results["exact_match"] = exact_match(qfile, ev / "exact_answers.jsonl")
        self.results["efficiency"] = json.loads((ev / "efficiency.json").read_text())
        towers = ",".join(["vit-tiny-16"] + [str(self.out / "clip" / p / "vision_tower") for p in CLIP_MODELS[1:]])
        # the payoff bench's inference half: the trained towers in front of the LLM, time to first token
        self.run("prefill-bench", [PY, "-m", "drip_llava.eval.payoff", "--llm", self.llm_dir, "--no-train",
                                   "--towers", towers, "--no-calibrate", "--repeats", self.b.bench_repeats,
                                   "--threads", "2", "--conv-mode", "chat_template", "--images",
                                   ",".join(self.sample_images(self.b.bench_images) + ["astronaut", "coffee"]),
                                   "--json", ev / "prefill.json"])
        self.results["prefill"] = json.loads((ev / "prefill.json").read_text())["towers"]

    def rank_jobs(self, model: Path, ev: Path, tags, log: str = "sqa-rank") -> list[tuple[str, list]]:
        """The likelihood answer runs (drip_llava.eval.rank_choices) of a stage-2 model on every ScienceQA-format
        problem, one job per (tag, image folder) in `tags`, answers in EV/sqa_ranked_TAG.jsonl."""
        dtype = ["--dtype", "bfloat16"] if self.precision == "bf16" else []
        rank = [PY, "-m", "drip_llava.eval.rank_choices", "--base-dir", self.data / "scienceqa",
                "--model-path", model, "--model-base", self.llm_dir, *dtype]
        return [(f"{log}-{tag}", [*rank, "--image-folder", images, "--answers-file", ev / f"sqa_ranked_{tag}.jsonl"])
                for tag, images in tags]

    def score_sqa(self, ev: Path, name: str, base: Path, log: str = "sqa-score") -> dict:
        """EV/sqa_NAME.jsonl through the ScienceQA scorer (scored per problem in EV/sqa_scored_NAME.jsonl)."""
        self.run(f"{log}-{name}", [PY, "-m", "drip_llava.eval.scienceqa", "score", "--base-dir", base,
                                   "--result-file", ev / f"sqa_{name}.jsonl",
                                   "--output-file", ev / f"sqa_scored_{name}.jsonl",
                                   "--output-result", ev / f"sqa_result_{name}.json"])
        return read_sqa_result(ev / f"sqa_result_{name}.json", ev / f"sqa_scored_{name}.jsonl", base)

    def score_mc(self, ev: Path, sqa: Path, letter_dir: Path):
        """The four MC answer files (likelihood on SQA's split, letter on letter_dir's; with the image and blank)
        through the ScienceQA scorer, then the paired test of image use; prints the verdict line."""
        from drip_demo.report import verdict_line

        protocols = (("scienceqa", "answers", letter_dir), ("scienceqa_ranked", "ranked", sqa))  # letter, likelihood
        for tag, (key, kind, base) in itertools.product(("image", "blank"), protocols):
            self.results.setdefault(key, {})[tag] = self.score_sqa(ev, f"{kind}_{tag}", base)
        self.results["image_test"] = image_test(ev, sqa, decisive=not self.quick)
        print(f"\n[demo] {verdict_line(self.results['image_test'])}", flush=True)

    def write_report(self):
        from drip_demo.report import write_report

        write_report(self.out, self.results, asdict(self.b), self.quick)


def timed(fn, *args) -> float:
    """fn(*args)'s wall time in seconds."""
    t = time.time()
    fn(*args)
    return round(time.time() - t, 1)


def summarize_hf_log(out: Path) -> dict:
    """Loss curve from the trainer's metrics.jsonl (first/last, and every record for the plot)."""
    path = out / "metrics.jsonl"
    recs = read_jsonl(path) if path.exists() else []
    losses = [(r.get("step"), r["loss"]) for r in recs if "loss" in r]
    tps = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r]
    return {"losses": losses, "tokens_per_s": sum(tps) / len(tps) if tps else None}


def make_blank_images(src: Path, dst: Path) -> Path:
    """The same files, every image replaced by a flat grey one: the control that shows answers use the image."""
    from PIL import Image

    from drip_llava.eval.image_use import blank_pil_image

    for p in sorted(src.rglob("*.png")):
        q = dst / p.relative_to(src)
        if not q.exists():
            q.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(p) as im:
                blank_pil_image(im.size).save(q)
    return dst


def question_types(sqa_dir: Path) -> dict[str, str]:
    """pid -> question type (drip_demo.synthetic_questions.SQA_SKILL_TYPE, from the problem's skill)."""
    from drip_demo.synthetic_questions import SQA_SKILL_TYPE

    problems = json.loads((sqa_dir / "problems.json").read_text())
    return {pid: SQA_SKILL_TYPE.get(p["skill"], p["skill"]) for pid, p in problems.items()}


def read_sqa_result(path: Path, scored: Path, sqa_dir: Path) -> dict:
    """The scorer's totals, the chance level of these questions, and accuracy per question type."""
    r = json.loads(path.read_text())
    problems = json.loads((sqa_dir / "problems.json").read_text())
    test = json.loads((sqa_dir / "pid_splits.json").read_text())["test"]
    types = question_types(sqa_dir)
    chance = sum(1 / len(problems[p]["choices"]) for p in test) / len(test)
    by_type: dict[str, list] = {}
    for rec in read_jsonl(scored):
        pid = str(rec["question_id"])
        row = by_type.setdefault(types[pid], [0, 0, 0.0])  # correct, count, summed chance
        row[0] += bool(rec["correct"])
        row[1] += 1
        row[2] += 1 / len(problems[pid]["choices"])
    per_type = {k: {"acc": 100 * c / n, "n": n, "chance": 100 * ch / n} for k, (c, n, ch) in sorted(by_type.items())}
    return {"acc": r.get("acc"), "img_acc": r.get("img_acc"), "chance": 100 * chance, "n": r.get("count"),
            "by_type": per_type}


def image_test(ev: Path, sqa_dir: Path, decisive: bool) -> dict:
    """Does the model read the image? Exact McNemar on per-problem correctness with the image vs blank, over the
    problems that have one (text-only problems get the same input in both runs), by likelihood (the verdict) and
    by letter (its subset; information), overall, per question type and per attribute it needs."""
    from drip_demo.synthetic_questions import SQA_ATTRIBUTE
    from drip_llava.eval import paired as pt

    types = question_types(sqa_dir)
    out = {"alpha": ALPHA, "decisive": decisive}
    for protocol, kind in (("likelihood", "ranked"), ("letter", "answers")):
        a, b = (pt.read_correct(ev / f"sqa_scored_{kind}_{tag}.jsonl", image_only=True) for tag in ("image", "blank"))
        out[protocol] = {"overall": pt.paired(a, b),
                         "by_type": pt.by_group(a, b, {k: types[k] for k in a}),
                         "by_attribute": pt.by_group(a, b, {k: SQA_ATTRIBUTE[types[k]] for k in a
                                                            if types[k] in SQA_ATTRIBUTE})}
    out["pass"] = pt.verdict(out["likelihood"]["overall"], ALPHA)
    return out


def exact_match(qfile: Path, afile: Path) -> dict:
    gold = {}
    for q in read_jsonl(qfile):
        gold[q["question_id"]] = str(q["answer"])
    norm = lambda s: s.strip().lower().rstrip(".").strip()  # noqa: E731
    hits = n = 0
    for a in read_jsonl(afile):
        if a["question_id"] in gold:
            n += 1
            hits += norm(a["text"]) == norm(gold[a["question_id"]])
    return {"accuracy": 100 * hits / max(n, 1), "n": n}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller budget (~6 minutes on 2 cores); what CI runs")
    p.add_argument("--fresh", action="store_true", help="delete OUT and start over")
    p.add_argument("--out", default=None, help="output folder (default playground/demo, or playground/demo-quick)")
    p.add_argument("--stages", default=None, help="comma-separated subset of stages to run (default: all)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out or ROOT / "playground" / ("demo-quick" if args.quick else "demo")).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    demo = Demo(out, QUICK if args.quick else FULL, args.quick)
    stages = [("data", demo.make_data), ("clip", demo.clip), ("boundaries", demo.boundaries), ("probe", demo.probe),
              ("llm", demo.llm), ("stage1", demo.stage1), ("stage2", demo.stage2), ("eval", demo.evaluate),
              ("report", demo.write_report)]
    wanted = set(args.stages.split(",")) if args.stages else None
    t0 = time.time()
    for name, fn in stages:
        if name == "boundaries" and (wanted is None or "llm" in wanted):
            demo.start_llm()  # beside the pictures and probes: one-process jobs (see start_llm)
        if wanted is None or name in wanted:
            demo.stage(name, fn)
    demo.results["total_seconds_this_run"] = round(time.time() - t0, 1)
    demo.save()
    print(f"\n[demo] finished in {time.time() - t0:.0f} s. Report: {out / 'REPORT.md'}")
    print(f"[demo] chat with the trained model:\n  {PY} -m drip_llava.serve.gradio_app --model-path "
          f"{out / 'stage2'} --model-base {demo.results.get('llm', 'LLM_DIR')}")
    test = demo.results.get("image_test")
    if test:
        from drip_demo.report import verdict_line

        print(f"[demo] {verdict_line(test)}")
        if test["decisive"] and not test["pass"]:
            raise SystemExit("demo: the FULL verdict is FAIL: with the image is not more accurate than blank at "
                             f"p < {test['alpha']} (REPORT.md, section 4)")


if __name__ == "__main__":
    main()
