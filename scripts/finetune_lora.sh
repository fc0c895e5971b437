#!/usr/bin/env bash
# Stage 2 (visual instruction tuning) with LoRA on the LLM, LLaVA-1.5's LoRA recipe by default:
#   lr 2e-4, lora_r 128, lora_alpha 256, mm_projector_lr 2e-5, ZeRO-3, 1 epoch, template v1, global batch 128,
#   group_by_modality_length, image_aspect_ratio pad, model_max_length 2048, gradient checkpointing.
#
# Every setting is an environment variable (defaults in brackets); extra arguments go to the trainer as-is
# and win over the defaults (e.g. `bash scripts/finetune_lora.sh --max_steps 100 --save_steps 50`).
#   MODEL              base LLM folder (Llama architecture)          [lmsys/vicuna-7b-v1.5]
#   PRETRAIN_ADAPTER   stage-1 output: mm_projector.safetensors, its folder, or LLaVA's .bin; empty = fresh projector
#                                                                     [./checkpoints/drip-llava-pretrain/mm_projector.safetensors]
#   VISION_TOWER       trained DripVisionModel folder (or open_clip:NAME:PRETRAINED)
#                                                                     [the stage-1 folder's vision_tower/, the tower
#                                                                      the projector was aligned to]
#   DATA_PATH          LLaVA JSON                                    [./playground/data/llava_v1_5_mix665k.json]
#   IMAGE_FOLDER       root of the JSON's image paths               [./playground/data]
#   OUTPUT_DIR                                                       [./checkpoints/drip-llava-lora]
#   VERSION            conversation template (v1, llava_v1, chat_template, ...)           [v1]
#   NUM_GPUS           processes on this machine                     [all GPUs; 1 on a CPU-only machine]
#   MASTER_PORT                                                      [29500]
#   BITS               16, 8, or 4 (= QLoRA, bitsandbytes NF4)       [16]
#   DS_CONFIG          DeepSpeed config                              [scripts/zero3.json; zero2.json when BITS<16]
#   PRECISION          bf16 | fp16 | fp32                            [bf16 on GPUs that have it, else fp16; fp32 on CPU]
#   PER_DEVICE_BATCH   micro-batch per process                       [16]
#   GLOBAL_BATCH       kept constant: gradient accumulation = GLOBAL_BATCH / (NUM_GPUS * PER_DEVICE_BATCH)   [128]
#   EPOCHS [1]  MAX_STEPS [-1 = by epochs]  SAVE_TOTAL_LIMIT [1]  LOGGING_STEPS [1]
#   SAVE_STEPS         steps between checkpoints, or a fraction of the run's steps (HF's rule for values < 1)  [0.1]
#                      a checkpoint every 10% of the run: mix665k at global batch 128 is 5,197 steps, one
#                      checkpoint every 520 (LLaVA's 50000 never saves before the end of an epoch)
#   LR [2e-4]  MM_PROJECTOR_LR [2e-5]  LORA_R [128]  LORA_ALPHA [256]  LORA_DROPOUT [0.05]
#   MODEL_MAX_LENGTH [2048]  GRAD_CKPT [True]  NUM_WORKERS [4]  IMAGE_ASPECT_RATIO [pad]
#   PROJECTOR_TYPE     as stage 1 trained it (PRETRAIN_ADAPTER's metadata names it)   [mlp2x_gelu]
#   RESUME             auto (continue from the last OUTPUT_DIR/checkpoint-N if any) | True | PATH | False   [auto]
#   REPORT_TO [none] (wandb, tensorboard: the package must be installed)   PYTHON [python]   DEEPSPEED [deepspeed]
# A tower with random weights (a preset name) is refused unless `--allow_random_vision_tower True` is passed;
# `--unfreeze_mm_vision_tower True` also trains the tower (with DRIP's rate loss).
#
# Output (also in every checkpoint-N, with the optimizer state for resuming): adapter_config.json +
# adapter_model.safetensors + non_lora_trainables.safetensors + config.json + vision_tower/. Load with
# load_pretrained_model(OUTPUT_DIR, model_base=MODEL); merge with scripts/merge_lora.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
DEEPSPEED="${DEEPSPEED:-deepspeed}"

MODEL="${MODEL:-lmsys/vicuna-7b-v1.5}"
PRETRAIN_ADAPTER="${PRETRAIN_ADAPTER-./checkpoints/drip-llava-pretrain/mm_projector.safetensors}"
if [[ -z "${VISION_TOWER:-}" ]]; then
  # stage 1 saves the tower it aligned the projector to next to mm_projector.safetensors
  ADAPTER_DIR="$PRETRAIN_ADAPTER"; [[ -f "$ADAPTER_DIR" ]] && ADAPTER_DIR="$(dirname "$ADAPTER_DIR")"
  if [[ -n "$PRETRAIN_ADAPTER" && -f "$ADAPTER_DIR/vision_tower/config.json" ]]; then
    VISION_TOWER="$ADAPTER_DIR/vision_tower"
  else
    echo "VISION_TOWER is not set and PRETRAIN_ADAPTER (${PRETRAIN_ADAPTER:-empty}) has no vision_tower/ beside it:" \
         "set VISION_TOWER to a trained DripVisionModel folder (e.g. a CLIP run's RUN/vision_tower)" >&2; exit 2
  fi
