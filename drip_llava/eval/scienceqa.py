"""ScienceQA in LLaVA's protocol: question file conversion (CQM-A prompt) and letter-parsing scoring.

    python -m drip_llava.eval.scienceqa convert --base-dir DIR --split test --out question.jsonl
    python -m drip_llava.eval.scienceqa score --base-dir DIR --result-file answers.jsonl \
        --output-file out.jsonl --output-result result.json

``DIR`` holds the official ``problems.json`` and ``pid_splits.json`` (images under ``DIR/images/<split>``).
``score`` prints and stores LLaVA's numbers (llava/eval/eval_science_qa.py) under LLaVA's names: ``acc`` /
``correct`` / ``count`` over every problem of the split (a missing answer is wrong) and IMG-Accuracy (``img_acc``)
over the answers whose prompt holds "<image>" (a missing answer is not in it), with LLaVA's parsing of the raw
text. The project's own numbers have other names: ``image_problems`` (problems that have an image, a missing
answer wrong: ScienceQA's IMG), ``groups`` (ScienceQA's breakdown, by problem) and counts of missing, unparsed
and out-of-range answers. Inputs LLaVA's script crashes on (a problem without an answer index, an answer whose
text is not a string, no "prompt") are skipped and counted, scored wrong, and not multimodal, respectively.
Answers pair with problems by str(question_id) (LLaVA: the raw id; ScienceQA's pids are strings, so only a file
with integer ids differs: LLaVA scores it all missing).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections import Counter

from drip_llava.constants import DEFAULT_IMAGE_TOKEN, MC_ANSWER_PROMPT
from drip_llava.eval import index_by_question_id
from drip_llava.jsonl import read_jsonl, write_jsonl

logger = logging.getLogger(__name__)

OPTIONS = ("A", "B", "C", "D", "E")
SUBJECTS = {"natural science": "NAT", "social science": "SOC", "language science": "LAN"}
GROUPS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12")
# LLaVA's pattern, unescaped '.' included (it matches any character after the letter): kept as is
# so scores match LLaVA's; "The answer is A" at the very end therefore does not match.
ANSWER_IS = re.compile(r"The answer is ([A-Z]).")
INPUT_FORMATS = ("CQM", "QCM")


# ---------------------------------------------------------------- data

def load_split(base_dir: str, split: str) -> tuple[dict, list[str]]:
    """problems.json + pid_splits.json -> (problems, pids of the split, in file order)."""
    problems_path = os.path.join(base_dir, "problems.json")
    splits_path = os.path.join(base_dir, "pid_splits.json")
    for p in (problems_path, splits_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p} not found (download ScienceQA's data/scienceqa folder; see eval/README.md)")
    with open(problems_path, encoding="utf-8") as f:
        problems = json.load(f)
    with open(splits_path, encoding="utf-8") as f:
        splits = json.load(f)
    if split not in splits:
        raise KeyError(f"{splits_path}: no split {split!r} (have: {', '.join(sorted(splits))})")
    pids = [str(p) for p in splits[split]]
    missing = [p for p in pids if p not in problems]
    if missing:
        raise KeyError(f"{problems_path}: {len(missing)} pids of split {split!r} are missing, e.g. {missing[:5]}")
    return problems, pids


# ---------------------------------------------------------------- convert

def context_text(problem: dict, use_caption: bool = False) -> str:
    parts = [problem.get("hint") or "", (problem.get("caption") or "") if use_caption else ""]
    context = " ".join(parts).strip()
    return context or "N/A"


def choice_text(choices: list[str]) -> str:
    return " ".join(f"({OPTIONS[i]}) {c}" for i, c in enumerate(choices))


def build_prompt(problem: dict, prompt_format: str = "CQM-A", use_caption: bool = False,
                 answer_instruction: bool = True, pid: str = "?") -> str:
    """The text of one question in LLaVA's format (without the image token)."""
    input_format = prompt_format.split("-")[0]
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"prompt format {prompt_format!r}: input part must be one of {INPUT_FORMATS}")
    choices = problem.get("choices") or []
    if not 2 <= len(choices) <= len(OPTIONS):
        raise ValueError(f"problem {pid}: {len(choices)} choices; LLaVA's letters cover 2..{len(OPTIONS)}")
    question, context, choice = problem.get("question", ""), context_text(problem, use_caption), choice_text(choices)
    if input_format == "CQM":
        text = f"Context: {context}\nQuestion: {question}\nOptions: {choice}\n"
    else:  # QCM; LLaVA's converter then drops the leading "Question: "
        text = f"Question: {question}\nContext: {context}\nOptions: {choice}\n"
    text = text.replace("  ", " ").strip()
    if text.startswith("Question: "):
        text = text[len("Question: "):]
    if answer_instruction:
        text = f"{text}\n{MC_ANSWER_PROMPT}"
    return text


