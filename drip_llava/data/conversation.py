"""Conversation templates (a registry, looked up by exact name) and the one tokenizer used for training and inference.

A template renders a conversation to text and returns the character spans the loss is trained on (the
assistant's answers plus their end marker). `tokenize_conversation` then tokenizes the text once, with character
offsets, and labels a token iff its last non-space character lies in a span. For LLaVA's templates (v1, plain)
and a Llama/Vicuna tokenizer the ids and labels are LLaVA's own (tests/test_upstream_labels.py). Unlike LLaVA,
which re-derives the label positions by tokenizing the pieces separately and counting (and on a disagreement
silently zeroes the loss, "tokenization mismatch"), a disagreement here is impossible to miss: a token that mixes
prompt and answer characters, or an answer character no token covers, raises `TokenizationMismatch` naming the
sample (the training dataset logs and counts it as a skip).

The image marker "<image>" stays one placeholder id (IMAGE_TOKEN_INDEX): the model splices in however many
tokens the DRIP tower gives for that image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from ..constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class ConversationError(ValueError):
    """A conversation that cannot be rendered (bad roles, misplaced <image>, ...)."""


class TokenizationMismatch(ValueError):
    """The tokenizer's tokens do not line up with the supervised spans (LLaVA's silent 'tokenization mismatch')."""


@dataclass(frozen=True)
class Rendered:
    text: str
    targets: tuple  # ((start, end), ...) character spans of `text` the loss is trained on


def normalize_messages(conversations: Sequence[dict], sample_id=None) -> list[dict]:
    """LLaVA's [{from, value}] (or [{role, content}]) -> [{role, content}] with roles user/assistant/system."""
    if not isinstance(conversations, (list, tuple)):
        raise ConversationError(f"sample {sample_id!r}: 'conversations' is a {type(conversations).__name__}, "
                                "expected a list of turns")
    out = []
    for turn in conversations:
        role = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
        content = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if role not in ROLE_ALIASES or not isinstance(content, str):
            raise ConversationError(f"sample {sample_id!r}: bad turn {turn!r} (roles: {sorted(ROLE_ALIASES)})")
        out.append({"role": ROLE_ALIASES[role], "content": content})
    return out


def drop_leading_assistant(messages: list[dict]) -> list[dict]:
    """LLaVA's training preprocessing drops the first turn (after a system turn) when it is not the user's, so data
    that opens with a gpt greeting trains; any other misordering stays an error."""
    k = 1 if messages and messages[0]["role"] == "system" else 0
    if len(messages) > k and messages[k]["role"] == "assistant":
        return messages[:k] + messages[k + 1:]
    return messages


