"""drip_llava.serve: safe image loading, the chat engine (streaming, stop, context fitting), the Gradio app
through gradio_client (a real server in a subprocess) and the terminal CLI."""
import io
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from drip_llava.inference import (
    ChatEngine,
    ChatSession,
    GenerationSettings,
    ImageRejected,
    PromptTooLong,
    load_image_safely,
)

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What is in this image?"


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory, tiny_llm_dir, tiny_drip_dir):
    """A full drip-llava checkpoint (random 2x64 Llama + SmolLM2 tokenizer + drip-tiny-16-4x + mlp2x_gelu)."""
    from transformers import AutoTokenizer

    from drip_llava.model import DripLlavaForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_llava")
    model = DripLlavaForCausalLM.from_pretrained(str(tiny_llm_dir))
    model.initialize_vision_modules(str(tiny_drip_dir), "mlp2x_gelu", select_layer=-2)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(tiny_llm_dir)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def engine(tiny_llava_dir):
    return ChatEngine.from_pretrained(tiny_llava_dir, device="cpu")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A photo, a text file named .png, a truncated PNG, a header claiming 20000x20000, a real 20000x20000
    1-bit PNG (48 KB compressed, 400 MP decoded)."""
    from drip_llava.vision.images import example_image

    d = tmp_path_factory.mktemp("uploads")
    photo = d / "chelsea.png"
    example_image("chelsea").save(photo)
    not_image = d / "notes.png"
    not_image.write_text("this is a text file, not a PNG\n" * 20)
    truncated = d / "truncated.png"
    truncated.write_bytes(photo.read_bytes()[:3000])
    return SimpleNamespace(photo=photo, not_image=not_image, truncated=truncated,
                           header=_png_header_only(d / "bomb_header.png", 20000, 20000),
                           bomb=_real_bomb(d / "bomb_1bit.png"))


def _png_header_only(path, w, h):
    """A PNG whose header says w x h, with only two rows of data: cheap to make, must never be decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + 3 * w) * 2)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _real_bomb(path, side=20000):
    """A complete, valid 1-bit side x side PNG (every row present), written row by row: 48 KB on disk, 50 MB
    as 1-bit pixels, 1.2 GB if decoded to RGB."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _rss_peak_mb():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------- images

def test_load_image_rejects_bad_files_with_messages(files):
    with pytest.raises(ImageRejected, match=r"notes.png: not an image file"):
        load_image_safely(files.not_image)
    with pytest.raises(ImageRejected, match=r"truncated.png: the image is corrupt or truncated"):
        load_image_safely(files.truncated)
    with pytest.raises(ImageRejected, match="file not found"):
        load_image_safely(files.photo.parent / "missing.png")
    im, notes = load_image_safely(files.photo)
    assert im.mode == "RGB" and im.size == (451, 300) and notes == []


def test_huge_images_refused_before_decoding(files, monkeypatch):
    # our own header check, even with PIL's guard switched off: nothing is decoded
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    peak = _rss_peak_mb()
    t = time.perf_counter()
    for path in (files.header, files.bomb):
        with pytest.raises(ImageRejected, match=r"20000x20000 pixels \(400 MP\) is over the limit of 50 MP"):
            load_image_safely(path)
    assert time.perf_counter() - t < 2.0
    assert _rss_peak_mb() - peak < 200  # decoding the 1-bit one as RGB would take 1.2 GB
    # PIL's own decompression-bomb refusal (when its limit is the lower one) becomes the same kind of message
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)  # PIL's default: refuses above 2x
    with pytest.raises(ImageRejected, match=r"400 MP is over the limit of 50 MP \(refused from the header"):
        load_image_safely(files.bomb)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageRejected, match="0 MP is over the limit of 50 MP"):
        load_image_safely(files.photo)


def test_big_jpeg_is_decoded_at_reduced_scale(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (4000, 3000), (200, 30, 30)).save(path, quality=80)
    im, notes = load_image_safely(path, max_pixels=2_000_000)
    assert im.size == (1000, 750) and notes == ["decoded at reduced scale 1000x750 (from 4000x3000)"]
    assert im.getpixel((10, 10))[0] > 150
    small, notes = load_image_safely(path, max_pixels=20_000_000)  # within the limit: kept at its full size
    assert small.size == (4000, 3000) and notes == []
    with pytest.raises(ImageRejected, match="over the limit"):  # a PNG cannot be drafted: refused
        Image.new("RGB", (2000, 1500)).save(tmp_path / "big.png")
        load_image_safely(tmp_path / "big.png", max_pixels=2_000_000)


def test_transparency_becomes_white_and_exif_orientation_is_applied(tmp_path):
    rgba = Image.new("RGBA", (32, 16), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: the top-left pixel goes to the top-right
    buf = io.BytesIO()
    rgba.save(buf, "PNG", exif=exif)
    buf.seek(0)
    im, _ = load_image_safely(buf)
    assert im.size == (16, 32) and im.getpixel((5, 5)) == (255, 255, 255) and im.getpixel((15, 0)) == (255, 0, 0)


def test_engine_uses_the_checkpoint_image_processor(tiny_llava_dir, tmp_path):
    """A folder's preprocessor_config.json decides padding; without one the engine resizes and crops (square)."""
    import shutil

    from drip_llava.data.image_processor import DripLlavaImageProcessor

    wide = Image.new("RGB", (120, 40), (200, 30, 30))
    plain = ChatEngine.from_pretrained(tiny_llava_dir, device="cpu")
    assert plain.image_processor.aspect_ratio == "square" and any("square" in n for n in plain.loaded.notes)
    padded_dir = tmp_path / "padded"
    shutil.copytree(tiny_llava_dir, padded_dir)
    proc = DripLlavaImageProcessor.from_vision_config(plain.tower.config, "pad")
    proc.save_pretrained(padded_dir)
    padded = ChatEngine.from_pretrained(padded_dir, device="cpu")
    assert padded.image_processor == proc and padded.loaded.notes == []
    x, y = plain.pixel_values(wide)[0], padded.pixel_values(wide)[0]
    assert torch.equal(y, proc(wide)) and torch.equal(x, proc.with_aspect_ratio("square")(wide))
    corner = (torch.tensor(proc.pad_color) / 255 - torch.tensor(proc.image_mean)) / torch.tensor(proc.image_std)
    torch.testing.assert_close(y[:, 0, 0], corner, atol=0.02, rtol=0)  # the pad colour, not the cropped image
    assert not torch.equal(x, y)
    info = padded.describe_image(wide)  # the overlay is drawn on the padded view the model reads
    assert info.overlay is not None and info.num_tokens >= 1


