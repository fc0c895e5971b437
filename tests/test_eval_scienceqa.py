"""ScienceQA convert + score on a hand-made problems.json: every parsing rule, and LLaVA's eval_science_qa.py numbers
(worked out by hand from its rules) beside the project's own definitions."""

import json

import pytest

from drip_llava.eval import scienceqa
from drip_llava.eval.scienceqa import answer_index, parse_answer
from drip_llava.jsonl import read_jsonl

PROBLEMS = {
    # image + hint, natural science, grade 4: IMG and TXT
    "1": {"question": "Which property do these objects have in common?", "choices": ["shiny", "slippery", "opaque"],
          "answer": 2, "hint": "Select the best answer.", "image": "image.png", "subject": "natural science",
          "grade": "grade4", "split": "test"},
    # image, no hint, social science, grade 8: IMG only
    "2": {"question": "Which state is highlighted?", "choices": ["Ohio", "Utah", "Iowa", "Maine"],
          "answer": 1, "hint": "", "image": "image.png", "subject": "social science", "grade": "grade8",
          "split": "test"},
    # text only: TXT, language science, grade 2
    "3": {"question": "Which word is a noun?", "choices": ["run", "dog"], "answer": 1,
          "hint": "Look at the  words.", "image": None, "subject": "language science", "grade": "grade2",
          "split": "test"},
    # no context at all: NO, grade 10
    "4": {"question": "What is 2+2?", "choices": ["3", "4", "5"], "answer": 1, "hint": "", "image": None,
          "subject": "natural science", "grade": "grade10", "split": "test"},
    # another image question (five choices), grade 12
    "5": {"question": "Pick E.", "choices": ["a", "b", "c", "d", "e"], "answer": 4, "hint": "", "image": "image.png",
          "subject": "natural science", "grade": "grade12", "split": "test"},
    "6": {"question": "Only 2 choices", "choices": ["x", "y"], "answer": 0, "hint": "", "image": None,
          "subject": "social science", "grade": "grade3", "split": "test"},
    "7": {"question": "Never answered", "choices": ["x", "y"], "answer": 0, "hint": "", "image": "image.png",
          "subject": "social science", "grade": "grade3", "split": "test"},
    "99": {"question": "train problem", "choices": ["x", "y"], "answer": 0, "hint": "", "image": None,
           "subject": "social science", "grade": "grade3", "split": "train"},
}
SPLITS = {"test": ["1", "2", "3", "4", "5", "6", "7"], "train": ["99"]}


@pytest.fixture()
def base_dir(tmp_path):
    (tmp_path / "problems.json").write_text(json.dumps(PROBLEMS))
    (tmp_path / "pid_splits.json").write_text(json.dumps(SPLITS))
    return tmp_path


@pytest.mark.parametrize("text,expected", [
    ("C", "C"),                                  # rule 1: exact option letter
    (" B", "FAILED"),                            # LLaVA parses the text as written: no stripping
    ("B\n", "FAILED"),
    ("B. slippery", "B"),                        # rule 2: "X. " at the start
    ("B. ", "B"),                                # ... even with nothing after it
    ("B.", "FAILED"),                            # ... but the space is needed
    ("I think so. The answer is C. Because", "C"),  # rule 3: one 'The answer is X.'
    ("The answer is A. No wait, the answer is B.", "A"),  # case-sensitive: 'the answer' does not count
    ("The answer is A. The answer is B.", "FAILED"),      # two matches -> wrong
    ("The answer is A", "FAILED"),               # LLaVA's pattern needs a character after the letter
    ("banana", "FAILED"),                        # garbage
    ("", "FAILED"),
    ("F", "FAILED"),                             # not an option letter at all
    ("B.slippery", "FAILED"),                    # "X." without the space is not rule 2
    ("b", "FAILED"),                             # lower case is not a letter option
])
def test_parse_rules(text, expected):
    assert parse_answer(text) == expected


