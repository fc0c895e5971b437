"""Input ids and labels equal upstream LLaVA's (haotian-liu/LLaVA, llava/train/train.py) for a Llama/Vicuna-style
sentencepiece tokenizer, legacy and non-legacy.

The reference here re-derives upstream's rules on its own, with sentencepiece itself standing in for the slow
LlamaTokenizer LLaVA trains with (use_fast=False): preprocess_multimodal ("<image>" moved to the start of its turn,
the turn stripped), a leading non-human turn dropped, conv_vicuna_v1 rendering, preprocess_v1's per-round count
(instruction = len(tokens of the round up to "ASSISTANT: ") - 2, one token less for later rounds of a non-legacy
tokenizer) and preprocess_plain ("<image>" + caption + "\\n", the image prompt masked), with mm_utils'
tokenizer_image_token. The project labels by character offsets with a fast tokenizer; both must agree token for
token, including the lone "▁" upstream trains before an answer that starts with a digit or a newline.
"""
import random

import pytest

from drip_llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from drip_llava.data import LazySupervisedDataset, build_prompt, normalize_messages, place_image, tokenizer_image_token
from drip_llava.data.conversation import preprocess_conversation

SYSTEMS = {  # conv_vicuna_v1 / conv_llava_v1 (both version "v1": preprocess_v1)
    "vicuna_v1": "A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "llava_v1": "A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.",
}
SPECIALS = ("<unk>", "<s>", "</s>")
BOS, EOS = 1, 2


# ---- a Vicuna-like sentencepiece model ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """BPE with byte fallback, digits split, identity normalisation, no whitespace folding, dummy prefix (as Llama's
    tokenizer.model). "USER" is a piece but "▁USER" is not, as in Vicuna's vocabulary: the property upstream's
    "one token less" for non-legacy tokenizers counts on (the round re-tokenized alone starts "▁", "USER")."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("vicuna_like_sp")
    rng = random.Random(0)
    words = ("the a cat dog dogs red blue circle circles square squares picture what is in how many shapes there are "
             "on colour year it chat between curious artificial intelligence assistant gives helpful detailed polite "
             "answers questions user human describe image caption").split()
    words += [w.capitalize() for w in words]
    lines = []
    for _ in range(3000):
        lines.append(" ".join(rng.choices(words, k=12)) + f" {rng.randint(0, 3000)}.")
        lines.append("xUSER: ASSISTANT: " + " ".join(rng.choices(words, k=3)) + "?")
    (d / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, unk_id=0, bos_id=BOS, eos_id=EOS, pad_id=-1, minloglevel=2)
    return d


class SlowLlamaTokenizer:
    """What transformers' slow LlamaTokenizer does with `tokenizer(text).input_ids` (BOS added): split on the
    special tokens; legacy: every text segment encoded with sentencepiece's dummy prefix; non-legacy: "▁" before the
    whole text only, segments encoded without a dummy prefix."""

    def __init__(self, model_file, legacy: bool):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        self.legacy = legacy
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(open(model_file, "rb").read())
        proto.normalizer_spec.add_dummy_prefix = False
        self.sp_bare = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    def segments(self, text):
        out, rest = [], text
        while rest:
            hits = [(rest.find(s), s) for s in SPECIALS if s in rest]
            if not hits:
                out.append(rest)
                break
            at, special = min(hits)
            if at:
                out.append(rest[:at])
            out.append(special)
            rest = rest[at + len(special):]
        return out

    def __call__(self, text):
        ids = [BOS]
        if not self.legacy and text:
            text = " " + text
        for seg in self.segments(text):
            if seg in SPECIALS:
                ids.append(self.sp.piece_to_id(seg))
            else:
                ids.extend((self.sp if self.legacy else self.sp_bare).encode(seg))
        return ids


# ---- upstream's rules, re-derived ---------------------------------------------------------------------------
def upstream_tokenizer_image_token(prompt, slow):
    """mm_utils.tokenizer_image_token: chunks around "<image>" tokenized with BOS; one BOS kept, -200 between."""
    chunks = [slow(c) for c in prompt.split("<image>")]
    ids = [BOS] if chunks[0][:1] == [BOS] else []
    skip = len(ids)
    for k, c in enumerate(chunks):
        if k:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(c[skip:])
    return ids


