"""Text for the shapes world: captions, LLaVA conversations, ScienceQA and LLaVA-Bench items.

Everything is written from the scene description (see `drip_demo.synthetic.sample_scene`), so
answers are exact. Each function takes the RNG it may use, so output is deterministic per seed.
"""
from __future__ import annotations

import random

from drip_demo.synthetic import (
    CLASSNAMES,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    item_rng,
    sample_scene,
)
from drip_llava.constants import MC_ANSWER_PROMPT, SHORT_ANSWER_PROMPT

MC_SUFFIX, SHORT_SUFFIX = MC_ANSWER_PROMPT, SHORT_ANSWER_PROMPT  # LLaVA-1.5's answer-format lines
LETTERS = "ABCDE"

POS_PHRASES = {
    "top-left": ("in the top-left corner", "at the top left", "in the upper left"),
    "top": ("at the top", "at the top center", "in the upper middle"),
    "top-right": ("in the top-right corner", "at the top right", "in the upper right"),
    "left": ("on the left", "at the middle left", "on the left side"),
    "center": ("in the center", "in the middle", "at the center"),
    "right": ("on the right", "at the middle right", "on the right side"),
    "bottom-left": ("in the bottom-left corner", "at the bottom left", "in the lower left"),
    "bottom": ("at the bottom", "at the bottom center", "in the lower middle"),
    "bottom-right": ("in the bottom-right corner", "at the bottom right", "in the lower right"),
}
SIZE_WORDS = {"small": ("small", "little"), "medium": ("medium-sized", "medium"), "large": ("large", "big")}
BG_PHRASES = {
    "plain": ("on a plain {c} background", "against a plain {c} background", "on a flat {c} background"),
    "stripes": ("on a {c} striped background", "over {c} stripes", "on a background of {c} stripes"),
    "checker": ("on a {c} checkered background", "over a {c} checkerboard", "on a {c} checker pattern"),
    "noise": ("on a noisy {c} background", "on a grainy {c} background", "against a speckled {c} background"),
}
TEXTURE_ANSWER = {"plain": "plain", "stripes": "stripes", "checker": "checkerboard", "noise": "noise"}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
PRETRAIN_INSTRUCTIONS = (
    "Describe the image briefly.", "Give a brief description of the image.", "Write a short caption for the image.",
    "What is in this picture?", "Summarize the visual content of the image.",
    "Share a concise interpretation of the image provided.", "Provide a brief description of the given image.",
)
NAMES = ("Mia", "Leo", "Ava", "Noah", "Zoe", "Omar", "Lena", "Ravi", "Sara", "Tom")


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _pos_word(pos: str) -> str:
    """Canonical short answer for a grid position ("top left", "center", ...)."""
    return pos.replace("-", " ")


def _np(o: dict, rng: random.Random | None = None) -> str:
    """Noun phrase: "a large red circle" (size word varied when rng is given)."""
    size = rng.choice(SIZE_WORDS[o["size"]]) if rng else SIZE_WORDS[o["size"]][0]
    return _a(f"{size} {o['colour']} {o['shape']}")


def _pos(o: dict, rng: random.Random | None = None) -> str:
    return rng.choice(POS_PHRASES[o["position"]]) if rng else POS_PHRASES[o["position"]][0]


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _bg(scene: dict, rng: random.Random | None = None) -> str:
    b = scene["background"]
    options = BG_PHRASES[b["texture"]]
    return (rng.choice(options) if rng else options[0]).format(c=b["colour"])


def _listing(scene: dict, rng: random.Random | None = None, shuffle: bool = False) -> list[str]:
    objs = list(scene["objects"])
    if shuffle and rng:
        rng.shuffle(objs)
    return [f"{_np(o, rng)} {_pos(o, rng)}" for o in objs]