def test_letter_outside_choices_is_wrong():
    assert answer_index("D", 3) == -1
    assert answer_index("C", 3) == 2
    assert answer_index("FAILED", 5) == -1
    assert answer_index("E", 5) == 4


def test_convert_cqm_a(base_dir, tmp_path):
    out = tmp_path / "q.jsonl"
    assert scienceqa.main(["convert", "--base-dir", str(base_dir), "--split", "test", "--out", str(out)]) == 0
    qs = read_jsonl(out)
    assert [q["question_id"] for q in qs] == SPLITS["test"]
    q1 = qs[0]
    assert q1["image"] == "1/image.png"
    assert q1["text"] == ("<image>\nContext: Select the best answer.\n"
                          "Question: Which property do these objects have in common?\n"
                          "Options: (A) shiny (B) slippery (C) opaque\n"
                          "Answer with the option's letter from the given choices directly.")
    q3 = qs[2]
    assert "image" not in q3 and not q3["text"].startswith("<image>")
    # LLaVA collapses double spaces; empty context becomes N/A
    assert q3["text"].startswith("Context: Look at the words.\n")
    assert qs[3]["text"].startswith("Context: N/A\nQuestion: What is 2+2?\n")
    assert "(E) e" in qs[4]["text"]


def test_convert_qcm_and_bad_format(base_dir):
    qs = scienceqa.convert(str(base_dir), "test", "QCM-LEPA", answer_instruction=False)
    assert qs[2]["text"] == "Which word is a noun?\nContext: Look at the words.\nOptions: (A) run (B) dog"
    with pytest.raises(ValueError, match="input part"):
        scienceqa.convert(str(base_dir), "test", "XYZ-A")
    with pytest.raises(KeyError, match="no split 'dev'"):
        scienceqa.convert(str(base_dir), "dev")