def upstream_multimodal(conversations):
    """preprocess_multimodal for an image record: each value holding "<image>" -> "<image>\\n" + the rest, stripped."""
    out = []
    for turn in conversations:
        value = turn["value"]
        if "<image>" in value:
            value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
        out.append({"from": turn["from"], "value": value})
    return out


def upstream_v1(conversations, has_image, slow, system):
    """preprocess_v1 for one record -> (input_ids, labels, mismatch)."""
    source = upstream_multimodal(conversations) if has_image else [dict(t) for t in conversations]
    if source[0]["from"] != "human":
        source = source[1:]
    text = system + " "  # conv_vicuna_v1.get_prompt(), SeparatorStyle.TWO, sep " ", sep2 "</s>"
    for j, turn in enumerate(source):
        assert turn["from"] == ("human", "gpt")[j % 2]
        role = ("USER", "ASSISTANT")[j % 2]
        text += f"{role}: {turn['value']}{(' ', '</s>')[j % 2]}" if turn["value"] else f"{role}:"
    count = (lambda s: upstream_tokenizer_image_token(s, slow)) if has_image else slow
    ids = count(text)
    labels = list(ids)
    cur = 1
    labels[:cur] = [IGNORE_INDEX] * cur
    sep = " ASSISTANT: "
    for i, rou in enumerate(text.split("</s>")):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        round_len = len(count(rou))
        instruction_len = len(count(parts[0] + sep)) - 2
        if i != 0 and not slow.legacy:
            round_len -= 1
            instruction_len -= 1
        labels[cur:cur + instruction_len] = [IGNORE_INDEX] * len(labels[cur:cur + instruction_len])
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * len(labels[cur:])
    mismatch = cur != len(ids)
    if mismatch:  # upstream prints "tokenization mismatch" and trains nothing on the sample
        labels = [IGNORE_INDEX] * len(ids)
    return ids, labels, mismatch


def upstream_plain(conversations, slow):
    """preprocess_plain: "<image>" + caption + "\\n" (conv_llava_plain's sep); the "<image>" prompt is masked."""
    source = upstream_multimodal(conversations)
    assert len(source) == 2 and "<image>" in source[0]["value"]
    ids = upstream_tokenizer_image_token("<image>" + source[1]["value"] + "\n", slow)
    n = len(upstream_tokenizer_image_token("<image>", slow))
    return ids, [IGNORE_INDEX] * n + ids[n:], False


def turns(*values, first="human"):
    roles = ("human", "gpt") if first == "human" else ("gpt", "human")
    return [{"from": roles[k % 2], "value": v} for k, v in enumerate(values)]


SAMPLES = [  # (id, template, has image, conversations)
    ("words", "vicuna_v1", True, turns("What is in the picture?\n<image>", "A red circle on a blue square.")),
    ("digit", "vicuna_v1", True, turns("<image>\nHow many shapes?", "2")),
    ("year", "vicuna_v1", True, turns("<image>\nWhat year is it?", "1998")),
    ("newline", "vicuna_v1", True, turns("<image>\nWhat colour?", "\nblue")),
    ("multi_turn", "vicuna_v1", True, turns("<image>\nHow many circles?", "3", "And squares?",
                                            "There are 12 squares.", "Colour?", "\nred\n", "Year?", "2024")),
    ("spaces", "vicuna_v1", True, turns("  <image>  what  is   in the  picture  ", "two  red   circles  ",
                                        "how  many ?", "  4", "and   now", "a   dog")),
    ("text_only", "vicuna_v1", False, turns("What is 2 + 2?", "4", "And the year?", "It is 1998.", "Colour?",
                                            "\nblue")),
    ("leading_gpt", "vicuna_v1", True, turns("Hello! Ask me.", "<image>\nWhat is it?", "7 dogs", first="gpt")),
    ("image_in_later_turn", "vicuna_v1", True, turns("Hi.", "Hello.", "What is here?\n<image>", "5 cats")),
    ("llava_v1", "llava_v1", True, turns("<image>\nHow many dogs?", "1", "Colour?", "red")),
    ("caption", "plain", True, turns("<image>\nDescribe the image.", "A red circle on a blue square.")),
    ("caption_digits", "plain", True, turns("Give a caption.\n<image>", "2 dogs in 1998")),
    ("caption_spaces", "plain", True, turns("<image>", "a  dog   on  a square  ")),
    ("caption_newline", "plain", True, turns("<image>\ncaption?", "\nblue sky\n")),
]