def caption(scene: dict, rng: random.Random) -> str:
    """A natural one- or two-sentence caption naming every object's size, colour, shape and position.

    The largest object (the class) is always named first: the tiny CLIP text towers see 32 tokens, and a
    caption that buries the class after other objects teaches zero-shot classification far more slowly.
    """
    objs = scene["objects"]
    items = _listing(scene, rng)
    n, bg, big = len(objs), _bg(scene, rng), objs[0]
    if n == 1:
        t = rng.randrange(5)
        return [f"{_cap(items[0])}, {bg}.", f"A picture of {items[0]} {bg}.", f"There is {items[0]} {bg}.",
                f"An image showing {items[0]} {bg}.", f"A single shape {bg}: {items[0]}."][t]
    t = rng.randrange(5)
    lst, nw = _join(items), NUMBER_WORDS[n]
    return [f"{_cap(lst)}, {bg}.", f"There are {nw} shapes {bg}: {lst}.", f"A picture of {lst}, {bg}.",
            f"{_cap(nw)} shapes {bg}: {lst}. The biggest one is the {big['colour']} {big['shape']}.",
            f"An image with {lst}. The shapes are {bg}."][t]


def alt_text(scene: dict, rng: random.Random) -> str:
    """Short web-style alt text for the CLIP shards: the objects only, largest (the class) first.

    No background or positions: with them, a tiny CLIP trained for a few CPU minutes matches images by
    background and layout and stays at chance on colour+shape zero-shot (measured: 3% after 100 steps).
    """
    objs = scene["objects"]
    head = f"{rng.choice(SIZE_WORDS[objs[0]['size']])} {objs[0]['colour']} {objs[0]['shape']}"
    rest = [f"{o['colour']} {o['shape']}" for o in objs[1:]]
    lead = rng.choice(("a photo of a {}", "a {}", "{}", "a picture of a {}"))
    return lead.format(head) + (" with a " + " and a ".join(rest) if rest else "")


def detailed_description(scene: dict) -> str:
    """Several sentences: count, background, every object, and which one is largest."""
    objs = scene["objects"]
    n = len(objs)
    head = (f"The image shows a single shape {_bg(scene)}." if n == 1
            else f"The image shows {NUMBER_WORDS[n]} shapes {_bg(scene)}.")
    parts = [head]
    for i, o in enumerate(objs):
        s = f"{_cap(_np(o))} is {_pos(o)}"
        s += (", and it is the largest shape." if i == 0 and n > 1 else ".")
        parts.append(s)
    parts.append("There are no other objects in the picture.")
    return " ".join(parts)


# ---------------------------------------------------------------- question generators
# Each returns dict(type, q, answer, pool) or None if the scene does not allow it. `answer` is the
# canonical lowercase short answer; `pool` the wrong answers multiple-choice distractors come from.

def _q_colour_largest(scene, rng):
    big = scene["objects"][0]
    q = rng.choice(("What colour is the largest shape?", "What is the colour of the biggest shape?",
                    "Which colour is the largest object?"))
    return {"type": "colour_largest", "q": q, "answer": big["colour"],
            "pool": [c for c in COLOURS if c != big["colour"]]}


def _q_shape_largest(scene, rng):
    big = scene["objects"][0]
    q = rng.choice(("What shape is the largest object?", "What kind of shape is the biggest one?",
                    "Which shape is the largest?"))
    return {"type": "shape_largest", "q": q, "answer": big["shape"],
            "pool": [s for s in SHAPES if s != big["shape"]]}


def _q_class_largest(scene, rng):
    big = scene["objects"][0]
    name = f"{big['colour']} {big['shape']}"
    # Hard distractors first: same colour or same shape.
    near = [c for c in CLASSNAMES
            if c != name and (c.startswith(big["colour"] + " ") or c.endswith(" " + big["shape"]))]
    q = rng.choice(("What is the largest object in the image?", "What is the biggest shape in the picture?"))
    return {"type": "class_largest", "q": q, "answer": name, "pool": near}


