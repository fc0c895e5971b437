"""Data path of the LLaVA stack: templates and label masking, mismatch errors, truncation with visual tokens,
bad images, text-only mixing, the collator, modality grouping and exact visual token counts."""
import json

import pytest
import torch
from PIL import Image

from drip_llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from drip_llava.data import (
    BadSampleError,
    ConversationTemplate,
    DataCollatorForSupervisedDataset,
    ImageLoader,
    LazySupervisedDataset,
    Rendered,
    TokenizationMismatch,
    VisualTokenBudget,
    build_prompt,
    compute_image_token_counts,
    get_template,
    list_templates,
    normalize_messages,
    place_image,
    tokenize_conversation,
    tokenizer_image_token,
)
from drip_llava.data.conversation import ConversationError
from drip_llava.data.dataset import load_or_compute_counts, tower_fingerprint
from drip_llava.train.trainer import modality_length_grouped_indices

CONV = [
    {"from": "human", "value": "What is in the picture?\n<image>"},
    {"from": "gpt", "value": "A red circle on a blue square."},
    {"from": "human", "value": "How many shapes?"},
    {"from": "gpt", "value": "There are 2 shapes."},
]


@pytest.fixture(scope="module")
def tok(embedded_tokenizer_dir):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir), padding_side="right")
    if t.pad_token is None:
        t.pad_token = t.eos_token
    return t


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    """A sentencepiece (Llama/Vicuna-style, byte fallback, '</s>') tokenizer trained on the spot."""
    import random

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    d = tmp_path_factory.mktemp("sp")
    random.seed(0)
    words = ("the a cat dog red blue circle square picture what is in how many shapes there are on user assistant "
             "chat between curious artificial intelligence gives helpful detailed polite answers questions").split()
    (d / "corpus.txt").write_text("\n".join(" ".join(random.choices(words, k=12)) for _ in range(2000)))
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "tokenizer"), vocab_size=300,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    t = LlamaTokenizer.from_pretrained(str(d))
    t.pad_token = t.unk_token
    return t


@pytest.fixture(scope="module")
def tower_model(tiny_drip_dir):
    from drip_llava.vision import DripVisionModel

    return DripVisionModel.from_pretrained(str(tiny_drip_dir)).eval()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """A few PIL images of different content (so DRIP gives them different token counts), one corrupt file."""
    d = tmp_path_factory.mktemp("imgs")
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        arr = (torch.rand(48 + 16 * i, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
        if i % 2:
            arr[:] = arr[:1, :1]  # a flat image
        Image.fromarray(arr).save(d / f"img{i}.png")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return d


def supervised_text(tokenizer, labels):
    return tokenizer.decode([t for t in labels if t != IGNORE_INDEX])


def encode(template, conv, tokenizer, has_image=True, sid="s"):
    t = get_template(template)
    msgs = place_image(normalize_messages(conv, sid), has_image, sid)
    return tokenize_conversation(t.render(msgs, tokenizer, sample_id=sid), tokenizer, t.add_bos, sample_id=sid)


def test_registry_lists_and_rejects_unknown():
    assert {"plain", "vicuna_v1", "v1", "llava_v1", "chat_template"} <= set(list_templates())
    with pytest.raises(KeyError, match="valid: .*vicuna_v1"):
        get_template("vicuna_v2")


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_v1", "chat_template"])
def test_only_assistant_turns_are_supervised(tok, template):
    ids, labels = encode(template, CONV, tok)
    assert len(ids) == len(labels)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    assert labels[ids.index(IMAGE_TOKEN_INDEX)] == IGNORE_INDEX
    sup = supervised_text(tok, labels)
    eos = tok.eos_token
    assert sup.replace(" ", "") == f"A red circle on a blue square.{eos}There are 2 shapes.{eos}".replace(" ", "")
    prompt = tok.decode([t for t, lab in zip(ids, labels) if lab == IGNORE_INDEX and t >= 0])
    assert "What is in the picture?" in prompt and "How many shapes?" in prompt and "red" not in prompt
    # every supervised token is the input token itself (labels are not shifted here; the model shifts)
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ids, labels))


