"""The one inference engine (image loading, processor, prompt, generation, streaming) behind the Gradio app,
the terminal CLI and eval (answer generation, efficiency, choice ranking).

`ChatEngine` owns the loaded model and does, for every answer: build the prompt from a conversation template,
splice in the image (its real, per-image number of visual tokens), fit the conversation into the context,
generate (streamed token by token from a worker thread, stoppable through a `threading.Event`) and time the
stages: `vision_ms` (tower + projector + splicing), `prefill_ms` (the LLM's first forward over the spliced
prompt, up to the first new token) and `ttft_ms` (their sum, from the start).

`load_image_safely` is the only way images get in: it reads the header first, so a 20000x20000 upload is
refused (or, for JPEG, decoded at a reduced scale) before any pixel memory is allocated, and a non-image or a
truncated file becomes an `ImageRejected` with a message fit for the user, not a stack trace. The accepted image
is kept at its decoded size; the checkpoint's DripLlavaImageProcessor (`loaded.image_processor`, the one training
used) turns it into pixels, so an image within the pixel limit gets the same tensor here as in training and eval.

`ChatSession` is the plain-data state of one conversation (image, turns, per-answer stats). An image is encoded
once per conversation: `describe_image` runs the tower once, keeps the projected visual tokens in the
`ImageInfo` (`features`) and draws the overlay from the same run's segments; `chat` splices those tokens into
every question's prompt, so the tower does not run again while the conversation goes on.

A conversation's prompt grows by the last answer and the next question, so `chat` keeps the key/values of the
session's last generation (`PromptCache`: prompt + answer, with the token sequence they hold) and prefills only what
follows the longest common prefix of that sequence and the new prompt (the visual tokens compared as tensors). The
comparison, not bookkeeping, decides what is reused: an edited or regenerated answer, turns dropped by
`fit_context`, another image or a stopped answer each shorten the common prefix, so the answers are those of a full
prefill. `cache_images` / `reuse_kv` switch both savings off (eval.chat_latency times the three ways).

`generate_batch` answers several single-prompt requests in one left-padded batch (eval.generate's
`--batch-size`); under greedy decoding its answers equal `generate`'s one by one.
"""
from __future__ import annotations

import logging
import math
import os
import queue
import re
import struct
import threading
import time
import warnings
import weakref
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Optional, Union

import torch
from PIL import Image, UnidentifiedImageError

from drip_llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from drip_llava.data.conversation import get_template, place_image, tokenizer_image_token
from drip_llava.data.image_processor import to_rgb

logger = logging.getLogger(__name__)

DEFAULT_CONV_MODE = "vicuna_v1"  # the trainer's default --version ("v1"), and what eval/*.sh pass
DEFAULT_MAX_PIXELS = 50_000_000  # images above this (decoded size) are refused; ~150 MB as RGB

ImageSource = Union[str, os.PathLike, IO[bytes], Image.Image]


class ImageRejected(ValueError):
    """An upload that cannot be used; the message is meant for the user (names the file, says why)."""


class PromptTooLong(ValueError):
    """The conversation does not fit in the model's context even after dropping old turns."""


# ------------------------------------------------------------------------------------------------ images

