"""The Gradio chat in a real headless Chromium (Debian's package, driven by playwright): upload a photo, ask,
wait for the streamed answer, keep a screenshot in test-artifacts/gradio_chat.png.

The app runs as `python -m drip_llava.serve.gradio_app` in a subprocess (the real entry point, one process)
on the embedded SmolLM2-135M-Instruct with a tiny random DRIP tower and projector (a projector-only folder +
--model-base), so the answer is real text; its log is checked for client addresses.
"""
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACT = REPO / "test-artifacts" / "gradio_chat.png"
QUESTION = "What is in this image?"
MAX_NEW = 24
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions", "--disable-sync",
                  "--metrics-recording-only", "--mute-audio"]


def _ensure_chromium() -> None:
    """Install Debian's chromium when missing (root + apt only); otherwise skip with the reason."""
    if CHROMIUM.exists():
        return
    if shutil.which("apt-get") is None:
        pytest.skip("no /usr/bin/chromium and no apt-get to install it")
    if os.geteuid() != 0:
        pytest.skip("no /usr/bin/chromium; installing it needs root (apt-get install -y chromium)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = []
    for cmd in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "chromium"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
        log.append(f"$ {' '.join(cmd)} -> {r.returncode}\n{r.stderr[-800:]}")
        if CHROMIUM.exists():
            return
    pytest.skip("could not install chromium with apt-get:\n" + "\n".join(log))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def smol_projector_dir(tmp_path_factory, tiny_drip_dir):
    """Stage-1-like folder: mm_projector.safetensors + config.json + vision_tower/, on the embedded SmolLM2."""
    from drip_demo.embedded_llm import prepare_embedded_llm
    from drip_llava.model import DripLlavaForCausalLM

    llm = prepare_embedded_llm()
    torch.manual_seed(0)
    model = DripLlavaForCausalLM.from_pretrained(str(llm))
    model.initialize_vision_modules(str(tiny_drip_dir), "mlp2x_gelu", select_layer=-2)
    out = tmp_path_factory.mktemp("smol_projector")
    model.save_mm_projector(out)
    return out, llm


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def test_chat_in_headless_chromium(smol_projector_dir, tmp_path):
    from drip_llava.inference import ChatEngine, GenerationSettings
    from drip_llava.vision.images import example_image

    _ensure_chromium()
    from playwright.sync_api import sync_playwright

    proj, llm = smol_projector_dir
    photo = tmp_path / "chelsea.jpg"
    example_image("chelsea").save(photo, quality=92)
    engine = ChatEngine.from_pretrained(proj, model_base=llm, device="cpu", conv_mode="chat_template")
    expected = engine.generate([{"role": "user", "content": QUESTION}], engine.load_image(photo)[0],
                               GenerationSettings(temperature=0, max_new_tokens=MAX_NEW)).text
    del engine
    assert expected.strip()

    port = _free_port()
    log = tmp_path / "app.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "DRIP_LLAVA_CACHE": str(tmp_path / "cache"), "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "drip_llava.serve.gradio_app", "--model-path", str(proj), "--model-base", str(llm),
             "--conv-mode", "chat_template", "--port", str(port), "--temperature", "0",
             "--max-new-tokens", str(MAX_NEW)], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, f"the app exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, f"the app did not come up:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1000})
                page.goto(url, wait_until="load", timeout=60_000)
                page.wait_for_selector("#chat_input textarea", timeout=60_000)
                assert page.locator("text=Examples (offline photos)").count() == 1
                page.locator("#chat_input input[type=file]").set_input_files(str(photo))
                page.wait_for_selector("#chat_input img", timeout=30_000)  # upload finished: thumbnail shown
                page.locator("#chat_input textarea").fill(QUESTION)
                page.locator("#chat_input textarea").press("Enter")
                # the stats table gets its row when the streamed answer is complete
                page.wait_for_selector("#answer_stats table tbody tr", timeout=120_000)
                bot = page.locator('#chatbot [data-testid="bot"]').last
                answer = bot.inner_text()
                assert _norm(expected)[:60] in _norm(answer), (expected, answer)
                assert bot.is_visible()
                assert "visual tokens" in page.locator("#image_info").inner_text()
                assert page.locator("#overlay img").count() >= 1  # the segment overlay is shown
                ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(ARTIFACT), full_page=True)
            finally:
                browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert ARTIFACT.is_file() and ARTIFACT.stat().st_size > 10_000
    from PIL import Image

    assert Image.open(ARTIFACT).format == "PNG"
    text = log.read_text()
    assert f"http://127.0.0.1:{port}" in text
    assert not re.search(r"127\.0\.0\.1:\d+ - ", text) and '"GET /' not in text and '"POST /' not in text, text[-2000:]
    assert "Traceback" not in text, text[-3000:]