def test_plain_template_is_image_caption_newline(tok):
    ids, labels = encode("plain", CONV[:2], tok)
    assert ids[0] == IMAGE_TOKEN_INDEX  # the user's text is dropped (LLaVA stage 1)
    assert supervised_text(tok, labels) == "A red circle on a blue square.\n"  # LLaVA's conv_llava_plain sep
    assert tok.decode(ids[1:]) == "A red circle on a blue square.\n"
    assert get_template("plain").stop_str(tok) == "\n"
    with pytest.raises(ConversationError, match="exactly one user and one"):
        encode("plain", CONV, tok)


def test_plain_eos_ends_the_caption_with_eos(tok):
    """The explicit stage-1 variant for chat-tuned LLMs: the same caption, ended by (and trained on) EOS."""
    ids, labels = encode("plain_eos", CONV[:2], tok)
    assert ids[0] == IMAGE_TOKEN_INDEX and ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
    assert supervised_text(tok, labels) == f"A red circle on a blue square.{tok.eos_token}"
    assert get_template("plain_eos").stop_str(tok) == tok.eos_token
    assert get_template("plain_eos").render([{"role": "user", "content": "<image>\nhi"}], tok,
                                            add_generation_prompt=True).text == "<image>"


@pytest.mark.parametrize("template", ["plain", "vicuna_v1"])
def test_sentencepiece_tokenizer_masks_exactly(sp_tok, template):
    conv = CONV[:2] if template == "plain" else CONV
    ids, labels = encode(template, conv, sp_tok)
    if template == "plain":
        want = ["A red circle on a blue square.\n"]
    else:
        want = ["A red circle on a blue square.</s>", "There are 2 shapes.</s>"]
    assert supervised_text(sp_tok, labels).replace(" ", "") == "".join(want).replace(" ", "")
    assert sum(t == sp_tok.eos_token_id for t in labels) == (0 if template == "plain" else 2)


def test_chat_template_prompt_matches_training_prefix(tok):
    """The inference prompt is exactly the training text up to the first answer (same tokens)."""
    msgs = place_image(normalize_messages(CONV[:1]), True)
    prompt = build_prompt("chat_template", msgs, tok)
    ids, labels = encode("chat_template", CONV[:2], tok)
    p_ids = tokenizer_image_token(prompt, tok, add_bos=False)
    assert ids[:len(p_ids)] == p_ids
    assert labels[len(p_ids)] != IGNORE_INDEX and labels[len(p_ids) - 1] == IGNORE_INDEX


def test_image_marker_rules(tok):
    two = [{"from": "human", "value": "<image> and <image>"}, {"from": "gpt", "value": "x"}]
    with pytest.raises(ConversationError, match="'two'.*2 <image>"):
        encode("vicuna_v1", two, tok, sid="two")
    with pytest.raises(ConversationError, match="'txt'.*no 'image' field"):
        encode("vicuna_v1", CONV, tok, has_image=False, sid="txt")
    # an image sample without the marker gets it at the start of the first user turn (LLaVA's convention)
    ids, _ = encode("vicuna_v1", [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], tok)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    with pytest.raises(ConversationError, match="'bad'.*expected 'assistant'"):
        encode("vicuna_v1", [CONV[0], CONV[2]], tok, sid="bad")


class MidWordTemplate(ConversationTemplate):
    """A broken template whose answer starts in the middle of a word: no tokenization can honour the boundary."""

    name = "midword"
    add_bos = False

    def render(self, messages, tokenizer, add_generation_prompt=False, sample_id=None):
        text = "Question: hello wor" + "ld peace"
        return Rendered(text, ((len("Question: hello wor"), len(text)),))


