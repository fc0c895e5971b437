"""The one precision and CPU-threads policy of the LLaVA trainer, for every way it is launched: the trainer itself
(drip_llava.train.train), scripts/pretrain_projector.py and, through `python -m drip_llava.runtime launch-env`,
scripts/launch_env.sh (which the shell launchers source).

Precision: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU (DeepSpeed refuses fp16 there); flags the
user gives win. Without CUDA the HF Trainer also needs `--use_cpu True` (with DeepSpeed it otherwise asserts on
the batch size over ranks and refuses bf16).
Threads: several ranks on one machine each get their share of the cores, as torchrun does: OpenMP threads of
ranks that all use every core spin against each other (10x slower steps measured on a 2-core machine). An
explicit OMP_NUM_THREADS wins. torch is imported lazily, so `split_cpu_threads()` can run before torch loads
OpenMP.
"""
from __future__ import annotations

import os
import sys

PRECISIONS = ("bf16", "fp16", "fp32")
_FLAGS = {"bf16": ["--bf16", "True", "--fp16", "False"], "fp16": ["--fp16", "True", "--bf16", "False"],
          "fp32": ["--bf16", "False", "--fp16", "False"]}


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_precision() -> str:
    """bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU."""
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def precision_flags(precision: str | None = None) -> list[str]:
    """The trainer's --bf16/--fp16 flags for `precision` (default: default_precision()); both always given, so
    they are explicit to every later step."""
    precision = precision or default_precision()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    if precision == "fp16" and gpu_count() == 0:
        raise ValueError("fp16 needs a GPU (DeepSpeed refuses fp16 on CPU); use bf16 or fp32")
    return list(_FLAGS[precision])


def trainer_device_args(argv: list[str], precision: str | None = None) -> list[str]:
    """`argv` with the device flags the policy adds in front (flags in `argv` win): `--use_cpu True` without CUDA,
    and `precision`'s flags (default: default_precision()) unless argv sets --bf16 or --fp16."""
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    extra = []
    if gpu_count() == 0 and "--use_cpu" not in given:
        extra += ["--use_cpu", "True"]
    if not given & {"--bf16", "--fp16"}:
        extra += precision_flags(precision)
    return extra + list(argv)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, like nproc)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def threads_per_rank(local_ranks: int) -> int:
    return max(1, available_cores() // max(1, local_ranks))


def split_cpu_threads() -> None:
    """Under a launcher with several ranks on this machine (LOCAL_WORLD_SIZE / LOCAL_SIZE), give this rank its
    share of the cores unless OMP_NUM_THREADS is set: through the environment before torch loads OpenMP, and
    through torch.set_num_threads when torch is already loaded."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    if local <= 1 or "OMP_NUM_THREADS" in os.environ:
        return
    n = threads_per_rank(local)
    os.environ["OMP_NUM_THREADS"] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def launch_env(num_gpus: int | None = None, precision: str | None = None,
               omp_threads: int | None = None) -> dict:
    """What scripts/launch_env.sh sets: GPUs found, ranks to launch (NUM_GPUS; 1 on CPU by default), precision,
    the trainer's device flags and each rank's OMP_NUM_THREADS."""
    gpus = gpu_count()
    ranks = num_gpus or max(gpus, 1)
    precision = precision or default_precision()
    flags = precision_flags(precision)
    if gpus == 0:
        flags = ["--use_cpu", "True"] + flags
    return {"gpus": gpus, "num_gpus": ranks, "precision": precision, "device_args": flags,
            "omp_threads": omp_threads or threads_per_rank(ranks)}


def main(argv: list[str] | None = None) -> int:
    """`launch-env`: one line `GPUS NUM_GPUS PRECISION OMP_NUM_THREADS DEVICE_ARGS...` from the environment's
    NUM_GPUS, PRECISION and OMP_NUM_THREADS (each optional), for scripts/launch_env.sh."""
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["launch-env"]:
        print("usage: python -m drip_llava.runtime launch-env", file=sys.stderr)
        return 2
    env = os.environ
    try:
        got = launch_env(int(env["NUM_GPUS"]) if env.get("NUM_GPUS") else None, env.get("PRECISION") or None,
                         int(env["OMP_NUM_THREADS"]) if env.get("OMP_NUM_THREADS") else None)
    except ValueError as e:
        print(f"PRECISION: {e}", file=sys.stderr)
        return 2
    print(got["gpus"], got["num_gpus"], got["precision"], got["omp_threads"], *got["device_args"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
