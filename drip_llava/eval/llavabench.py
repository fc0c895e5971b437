"""LLaVA-Bench (COCO / In-the-Wild): LLM-judge review and LLaVA's relative score.

    python -m drip_llava.eval.llavabench review --questions questions.jsonl --answers ours.jsonl \
        --reference answers_gpt4.jsonl --context context.jsonl --rule rule.json \
        --judge-model NAME --judge-base-url URL --output review.jsonl
    python -m drip_llava.eval.llavabench summarize --review review.jsonl [--out summary.json]

The judge prompt and score parsing are LLaVA's. What differs, on purpose: files are paired by
question_id (LLaVA zips lines), each review is appended as soon as it is done and a rerun skips the
question_ids already reviewed, and a reply whose first line is not two scores is stored with
``"parse_error": true``. ``summarize`` prints LLaVA's summarize_gpt_review.py numbers first, under its layout
(``llava`` in the JSON: a failed parse averaged in as -1, -1), then the project's table, which excludes and counts
failed parses (``categories`` / ``overall``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from tqdm import tqdm

from drip_llava.eval import index_by_question_id, qid_key
from drip_llava.eval.judge import JudgeClient, JudgeError, JudgeFatalError
from drip_llava.jsonl import read_jsonl

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = "You are a helpful and precise assistant for checking the quality of the answer."
CATEGORY_ORDER = ("conv", "detail", "complex")
RULE_PREFIX = "llava_bench_"


# ---------------------------------------------------------------- prompt and parsing

def context_text(ctx: dict) -> str:
    """In-the-Wild context.jsonl has a 'caption' string; COCO's caps_boxes file has a 'captions'
    list plus 'instances' (category, bbox), which LLaVA appends after a blank line."""
    cap = ctx.get("caption", ctx.get("captions"))
    if cap is None:
        raise ValueError(f"context for image {ctx.get('image')!r} has neither 'caption' nor 'captions'")
    text = cap if isinstance(cap, str) else "\n".join(str(c) for c in cap)
    instances = ctx.get("instances")
    if instances:
        boxes = "\n".join(f"{inst['category']}: {inst['bbox']}" for inst in instances)
        text = f"{text}\n\n{boxes}"
    return text


def build_judge_prompt(context: str, question: str, answer1: str, answer2: str, rule_prompt: str,
                       role: str = "Assistant") -> str:
    """LLaVA's review prompt: assistant 1 = the reference (GPT-4) answer, assistant 2 = ours."""
    return (f"[Context]\n{context}\n\n"
            f"[Question]\n{question}\n\n"
            f"[{role} 1]\n{answer1}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{answer2}\n\n[End of {role} 2]\n\n"
            f"[System]\n{rule_prompt}\n\n")


def parse_score(review: str) -> tuple[float, float] | None:
    """LLaVA's rule: the first line, commas as spaces, must be exactly two numbers. None otherwise
    (LLaVA returns [-1, -1], which then drags the mean down)."""
    first = review.split("\n")[0].replace(",", " ").split()
    if len(first) != 2:
        return None
    try:
        a, b = float(first[0]), float(first[1])
    except ValueError:
        return None
    if not (math.isfinite(a) and math.isfinite(b)):
        return None
    return a, b


def select_rule(rules: dict, category: str, prefix: str = RULE_PREFIX) -> tuple[str, dict]:
    """``llava_bench_<category>`` (LLaVA's in-the-wild script), else ``<category>`` (its COCO script)."""
    for key in (f"{prefix}{category}", category):
        if key in rules:
            return key, rules[key]
    raise KeyError(f"no judge rule for category {category!r} (tried {prefix}{category!r} and {category!r})")


def normalize_category(category: str) -> str:
    """LLaVA's own review files store 'llava_bench_conv'; ours store 'conv'."""
    return category[len(RULE_PREFIX):] if category.startswith(RULE_PREFIX) else category


# ---------------------------------------------------------------- building the work list

@dataclass
class Task:
    index: int            # 1-based position in the question file (LLaVA's "id")
    question_id: object   # as written in the question file
    category: str
    rule_key: str
    content: str
    answer1_id: object
    answer2_id: object


