"""Answer a LLaVA question file (one chunk of it), resumable: LLaVA's answers jsonl, plus timings.

    python -m drip_llava.eval.generate --model-path M [--model-base B] --question-file q.jsonl \\
        --image-folder imgs/ --answers-file answers/4_0.jsonl --num-chunks 4 --chunk-idx 0 \\
        --benchmark llavabench

Generation settings: `--benchmark llavabench|scienceqa` takes LLaVA's for that benchmark (its v1.5 eval scripts:
temperature 0, 1024 new tokens, one beam, conv mode vicuna_v1); without it, LLaVA model_vqa.py's defaults
(temperature 0.2, 1024 new tokens, one beam) and the checkpoint's template. Explicit flags win over both.

Questions: jsonl {question_id, text, image (optional: text-only questions work), ...}. A "<image>" in the text is
moved to the front of the prompt, as in training. Answers: {question_id, prompt, text, answer_id, model_id,
metadata: {visual_tokens, prefill_ms, vision_ms, new_tokens, finish_reason, conv_mode, benchmark, max_new_tokens,
temperature, top_p, num_beams}}, one line per question, flushed as it is written.

Chunks are contiguous slices of ceil(N / K) questions (LLaVA's get_chunk); an out-of-range chunk is empty (LLaVA
raised IndexError). Rerunning resumes: question_ids already in the answers file are skipped, new answers are
appended, and a torn last line (a killed run) is cut off first. The answers file always exists afterwards,
even for an empty chunk. A question whose image is missing or unreadable is skipped and counted; the command
then exits 1 (so eval/*.sh stop) and a rerun retries only those.

`--batch-size N` answers N questions per `model.generate` (left padding, each image with its own visual token
count): under greedy decoding the answers equal batch 1's. The seed is set per batch, so sampled answers depend on
the batch composition (and a resumed run's batches); the metadata then holds the batch's timings and `batch_size`.
At the end the run's throughput (answers/s, visual tokens/s, generated tokens/s, over the answering loop including
image loading) is printed and logged as one `stats {json}` line; `python -m drip_llava.eval.chat_latency` compares
batch sizes on the same questions.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Sequence

from drip_llava.eval import qid_key
from drip_llava.jsonl import read_jsonl

logger = logging.getLogger(__name__)


def split_list(items: Sequence, n: int) -> list[list]:
    """LLaVA's split_list: contiguous chunks of ceil(len / n) items (fewer than n chunks when len < n)."""
    if n < 1:
        raise ValueError(f"--num-chunks must be >= 1, got {n}")
    size = math.ceil(len(items) / n) if items else 1
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def get_chunk(items: Sequence, n: int, k: int) -> list:
    """Chunk k of n (empty when k is past the last non-empty chunk)."""
    if not 0 <= k < n:
        raise ValueError(f"--chunk-idx must be in 0..{n - 1}, got {k}")
    chunks = split_list(items, n)
    return chunks[k] if k < len(chunks) else []


def load_answered(path: Path) -> set[str]:
    """question_ids already answered in `path`. A last line that is not valid JSON (the run was killed while
    writing it) is cut off the file; an invalid line elsewhere is an error naming the line."""
    if not path.is_file():
        return set()
    data = path.read_bytes()
    lines = data.split(b"\n")
    answered, offset = set(), 0
    last = max((i for i, raw in enumerate(lines) if raw.strip()), default=-1)
    for i, raw in enumerate(lines):
        is_last = i == last
        if raw.strip():
            try:
                rec = json.loads(raw)
                if not isinstance(rec, dict) or "question_id" not in rec:
                    raise ValueError("not an answer record")
            except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
                if is_last:
                    logger.warning("%s: dropping a torn last line (%d bytes) from an interrupted run", path, len(raw))
                    with open(path, "r+b") as f:
                        f.truncate(offset)
                    break
                raise ValueError(f"{path}:{i + 1}: not a valid answer line ({e}); fix or delete the file") from e
            answered.add(qid_key(rec["question_id"]))
        offset += len(raw) + 1
    if data and not data.endswith(b"\n") and path.stat().st_size == len(data):
        with open(path, "ab") as f:  # a complete last record without its newline: terminate it
            f.write(b"\n")
    return answered


