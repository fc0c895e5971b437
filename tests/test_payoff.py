"""drip_llava.eval.payoff (the tower sweep: tokens, MACs, TTFT, training throughput) on a tiny LLM, and the
vision MAC count at the block the LLM reads against torch's FlopCounterMode."""
import json
from pathlib import Path

import pytest
import torch

from drip_llava.eval import efficiency, payoff

IMAGES = "chelsea,coffee"


def _job(llm_dir, tower, recipe, **kw):
    return {"llm": str(llm_dir), "llm_shape": None, "llm_layers": None, "tokenizer": str(llm_dir), "overrides": {},
            "images": payoff.image_files(IMAGES, None), "calibrate": True, "select_layer": -2,
            "question": "Describe the image.", "conv_mode": "vicuna_v1", "device": "cpu", "threads": 2, "batch": 1,
            "steps": 2, "tower": tower, "recipe": recipe, **kw}


@pytest.mark.parametrize("preset", ["vit-tiny-16", "drip-tiny-16-4x"])
def test_vision_macs_at_the_selected_block_equal_flop_counter(preset):
    """The tower stops at the block the LLM reads (select layer -2: the last block never runs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from drip_llava.model.vision_tower import DripVisionTower
    from drip_llava.vision import DripVisionModel
    from drip_llava.vision.images import example_image

    torch.manual_seed(0)
    drip = DripVisionModel.from_preset(preset, eval_boundaries="threshold").eval()
    tower = DripVisionTower(drip, select_layer=-2)
    pixels = drip.preprocess(example_image("coffee"))[None]
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, mask = tower(pixels)
    n = int(mask.sum())
    counted = counter.get_total_flops() / 2
    assert efficiency.vision_macs(drip.config, n, tower.layer_index) == pytest.approx(counted, rel=0.01)
    assert efficiency.vision_macs(drip.config, n) > counted * 1.02  # every block: not what runs


def test_training_stages_change_only_their_trainables(tiny_llm_dir):
    """Stage 1 (the stage1 recipe) moves the projector only; stage 2 (the lora recipe) LoRA weights and the
    projector only; the decoder-layer time (module hooks, forward + backward) is part of the step time."""
    s1 = payoff.train_throughput(_job(tiny_llm_dir, "drip-tiny-16-4x", "stage1", report_changed=True))
    proj = {f"mm_projector.{k}" for k in ("0.weight", "0.bias", "2.weight", "2.bias")}
    assert set(s1["changed"]) == proj
    s2 = payoff.train_throughput(_job(tiny_llm_dir, "drip-tiny-16-4x", "lora", report_changed=True))
    changed = set(s2["changed"])
    assert {f"base_model.model.{p}" for p in proj} <= changed
    assert any("lora_B" in n for n in changed) and all("lora_" in n or "mm_projector" in n for n in changed)
    for r in (s1, s2):
        assert r["steps"] == 2 and len(r["visual_tokens_per_step"]) == 3 and r["peak_memory_gb"] > 0
        if Path("/proc/self/clear_refs").exists():  # Linux: the steps' own peak, not model building's
            assert "VmHWM reset" in r["peak_memory_how"]
        assert 0 < r["layers_s_mean"] < r["step_s_mean"] and r["samples_per_s"] > 0
        # tokens per step = text + visual tokens of the timed steps' samples (chelsea, coffee)
        assert r["tokens_per_step"] > sum(r["visual_tokens_per_step"][1:]) / 2


def test_sweep_tokens_ratios_training_and_png(tiny_llm_dir, tmp_path, capsys):
    out, png = tmp_path / "payoff.json", tmp_path / "payoff.png"
    report = payoff.main(["--llm", str(tiny_llm_dir), "--towers", "vit-tiny-16,drip-tiny-16-10x", "--images",
                          IMAGES, "--repeats", "1", "--stages", "2", "--train-steps", "1", "--threads", "2",
                          "--json", str(out), "--png", str(png)])
    vit, drip = report["towers"]
    # the sweep's counts are the towers' own: the same seeded, calibrated tower run on the processor's pixels
    from drip_llava.data.image_processor import DripLlavaImageProcessor

    files = payoff.image_files(IMAGES, None)
    for row in (vit, drip):
        model = payoff.build_llm(str(tiny_llm_dir), None, None, 0, torch.device("cpu"), torch.float32)
        payoff.attach_tower(model, row["spec"], {}, payoff.load_pils(files), True)
        proc = DripLlavaImageProcessor.from_vision_config(model.vision_tower.config)
        with torch.no_grad():
            _, mask = model.vision_tower(torch.stack([proc(path) for _, path in files]))
        real = mask.sum(1).tolist()
        assert [x["visual_tokens"] for x in row["per_image"]] == real
        assert row["train"]["2"]["visual_tokens_per_step"] == [real[0], real[1]]  # warm-up, then the timed step
    assert vit["visual_tokens_min"] == vit["visual_tokens_max"] == 64 and drip["visual_tokens_max"] < 16
    assert vit["speedup"]["prefill_macs"] == 1 and drip["speedup"]["prefill_macs"] > 1.3
    s = drip["speedup"]
    assert s["ttft_over_prefill_macs"] == pytest.approx(s["ttft"] / s["prefill_macs"])
    assert set(vit["train"]) == {"2"} and "1" not in drip["train"]
    assert png.stat().st_size > 10_000 and json.loads(out.read_text())["towers"][1]["name"] == "drip-tiny-16-10x"
    table = capsys.readouterr().out
    assert "TTFT / prefill-MAC speed-up (goal >= 0.8)" in table and "stage 2: LLM tokens/s" in table
    assert "EXTRAPOLATED" not in table


def test_extrapolation_by_layer_count(monkeypatch, embedded_tokenizer_dir):
    """A shaped random LLM (a tiny stand-in shape here) looks up every tokenizer id; extrapolated figures scale
    the decoder-layer time by layers_to / layers and count MACs at layers_to."""
    monkeypatch.setitem(payoff.LLM_SHAPES, "tiny", dict(hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                                       vocab_size=100, tie_word_embeddings=False))
    model = payoff.build_llm(None, "tiny", 3, 49152, torch.device("cpu"), torch.float32)
    assert model.model.embed_tokens.num_embeddings == 49152 and model.lm_head.out_features == 100
    assert model.config.num_hidden_layers == 3 and model.config.vocab_size == 100
    rows = []
    for ttft, layers, prompt in ((100.0, 30.0, 80), (60.0, 12.0, 40)):
        per = [{"ttft_ms": ttft, "prefill_ms": ttft / 2, "layers_ms": layers, "prompt_tokens": prompt}]
        rows.append({"per_image": per, "ttft_ms_median": ttft, "prefill_ms_median": ttft / 2,
                     "vision_gmacs_mean": 0.1, "prefill_gmacs_mean": efficiency.llm_prefill_macs(model.config, prompt)
                     / 1e9, "train": {"1": {"batch": 1, "step_s_mean": 2.0, "layers_s_mean": 1.0, "samples_per_s": 0.5,
                                            "tokens_per_step": prompt}}})
    payoff.add_derived(rows, model.config, 30)
    x = rows[0]["extrapolated"]
    assert x["ttft_ms_median"] == pytest.approx(100 + 9 * 30) and x["prefill_ms_median"] == pytest.approx(50 + 9 * 30)
    assert x["train"]["1"]["step_s_mean"] == pytest.approx(2 + 9 * 1)
    big = model.config.__class__(**{**model.config.to_dict(), "num_hidden_layers": 30})
    assert x["prefill_gmacs_mean"] == pytest.approx(efficiency.llm_prefill_macs(big, 80) / 1e9)
    assert rows[1]["extrapolated"]["speedup"]["ttft"] == pytest.approx(370 / (60 + 9 * 12))