def _q_count(scene, rng):
    n = len(scene["objects"])
    q = rng.choice(("How many shapes are there?", "How many shapes are in the image?",
                    "How many objects can you see?"))
    return {"type": "count", "q": q, "answer": str(n), "pool": [str(k) for k in (1, 2, 3, 4) if k != n]}


def _q_shape_at(scene, rng):
    o = rng.choice(scene["objects"])
    where = POS_PHRASES[o["position"]][0]
    q = rng.choice((f"Which shape is {where}?", f"What shape is {where}?"))
    return {"type": "shape_at", "q": q, "answer": o["shape"], "pool": [s for s in SHAPES if s != o["shape"]]}


def _q_colour_at(scene, rng):
    o = rng.choice(scene["objects"])
    q = f"What colour is the shape {POS_PHRASES[o['position']][0]}?"
    return {"type": "colour_at", "q": q, "answer": o["colour"], "pool": [c for c in COLOURS if c != o["colour"]]}


def _q_position_of(scene, rng):
    o = rng.choice(scene["objects"])
    q = rng.choice((f"Where is the {o['colour']} {o['shape']}?",
                    f"In which part of the image is the {o['colour']} {o['shape']}?"))
    return {"type": "position_of", "q": q, "answer": _pos_word(o["position"]),
            "pool": [_pos_word(p) for p in POSITIONS if p != o["position"]]}


def _q_colour_of_shape(scene, rng):
    shapes = [o["shape"] for o in scene["objects"]]
    unique = [o for o in scene["objects"] if shapes.count(o["shape"]) == 1]
    if not unique:
        return None
    o = rng.choice(unique)
    return {"type": "colour_of_shape", "q": f"What colour is the {o['shape']}?", "answer": o["colour"],
            "pool": [c for c in COLOURS if c != o["colour"]]}


def _q_shape_of_colour(scene, rng):
    colours = [o["colour"] for o in scene["objects"]]
    unique = [o for o in scene["objects"] if colours.count(o["colour"]) == 1]
    if not unique:
        return None
    o = rng.choice(unique)
    return {"type": "shape_of_colour", "q": f"What shape is the {o['colour']} one?", "answer": o["shape"],
            "pool": [s for s in SHAPES if s != o["shape"]]}


def _q_size_of(scene, rng):
    o = rng.choice(scene["objects"])
    return {"type": "size_of", "q": f"What size is the {o['colour']} {o['shape']}?", "answer": o["size"],
            "pool": [s for s in SIZES if s != o["size"]]}


def _q_exists(scene, rng):
    present = {f"{o['colour']} {o['shape']}" for o in scene["objects"]}
    if rng.random() < 0.5:
        name, ans = rng.choice(sorted(present)), "yes"
    else:
        name, ans = rng.choice([c for c in CLASSNAMES if c not in present]), "no"
    return {"type": "exists", "q": f"Is there {_a(name)} in the image?", "answer": ans,
            "pool": ["no" if ans == "yes" else "yes"]}


def _q_cell_occupied(scene, rng):
    pos = rng.choice(POSITIONS)
    ans = "yes" if any(o["position"] == pos for o in scene["objects"]) else "no"
    return {"type": "cell_occupied", "q": f"Is there a shape {POS_PHRASES[pos][0]}?", "answer": ans,
            "pool": ["no" if ans == "yes" else "yes"]}


def _q_background(scene, rng):
    tex = TEXTURE_ANSWER[scene["background"]["texture"]]
    return {"type": "background", "q": "What pattern does the background have?", "answer": tex,
            "pool": [t for t in TEXTURE_ANSWER.values() if t != tex]}


CONV_QUESTIONS = (_q_colour_largest, _q_shape_largest, _q_class_largest, _q_count, _q_shape_at, _q_colour_at,
                  _q_position_of, _q_colour_of_shape, _q_shape_of_colour, _q_size_of, _q_exists,
                  _q_cell_occupied, _q_background)
# ScienceQA questions must need the image (or, for text-only ones, the hint).
SQA_QUESTIONS = (_q_colour_largest, _q_shape_largest, _q_class_largest, _q_count, _q_shape_at, _q_colour_at,
                 _q_position_of, _q_colour_of_shape)
