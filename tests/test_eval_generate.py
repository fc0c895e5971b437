"""drip_llava.eval.generate (LLaVA answers jsonl, chunks, resume) and drip_llava.eval.efficiency (tokens, MACs,
time to first token, side by side) on tiny checkpoints built here."""
import json
from pathlib import Path

import pytest
import torch

from drip_llava.eval import efficiency, generate
from drip_llava.eval.generate import get_chunk, load_answered
from drip_llava.jsonl import read_jsonl

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ["chelsea", "coffee", "astronaut", "rocket", "camera"]


def _build(out, llm_dir, preset, calibrate_on=None):
    """A full drip-llava checkpoint with a random `preset` tower; a DRIP predictor is calibrated to its target
    rate on `calibrate_on` under its eval rule (a random predictor keeps about half the patches whatever its
    compression)."""
    from transformers import AutoTokenizer

    from drip_llava.model import DripLlavaForCausalLM
    from drip_llava.vision import DripVisionModel
    from drip_llava.vision.calibrate import calibrate_boundary_bias

    torch.manual_seed(0)
    drip = DripVisionModel.from_preset(preset).eval()
    if calibrate_on is not None and drip.config.is_drip:
        calibrate_boundary_bias(drip, torch.stack([drip.preprocess(im) for im in calibrate_on]), mode="infer")
    model = DripLlavaForCausalLM.from_pretrained(str(llm_dir))
    model.initialize_vision_modules(drip, "mlp2x_gelu", select_layer=-2)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(llm_dir)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def photos():
    from drip_llava.vision.images import example_image

    return {n: example_image(n) for n in PHOTOS}


@pytest.fixture(scope="module")
def drip10_dir(tmp_path_factory, tiny_llm_dir, photos):
    return _build(tmp_path_factory.mktemp("drip10"), tiny_llm_dir, "drip-tiny-16-10x", list(photos.values()))


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory, tiny_llm_dir):
    return _build(tmp_path_factory.mktemp("vit"), tiny_llm_dir, "vit-tiny-16")


@pytest.fixture(scope="module")
def bench(tmp_path_factory, photos):
    """Images (in a sub-folder, PNG and JPEG) and 7 questions: 5 with an image (one with "<image>" in the text,
    ids int and str), 2 text-only."""
    root = tmp_path_factory.mktemp("bench")
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    for i, (name, im) in enumerate(photos.items()):
        im.save(images / "sub" / (f"{name}.jpg" if i % 2 else f"{name}.png"))
    qs = [
        {"question_id": 0, "image": "sub/chelsea.png", "text": "What animal is this?", "category": "conv"},
        {"question_id": "q1", "image": "sub/coffee.jpg", "text": "<image>\nDescribe the image.", "category": "detail"},
        {"question_id": 2, "text": "What is two plus two?", "category": "conv"},
        {"question_id": 3, "image": "sub/astronaut.png", "text": "Who is this?", "category": "complex"},
        {"question_id": 4, "image": "sub/rocket.jpg", "text": "What is happening?", "category": "complex"},
        {"question_id": 5, "text": "Name a colour.", "category": "conv"},
        {"question_id": 6, "image": "sub/camera.png", "text": "Is it black and white?", "category": "conv"},
    ]
    qfile = root / "questions.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in qs))
    return root, images, qfile, qs


def _args(model, images, qfile, answers, *extra):
    """LLaVA-Bench's preset (greedy, vicuna_v1), with an explicit short answer."""
    return ["--model-path", str(model), "--question-file", str(qfile), "--image-folder", str(images),
            "--answers-file", str(answers), "--benchmark", "llavabench", "--max-new-tokens", "6", *extra]


def _read(path):
    return read_jsonl(path)


@pytest.fixture(scope="module")
def full_run(drip10_dir, bench, tmp_path_factory):
    root, images, qfile, qs = bench
    out = tmp_path_factory.mktemp("full") / "answers.jsonl"
    result = generate.main(_args(drip10_dir, images, qfile, out))
    assert result["answered"] == len(qs) and not result["failed"]
    return out


# ---------------------------------------------------------------------------------------------- generate

