"""Serving: a Gradio app (gradio_app) and a terminal CLI (cli), both over the inference engine in
drip_llava.inference (the same engine eval uses).

Unlike LLaVA's controller + worker + web-server trio, everything runs in one process, so a failure is
reported where it happens, with its real message.
"""