SQA_TOPIC = {
    "colour_largest": ("colours", "Identify colours", "Identify the colour of the largest shape"),
    "shape_largest": ("shapes", "Identify shapes", "Identify the largest shape"),
    "class_largest": ("shapes", "Identify shapes", "Name the largest object"),
    "count": ("counting", "Count objects", "Count the shapes in a picture"),
    "shape_at": ("positions", "Spatial relations", "Identify the shape at a position"),
    "colour_at": ("positions", "Spatial relations", "Identify the colour at a position"),
    "position_of": ("positions", "Spatial relations", "Locate a shape"),
    "colour_of_shape": ("colours", "Identify colours", "Identify the colour of a shape"),
}
TEXT_SKILL = "Answer from a written description"  # the skill of the text-only problems (no image)
SQA_SKILL_TYPE = {skill: t for t, (_, _, skill) in SQA_TOPIC.items()} | {TEXT_SKILL: "text_only"}
# What each ScienceQA-format question type needs from the image, as drip_demo.attribute_probe names the
# attributes: a type is answerable from the image only if the tower's tokens encode its attribute.
SQA_ATTRIBUTE = {"colour_largest": "colour", "colour_at": "colour", "colour_of_shape": "colour", "count": "count",
                 "position_of": "cell", "shape_largest": "shape", "class_largest": "shape", "shape_at": "shape"}
# Question-type mixes of the ScienceQA-format problems (weights over SQA_QUESTIONS; None: each applicable type
# equally likely). "readable" weights the attributes a tower learns in a few CPU minutes of CLIP: colour 70%
# (the attribute probes read it at ~5x chance), count and position 10% each (near chance), shape 10% (at chance:
# a control that should not move). It buys a with-image vs blank test its power at the demo's problem count.
SQA_MIXES = {
    "uniform": None,
    "readable": {"colour_largest": 0.35, "colour_at": 0.175, "colour_of_shape": 0.175, "count": 0.10,
                 "position_of": 0.10, "shape_largest": 0.10 / 3, "class_largest": 0.10 / 3, "shape_at": 0.10 / 3},
}


def _ask(gens, scene, rng, exclude=(), weights: dict | None = None):
    """The first applicable question of the generators in a random order: uniform, or drawn by `weights` (question
    type -> weight, without replacement), so a type that does not apply to the scene passes to the next draw."""
    gens = [g for g in gens if g.__name__ not in exclude]
    if weights is None:
        rng.shuffle(gens)
    else:
        pool, order = [g for g in gens if weights.get(g.__name__[3:], 0) > 0], []
        while pool:
            g = rng.choices(pool, [weights[h.__name__[3:]] for h in pool])[0]
            order.append(g)
            pool.remove(g)
        gens = order
    for g in gens:
        item = g(scene, rng)
        if item is not None:
            return item, g.__name__
    raise ValueError("no question applies to this scene")


def _choices(item: dict, rng: random.Random, n: int) -> tuple[list[str], int]:
    """`n` options (answer + random distractors, at most what the pool allows), answer at a random slot."""
    n = min(n, len(item["pool"]) + 1)
    opts = rng.sample(item["pool"], n - 1)
    k = rng.randrange(n)
    opts.insert(k, item["answer"])
    return opts, k


def _options_text(opts: list[str]) -> str:
    return " ".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(opts))


def mc_prompt(question: str, opts: list[str], context: str = "N/A") -> str:
    """LLaVA's ScienceQA prompt (CQM-A) with the single-letter instruction, as its eval builds it."""
    return f"Context: {context}\nQuestion: {question}\nOptions: {_options_text(opts)}\n{MC_SUFFIX}"