def test_tokenization_mismatch_names_the_sample_and_is_counted(tok):
    with pytest.raises(TokenizationMismatch, match="'sample-42'.*mixes prompt and answer"):
        tokenize_conversation(MidWordTemplate().render([], tok), tok, sample_id="sample-42")
    data = [{"id": "sample-42", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    strict = LazySupervisedDataset(data, tok, MidWordTemplate(), None, 64, skip_bad_samples=False)
    with pytest.raises(TokenizationMismatch, match="sample-42"):
        strict[0]
    # skipped and counted; a dataset of nothing but mismatches ends in an error that shows the last one
    ds = LazySupervisedDataset(data, tok, MidWordTemplate(), None, 64)
    with pytest.raises(BadSampleError, match="'tokenization_mismatch': 50.*last: sample 'sample-42'"):
        ds[0]
    with pytest.raises(ValueError, match="no usable sample.*'tokenization_mismatch': 1.*last: sample 'sample-42'"):
        LazySupervisedDataset(data, tok, MidWordTemplate(), None, 64, preprocess_text=True)


def turns(*values):
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)]


MALFORMED = [  # (id, has image, conversations): each ConversationError in the data loader, a counted skip
    ("image_in_text_only", False, turns("<image>\nWhat is it?", "A cat.")),
    ("two_images", True, turns("<image> and <image>", "Two.")),
    ("not_alternating", False, [{"from": "human", "value": "Hi."}, {"from": "human", "value": "Hi again."},
                                {"from": "gpt", "value": "Hello."}]),
    ("not_a_list", False, "human: hi"),
    ("no_conversations", False, None),
    ("unknown_role", False, [{"from": "narrator", "value": "Once."}, {"from": "gpt", "value": "x"}]),
]


@pytest.mark.parametrize("preprocess", [False, True])
def test_malformed_conversations_are_counted_skips(tok, tower_model, image_dir, caplog, preprocess):
    """A conversation LLaVA's preprocessing would assert on never ends the run: a leading gpt turn is dropped (as
    LLaVA does), anything else is a skip counted as bad_conversation, logged with the sample id; lazily and at
    start-up alike. With skip_bad_samples off it raises naming the sample."""
    loader = ImageLoader(str(image_dir), tower_model.preprocess)
    lead = {"id": "leading_gpt", "conversations": [{"from": "gpt", "value": "Hello there!"}] + turns("Say 7.", "7")}
    recs = [lead]
    for k, (sid, has_image, conv) in enumerate(MALFORMED):  # each bad record followed by a good one
        recs.append({"id": sid, "conversations": conv, **({"image": "img0.png"} if has_image else {})})
        recs.append({"id": f"good{k}", "conversations": turns(f"Say {k}.", f"Text {k}.")})
    caplog.set_level("WARNING", logger="drip_llava.data.dataset")
    ds = LazySupervisedDataset(recs, tok, "vicuna_v1", loader, 512, preprocess_text=preprocess)
    assert len(ds.modality_lengths) == len(ds)  # length grouping reads every record before step 1
    items = [ds[i] for i in range(len(ds))]
    assert ds.skips.as_dict()["bad_conversation"] == len(MALFORMED)
    assert sum(ds.skips.as_dict().values()) == len(MALFORMED)
    assert len(ds) == (len(recs) - len(MALFORMED) if preprocess else len(recs))
    for sid, _, _ in MALFORMED:
        assert f"skipping sample {sid!r}" in caplog.text
    first = tok.decode([t for t in items[0]["input_ids"].tolist() if t >= 0])
    assert "Hello there" not in first and first.rstrip().endswith("ASSISTANT: 7" + tok.eos_token)
    assert supervised_text(tok, items[0]["labels"].tolist()).strip() == "7" + tok.eos_token
    for k, (sid, _, _) in enumerate(MALFORMED):
        strict_recs = [lead, recs[1 + 2 * k]]
        with pytest.raises(ConversationError, match=repr(sid)):
            strict = LazySupervisedDataset(strict_recs, tok, "vicuna_v1", loader, 512, skip_bad_samples=False,
                                           preprocess_text=preprocess)
            strict[1]


