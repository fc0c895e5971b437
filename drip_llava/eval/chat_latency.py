"""What a chat's follow-up questions cost: time to first token for questions 2..5 of one conversation, three ways
side by side through the same ChatEngine, and eval.generate's answers/s at several batch sizes.

    python -m drip_llava.eval.chat_latency [--model-path M [--model-base B]] [--repeats 3] [--json out.json]

Chat (one image, five questions, greedy; medians over --repeats conversations after one warm-up, the three ways
interleaved so they share the machine's load):
  re-encode      `ChatEngine(cache_images=False, reuse_kv=False)`: the tower runs for every question and the
                 whole prompt is prefilled
  image cache    `cache_images=True`: the visual tokens describe_image made are spliced in again
  image + KV     `cache_images=True, reuse_kv=True`: the session's key/values are reused, only the part of the
                 prompt after the previous prompt + answer (the new question) is prefilled
The answers are checked to be the same token ids in the three ways.

Batched eval (--batch-sizes, default 1,4,8): `python -m drip_llava.eval.generate --batch-size N` on the same
--batch-questions questions (the offline example photos, greedy), answers/s and visual tokens/s as it reports them,
and whether the answers equal batch 1's.

Without --model-path the model is random, built from configs: a DRIP tower preset (--tower, default
drip-tiny-16-4x) + mlp2x_gelu + a Llama of --layers x --hidden (default 8 x 576, SmolLM2-135M's width), with a
whitespace word tokenizer of --vocab words (default 49152, SmolLM2's): a random model's answers are arbitrary
tokens, and with a word tokenizer they read back as the same tokens, as a trained model's answers mostly do, so
the KV reuse measured is the one a real conversation gets. Timings are of this machine at this moment; the
printout names the threads and device.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

QUESTIONS = ("What is in this image?", "What colour is the main object?", "Where in the picture is it?",
             "What is in the background?", "Describe the scene in one sentence.")
WAYS = (("re-encode", {"cache_images": False, "reuse_kv": False}),
        ("image cache", {"cache_images": True, "reuse_kv": False}),
        ("image + KV", {"cache_images": True, "reuse_kv": True}))
SPECIAL_TOKENS = ("<unk>", "</s>")


def word_tokenizer(texts: list[str], vocab_size: int):
    """A fast whitespace-split word-level tokenizer: the words of `texts` (the rendered prompts) + filler words up to
    `vocab_size`, "<unk>" and the EOS "</s>" (also padding). Decoding joins words with spaces and only EOS is a
    special token (skipped when decoding, written back by the template), so any token sequence decodes to text
    that encodes back to the same tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = set()
    for text in texts:
        for special in SPECIAL_TOKENS:
            text = text.replace(special, " ")
        words.update(text.split())
    vocab = list(SPECIAL_TOKENS) + sorted(words)
    vocab += [f"w{i}" for i in range(max(0, vocab_size - len(vocab)))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>")


def build_random_model(out_dir: Path, tower: str, layers: int, hidden: int, heads: int, kv_heads: int,
                       vocab: int, context: int, conv_mode: str, seed: int = 0) -> Path:
    """A random DRIP-LLaVA checkpoint folder (config + safetensors + tokenizer) from configs only."""
    import torch

    from drip_llava.data.conversation import get_template, place_image
    from drip_llava.model import DripLlavaConfig, DripLlavaForCausalLM

    template = get_template(conv_mode)
    specials_only = word_tokenizer([], 0)  # what rendering asks of a tokenizer (its special tokens)
    texts = []
    for k in range(len(QUESTIONS)):  # every prompt the bench renders: its words get their own tokens
        msgs = []
        for q in QUESTIONS[:k + 1]:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": "x"}]
        texts.append(template.render(place_image(msgs, True), specials_only).text)
    tok = word_tokenizer(texts, vocab)
    config = DripLlavaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 8 / 3),
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                             max_position_embeddings=context, tie_word_embeddings=True,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, conv_mode=conv_mode)
    torch.manual_seed(seed)
    model = DripLlavaForCausalLM(config)
    model.initialize_vision_modules(tower, "mlp2x_gelu", select_layer=-2)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def run_conversation(engine, image, settings) -> list:
    """One five-question conversation about `image` through `engine.chat`; the final Reply of each question."""
    from drip_llava.inference import ChatSession

    session = ChatSession()
    session.set_image(image, engine.describe_image(image, overlay=False), "bench")
    replies = []
    for q in QUESTIONS:
        session.add_question(q)
        replies.append(list(engine.chat(session, settings))[-1])
    return replies


