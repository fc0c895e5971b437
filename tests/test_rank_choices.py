"""drip_llava.eval.rank_choices: option scores (prompt once, options from its cache) equal the model's own loss on
each whole sequence, a tiny model that learned an image-only answer ranks it first with the image and not with a
blank one, the highest score's letter is the answer, and the real scorer reads the output."""
import json

import pytest
import torch
from PIL import Image

from drip_llava.constants import SHORT_ANSWER_PROMPT
from drip_llava.data.dataset import DataCollatorForSupervisedDataset, ImageLoader, LazySupervisedDataset
from drip_llava.data.image_processor import DripLlavaImageProcessor
from drip_llava.eval import rank_choices, scienceqa
from drip_llava.jsonl import read_jsonl
from drip_llava.model import DripLlavaForCausalLM

COLOURS = {"Red": (220, 30, 30), "Blue": (35, 65, 225)}
QUESTION = "What colour is the image?"


def _problem(image, choices, answer, hint=""):
    return {"question": QUESTION if image else "Which colour did Mia name?", "choices": choices, "answer": answer,
            "hint": hint, "image": image, "task": "closed choice", "grade": "grade1", "subject": "natural science",
            "topic": "colours", "category": "c", "skill": "s", "lecture": "", "solution": "", "split": "test"}


def _sqa(base, image_root, grey=False):
    """8 image problems (red / blue, options in rotated orders) and one text-only problem; images flat colours, or
    all grey for the blank control."""
    problems = {}
    for i in range(8):
        name = list(COLOURS)[i % 2]
        pid = str(i + 1)
        (image_root / pid).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (128, 128), (128, 128, 128) if grey else COLOURS[name]).save(image_root / pid / "image.png")
        # an option of several tokens: a problem's options differ in length and are padded in their batch
        choices = ["red", "blue", "light greenish yellow"]
        choices = choices[i % 3:] + choices[:i % 3]
        problems[pid] = _problem("image.png", choices, choices.index(name.lower()))
    problems["9"] = _problem(None, ["green", "red"], 1, hint="Mia looked at the picture for a long while, "
                                                             "thought about it, and then said: red.")
    (base / "problems.json").write_text(json.dumps(problems))
    (base / "pid_splits.json").write_text(json.dumps({"test": list(problems)}))
    return problems


def _train_colour_reader(model, tok, folder, fit):
    """Teach the tiny model the short-answer colour question (what the ranking prompt asks)."""
    records = []
    for i in range(8):
        name = list(COLOURS)[i % 2]
        Image.new("RGB", (128, 128), COLOURS[name]).save(folder / f"{i}.png")
        q = f"Context: N/A\nQuestion: {QUESTION}\n{SHORT_ANSWER_PROMPT}"
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": name}]})
    tower = model.get_vision_tower()
    loader = ImageLoader(str(folder), DripLlavaImageProcessor.from_vision_config(tower.config, "pad"))
    ds = LazySupervisedDataset(records, tok, "chat_template", loader, 256, skip_bad_samples=False)
    fit(model, DataCollatorForSupervisedDataset(pad_token_id=tok.pad_token_id)([ds[i] for i in range(len(ds))]))


def _rank(model, tok, base, image_root):
    """(ranked scores, reference scores): the reference is the model's own teacher-forced loss on each whole
    (prompt + option) sequence, an independent path through the training forward."""
    problems, pids = scienceqa.load_split(str(base), "test")
    records, owners = rank_choices.choice_records(problems, pids)
    tower = model.get_vision_tower()
    loader = ImageLoader(str(image_root), DripLlavaImageProcessor.from_vision_config(tower.config, "pad"))
    ds = LazySupervisedDataset(records, tok, "chat_template", loader, 256, skip_bad_samples=False)
    collate = DataCollatorForSupervisedDataset(pad_token_id=tok.pad_token_id)
    ref: dict[str, list[float]] = {}
    with torch.no_grad():
        for i, (pid, _) in enumerate(owners):
            ref.setdefault(pid, []).append(-float(model(**collate([ds[i]])).loss))
    return rank_choices.rank_choices(model, ds, owners), ref