def make_records(n_img=3, n_txt=2, long_answer_ids=()):
    recs = []
    for i in range(n_img):
        ans = "word " * 200 if f"img{i}" in long_answer_ids else f"Answer {i}."
        recs.append({"id": f"img{i}", "image": f"img{i}.png",
                     "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                       {"from": "gpt", "value": ans}]})
    for i in range(n_txt):
        recs.append({"id": f"txt{i}", "conversations": [{"from": "human", "value": f"Say {i}."},
                                                        {"from": "gpt", "value": f"Text {i}."}]})
    return recs


@pytest.mark.parametrize("preprocess", [True, False])
def test_truncation_counts_visual_tokens_and_skips_unsupervised(tok, tower_model, image_dir, preprocess):
    loader = ImageLoader(str(image_dir), tower_model.preprocess)
    recs = make_records()
    ids, _ = encode("vicuna_v1", recs[0]["conversations"], tok)
    text_len = len(ids)
    # The tower may give up to 64 tokens: a limit that fits the text but not text + 64 image tokens leaves
    # no answer token, so the image samples are skipped; text-only samples are kept.
    budget = VisualTokenBudget(max_tokens=64, estimate=16)
    limit = text_len + 20
    ds = LazySupervisedDataset(recs, tok, "vicuna_v1", loader, limit, budget=budget, preprocess_text=preprocess)
    if preprocess:
        assert len(ds) == 2 and ds.skips.as_dict()["no_supervised_tokens"] == 3
    items = [ds[i] for i in range(len(ds))]
    assert all(it["image"] is None for it in items)  # the image samples were replaced by the text-only ones
    assert ds.skips.as_dict()["no_supervised_tokens"] >= 3
    # with exact counts (here: 4 tokens per image) the same limit fits; truncation then keeps supervised tokens
    exact = VisualTokenBudget(max_tokens=64, estimate=16, counts={f"img{i}.png": 4 for i in range(4)})
    ds2 = LazySupervisedDataset(recs, tok, "vicuna_v1", loader, limit, budget=exact, preprocess_text=preprocess)
    assert len(ds2) == 5 and sum(ds2.skips.as_dict().values()) == 0
    it = ds2[0]
    assert it["image"].shape == (3, 128, 128)
    assert len(it["input_ids"]) - 1 + 4 <= limit
    assert (it["labels"] != IGNORE_INDEX).any()


def test_long_answer_is_truncated_not_dropped(tok, tower_model, image_dir):
    loader = ImageLoader(str(image_dir), tower_model.preprocess)
    recs = make_records(n_img=1, n_txt=0, long_answer_ids=("img0",))
    budget = VisualTokenBudget(max_tokens=64, estimate=16)
    ds = LazySupervisedDataset(recs, tok, "vicuna_v1", loader, 150, budget=budget, preprocess_text=True)
    it = ds[0]
    assert len(it["input_ids"]) == 150 - 63  # room left for the spliced image tokens
    assert (it["labels"] != IGNORE_INDEX).sum() > 10


def test_bad_images_skip_and_count_or_raise_with_path(tok, tower_model, image_dir):
    loader = ImageLoader(str(image_dir), tower_model.preprocess)
    recs = make_records(n_img=2, n_txt=0)
    recs.insert(0, {"id": "missing", "image": "nope.png", "conversations": recs[0]["conversations"]})
    recs.insert(1, {"id": "corrupt", "image": "corrupt.jpg", "conversations": recs[0]["conversations"]})
    ds = LazySupervisedDataset(recs, tok, "vicuna_v1", loader, 512, skip_bad_samples=True)
    first = ds[0]  # missing -> corrupt -> img0
    assert first["image"] is not None and ds.skips.as_dict()["bad_image"] == 2
    strict = LazySupervisedDataset(recs, tok, "vicuna_v1", loader, 512, skip_bad_samples=False)
    with pytest.raises(BadSampleError, match=r"'missing'.*nope\.png"):
        strict[0]
    with pytest.raises(BadSampleError, match=r"'corrupt'.*corrupt\.jpg"):
        strict[1]
    # every sample bad (wrong --image_folder): a clear error instead of skipping forever
    wrong = LazySupervisedDataset(make_records(n_img=3, n_txt=0), tok, "vicuna_v1",
                                  ImageLoader(str(image_dir / "nowhere"), tower_model.preprocess), 512)
    with pytest.raises(BadSampleError, match="consecutive bad samples.*image_folder"):
        wrong[0]


def test_text_only_mix_and_collator(tok, tower_model, image_dir, tmp_path):
    recs = make_records(n_img=2, n_txt=2)
    path = tmp_path / "data.json"
    path.write_text(json.dumps(recs))
    ds = LazySupervisedDataset(str(path), tok, "chat_template", ImageLoader(str(image_dir), tower_model.preprocess,
                               aspect_ratio="pad"), 512, budget=VisualTokenBudget(64, 16))
    batch_items = [ds[0], ds[2], ds[1], ds[3]]  # image, text, image, text
    coll = DataCollatorForSupervisedDataset(pad_token_id=tok.pad_token_id)
    b = coll(batch_items)
    lens = [len(x["input_ids"]) for x in batch_items]
    assert b["input_ids"].shape == (4, max(lens))
    assert b["attention_mask"].sum(1).tolist() == lens  # from lengths, although pad == eos here
    assert b["images"].shape == (4, 3, 128, 128)
    assert b["images"][1].abs().sum() == 0 and b["images"][0].abs().sum() > 0
    for i, n in enumerate(lens):
        assert (b["labels"][i, n:] == IGNORE_INDEX).all()
        assert int((b["input_ids"][i] == IMAGE_TOKEN_INDEX).sum()) == (1 if i in (0, 2) else 0)
    assert coll([ds[2], ds[3]])["images"] is None
    # lengths for grouping: image samples positive (text + estimated visual tokens), text-only negative
    ml = ds.modality_lengths
    assert [x > 0 for x in ml] == [True, True, False, False]
    assert ml[0] >= 16


def test_modality_grouping_keeps_batches_single_modality():
    g = torch.Generator().manual_seed(0)
    lengths = [10 + i for i in range(23)] + [-(5 + i) for i in range(13)]
    order = modality_length_grouped_indices(lengths, 4, generator=g)
    assert sorted(order) == list(range(36))
    full = [order[i:i + 4] for i in range(0, 36 - 8, 4)]  # the two tail groups may mix
    for chunk in full:
        assert len({lengths[i] > 0 for i in chunk}) == 1


def test_exact_visual_token_counts_match_single_images_and_cache(tower_model, image_dir, tmp_path):
    from drip_llava.model.vision_tower import DripVisionTower

    tower = DripVisionTower(tower_model, select_layer=-2)
    loader = ImageLoader(str(image_dir), tower.image_processor)
    names = [f"img{i}.png" for i in range(4)] + ["corrupt.jpg"]
    counts = compute_image_token_counts(tower, names, loader, batch_size=3)
    assert set(counts) == {f"img{i}.png" for i in range(4)}  # the corrupt one is left out
    for name, n in counts.items():
        _, mask = tower(loader(name)[None])
        assert int(mask.sum()) == n
        assert 1 <= n <= tower.max_tokens
    cache = tmp_path / "counts.json"
    fp = tower_fingerprint(tower.config.to_dict(), -2, {"aspect_ratio": "square"})
    calls = []
    assert load_or_compute_counts(str(cache), fp, lambda: calls.append(1) or counts) == counts
    assert load_or_compute_counts(str(cache), fp, lambda: calls.append(1) or {}) == counts
    assert load_or_compute_counts(str(cache), "other", lambda: calls.append(1) or {"x": 1}) == {"x": 1}
    assert len(calls) == 2
    budget = VisualTokenBudget.from_vision_config(tower.config, counts)
    assert budget.truncation("img0.png") == counts["img0.png"] and budget.truncation("new.png") == 64
    assert budget.grouping("new.png") == 16  # 64 patches at 4x compression
