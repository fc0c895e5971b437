#!/usr/bin/env bash
# LLaVA-Bench (In-the-Wild or COCO), end to end:
#   generate, one chunk per GPU in parallel -> merge chunks -> LLM-judge review -> relative score.
# Rerunning resumes both steps: generate skips answered question_ids, review skips reviewed ones.
#
# Variables (set in the environment, e.g. `MODEL_PATH=checkpoints/x JUDGE_MODEL=gpt-4o-2024-08-06 bash eval/llavabench.sh`):
#   MODEL_PATH      model folder to evaluate (required)
#   MODEL_BASE      base LLM folder, for projector-only / LoRA checkpoints (optional)
#   CKPT            name of the run, used for answer/review files (default: basename of MODEL_PATH)
#   BENCH           llava-bench-in-the-wild (default) or llava-bench-coco: the folder under playground/data/eval
#   DATA_DIR        the benchmark folder (default: ./playground/data/eval/$BENCH); answers/ and reviews/ go here
#   QUESTIONS       question file (default: $DATA_DIR/questions.jsonl)
#   REFERENCE       reference answers (default: $DATA_DIR/answers_gpt4.jsonl)
#   CONTEXT         image captions (default: $DATA_DIR/context.jsonl)
#   IMAGE_FOLDER    images named as in the question file (default: $DATA_DIR/images)
#   RULE            LLaVA's rule.json (default: $DATA_DIR/rule.json)
#   RULE_PREFIX     rule key = prefix + category (default: llava_bench_ for in-the-wild, empty for coco)
#   JUDGE_MODEL     judge model name (required; pin a dated snapshot so scores are reproducible)
#   JUDGE_BASE_URL  OpenAI-compatible base URL (default: https://api.openai.com/v1; vLLM/Ollama work too).
#                   The key is read from OPENAI_API_KEY when set.
#   JUDGE_CONCURRENCY  parallel judge requests (default: 1)
#   Generation: LLaVA's llavabench.sh settings (temperature 0, 1024 new tokens, one beam, conv mode vicuna_v1);
#                   each is recorded in every answer's metadata. Override with CONV_MODE (e.g. the checkpoint's own
#                   template), TEMPERATURE, MAX_NEW_TOKENS, TOP_P, NUM_BEAMS.
#   GPULIST         comma-separated GPU ids (default: $CUDA_VISIBLE_DEVICES, else 0); chunk i runs on
#                   GPULIST[i % #GPULIST]; ignored on a CPU-only machine
#   NUM_CHUNKS      number of chunks (default: the number of GPUs in GPULIST)
#   PYTHON          interpreter (default: python)
set -euo pipefail

MODEL_PATH="${MODEL_PATH:?set MODEL_PATH to the model folder to evaluate}"
JUDGE_MODEL="${JUDGE_MODEL:?set JUDGE_MODEL (e.g. a dated GPT-4 snapshot, or the model name served by vLLM/Ollama)}"
MODEL_BASE="${MODEL_BASE:-}"
CKPT="${CKPT:-$(basename "$MODEL_PATH")}"
BENCH="${BENCH:-llava-bench-in-the-wild}"
DATA_DIR="${DATA_DIR:-./playground/data/eval/$BENCH}"
QUESTIONS="${QUESTIONS:-$DATA_DIR/questions.jsonl}"
REFERENCE="${REFERENCE:-$DATA_DIR/answers_gpt4.jsonl}"
CONTEXT="${CONTEXT:-$DATA_DIR/context.jsonl}"
IMAGE_FOLDER="${IMAGE_FOLDER:-$DATA_DIR/images}"
RULE="${RULE:-$DATA_DIR/rule.json}"
if [[ "$BENCH" == "llava-bench-coco" ]]; then DEFAULT_PREFIX=""; else DEFAULT_PREFIX="llava_bench_"; fi
RULE_PREFIX="${RULE_PREFIX-$DEFAULT_PREFIX}"
JUDGE_BASE_URL="${JUDGE_BASE_URL:-https://api.openai.com/v1}"
JUDGE_CONCURRENCY="${JUDGE_CONCURRENCY:-1}"
BENCHMARK=llavabench
GPULIST="${GPULIST:-${CUDA_VISIBLE_DEVICES:-0}}"
IFS=',' read -ra GPUS <<< "$GPULIST"
NUM_CHUNKS="${NUM_CHUNKS:-${#GPUS[@]}}"
PYTHON="${PYTHON:-python}"

for F in "$QUESTIONS" "$REFERENCE" "$CONTEXT" "$RULE"; do
    if [[ ! -f "$F" ]]; then echo "error: $F not found (see eval/README.md)" >&2; exit 1; fi
done

ANSWER_DIR="$DATA_DIR/answers/$CKPT"
REVIEW_DIR="$DATA_DIR/reviews"
mkdir -p "$ANSWER_DIR" "$REVIEW_DIR"

BASE_ARGS=()
if [[ -n "$MODEL_BASE" ]]; then BASE_ARGS=(--model-base "$MODEL_BASE"); fi

source "$(dirname "${BASH_SOURCE[0]}")/generate_chunks.sh"
generate_chunks "$QUESTIONS" "$IMAGE_FOLDER" "$ANSWER_DIR"

# Pairs files by question_id; appends to the review file and skips what is already reviewed.
REVIEW="$REVIEW_DIR/${CKPT}.jsonl"
"$PYTHON" -m drip_llava.eval.llavabench review \
    --questions "$QUESTIONS" \
    --answers "$MERGED" \
    --reference "$REFERENCE" \
    --context "$CONTEXT" \
    --rule "$RULE" --rule-prefix "$RULE_PREFIX" \
    --judge-model "$JUDGE_MODEL" --judge-base-url "$JUDGE_BASE_URL" \
    --concurrency "$JUDGE_CONCURRENCY" \
    --output "$REVIEW"

"$PYTHON" -m drip_llava.eval.llavabench summarize --review "$REVIEW" --out "$REVIEW_DIR/${CKPT}_summary.json"
