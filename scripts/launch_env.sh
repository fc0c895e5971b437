# Sourced by scripts/pretrain_projector.sh and scripts/finetune_lora.sh: one probe of the hardware, the
# precision flags for the trainer, and each rank's share of the CPU cores (drip_llava.runtime decides).
#   in:  PYTHON, and optionally NUM_GPUS, PRECISION, OMP_NUM_THREADS
#   out: GPUS, NUM_GPUS, PRECISION, DEVICE_ARGS (array), OMP_NUM_THREADS (exported), DS_ACCELERATOR on CPU
# The policy itself is Python (drip_llava.runtime, also used by the trainer and pretrain_projector.py).
LAUNCH="$("$PYTHON" -m drip_llava.runtime launch-env)" || exit 2
read -r GPUS NUM_GPUS PRECISION OMP_NUM_THREADS DEVICE_ARGS_LINE <<<"$LAUNCH"
read -r -a DEVICE_ARGS <<<"$DEVICE_ARGS_LINE"
export OMP_NUM_THREADS
[[ "$GPUS" == 0 ]] && export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
