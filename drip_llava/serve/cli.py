"""Chat in the terminal, answers streamed token by token (same engine as the Gradio app).

    python -m drip_llava.serve.cli --model-path DIR [--model-base DIR] --image-file PATH [--load-4bit]
    echo "What is in the picture?" | python -m drip_llava.serve.cli --model-path DIR --image-file example:chelsea

Reads one question per line from stdin until EOF. Answers go to stdout ("ASSISTANT: ..."), the per-answer
stats (visual tokens, vision / prefill time, tokens/s) to stderr. Commands: /clear (forget the turns, keep the
image), /image PATH (new image, new conversation), /regen (answer the last question again), /quit.
Ctrl-C during an answer stops it; at the prompt it exits.
"""
from __future__ import annotations

import argparse
import sys
import threading
from typing import Optional, TextIO

from drip_llava.inference import (
    DEFAULT_MAX_PIXELS,
    ChatEngine,
    ChatSession,
    GenerationSettings,
    ImageRejected,
    PromptTooLong,
    configure_pil,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m drip_llava.serve.cli", description=__doc__.split("\n")[0])
    p.add_argument("--model-path", required=True, help="full, LoRA or projector-only drip-llava folder")
    p.add_argument("--model-base", default=None, help="base LLM folder (LoRA / projector-only checkpoints)")
    p.add_argument("--image-file", default=None, help="image path, or example:NAME (astronaut, chelsea, coffee, ...)")
    p.add_argument("--conv-mode", default=None, help="conversation template (default: the checkpoint's, else "
                                                       "vicuna_v1)")
    p.add_argument("--temperature", type=float, default=0.2, help="0 = greedy")
    p.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=None)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--load-8bit", action="store_true")
    p.add_argument("--load-4bit", action="store_true")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="images with more pixels are refused (JPEGs are decoded at a reduced scale)")
    p.add_argument("--quiet", action="store_true", help="no stats lines on stderr")
    return p.parse_args(argv)


class TerminalChat:
    def __init__(self, engine: ChatEngine, settings: GenerationSettings, out: TextIO, err: TextIO,
                 quiet: bool = False):
        self.engine, self.settings, self.out, self.err, self.quiet = engine, settings, out, err, quiet
        self.session = ChatSession()

    def set_image(self, spec: str) -> bool:
        from drip_llava.vision.images import EXAMPLE_PREFIX, example_image, image_label

        try:
            if spec.startswith(EXAMPLE_PREFIX):
                image, notes = self.engine.load_image(example_image(spec[len(EXAMPLE_PREFIX):]),
                                                      name=image_label(spec))
            else:
                image, notes = self.engine.load_image(spec, name=spec)
        except (ImageRejected, KeyError, FileNotFoundError) as e:
            print(f"[image not used: {e}]", file=self.err, flush=True)
            return False
        info = self.engine.describe_image(image, overlay=False)
        self.session.set_image(image, info, spec)
        extra = f"; {'; '.join(notes)}" if notes else ""
        print(f"[image {spec}: {image.size[0]}x{image.size[1]}, {info.summary()}{extra}]", file=self.err, flush=True)
        return True

    def answer(self) -> None:
        stop = threading.Event()
        self.out.write("ASSISTANT: ")
        self.out.flush()
        shown = ""
        try:
            for reply in self.engine.chat(self.session, self.settings, stop):
                if reply.done:
                    break
                if reply.text.startswith(shown):  # print only what is new
                    self.out.write(reply.text[len(shown):])
                    self.out.flush()
                    shown = reply.text
        except KeyboardInterrupt:
            self.out.write(" [stopped]\n")
            self.out.flush()
            return
        except PromptTooLong as e:
            self.out.write("\n")
            print(f"[{e}]", file=self.err, flush=True)
            return
        self.out.write("\n")
        self.out.flush()
        if not self.quiet:
            print(f"[{reply.stats_line()}]", file=self.err, flush=True)

    def handle(self, line: str) -> bool:
        """One input line; False to quit."""
        line = line.strip()
        if not line:
            return True
        if line in ("/quit", "/exit"):
            return False
        if line == "/clear":
            image, info, name = self.session.image, self.session.image_info, self.session.image_name
            self.session.clear()
            if image is not None:
                self.session.set_image(image, info, name)
            print("[conversation cleared]", file=self.err, flush=True)
            return True
        if line.startswith("/image "):
            self.set_image(line[len("/image "):].strip())
            return True
        if line == "/regen":
            try:
                self.session.pop_answer()
            except ValueError as e:
                print(f"[{e}]", file=self.err, flush=True)
                return True
        else:
            self.session.add_question(line)
        self.answer()
        return True

    def run(self, stdin: TextIO) -> None:
        interactive = stdin.isatty()
        while True:
            if interactive:
                self.out.write("USER: ")
                self.out.flush()
            try:
                line = stdin.readline()
            except KeyboardInterrupt:
                break
            if not line:  # EOF
                break
            if not self.handle(line):
                break


def main(argv=None, stdin: Optional[TextIO] = None, stdout: Optional[TextIO] = None,
         stderr: Optional[TextIO] = None) -> int:
    args = parse_args(argv)
    configure_pil(args.max_image_pixels)
    err = stderr or sys.stderr
    engine = ChatEngine.from_pretrained(args.model_path, model_base=args.model_base, load_8bit=args.load_8bit,
                                        load_4bit=args.load_4bit, device=args.device, conv_mode=args.conv_mode,
                                        max_image_pixels=args.max_image_pixels)
    print(f"[model {args.model_path} ({engine.loaded.kind}), template {engine.conv_mode}; one question per line, "
          f"EOF to quit]", file=err, flush=True)
    chat = TerminalChat(engine, GenerationSettings(args.temperature, args.top_p, args.max_new_tokens),
                        stdout or sys.stdout, err, quiet=args.quiet)
    if args.image_file and not chat.set_image(args.image_file):
        return 2
    chat.run(stdin or sys.stdin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