# ---------------------------------------------------------------------------------------------- engine

def test_stream_matches_generate_and_reports_tokens_and_times(engine, files):
    image, _ = engine.load_image(files.photo)
    info = engine.describe_image(image)
    assert 1 <= info.num_tokens < info.num_patches == 64  # DRIP pooled the 64 patches
    assert info.overlay is not None and info.overlay.size[0] >= 448
    settings = GenerationSettings(temperature=0, max_new_tokens=12)
    session = ChatSession()
    session.set_image(image, info, "chelsea")
    session.add_question(QUESTION)
    replies = list(engine.chat(session, settings))
    partial, final = replies[:-1], replies[-1]
    assert final.done and len(partial) >= 3  # streamed token by token
    assert all(not r.done for r in partial) and partial[-1].text.strip() == final.text
    assert final.visual_tokens == info.num_tokens and final.new_tokens == 12 and final.finish_reason == "length"
    assert final.prefill_ms > 0 and final.vision_ms > 0 and final.ttft_ms >= final.prefill_ms
    assert session.messages[-1] == {"role": "assistant", "content": final.text} and session.replies == [final]
    # the non-streaming path (batch eval) gives the same greedy answer
    same = engine.generate([{"role": "user", "content": QUESTION}], image, settings)
    assert same.text == final.text and same.visual_tokens == final.visual_tokens
    # the prompt: template system line, <image> first in the first user turn
    prompt, ids = engine.prompt_ids(session.messages + [{"role": "user", "content": "and?"}], True)
    assert prompt.count("<image>") == 1 and "USER: <image>\n" + QUESTION in prompt and prompt.endswith("ASSISTANT:")
    # regenerate: the last answer is replaced
    assert session.pop_answer() == QUESTION and session.pending
    again = list(engine.chat(session, settings))[-1]
    assert again.text == final.text and len(session.replies) == 1


