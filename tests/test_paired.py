"""Exact McNemar test and the paired with-image vs blank comparison, against hand-worked numbers."""
import json
from fractions import Fraction
from math import comb

import pytest

from drip_llava.eval import paired as pt
from drip_llava.eval import scienceqa


@pytest.mark.parametrize("b,c,alternative,expected", [
    # 12 discordant: P(X >= 10) = (C(12,10) + C(12,11) + C(12,12)) / 2^12 = (66 + 12 + 1) / 4096
    (10, 2, "greater", 79 / 4096),
    (10, 2, "two-sided", 79 / 2048),  # 0.0386
    (10, 2, "less", (4096 - 12 - 1) / 4096),  # P(X <= 10) = 1 - P(X >= 11) = 1 - (12 + 1) / 4096
    (0, 5, "two-sided", 2 / 32),
    (0, 5, "greater", 1.0),
    (0, 5, "less", 1 / 32),
    (5, 0, "two-sided", 2 / 32),
    (3, 3, "two-sided", 1.0),  # each tail 42/64: twice is capped at 1
    (0, 0, "two-sided", 1.0),  # no discordant pair, no evidence
    (1, 0, "two-sided", 1.0),
])
def test_mcnemar_exact_hand_worked(b, c, alternative, expected):
    assert pt.mcnemar_exact(b, c, alternative) == pytest.approx(expected, rel=1e-12)


def test_mcnemar_two_sided_is_symmetric_and_matches_exact_fractions():
    for b, c in ((60, 30), (45, 20), (7, 19), (150, 110)):
        n = b + c
        tail = Fraction(sum(comb(n, k) for k in range(max(b, c), n + 1)), 2 ** n)
        assert pt.mcnemar_exact(b, c) == pytest.approx(float(min(1, 2 * tail)), rel=1e-12)
        assert pt.mcnemar_exact(b, c) == pt.mcnemar_exact(c, b)
    assert 0.001 < pt.mcnemar_exact(60, 30) < 0.003  # ~ 2 * (1 - Phi((60 - 45 - 0.5) / sqrt(22.5))) = 0.0022


def test_mcnemar_rejects_bad_input():
    with pytest.raises(ValueError, match=">= 0"):
        pt.mcnemar_exact(-1, 2)
    with pytest.raises(ValueError, match="alternative"):
        pt.mcnemar_exact(1, 2, "one-sided")


def test_paired_table_and_verdict():
    a = {"1": True, "2": True, "3": False, "4": False, "5": True}
    b = {"1": True, "2": False, "3": True, "4": False, "5": False, "6": True}  # "6" has no pair
    r = pt.paired(a, b)
    assert (r["n"], r["both"], r["only_a"], r["only_b"], r["neither"], r["unpaired"]) == (5, 1, 2, 1, 1, 1)
    assert (r["acc_a"], r["acc_b"]) == (60.0, 40.0)
    assert r["p_value"] == 1.0 and not pt.verdict(r, 0.01)
    strong = pt.paired({str(i): i < 30 for i in range(40)}, {str(i): i < 5 for i in range(40)})  # b=25, c=0
    assert strong["p_value"] == pytest.approx(2 / 2 ** 25) and pt.verdict(strong, 0.01)
    worse = pt.paired({str(i): i < 5 for i in range(40)}, {str(i): i < 30 for i in range(40)})
    assert worse["p_value"] < 0.01 and not pt.verdict(worse, 0.01)  # significant, but the wrong way
    assert "exact McNemar p = 6e-08 (two-sided)" in pt.format_line(strong)
    assert not pt.verdict(pt.paired({}, {}), 0.01)


def test_by_group_splits_the_pairs():
    a = {"1": True, "2": True, "3": False, "4": True}
    b = {"1": False, "2": True, "3": True, "4": False}
    groups = pt.by_group(a, b, {"1": "colour", "2": "shape", "3": "shape", "4": "colour"})
    assert list(groups) == ["colour", "shape"]
    assert (groups["colour"]["only_a"], groups["colour"]["only_b"], groups["colour"]["n"]) == (2, 0, 2)
    assert (groups["shape"]["both"], groups["shape"]["only_b"]) == (1, 1)


def test_combine_adds_the_tables_of_disjoint_groups():
    a = {str(i): i % 3 != 0 for i in range(30)}
    b = {str(i): i % 5 == 0 for i in range(30)}
    groups = {str(i): "low" if i < 12 else "high" for i in range(30)}
    whole = pt.paired(a, b)
    assert pt.combine(list(pt.by_group(a, b, groups).values())) == whole
    with pytest.raises(ValueError):
        pt.combine([])


def _problem(answer, image):
    return {"question": "What colour is the largest shape?", "choices": ["red", "blue"], "answer": answer,
            "hint": "" if image else "Mia drew a red circle.", "image": "image.png" if image else None,
            "subject": "natural science", "grade": "grade1", "skill": "colour"}


def test_read_correct_from_the_scorer_and_cli(tmp_path):
    problems = {"1": _problem(0, True), "2": _problem(1, True), "3": _problem(0, True), "4": _problem(0, False)}
    pids = list(problems)
    paths = {}
    for tag, letters in (("image", "ABAA"), ("blank", "BBBA")):
        answers = [{"question_id": p, "prompt": "<image>\nx" if problems[p]["image"] else "x", "text": t}
                   for p, t in zip(pids, letters)]
        records, _ = scienceqa.score(problems, pids, answers)
        paths[tag] = tmp_path / f"scored_{tag}.jsonl"
        paths[tag].write_text("".join(json.dumps(r) + "\n" for r in records))
    assert pt.read_correct(paths["image"]) == {"1": True, "2": True, "3": True, "4": True}
    assert pt.read_correct(paths["blank"], image_only=True) == {"1": False, "2": True, "3": False}
    out = tmp_path / "paired.json"
    r = pt.main(["--a", str(paths["image"]), "--b", str(paths["blank"]), "--image-only", "--json", str(out)])
    assert (r["n"], r["only_a"], r["only_b"]) == (3, 2, 0) and r["p_value"] == pytest.approx(0.5)
    assert json.loads(out.read_text()) == r
