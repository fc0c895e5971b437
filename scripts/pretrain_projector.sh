#!/usr/bin/env bash
# Stage 1 (feature alignment) with LLaVA-1.5's settings: ZeRO-2, global batch 256, lr 1e-3, 1 epoch, warmup 3%,
# cosine, weight decay 0, template plain, LLM and tower frozen (the defaults live in scripts/pretrain_projector.py).
#
# Environment variables (defaults in brackets); extra arguments go to the trainer and win:
#   MODEL [lmsys/vicuna-7b-v1.5]
#   VISION_TOWER (required) a trained DripVisionModel folder (e.g. a CLIP run's RUN/vision_tower) or
#                open_clip:NAME:PRETRAINED; a preset name (random weights) also needs --allow_random_vision_tower True
#   DATA_PATH [./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json]
#   IMAGE_FOLDER [./playground/data/LLaVA-Pretrain/images]   OUTPUT_DIR [./checkpoints/drip-llava-pretrain]
#   NUM_GPUS [all GPUs; 1 on CPU]  MASTER_PORT [29500]  DS_CONFIG [scripts/zero2.json]
#   PRECISION [bf16 on GPUs that have it, else fp16; fp32 on CPU]
#   PER_DEVICE_BATCH [32]  GLOBAL_BATCH [256] (gradient accumulation fills the rest)
#   NUM_WORKERS [4]  PYTHON [python]  DEEPSPEED [deepspeed]
#   checkpoints: every 10% of the run (pretrain_projector.py's --save_steps 0.1; 558K at 256 = 2,180 steps)
# Output: OUTPUT_DIR/mm_projector.safetensors (+ config.json, vision_tower/) -> PRETRAIN_ADAPTER of finetune_lora.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
DEEPSPEED="${DEEPSPEED:-deepspeed}"
MODEL="${MODEL:-lmsys/vicuna-7b-v1.5}"
VISION_TOWER="${VISION_TOWER:-}"
if [[ -z "$VISION_TOWER" ]]; then
  echo "VISION_TOWER is required: a trained DripVisionModel folder (e.g. a CLIP run's RUN/vision_tower) or" \
       "open_clip:NAME:PRETRAINED" >&2; exit 2
fi
DATA_PATH="${DATA_PATH:-./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json}"
IMAGE_FOLDER="${IMAGE_FOLDER:-./playground/data/LLaVA-Pretrain/images}"
OUTPUT_DIR="${OUTPUT_DIR:-./checkpoints/drip-llava-pretrain}"
DS_CONFIG="${DS_CONFIG:-$ROOT/scripts/zero2.json}"
PER_DEVICE_BATCH="${PER_DEVICE_BATCH:-32}"
GLOBAL_BATCH="${GLOBAL_BATCH:-256}"
NUM_WORKERS="${NUM_WORKERS:-4}"
MASTER_PORT="${MASTER_PORT:-29500}"

# hardware probe, precision flags (DEVICE_ARGS), per-rank CPU threads: shared with the other launcher
source "$ROOT/scripts/launch_env.sh"

PER_STEP=$(( NUM_GPUS * PER_DEVICE_BATCH ))
if (( GLOBAL_BATCH % PER_STEP != 0 )); then
  echo "GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of NUM_GPUS*PER_DEVICE_BATCH=$PER_STEP" >&2; exit 2
fi

exec "$DEEPSPEED" --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" "$ROOT/scripts/pretrain_projector.py" \
    --deepspeed "$DS_CONFIG" \
    --model_name_or_path "$MODEL" \
    --vision_tower "$VISION_TOWER" \
    --data_path "$DATA_PATH" \
    --image_folder "$IMAGE_FOLDER" \
    --output_dir "$OUTPUT_DIR" \
    --per_device_train_batch_size "$PER_DEVICE_BATCH" \
    --gradient_accumulation_steps "$(( GLOBAL_BATCH / PER_STEP ))" \
    --dataloader_num_workers "$NUM_WORKERS" \
    "${DEVICE_ARGS[@]}" \
    "$@"