def test_stop_event_and_text_only(engine):
    stop = threading.Event()
    seen = []
    for r in engine.stream([{"role": "user", "content": "Tell me a long story."}], None,
                           GenerationSettings(temperature=0.8, top_p=0.9, max_new_tokens=500), stop):
        seen.append(r)
        if len(seen) == 3:
            stop.set()
    final = seen[-1]
    assert final.done and final.stopped and final.new_tokens < 20 and final.visual_tokens == 0
    # leaving the generator early stops the worker thread too (and frees the engine lock)
    gen = engine.stream([{"role": "user", "content": "hi"}], None,
                        GenerationSettings(temperature=0, max_new_tokens=500))
    next(gen)
    gen.close()
    assert engine._lock.acquire(timeout=5)
    engine._lock.release()
    with pytest.raises(ValueError, match="num_beams=1"):
        next(engine.stream([{"role": "user", "content": "hi"}], None, GenerationSettings(num_beams=2)))
    beams = engine.generate([{"role": "user", "content": "hi"}], None, GenerationSettings(0, None, 4, num_beams=2))
    assert beams.done and beams.new_tokens == 4 and beams.prefill_ms is None


def test_image_is_encoded_once_per_conversation(lively_engine, files, monkeypatch):
    """describe_image runs the tower once (tokens + overlay); three questions reuse its tokens, and every answer
    equals the one from re-encoding the image for that question."""
    engine = lively_engine
    image, _ = engine.load_image(files.photo)
    tower_model = engine.tower.model
    calls = []
    run = tower_model.forward_features
    monkeypatch.setattr(tower_model, "forward_features", lambda *a, **k: calls.append(1) or run(*a, **k))
    info = engine.describe_image(image)
    assert len(calls) == 1 and info.overlay is not None and info.features.shape[0] == info.num_tokens
    settings = GenerationSettings(temperature=0, max_new_tokens=8)
    session = ChatSession()
    session.set_image(image, info, "chelsea")
    for q in ("What is in this image?", "What colour is it?", "Where is it?"):
        session.add_question(q)
        final = list(engine.chat(session, settings))[-1]
        assert final.visual_tokens == info.num_tokens
    assert len(calls) == 1  # no tower run for the questions
    monkeypatch.undo()
    for k, reply in enumerate(session.replies):  # re-encoded for each question: the same answers
        again = engine.generate(session.messages[:2 * k + 1], image, settings)
        assert again.text == reply.text and again.visual_tokens == reply.visual_tokens
    assert len({r.text for r in session.replies}) == 3
    # the cached tokens and the overlay's segments are those of a fresh encode
    fresh = engine.inner.encode_images(engine.pixel_values(image))[0]
    assert torch.equal(info.features, fresh)
    from drip_llava.vision.visualize import segment_overlay

    pic, n = segment_overlay(tower_model, engine.image_processor.prepare(image))
    assert n == info.num_tokens and pic.tobytes() == info.overlay.tobytes()


