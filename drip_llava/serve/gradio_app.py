"""Gradio chat demo in ONE process: upload an image, ask, watch the answer stream in.

    python -m drip_llava.serve.gradio_app --model-path DIR [--model-base DIR] [--load-4bit] \\
        [--host 127.0.0.1] [--port 7860] [--conv-mode vicuna_v1]

Shows, per image, the number of visual tokens the LLM reads and DRIP's segments (one colour per token), and
per answer the vision and prefill times. Temperature / top_p / max new tokens, regenerate, clear and stop.
Images go through the checkpoint's image processor (preprocessor_config.json: orientation, transparency on
white, the pad/square policy trained with), the same pixels as in training and eval.

Safety: binds 127.0.0.1 unless --host says otherwise; uvicorn runs at log level "warning" (no access log, so
no client IPs) and Gradio's own banner is silenced; uploads are checked from the image header before
decoding (huge images refused, JPEGs decoded at a reduced scale), bad files get a message in the chat; jobs
that use the model share one queue slot, so concurrent users wait their turn.
"""
from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import gradio as gr

from drip_llava.inference import (
    DEFAULT_MAX_PIXELS,
    ChatEngine,
    ChatSession,
    GenerationSettings,
    ImageRejected,
    PromptTooLong,
    configure_pil,
)

logger = logging.getLogger(__name__)

EXAMPLES = [("astronaut", "What is the person in this image wearing?"),
            ("chelsea", "What animal is this, and what colour is it?"),
            ("coffee", "Describe this image in detail."),
            ("rocket", "What is happening in this picture?")]
PREVIEW_SIDE = 512  # the copy of an upload shown in the chat
MAX_UPLOAD = "64mb"


@dataclass
class UiState:
    """Per-browser-session state (gr.State): the conversation and the files shown for its image."""
    session: ChatSession = field(default_factory=ChatSession)
    preview: Optional[str] = None  # path of the image shown in the chat
    overlay: Optional[str] = None  # path of the segment overlay
    image_line: str = ""


def prepare_examples(folder: Optional[Path] = None) -> list[tuple[str, str]]:
    """The offline example photos (skimage) as JPEG files, written once; returns [(path, question)]."""
    from drip_llava.vision.images import example_file, list_examples

    available = set(list_examples())
    return [(str(example_file(name, folder)), question) for name, question in EXAMPLES if name in available]


def _file_path(item) -> tuple[str, str]:
    """(path, original name) of a MultimodalTextbox file entry (a path string or a FileData dict)."""
    if isinstance(item, dict):
        path = item.get("path") or ""
        return path, item.get("orig_name") or Path(path).name
    return str(item), Path(str(item)).name