def test_score_llava_numbers_and_ours(base_dir, tmp_path, capsys):
    """LLaVA's eval_science_qa.py on this file, by hand: it parses the raw text, counts every split problem
    (missing = wrong) and counts IMG over the answers whose prompt holds "<image>" (a missing answer has none)."""
    answers = [
        {"question_id": "1", "prompt": "<image>\n...", "text": "C. "},        # rule 2 -> C, correct
        {"question_id": "2", "prompt": "<image>\n...", "text": "A. Ohio"},    # A, wrong
        {"question_id": "3", "prompt": "...", "text": " B"},                  # not stripped -> FAILED, wrong
        {"question_id": "4", "prompt": "...", "text": "The answer is B. 4"},  # rule 3 -> B, correct
        {"question_id": "5", "prompt": "<image>\n...", "text": "E\n"},        # not stripped -> FAILED, wrong
        {"question_id": "6", "prompt": "<image>\n...", "text": "A"},          # correct; no image, but <image> prompt
        # "7" (an image problem) has no answer line -> wrong, and not in LLaVA's IMG
        {"question_id": "99", "prompt": "...", "text": "A"},                  # not in the split
    ]
    res = tmp_path / "answers.jsonl"
    res.write_text("".join(json.dumps(a) + "\n" for a in answers[::-1]))  # pairing is by question_id
    out, result = tmp_path / "out" / "o.jsonl", tmp_path / "out" / "r.json"
    rc = scienceqa.main(["score", "--base-dir", str(base_dir), "--result-file", str(res),
                         "--output-file", str(out), "--output-result", str(result)])
    assert rc == 0
    s = json.loads(result.read_text())
    # LLaVA: correct = 1, 4, 6 of 7; IMG = answers 1, 2, 5, 6 (prompt has <image>), correct 1 and 6
    assert capsys.readouterr().out.splitlines()[0] == "Total: 7, Correct: 3, Accuracy: 42.86%, IMG-Accuracy: 50.00%"
    assert (s["correct"], s["count"]) == (3, 7) and s["acc"] == pytest.approx(300 / 7)
    assert (s["img_correct"], s["img_count"]) == (2, 4) and s["img_acc"] == pytest.approx(50.0)
    assert s["results"] == {"1": 2, "2": 0, "3": -1, "4": 1, "5": -1, "6": 0, "7": -1}
    assert s["outputs"] == {"1": "C. ", "2": "A. Ohio", "3": " B", "4": "The answer is B. 4", "5": "E\n", "6": "A",
                            "7": "FAILED"}
    # ours: problems with an image 1, 2, 5, 7 -> only 1 correct
    assert s["image_problems"] == {"acc": 25.0, "correct": 1, "count": 4}
    g = s["groups"]
    assert (g["NAT"]["correct"], g["NAT"]["count"]) == (2, 3)   # 1, 4, 5
    assert (g["SOC"]["correct"], g["SOC"]["count"]) == (1, 3)   # 2, 6, 7
    assert (g["LAN"]["correct"], g["LAN"]["count"]) == (0, 1)   # 3
    assert (g["TXT"]["correct"], g["TXT"]["count"]) == (1, 2)   # 1, 3
    assert (g["IMG"]["correct"], g["IMG"]["count"]) == (1, 4)   # 1, 2, 5, 7
    assert (g["NO"]["correct"], g["NO"]["count"]) == (2, 2)     # 4, 6
    assert (g["G1-6"]["correct"], g["G1-6"]["count"]) == (2, 4)   # 1, 3, 6, 7
    assert (g["G7-12"]["correct"], g["G7-12"]["count"]) == (1, 3)  # 2, 4, 5
    assert s["missing_answers"] == 1 and s["unknown_answers"] == 1
    assert s["unparsed_answers"] == 2 and s["out_of_range_answers"] == 0
    recs = {r["question_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert recs["7"]["missing"] and recs["7"]["parsed_ans"] == "FAILED" and not recs["7"]["is_multimodal"]
    assert recs["6"]["is_multimodal"] and not recs["6"]["has_image"]


def test_score_letter_beyond_choices_and_empty_img(base_dir):
    """A letter past a problem's choices is wrong; with no "<image>" prompt LLaVA's IMG-Accuracy divides by zero
    (it crashes): n/a here."""
    problems, pids = scienceqa.load_split(str(base_dir), "test")
    _, s = scienceqa.score(problems, pids, [{"question_id": "6", "prompt": "...", "text": "C"},
                                            {"question_id": "4", "prompt": "...", "text": "B"}])
    assert (s["correct"], s["count"], s["out_of_range_answers"], s["missing_answers"]) == (1, 7, 1, 5)
    assert s["img_acc"] is None and s["img_count"] == 0
    assert scienceqa.format_summary(s).splitlines()[0] == "Total: 7, Correct: 1, Accuracy: 14.29%, IMG-Accuracy: n/a"


def test_score_tolerates_bad_answer_lines_and_problems(base_dir, tmp_path):
    probs = json.loads((base_dir / "problems.json").read_text())
    probs["4"]["answer"] = None  # a problem without a ground truth is skipped and counted
    (base_dir / "problems.json").write_text(json.dumps(probs))
    problems, pids = scienceqa.load_split(str(base_dir), "test")
    _, s = scienceqa.score(problems, pids, [{"question_id": "1", "text": None}, {"question_id": 3, "text": "B"}])
    assert s["no_ground_truth"] == 1 and s["count"] == 6
    assert s["malformed_answers"] == 1 and s["missing_answers"] == 4
    assert s["correct"] == 1  # int question_id 3 pairs with pid "3"
    with pytest.raises(ValueError, match="appears twice"):
        scienceqa.score(problems, pids, [{"question_id": "1", "text": "A"}, {"question_id": "1", "text": "B"}])


def test_missing_files_error_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="problems.json"):
        scienceqa.load_split(str(tmp_path), "test")