def test_answers_file_format_and_metadata(full_run, bench, drip10_dir):
    _, _, _, qs = bench
    recs = _read(full_run)
    assert [r["question_id"] for r in recs] == [q["question_id"] for q in qs]  # ids kept as given (int / str)
    for q, r in zip(qs, recs):
        assert set(r) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert r["prompt"] == q["text"] and r["model_id"] == Path(drip10_dir).name and r["text"]
        meta = r["metadata"]
        assert meta["prefill_ms"] > 0 and meta["new_tokens"] == 6 and meta["finish_reason"] == "length"
        # the settings used: the preset's, except the explicit --max-new-tokens
        assert {k: meta[k] for k in ("benchmark", "conv_mode", "temperature", "top_p", "num_beams",
                                     "max_new_tokens")} == {"benchmark": "llavabench", "conv_mode": "vicuna_v1",
                                                            "temperature": 0.0, "top_p": None, "num_beams": 1,
                                                            "max_new_tokens": 6}
        if "image" in q:
            assert 1 <= meta["visual_tokens"] <= 20  # 64 patches, calibrated to ~10x
        else:
            assert meta["visual_tokens"] == 0
    assert len({r["answer_id"] for r in recs}) == len(recs)


def test_chunks_merge_to_the_unchunked_answers(full_run, drip10_dir, bench, tmp_path):
    _, images, qfile, qs = bench
    chunks = []
    for k in range(2):
        out = tmp_path / f"2_{k}.jsonl"
        generate.main(_args(drip10_dir, images, qfile, out, "--num-chunks", "2", "--chunk-idx", str(k)))
        chunks.append(_read(out))
    assert [len(c) for c in chunks] == [4, 3]  # contiguous, ceil(7 / 2) first (LLaVA's get_chunk)
    merged = chunks[0] + chunks[1]
    full = _read(full_run)
    assert [r["question_id"] for r in merged] == [r["question_id"] for r in full]
    assert [r["text"] for r in merged] == [r["text"] for r in full]
    assert [r["metadata"]["visual_tokens"] for r in merged] == [r["metadata"]["visual_tokens"] for r in full]
    # a chunk past the end (more chunks than questions) still creates its (empty) file, without loading a model
    empty = tmp_path / "10_9.jsonl"
    res = generate.main(_args(tmp_path / "no-model-needed", images, qfile, empty, "--num-chunks", "10",
                              "--chunk-idx", "9"))
    assert empty.is_file() and empty.read_text() == "" and res["answered"] == 0


def test_resume_after_deleting_lines_and_a_torn_write(full_run, drip10_dir, bench, tmp_path):
    _, images, qfile, qs = bench
    full = _read(full_run)
    out = tmp_path / "answers.jsonl"
    lines = full_run.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:4]) + lines[4][:25])  # last 3 answers gone, the 5th cut mid-write
    assert load_answered(out) == {"0", "q1", "2", "3"} and out.read_text() == "".join(lines[:4])
    out.write_text(out.read_text() + lines[4][:25])
    res = generate.main(_args(drip10_dir, images, qfile, out))
    assert res["answered"] == 3 and res["skipped_done"] == 4
    again = _read(out)
    assert [r["question_id"] for r in again] == [r["question_id"] for r in full]
    assert [r["text"] for r in again] == [r["text"] for r in full]
    assert [r["answer_id"] for r in again[:4]] == [r["answer_id"] for r in full[:4]]  # old lines untouched
    before = out.read_text()
    assert generate.main(_args(drip10_dir, images, qfile, out))["answered"] == 0 and out.read_text() == before
    # a complete last record without its newline is kept (and terminated), not re-asked
    out.write_text(before.rstrip("\n"))
    assert load_answered(out) == {str(q["question_id"]) for q in qs} and out.read_text() == before
    # a broken line in the middle is not silently dropped
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "{not json\n" + lines[1])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a valid answer line"):
        load_answered(bad)


def test_missing_image_is_skipped_counted_and_retried(drip10_dir, bench, tmp_path):
    root, images, qfile, qs = bench
    q2 = tmp_path / "q.jsonl"
    q2.write_text(json.dumps({"question_id": "a", "image": "sub/none.png", "text": "hi"}) + "\n"
                  + json.dumps({"question_id": "b", "text": "hello"}) + "\n")
    out = tmp_path / "a.jsonl"
    res = generate.main(_args(drip10_dir, images, q2, out))
    assert res["failed"] == ["a"] and res["answered"] == 1 and [r["question_id"] for r in _read(out)] == ["b"]
    dup = tmp_path / "dup.jsonl"
    dup.write_text(json.dumps({"question_id": 1, "text": "x"}) + "\n" + json.dumps({"question_id": "1", "text": "y"}))
    with pytest.raises(ValueError, match="question_id '1' appears twice"):
        generate.main(_args(drip10_dir, images, dup, tmp_path / "d.jsonl"))