def measure_chat(engine, image, max_new_tokens: int, repeats: int) -> dict:
    """Median TTFT (and its vision / prefill parts) per question and way, the prompt and cached token counts, and
    whether the three ways answered with the same tokens."""
    from tqdm import tqdm

    from drip_llava.inference import GenerationSettings

    settings = GenerationSettings(temperature=0, max_new_tokens=max_new_tokens)
    runs: dict[str, list[list]] = {name: [] for name, _ in WAYS}
    saved = engine.cache_images, engine.reuse_kv
    try:
        for r in tqdm(range(repeats + 1), desc="conversations (first: warm-up)", dynamic_ncols=True):
            for name, options in WAYS:
                engine.cache_images, engine.reuse_kv = options["cache_images"], options["reuse_kv"]
                replies = run_conversation(engine, image, settings)
                if r:
                    runs[name].append(replies)
    finally:
        engine.cache_images, engine.reuse_kv = saved
    answers = {name: [r.token_ids for r in runs[name][0]] for name, _ in WAYS}
    rows = []
    for k in range(len(QUESTIONS)):
        row = {"question": k + 1}
        for name, _ in WAYS:
            replies = [conv[k] for conv in runs[name]]
            row[name] = {key: statistics.median(getattr(rep, key) for rep in replies)
                         for key in ("ttft_ms", "vision_ms", "prefill_ms")}
            row[name].update(prompt_tokens=replies[0].prompt_tokens, cached_tokens=replies[0].cached_tokens,
                             new_tokens=replies[0].new_tokens)
        rows.append(row)
    later = rows[1:]
    summary = {name: statistics.mean(row[name]["ttft_ms"] for row in later) for name, _ in WAYS}
    return {"rows": rows, "mean_ttft_ms_q2_5": summary,
            "same_answers": all(a == answers[WAYS[0][0]] for a in answers.values()),
            "visual_tokens": runs[WAYS[0][0]][0][0].visual_tokens}


def format_chat(result: dict) -> str:
    names = [name for name, _ in WAYS]
    head = (f"{'question':>8} {'prompt':>6} {'cached':>6} | " + " | ".join(f"{n + ' ms':>16}" for n in names)
            + f" | {'re-encode/KV':>12} {'image/KV':>9}")
    lines = [head, "-" * len(head)]
    for row in result["rows"]:
        kv = row[names[2]]
        ttft = [row[n]["ttft_ms"] for n in names]
        lines.append(f"{row['question']:>8} {kv['prompt_tokens']:>6} {kv['cached_tokens']:>6} | "
                     + " | ".join(f"{t:>16.1f}" for t in ttft)
                     + f" | {ttft[0] / ttft[2]:>11.2f}x {ttft[1] / ttft[2]:>8.2f}x")
    mean = result["mean_ttft_ms_q2_5"]
    lines.append(f"{'Q2-5':>8} {'':>6} {'':>6} | " + " | ".join(f"{mean[n]:>16.1f}" for n in names)
                 + f" | {mean[names[0]] / mean[names[2]]:>11.2f}x {mean[names[1]] / mean[names[2]]:>8.2f}x")
    lines.append("vision / prefill ms, Q2-5 means: " + "; ".join(
        f"{n}: {statistics.mean(r[n]['vision_ms'] for r in result['rows'][1:]):.1f} / "
        f"{statistics.mean(r[n]['prefill_ms'] for r in result['rows'][1:]):.1f}" for n in names))
    lines.append(f"same answers (token ids) in the three ways: {'yes' if result['same_answers'] else 'NO'}")
    return "\n".join(lines)


def measure_batches(model_path: str, model_base: Optional[str], batch_sizes: list[int], n_questions: int,
                    max_new_tokens: int, work: Path, device: Optional[str], dtype: str) -> list[dict]:
    """eval.generate over the same questions at each batch size: its stats, and whether its answers equal the
    first batch size's."""
    from drip_llava.eval import generate
    from drip_llava.vision.images import example_image, list_examples

    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    names = list_examples()
    for name in names:
        example_image(name).save(images / f"{name}.png")
    questions = [{"question_id": i, "image": f"{names[i % len(names)]}.png",
                  "text": QUESTIONS[i % len(QUESTIONS)]} for i in range(n_questions)]
    qfile = work / "questions.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    results, reference = [], None
    for bs in batch_sizes:
        answers = work / f"answers_bs{bs}.jsonl"
        answers.unlink(missing_ok=True)
        argv = ["--model-path", model_path, "--question-file", str(qfile), "--image-folder", str(images),
                "--answers-file", str(answers), "--batch-size", str(bs), "--temperature", "0",
                "--max-new-tokens", str(max_new_tokens), "--dtype", dtype]
        argv += ["--model-base", model_base] if model_base else []
        argv += ["--device", device] if device else []
        stats = generate.main(argv)
        texts = {a["question_id"]: a["text"] for a in map(json.loads, answers.read_text().splitlines())}
        reference = texts if reference is None else reference
        results.append({key: stats[key] for key in ("batch_size", "answered", "seconds", "answers_per_s",
                                                    "visual_tokens_per_s", "new_tokens_per_s")}
                       | {"same_answers_as_first": texts == reference})
    return results