def _accuracy(problems, scores, pids):
    return sum(max(range(len(scores[p])), key=scores[p].__getitem__) == problems[p]["answer"] for p in pids) / len(pids)


def test_ranking_reads_the_image_and_matches_the_training_loss(tiny_llm_dir, tiny_drip_dir, tmp_path, fit_batch):
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(tiny_llm_dir))
    model = DripLlavaForCausalLM.from_pretrained(str(tiny_llm_dir))
    model.initialize_vision_modules(str(tiny_drip_dir), "mlp2x_gelu", select_layer=-2)
    (tmp_path / "train").mkdir()
    _train_colour_reader(model, tok, tmp_path / "train", fit_batch)

    problems = _sqa(tmp_path, tmp_path / "images" / "test")
    ranked, ref = _rank(model, tok, tmp_path, tmp_path / "images" / "test")
    assert set(ranked) == set(problems) and all(len(ranked[p]) == len(problems[p]["choices"]) for p in problems)
    for pid in ranked:  # prompt once + options from its KV cache == each whole sequence on its own
        assert ranked[pid] == pytest.approx(ref[pid], abs=1e-4), pid
    image_pids = [str(i + 1) for i in range(8)]
    assert _accuracy(problems, ranked, image_pids) == 1.0, ranked

    (tmp_path / "blank").mkdir()
    _sqa(tmp_path / "blank", tmp_path / "blank" / "images" / "test", grey=True)
    blank, _ = _rank(model, tok, tmp_path / "blank", tmp_path / "blank" / "images" / "test")
    assert _accuracy(problems, blank, image_pids) <= 0.75, blank  # one grey image: the same pick for all


@pytest.mark.parametrize("scores,letter", [
    ([-1.2, -0.3, -2.0], "B"),                    # the highest mean log-prob (closest to 0) wins
    ([-0.9, -0.7, -0.8, -3.0, -0.1], "E"),        # the fifth option is E
    ([-0.5, -0.5], "A"),                          # a tie goes to the first option
    ([float("nan"), -2.0, -1.0], "C"),            # a NaN never wins, even in first place
    ([float("-inf"), -5.0], "B"),
])
def test_best_letter_is_the_argmax(scores, letter):
    assert rank_choices.best_letter(scores) == letter


@pytest.mark.parametrize("n", [0, 6])
def test_best_letter_needs_one_to_five_options(n):
    with pytest.raises(ValueError, match="option scores"):
        rank_choices.best_letter([-1.0] * n)


def test_cli_writes_answers_the_scorer_reads(tiny_llm_dir, tiny_drip_dir, tmp_path):
    model = DripLlavaForCausalLM.from_pretrained(str(tiny_llm_dir))
    model.initialize_vision_modules(str(tiny_drip_dir), "mlp2x_gelu", select_layer=-2)
    model.save_mm_projector(tmp_path / "stage1")
    problems = _sqa(tmp_path, tmp_path / "images" / "test")
    answers = tmp_path / "ranked.jsonl"
    rank_choices.main(["--base-dir", str(tmp_path), "--model-path", str(tmp_path / "stage1"), "--model-base",
                       str(tiny_llm_dir), "--answers-file", str(answers), "--conv-mode", "chat_template",
                       "--device", "cpu"])
    rows = read_jsonl(answers)
    assert [r["question_id"] for r in rows] == list(problems)
    assert all(r["text"] in "ABC" for r in rows)
    for r in rows:  # the written letter is the argmax of the scores written beside it
        s = r["metadata"]["choice_logprobs"]
        assert r["text"] == "ABCDE"[s.index(max(s))]
    assert [len(r["metadata"]["choice_logprobs"]) for r in rows] == [3] * 8 + [2]
    assert rows[0]["prompt"].startswith("<image>\nContext: N/A\nQuestion: What colour")
    assert rows[-1]["prompt"].startswith("Context: Mia looked")
    problems_, pids = scienceqa.load_split(str(tmp_path), "test")
    _, summary = scienceqa.score(problems_, pids, rows)
    assert summary["count"] == 9