@pytest.fixture(scope="module")
def lively_engine(tiny_llava_dir):
    """The tiny checkpoint with its LLM's matrices redrawn at a larger scale: its greedy answers then depend on
    the prompt and the image (the saved random init answers everything with the same repeated token)."""
    engine = ChatEngine.from_pretrained(tiny_llava_dir, device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in engine.inner.model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return engine


def test_batched_generation_equals_one_at_a_time(lively_engine, files):
    """Left-padded batch with images of different token counts and a text-only request: greedy answers, token
    counts and finish reasons equal those of `generate` one request at a time."""
    engine = lively_engine
    photo, _ = engine.load_image(files.photo)
    crop = photo.crop((0, 0, 200, 120))
    requests = [([{"role": "user", "content": QUESTION}], photo),
                ([{"role": "user", "content": "Tell me a story about a cat and a dog."}], None),
                ([{"role": "user", "content": "Colour?"}], crop),
                ([{"role": "user", "content": "Describe every part of this picture in detail please."}], photo)]
    settings = GenerationSettings(temperature=0, max_new_tokens=10)
    batched = engine.generate_batch(requests, settings)
    single = [engine.generate(m, im, settings) for m, im in requests]
    assert len({r.visual_tokens for r in single if r.visual_tokens}) == 2  # two different token counts
    for b, s in zip(batched, single):
        assert (b.text, b.visual_tokens, b.prompt_tokens, b.new_tokens, b.finish_reason) == \
               (s.text, s.visual_tokens, s.prompt_tokens, s.new_tokens, s.finish_reason)
    assert len({r.text for r in single}) == len(single)  # the answers differ: the test can tell them apart
    assert engine.generate_batch([], settings) == []


def test_context_is_fitted_with_real_token_counts(engine, files):
    image, _ = engine.load_image(files.photo)
    info = engine.describe_image(image, overlay=False)
    session = ChatSession()
    session.set_image(image, info)
    for k in range(4):
        session.add_question(f"question number {k} about the picture")
        session.add_answer(type("R", (), {"text": "an answer " * 30})())
    session.add_question("last question")
    _, full_ids = engine.prompt_ids(session.messages, True)
    full_len = full_ids.shape[1] - 1 + info.num_tokens
    old = engine.context_len
    try:
        engine.context_len = full_len + 4 - 40  # too small for the whole conversation + 4 new tokens
        final = list(engine.chat(session, GenerationSettings(temperature=0, max_new_tokens=4)))[-1]
        assert final.dropped_turns >= 1 and final.prompt_tokens + 4 <= engine.context_len
        assert final.visual_tokens == info.num_tokens
        engine.context_len = 30  # not even the first turn fits
        session.add_question("again")
        with pytest.raises(PromptTooLong, match="clear the conversation"):
            list(engine.chat(session, GenerationSettings(temperature=0, max_new_tokens=4)))
    finally:
        engine.context_len = old


# ---------------------------------------------------------------------------------------------- Gradio app

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listen_addresses(port):
    """Local addresses LISTENing on `port` (from /proc/net/tcp{,6})."""
    out = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(name):
            continue
        for line in Path(name).read_text().splitlines()[1:]:
            fields = line.split()
            addr, p = fields[1].split(":")
            if int(p, 16) == port and fields[3] == "0A":
                out.append(addr)
    return out


@pytest.fixture(scope="module")
def app_server(engine, tmp_path_factory):
    """The app served in this process (sharing the engine) on a free port; main() itself runs as a subprocess
    in tests/test_browser.py."""
    from drip_llava.serve import gradio_app

    d = tmp_path_factory.mktemp("app")
    examples = gradio_app.prepare_examples(d / "examples")
    app = gradio_app.ChatApp(engine, work_dir=str(d / "work"), examples=examples,
                             defaults=GenerationSettings(temperature=0.0, top_p=0.7, max_new_tokens=16))
    port = _free_port()
    demo = gradio_app.launch(app, host="127.0.0.1", port=port, block=False)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}/", port=port, app=app, demo=demo, examples=examples)
    demo.close()


@pytest.fixture(scope="module")
def expected_answer(engine, files):
    image, _ = engine.load_image(files.photo)
    return engine.generate([{"role": "user", "content": QUESTION}], image,
                           GenerationSettings(temperature=0, max_new_tokens=16)).text


def _client(app_server, tmp_path):
    from gradio_client import Client

    # download_files=False: file outputs come back as server paths (same machine); downloading the chat's image
    # again for every streamed update would dominate the test time
    return Client(app_server.url, verbose=False, download_files=False, analytics_enabled=False)


def _texts(chat, role):
    return [part["text"] for m in chat if m["role"] == role for part in m["content"] if part.get("type") == "text"]


def _submit(client, text, path=None, max_new=16, temperature=0.0):
    from gradio_client import handle_file

    msg = {"text": text, "files": [handle_file(str(path))] if path else []}
    return client.submit(msg, temperature, 0.7, max_new, api_name="/submit")