def format_batches(results: list[dict]) -> str:
    base = results[0]["answers_per_s"]
    lines = [f"{'batch':>5} {'answers':>7} {'seconds':>8} {'answers/s':>10} {'visual tok/s':>12} {'speed-up':>8} "
             f"{'same answers':>12}"]
    for r in results:
        lines.append(f"{r['batch_size']:>5} {r['answered']:>7} {r['seconds']:>8.1f} {r['answers_per_s']:>10.3f} "
                     f"{r['visual_tokens_per_s']:>12.1f} {r['answers_per_s'] / base:>7.2f}x "
                     f"{'yes' if r['same_answers_as_first'] else 'NO':>12}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m drip_llava.eval.chat_latency", description=__doc__.split("\n")[0])
    p.add_argument("--model-path", default=None, help="a drip-llava folder (default: a random model from configs)")
    p.add_argument("--model-base", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--image", default="chelsea", help="an example photo name or an image file")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length cap (a random model uses all)")
    p.add_argument("--repeats", type=int, default=3, help="conversations per way after the warm-up")
    p.add_argument("--batch-sizes", default="1,4,8", help="eval.generate batch sizes; '' skips the batch part")
    p.add_argument("--batch-questions", type=int, default=16)
    p.add_argument("--batch-max-new-tokens", type=int, default=32)
    p.add_argument("--tower", default="drip-tiny-16-4x", help="random model: the tower preset")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--conv-mode", default="vicuna_v1", help="random model: its template")
    p.add_argument("--json", default=None, help="write every number here")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batch-sizes takes comma-separated integers, got {args.batch_sizes!r}")
    if any(b < 1 for b in args.batch_sizes):
        p.error("--batch-sizes must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    from drip_llava.eval.efficiency import list_images
    from drip_llava.inference import ChatEngine

    with tempfile.TemporaryDirectory(prefix="chat_latency_") as tmp:
        work = Path(tmp)
        model_path = args.model_path
        if model_path is None:
            model_path = str(build_random_model(work / "model", args.tower, args.layers, args.hidden, args.heads,
                                                args.kv_heads, args.vocab, args.context, args.conv_mode))
            described = (f"random {args.tower} + mlp2x_gelu + Llama {args.layers}x{args.hidden} "
                         f"(vocab {args.vocab}, word tokenizer)")
        else:
            described = model_path
        engine = ChatEngine.from_pretrained(model_path, model_base=args.model_base, device=args.device,
                                            torch_dtype=None if args.dtype == "auto" else getattr(torch, args.dtype))
        _, source = list_images(args.image, 1)[0]
        image, _ = engine.load_image(source)
        print(f"model: {described}; device {engine.device}, {torch.get_num_threads()} threads, "
              f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
        chat = measure_chat(engine, image, args.max_new_tokens, args.repeats)
        print(f"\ntime to first token (median of {args.repeats}), {chat['visual_tokens']} visual tokens, answers of "
              f"{args.max_new_tokens} tokens at most:")
        print(format_chat(chat), flush=True)
        result = {"model": described, "device": str(engine.device), "threads": torch.get_num_threads(),
                  "chat": chat}
        del engine
        if args.batch_sizes:
            batches = measure_batches(model_path, args.model_base, args.batch_sizes, args.batch_questions,
                                      args.batch_max_new_tokens, work / "batches", args.device, args.dtype)
            print(f"\neval.generate, {args.batch_questions} questions, greedy, {args.batch_max_new_tokens} new "
                  "tokens at most:")
            print(format_batches(batches), flush=True)
            result["batches"] = batches
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = main()
    ok = result["chat"]["same_answers"] and all(b["same_answers_as_first"] for b in result.get("batches", []))
    sys.exit(0 if ok else 1)