fi
DATA_PATH="${DATA_PATH:-./playground/data/llava_v1_5_mix665k.json}"
IMAGE_FOLDER="${IMAGE_FOLDER:-./playground/data}"
OUTPUT_DIR="${OUTPUT_DIR:-./checkpoints/drip-llava-lora}"
VERSION="${VERSION:-v1}"
BITS="${BITS:-16}"
PER_DEVICE_BATCH="${PER_DEVICE_BATCH:-16}"
GLOBAL_BATCH="${GLOBAL_BATCH:-128}"
EPOCHS="${EPOCHS:-1}"
MAX_STEPS="${MAX_STEPS:--1}"
SAVE_STEPS="${SAVE_STEPS:-0.1}"
SAVE_TOTAL_LIMIT="${SAVE_TOTAL_LIMIT:-1}"
LOGGING_STEPS="${LOGGING_STEPS:-1}"
LR="${LR:-2e-4}"
MM_PROJECTOR_LR="${MM_PROJECTOR_LR:-2e-5}"
LORA_R="${LORA_R:-128}"
LORA_ALPHA="${LORA_ALPHA:-256}"
LORA_DROPOUT="${LORA_DROPOUT:-0.05}"
MODEL_MAX_LENGTH="${MODEL_MAX_LENGTH:-2048}"
GRAD_CKPT="${GRAD_CKPT:-True}"
NUM_WORKERS="${NUM_WORKERS:-4}"
IMAGE_ASPECT_RATIO="${IMAGE_ASPECT_RATIO:-pad}"
RESUME="${RESUME:-auto}"
REPORT_TO="${REPORT_TO:-none}"
MASTER_PORT="${MASTER_PORT:-29500}"

case "$BITS" in 16|8|4) ;; *) echo "BITS must be 16, 8 or 4 (got $BITS)" >&2; exit 2 ;; esac
if [[ "$BITS" == 16 ]]; then
  DS_CONFIG="${DS_CONFIG:-$ROOT/scripts/zero3.json}"
else
  # bitsandbytes weights are not partitioned by ZeRO-3: QLoRA shards optimizer state and gradients only
  DS_CONFIG="${DS_CONFIG:-$ROOT/scripts/zero2.json}"
fi

# hardware probe, precision flags (DEVICE_ARGS), per-rank CPU threads: shared with the other launcher
source "$ROOT/scripts/launch_env.sh"

PER_STEP=$(( NUM_GPUS * PER_DEVICE_BATCH ))
if (( GLOBAL_BATCH % PER_STEP != 0 )); then
  echo "GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of NUM_GPUS*PER_DEVICE_BATCH=$PER_STEP" >&2; exit 2
fi
GRAD_ACCUM=$(( GLOBAL_BATCH / PER_STEP ))

ADAPTER_ARGS=()
[[ -n "$PRETRAIN_ADAPTER" ]] && ADAPTER_ARGS+=(--pretrain_mm_mlp_adapter "$PRETRAIN_ADAPTER")

echo "finetune_lora: $NUM_GPUS process(es), BITS=$BITS, $PRECISION, $(basename "$DS_CONFIG"), global batch" \
     "$GLOBAL_BATCH = $NUM_GPUS x $PER_DEVICE_BATCH x $GRAD_ACCUM (accumulation) -> $OUTPUT_DIR" >&2

exec "$DEEPSPEED" --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" --module drip_llava.train.train \
    --lora_enable True --lora_r "$LORA_R" --lora_alpha "$LORA_ALPHA" --lora_dropout "$LORA_DROPOUT" \
    --mm_projector_lr "$MM_PROJECTOR_LR" --bits "$BITS" \
    --deepspeed "$DS_CONFIG" \
    --model_name_or_path "$MODEL" \
    --version "$VERSION" \
    --data_path "$DATA_PATH" \
    --image_folder "$IMAGE_FOLDER" \
    --vision_tower "$VISION_TOWER" \
    "${ADAPTER_ARGS[@]}" \
    --mm_projector_type "${PROJECTOR_TYPE:-mlp2x_gelu}" \
    --mm_vision_select_layer -2 \
    --image_aspect_ratio "$IMAGE_ASPECT_RATIO" \
    --group_by_modality_length True \
    "${DEVICE_ARGS[@]}" \
    --output_dir "$OUTPUT_DIR" \
    --num_train_epochs "$EPOCHS" \
    --max_steps "$MAX_STEPS" \
    --per_device_train_batch_size "$PER_DEVICE_BATCH" \
    --gradient_accumulation_steps "$GRAD_ACCUM" \
    --eval_strategy no \
    --save_strategy steps \
    --save_steps "$SAVE_STEPS" \
    --save_total_limit "$SAVE_TOTAL_LIMIT" \
    --learning_rate "$LR" \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type cosine \
    --logging_steps "$LOGGING_STEPS" \
    --model_max_length "$MODEL_MAX_LENGTH" \
    --gradient_checkpointing "$GRAD_CKPT" \
    --dataloader_num_workers "$NUM_WORKERS" \
    --lazy_preprocess True \
    --resume_from_checkpoint "$RESUME" \
    --report_to "$REPORT_TO" \
    "$@"