def place_image(messages: list[dict], has_image: bool, sample_id=None) -> list[dict]:
    """LLaVA's convention for an image sample: exactly one "<image>"; the user turn holding it becomes "<image>\\n"
    + its text without the marker, stripped (LLaVA's preprocess_multimodal). Without a marker in a user turn (no
    marker: inference prompts; a marker in another turn) it goes to the start of the first user turn the same way.
    Without an image, "<image>" is an error."""
    n = sum(m["content"].count(DEFAULT_IMAGE_TOKEN) for m in messages)
    if not has_image:
        if n:
            raise ConversationError(f"sample {sample_id!r}: text has {DEFAULT_IMAGE_TOKEN} but no 'image' field")
        return messages
    if n > 1:
        raise ConversationError(f"sample {sample_id!r}: {n} {DEFAULT_IMAGE_TOKEN} markers; one image per sample")
    out = [dict(m) for m in messages]
    users = [m for m in out if m["role"] == "user"]
    if not users:
        raise ConversationError(f"sample {sample_id!r}: an image sample needs a user turn")
    holder = next((m for m in users if DEFAULT_IMAGE_TOKEN in m["content"]), users[0])
    for m in out:
        if DEFAULT_IMAGE_TOKEN in m["content"] or m is holder:
            m["content"] = m["content"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
    holder["content"] = DEFAULT_IMAGE_TOKEN + "\n" + holder["content"]
    return out


def _check_alternation(messages: list[dict], sample_id) -> tuple[Optional[str], list[dict]]:
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    for i, m in enumerate(messages):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ConversationError(f"sample {sample_id!r}: turn {i} is {m['role']!r}, expected {want!r} "
                                    "(turns must alternate user/assistant)")
    return system, messages


class ConversationTemplate:
    """Renders [{role, content}] to text + supervised spans. `add_bos`: prepend the tokenizer's BOS when the
    tokenizer itself adds one (Llama/Vicuna do, SmolLM2 does not); chat templates write their own."""

    name: str = ""
    add_bos: bool = True

    def render(self, messages: list[dict], tokenizer, add_generation_prompt: bool = False,
               sample_id=None) -> Rendered:
        raise NotImplementedError

    def stop_str(self, tokenizer) -> str:
        return tokenizer.eos_token or "</s>"


TEMPLATES: dict[str, ConversationTemplate] = {}


def register_template(*names: str) -> Callable:
    def deco(cls):
        inst = cls()
        inst.name = names[0]
        for n in names:
            if n in TEMPLATES:
                raise KeyError(f"template {n!r} registered twice")
            TEMPLATES[n] = inst
        return cls
    return deco


def get_template(name: str) -> ConversationTemplate:
    if name not in TEMPLATES:
        raise KeyError(f"unknown conversation template {name!r}; valid: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]


def list_templates() -> list[str]:
    return sorted(TEMPLATES)


@register_template("plain")
class PlainTemplate(ConversationTemplate):
    """Stage 1 (feature alignment): "<image>" + caption + "\\n" (LLaVA's conv_llava_plain, whose separator is
    "\\n"); the caption and the newline are trained. The user text (LLaVA-Pretrain's varied "describe the image"
    prompts) is dropped, as in LLaVA. Generation from a stage-1 model ends its caption at the newline."""

    sep = "\n"

    def render(self, messages, tokenizer, add_generation_prompt=False, sample_id=None):
        _, msgs = _check_alternation(messages, sample_id)
        has_image = DEFAULT_IMAGE_TOKEN in msgs[0]["content"] if msgs else False
        prefix = DEFAULT_IMAGE_TOKEN if has_image else ""
        if add_generation_prompt:
            return Rendered(prefix, ())
        if len(msgs) != 2:
            raise ConversationError(f"sample {sample_id!r}: template 'plain' needs exactly one user and one "
                                    f"assistant turn, got {len(msgs)} turns")
        answer = msgs[1]["content"] + self.sep
        return Rendered(prefix + answer, ((len(prefix), len(prefix) + len(answer)),))

    def stop_str(self, tokenizer) -> str:
        return self.sep


@register_template("plain_eos")
class PlainEosTemplate(PlainTemplate):
    """Stage 1 with the caption ended by the tokenizer's EOS instead of LLaVA's "\n". Measured on the demo
    (SmolLM2-135M-Instruct, 40 projector steps, batch 8, lr 1e-2): the caption loss falls from 6.7 to 2.5 with
    EOS and from 5.8 to only 4.0 with "\n"; a chat-tuned LLM ends a reply with its end-of-turn token, so the EOS
    target is the one it already predicts. `plain` stays LLaVA's format (Vicuna base models)."""

    def render(self, messages, tokenizer, add_generation_prompt=False, sample_id=None):
        eos = tokenizer.eos_token
        if not eos:
            raise ConversationError(f"template 'plain_eos': tokenizer {tokenizer.name_or_path!r} has no eos_token")
        out = super().render(messages, tokenizer, add_generation_prompt, sample_id)
        if add_generation_prompt:
            return out
        (start, end), = out.targets
        text = out.text[:end - len(self.sep)] + eos
        return Rendered(text, ((start, len(text)),))

    def stop_str(self, tokenizer) -> str:
        return tokenizer.eos_token


class SeparatorTemplate(ConversationTemplate):
    """LLaVA's SeparatorStyle.TWO: system + " " + "USER: q ASSISTANT: a</s>USER: ..."; "</s>" is the
    tokenizer's EOS string (Vicuna's is "</s>"), so generation stops on EOS. An answer's span starts at the space
    after "ASSISTANT:": LLaVA's label count (preprocess_v1) trains the token carrying that space, which for an
    answer starting with a digit or a newline is a lone "▁" (Llama's tokenizer has no "▁2" or "▁\\n")."""

    system = ""
    roles = ("USER", "ASSISTANT")
    sep = " "

    def render(self, messages, tokenizer, add_generation_prompt=False, sample_id=None):
        system, msgs = _check_alternation(messages, sample_id)
        sep2 = self.stop_str(tokenizer)
        text = (self.system if system is None else system) + self.sep
        targets = []
        for m in msgs:
            if m["role"] == "user":
                text += f"{self.roles[0]}: {m['content']}{self.sep}"
            else:
                text += f"{self.roles[1]}:"
                start = len(text)
                text += " " + m["content"] + sep2
                targets.append((start, len(text)))
        if add_generation_prompt:
            text += f"{self.roles[1]}:"
        return Rendered(text, tuple(targets))


@register_template("vicuna_v1", "v1")
class VicunaV1Template(SeparatorTemplate):
    system = ("A chat between a curious user and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the user's questions.")


@register_template("llava_v1")
class LlavaV1Template(SeparatorTemplate):
    system = ("A chat between a curious human and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the human's questions.")


@register_template("chat_template")
class ChatTemplate(ConversationTemplate):
    """The tokenizer's own Jinja chat template (SmolLM2, Llama-3, ...). An answer's span is what rendering
    the conversation up to it adds after the generation prompt, minus trailing whitespace (so the end-of-turn
    token is trained, the newline after it is not). Templates must be prefix-stable; otherwise an error."""

    add_bos = False

    def render(self, messages, tokenizer, add_generation_prompt=False, sample_id=None):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ConversationError(f"template 'chat_template': tokenizer {tokenizer.name_or_path!r} has none")
        _check_alternation(messages, sample_id)

        def apply(msgs, gen):
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

        text = apply(messages, add_generation_prompt)
        targets = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt, upto = apply(messages[:k], True), apply(messages[:k + 1], False)
            if not upto.startswith(prompt) or not text.startswith(upto):
                raise TokenizationMismatch(
                    f"sample {sample_id!r}: the chat template of {tokenizer.name_or_path!r} is not prefix-stable "
                    f"at turn {k}; use another --version")
            end = len(upto.rstrip())
            if end > len(prompt):
                targets.append((len(prompt), end))
        return Rendered(text, tuple(targets))

    def stop_str(self, tokenizer) -> str:
        return tokenizer.eos_token


def tokenizer_adds_bos(tokenizer) -> bool:
    """True when the tokenizer prepends BOS by itself (so text rendered for it should start with BOS)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _encode(tokenizer, text: str, sample_id):
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"sample {sample_id!r}: a fast tokenizer (character offsets) is needed, got "
                        f"{type(tokenizer).__name__}")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def tokenize_conversation(rendered: Rendered, tokenizer, add_bos: bool = True,
                          sample_id=None) -> tuple[list[int], list[int]]:
    """Text -> (input_ids, labels). "<image>" becomes one IMAGE_TOKEN_INDEX; labels are IGNORE_INDEX outside the
    target spans. Each text piece between image markers is tokenized on its own (as at inference)."""
    text = rendered.text
    ids: list[int] = []
    labels: list[int] = []
    if add_bos and tokenizer_adds_bos(tokenizer):
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    in_target = [False] * len(text)
    for s, e in rendered.targets:
        in_target[s:e] = [True] * (e - s)
    covered = [False] * len(text)
    pos = 0
    for k, piece in enumerate(text.split(DEFAULT_IMAGE_TOKEN)):
        if k:
            ids.append(IMAGE_TOKEN_INDEX)
            labels.append(IGNORE_INDEX)
            pos += len(DEFAULT_IMAGE_TOKEN)
        piece_ids, offsets = _encode(tokenizer, piece, sample_id) if piece else ([], [])
        for tok, (s, e) in zip(piece_ids, offsets):
            s, e = s + pos, e + pos
            # a token belongs to the span holding its last non-space character (so "▁A" is the answer's and ":▁"
            # the prompt's); a token of spaces alone, to the span holding its last character
            last = next((c for c in range(e - 1, s - 1, -1) if not text[c].isspace()), e - 1)
            sup = e > s and in_target[last]
            if e > s:
                mixed = [c for c in range(s, e) if in_target[c] != sup and not text[c].isspace()]
                if mixed:
                    raise TokenizationMismatch(
                        f"sample {sample_id!r}: token {tokenizer.convert_ids_to_tokens(tok)!r} at chars {s}:{e} "
                        f"mixes prompt and answer text ({text[max(0, s - 20):e + 20]!r})")
                if sup:
                    covered[s:e] = [True] * (e - s)
            ids.append(tok)
            labels.append(tok if sup else IGNORE_INDEX)
        pos += len(piece)
    for s, e in rendered.targets:
        missing = [c for c in range(s, e) if not covered[c] and not text[c].isspace()]
        if missing:
            raise TokenizationMismatch(
                f"sample {sample_id!r}: answer characters {text[missing[0]:missing[-1] + 1]!r} got no token "
                "(the tokenizer's offsets do not cover them)")
    return ids, labels


def preprocess_conversation(conversations: Sequence[dict], tokenizer, template: ConversationTemplate | str,
                            has_image: bool, sample_id=None) -> tuple[list[int], list[int]]:
    """One training record's conversation -> (input_ids, labels), as LLaVA's preprocessing: a leading non-user
    turn is dropped, "<image>" placed (`place_image`), the template rendered and tokenized once. Raises
    ConversationError / TokenizationMismatch naming the sample."""
    template = get_template(template) if isinstance(template, str) else template
    msgs = drop_leading_assistant(normalize_messages(conversations, sample_id))
    msgs = place_image(msgs, has_image, sample_id)
    rendered = template.render(msgs, tokenizer, sample_id=sample_id)
    return tokenize_conversation(rendered, tokenizer, template.add_bos, sample_id=sample_id)


def tokenizer_image_token(prompt: str, tokenizer, add_bos: bool = True) -> list[int]:
    """Inference prompt -> input_ids with one IMAGE_TOKEN_INDEX per "<image>" (same tokenization as training)."""
    return tokenize_conversation(Rendered(prompt, ()), tokenizer, add_bos=add_bos)[0]


def build_prompt(template: ConversationTemplate | str, messages: Sequence[dict], tokenizer) -> str:
    """The text a model is prompted with: the conversation so far + the assistant's generation prompt."""
    template = get_template(template) if isinstance(template, str) else template
    return template.render(normalize_messages(messages), tokenizer, add_generation_prompt=True).text