def load_questions(path: str) -> list[dict]:
    questions = read_jsonl(path)
    seen: set[str] = set()
    for i, q in enumerate(questions, 1):
        if "question_id" not in q or "text" not in q:
            raise ValueError(f"{path}: question {i} lacks 'question_id' or 'text': {str(q)[:200]}")
        key = qid_key(q["question_id"])
        if key in seen:
            raise ValueError(f"{path}: question_id {key!r} appears twice; answers are keyed by question_id")
        seen.add(key)
    return questions


# LLaVA's generation settings per benchmark: scripts/v1_5/eval/llavabench.sh (model_vqa.py) and sqa.sh
# (model_vqa_science.py) pass --temperature 0 --conv-mode vicuna_v1; both generators fix max_new_tokens=1024 and
# one beam (model_vqa.py's top_p defaults to None; model_vqa_science.py passes none).
BENCHMARK_PRESETS = {
    name: {"temperature": 0.0, "top_p": None, "num_beams": 1, "max_new_tokens": 1024, "conv_mode": "vicuna_v1"}
    for name in ("llavabench", "scienceqa")
}
# Without --benchmark: model_vqa.py's argparse defaults (and its fixed 1024 new tokens); the checkpoint's template.
GENERATION_DEFAULTS = {"temperature": 0.2, "top_p": None, "num_beams": 1, "max_new_tokens": 1024, "conv_mode": None}