def _turn(item: dict, rng: random.Random, mc: bool) -> tuple[str, str]:
    if mc:
        opts, k = _choices(item, rng, rng.randint(2, 5))
        if rng.random() < 0.7:
            return mc_prompt(item["q"], opts), LETTERS[k]
        return f"{item['q']} Options: {_options_text(opts)}. {MC_SUFFIX}", LETTERS[k]
    q = f"{item['q']}\n{SHORT_SUFFIX}" if rng.random() < 0.5 else item["q"]
    return q, _cap(item["answer"])


def _image_path(rec: dict) -> str:
    """Image path relative to DIR/imagefolder (LLaVA --image_folder)."""
    return f"{rec['split']}/{rec['classname']}/{rec['key']}.jpg"


def pretrain_records(records: list[dict], seed: int) -> list[dict]:
    """LLaVA stage-1 JSON: one (instruction, short caption) conversation per image.

    The short alt text, as LLaVA's stage 1 uses short BLIP captions: most of its tokens name what the image
    shows (colours, shapes), which is the signal that aligns the projector. With the long captions (background,
    positions, sentence templates) a 60-step stage 1 mostly learned the sentence style."""
    out = []
    for rec in records:
        rng = item_rng(seed, rec["split"], rec["index"], "pretrain")
        out.append({"id": f"{rec['split']}_{rec['key']}", "image": _image_path(rec), "conversations": [
            {"from": "human", "value": "<image>\n" + rng.choice(PRETRAIN_INSTRUCTIONS)},
            {"from": "gpt", "value": rec["alt_text"]}]})
    return out


def conversation(scene: dict, rng: random.Random) -> list[dict]:
    """2-4 question/answer turns (some multiple choice, sometimes a description); <image> in turn 1."""
    turns, used = [], set()
    n_turns = rng.randint(2, 4)
    describe_at = rng.randrange(n_turns) if rng.random() < 0.15 else -1
    for t in range(n_turns):
        if t == describe_at:
            q, a = rng.choice(PRETRAIN_INSTRUCTIONS), caption(scene, rng)
        else:
            item, name = _ask(CONV_QUESTIONS, scene, rng, exclude=used)
            used.add(name)
            q, a = _turn(item, rng, mc=rng.random() < 0.35)
        turns += [{"from": "human", "value": ("<image>\n" + q) if t == 0 else q}, {"from": "gpt", "value": a}]
    return turns


# Stage-2 reading warm-up: only the colour questions, short answers. SmolLM2-135M with LoRA learns to read
# colour from the DRIP tokens when nearly every answer needs it, and not from the 13-type mix: 25 warm-up steps
# before 35 of the mix, in order, give a held-out wrong-image gap of +0.012 +- 0.004 and colour questions 33/69
# by likelihood vs 25/69 blank; the mix alone +0.001, and no colour-type gain (docs/experiments.md, "Curriculum").
WARMUP_QUESTIONS = (_q_colour_largest, _q_colour_at, _q_colour_of_shape)


def warmup_conversation(scene: dict, rng: random.Random, turns: int = 3) -> list[dict]:
    """Up to `turns` different colour questions with short answers; the first carries <image> and SHORT_SUFFIX."""
    out, used = [], set()
    for t in range(turns):
        try:
            item, name = _ask(WARMUP_QUESTIONS, scene, rng, exclude=used)
        except ValueError:  # no colour question left for this scene
            break
        used.add(name)
        q = f"<image>\n{item['q']}\n{SHORT_SUFFIX}" if t == 0 else item["q"]
        out += [{"from": "human", "value": q}, {"from": "gpt", "value": _cap(item["answer"])}]
    return out


def text_only_problem(rng: random.Random) -> tuple[str, dict]:
    """A question answerable from a written context alone (no image): returns (hint, item)."""
    scene = sample_scene(rng)
    hint = f"{rng.choice(NAMES)} drew a picture. It shows {_join(_listing(scene, rng, shuffle=True))}."
    item, _ = _ask(SQA_QUESTIONS, scene, rng, exclude=("_q_colour_at", "_q_shape_at"))
    q = item["q"].replace("in the image", "in the picture")
    item["q"] = "Based on the context, " + q[0].lower() + q[1:]
    return hint, item


