"""`make compare`: matched-compute settings, the per-tower measurements, and a QUICK end-to-end run."""
import dataclasses
import json
import math

import pytest
import torch

from drip_demo import compare


def test_matched_settings_are_within_tolerance_and_recomputable():
    plan = dataclasses.replace(compare.FULL, match=("4x", "10x"))
    methods = compare.plan_methods(plan)
    matched = [m for m in methods if m.match and not m.budgeted]
    assert {m.name for m in matched} == {f"{f}@{r}" for f in compare.FAMILIES for r in ("4x", "10x")}
    # DVT: one cascade whose exit thresholds are fitted to DRIP-4x's figure after training
    (dvt,) = [m for m in methods if m.budgeted]
    assert dvt.name == "dvt@4x" and dvt.match["target_gmacs"] == compare.gmacs_of(compare.DRIP_REFERENCES["4x"])
    assert not any(m.budgeted for m in compare.plan_methods(compare.QUICK))
    assert "dvt@4x" in {m.name for m in compare.all_methods(compare.QUICK)}
    for m in matched:
        ref = compare.gmacs_of(compare.DRIP_REFERENCES[m.name.split("@")[1]])
        fam, knob = (o.split("=") for o in m.overrides)
        value = json.loads(knob[1])
        g = compare.gmacs_of(m.preset, family=fam[1], **{knob[0]: value})  # what the trainer will build
        assert abs(g / ref - 1) <= compare.MATCH_TOLERANCE and g == pytest.approx(m.match["gmacs"])
    # a reference no setting reaches is refused, not silently mismatched
    assert compare.match_setting("tome", 0.01)["rel_err"] > compare.MATCH_TOLERANCE


@pytest.fixture(scope="module")
def val_jpgs(tmp_path_factory):
    from drip_demo.synthetic import make_sample

    d = tmp_path_factory.mktemp("val")
    paths = []
    for i in range(6):
        _, im = make_sample(0, "val", i)
        paths.append(d / f"{i}.jpg")
        im.save(paths[-1])
    return paths


@pytest.mark.parametrize("spec", [("drip-tiny-16-4x", {}), ("vit-tiny-16", {"family": "tome", "merge_r": 9}),
                                  ("vit-tiny-16", {"family": "dynamicvit", "keep_rate": 0.6}),
                                  ("vit-tiny-16", {"family": "avit", "target_depth": 3.0})])
def test_tower_stats_on_each_family(tmp_path, val_jpgs, spec):
    from drip_llava.vision.families import create_model

    torch.manual_seed(0)
    preset, overrides = spec
    model = create_model(preset, **overrides)
    model.save_pretrained(tmp_path / "tower")
    s = compare.tower_stats(tmp_path / "tower", val_jpgs, batch=4)
    c = model.config
    assert s["images"] == len(val_jpgs) and s["family"] == c.family
    assert all(math.isfinite(v) for d in (s["tokens"], s["llava_tokens"]) for v in d.values())
    assert 1 <= s["tokens"]["min"] <= s["tokens"]["max"] <= c.num_patches
    assert s["gmacs_analytic"] > 0 and s["gmacs_realised"] > 0
    if c.family == "tome":  # every image merges alike: realised = the config's figure, no auxiliary target
        assert s["aux"] is None and s["gmacs_realised"] == pytest.approx(s["gmacs_analytic"])
        assert s["tokens"]["max"] == c.max_tokens
    else:
        assert math.isfinite(s["aux"]["reached"]) and s["aux"]["target"] > 0
    if c.family == "avit":  # an untrained halting neuron runs nearly every block: more than the target's MACs
        assert s["aux"]["reached"] > c.depth - 1 > c.target_depth and s["gmacs_realised"] > s["gmacs_analytic"]