@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "non_legacy"])
def toks(request, sp_dir):
    """(the project's fast LlamaTokenizer, the slow reference), legacy or not."""
    from transformers import LlamaTokenizer

    legacy = request.param
    fast = LlamaTokenizer.from_pretrained(str(sp_dir), legacy=legacy, add_bos_token=True)
    assert fast.is_fast and fast.legacy is legacy
    assert fast("a b").input_ids[0] == BOS and fast("a b").input_ids[-1] != EOS  # Vicuna: BOS, no EOS
    return fast, SlowLlamaTokenizer(sp_dir / "tokenizer.model", legacy)


def reference(sample, slow):
    _, template, has_image, conv = sample
    if template == "plain":
        return upstream_plain(conv, slow)
    return upstream_v1(conv, has_image, slow, SYSTEMS[template])


@pytest.mark.parametrize("sample", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_ids_and_labels_equal_upstream(toks, sample):
    fast, slow = toks
    sid, template, has_image, conv = sample
    want_ids, want_labels, mismatch = reference(sample, slow)
    assert not mismatch, "upstream's own count disagrees: the reference tokenizer is not Vicuna-like"
    ids, labels = preprocess_conversation(conv, fast, template, has_image, sample_id=sid)
    assert ids == want_ids, (fast.convert_ids_to_tokens([t for t in ids if t >= 0]),
                             fast.convert_ids_to_tokens([t for t in want_ids if t >= 0]))
    shown = [(fast.convert_ids_to_tokens(t) if t >= 0 else t, a, b) for t, a, b in zip(ids, labels, want_labels)]
    assert labels == want_labels, [x for x in shown if x[1] != x[2]]


def test_samples_cover_the_lone_space_token(toks):
    """The set above reaches the case where a labelling by character spans and LLaVA's token counts can differ:
    a supervised lone "▁" (digit and newline answers) in both the v1 and the plain template."""
    fast, slow = toks
    space = fast.convert_tokens_to_ids("▁")
    for template in ("vicuna_v1", "plain"):
        n = 0
        for sample in SAMPLES:
            if sample[1] == template:
                _, labels, _ = reference(sample, slow)
                n += labels.count(space)
        assert n >= 3, template


def test_dataset_gives_the_same_tokens(toks):
    """The training dataset (start-up tokenization and the lazy path) hands out exactly these ids and labels."""
    fast, slow = toks
    text_only = [s for s in SAMPLES if not s[2]]
    records = [{"id": sid, "conversations": conv} for sid, _, _, conv in text_only]
    for preprocess in (True, False):
        ds = LazySupervisedDataset(records, fast, "vicuna_v1", None, 4096, preprocess_text=preprocess)
        for k, sample in enumerate(text_only):
            want_ids, want_labels, _ = reference(sample, slow)
            assert ds[k]["input_ids"].tolist() == want_ids and ds[k]["labels"].tolist() == want_labels


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_v1"])
def test_inference_prompt_is_the_training_prefix(toks, template):
    """serve/eval prompt = upstream's eval prompt (model_vqa: "<image>\\n" + question, then get_prompt() with an
    empty assistant turn -> "... ASSISTANT:"), token for token, and the training ids start with it; the next token
    (a lone "▁" before a digit answer) is supervised, so the model learns what it has to emit first."""
    fast, slow = toks
    conv = turns("How many shapes?\n<image>", "2")
    msgs = place_image(normalize_messages(conv[:1]), True)
    p_ids = tokenizer_image_token(build_prompt(template, msgs, fast), fast)
    upstream_prompt = f"{SYSTEMS[template]} USER: <image>\nHow many shapes? ASSISTANT:"
    assert p_ids == upstream_tokenizer_image_token(upstream_prompt, slow)
    ids, labels = preprocess_conversation(conv, fast, template, True)
    assert ids[:len(p_ids)] == p_ids
    assert labels[len(p_ids) - 1] == IGNORE_INDEX and labels[len(p_ids)] == fast.convert_tokens_to_ids("▁")