def convert(base_dir: str, split: str = "test", prompt_format: str = "CQM-A", use_caption: bool = False,
            answer_instruction: bool = True) -> list[dict]:
    """LLaVA question-file records for a split: {question_id, text[, image]}; "<image>\\n" leads when
    the problem has an image, whose path is relative to ``images/<split>``."""
    problems, pids = load_split(base_dir, split)
    out = []
    for pid in pids:
        prob = problems[pid]
        text = build_prompt(prob, prompt_format, use_caption, answer_instruction, pid=pid)
        rec = {"question_id": pid}
        if prob.get("image"):
            rec["image"] = f"{pid}/{prob['image']}"
            text = "<image>\n" + text
        rec["text"] = text
        out.append(rec)
    return out


# ---------------------------------------------------------------- score

def parse_answer(text: str) -> str:
    """LLaVA's rules on the text as written (no stripping: " B" fails, "B. " is B), in order: the text is an option
    letter; else it starts with "X. "; else it holds exactly one 'The answer is X.'; else "FAILED"."""
    t = text
    if t in OPTIONS:
        return t
    if len(t) >= 3 and t[0] in OPTIONS and t[1:3] == ". ":
        return t[0]
    hits = ANSWER_IS.findall(t)
    if len(hits) == 1:
        return hits[0]
    return "FAILED"


def answer_index(letter: str, n_choices: int) -> int:
    """Letter -> choice index; -1 (wrong) for FAILED or a letter beyond this problem's choices."""
    return OPTIONS.index(letter) if letter in OPTIONS[:n_choices] else -1


def problem_groups(problem: dict) -> list[str]:
    """ScienceQA's breakdown: subject, context type (TXT/IMG overlap; NO = neither), grade band."""
    groups = []
    subject = SUBJECTS.get(str(problem.get("subject", "")).lower())
    if subject:
        groups.append(subject)
    has_txt, has_img = bool(problem.get("hint")), bool(problem.get("image"))
    if has_txt:
        groups.append("TXT")
    if has_img:
        groups.append("IMG")
    if not has_txt and not has_img:
        groups.append("NO")
    m = re.fullmatch(r"grade(\d+)", str(problem.get("grade", "")))
    if m:
        groups.append("G1-6" if int(m.group(1)) <= 6 else "G7-12")
    return groups


def _acc(correct: int, count: int) -> float | None:
    return correct / count * 100 if count else None


def score(problems: dict, pids: list[str], predictions: list[dict],
          result_path: str = "<predictions>") -> tuple[list[dict], dict]:
    """Score predictions against a split. Returns (one record per problem, the summary dict: LLaVA's acc / correct /
    count / img_acc / img_correct / img_count / results / outputs, then the project's image_problems, groups and
    counts; see the module docstring)."""
    preds = index_by_question_id(predictions, result_path)
    pid_set = set(pids)
    unknown = sorted(k for k in preds if k not in pid_set)
    counts: Counter = Counter()
    img, image_problems = Counter(), Counter()  # LLaVA's IMG (by prompt), ours (by problem)
    group_counts = {g: Counter() for g in GROUPS}
    records, results, outputs = [], {}, {}
    for pid in pids:
        prob = problems[pid]
        choices = prob.get("choices") or []
        gt = prob.get("answer")
        if not isinstance(gt, int) or not 0 <= gt < min(len(choices), len(OPTIONS)):
            counts["no_ground_truth"] += 1
            logger.warning("problem %s: no valid answer index (%r); skipped", pid, gt)
            continue
        pred = preds.get(pid)
        if pred is None:
            counts["missing_answers"] += 1
            text, prompt = None, "Unknown"  # LLaVA's stand-in for a missing answer
        else:
            text = pred["text"] if isinstance(pred.get("text"), str) else None
            if text is None:
                counts["malformed_answers"] += 1
            prompt = pred["prompt"] if isinstance(pred.get("prompt"), str) else ""
        is_multimodal = DEFAULT_IMAGE_TOKEN in prompt  # LLaVA's IMG membership
        letter = parse_answer(text) if text is not None else "FAILED"
        if letter == "FAILED" and text is not None:
            counts["unparsed"] += 1
        idx = answer_index(letter, len(choices))
        if letter != "FAILED" and idx == -1:
            counts["out_of_range"] += 1
        correct = idx == gt
        groups = problem_groups(prob)
        counts["count"] += 1
        counts["correct"] += correct
        if is_multimodal:
            img["count"] += 1
            img["correct"] += correct
        if prob.get("image"):
            image_problems["count"] += 1
            image_problems["correct"] += correct
        for g in groups:
            group_counts[g]["count"] += 1
            group_counts[g]["correct"] += correct
        results[pid] = idx
        outputs[pid] = text if text is not None else "FAILED"
        records.append({
            "question_id": pid, "parsed_ans": letter, "pred_idx": idx, "ground_truth": OPTIONS[gt],
            "correct": correct, "pred": text, "question": prompt, "is_multimodal": is_multimodal,
            "missing": pred is None, "has_image": bool(prob.get("image")), "groups": groups,
        })
    summary = {
        # LLaVA's eval_science_qa.py
        "acc": _acc(counts["correct"], counts["count"]), "correct": counts["correct"], "count": counts["count"],
        "img_acc": _acc(img["correct"], img["count"]), "img_correct": img["correct"], "img_count": img["count"],
        # the project's
        "image_problems": {"acc": _acc(image_problems["correct"], image_problems["count"]),
                           "correct": image_problems["correct"], "count": image_problems["count"]},
        "groups": {g: {"acc": _acc(c["correct"], c["count"]), "correct": c["correct"], "count": c["count"]}
                   for g, c in group_counts.items()},
        "missing_answers": counts["missing_answers"],      # problems with no answer line (scored wrong)
        "malformed_answers": counts["malformed_answers"],  # answer lines without a text (scored wrong)
        "unparsed_answers": counts["unparsed"],            # text matched no rule (scored wrong)
        "out_of_range_answers": counts["out_of_range"],    # a letter beyond the problem's choices (wrong)
        "no_ground_truth": counts["no_ground_truth"],      # problems skipped: no valid answer index
        "unknown_answers": len(unknown),                   # answer lines whose id is not in the split
        "results": results, "outputs": outputs,
    }
    return records, summary