def test_dvt_exit_stage_fits_the_budget_and_saves_it(tmp_path):
    """The exits stage on a random DVT tower and a random CLIP text tower: the thresholds keep the mean MACs of the
    split they were fitted on within the budget, the tower folder reloads with them and the exit classifier, and
    the reloaded tower's own decisions spend what the fit says; the tower table reads the realised mix."""
    from PIL import Image

    from drip_llava.vision import flops
    from drip_llava.vision.families import create_model, from_pretrained
    from vision_pretrain.clip_model import DripCLIP, get_text_config

    torch.manual_seed(0)
    tower = create_model("dvt-tiny-16", hidden_size=64, num_heads=2, depth=2, embed_dim=32)
    run, data = tmp_path / "run", tmp_path / "data"
    clip = DripCLIP(tower, get_text_config("tiny"))
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(30.0))  # spreads the random prototypes' confidences
    tower.save_pretrained(run / "vision_tower")
    clip.save_text_tower(run / "text_tower")
    names = ["red circle", "blue square", "green star"]
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 8), ("val", 3)):
        for c in names:
            d = data / "imagefolder" / split / c.replace(" ", "_")
            d.mkdir(parents=True)
            for i in range(n):
                px = (torch.rand(128, 128, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(px).save(d / f"{i}.jpg")
    (data / "classnames.json").write_text(json.dumps({c.replace(" ", "_"): c for c in names}))
    macs = flops.dvt_cumulative_macs(tower.config, num_classes=len(names))
    budget = (macs[0] + macs[2]) / 2 / 1e9
    res = compare.fit_dvt_exits(run, data, budget, batch=5, n_train=12)  # every 2nd train image
    assert res["train"]["images"] == 12 and res["val"]["images"] == 9 and len(res["val"]["anytime_top1"]) == 3
    assert res["train"]["mean_macs"] <= budget * 1e9 and res["train"]["exit_fractions"][2] < 1  # exits early
    assert res["exit_macs"] == pytest.approx(macs) and math.isfinite(res["zeroshot"]["zeroshot_top1"])
    saved = from_pretrained(run / "vision_tower").eval()
    c = saved.config
    assert c.exit_policy == "threshold" and c.exit_thresholds == res["thresholds"] and c.exit_num_classes == 3
    assert saved.exit_head_weight.abs().sum() > 0 and c.exit_normalize
    train_jpgs = sorted((data / "imagefolder" / "train").rglob("*.jpg"))[::2]  # ImageFolder's order
    s = compare.tower_stats(run / "vision_tower", train_jpgs, batch=7, budget_gmacs=budget)
    assert s["aux"]["target"] == budget and s["aux"]["reached"] == pytest.approx(s["gmacs_realised"])
    assert s["gmacs_realised"] * 1e9 == pytest.approx(res["train"]["mean_macs"], rel=1e-6)
    assert s["exit_fractions"] == pytest.approx(res["train"]["exit_fractions"])
    assert s["tokens"]["mean"] == pytest.approx(sum(f * n for f, n in zip(s["exit_fractions"], [4, 16, 64])))


def test_clip_trainer_takes_every_family(tmp_path):
    """vision_pretrain.clip trains and summarises a non-DRIP tower: DripCLIP's step statistics and the run summary
    read any family's output and config (a ToMe tower has no boundaries and a `family: tome` config)."""
    from drip_llava.vision.families import create_model
    from vision_pretrain.clip_model import DripCLIP, get_text_config
    from vision_pretrain.runlog import summarize_clip_run

    tower = create_model("vit-tiny-16", family="tome", merge_r=4)
    cfg = get_text_config("tiny")
    out = DripCLIP(tower, cfg)(torch.zeros(1, 3, 128, 128), torch.zeros(1, cfg["context_length"], dtype=torch.long))
    assert float(out["boundary_rate"]) == pytest.approx(float(out["num_tokens"][0]) / 64) and out["num_tokens"][0] < 64
    tower.save_pretrained(tmp_path / "run" / "vision_tower")
    (tmp_path / "run" / "log.jsonl").write_text(json.dumps({"event": "step", "step": 1, "boundary_rate": 1}))
    assert summarize_clip_run(tmp_path / "run")["target_rate"] == 1.0


@pytest.mark.slow
def test_quick_compare_has_a_finite_row_per_method(tmp_path):
    out = tmp_path / "cmp"
    compare.main(["--quick", "--out", str(out)])
    res = json.loads((out / "compare.json").read_text())
    names = [m.name for m in compare.plan_methods(compare.QUICK)]
    assert [r["method"] for r in res["towers"]] == names == [r["method"] for r in res["llava"]]
    assert any(res["matching"][n].get("reference") for n in names)
    for m in res["matching"].values():
        assert "rel_err" not in m or m["rel_err"] <= compare.MATCH_TOLERANCE
    numbers = ("gmacs", "gmacs_realised", "zeroshot_top1", "zeroshot_top5", "probe_colour", "probe_shape",
               "infer_images_per_s", "infer_speed_ratio", "train_images_per_s", "train_speed_ratio")
    for r in res["towers"]:
        assert all(math.isfinite(r[k]) for k in numbers), r
        assert all(math.isfinite(v) for v in r["tokens"].values()) and r["tokens"]["mean"] >= 1
    vit = res["towers"][0]
    assert vit["infer_speed_ratio"] == 1 and vit["tokens"]["mean"] == 64
    assert all(r["tokens"]["mean"] < 64 for r in res["towers"][1:])  # every reduction method reduces
    for r in res["llava"]:
        assert 0 <= r["p_value"] <= 1 and r["n_image_problems"] > 0
        assert all(math.isfinite(r[k]) for k in ("acc_image", "acc_blank", "prefill_ms", "prefill_gmacs"))
    assert (out / "compare.png").stat().st_size > 0 and (out / "towers.png").stat().st_size > 0
    assert list(json.loads((out / "results.json").read_text())["pictures"]["tokens"]) == names  # a row each
    assert "| tome@4x | family=tome merge_r=9 |" in (out / "COMPARE.md").read_text()


def test_a_resumed_run_redoes_table_stages_when_the_methods_changed():
    """probe / towers / speed / prefill cover every method in one result: after a method joins the plan, a resumed
    run must run them again (per-method stages stay done)."""
    r = {"done": {"clip-vit": True, "probe": True, "towers": True}, "table_methods": {"probe": ["vit"]}}
    assert compare.forget_stale_table_stages(r, ["vit"]) == ["towers"]  # towers never recorded its methods
    r["done"]["towers"], r["table_methods"]["towers"] = True, ["vit"]
    assert compare.forget_stale_table_stages(r, ["vit"]) == []
    assert compare.forget_stale_table_stages(r, ["vit", "dvt@4x"]) == ["probe", "towers"]
    assert r["done"] == {"clip-vit": True}