def parse_args(argv=None) -> argparse.Namespace:
    """Parse, then fill each generation setting not given on the command line from --benchmark's preset, else from
    GENERATION_DEFAULTS; `args.explicit` names the settings that were given."""
    p = argparse.ArgumentParser(prog="python -m drip_llava.eval.generate", description=__doc__.split("\n")[0])
    p.add_argument("--model-path", required=True)
    p.add_argument("--model-base", default=None)
    p.add_argument("--question-file", required=True)
    p.add_argument("--image-folder", default="", help="folder the questions' 'image' paths are relative to")
    p.add_argument("--answers-file", required=True)
    p.add_argument("--benchmark", default=None, choices=sorted(BENCHMARK_PRESETS),
                   help="LLaVA's generation settings for this benchmark (explicit flags still win)")
    p.add_argument("--conv-mode", default=None,
                   help="template (default: --benchmark's, else the checkpoint's, else vicuna_v1)")
    p.add_argument("--num-chunks", type=int, default=1)
    p.add_argument("--chunk-idx", type=int, default=0)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 0.2; --benchmark: 0)")
    p.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=None)
    p.add_argument("--num_beams", "--num-beams", dest="num_beams", type=int, default=None, help="default 1")
    p.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=None,
                   help="default 1024 (LLaVA's)")
    p.add_argument("--load-8bit", action="store_true")
    p.add_argument("--load-4bit", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="weights dtype (auto: bf16/fp16 on GPU, fp32 on CPU; bfloat16 is fast on CPUs with AMX)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (each question reseeds: resumable)")
    p.add_argument("--model-id", default=None, help="model_id written in the answers (default: model folder name)")
    p.add_argument("--max-image-pixels", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=1,
                   help="questions per generate call (left-padded; greedy answers equal batch 1's)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    fill = BENCHMARK_PRESETS[args.benchmark] if args.benchmark else GENERATION_DEFAULTS
    args.explicit = sorted(k for k in fill if getattr(args, k) is not None)
    for key, value in fill.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> dict:
    """Returns {answered, skipped_done, failed: [question_ids], answers_file, and when something was to do:
    answers_per_s, visual_tokens_per_s, new_tokens_per_s, seconds, batch_size}; exits 1 when some failed."""
    args = parse_args(argv)
    import torch
    from tqdm import tqdm

    from drip_llava.data.conversation import get_template
    from drip_llava.inference import (
        DEFAULT_MAX_PIXELS,
        ChatEngine,
        GenerationSettings,
        ImageRejected,
        configure_pil,
        default_conv_mode,
    )

    questions = load_questions(args.question_file)
    chunk = get_chunk(questions, args.num_chunks, args.chunk_idx)
    out_path = Path(args.answers_file)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    answered = load_answered(out_path)
    out_path.touch()  # exists even for an empty chunk (the merge step cats every chunk file)
    todo = [q for q in chunk if qid_key(q["question_id"]) not in answered]
    result = {"answered": 0, "skipped_done": len(chunk) - len(todo), "failed": [], "answers_file": str(out_path)}
    print(f"chunk {args.chunk_idx}/{args.num_chunks}: {len(chunk)} questions, {result['skipped_done']} already "
          f"answered, {len(todo)} to do -> {out_path}", file=sys.stderr, flush=True)
    if not todo:
        return result

    max_pixels = args.max_image_pixels or DEFAULT_MAX_PIXELS
    configure_pil(max_pixels)
    engine = ChatEngine.from_pretrained(args.model_path, model_base=args.model_base, load_8bit=args.load_8bit,
                                        load_4bit=args.load_4bit, device=args.device, conv_mode=args.conv_mode,
                                        max_image_pixels=max_pixels,
                                        torch_dtype=None if args.dtype == "auto" else getattr(torch, args.dtype))
    trained_with = default_conv_mode(engine.inner.config)
    if "conv_mode" not in args.explicit and get_template(trained_with) is not engine.template:
        logger.warning("--benchmark %s prompts with LLaVA's %s, but %s records training with %s: pass --conv-mode %s "
                       "to evaluate in the model's own template", args.benchmark, engine.conv_mode, args.model_path,
                       trained_with, trained_with)
    model_id = args.model_id or engine.model_name
    settings = GenerationSettings(temperature=args.temperature, top_p=args.top_p,
                                  max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    recorded = {"benchmark": args.benchmark, "max_new_tokens": settings.max_new_tokens,
                "temperature": settings.temperature, "top_p": settings.top_p, "num_beams": settings.num_beams}
    folder = Path(args.image_folder) if args.image_folder else Path(".")
    def record(q, reply, batch_size):
        meta = {"visual_tokens": reply.visual_tokens,
                "prefill_ms": None if reply.prefill_ms is None else round(reply.prefill_ms, 2),
                "vision_ms": round(reply.vision_ms, 2), "new_tokens": reply.new_tokens,
                "finish_reason": reply.finish_reason, "conv_mode": engine.conv_mode, **recorded}
        if batch_size > 1:
            meta["batch_size"] = batch_size
        return {"question_id": q["question_id"], "prompt": q["text"], "text": reply.text,
                "answer_id": uuid.uuid4().hex, "model_id": model_id, "metadata": meta}

    visual_tokens = new_tokens = 0
    start = time.perf_counter()
    with open(out_path, "a", encoding="utf-8") as f, tqdm(total=len(todo), desc=f"answers {out_path.name}",
                                                            dynamic_ncols=True) as bar:
        for b in range(0, len(todo), args.batch_size):
            batch = []
            for q in todo[b:b + args.batch_size]:
                image = None
                if q.get("image"):
                    try:
                        image, _ = engine.load_image(folder / q["image"], name=str(folder / q["image"]))
                    except ImageRejected as e:
                        logger.error("question %s skipped: %s", q["question_id"], e)
                        result["failed"].append(q["question_id"])
                        bar.update(1)
                        continue
                batch.append((q, image))
            if not batch:
                continue
            torch.manual_seed(args.seed)
            if args.batch_size == 1:
                (q, image), = batch
                replies = [engine.generate([{"role": "user", "content": q["text"]}], image, settings)]
            else:
                replies = engine.generate_batch([([{"role": "user", "content": q["text"]}], image)
                                                 for q, image in batch], settings)
            for (q, _), reply in zip(batch, replies):
                f.write(json.dumps(record(q, reply, len(batch)), ensure_ascii=False) + "\n")
                visual_tokens += reply.visual_tokens
                new_tokens += reply.new_tokens
            f.flush()
            os.fsync(f.fileno())
            result["answered"] += len(batch)
            bar.update(len(batch))
    elapsed = time.perf_counter() - start

    def rate(n):
        return n / elapsed if elapsed > 0 else 0.0

    stats = {"answered": result["answered"], "seconds": round(elapsed, 3), "batch_size": args.batch_size,
             "answers_per_s": rate(result["answered"]), "visual_tokens_per_s": rate(visual_tokens),
             "new_tokens_per_s": rate(new_tokens)}
    result.update(stats)
    print(f"{result['answered']} answers in {elapsed:.1f} s: {stats['answers_per_s']:.3f} answers/s "
          f"(batch size {args.batch_size}); {stats['visual_tokens_per_s']:.1f} visual tokens/s, "
          f"{stats['new_tokens_per_s']:.1f} generated tokens/s", file=sys.stderr, flush=True)
    logger.info("stats %s", json.dumps(stats))
    if result["failed"]:
        print(f"{len(result['failed'])} questions skipped (unreadable images, see above): "
              f"{result['failed'][:20]}; rerun to retry them", file=sys.stderr, flush=True)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(1 if main()["failed"] else 0)
