#!/usr/bin/env bash
# ScienceQA (LLaVA protocol: CQM-A prompt, letter parsing, overall + IMG accuracy), end to end:
#   convert (once) -> generate, one chunk per GPU in parallel -> merge chunks -> score.
# Rerunning resumes: generate skips question_ids already in a chunk file.
#
# Variables (set in the environment, e.g. `MODEL_PATH=checkpoints/x CKPT=x bash eval/scienceqa.sh`):
#   MODEL_PATH  model folder to evaluate (required)
#   MODEL_BASE  base LLM folder, for projector-only / LoRA checkpoints (optional)
#   CKPT        name of the run, used for answer files (default: basename of MODEL_PATH)
#   SPLIT       ScienceQA split from pid_splits.json (default: test)
#   DATA_DIR    holds problems.json, pid_splits.json, images/$SPLIT (default: ./playground/data/eval/scienceqa)
#   Generation: LLaVA's sqa.sh settings (temperature 0, 1024 new tokens, one beam, conv mode vicuna_v1, the
#   single-letter instruction in the prompt); each is recorded in every answer's metadata. Override with
#   CONV_MODE (e.g. the checkpoint's own template), TEMPERATURE, MAX_NEW_TOKENS, TOP_P, NUM_BEAMS.
#   GPULIST     comma-separated GPU ids (default: $CUDA_VISIBLE_DEVICES, else 0); chunk i runs on
#               GPULIST[i % #GPULIST]; ignored on a CPU-only machine
#   NUM_CHUNKS  number of chunks (default: the number of GPUs in GPULIST)
#   PYTHON      interpreter (default: python)
set -euo pipefail

MODEL_PATH="${MODEL_PATH:?set MODEL_PATH to the model folder to evaluate}"
MODEL_BASE="${MODEL_BASE:-}"
CKPT="${CKPT:-$(basename "$MODEL_PATH")}"
SPLIT="${SPLIT:-test}"
DATA_DIR="${DATA_DIR:-./playground/data/eval/scienceqa}"
BENCHMARK=scienceqa
GPULIST="${GPULIST:-${CUDA_VISIBLE_DEVICES:-0}}"
IFS=',' read -ra GPUS <<< "$GPULIST"
NUM_CHUNKS="${NUM_CHUNKS:-${#GPUS[@]}}"
PYTHON="${PYTHON:-python}"

QUESTION_FILE="$DATA_DIR/llava_${SPLIT}_CQM-A.jsonl"
ANSWER_DIR="$DATA_DIR/answers/$SPLIT/$CKPT"
mkdir -p "$ANSWER_DIR"

if [[ ! -f "$QUESTION_FILE" ]]; then
    "$PYTHON" -m drip_llava.eval.scienceqa convert --base-dir "$DATA_DIR" --split "$SPLIT" \
        --prompt-format CQM-A --out "$QUESTION_FILE"
fi

BASE_ARGS=()
if [[ -n "$MODEL_BASE" ]]; then BASE_ARGS=(--model-base "$MODEL_BASE"); fi

source "$(dirname "${BASH_SOURCE[0]}")/generate_chunks.sh"
generate_chunks "$QUESTION_FILE" "$DATA_DIR/images/$SPLIT" "$ANSWER_DIR"

"$PYTHON" -m drip_llava.eval.scienceqa score --base-dir "$DATA_DIR" --split "$SPLIT" \
    --result-file "$MERGED" \
    --output-file "$ANSWER_DIR/${CKPT}_output.jsonl" \
    --output-result "$ANSWER_DIR/${CKPT}_result.json"
