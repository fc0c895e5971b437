# Sourced by scripts/pretrain_projector.sh and scripts/finetune_lora.sh: one probe of the hardware, the
# precision flags for the trainer, and each rank's share of the CPU cores.
#   in:  PYTHON, and optionally NUM_GPUS, PRECISION, OMP_NUM_THREADS
#   out: GPUS, NUM_GPUS, PRECISION, DEVICE_ARGS (array), OMP_NUM_THREADS (exported), DS_ACCELERATOR on CPU
read -r GPUS BF16_OK < <("$PYTHON" -c "import torch; c = torch.cuda.is_available(); \
print(torch.cuda.device_count() if c else 0, int(c and torch.cuda.is_bf16_supported()))")
NUM_GPUS="${NUM_GPUS:-$(( GPUS > 0 ? GPUS : 1 ))}"

DEVICE_ARGS=()
if [[ "$GPUS" == 0 ]]; then
  PRECISION="${PRECISION:-fp32}"
  [[ "$PRECISION" == fp16 ]] && { echo "PRECISION=fp16 needs a GPU (DeepSpeed refuses fp16 on CPU); use bf16 or fp32" >&2; exit 2; }
  DEVICE_ARGS+=(--use_cpu True)  # HF Trainer + DeepSpeed on CPU need it (gloo backend)
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