def warmup_records(records: list[dict], seed: int) -> list[dict]:
    """The reading warm-up block of stage 2 (see WARMUP_QUESTIONS): one colour conversation per record."""
    return [{"id": f"warmup_{rec['split']}_{rec['key']}", "image": _image_path(rec),
             "conversations": warmup_conversation(rec, item_rng(seed, rec["split"], rec["index"], "warmup"))}
            for rec in records]


def instruct_records(records: list[dict], seed: int, text_only_frac: float = 0.05) -> list[dict]:
    """LLaVA stage-2 JSON: a multi-turn conversation per image, plus a few text-only context questions."""
    out = []
    for rec in records:
        rng = item_rng(seed, rec["split"], rec["index"], "instruct")
        out.append({"id": f"{rec['split']}_{rec['key']}", "image": _image_path(rec),
                    "conversations": conversation(rec, rng)})
    for i in range(int(round(len(records) * text_only_frac))):
        rng = item_rng(seed, "train", i, "instruct-text")
        hint, item = text_only_problem(rng)
        opts, k = _choices(item, rng, rng.randint(2, 5))
        out.append({"id": f"text_{i:06d}", "conversations": [
            {"from": "human", "value": mc_prompt(item["q"], opts, context=hint)},
            {"from": "gpt", "value": LETTERS[k]}]})
    return out


def short_answer_questions(records: list[dict], seed: int) -> list[dict]:
    """Held-out exact-match questions (LLaVA question jsonl + "answer"), one per val image."""
    rows = []
    for rec in records:
        rng = item_rng(seed, rec["split"], rec["index"], "short-qa")
        item, _ = _ask(CONV_QUESTIONS, rec, rng)
        rows.append({"question_id": f"{rec['split']}_{rec['key']}", "image": _image_path(rec),
                     "text": f"{item['q']}\n{SHORT_SUFFIX}", "answer": _cap(item["answer"]),
                     "category": item["type"]})
    return rows


def _sqa_problem(item: dict, hint: str, image: str | None) -> dict:
    topic, category, skill = SQA_TOPIC.get(item["type"], ("shapes", "Identify shapes", item["type"]))
    if image is None:
        topic, category, skill = "reading", "Use context clues", TEXT_SKILL
    return {"question": item["q"], "choices": None, "answer": None, "hint": hint, "image": image,
            "task": "closed choice", "grade": "grade1", "subject": "natural science", "topic": topic,
            "category": category, "skill": skill, "lecture": "", "solution": "", "split": "test",
            "_item": item}


def scienceqa_problems(records: list[dict], seed: int, pid_of, mix: str = "uniform") -> tuple[dict, dict]:
    """ScienceQA problems.json / pid_splits.json: one image question per record (pid_of(index)), its type drawn
    by the SQA_MIXES entry `mix`, and ~10% text-only questions answered from the hint. Answer slots are exactly
    balanced per number of choices, so always answering "A" scores at chance."""
    if mix not in SQA_MIXES:
        raise ValueError(f"unknown question mix {mix!r}; one of {sorted(SQA_MIXES)}")
    problems: dict[str, dict] = {}
    n_choices: dict[str, int] = {}
    for rec in records:
        rng = item_rng(seed, "val", rec["index"], "sqa")
        item, _ = _ask(SQA_QUESTIONS, rec, rng, weights=SQA_MIXES[mix])
        pid = pid_of(rec["index"])
        problems[pid] = _sqa_problem(item, "", "image.png")
        n_choices[pid] = min(rng.randint(2, 5), len(item["pool"]) + 1)
    n_text = int(round(len(records) / 9))
    for i in range(n_text):
        rng = item_rng(seed, "val", i, "sqa-text")
        hint, item = text_only_problem(rng)
        pid = str(len(records) + i + 1)
        if pid in problems:
            raise ValueError(f"ScienceQA pid clash {pid}: pid_of must give 1..len(records)")
        problems[pid] = _sqa_problem(item, hint, None)
        n_choices[pid] = min(rng.randint(2, 5), len(item["pool"]) + 1)
    # Balance: within each group of equal choice count, answer slots cycle 0..n-1 in a seeded order.
    groups: dict[int, list[str]] = {}
    for pid in problems:
        groups.setdefault(n_choices[pid], []).append(pid)
    for n, pids in sorted(groups.items()):
        slots = [k % n for k in range(len(pids))]
        random.Random(f"shapes-world/{seed}/sqa-balance/{n}").shuffle(slots)
        for pid, slot in zip(pids, slots):
            p = problems[pid]
            item = p.pop("_item")
            drng = item_rng(seed, "val", int(pid), "sqa-distractors")
            opts = drng.sample(item["pool"], n - 1)
            opts.insert(slot, item["answer"])
            p["choices"], p["answer"] = opts, slot
    return problems, {"train": [], "val": [], "test": list(problems)}