def format_summary(s: dict) -> str:
    """LLaVA's line exactly (n/a where LLaVA divides by zero), then the project's numbers."""
    def pct(v):
        return "n/a" if v is None else f"{v:.2f}%"
    ip = s["image_problems"]
    lines = [f"Total: {s['count']}, Correct: {s['correct']}, Accuracy: {pct(s['acc'])}, "
             f"IMG-Accuracy: {pct(s['img_acc'])}"]
    lines.append(f"Problems with an image (missing answers wrong): {ip['correct']}/{ip['count']}, {pct(ip['acc'])}")
    lines.append("By problem: " + "  ".join(f"{g}={pct(s['groups'][g]['acc'])}({s['groups'][g]['count']})"
                                            for g in GROUPS))
    notes = [f"{k}={s[k]}" for k in ("missing_answers", "malformed_answers", "unparsed_answers",
                                     "out_of_range_answers", "no_ground_truth", "unknown_answers") if s[k]]
    if notes:
        lines.append("Counted: " + ", ".join(notes))
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m drip_llava.eval.scienceqa", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="problems.json + pid_splits.json -> LLaVA question jsonl")
    c.add_argument("--base-dir", required=True)
    c.add_argument("--split", default="test")
    c.add_argument("--out", required=True)
    c.add_argument("--prompt-format", default="CQM-A", help="CQM-A (LLaVA-1.5) or QCM-*")
    c.add_argument("--use-caption", action="store_true", help="append problems' 'caption' to the context")
    c.add_argument("--no-answer-instruction", action="store_true",
                   help=f"omit the final line {MC_ANSWER_PROMPT!r}")
    s = sub.add_parser("score", help="score an answers jsonl with LLaVA's letter-parsing rules")
    s.add_argument("--base-dir", required=True)
    s.add_argument("--split", default="test")
    s.add_argument("--result-file", required=True, help="answers jsonl (question_id, text)")
    s.add_argument("--output-file", required=True, help="per-problem analysis jsonl")
    s.add_argument("--output-result", required=True,
                   help="summary json (LLaVA's acc, img_acc; the project's image_problems, groups, counts)")
    return p.parse_args(argv)


def _ensure_parent(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "convert":
        questions = convert(args.base_dir, args.split, args.prompt_format, args.use_caption,
                            not args.no_answer_instruction)
        _ensure_parent(args.out)
        write_jsonl(args.out, questions)
        n_img = sum("image" in q for q in questions)
        print(f"wrote {len(questions)} questions ({n_img} with image) to {args.out}")
        return 0
    problems, pids = load_split(args.base_dir, args.split)
    predictions = read_jsonl(args.result_file)
    records, summary = score(problems, pids, predictions, args.result_file)
    for path in (args.output_file, args.output_result):
        _ensure_parent(path)
    write_jsonl(args.output_file, records)
    with open(args.output_result, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