def configure_pil(max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Process-wide PIL guard for the CLIs: a backstop above our own header check (which refuses anything
    over `max_pixels`), high enough that JPEGs up to 32x the limit still reach the reduced-scale decode
    (PIL refuses at open above 2 x MAX_IMAGE_PIXELS)."""
    Image.MAX_IMAGE_PIXELS = 32 * int(max_pixels)


def _bomb_message(name: str, error: Exception, max_pixels: int) -> str:
    """PIL's decompression-bomb refusal (raised from the header, before any decoding), in our words."""
    m = re.search(r"\((\d+) pixels\)", str(error))
    size = f"{int(m.group(1)) / 1e6:.0f} MP" if m else "the image"
    return (f"{name}: {size} is over the limit of {max_pixels / 1e6:.0f} MP (refused from the header by PIL's "
            f"decompression-bomb guard); downscale it first")


def load_image_safely(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS,
                      name: Optional[str] = None) -> tuple[Image.Image, list[str]]:
    """(RGB image, notes) from a path, a binary file object or a PIL image: EXIF orientation applied and
    transparency on white (the processor's `to_rgb`, so the picture shown is the one the model reads).

    Size is checked from the header before decoding: above `max_pixels` a JPEG is decoded at a reduced scale
    (libjpeg's DCT scaling, up to 1/8, memory only for the small result; the one case where the pixels differ
    from training's full decode), anything else is refused. PIL's own decompression-bomb refusal
    (Image.MAX_IMAGE_PIXELS, see configure_pil) becomes such a message too."""
    if name is None:
        name = Path(source).name if isinstance(source, (str, os.PathLike)) else "the image"
    notes: list[str] = []
    if isinstance(source, Image.Image):
        w, h = source.size
        if w * h > max_pixels:
            raise ImageRejected(f"{name}: {w}x{h} pixels is over the limit of {max_pixels / 1e6:.0f} MP")
        im = to_rgb(source)
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own check follows
                opened = Image.open(source)  # reads the header only
        except Image.DecompressionBombError as e:
            raise ImageRejected(_bomb_message(name, e, max_pixels)) from e
        except UnidentifiedImageError as e:
            raise ImageRejected(f"{name}: not an image file (or a format PIL cannot read)") from e
        except FileNotFoundError as e:
            raise ImageRejected(f"{name}: file not found") from e
        except OSError as e:
            raise ImageRejected(f"{name}: cannot open the image: {e}") from e
        with opened:
            w, h = opened.size
            if w < 1 or h < 1:
                raise ImageRejected(f"{name}: empty image ({w}x{h})")
            if w * h > max_pixels and opened.format == "JPEG":
                # draft() picks the largest 1/2^k scale (k <= 3) whose result still covers the requested size;
                # asking for half the target side lengths makes that result land at or below the limit
                s = math.sqrt(max_pixels / (w * h)) / 2
                opened.draft("RGB", (max(1, int(w * s)), max(1, int(h * s))))
                if opened.size != (w, h):
                    notes.append(f"decoded at reduced scale {opened.size[0]}x{opened.size[1]} (from {w}x{h})")
            dw, dh = opened.size
            if dw * dh > max_pixels:
                raise ImageRejected(f"{name}: {w}x{h} pixels ({w * h / 1e6:.0f} MP) is over the limit of "
                                    f"{max_pixels / 1e6:.0f} MP; downscale it first")
            try:
                opened.load()
                im = to_rgb(opened)
            except Image.DecompressionBombError as e:
                raise ImageRejected(_bomb_message(name, e, max_pixels)) from e
            except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as e:
                raise ImageRejected(f"{name}: the image is corrupt or truncated ({e})") from e
    return im, notes


# ------------------------------------------------------------------------------------------------ data

@dataclass
class GenerationSettings:
    temperature: float = 0.2  # 0 = greedy
    top_p: Optional[float] = None
    max_new_tokens: int = 512
    num_beams: int = 1

    def generate_kwargs(self) -> dict:
        sample = self.temperature > 0
        kw = {"do_sample": sample, "num_beams": int(self.num_beams)}
        if sample:
            kw["temperature"] = float(self.temperature)
            kw["top_p"] = float(self.top_p) if self.top_p is not None else 1.0
        return kw


@dataclass
class ImageInfo:
    """What the model makes of one image: its visual token count (what the LLM reads) and DRIP's segments."""
    num_tokens: int
    num_patches: int
    size: tuple[int, int]
    overlay: Optional[Image.Image] = None  # segment picture on the model's view of the image
    notes: list[str] = field(default_factory=list)
    features: Optional[torch.Tensor] = field(default=None, repr=False)  # projected visual tokens [n, hidden]

    @property
    def compression(self) -> float:
        return self.num_patches / max(1, self.num_tokens)

    def summary(self) -> str:
        return (f"{self.num_tokens} visual tokens from {self.num_patches} patches "
                f"({self.compression:.1f}x fewer)")


@dataclass
class Reply:
    """A (partial while streaming, final when `done`) answer with its timings."""
    text: str = ""
    done: bool = False
    finish_reason: str = ""  # stop (EOS) | length | stopped (stop event)
    visual_tokens: int = 0
    prompt_tokens: int = 0  # LLM input length after splicing (text + visual)
    new_tokens: int = 0
    vision_ms: float = 0.0
    prefill_ms: Optional[float] = None  # None with beam search (no per-token streaming there)
    ttft_ms: Optional[float] = None
    total_ms: float = 0.0
    dropped_turns: int = 0  # old question/answer pairs left out to fit the context
    cached_tokens: int = 0  # prompt positions whose key/values came from the session's PromptCache (not prefilled)
    token_ids: list[int] = field(default_factory=list, repr=False)  # the answer's tokens (cut after EOS)

    @property
    def stopped(self) -> bool:
        return self.finish_reason == "stopped"

    def stats_line(self) -> str:
        parts = [f"{self.visual_tokens} visual tokens" if self.visual_tokens else "no image"]
        if self.prefill_ms is not None:
            parts.append(f"prefill {self.prefill_ms:.0f} ms (vision {self.vision_ms:.0f} ms)")
        if self.cached_tokens:
            parts.append(f"{self.cached_tokens} of {self.prompt_tokens} prompt tokens cached")
        rate = self.new_tokens / (self.total_ms / 1000) if self.total_ms > 0 else 0.0
        parts.append(f"{self.new_tokens} tokens in {self.total_ms / 1000:.2f} s ({rate:.1f} tok/s)")
        if self.finish_reason == "stopped":
            parts.append("stopped")
        elif self.finish_reason == "length":
            parts.append("max tokens reached")
        if self.dropped_turns:
            parts.append(f"{self.dropped_turns} old turns left out to fit the context")
        return ", ".join(parts)


@dataclass(eq=False)
class PromptCache:
    """The key/values of a conversation's last generation and what they hold: `tokens` are the sequence positions
    (text token ids; IMAGE_TOKEN_INDEX at each visual token) and `image` the spliced visual tokens [n, hidden]
    (compared exactly: another image, or the same one encoded otherwise, is not reused). `past` is a transformers
    Cache covering `tokens`; empty when nothing is cached."""
    past: object = None
    tokens: list[int] = field(default_factory=list)
    image: Optional[torch.Tensor] = None

    def clear(self) -> None:
        self.past, self.tokens, self.image = None, [], None

    def __len__(self) -> int:
        return len(self.tokens)

    def reusable(self, tokens: list[int], image: Optional[torch.Tensor]) -> int:
        """Length of the cached prefix that a prompt of `tokens` (with visual tokens `image`) can reuse: the longest
        common prefix, cut before the visual tokens when the image differs, and at least one token left to prefill
        (generation needs the last position's logits)."""
        n = 0
        for a, b in zip(self.tokens, tokens):
            if a != b:
                break
            n += 1
        if IMAGE_TOKEN_INDEX in tokens[:n]:
            same = (self.image is not None and image is not None and self.image.shape == image.shape
                    and self.image.device == image.device and torch.equal(self.image, image))
            if not same:
                n = tokens.index(IMAGE_TOKEN_INDEX)
        return min(n, len(tokens) - 1)


@dataclass
class ChatSession:
    """One conversation: at most one image (LLaVA's single-image prompt: "<image>\\n" opens the first user
    turn), alternating user/assistant text turns, and the stats of every answer."""
    image: Optional[Image.Image] = None
    image_info: Optional[ImageInfo] = None
    image_name: str = ""
    messages: list[dict] = field(default_factory=list)  # [{"role": "user"|"assistant", "content": str}]
    replies: list[Reply] = field(default_factory=list)  # one per assistant message
    kv: Optional[PromptCache] = field(default=None, repr=False, compare=False)  # ChatEngine(reuse_kv=True)

    def clear(self) -> None:
        self.image, self.image_info, self.image_name = None, None, ""
        self.messages, self.replies = [], []
        if self.kv is not None:
            self.kv.clear()

    def set_image(self, image: Image.Image, info: ImageInfo, name: str = "") -> None:
        """A new image starts a new conversation (earlier answers were about another picture)."""
        self.clear()
        self.image, self.image_info, self.image_name = image, info, name

    def add_question(self, text: str) -> None:
        text = text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
        if not text:
            raise ValueError("empty question")
        if self.messages and self.messages[-1]["role"] == "user":  # an earlier question got no answer (error)
            self.messages.pop()
        self.messages.append({"role": "user", "content": text})

    def add_answer(self, reply: Reply) -> None:
        if not self.messages or self.messages[-1]["role"] != "user":
            raise ValueError("add_answer without a pending question")
        self.messages.append({"role": "assistant", "content": reply.text})
        self.replies.append(reply)

    def pop_answer(self) -> str:
        """Remove the last answer (for regenerate); returns the question it answered."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            self.messages.pop()
            self.replies.pop()
        if not self.messages:
            raise ValueError("nothing to regenerate: ask a question first")
        return self.messages[-1]["content"]

    @property
    def pending(self) -> bool:
        return bool(self.messages) and self.messages[-1]["role"] == "user"


# ------------------------------------------------------------------------------------------------ engine

class _StopOnEvent:
    """StoppingCriteria: end generation once `event` is set (the UIs' stop button, Ctrl-C in the CLI)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _TokenStreamer:
    """A transformers streamer that decodes after every token (TextIteratorStreamer waits for a space) and
    records when the first new token arrived (= end of prefill). Thread-safe hand-over through a queue."""

    def __init__(self, tokenizer, to_queue: bool = True):
        self.tokenizer = tokenizer
        self.queue: Optional[queue.Queue] = queue.Queue() if to_queue else None
        self.ids: list[int] = []
        self.text = ""
        self.first_token_time: Optional[float] = None
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt (empty with inputs_embeds)
            self._prompt_seen = True
            return
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        self.ids.extend(int(t) for t in value.flatten().tolist())
        if self.queue is None:
            return
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or text == self.text:  # half a multi-byte character, or a special token
            return
        self.text = text
        self.queue.put(text)

    def end(self) -> None:
        if self.queue is not None:
            self.queue.put(None)


def default_conv_mode(config) -> str:
    """The template a checkpoint was trained with when its config records it, else LLaVA's default."""
    for key in ("conv_mode", "version"):
        value = getattr(config, key, None)
        if isinstance(value, str) and value:
            try:
                get_template(value)
            except KeyError:
                continue
            return value
    return DEFAULT_CONV_MODE


class ChatEngine:
    """Prompting, image handling and (streamed) generation for one loaded model. Generation is serialised by a
    lock: one model, one answer at a time (the Gradio queue also runs one job at a time).

    `cache_images`: `chat` splices the visual tokens `describe_image` kept instead of encoding the image per
    question. `reuse_kv`: `chat` keeps each session's PromptCache and prefills only the new part of the prompt; the
    caches of at most `kv_sessions` conversations are kept (the oldest is dropped: a server's sessions would
    otherwise each hold a context's worth of key/values)."""

    def __init__(self, loaded, conv_mode: Optional[str] = None, max_image_pixels: int = DEFAULT_MAX_PIXELS,
                 cache_images: bool = True, reuse_kv: bool = True, kv_sessions: int = 4):
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model = loaded.model
        self.inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.tower = self.inner.get_vision_tower()
        if self.tower is None:
            raise ValueError(f"{loaded.model_path}: the model has no vision tower")
        self.image_processor = loaded.image_processor  # the checkpoint's DripLlavaImageProcessor
        self.context_len = int(loaded.context_len)
        self.template = get_template(conv_mode or default_conv_mode(self.inner.config))
        self.model_name = Path(loaded.model_path).name or str(loaded.model_path)
        self.max_image_pixels = int(max_image_pixels)
        self.cache_images, self.reuse_kv = bool(cache_images), bool(reuse_kv)
        if kv_sessions < 1:
            raise ValueError(f"kv_sessions must be >= 1, got {kv_sessions}")
        self.kv_sessions = int(kv_sessions)
        self._kv_held: list[weakref.ref] = []  # PromptCaches holding key/values, oldest first
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, model_path, model_base=None, load_8bit: bool = False, load_4bit: bool = False,
                        device=None, conv_mode: Optional[str] = None, torch_dtype: Optional[torch.dtype] = None,
                        **kwargs) -> "ChatEngine":
        from drip_llava.model.builder import load_pretrained_model

        loaded = load_pretrained_model(model_path, model_base=model_base, load_8bit=load_8bit, load_4bit=load_4bit,
                                       device=device, torch_dtype=torch_dtype)
        return cls(loaded, conv_mode=conv_mode, **kwargs)

    @property
    def conv_mode(self) -> str:
        return self.template.name

    @property
    def device(self) -> torch.device:
        return self.inner.get_input_embeddings().weight.device

    # -------------------------------------------------------------------------------------- images
    def load_image(self, source: ImageSource, name: Optional[str] = None) -> tuple[Image.Image, list[str]]:
        return load_image_safely(source, self.max_image_pixels, name=name)

    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        """[1,3,H,W] on the tower's device and dtype, through the checkpoint's image processor."""
        return self.image_processor(image)[None].to(device=self.tower.device, dtype=self.tower.dtype)

    @torch.inference_mode()
    def describe_image(self, image: Image.Image, overlay: bool = True) -> ImageInfo:
        """Visual token count (as the LLM will get them), the projected visual tokens (`features`, reused by every
        question of the conversation) and, optionally, the segment overlay picture; the tower runs once."""
        with self._lock:
            features, labels = self._encode_image(image, with_labels=overlay)
            pic = None
            if overlay:
                from drip_llava.vision.visualize import draw_segments, model_view, segment_overlay

                # drawn on the processor's view (padded when it pads), which the tower's transform only resizes
                view = self.image_processor.prepare(image)
                if labels is None:  # a tower without `output_layer`: the segments come from a second run
                    pic = segment_overlay(self.tower.model, view)[0]
                else:
                    g = self.tower.config.grid_size
                    pic = draw_segments(model_view(self.tower.model, view), labels.reshape(g, g))
        return ImageInfo(num_tokens=int(features.shape[0]), num_patches=self.tower.config.num_patches,
                         size=image.size, overlay=pic, features=features)

    def _encode_image(self, image: Image.Image, with_labels: bool = False):
        """(projected visual tokens [n, hidden], each patch's token id as a numpy array [L] or None). One tower
        run at the block the LLM reads: the labels (DRIP's segments from its boundaries, another family's
        `patch_token`) describe the tokens the LLM gets."""
        pixels = self.pixel_values(image)
        tower = self.tower
        if not (with_labels and tower._stops_at_layer):
            return self.inner.encode_images(pixels)[0], None
        out = tower.model.forward_features(pixels, output_layer=tower.layer_index)
        features = self.inner.project_features(out.features, out.mask)[0]
        if out.boundaries is not None:
            b = out.boundaries[0].float()
            labels = (torch.cumsum(b, 0) - b).round().long()  # exclusive cumsum = segment id
        elif getattr(out, "patch_token", None) is not None:
            labels = out.patch_token[0]
        else:  # every patch its own token
            labels = torch.arange(tower.config.num_patches)
        return features, labels.cpu().numpy()

    # -------------------------------------------------------------------------------------- prompts
    def prompt_ids(self, messages: list[dict], has_image: bool) -> tuple[str, torch.Tensor]:
        """(prompt text, input_ids [1,T] with one IMAGE_TOKEN_INDEX when `has_image`) for a conversation that
        ends with a user turn; "<image>\\n" is put at the start of the first user turn, as in training."""
        msgs = place_image([dict(m) for m in messages], has_image)
        prompt = self.template.render(msgs, self.tokenizer, add_generation_prompt=True).text
        ids = tokenizer_image_token(prompt, self.tokenizer, add_bos=self.template.add_bos)
        return prompt, torch.tensor([ids], dtype=torch.long, device=self.device)

    def fit_context(self, messages: list[dict], has_image: bool, visual_tokens: int,
                    max_new_tokens: int) -> tuple[list[dict], str, torch.Tensor, int, int]:
        """Drop the oldest question/answer pairs after the first (which holds the image) until the prompt plus
        the answer budget fit the context; then shrink the answer budget. Uses the image's real token count.
        Returns (messages, prompt, ids, max_new_tokens, dropped pairs)."""
        msgs, dropped = list(messages), 0
        while True:
            prompt, ids = self.prompt_ids(msgs, has_image)
            length = ids.shape[1] - int(has_image) + visual_tokens
            if length + max_new_tokens <= self.context_len or len(msgs) < 5:
                break
            del msgs[2:4]
            dropped += 1
        budget = min(max_new_tokens, self.context_len - length)
        if budget < 1:
            raise PromptTooLong(f"the prompt has {length} tokens ({visual_tokens} visual) and the context holds "
                                f"{self.context_len}: ask a shorter question or clear the conversation")
        return msgs, prompt, ids, budget, dropped

    # -------------------------------------------------------------------------------------- generation
    def _prepare(self, messages, image, settings, visual_tokens, image_features=None,
                 kv: Optional[PromptCache] = None):
        """Fit, splice and time the prompt; returns (t0, t1, reply, generate kwargs, prompt, (tokens, visual)), the
        last being the prompt's positions and visual tokens as a PromptCache records them. With `kv`, its cached
        prefix is cropped to what this prompt shares and passed as past_key_values (generate then prefills only
        the rest)."""
        t0 = time.perf_counter()
        has_image = image is not None or image_features is not None
        if image_features is not None:
            visual_tokens = int(image_features.shape[0])
        estimate = visual_tokens if visual_tokens is not None else (self.tower.max_tokens if has_image else 0)
        _, prompt, ids, max_new, dropped = self.fit_context(messages, has_image, estimate, settings.max_new_tokens)
        with torch.inference_mode():
            if image_features is not None:
                embeds, mask, _, _ = self.inner.prepare_inputs_labels_for_multimodal(
                    ids, None, None, None, padding_side="left", image_features=[image_features.to(self.device)])
            else:
                pixels = self.pixel_values(image) if has_image else None
                embeds, mask, _, _ = self.inner.prepare_inputs_labels_for_multimodal(ids, None, None, pixels,
                                                                                     padding_side="left")
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        n_visual = embeds.shape[1] - ids.shape[1] + 1 if has_image else 0
        max_new = min(max_new, self.context_len - embeds.shape[1])  # the hint may have been low
        if max_new < 1:
            raise PromptTooLong(f"the prompt has {embeds.shape[1]} tokens ({n_visual} visual) and the context "
                                f"holds {self.context_len}: ask a shorter question or clear the conversation")
        reply = Reply(visual_tokens=n_visual, prompt_tokens=int(embeds.shape[1]), vision_ms=1000 * (t1 - t0),
                      dropped_turns=dropped)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        kwargs = dict(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new, use_cache=True,
                      pad_token_id=pad, eos_token_id=self.tokenizer.eos_token_id, **settings.generate_kwargs())
        ids_list = ids[0].tolist()
        visual = None
        if has_image:  # batch 1, nothing padded: the visual tokens sit at the placeholder's position
            p = ids_list.index(IMAGE_TOKEN_INDEX)
            ids_list[p:p + 1] = [IMAGE_TOKEN_INDEX] * n_visual
            visual = embeds[0, p:p + n_visual].clone()  # not a view: the cache keeps it, not the whole prompt
        if kv is not None:
            past = self._past_for(kv, ids_list, visual)
            kwargs["past_key_values"] = past
            reply.cached_tokens = int(past.get_seq_length())
        return t0, t1, reply, kwargs, prompt, (ids_list, visual)

    def _past_for(self, kv: PromptCache, tokens: list[int], visual: Optional[torch.Tensor]):
        """kv's Cache cropped to the prefix `tokens` shares with it (a fresh Cache when none); kv then describes
        only that prefix until `_remember` records what the generation added."""
        from transformers import DynamicCache

        n = kv.reusable(tokens, visual) if kv.past is not None else 0
        if n > 0:
            kv.past.crop(n - kv.past.get_seq_length())  # a negative count: tokens removed from the end
        else:
            kv.past = DynamicCache(config=self.inner.config)
        kv.tokens, kv.image = tokens[:n], visual
        return kv.past

    def _remember(self, kv: Optional[PromptCache], prompt: tuple, new_ids: list[int], ok: bool) -> None:
        """After a generation into kv.past: record the positions it holds (the prompt and the answer tokens that
        were fed back; the last sampled token never is), or drop it after a failure (layers may be half-updated).
        Keeps at most `kv_sessions` caches alive."""
        if kv is None:
            return
        tokens, visual = prompt
        held = kv.past.get_seq_length() if ok and kv.past is not None else -1
        if not len(tokens) <= held <= len(tokens) + len(new_ids):
            if ok:
                logger.warning("key/value cache of %d positions does not match a prompt of %d + %d generated "
                               "tokens; not reused", held, len(tokens), len(new_ids))
            kv.clear()
            return
        kv.tokens, kv.image = (tokens + list(new_ids))[:held], visual
        live = [r for r in self._kv_held if r() is not None and r() is not kv]
        live.append(weakref.ref(kv))
        while len(live) > self.kv_sessions:
            oldest = live.pop(0)()
            if oldest is not None:
                oldest.clear()
        self._kv_held = live

    def _finish(self, reply: Reply, ids: list[int], t0: float, t1: float, first: Optional[float],
                stop_event: threading.Event, max_new: int) -> Reply:
        eos = self.tokenizer.eos_token_id
        reply.new_tokens = len(ids)
        reply.token_ids = list(ids)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        stop_str = self.template.stop_str(self.tokenizer)
        if stop_str and stop_str in text:
            text = text.split(stop_str)[0]
        reply.text = text.strip()
        if stop_event.is_set():
            reply.finish_reason = "stopped"
        elif ids and ids[-1] == eos:
            reply.finish_reason = "stop"
        else:
            reply.finish_reason = "length" if len(ids) >= max_new else "stop"
        if first is not None:
            reply.prefill_ms = 1000 * (first - t1)
            reply.ttft_ms = 1000 * (first - t0)
        reply.total_ms = 1000 * (time.perf_counter() - t0)
        reply.done = True
        return reply

    def _stopping(self, stop_event: threading.Event):
        from transformers import StoppingCriteriaList

        return StoppingCriteriaList([_StopOnEvent(stop_event)])

    def generate(self, messages: list[dict], image: Optional[Image.Image] = None,
                 settings: Optional[GenerationSettings] = None, stop_event: Optional[threading.Event] = None,
                 visual_tokens: Optional[int] = None, image_features: Optional[torch.Tensor] = None,
                 kv: Optional[PromptCache] = None) -> Reply:
        """The whole answer at once (batch evaluation): same prompt, splicing and timings as `stream`.
        `image_features` (an `ImageInfo.features`) replaces `image`: the tower does not run again. `kv` (see
        `stream`) is used with one beam only (beam search reorders and grows its own cache)."""
        settings = settings or GenerationSettings()
        stop_event = stop_event or threading.Event()
        kv = kv if settings.num_beams == 1 else None
        with self._lock:
            t0, t1, reply, kwargs, _, prompt = self._prepare(messages, image, settings, visual_tokens,
                                                             image_features, kv)
            timer = _TokenStreamer(self.tokenizer, to_queue=False) if settings.num_beams == 1 else None
            ok, ids = False, []
            try:
                out = self.model.generate(**kwargs, streamer=timer, stopping_criteria=self._stopping(stop_event))
                ids, ok = [int(t) for t in out[0].tolist()], True
            finally:
                self._remember(kv, prompt, ids, ok)
            return self._finish(reply, _cut_at_eos(ids, self.tokenizer.eos_token_id), t0, t1,
                                timer.first_token_time if timer else None, stop_event, kwargs["max_new_tokens"])

    def generate_batch(self, requests: list[tuple[list[dict], Optional[Image.Image]]],
                       settings: Optional[GenerationSettings] = None) -> list[Reply]:
        """Answers to several (messages, image or None) requests in one batch: prompts left-padded, the images
        encoded together, each spliced with its own visual token count, one `model.generate`; each answer is cut
        at its own token budget (the context fitted per request). Under greedy decoding the answers equal
        `generate`'s one request at a time. Timings and `total_ms` are the batch's (shared by its replies)."""
        settings = settings or GenerationSettings()
        if not requests:
            return []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with self._lock:
            t0 = time.perf_counter()
            fitted = []
            for messages, image in requests:
                has_image = image is not None
                estimate = self.tower.max_tokens if has_image else 0
                _, _, ids, budget, dropped = self.fit_context(messages, has_image, estimate, settings.max_new_tokens)
                fitted.append((ids[0], budget, dropped))
            T = max(ids.shape[0] for ids, _, _ in fitted)
            input_ids = torch.full((len(fitted), T), pad, dtype=torch.long, device=self.device)
            attn = torch.zeros_like(input_ids)
            for i, (ids, _, _) in enumerate(fitted):
                input_ids[i, T - ids.shape[0]:] = ids
                attn[i, T - ids.shape[0]:] = 1
            images = [im for _, im in requests if im is not None]
            with torch.inference_mode():
                pixels = torch.cat([self.pixel_values(im) for im in images]) if images else None
                embeds, mask, _, _ = self.inner.prepare_inputs_labels_for_multimodal(input_ids, attn, None, pixels,
                                                                                     padding_side="left")
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            lengths = mask.sum(dim=1).tolist()
            replies, budgets = [], []
            for i, ((ids, budget, dropped), (_, image)) in enumerate(zip(fitted, requests)):
                n = int(lengths[i])
                n_visual = n - ids.shape[0] + 1 if image is not None else 0
                budget = min(budget, self.context_len - n)
                if budget < 1:
                    raise PromptTooLong(f"request {i}: the prompt has {n} tokens ({n_visual} visual) and the "
                                        f"context holds {self.context_len}")
                budgets.append(budget)
                replies.append(Reply(visual_tokens=n_visual, prompt_tokens=n, vision_ms=1000 * (t1 - t0),
                                     dropped_turns=dropped))
            stop_event = threading.Event()
            timer = _TokenStreamer(self.tokenizer, to_queue=False) if settings.num_beams == 1 else None
            out = self.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max(budgets),
                                      use_cache=True, pad_token_id=pad, eos_token_id=self.tokenizer.eos_token_id,
                                      streamer=timer, stopping_criteria=self._stopping(stop_event),
                                      **settings.generate_kwargs())
            first = timer.first_token_time if timer else None
            return [self._finish(reply, _cut_at_eos([int(t) for t in row.tolist()[:budget]],
                                                    self.tokenizer.eos_token_id),
                                 t0, t1, first, stop_event, budget)
                    for reply, row, budget in zip(replies, out, budgets)]

    def stream(self, messages: list[dict], image: Optional[Image.Image] = None,
               settings: Optional[GenerationSettings] = None, stop_event: Optional[threading.Event] = None,
               visual_tokens: Optional[int] = None, poll_s: float = 0.1,
               image_features: Optional[torch.Tensor] = None, kv: Optional[PromptCache] = None) -> Iterator[Reply]:
        """Yield a partial Reply (text so far) after every new token, then the final Reply (done=True).
        Setting `stop_event` ends the answer at the next token; leaving the generator early also stops it.
        `image_features` (an `ImageInfo.features`) replaces `image`: the tower does not run again. `kv`: the
        conversation's PromptCache; the prompt's common prefix with it is not prefilled again, and it holds this
        prompt + answer afterwards (also a stopped one; cleared when generation fails)."""
        settings = settings or GenerationSettings()
        if settings.num_beams != 1:
            raise ValueError("streaming needs num_beams=1 (transformers cannot stream beam search)")
        stop_event = stop_event or threading.Event()
        with self._lock:
            t0, t1, reply, kwargs, _, prompt = self._prepare(messages, image, settings, visual_tokens,
                                                             image_features, kv)
            streamer = _TokenStreamer(self.tokenizer)
            error: list[BaseException] = []

            def work():
                try:
                    self.model.generate(**kwargs, streamer=streamer, stopping_criteria=self._stopping(stop_event))
                except BaseException as e:  # noqa: BLE001 - handed to the consumer thread, re-raised there
                    error.append(e)
                finally:
                    streamer.end()

            thread = threading.Thread(target=work, name="drip-llava-generate", daemon=True)
            thread.start()
            finished = False
            try:
                while True:
                    try:
                        item = streamer.queue.get(timeout=poll_s)
                    except queue.Empty:
                        if not thread.is_alive() and streamer.queue.empty():
                            finished = True
                            break
                        continue
                    if item is None:
                        finished = True
                        break
                    yield Reply(text=item, visual_tokens=reply.visual_tokens, prompt_tokens=reply.prompt_tokens,
                                vision_ms=reply.vision_ms, cached_tokens=reply.cached_tokens)
            finally:
                if not finished:
                    stop_event.set()  # the consumer left early (closed generator): end the worker too
                thread.join()
                self._remember(kv, prompt, streamer.ids, ok=not error)
        if error:
            raise error[0]
        ids = _cut_at_eos(streamer.ids, self.tokenizer.eos_token_id)
        yield self._finish(reply, ids, t0, t1, streamer.first_token_time, stop_event, kwargs["max_new_tokens"])

    def chat(self, session: ChatSession, settings: Optional[GenerationSettings] = None,
             stop_event: Optional[threading.Event] = None) -> Iterator[Reply]:
        """Stream the answer to the session's pending question; the final reply (also a stopped one) is added
        to the session. The image's visual tokens come from `session.image_info.features` when `describe_image`
        made them and `cache_images` (the tower does not run per question), else the image is encoded for this
        answer. With `reuse_kv` the session's PromptCache (`session.kv`) saves prefilling what the previous prompt
        and answer share with this prompt."""
        if not session.pending:
            raise ValueError("no pending question in the session")
        info = session.image_info
        hint = info.num_tokens if info is not None else None
        cached = self.cache_images and info is not None and session.image is not None
        features = info.features if cached else None
        kv = None
        if self.reuse_kv:
            if session.kv is None:
                session.kv = PromptCache()
            kv = session.kv
        final = None
        for reply in self.stream(session.messages, session.image, settings, stop_event, visual_tokens=hint,
                                 image_features=features, kv=kv):
            final = reply
            if reply.done:
                session.add_answer(reply)
            yield reply
        if final is None or not final.done:
            raise RuntimeError("generation ended without a final reply")


def _cut_at_eos(ids: list[int], eos: Optional[int]) -> list[int]:
    """Drop what follows the first EOS (batch-1 generate pads nothing after it, but stay robust)."""
    if eos is not None and eos in ids:
        return ids[:ids.index(eos) + 1]
    return ids