# ---------------------------------------------------------------- LLaVA-Bench
_RULE = ("We would like to request your feedback on the performance of two AI assistants in response to the user "
         "question displayed above. The user asks the question on observing an image of simple coloured shapes. "
         "For your reference, the visual content of the image is described exactly by the sentences above{extra}. "
         "\nPlease rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant "
         "receives an overall score on a scale of 1 to 10, where a higher score indicates better overall "
         "performance.\nPlease first output a single line containing only two values indicating the scores for "
         "Assistant 1 and 2, respectively. The two scores are separated by a space.\nIn the subsequent line, please "
         "provide a comprehensive explanation of your evaluation, avoiding any potential bias and ensuring that the "
         "order in which the responses were presented does not affect your judgment.")
RULES = {
    "llava_bench_conv": {"role": "Assistant", "prompt": _RULE.format(
        extra="; a correct answer names the right colour, shape, count or position")},
    "llava_bench_detail": {"role": "Assistant", "prompt": _RULE.format(
        extra="; a good description mentions every shape with its size, colour and position, and nothing else")},
    "llava_bench_complex": {"role": "Assistant", "prompt": _RULE.format(
        extra="; a good answer reasons correctly about sizes and positions")},
}


def _conv_item(scene, rng) -> tuple[str, str]:
    objs, t = scene["objects"], rng.randrange(3)
    if t == 0:
        o = rng.choice(objs)
        return (f"What colour is the shape {_pos(o)}?",
                f"The shape {_pos(o)} is {o['colour']}: it is {_np(o)}.")
    if t == 1:
        n = len(objs)
        return ("How many shapes are in the image?",
                f"There {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} shape{'s' if n > 1 else ''} in the image: "
                f"{_join(_listing(scene))}.")
    o = rng.choice(objs)
    return (f"Where is the {o['colour']} {o['shape']}?", f"The {o['colour']} {o['shape']} is {_pos(o)} of the image.")


def _complex_item(scene, rng) -> tuple[str, str]:
    objs = scene["objects"]
    big = objs[0]
    name = f"the {big['colour']} {big['shape']}"
    if len(objs) == 1:
        return ("Which shape is the largest, and how does it compare with the others?",
                f"{_cap(name)} {_pos(big)} is the only shape in the image, so it is also the largest; "
                "there is nothing to compare it with.")
    t = rng.randrange(3)
    if t == 0:
        cmp = [f"about {big['area'] / o['area']:.0f} times the area of the {o['size']} {o['colour']} {o['shape']}"
               for o in objs[1:]]
        return ("Which shape is the largest, and how does it compare with the others?",
                f"{_cap(name)} {_pos(big)} is the largest shape. It covers {_join(cmp)}.")
    if t == 1:
        rest = objs[1:]
        return ("If the largest shape were removed, what would be left in the image?",
                f"Removing {name} {_pos(big)} would leave {_join([f'{_np(o)} {_pos(o)}' for o in rest])} "
                f"{_bg(scene)}.")
    order = ", then ".join(f"the {o['colour']} {o['shape']} ({_pos(o)})" for o in objs)
    return ("List the shapes from largest to smallest and say where each one is.",
            f"From largest to smallest: {order}.")