def build_tasks(questions: list[dict], answers: dict, reference: dict, contexts: dict, rules: dict,
                rule_prefix: str = RULE_PREFIX, questions_path: str = "questions") -> tuple[list[Task], dict]:
    """Pair everything by question_id; a question without our answer or a reference is counted
    and skipped (reported), a question without a context or a rule is an input error."""
    tasks, skipped = [], {"no_answer": [], "no_reference": []}
    for i, q in enumerate(questions, 1):
        for k in ("question_id", "image", "text", "category"):
            if k not in q:
                raise ValueError(f"{questions_path}: question {i} has no {k!r}")
        key = qid_key(q["question_id"])
        ours, ref = answers.get(key), reference.get(key)
        if ours is None:
            skipped["no_answer"].append(q["question_id"])
            continue
        if ref is None:
            skipped["no_reference"].append(q["question_id"])
            continue
        ctx = contexts.get(q["image"])
        if ctx is None:
            raise KeyError(f"{questions_path}: question {q['question_id']}: no context for image {q['image']!r}")
        rule_key, rule = select_rule(rules, q["category"], rule_prefix)
        content = build_judge_prompt(context_text(ctx), q["text"], ref.get("text", ""), ours.get("text", ""),
                                     rule["prompt"], rule.get("role", "Assistant"))
        tasks.append(Task(index=i, question_id=q["question_id"], category=q["category"], rule_key=rule_key,
                          content=content, answer1_id=ref.get("answer_id", ref["question_id"]),
                          answer2_id=ours.get("answer_id", ours["question_id"])))
    return tasks, skipped


# ---------------------------------------------------------------- resume

def load_done(path: str, retry_parse_errors: bool = False) -> dict[str, dict]:
    """Reviews already in ``path`` (question_id -> record). A torn last line (the run was killed
    mid-write) is cut off; with ``retry_parse_errors`` the unparseable reviews are dropped from
    the file so they are asked again."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        raw = f.read()
    done, keep, offset = {}, [], 0
    lines = raw.split(b"\n")
    for lineno, line in enumerate(lines, 1):
        start, offset = offset, offset + len(line) + 1
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines):  # the final line has no newline: an interrupted write
                logger.warning("%s: dropping an incomplete last line (interrupted run)", path)
                with open(path, "r+b") as f:
                    f.truncate(start)
                break
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e}); fix or remove the line") from e
        if retry_parse_errors and rec.get("parse_error"):
            continue
        keep.append(line)
        done[qid_key(rec["question_id"])] = rec
    else:
        if raw and not raw.endswith(b"\n"):
            with open(path, "ab") as f:  # a complete record whose newline was lost
                f.write(b"\n")
    if retry_parse_errors:
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(b"".join(line + b"\n" for line in keep))
        os.replace(tmp, path)
    return done


# ---------------------------------------------------------------- review

def review(tasks: list[Task], client: JudgeClient, output: str, concurrency: int = 1,
           temperature: float = 0.2, max_tokens: int = 1024) -> dict:
    """Ask the judge for each task, appending one line per finished review. Returns counts."""
    lock = threading.Lock()
    stats = {"reviewed": 0, "parse_errors": 0, "failed": []}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)

    def ask(task: Task) -> dict:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": task.content}]
        reply = client.chat(messages, temperature=temperature, max_tokens=max_tokens)
        scores = parse_score(reply.content)
        return {"id": task.index, "question_id": task.question_id, "answer1_id": task.answer1_id,
                "answer2_id": task.answer2_id, "category": task.category, "rule": task.rule_key,
                "content": reply.content, "tuple": list(scores) if scores else None,
                "parse_error": scores is None, "judge_model": client.model, "judge_model_reported": reply.model}

    with open(output, "a", encoding="utf-8") as f, tqdm(total=len(tasks), desc="judge", unit="q") as bar:
        def record(task: Task, fut_result) -> None:
            with lock:
                f.write(json.dumps(fut_result, ensure_ascii=False) + "\n")
                f.flush()
                stats["reviewed"] += 1
                stats["parse_errors"] += fut_result["parse_error"]
                if fut_result["parse_error"]:
                    logger.warning("question %s: judge reply not parseable: %r",
                                   task.question_id, fut_result["content"][:120])
                bar.update(1)

        def fail(task: Task, err: Exception) -> None:
            logger.error("question %s: %s", task.question_id, err)
            stats["failed"].append(task.question_id)
            bar.update(1)

        if concurrency <= 1:
            for task in tasks:
                try:
                    record(task, ask(task))
                except JudgeFatalError:
                    raise
                except JudgeError as e:
                    fail(task, e)
        else:
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                futures = {pool.submit(ask, t): t for t in tasks}
                try:
                    for fut in as_completed(futures):
                        task = futures[fut]
                        try:
                            record(task, fut.result())
                        except JudgeFatalError:
                            raise
                        except JudgeError as e:
                            fail(task, e)
                except JudgeFatalError:
                    for other in futures:
                        other.cancel()
                    raise
    return stats


# ---------------------------------------------------------------- summarize

def _category_stats(items: list[dict]) -> dict:
    scored = [r["tuple"] for r in items if not _is_failure(r)]
    n = len(scored)
    mean_ref = sum(s[0] for s in scored) / n if n else None
    mean_ours = sum(s[1] for s in scored) / n if n else None
    rel = mean_ours / mean_ref * 100 if n and mean_ref else None
    return {"n": n, "parse_errors": len(items) - n, "mean_reference": mean_ref, "mean_model": mean_ours,
            "relative_score": rel}


def _is_failure(rec: dict) -> bool:
    """Ours mark failures with parse_error; LLaVA's files with the tuple [-1, -1]."""
    t = rec.get("tuple")
    return bool(rec.get("parse_error")) or not t or len(t) != 2 or list(t) == [-1, -1]


