"""Paired comparison of two answer runs on the same problems: does condition A (e.g. with the image) beat B (the
image replaced by a blank one)?

    python -m drip_llava.eval.paired --a sqa_scored_image.jsonl --b sqa_scored_blank.jsonl [--image-only]

Both runs answer the same problems, so the test is on the pairs, not on two accuracies: only the discordant
problems (right in one run, wrong in the other) carry evidence. Under "A and B are equally accurate" each
discordant problem is equally likely to favour either run, so b (right only with A) is Binomial(b + c, 1/2) and the
exact McNemar p-value is a binomial tail (math.comb; no scipy). Inputs are the per-problem files
`python -m drip_llava.eval.scienceqa score --output-file` writes (question_id, correct, has_image).
"""
from __future__ import annotations

import argparse
import json
from math import comb

from drip_llava.jsonl import read_jsonl

ALTERNATIVES = ("two-sided", "greater", "less")


def mcnemar_exact(b: int, c: int, alternative: str = "two-sided") -> float:
    """Exact McNemar p-value from the discordant counts: b = right only in A, c = right only in B.

    "greater": P(X >= b), evidence that A beats B; "less": P(X <= b); "two-sided": twice the smaller tail, capped
    at 1 (as statsmodels' `mcnemar(exact=True)`). No discordant pair: 1.0."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    n = b + c
    if n == 0:
        return 1.0
    upper = sum(comb(n, k) for k in range(b, n + 1)) / 2 ** n  # P(X >= b), exact integers then one division
    lower = sum(comb(n, k) for k in range(0, b + 1)) / 2 ** n  # P(X <= b)
    if alternative == "greater":
        return upper
    if alternative == "less":
        return lower
    return min(1.0, 2 * min(upper, lower))


def paired(a: dict[str, bool], b: dict[str, bool], alternative: str = "two-sided") -> dict:
    """The 2x2 table of per-problem correctness of runs A and B over the problems both answered, accuracies in %,
    and the exact McNemar p-value. Problems in only one run are counted in `unpaired`, not tested."""
    keys = [k for k in a if k in b]
    both = sum(a[k] and b[k] for k in keys)
    only_a = sum(a[k] and not b[k] for k in keys)
    only_b = sum(b[k] and not a[k] for k in keys)
    n = len(keys)
    return {"n": n, "both": both, "only_a": only_a, "only_b": only_b, "neither": n - both - only_a - only_b,
            "acc_a": 100 * (both + only_a) / n if n else None, "acc_b": 100 * (both + only_b) / n if n else None,
            "p_value": mcnemar_exact(only_a, only_b, alternative), "alternative": alternative,
            "unpaired": len(set(a) ^ set(b))}


def by_group(a: dict[str, bool], b: dict[str, bool], group_of: dict[str, str],
             alternative: str = "two-sided") -> dict[str, dict]:
    """`paired` within each group (e.g. question type) of group_of (problem id -> group), groups sorted by name;
    problems without a group are left out."""
    groups: dict[str, list[str]] = {}
    for k, g in group_of.items():
        groups.setdefault(g, []).append(k)
    return {g: paired({k: a[k] for k in ks if k in a}, {k: b[k] for k in ks if k in b}, alternative)
            for g, ks in sorted(groups.items())}


def combine(results: list[dict]) -> dict:
    """One `paired` result from the results of disjoint groups: their 2x2 tables add, the p-value is recomputed
    (McNemar needs only the discordant counts)."""
    if not results:
        raise ValueError("nothing to combine")
    t = {k: sum(r[k] for r in results) for k in ("n", "both", "only_a", "only_b", "neither", "unpaired")}
    n = t["n"]
    return {**t, "acc_a": 100 * (t["both"] + t["only_a"]) / n if n else None,
            "acc_b": 100 * (t["both"] + t["only_b"]) / n if n else None,
            "p_value": mcnemar_exact(t["only_a"], t["only_b"], results[0]["alternative"]),
            "alternative": results[0]["alternative"]}


def read_correct(scored_path, image_only: bool = False) -> dict[str, bool]:
    """problem id -> correct, from a `scienceqa score --output-file` jsonl (image_only: problems with an image)."""
    return {str(r["question_id"]): bool(r["correct"]) for r in read_jsonl(scored_path)
            if not image_only or r.get("has_image")}


def verdict(result: dict, alpha: float) -> bool:
    """A beats B: more accurate, at a p-value below alpha."""
    return result["n"] > 0 and result["acc_a"] > result["acc_b"] and result["p_value"] < alpha


def format_line(result: dict, labels=("with the image", "blank image")) -> str:
    """One line: accuracies, discordant counts and the p-value with its alternative."""
    r = result
    return (f"{labels[0]} {r['acc_a']:.1f}% vs {labels[1]} {r['acc_b']:.1f}% on {r['n']} problems; discordant: "
            f"{r['only_a']} right only {labels[0]}, {r['only_b']} only {labels[1]}; exact McNemar p = "
            f"{r['p_value']:.2g} ({r['alternative']})")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", required=True, help="scored jsonl of run A (e.g. with the image)")
    p.add_argument("--b", required=True, help="scored jsonl of run B (e.g. blank image)")
    p.add_argument("--image-only", action="store_true", help="only problems that have an image")
    p.add_argument("--alternative", default="two-sided", choices=ALTERNATIVES)
    p.add_argument("--json", default=None, help="write the result here")
    args = p.parse_args(argv)
    r = paired(read_correct(args.a, args.image_only), read_correct(args.b, args.image_only), args.alternative)
    print(format_line(r, ("A", "B")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return r


if __name__ == "__main__":
    main()