def test_app_answers_with_image_and_streams(app_server, files, engine, expected_answer, tmp_path):
    client = _client(app_server, tmp_path)
    job = _submit(client, QUESTION, files.photo)
    chat, _, overlay, image_md, stats_md = job.result(timeout=120)
    outputs = job.outputs()
    assert len(outputs) >= 5  # image set, question shown, then token by token
    partial_answers = [(_texts(o[0], "assistant") or [""])[-1] for o in outputs]
    assert len(set(partial_answers)) >= 4  # the answer grew over several updates
    assert _texts(chat, "assistant") == [expected_answer] and _texts(chat, "user") == [QUESTION]
    assert any(part.get("type") == "file" for m in chat for part in m["content"])  # the image is in the chat
    info = engine.describe_image(engine.load_image(files.photo)[0], overlay=False)
    assert f"**{info.num_tokens} visual tokens** from 64 patches" in image_md
    overlay_path = overlay["path"] if isinstance(overlay, dict) else getattr(overlay, "path", overlay)
    assert Image.open(overlay_path).format == "PNG"
    row = re.search(r"\| 1 \| (\d+) \| (\d+) \| (\d+) \| 16 \|", stats_md)
    assert row and int(row.group(1)) == info.num_tokens and int(row.group(3)) >= 0  # prefill ms shown
    # regenerate replaces the answer (greedy: the same text), clear empties everything
    chat2 = client.predict(0.0, 0.7, 16, api_name="/regenerate")[0]
    assert _texts(chat2, "assistant") == [expected_answer]
    cleared = client.predict(api_name="/clear")
    assert cleared[0] == [] and cleared[2] is None
    chat3 = client.predict(0.0, 0.7, 16, api_name="/regenerate")[0]
    assert "nothing to regenerate" in _texts(chat3, "assistant")[-1]


def test_app_bad_uploads_get_messages(app_server, files, expected_answer, tmp_path):
    client = _client(app_server, tmp_path)
    cases = [(files.not_image, "not an image file"), (files.truncated, "corrupt or truncated"),
             (files.header, "over the limit of 50 MP"), (files.bomb, "over the limit of 50 MP")]
    for path, message in cases:
        t = time.perf_counter()
        chat = _submit(client, QUESTION, path).result(timeout=60)[0]
        notice = _texts(chat, "assistant")[-1]
        assert notice.startswith("Upload not used:") and path.name in notice and message in notice, notice
        assert "Traceback" not in notice and time.perf_counter() - t < 20
    # the app still works afterwards
    chat = _submit(client, QUESTION, files.photo).result(timeout=120)[0]
    assert _texts(chat, "assistant") == [expected_answer]


def test_app_stop_and_queue(app_server, files, expected_answer, tmp_path):
    client = _client(app_server, tmp_path / "a")
    job = _submit(client, QUESTION, files.photo, max_new=1500)
    deadline = time.time() + 60
    while len(job.outputs()) < 4 and time.time() < deadline and not job.done():
        time.sleep(0.05)
    client.predict(api_name="/stop")
    t = time.perf_counter()
    chat, *_, stats_md = job.result(timeout=60)
    assert time.perf_counter() - t < 15
    assert "| stopped |" in stats_md
    assert 0 < len(_texts(chat, "assistant")[-1]) < 1500
    # two users at once: queued one after the other, each gets its own (correct) conversation
    c1, c2 = _client(app_server, tmp_path / "b"), _client(app_server, tmp_path / "c")
    j1, j2 = _submit(c1, QUESTION, files.photo), _submit(c2, QUESTION, files.photo)
    for j in (j1, j2):
        assert _texts(j.result(timeout=120)[0], "assistant") == [expected_answer]