def llava_scores(records: list[dict]) -> dict[str, list]:
    """LLaVA's summarize_gpt_review.py: per category and "all", [relative, reference*10, model*10] from the mean
    scores rounded to 3 decimals, with a failed parse averaged in as (-1, -1); relative None where LLaVA divides
    by zero."""
    import numpy as np

    scores: dict[str, list] = {}
    for rec in records:
        t = rec.get("tuple")
        pair = [-1.0, -1.0] if rec.get("parse_error") or not t or len(t) != 2 else [float(x) for x in t]
        scores.setdefault(normalize_category(str(rec.get("category", "unknown"))), []).append(pair)
        scores.setdefault("all", []).append(pair)
    out = {}
    for key, pairs in sorted(scores.items()):
        ref, model = (round(x, 3) for x in np.asarray(pairs).mean(0).tolist())
        out[key] = [round(model / ref * 100, 1) if ref else None, round(ref * 10, 1), round(model * 10, 1)]
    return out


def summarize(records: list[dict], categories: list[str] | None = None) -> dict:
    """LLaVA's relative score, mean(model)/mean(reference)*100, per category and overall; failed
    parses are excluded and counted. ``llava``: the same records (of ``categories``) scored as LLaVA's script."""
    by_cat: dict[str, list[dict]] = {}
    for rec in records:
        by_cat.setdefault(normalize_category(str(rec.get("category", "unknown"))), []).append(rec)
    if categories:
        cats = list(categories)
    else:
        cats = [c for c in CATEGORY_ORDER if c in by_cat] + sorted(c for c in by_cat if c not in CATEGORY_ORDER)
    out = {"categories": {c: _category_stats(by_cat.get(c, [])) for c in cats}}
    out["overall"] = _category_stats([r for c in cats for r in by_cat.get(c, [])])
    out["llava"] = llava_scores([r for c in cats for r in by_cat.get(c, [])])
    return out


def format_table(summary: dict) -> str:
    """LLaVA's lines ("category relative reference*10 model*10", as its script prints them), then ours."""
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)
    rows = ["LLaVA's summarize_gpt_review.py (failed parses as -1, -1): category relative reference*10 model*10"]
    rows += [" ".join(str(x) for x in (k, *v)) for k, v in summary.get("llava", {}).items()]
    rows += ["", "Failed parses excluded:",
             f"{'category':<10} {'n':>4} {'failed':>6} {'ref':>6} {'model':>6} {'relative':>8}"]
    items = list(summary["categories"].items()) + [("all", summary["overall"])]
    for name, s in items:
        rows.append(f"{name:<10} {s['n']:>4} {s['parse_errors']:>6} {num(s['mean_reference'], '6.3f'):>6} "
                    f"{num(s['mean_model'], '6.3f'):>6} {num(s['relative_score'], '8.1f'):>8}")
    return "\n".join(rows)