class ChatApp:
    """The handlers (plain methods, testable without a browser) and the Blocks layout."""

    def __init__(self, engine: ChatEngine, work_dir: Optional[str] = None,
                 examples: Optional[list[tuple[str, str]]] = None, defaults: Optional[GenerationSettings] = None):
        self.engine = engine
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="drip_llava_gradio_"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.examples = examples if examples is not None else []
        self.defaults = defaults or GenerationSettings(temperature=0.2, top_p=0.7, max_new_tokens=512)
        self._stops: dict[str, threading.Event] = {}
        self._stops_lock = threading.Lock()

    # ------------------------------------------------------------------------------------ view helpers
    def _chat_view(self, state: UiState, partial: Optional[str] = None, notice: Optional[str] = None) -> list[dict]:
        msgs: list[dict] = []
        if state.preview:
            msgs.append({"role": "user", "content": {"path": state.preview}})
        for m in state.session.messages:
            msgs.append({"role": m["role"], "content": m["content"]})
        if partial is not None:
            msgs.append({"role": "assistant", "content": partial})
        if notice:
            msgs.append({"role": "assistant", "content": notice})
        return msgs

    def _stats_md(self, state: UiState) -> str:
        replies = state.session.replies
        if not replies:
            return "No answers yet."
        rows = ["| # | visual tokens | vision ms | prefill ms | new tokens | tok/s | end |",
                "|---|---|---|---|---|---|---|"]
        for i, r in enumerate(replies, 1):
            rate = r.new_tokens / (r.total_ms / 1000) if r.total_ms else 0.0
            prefill = f"{r.prefill_ms:.0f}" if r.prefill_ms is not None else "-"
            rows.append(f"| {i} | {r.visual_tokens} | {r.vision_ms:.0f} | {prefill} | {r.new_tokens} | {rate:.1f} "
                        f"| {r.finish_reason} |")
        return "\n".join(rows)

    def _save(self, image, side: Optional[int], suffix: str) -> str:
        pic = image.copy()
        if side:
            pic.thumbnail((side, side))
        path = self.work_dir / f"{uuid.uuid4().hex}{suffix}"
        pic.save(path)
        return str(path)

    def _drop_files(self, state: UiState) -> None:
        for p in (state.preview, state.overlay):
            if p:
                Path(p).unlink(missing_ok=True)
        state.preview = state.overlay = None

    def _outputs(self, state: UiState, partial=None, notice=None, full: bool = True):
        """(chatbot, state, textbox, overlay, image info, stats); `full=False` skips the static panels while
        streaming (no re-sending the overlay for every token)."""
        chat = self._chat_view(state, partial, notice)
        if not full:
            return chat, state, gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return chat, state, None, state.overlay, state.image_line, self._stats_md(state)

    # ------------------------------------------------------------------------------------ stop events
    def _begin(self, key: str) -> threading.Event:
        ev = threading.Event()
        with self._stops_lock:
            self._stops[key] = ev
        return ev

    def _end(self, key: str, ev: threading.Event) -> None:
        with self._stops_lock:
            if self._stops.get(key) is ev:
                del self._stops[key]

    def stop(self, request: gr.Request = None) -> None:
        """Stop button: ends this browser session's running answer at the next token (kept, marked stopped)."""
        key = getattr(request, "session_hash", None) or "default"
        with self._stops_lock:
            ev = self._stops.get(key)
        if ev is not None:
            ev.set()

    # ------------------------------------------------------------------------------------ handlers
    def _settings(self, temperature, top_p, max_new_tokens) -> GenerationSettings:
        return GenerationSettings(temperature=float(temperature), top_p=float(top_p),
                                  max_new_tokens=max(1, int(max_new_tokens)))

    def _answer(self, state: UiState, settings: GenerationSettings, request):
        key = getattr(request, "session_hash", None) or "default"
        ev = self._begin(key)
        try:
            for reply in self.engine.chat(state.session, settings, ev):
                if reply.done:
                    yield self._outputs(state)
                else:
                    yield self._outputs(state, partial=reply.text, full=False)
        except PromptTooLong as e:
            yield self._outputs(state, notice=str(e))
        finally:
            self._end(key, ev)

    def submit(self, message, state: Optional[UiState], temperature, top_p, max_new_tokens, request: gr.Request = None):
        """Textbox submit: an attached image (validated) starts a new conversation; text is a question."""
        state = state if isinstance(state, UiState) else UiState()
        message = message or {}
        text = (message.get("text") or "").strip()
        files = message.get("files") or []
        if files:
            path, name = _file_path(files[-1])
            try:
                image, notes = self.engine.load_image(path, name=name)
                info = self.engine.describe_image(image)
            except ImageRejected as e:
                yield self._outputs(state, notice=f"Upload not used: {e}")
                return
            self._drop_files(state)
            state.session.set_image(image, info, name)
            state.preview = self._save(image, PREVIEW_SIDE, ".png")
            state.overlay = self._save(info.overlay, None, ".png") if info.overlay is not None else None
            extra = f" ({'; '.join(notes)})" if notes else ""
            state.image_line = (f"**{name}** {image.size[0]}x{image.size[1]}{extra}: **{info.num_tokens} visual "
                                f"tokens** from {info.num_patches} patches ({info.compression:.1f}x fewer)")
            if len(files) > 1:
                notice = f"One image per conversation: using {name}."
                yield self._outputs(state, notice=notice)
        if not text:
            yield self._outputs(state)
            return
        try:
            state.session.add_question(text)
        except ValueError as e:
            yield self._outputs(state, notice=str(e))
            return
        yield self._outputs(state, partial="")
        yield from self._answer(state, self._settings(temperature, top_p, max_new_tokens), request)

    def regenerate(self, state: Optional[UiState], temperature, top_p, max_new_tokens, request: gr.Request = None):
        state = state if isinstance(state, UiState) else UiState()
        try:
            state.session.pop_answer()
        except ValueError as e:
            yield self._outputs(state, notice=str(e))
            return
        yield self._outputs(state, partial="")
        yield from self._answer(state, self._settings(temperature, top_p, max_new_tokens), request)

    def clear(self, state: Optional[UiState]):
        if isinstance(state, UiState):
            self._drop_files(state)
        return self._outputs(UiState())

    # ------------------------------------------------------------------------------------ layout
    def build(self):
        e = self.engine
        tower = e.tower.config
        header = (f"### drip-llava chat: `{e.model_name}`\n"
                  f"Vision tower: {'DRIP ' + format(tower.compression, 'g') + 'x' if tower.is_drip else 'plain ViT'}"
                  f", {tower.image_size} px, {tower.num_patches} patches; template `{e.conv_mode}`; "
                  f"context {e.context_len} tokens. Attach one image (it starts a new conversation), then ask.")
        d = self.defaults
        with gr.Blocks(title="drip-llava chat") as demo:
            gr.Markdown(header)
            state = gr.State(UiState())
            with gr.Row():
                with gr.Column(scale=3):
                    chatbot = gr.Chatbot(label="Chat", height=520, elem_id="chatbot", buttons=["copy"])
                    box = gr.MultimodalTextbox(placeholder="Attach an image and/or type a question, then Enter",
                                               file_types=["image"], file_count="single", sources=["upload"],
                                               show_label=False, stop_btn=True, elem_id="chat_input")
                    with gr.Row():
                        regen_btn = gr.Button("Regenerate", elem_id="regenerate")
                        stop_btn = gr.Button("Stop", elem_id="stop")
                        clear_btn = gr.Button("Clear", elem_id="clear")
                with gr.Column(scale=2):
                    overlay = gr.Image(label="DRIP segments (one colour = one visual token)", interactive=False,
                                       type="filepath", elem_id="overlay")
                    image_md = gr.Markdown("", elem_id="image_info")
                    stats_md = gr.Markdown("No answers yet.", elem_id="answer_stats")
                    with gr.Accordion("Generation", open=False):
                        temperature = gr.Slider(0.0, 1.5, value=d.temperature, step=0.05,
                                                label="Temperature (0 = greedy)")
                        top_p = gr.Slider(0.05, 1.0, value=d.top_p if d.top_p is not None else 0.7, step=0.05,
                                          label="Top p")
                        max_new = gr.Slider(1, 2048, value=d.max_new_tokens, step=1, label="Max new tokens")
            if self.examples:
                gr.Examples(examples=[{"text": q, "files": [p]} for p, q in self.examples], inputs=[box],
                            label="Examples (offline photos)")
            outputs = [chatbot, state, box, overlay, image_md, stats_md]
            gen = dict(concurrency_id="model", concurrency_limit=1, show_progress="minimal")
            box.submit(self.submit, [box, state, temperature, top_p, max_new], outputs, api_name="submit", **gen)
            regen_btn.click(self.regenerate, [state, temperature, top_p, max_new], outputs, api_name="regenerate",
                            **gen)
            stop_btn.click(self.stop, None, None, queue=False, api_name="stop")
            box.stop(self.stop, None, None, queue=False, api_visibility="private")
            clear_btn.click(self.clear, [state], outputs, queue=False, api_name="clear")
        return demo