def test_app_binds_localhost_and_logs_no_client_addresses(app_server, capfd, tmp_path):
    import logging

    addrs = _listen_addresses(app_server.port)
    assert addrs and all(a in ("0100007F", "00000000000000000000000001000000") for a in addrs), addrs
    assert not logging.getLogger("uvicorn.access").isEnabledFor(logging.INFO)  # no access log at all
    client = _client(app_server, tmp_path)
    client.predict(api_name="/clear")
    with urllib.request.urlopen(app_server.url, timeout=10) as r:
        assert r.status == 200 and b"drip-llava" in r.read()
    out = "".join(capfd.readouterr())
    assert not re.search(r"127\.0\.0\.1:\d+ - ", out) and '"GET /' not in out and '"POST /' not in out, out[-2000:]
    # the examples (offline photos) are preloaded
    assert len(app_server.examples) >= 3 and all(Path(p).is_file() for p, _ in app_server.examples)


# ---------------------------------------------------------------------------------------------- CLI

def test_cli_streams_answer_in_process(tiny_llava_dir, files, expected_answer):
    from drip_llava.serve import cli

    class Recorder(io.StringIO):
        writes = 0

        def write(self, s):
            Recorder.writes += 1
            return super().write(s)

    out, err = Recorder(), io.StringIO()
    rc = cli.main(["--model-path", str(tiny_llava_dir), "--image-file", str(files.photo), "--temperature", "0",
                   "--max-new-tokens", "16"], stdin=io.StringIO(f"{QUESTION}\n\n/regen\n"), stdout=out, stderr=err)
    assert rc == 0
    lines = out.getvalue().splitlines()
    assert lines == [f"ASSISTANT: {expected_answer}"] * 2
    assert Recorder.writes >= 10  # token by token
    assert err.getvalue().count("visual tokens, prefill") == 2
    bad = cli.main(["--model-path", str(tiny_llava_dir), "--image-file", str(files.not_image)],
                   stdin=io.StringIO(""), stdout=io.StringIO(), stderr=err)
    assert bad == 2 and "not an image file" in err.getvalue()


def test_cli_subprocess_reads_stdin_until_eof(tiny_llava_dir, files, expected_answer):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "drip_llava.serve.cli", "--model-path", str(tiny_llava_dir),
                           "--image-file", str(files.photo), "--temperature", "0", "--max-new-tokens", "16"],
                          input=f"{QUESTION}\n", capture_output=True, text=True, timeout=120, env=env, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [f"ASSISTANT: {expected_answer}"]
    assert re.search(r"\[image .*chelsea.png: 451x300, \d+ visual tokens from 64 patches", proc.stderr)


# ---------------------------------------------------------------------------------------------- KV-cache reuse

