"""Serving: one shared chat engine (drip_llava.serve.chat) behind a Gradio app and a terminal CLI.

Unlike LLaVA's controller + worker + web-server trio, everything runs in one process, so a failure is
reported where it happens, with its real message.
"""
from drip_llava.serve.chat import (ChatEngine, ChatSession, GenerationSettings, ImageInfo, ImageRejected, Reply,
                                   load_image_safely)

__all__ = ["ChatEngine", "ChatSession", "GenerationSettings", "ImageInfo", "ImageRejected", "Reply",
           "load_image_safely"]
