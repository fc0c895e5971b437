"""`make demo QUICK=1` end to end: every stage runs through the real commands and shows learning (loose bounds)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_demo_runs_and_learns(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, env=env, timeout=1800, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    r = json.loads((out / "results.json").read_text())
    report = (out / "REPORT.md").read_text()
    assert "gradio_app" in report and (out / "report" / "training_curves.png").exists()

    clip = r["clip"]
    chance = 100 / 40
    for name in ("vit-tiny-16", "drip-tiny-16-4x", "drip-tiny-16-10x"):
        assert clip[name]["zeroshot_top1"] is not None
        first, last = clip[name]["steps"][0]["loss"], clip[name]["steps"][-1]["loss"]
        assert last < first, (name, first, last)  # CLIP learns
    assert 100 * clip["drip-tiny-16-4x"]["zeroshot_top1"] >= 1.5 * chance
    # achieved boundary rates near the targets (train, Gumbel) and fewer eval tokens for DRIP than ViT
    for name, target in (("drip-tiny-16-4x", 0.25), ("drip-tiny-16-10x", 0.1)):
        assert abs(clip[name]["train_boundary_rate"] - target) <= 0.3 * target, (name, clip[name])
    assert clip["drip-tiny-16-10x"]["eval_tokens_per_img"] < clip["drip-tiny-16-4x"]["eval_tokens_per_img"] < 64

    s1, s2 = r["stage1"]["losses"], r["stage2"]["losses"]
    assert s1[-1][1] < s1[0][1] and s2[-1][1] < s2[0][1]
    sqa = r["scienceqa"]
    assert sqa["image"]["acc"] > sqa["image"]["chance"]
    assert sqa["image"]["img_acc"] >= sqa["blank"]["img_acc"]
    prefill = r["prefill"]
    assert prefill[0]["visual_tokens_mean"] == 64 and prefill[1]["visual_tokens_mean"] < 64