def _prefill_lengths(engine):
    """Records the sequence length of every LLM forward; a generation's first entry is its prefill."""
    seen = []

    def hook(module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        seen.append(int((x if x is not None else kwargs["input_ids"]).shape[1]))

    return seen, engine.inner.model.register_forward_pre_hook(hook, with_kwargs=True)


KV_QUESTIONS = ("What is in this image?", "What colour is the cat?", "Where is it sitting?",
                "Describe its ears.", "Is it looking at the camera?")


def test_kv_reuse_gives_the_answers_of_a_full_prefill(lively_engine, files):
    """A 5-turn greedy conversation (the answer budget changing between turns) answers with the same token ids
    with the session's PromptCache as without it, and each prefill with the cache runs only the prompt's new
    suffix: at least the whole previous prompt is reused."""
    reuse = lively_engine
    plain = ChatEngine(reuse.loaded, reuse_kv=False)
    image, _ = reuse.load_image(files.photo)
    info = reuse.describe_image(image, overlay=False)
    sessions = {}
    for name, engine in (("reuse", reuse), ("plain", plain)):
        session = ChatSession()
        session.set_image(image, info, "chelsea")
        seen, handle = _prefill_lengths(engine)
        prefills = []
        try:
            for k, q in enumerate(KV_QUESTIONS):
                session.add_question(q)
                seen.clear()
                list(engine.chat(session, GenerationSettings(temperature=0, max_new_tokens=6 + 3 * (k % 2))))
                prefills.append(seen[0])
        finally:
            handle.remove()
        sessions[name] = (session, prefills)
    (with_kv, pre_kv), (without, pre_plain) = sessions["reuse"], sessions["plain"]
    assert [r.token_ids for r in with_kv.replies] == [r.token_ids for r in without.replies]
    assert len({tuple(r.token_ids) for r in without.replies}) == 5  # the answers differ: equality means something
    assert pre_plain == [r.prompt_tokens for r in without.replies] and without.kv is None
    assert with_kv.replies[0].cached_tokens == 0
    for k, r in enumerate(with_kv.replies):
        assert pre_kv[k] == r.prompt_tokens - r.cached_tokens
        if k:
            assert r.cached_tokens >= with_kv.replies[k - 1].prompt_tokens


def test_kv_reuse_regenerate_edit_sampling_stop_truncation_clear(lively_engine, files):
    """Every way a conversation's prompt departs from the cached one answers with a full prefill's tokens: a
    regenerated answer (all but the last prompt position reused), an edited answer, sampled settings, an answer
    stopped at its first token, a generator closed early, turns dropped by fit_context; a cleared session has no
    cache left."""
    engine = lively_engine
    plain = ChatEngine(engine.loaded, reuse_kv=False)
    image, _ = engine.load_image(files.photo)
    info = engine.describe_image(image, overlay=False)
    greedy = GenerationSettings(temperature=0, max_new_tokens=8)
    session = ChatSession()
    session.set_image(image, info, "chelsea")

    def ask(question=None, settings=greedy, seed=0, stop=None):
        if question:
            session.add_question(question)
        messages = list(session.messages)
        torch.manual_seed(seed)
        final = list(engine.chat(session, settings, stop))[-1]
        torch.manual_seed(seed)
        ref = plain.generate(messages, settings=settings, image_features=info.features,
                             stop_event=threading.Event() if stop is None else stop)
        assert final.token_ids == ref.token_ids and final.prompt_tokens == ref.prompt_tokens
        return final

    first = ask(KV_QUESTIONS[0])
    second = ask(KV_QUESTIONS[1])
    session.pop_answer()  # regenerate
    again = ask()
    assert again.token_ids == second.token_ids and again.cached_tokens == again.prompt_tokens - 1
    session.messages[-1]["content"] = "A small grey dog on a sofa."  # an edited answer
    edited = ask(KV_QUESTIONS[2])
    assert again.prompt_tokens <= edited.cached_tokens < edited.prompt_tokens
    sampled = ask(KV_QUESTIONS[3], GenerationSettings(temperature=1.0, top_p=0.9, max_new_tokens=5), seed=3)
    assert sampled.cached_tokens >= edited.prompt_tokens

    stop = threading.Event()
    stop.set()  # stops after the first token: the cache holds the prompt only
    stopped = ask(KV_QUESTIONS[4], stop=stop)
    assert stopped.stopped and stopped.new_tokens == 1 and len(session.kv) == stopped.prompt_tokens
    session.pop_answer()
    gen = engine.chat(session, greedy)
    next(gen)
    gen.close()  # the consumer left: generation ends at the next token, the cache holds what was fed
    assert session.pending and len(session.kv) >= stopped.prompt_tokens
    ask()

    old = engine.context_len, plain.context_len
    previous = [int(t) for t in engine.prompt_ids(session.messages[:-1], True)[1][0]]
    try:  # the whole conversation does not fit: fit_context drops the oldest pairs after the first
        engine.context_len = plain.context_len = session.replies[-1].prompt_tokens + 4
        truncated = ask("One more question about the cat?", GenerationSettings(temperature=0, max_new_tokens=4))
    finally:
        engine.context_len, plain.context_len = old
    assert truncated.dropped_turns == 1
    kept = [int(t) for t in engine.prompt_ids(session.messages[:2] + session.messages[4:-1], True)[1][0]]
    common = next(i for i, (a, b) in enumerate(zip(previous, kept)) if a != b)  # inside the previous prompt
    assert first.prompt_tokens < truncated.cached_tokens == common - 1 + info.num_tokens

    session.clear()
    assert session.kv.past is None and len(session.kv) == 0
    session.set_image(image, info, "chelsea")
    assert ask(KV_QUESTIONS[0]).cached_tokens == 0


def test_kv_reuse_another_image_failures_beams_and_eviction(lively_engine, files):
    """The visual tokens are compared as tensors: another image (same count, other values; or another count)
    reuses only the text before it. A failed generation drops the cache; beam search neither uses nor changes it;
    the engine keeps the caches of `kv_sessions` conversations."""
    from drip_llava.constants import IMAGE_TOKEN_INDEX
    from drip_llava.inference import PromptCache

    engine = ChatEngine(lively_engine.loaded, kv_sessions=1)
    plain = ChatEngine(lively_engine.loaded, reuse_kv=False)
    image, _ = engine.load_image(files.photo)
    feats = engine.describe_image(image, overlay=False).features
    crop = engine.describe_image(image.crop((0, 0, 200, 120)), overlay=False).features
    assert crop.shape[0] != feats.shape[0]
    messages = [{"role": "user", "content": QUESTION}]
    _, ids = engine.prompt_ids(messages, True)
    image_at = ids[0].tolist().index(IMAGE_TOKEN_INDEX)
    greedy = GenerationSettings(temperature=0, max_new_tokens=6)
    kv = PromptCache()
    first = engine.generate(messages, settings=greedy, image_features=feats, kv=kv)
    assert first.cached_tokens == 0 and len(kv) == first.prompt_tokens + first.new_tokens - 1
    assert engine.generate(messages, settings=greedy, image_features=feats, kv=kv).cached_tokens == \
        first.prompt_tokens - 1
    for other in (feats + 0.5, crop, feats):
        reply = engine.generate(messages, settings=greedy, image_features=other, kv=kv)
        assert reply.cached_tokens == image_at
        assert reply.token_ids == plain.generate(messages, settings=greedy, image_features=other).token_ids
    assert engine.generate(messages, settings=greedy, image_features=feats + 0.5).token_ids != first.token_ids

    held = len(kv)
    beams = engine.generate(messages, settings=GenerationSettings(temperature=0, num_beams=2, max_new_tokens=4),
                            image_features=feats, kv=kv)
    assert beams.cached_tokens == 0 and len(kv) == held

    other_kv = PromptCache()  # kv_sessions=1: a second conversation's cache replaces the first's
    engine.generate(messages, settings=greedy, image_features=feats, kv=other_kv)
    assert len(other_kv) > 0 and kv.past is None and len(kv) == 0

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    engine.model.generate, original = broken, engine.model.generate
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            engine.generate(messages, settings=greedy, image_features=feats, kv=other_kv)
    finally:
        engine.model.generate = original
    assert other_kv.past is None and len(other_kv) == 0


def test_chat_latency_bench_runs_the_three_ways_and_batch_sizes(tmp_path):
    """eval.chat_latency on a random model from configs: the three ways answer with the same tokens, only the KV
    way reuses key/values (the whole previous prompt and answer, the word tokenizer reading answers back as
    their tokens), and eval.generate's batch sizes give batch 1's answers with their throughput."""
    import json

    from drip_llava.eval import chat_latency

    out = tmp_path / "latency.json"
    result = chat_latency.main(["--repeats", "1", "--max-new-tokens", "4", "--layers", "1", "--hidden", "64",
                                "--heads", "4", "--kv-heads", "2", "--vocab", "500", "--batch-sizes", "1,2",
                                "--batch-questions", "3", "--batch-max-new-tokens", "3", "--json", str(out)])
    chat = result["chat"]
    assert chat["same_answers"] and len(chat["rows"]) == 5
    for k, row in enumerate(chat["rows"]):
        assert row["re-encode"]["cached_tokens"] == row["image cache"]["cached_tokens"] == 0
        if k:
            previous = chat["rows"][k - 1]["image + KV"]
            assert row["image + KV"]["cached_tokens"] == previous["prompt_tokens"] + previous["new_tokens"] - 1
    assert [b["batch_size"] for b in result["batches"]] == [1, 2]
    assert all(b["same_answers_as_first"] and b["answered"] == 3 and b["visual_tokens_per_s"] > 0
               for b in result["batches"])
    assert json.loads(out.read_text())["chat"]["same_answers"]
