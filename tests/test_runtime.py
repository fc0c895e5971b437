"""The one precision / CPU-threads policy (drip_llava.runtime), as the trainer, pretrain_projector.py and the
shell launchers (scripts/launch_env.sh) see it. This machine has no GPU: the CPU branch is the one tested."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from drip_llava import runtime

ROOT = Path(__file__).resolve().parents[1]


def test_trainer_device_args_on_cpu_user_flags_win():
    assert runtime.trainer_device_args(["--x", "1"]) == ["--use_cpu", "True", "--bf16", "False", "--fp16", "False",
                                                         "--x", "1"]
    assert runtime.trainer_device_args(["--bf16", "True"]) == ["--use_cpu", "True", "--bf16", "True"]
    assert runtime.trainer_device_args(["--use_cpu=True", "--fp16=False"]) == ["--use_cpu=True", "--fp16=False"]
    assert runtime.trainer_device_args([], precision="bf16")[2:] == ["--bf16", "True", "--fp16", "False"]


def test_precision_refuses_fp16_on_cpu_and_unknown_names():
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        runtime.precision_flags("fp16")
    with pytest.raises(ValueError, match="must be one of"):
        runtime.precision_flags("fp8")


def test_split_cpu_threads_gives_each_rank_its_share(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(runtime, "available_cores", lambda: 8)
    monkeypatch.setitem(sys.modules, "torch", type("T", (), {"set_num_threads": staticmethod(lambda n: None)}))
    runtime.split_cpu_threads()
    assert os.environ["OMP_NUM_THREADS"] == "4"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # an explicit setting wins
    runtime.split_cpu_threads()
    assert os.environ["OMP_NUM_THREADS"] == "3"


def _source_launch_env(**env) -> subprocess.CompletedProcess:
    script = 'source scripts/launch_env.sh; echo "$GPUS|$NUM_GPUS|$PRECISION|$OMP_NUM_THREADS|${DEVICE_ARGS[*]}"'
    base = {k: v for k, v in os.environ.items() if k not in ("NUM_GPUS", "PRECISION", "OMP_NUM_THREADS")}
    return subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**base, "PYTHON": sys.executable, **env})


def test_launch_env_sh_uses_the_python_policy():
    out = _source_launch_env(NUM_GPUS="2", PRECISION="bf16", OMP_NUM_THREADS="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0|2|bf16|1|--use_cpu True --bf16 True --fp16 False"
    bad = _source_launch_env(PRECISION="fp16")
    assert bad.returncode == 2 and "fp16 needs a GPU" in bad.stderr


def test_launcher_entry_points_release_deepspeeds_shm_segment(monkeypatch, tmp_path):
    """DeepSpeed's CPU allreduce leaves /dev/shm/deepspeed_allreduce_buffer_* (RAM) behind after every run;
    exit_after_main unlinks the rank's own segment, after success and after a failure alike."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    from drip_llava.distributed import deepspeed_shm_buffer, exit_after_main

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", f"test{os.getpid()}")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    seg = deepspeed_shm_buffer()
    assert seg.name.endswith(f"_{os.getuid()}_127.0.0.1_test{os.getpid()}_1")
    seg.write_bytes(b"x")
    exit_after_main(lambda: None)
    assert not seg.exists()

    def crash():
        seg.write_bytes(b"x")
        raise RuntimeError("rank failed")

    with pytest.raises(RuntimeError, match="rank failed"):
        exit_after_main(crash)
    assert not seg.exists()


def test_orphan_deepspeed_segments_are_those_of_finished_runs(tmp_path):
    """A rank the launcher SIGKILLed never reaches exit_after_main: its segment is freed once no process maps it
    and its run's rendezvous port is free."""
    from drip_llava.distributed import free_port, orphan_deepspeed_shm, release_orphan_deepspeed_shm

    port = free_port()
    held, left = (tmp_path / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{r}" for r in (0, 1))
    listening = socket.socket()  # a live run's rendezvous
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    live = tmp_path / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{listening.getsockname()[1]}_0"
    for p in (held, left, live, tmp_path / "another_segment"):
        p.write_bytes(b"\0" * 4096)
    code = ("import mmap, sys, time; f = open(sys.argv[1], 'r+b'); m = mmap.mmap(f.fileno(), 4096); "
            "print('mapped', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(held)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "mapped"
        assert orphan_deepspeed_shm(tmp_path) == [left]
    finally:
        proc.kill()
        proc.wait()
    assert release_orphan_deepspeed_shm(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["another_segment", live.name])
    listening.close()
    assert orphan_deepspeed_shm(tmp_path) == [live]
