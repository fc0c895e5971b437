"""Stage 1 (feature alignment): train only the projector between a frozen DRIP tower and a frozen LLM.

    deepspeed scripts/pretrain_projector.py \
        --model_name_or_path LLM_DIR --vision_tower DRIP_DIR \
        --data_path blip_laion_cc_sbu_558k.json --image_folder IMAGES \
        --deepspeed scripts/zero2.json --output_dir OUT --per_device_train_batch_size 32

LLaVA-1.5's stage-1 settings are the defaults here (any flag given on the command line wins): template plain,
--tune_mm_mlp_adapter, lr 1e-3, weight decay 0, warmup 3%, cosine, 1 epoch, model_max_length 2048, projector
mlp2x_gelu from block -2, lazy tokenization, gradient checkpointing, 4 loader workers, and the trainer's
precision policy (drip_llava.runtime: bf16 where the GPU has it, fp32 on CPU with use_cpu), a checkpoint every
10% of the run (LLaVA's save_steps 24000 is past the end of its 2,180-step epoch). Output:
OUT/mm_projector.safetensors + OUT/config.json + OUT/vision_tower/, which load with
`load_pretrained_model(OUT, model_base=LLM_DIR)` and feed stage 2 via --pretrain_mm_mlp_adapter.
Also `python scripts/pretrain_projector.py ...` (one process, no DeepSpeed). All flags: --help.
"""
import sys

STAGE1_DEFAULTS = [
    "--version", "plain",
    "--tune_mm_mlp_adapter", "True",
    "--mm_projector_type", "mlp2x_gelu",
    "--mm_vision_select_layer", "-2",
    "--learning_rate", "1e-3",
    "--weight_decay", "0.",
    "--warmup_ratio", "0.03",
    "--lr_scheduler_type", "cosine",
    "--num_train_epochs", "1",
    "--model_max_length", "2048",
    "--lazy_preprocess", "True",
    "--gradient_checkpointing", "True",
    "--dataloader_num_workers", "4",
    "--save_strategy", "steps",
    "--save_steps", "0.1",  # a checkpoint every 10% of the run (LLaVA's 24000 never saves during 558K)
    "--save_total_limit", "1",
    "--logging_steps", "1",
    "--report_to", "none",
]


def main(argv=None):
    from drip_llava.runtime import split_cpu_threads

    split_cpu_threads()  # before torch loads OpenMP
    from drip_llava.train.train import main as train_main

    # precision and --use_cpu: the trainer's policy (drip_llava.runtime), flags given here win
    return train_main(STAGE1_DEFAULTS + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    from drip_llava.distributed import exit_after_main

    exit_after_main(main)
