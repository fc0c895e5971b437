"""FLOPs (analytic vs FlopCounterMode), the benchmark CLI, the segment pictures and the example images."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from drip_llava.vision import DripVisionModel, bench, flops, get_preset_config, images, list_presets, visualize
from drip_llava.vision import config as vcfg
from drip_llava.vision.calibrate import calibrate_boundary_bias

TINY = [p for p in list_presets() if "tiny" in p]
RULES = getattr(vcfg, "EVAL_BOUNDARIES", ("threshold",))  # eval boundary rules the encoder offers


def _model(name, **kw):
    torch.manual_seed(0)
    return DripVisionModel.from_preset(name, **kw).eval()


def test_vit_b_reference_numbers():
    vit32 = flops.analytic_macs(get_preset_config("vit-b-32")) / 1e9
    vit16 = flops.analytic_macs(get_preset_config("vit-b-16")) / 1e9
    drip16 = flops.analytic_macs(get_preset_config("drip-b-16-10x")) / 1e9
    assert vit32 == pytest.approx(4.41, abs=0.01)
    assert vit16 == pytest.approx(17.56, abs=0.01)
    assert 3.3 < vit16 / drip16 < 3.8
    # the ViT has no predictor / pooling terms, and more tokens cost more
    cfg = get_preset_config("drip-b-16-4x")
    assert flops.analytic_macs(cfg, 10) < flops.analytic_macs(cfg, 49) < flops.analytic_macs(cfg, 196)
    with pytest.raises(ValueError):
        flops.analytic_macs(get_preset_config("vit-b-16"), 20)


@pytest.mark.parametrize("name", TINY)
def test_analytic_matches_counted_tiny(name):
    model = _model(name)
    L = model.config.num_patches
    for S in ([None] if not model.config.is_drip else [None, 1, 13, L]):
        a = flops.analytic_macs(model.config, S)
        m = flops.counted_macs(model, tokens_short=S)
        assert abs(a - m) / m < 0.01, (name, S, a, m)


def test_analytic_matches_counted_mlp_ratio_and_mean_pool():
    """The formula is generic in mlp_ratio / predictor_ratio / no class token, not hard-wired to 4."""
    model = _model("drip-tiny-16-4x", mlp_ratio=2.0, predictor_ratio=1.0, pool="mean", class_token=False)
    for S in (3, 20):
        a, m = flops.analytic_macs(model.config, S), flops.counted_macs(model, tokens_short=S)
        assert abs(a - m) / m < 0.01


@pytest.mark.parametrize("name", ["vit-b-32", "drip-b-32-4x"])
def test_analytic_matches_counted_b32(name):
    model = _model(name)
    for S in ([None] if name.startswith("vit") else [None, 5, 30]):
        a, m = flops.analytic_macs(model.config, S), flops.counted_macs(model, tokens_short=S)
        assert abs(a - m) / m < 0.01, (name, S, a, m)


def test_counted_uses_real_predictor():
    """Forcing boundaries keeps the predictor MLP in the count: dropping it would change the total."""
    model = _model("drip-tiny-16-4x")
    m = flops.counted_macs(model, tokens_short=16)
    pred = flops.macs_breakdown(model.config, 16)["predictor"]
    assert pred > 0.01 * m
    x = torch.zeros(1, 3, 128, 128)
    # a predictor-free path (artificial boundaries passed to forward) costs exactly the predictor less
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(x, boundaries=flops.even_boundaries(64, 16))
    assert m - fc.get_total_flops() / 2 == pytest.approx(pred)


def test_even_boundaries():
    b = flops.even_boundaries(49, 5, batch=2)
    assert b.shape == (2, 49) and b[:, -1].eq(1).all() and b.sum(1).eq(5).all()
    with pytest.raises(ValueError):
        flops.even_boundaries(4, 5)


def test_flops_main_json(capsys):
    rows = flops.main(["--preset", "drip-tiny-16-10x", "--json"])
    d = json.loads(capsys.readouterr().out)
    for k in ("preset", "image_size", "gmacs_analytic", "gmacs_counted", "tokens_pre", "tokens_short",
              "compression", "params_m"):
        assert k in d
    assert d["preset"] == "drip-tiny-16-10x" and d["tokens_pre"] == 64 and d["tokens_short"] == 6
    assert d["gmacs_counted"] == pytest.approx(d["gmacs_analytic"], rel=0.01)
    assert rows[0]["tokens_short"] == 6


def test_flops_main_images_and_image_size(capsys):
    flops.main(["--preset", "drip-tiny-16-4x", "--image-size", "96", "--images", "example:astronaut",
                "example:coffee", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert d["image_size"] == 96 and d["tokens_pre"] == 36 and d["source"] == "images"
    assert 1 <= d["tokens_short"] <= 36
    assert d["gmacs_counted"] == pytest.approx(d["gmacs_analytic"], rel=0.01)


def test_flops_plot(tmp_path):
    out = tmp_path / "gmacs.png"
    flops.main(["--plot", str(out)])
    with Image.open(out) as im:
        assert im.width > 300 and im.height > 200


@pytest.mark.parametrize("rule", RULES)
def test_calibrate_hits_target(rule):
    model = _model("drip-tiny-16-4x", **({"eval_boundaries": rule} if hasattr(vcfg, "EVAL_BOUNDARIES") else {}))
    x = torch.randn(6, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    calibrate_boundary_bias(model, x, "infer")
    with torch.no_grad():
        n = model(x).num_tokens.float()
    assert n.mean().item() == pytest.approx(16, abs=0.2)
    calibrate_boundary_bias(model, x, "train", tokens_short=8)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        n = torch.stack([model(x).num_tokens.float() for _ in range(5)]).mean()
    assert n.item() == pytest.approx(8, abs=1.5)


def test_bench_main_tiny(tmp_path, capsys):
    out = tmp_path / "bench.json"
    res = bench.main(["--presets", "vit-tiny-16,drip-tiny-16-4x", "--mode", "train", "--batch", "2",
                      "--repeats", "1", "--warmup", "0", "--json", str(out)])
    d = json.loads(out.read_text())
    assert d["mode"] == "train" and len(d["results"]) == 2
    for r in d["results"]:
        for k in ("preset", "median_s", "images_per_s", "speed_ratio", "mac_ratio", "peak_mem_mb", "tokens_mean"):
            assert k in r
    assert d["results"][0]["speed_ratio"] == 1.0 and d["results"][0]["mac_ratio"] == 1.0
    assert d["results"][1]["mac_ratio"] > 1.0
    assert "| drip-tiny-16-4x |" in capsys.readouterr().out
    assert res["results"][1]["preset"] == "drip-tiny-16-4x"


def test_bench_infer_calibrated_tokens():
    res = bench.run_benchmark(["drip-tiny-16-10x"], mode="infer", batch=3, repeats=2, warmup=0, clock="cpu")
    r = res["results"][0]
    assert res["clock"] == "cpu" and len(r["times_s"]) == 2 and all(t > 0 for t in r["times_s"])
    assert r["tokens_mean"] == pytest.approx(6, abs=0.4) and r["tokens_padded"] >= r["tokens_mean"]


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_bench_preset_overrides_and_each_modes_macs(mode):
    """`PRESET+KEY=VALUE` builds the preset with that field; the MAC ratio uses what the timed step computes (DVT
    at its fixed exit in inference, every exit in training)."""
    res = bench.run_benchmark(["vit-tiny-16", "dvt-tiny-16+exit_policy=fixed:0"], mode=mode, batch=2, repeats=1,
                              warmup=0)
    r = res["results"][1]
    c = get_preset_config("dvt-tiny-16", exit_policy="fixed:0")
    want = flops.dvt_cumulative_macs(c)[0 if mode == "infer" else -1] / 1e9
    assert r["preset"] == "dvt-tiny-16+exit_policy=fixed:0" and r["gmacs"] == pytest.approx(want)
    assert r["tokens_mean"] == (4 if mode == "infer" else 64)
    with pytest.raises(SystemExit):
        bench.parse_args(["--presets", "vit-tiny-16,dvt-tiny-16+exit_policy"])  # not KEY=VALUE


def test_example_images():
    names = images.list_examples()
    assert {"astronaut", "chelsea", "coffee", "rocket", "camera"} <= set(names)
    im = images.load_image("example:camera")
    assert im.mode == "RGB" and min(im.size) >= 256
    with pytest.raises(KeyError):
        images.example_image("nope")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        images.load_image("missing.png")


def test_segment_overlay_matches_model():
    model = _model("drip-tiny-16-4x")
    im = images.load_image("example:astronaut")
    pic, n = visualize.segment_overlay(model, im)
    labels, n2 = visualize.segment_labels(model, im)
    x = model.preprocess(im)[None]
    with torch.no_grad():
        expected = int(model(x).num_tokens[0])
    assert n == n2 == expected == int(labels.max()) + 1
    assert labels.shape == (8, 8) and np.all(np.diff(labels.ravel()) >= 0)  # runs in raster order
    assert pic.size[0] >= visualize.DISPLAY_MIN_SIZE
    pic2, _ = visualize.segment_overlay(model, im)  # deterministic
    assert np.array_equal(np.asarray(pic), np.asarray(pic2))


def test_overlay_borders_only_between_segments():
    view = Image.new("RGB", (64, 64), (0, 0, 0))
    one = visualize.draw_segments(view, np.zeros((4, 4), dtype=int), border=(255, 255, 255))
    two = visualize.draw_segments(view, np.repeat(np.arange(2), 8).reshape(4, 4), border=(255, 255, 255))
    white = lambda im: int((np.asarray(im) == 255).all(-1).sum())  # noqa: E731
    assert white(one) == 0 and white(two) > 0


def test_visualize_main_writes_png(tmp_path, capsys):
    out = tmp_path / "seg.png"
    res = visualize.main(["--model", "drip-tiny-16-10x", "--image", "example:chelsea", "--image",
                          "example:coffee", "--out", str(out)])
    assert out.is_file() and len(res["num_tokens"]) == 2
    assert all(1 <= k <= 64 for k in res["num_tokens"])
    assert "chelsea:" in capsys.readouterr().out


def test_visualize_saved_folder(tmp_path):
    model = _model("drip-tiny-16-2x")
    model.save_pretrained(tmp_path / "enc")
    loaded = visualize.load_model(str(tmp_path / "enc"), device="cpu")
    im = images.load_image("example:rocket")
    assert visualize.segment_overlay(loaded, im)[1] == visualize.segment_overlay(model, im)[1]
    with pytest.raises(FileNotFoundError):
        visualize.load_model(str(tmp_path / "nothing"))


def test_bench_profile_parts_and_paths(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--presets", "vit-tiny-16,drip-tiny-16-4x,drip-tiny-16-4x@padded", "--mode", "train", "--batch", "3",
                "--repeats", "1", "--warmup", "0", "--profile", "--json", str(out)])
    d = json.loads(out.read_text())
    assert [r["short_path"] for r in d["results"]] == ["auto", "auto", "padded"]
    prof = {r["preset"]: r for r in d["profile"]}
    vit, drip = prof["vit-tiny-16"], prof["drip-tiny-16-4x"]
    assert vit["seconds"]["predictor"] == vit["seconds"]["shortened blocks"] == 0
    for p in ("pre blocks", "predictor", "pooling", "shortened blocks", "head", "optimizer"):
        assert drip["seconds"][p] > 0, p
    assert drip["total_s"] == pytest.approx(sum(drip["seconds"].values()))
    cfg = get_preset_config("drip-tiny-16-4x")
    tokens = d["results"][1]["tokens_mean"]
    assert sum(drip["gmacs"].values()) * 1e9 == pytest.approx(flops.analytic_macs(cfg, tokens))
    text = capsys.readouterr().out
    assert "per-part profile" in text and "| drip-tiny-16-4x@padded | shortened blocks |" in text


def test_stage_timer_infer_sums_to_the_step():
    model = _model("drip-tiny-16-4x")
    ticks = iter(range(100))
    timer = bench.StageTimer(lambda: float(next(ticks)), torch.device("cpu"))
    model.stage_hook = timer
    timer.start()
    with torch.no_grad():
        model(torch.randn(2, 3, 128, 128))
    parts = timer.finish()
    # one tick per stage mark: embed+pre blocks 2, then predictor, pooling, short blocks, head 1 each (+ finish)
    assert parts["pre blocks"] == 2 and parts["predictor"] == parts["pooling"] == parts["shortened blocks"] == 1
    assert sum(parts.values()) == 7 and parts["optimizer"] == 0


def test_bench_rejects_bad_path_suffix():
    with pytest.raises(SystemExit):
        bench.parse_args(["--presets", "vit-tiny-16,drip-tiny-16-4x@sideways"])


def test_bench_llava_tower(capsys):
    res = bench.main(["--llava-tower", "--tower-preset", "drip-tiny-16-4x", "--image-size", "128", "--batch", "2",
                      "--repeats", "1", "--warmup", "0"])
    full, stop = res["results"]
    assert (full["path"], stop["path"]) == ("hidden states", "stop at layer")
    assert full["blocks_run"] == 6 and stop["blocks_run"] == 5 and res["max_abs_diff"] == 0
    assert "| stop at layer | 5 |" in capsys.readouterr().out
    assert bench.parse_args(["--llava-tower"]).batch == 16 and bench.parse_args(["--llava-tower"]).image_size == 336