def test_batched_answers_equal_batch_1(full_run, drip10_dir, bench, tmp_path, capsys):
    """--batch-size 3 (left-padded batches mixing images, text-only questions and a missing image): the same
    greedy answers as batch 1, in question order, the batch size recorded, answers/s reported."""
    root, images, qfile, qs = bench
    mixed = qs[:2] + [{"question_id": "gone", "image": "sub/none.png", "text": "hi"}] + qs[2:]
    q2 = tmp_path / "q.jsonl"
    q2.write_text("".join(json.dumps(q) + "\n" for q in mixed))
    out = tmp_path / "batched.jsonl"
    res = generate.main(_args(drip10_dir, images, q2, out, "--batch-size", "3"))
    assert res["failed"] == ["gone"] and res["answered"] == len(qs) and res["answers_per_s"] > 0
    assert "answers/s (batch size 3)" in capsys.readouterr().err
    one, batched = _read(full_run), _read(out)
    assert [r["question_id"] for r in batched] == [q["question_id"] for q in qs]
    for a, b in zip(one, batched):
        assert (a["text"], a["metadata"]["visual_tokens"], a["metadata"]["new_tokens"]) == \
               (b["text"], b["metadata"]["visual_tokens"], b["metadata"]["new_tokens"])
        assert "batch_size" not in a["metadata"] and b["metadata"]["batch_size"] in (2, 3)
    with pytest.raises(SystemExit):
        generate.parse_args(_args(drip10_dir, images, q2, out, "--batch-size", "0"))


def test_generation_settings_presets_and_explicit_flags():
    """--benchmark takes LLaVA's eval-script settings, no preset takes model_vqa.py's defaults (1024 new tokens, not
    128), and an explicit flag wins over either."""
    base = ["--model-path", "m", "--question-file", "q", "--answers-file", "a"]
    keys = ("temperature", "top_p", "num_beams", "max_new_tokens", "conv_mode")
    upstream = (0.0, None, 1, 1024, "vicuna_v1")  # scripts/v1_5/eval/{llavabench,sqa}.sh
    for bench in ("llavabench", "scienceqa"):
        args = generate.parse_args([*base, "--benchmark", bench])
        assert tuple(getattr(args, k) for k in keys) == upstream and args.explicit == []
    args = generate.parse_args(base)
    assert tuple(getattr(args, k) for k in keys) == (0.2, None, 1, 1024, None) and args.benchmark is None
    args = generate.parse_args([*base, "--benchmark", "scienceqa", "--max-new-tokens", "8", "--conv-mode",
                                "chat_template", "--temperature", "0.7", "--top_p", "0.9", "--num_beams", "2"])
    assert tuple(getattr(args, k) for k in keys) == (0.7, 0.9, 2, 8, "chat_template")
    assert args.explicit == sorted(keys)


def test_benchmark_template_differing_from_the_checkpoints_is_flagged(drip10_dir, tmp_path, caplog):
    """A checkpoint trained with another template gets LLaVA's vicuna_v1 under --benchmark (recorded), with a
    warning naming its own; --conv-mode picks the checkpoint's."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(drip10_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "conv_mode": "chat_template"}))
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"question_id": 1, "text": "Name a colour."}) + "\n")
    base = ["--model-path", str(model), "--question-file", str(qfile), "--benchmark", "scienceqa",
            "--max-new-tokens", "2"]
    with caplog.at_level("WARNING", logger="drip_llava.eval.generate"):
        generate.main([*base, "--answers-file", str(tmp_path / "a.jsonl")])
    assert "records training with chat_template: pass --conv-mode chat_template" in caplog.text
    assert _read(tmp_path / "a.jsonl")[0]["metadata"]["conv_mode"] == "vicuna_v1"
    caplog.clear()
    with caplog.at_level("WARNING", logger="drip_llava.eval.generate"):
        generate.main([*base, "--conv-mode", "chat_template", "--answers-file", str(tmp_path / "b.jsonl")])
    assert "records training with" not in caplog.text
    assert _read(tmp_path / "b.jsonl")[0]["metadata"]["conv_mode"] == "chat_template"


def test_get_chunk_matches_llava():
    def llava_get_chunk(lst, n, k):  # LLaVA's model_vqa.py
        import math

        chunk_size = math.ceil(len(lst) / n)
        return [lst[i:i + chunk_size] for i in range(0, len(lst), chunk_size)][k]

    for total in range(0, 23):
        items = list(range(total))
        for n in range(1, 9):
            chunks = [get_chunk(items, n, k) for k in range(n)]
            assert sum(chunks, []) == items
            for k in range(n):
                try:
                    ref = llava_get_chunk(items, n, k)
                except (IndexError, ValueError):  # LLaVA fails on chunks past the end; ours are empty
                    ref = []
                assert chunks[k] == ref
    with pytest.raises(ValueError, match="chunk-idx"):
        get_chunk([1, 2], 2, 2)


FAKE_PYTHON = """#!/usr/bin/env bash
# records each call's arguments (one a line); a generate call creates the answers file it would write
printf '%s\\n' "$@" > "$CALLS/$(date +%s%N)-$$"
if [[ "$2" == drip_llava.eval.generate ]]; then
    prev=""; for a in "$@"; do if [[ "$prev" == --answers-file ]]; then : > "$a"; fi; prev="$a"; done