def llavabench(records: list[dict], seed: int) -> dict:
    """LLaVA-Bench files: questions, answers_gpt4 (references written from the scene), context, rule."""
    questions, answers, context = [], [], []
    for rec in records:
        rng = item_rng(seed, rec["split"], rec["index"], "llavabench")
        image = f"{rec['key']}.jpg"
        context.append({"id": rec["key"], "image": image, "caption": detailed_description(rec)})
        q_detail = rng.choice(("Describe the image in detail.",
                               "Can you describe this image in detail, including every shape and where it is?"))
        items = [("conv", *_conv_item(rec, rng)), ("detail", q_detail, detailed_description(rec)),
                 ("complex", *_complex_item(rec, rng))]
        for category, text, ref in items:
            qid = len(questions)
            questions.append({"question_id": qid, "image": image, "text": text, "category": category})
            answers.append({"question_id": qid, "prompt": text, "text": ref, "answer_id": f"ref-{qid}",
                            "model_id": "shapes-world-reference", "metadata": {}})
    return {"questions": questions, "answers_gpt4": answers, "context": context, "rule": RULES}


def readme(meta: dict) -> str:
    a, c = meta["args"], meta["counts"]
    return f"""# Shapes world (synthetic, generated by `python -m drip_demo.synthetic`)

seed {a['seed']}, image size {a['image_size']} px, {c['train']} train + {c['val']} val images.
Each image has 1-3 shapes (colours: {', '.join(meta['colours'])}; shapes: {', '.join(meta['shapes'])};
sizes small/medium/large; positions on a 3x3 grid) over a plain, striped, checkered or noisy muted
background. Class = colour + shape of the largest object ({len(meta['classnames'])} classes, balanced).

Files (all written from the same scene descriptions):
- `train-%06d.tar`, `val-%06d.tar`: webdataset shards ({c['train_shards']} + {c['val_shards']}); per sample
  `jpg`, `txt` (caption), `json` (scene), `cls` (label).
- `imagefolder/{{train,val}}/<class>/<key>.jpg`: ImageFolder tree (sorted folders = label order).
- `classnames.json`: class names in label order, for zero-shot templates.
- `llava/pretrain.json`: LLaVA stage 1, image + short caption (the alt text) ({c['llava_pretrain']} records).
- `llava/instruct.json`: LLaVA stage 2, 2-4 turn Q&A per train image (some multiple choice), plus ~5%
  text-only context questions, shuffled ({c['llava_instruct']} records); first, when generated with
  `--n-warmup N`, N colour-only short-answer conversations ({c.get('llava_warmup', 0)}): a reading warm-up when
  trained in file order (`--keep_data_order True`).
- `llava/val_pretrain.json`, `llava/val_instruct.json`: the same two formats on the val images (held out;
  `python -m drip_llava.eval.image_use` measures on them whether a model reads the image).
- `llava/val_questions.jsonl`: held-out short-answer questions on the val split with the exact `answer`
  ({c['llava_val_questions']}).
- `scienceqa/problems.json`, `pid_splits.json`, `images/test/<pid>/image.png`: ScienceQA format from the
  val split ({c['scienceqa']} problems, {c['scienceqa_with_image']} with an image; question-type mix
  "{a.get('sqa_mix', 'uniform')}", see `synthetic_questions.SQA_MIXES`).
- `llavabench/questions.jsonl`, `answers_gpt4.jsonl`, `context.jsonl`, `rule.json`, `images/`: LLaVA-Bench
  format ({c['llavabench_questions']} questions).

The image folder for all LLaVA JSON files is `imagefolder/`. `meta.json` holds the arguments and counts;
rerunning with the same arguments reuses this directory.
"""