def launch(app: ChatApp, host: str = "127.0.0.1", port: Optional[int] = 7860, block: bool = True):
    """Queue (one model job at a time, others wait) and serve; returns the Blocks (non-blocking: running)."""
    demo = app.build()
    demo.queue(default_concurrency_limit=1, max_size=64)
    allowed = [str(app.work_dir)] + sorted({str(Path(p).parent) for p, _ in app.examples})
    demo.launch(server_name=host, server_port=port, quiet=True, share=False, show_error=True, ssr_mode=False,
                enable_monitoring=False, max_file_size=MAX_UPLOAD, allowed_paths=allowed,
                prevent_thread_lock=not block, inbrowser=False)
    return demo


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m drip_llava.serve.gradio_app", description=__doc__.split("\n")[0])
    p.add_argument("--model-path", required=True, help="full, LoRA or projector-only drip-llava folder")
    p.add_argument("--model-base", default=None, help="base LLM folder (LoRA / projector-only checkpoints)")
    p.add_argument("--load-8bit", action="store_true")
    p.add_argument("--load-4bit", action="store_true")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--conv-mode", default=None, help="conversation template (default: the checkpoint's, else "
                                                       "vicuna_v1)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only; "
                                                        "0.0.0.0 exposes the demo to the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=0.7)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="uploads with more pixels are refused (JPEGs are decoded at a reduced scale); an accepted "
                        "image is kept at its size until the model's image processor resizes it")
    p.add_argument("--no-examples", action="store_true", help="do not preload the offline example photos")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no phoning home
    configure_pil(args.max_image_pixels)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "uvicorn.access", "gradio"):  # no per-request lines (they would carry client info)
        logging.getLogger(noisy).setLevel(logging.WARNING)
    engine = ChatEngine.from_pretrained(args.model_path, model_base=args.model_base, load_8bit=args.load_8bit,
                                        load_4bit=args.load_4bit, device=args.device, conv_mode=args.conv_mode,
                                        max_image_pixels=args.max_image_pixels)
    examples = [] if args.no_examples else prepare_examples()
    work_dir = tempfile.mkdtemp(prefix="drip_llava_gradio_")
    atexit.register(shutil.rmtree, work_dir, ignore_errors=True)
    app = ChatApp(engine, work_dir=work_dir, examples=examples,
                  defaults=GenerationSettings(args.temperature, args.top_p, args.max_new_tokens))
    print(f"drip-llava chat: model {args.model_path} ({engine.loaded.kind}, template {engine.conv_mode}) on "
          f"http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    launch(app, host=args.host, port=args.port, block=True)


if __name__ == "__main__":
    main()