fi
"""


def _run_eval_script(name, tmp_path, **env_vars):
    """Run eval/NAME with PYTHON = a stand-in that records its calls; returns the parsed generate calls."""
    import os
    import subprocess

    calls, data = tmp_path / "calls", tmp_path / "data"
    calls.mkdir(parents=True)
    data.mkdir()
    for f in ("questions.jsonl", "answers_gpt4.jsonl", "context.jsonl", "rule.json"):  # llavabench.sh checks these
        (data / f).write_text("")
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    overrides = ("CONV_MODE", "TEMPERATURE", "MAX_NEW_TOKENS", "TOP_P", "NUM_BEAMS", "NUM_CHUNKS", "MODEL_BASE")
    env = {k: v for k, v in os.environ.items() if k not in overrides}
    env.update(PYTHON=str(fake), CALLS=str(calls), MODEL_PATH="m", JUDGE_MODEL="j", DATA_DIR=str(data),
               GPULIST="0,1", **env_vars)
    subprocess.run(["bash", str(REPO / "eval" / name)], env=env, check=True, cwd=tmp_path, capture_output=True)
    argvs = [f.read_text().splitlines() for f in sorted(calls.iterdir())]
    return [generate.parse_args(a[2:]) for a in argvs if a[:2] == ["-m", "drip_llava.eval.generate"]]


@pytest.mark.parametrize("script,benchmark", [("scienceqa.sh", "scienceqa"), ("llavabench.sh", "llavabench")])
def test_eval_scripts_generate_with_llavas_settings(script, benchmark, tmp_path):
    """eval/*.sh answer in GPULIST's chunks with LLaVA's settings for their benchmark; the override variables
    reach generate as explicit flags."""
    keys = ("temperature", "top_p", "num_beams", "max_new_tokens", "conv_mode")
    runs = _run_eval_script(script, tmp_path / "default")
    assert sorted(a.chunk_idx for a in runs) == [0, 1] and {a.num_chunks for a in runs} == {2}
    for a in runs:
        assert a.benchmark == benchmark and a.explicit == [] and a.model_path == "m"
        assert tuple(getattr(a, k) for k in keys) == (0.0, None, 1, 1024, "vicuna_v1")
    runs = _run_eval_script(script, tmp_path / "override", CONV_MODE="chat_template", MAX_NEW_TOKENS="8",
                            TEMPERATURE="0.5", TOP_P="0.9", NUM_BEAMS="3")
    for a in runs:
        assert tuple(getattr(a, k) for k in keys) == (0.5, 0.9, 3, 8, "chat_template")
    # both benchmark scripts answer through the one chunked-generation helper
    text = (REPO / "eval" / script).read_text()
    assert 'source "$(dirname "${BASH_SOURCE[0]}")/generate_chunks.sh"' in text and "generate_chunks " in text


def test_scienceqa_end_to_end_with_generate(drip10_dir, tmp_path, photos):
    """convert -> generate in 2 chunks -> merge -> score, as eval/scienceqa.sh does (in-process)."""
    from drip_llava.eval import scienceqa

    base = tmp_path / "scienceqa"
    problems = {
        "11": {"question": "Which animal is shown?", "choices": ["cat", "dog"], "answer": 0, "hint": "",
               "image": "image.png", "subject": "natural science", "grade": "grade2", "split": "test"},
        "12": {"question": "What is 2+2?", "choices": ["3", "4"], "answer": 1, "hint": "", "image": None,
               "subject": "natural science", "grade": "grade2", "split": "test"},
        "13": {"question": "Which drink?", "choices": ["tea", "coffee", "milk"], "answer": 1, "hint": "A cup.",
               "image": "image.png", "subject": "social science", "grade": "grade8", "split": "test"},
    }
    (base / "images" / "test" / "11").mkdir(parents=True)
    (base / "images" / "test" / "13").mkdir(parents=True)
    photos["chelsea"].save(base / "images" / "test" / "11" / "image.png")
    photos["coffee"].save(base / "images" / "test" / "13" / "image.png")
    (base / "problems.json").write_text(json.dumps(problems))
    (base / "pid_splits.json").write_text(json.dumps({"test": ["11", "12", "13"]}))
    qfile = base / "llava_test_CQM-A.jsonl"
    assert scienceqa.main(["convert", "--base-dir", str(base), "--split", "test", "--prompt-format", "CQM-A",
                           "--out", str(qfile)]) == 0
    merged = base / "merge.jsonl"
    parts = []
    for k in range(2):
        out = base / f"2_{k}.jsonl"
        generate.main(_args(drip10_dir, base / "images" / "test", qfile, out, "--num-chunks", "2",
                            "--chunk-idx", str(k)))
        parts.append(out.read_text())
    merged.write_text("".join(parts))
    visual = {str(r["question_id"]): r["metadata"]["visual_tokens"] for r in _read(merged)}
    assert visual["12"] == 0 and visual["11"] > 0 and visual["13"] > 0
    result = base / "result.json"
    assert scienceqa.main(["score", "--base-dir", str(base), "--split", "test", "--result-file", str(merged),
                           "--output-file", str(base / "out.jsonl"), "--output-result", str(result)]) == 0
    summary = json.loads(result.read_text())
    assert 0 <= summary["acc"] <= 100 and len(_read(base / "out.jsonl")) == 3


# ---------------------------------------------------------------------------------------------- efficiency

def test_efficiency_reports_fewer_tokens_and_macs_for_drip(vit_dir, drip10_dir, bench, tmp_path, capsys):
    _, images, _, _ = bench
    out = tmp_path / "eff.json"
    vit, drip = efficiency.main(["--model-path", str(vit_dir), "--model-path-b", str(drip10_dir),
                                 "--images", str(images), "--max-images", "4", "--json", str(out)])
    assert vit["tower"] == "ViT" and vit["visual_tokens_min"] == vit["visual_tokens_max"] == 64
    assert drip["tower"] == "DRIP" and drip["compression"] == 10.0
    assert drip["visual_tokens_max"] < 64 and drip["visual_tokens_mean"] < vit["visual_tokens_mean"] / 3
    assert drip["vision_gmacs_mean"] < vit["vision_gmacs_mean"]
    assert drip["prefill_gmacs_mean"] < vit["prefill_gmacs_mean"]
    assert drip["prompt_tokens_mean"] < vit["prompt_tokens_mean"]
    for r in (vit, drip):
        assert r["images"] == 4 and len(r["per_image"]) == 4 and r["ttft_ms_median"] > 0
        # the prompt is the text plus each image's own visual tokens
        texts = {x["prompt_tokens"] - x["visual_tokens"] for x in r["per_image"]}
        assert len(texts) == 1
    report = json.loads(out.read_text())
    assert [m["model_path"] for m in report["models"]] == [str(vit_dir), str(drip10_dir)]
    table = capsys.readouterr().out
    assert "visual tokens / image (mean)" in table and "B/A" in table and "DRIP 10x" in table


def test_prefill_macs_formula_matches_flop_counter(tiny_llm_dir):
    """The analytic LLM prefill count equals torch's FlopCounterMode on a real forward (math SDPA, last-row
    logits like generate's prefill)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(tiny_llm_dir)).eval()
    n = 37
    ids = torch.randint(0, 1000, (1, n))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, logits_to_keep=1)
    counted = counter.get_total_flops() / 2
    assert efficiency.llm_prefill_macs(model.config, n) == pytest.approx(counted, rel=0.01)


def test_efficiency_image_sources(tmp_path):
    items = efficiency.list_images("examples", 2)
    assert len(items) == 2 and all(hasattr(im, "size") for _, im in items)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        efficiency.list_images(str(tmp_path / "missing"), None)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no image files"):
        efficiency.list_images(str(tmp_path), None)
