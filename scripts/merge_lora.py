"""Merge a stage-2 LoRA folder (or any checkpoint-N of it) into a full model folder.

    python scripts/merge_lora.py --model-path checkpoints/drip-llava-lora --model-base LLM_DIR \
        --save-model-path checkpoints/drip-llava-merged

The result (config.json + model.safetensors + tokenizer) loads with `load_pretrained_model(SAVE_PATH)` alone.
Loads through drip_llava's load_pretrained_model, which decides from the files (not the folder name) and merges.
"""
import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True, help="LoRA output folder (adapter_config.json, ...)")
    p.add_argument("--model-base", default=None, help="base LLM folder (default: the adapter's recorded base)")
    p.add_argument("--save-model-path", required=True, help="output folder for the merged model")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype of the merged model (auto: fp32 on CPU, bf16/fp16 on GPU)")
    return p.parse_args(argv)


def main(argv=None) -> str:
    import torch

    from drip_llava.model import load_pretrained_model

    args = parse_args(argv)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    loaded = load_pretrained_model(args.model_path, model_base=args.model_base, torch_dtype=dtype)
    if loaded.kind != "lora":
        print(f"note: {args.model_path} is a {loaded.kind!r} checkpoint, not LoRA; saving it as a full model",
              file=sys.stderr)
    model = loaded.model
    if hasattr(model, "merge_and_unload"):  # the loader leaves adapters unmerged only on quantized bases
        raise ValueError("the model was loaded with unmerged adapters (quantized base?); merge needs full weights")
    model.config.use_cache = True
    model.save_pretrained(args.save_model_path)
    loaded.tokenizer.save_pretrained(args.save_model_path)
    print(f"merged {args.model_path} (+ {args.model_base or 'recorded base'}) -> {args.save_model_path}",
          file=sys.stderr)
    return args.save_model_path


if __name__ == "__main__":
    main()