# ---------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m drip_llava.eval.llavabench", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("review", help="ask an OpenAI-compatible judge to score our answers against the reference")
    r.add_argument("--questions", required=True, help="questions.jsonl (question_id, image, text, category)")
    r.add_argument("--answers", required=True, help="our model's answers jsonl")
    r.add_argument("--reference", required=True, help="reference answers (answers_gpt4.jsonl)")
    r.add_argument("--context", required=True, help="context.jsonl (image -> caption)")
    r.add_argument("--rule", required=True, help="LLaVA's rule.json (judge prompts per category)")
    r.add_argument("--judge-model", required=True, help="model name sent to the endpoint (pin a snapshot)")
    r.add_argument("--judge-base-url", default="https://api.openai.com/v1",
                   help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (vLLM), "
                        "http://127.0.0.1:11434/v1 (Ollama); key from OPENAI_API_KEY if set")
    r.add_argument("--output", required=True, help="review jsonl; appended to, existing question_ids are skipped")
    r.add_argument("--rule-prefix", default=RULE_PREFIX,
                   help="rule key = prefix + category, falling back to the bare category ('' for COCO rules)")
    r.add_argument("--max-retries", type=int, default=5)
    r.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    r.add_argument("--backoff", type=float, default=2.0, help="first retry delay; doubles each retry")
    r.add_argument("--max-backoff", type=float, default=60.0)
    r.add_argument("--concurrency", type=int, default=1)
    r.add_argument("--temperature", type=float, default=0.2, help="LLaVA used 0.2")
    r.add_argument("--max-tokens", type=int, default=1024)
    r.add_argument("--retry-parse-errors", action="store_true",
                   help="ask again the questions whose stored review could not be parsed")
    s = sub.add_parser("summarize", help="LLaVA's relative score per category and overall")
    s.add_argument("--review", required=True)
    s.add_argument("--categories", nargs="+", default=None, help="categories to report (default: all found)")
    s.add_argument("--out", default=None, help="write the summary JSON here")
    return p.parse_args(argv)


def _run_review(args) -> int:
    questions = read_jsonl(args.questions)
    answers = index_by_question_id(read_jsonl(args.answers), args.answers)
    reference = index_by_question_id(read_jsonl(args.reference), args.reference)
    contexts = {c["image"]: c for c in read_jsonl(args.context) if "image" in c}
    with open(args.rule, encoding="utf-8") as f:
        rules = json.load(f)
    tasks, skipped = build_tasks(questions, answers, reference, contexts, rules, args.rule_prefix, args.questions)
    done = load_done(args.output, args.retry_parse_errors)
    other_judges = {r.get("judge_model") for r in done.values()} - {args.judge_model, None}
    if other_judges:
        logger.warning("%s already holds reviews by %s; mixing judges makes the score meaningless",
                       args.output, ", ".join(sorted(map(str, other_judges))))
    todo = [t for t in tasks if qid_key(t.question_id) not in done]
    print(f"{len(questions)} questions: {len(tasks) - len(todo)} already reviewed, {len(todo)} to ask; "
          f"skipped {len(skipped['no_answer'])} without our answer, {len(skipped['no_reference'])} without reference")
    client = JudgeClient.from_env(args.judge_base_url, args.judge_model, timeout=args.timeout,
                                  max_retries=args.max_retries, backoff=args.backoff, max_backoff=args.max_backoff)
    try:
        stats = review(todo, client, args.output, args.concurrency, args.temperature, args.max_tokens)
    except JudgeFatalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"reviewed {stats['reviewed']} ({stats['parse_errors']} unparseable replies); "
          f"{len(stats['failed'])} requests failed")
    if skipped["no_answer"]:
        print(f"warning: no answer from our model for question_ids {skipped['no_answer'][:10]}"
              f"{' ...' if len(skipped['no_answer']) > 10 else ''}", file=sys.stderr)
    if stats["failed"]:
        print(f"error: the judge failed on question_ids {stats['failed'][:10]}; rerun the same command to resume",
              file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "review":
        return _run_review(args)
    summary = summarize(read_jsonl(args.review), args.categories)
    summary["review_file"] = args.review
    print(format_table(summary))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
