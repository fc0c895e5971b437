#!/usr/bin/env bash
# Stage 1 (feature alignment) with LLaVA-1.5's settings: ZeRO-2, global batch 256, lr 1e-3, 1 epoch, warmup 3%,
# cosine, weight decay 0, template plain, LLM and tower frozen (the defaults live in scripts/pretrain_projector.py).
#
# Environment variables (defaults in brackets); extra arguments go to the trainer and win:
#   MODEL [lmsys/vicuna-7b-v1.5]   VISION_TOWER [drip-l-14-4x]
#   DATA_PATH [./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json]
#   IMAGE_FOLDER [./playground/data/LLaVA-Pretrain/images]   OUTPUT_DIR [./checkpoints/drip-llava-pretrain]
#   NUM_GPUS [all GPUs; 1 on CPU]  MASTER_PORT [29500]  DS_CONFIG [scripts/zero2.json]
#   PRECISION [bf16 on GPUs that have it, else fp16; fp32 on CPU]
#   PER_DEVICE_BATCH [32]  GLOBAL_BATCH [256] (gradient accumulation fills the rest)
#   NUM_WORKERS [4]  PYTHON [python]  DEEPSPEED [deepspeed]
# Output: OUTPUT_DIR/mm_projector.safetensors (+ config.json, vision_tower/) -> PRETRAIN_ADAPTER of finetune_lora.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
DEEPSPEED="${DEEPSPEED:-deepspeed}"
MODEL="${MODEL:-lmsys/vicuna-7b-v1.5}"
VISION_TOWER="${VISION_TOWER:-drip-l-14-4x}"
DATA_PATH="${DATA_PATH:-./playground/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json}"
IMAGE_FOLDER="${IMAGE_FOLDER:-./playground/data/LLaVA-Pretrain/images}"
OUTPUT_DIR="${OUTPUT_DIR:-./checkpoints/drip-llava-pretrain}"
DS_CONFIG="${DS_CONFIG:-$ROOT/scripts/zero2.json}"
PER_DEVICE_BATCH="${PER_DEVICE_BATCH:-32}"
GLOBAL_BATCH="${GLOBAL_BATCH:-256}"
NUM_WORKERS="${NUM_WORKERS:-4}"
MASTER_PORT="${MASTER_PORT:-29500}"

read -r GPUS BF16_OK < <("$PYTHON" -c "import torch; c = torch.cuda.is_available(); \
print(torch.cuda.device_count() if c else 0, int(c and torch.cuda.is_bf16_supported()))")
NUM_GPUS="${NUM_GPUS:-$(( GPUS > 0 ? GPUS : 1 ))}"
DEVICE_ARGS=()
if [[ "$GPUS" == 0 ]]; then
  PRECISION="${PRECISION:-fp32}"
  [[ "$PRECISION" == fp16 ]] && { echo "PRECISION=fp16 needs a GPU; use bf16 or fp32" >&2; exit 2; }
  DEVICE_ARGS+=(--use_cpu True)
  export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
else
  PRECISION="${PRECISION:-$([[ "$BF16_OK" == 1 ]] && echo bf16 || echo fp16)}"
fi
case "$PRECISION" in
  bf16) DEVICE_ARGS+=(--bf16 True --fp16 False) ;;
  fp16) DEVICE_ARGS+=(--fp16 True --bf16 False) ;;
  fp32) DEVICE_ARGS+=(--bf16 False --fp16 False) ;;
  *) echo "PRECISION must be bf16, fp16 or fp32 (got $PRECISION)" >&2; exit 2 ;;
esac
# each rank gets its share of the cores (as torchrun does): OpenMP threads of several ranks otherwise spin
# against each other (10x slower steps measured on a 2-core machine)
CORES="$(nproc)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( CORES / NUM_GPUS > 0 ? CORES / NUM_GPUS : 1 ))}"

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
