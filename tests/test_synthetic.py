"""Shapes-world generator: determinism, every output format parses, labels and answers are exact."""
import collections
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from drip_demo import synthetic as sw
from drip_demo import synthetic_questions as sq
from drip_llava.jsonl import read_jsonl

N_TRAIN, N_VAL = 80, 48  # >= 40 val images: every class appears in both splits (balanced classes)
KW = dict(image_size=128, shard_size=30, n_sqa=40, n_bench_images=5, progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "seed0"
    meta = sw.generate(out, N_TRAIN, N_VAL, seed=0, workers=2, **KW)
    return out, meta


@pytest.fixture(scope="module")
def records(data):
    """key -> json record, per split, read back from the shards with plain tarfile."""
    import tarfile

    out, _ = data
    recs = {"train": {}, "val": {}}
    for split in recs:
        for shard in sorted(out.glob(f"{split}-*.tar")):
            with tarfile.open(shard) as tar:
                for m in tar.getmembers():
                    if m.name.endswith(".json"):
                        rec = json.loads(tar.extractfile(m).read())
                        recs[split][rec["key"]] = rec
    return recs


def _output_files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "meta.json"}


def test_deterministic_per_seed_and_worker_count(data, tmp_path):
    out, _ = data
    same = sw.generate(tmp_path / "again", N_TRAIN, N_VAL, seed=0, workers=1, **KW)
    other = sw.generate(tmp_path / "seed1", N_TRAIN, N_VAL, seed=1, workers=1, **KW)
    assert not same["reused"] and not other["reused"]
    a, b, c = _output_files(out), _output_files(tmp_path / "again"), _output_files(tmp_path / "seed1")
    assert a.keys() == b.keys() and len(a) > N_TRAIN + N_VAL + 40
    assert [k for k in a if a[k] != b[k]] == []  # byte-identical, whatever the number of workers
    assert a["train-000000.tar"] != c["train-000000.tar"]
    assert a["llava/instruct.json"] != c["llava/instruct.json"]
    assert a["scienceqa/problems.json"] != c["scienceqa/problems.json"]


def test_webdataset_shards_decode(data, records):
    import webdataset as wds

    out, meta = data
    assert meta["counts"]["train_shards"] == 3 and meta["counts"]["val_shards"] == 2
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        urls = [str(p) for p in sorted(out.glob(f"{split}-*.tar"))]
        ds = wds.WebDataset(urls, shardshuffle=False).decode("pil")
        seen = []
        for s in ds:
            assert isinstance(s["jpg"], Image.Image) and s["jpg"].size == (128, 128)
            assert s["txt"] == s["json"]["alt_text"]
            assert s["txt"].split(" with ")[0].endswith(s["json"]["classname"])  # the class leads the alt text
            assert s["cls"] == s["json"]["label"] == sw.CLASSNAMES.index(s["json"]["classname"])
            assert s["json"] == records[split][s["__key__"]]
            seen.append(s["__key__"])
        assert seen == [f"{i:06d}" for i in range(n)]


def test_imagefolder_and_classnames(data, records):
    from torchvision.datasets import ImageFolder

    out, _ = data
    names = json.loads((out / "classnames.json").read_text())
    assert names == sw.CLASSNAMES == sw.class_names() and len(names) == 40 == len(sw.COLOURS) * len(sw.SHAPES)
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        ds = ImageFolder(str(out / "imagefolder" / split))
        assert ds.classes == names and len(ds) == n
        for path, target in ds.samples:
            assert target == records[split][Path(path).stem]["label"]
    # Balanced: classes differ in count by at most one per 40-block.
    counts = collections.Counter(r["label"] for r in records["val"].values())
    assert len(counts) == 40 and max(counts.values()) - min(counts.values()) <= 1


def test_label_is_the_clearly_largest_object(records):
    scenes = list(records["train"].values()) + [sw.sample_scene(random.Random(i)) for i in range(1500)]
    n_objs = collections.Counter()
    for s in scenes:
        objs = s["objects"]
        n_objs[len(objs)] += 1
        assert s["label"] == sw.class_index(objs[0]["colour"], objs[0]["shape"])
        assert all(objs[0]["area"] >= 1.9 * o["area"] for o in objs[1:])
        assert all(sw.SIZES.index(objs[0]["size"]) > sw.SIZES.index(o["size"]) for o in objs[1:])
        assert len({o["cell"] for o in objs}) == len(objs)
        assert len({(o["colour"], o["shape"]) for o in objs}) == len(objs)
        for o in objs:
            row, col = divmod(o["cell"], 3)
            x, y = o["center"]
            assert col / 3 <= x <= (col + 1) / 3 and row / 3 <= y <= (row + 1) / 3
            assert o["extent"] <= min(x, y, 1 - x, 1 - y)  # fully inside the image
    assert set(n_objs) == {1, 2, 3}


def test_rendered_largest_object_has_most_pixels():
    """Measured pixel areas on a plain background agree with the scene's size ordering."""
    checked = 0
    for i in range(200):
        scene = sw.sample_scene(random.Random(f"px{i}"), n_objects=3)
        if scene["background"]["texture"] != "plain" or len(scene["objects"]) < 2:
            continue
        img = np.asarray(sw.render_scene(scene, 128)).astype(int)
        bg = np.array(scene["background"]["rgb"])
        diff = np.abs(img - bg).sum(-1) > 60
        yy, xx = np.mgrid[0:128, 0:128]
        areas = []
        for o in scene["objects"]:
            cx, cy, r = o["center"][0] * 128, o["center"][1] * 128, o["extent"] * 128 + 2
            areas.append(int((diff & ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r)).sum()))
            assert abs(areas[-1] - o["area"] * 128 * 128) <= 0.25 * o["area"] * 128 * 128 + 12
        assert all(areas[0] > 1.5 * a for a in areas[1:]), (scene, areas)
        checked += 1
    assert checked >= 10


def test_captions_mention_every_object(records):
    for rec in list(records["train"].values()) + list(records["val"].values()):
        cap = rec["caption"]
        for o in rec["objects"]:
            assert f"{o['colour']} {o['shape']}" in cap
            assert any(p in cap for p in sq.POS_PHRASES[o["position"]]), (cap, o["position"])
    assert len({r["caption"].split(" ")[0] for r in records["train"].values()}) >= 4  # varied phrasing
    for rec in records["train"].values():  # alt text (the CLIP shards' txt): every object, no background
        assert all(f"{o['colour']} {o['shape']}" in rec["alt_text"] for o in rec["objects"])


def test_llava_json(data, records):
    out, _ = data
    img_root = out / "imagefolder"
    pre = json.loads((out / "llava" / "pretrain.json").read_text())
    assert len(pre) == N_TRAIN
    for r in pre:
        assert (img_root / r["image"]).is_file() and r["image"].startswith("train/")
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n") and gpt["from"] == "gpt"
        assert gpt["value"] == records["train"][Path(r["image"]).stem]["alt_text"]
    ins = json.loads((out / "llava" / "instruct.json").read_text())
    with_image = [r for r in ins if "image" in r]
    assert len(with_image) == N_TRAIN and len(ins) > N_TRAIN  # plus text-only context questions
    n_mc = 0
    for r in ins:
        conv = r["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        n_img = sum(t["value"].count("<image>") for t in conv)
        if "image" in r:
            assert (img_root / r["image"]).is_file() and 2 <= len(conv) // 2 <= 4
            assert n_img == 1 and conv[0]["value"].startswith("<image>\n")
        else:
            assert n_img == 0 and conv[0]["value"].startswith("Context: ")
        for q, a in zip(conv[::2], conv[1::2]):
            if sq.MC_SUFFIX in q["value"]:
                n_mc += 1
                n_opts = q["value"].count(") ")
                assert len(a["value"]) == 1 and "ABCDE".index(a["value"]) < n_opts
    assert n_mc >= N_TRAIN // 4
    # Held-out short-answer questions: exact answers recomputable from the scene.
    rows = read_jsonl(out / "llava" / "val_questions.jsonl")
    assert len(rows) == N_VAL
    for row in rows:
        rec = records["val"][Path(row["image"]).stem]
        assert (img_root / row["image"]).is_file()
        if row["category"] == "count":
            assert row["answer"] == str(len(rec["objects"]))
        if row["category"] == "colour_largest":
            assert row["answer"] == rec["objects"][0]["colour"].capitalize()


def test_reading_warmup_block_comes_first_and_answers_colours(data, records, tmp_path):
    """--n-warmup N: N colour-only short-answer conversations (exact answers) before the same shuffled mix."""
    out, _ = data
    mix = json.loads((out / "llava" / "instruct.json").read_text())
    assert [r["id"] for r in mix] != sorted(r["id"] for r in mix)  # shuffled: text-only ones are not all last
    warm_out = tmp_path / "warm"
    meta = sw.generate(warm_out, N_TRAIN, N_VAL, seed=0, workers=1, n_warmup=5, **KW)
    assert meta["counts"]["llava_warmup"] == 5 and meta["args"]["n_warmup"] == 5
    ins = json.loads((warm_out / "llava" / "instruct.json").read_text())
    assert ins[5:] == mix
    for r in ins[:5]:
        rec = records["train"][Path(r["image"]).stem]
        conv = r["conversations"]
        assert conv[0]["value"].startswith("<image>\n") and sq.SHORT_SUFFIX in conv[0]["value"]
        assert 1 <= len(conv) // 2 <= 3 and sum(t["value"].count("<image>") for t in conv) == 1
        present = {o["colour"] for o in rec["objects"]}
        for q, a in zip(conv[::2], conv[1::2]):
            assert "colour" in q["value"] and a["value"].lower() in present, (q, a)
            if "largest" in q["value"] or "biggest" in q["value"]:
                assert a["value"].lower() == rec["objects"][0]["colour"]


def test_scienceqa(data, records):
    out, _ = data
    sqa = out / "scienceqa"
    problems = json.loads((sqa / "problems.json").read_text())
    splits = json.loads((sqa / "pid_splits.json").read_text())
    assert splits["train"] == [] and splits["val"] == [] and sorted(splits["test"]) == sorted(problems)
    with_img = {pid: p for pid, p in problems.items() if p["image"]}
    text_only = {pid: p for pid, p in problems.items() if not p["image"]}
    assert len(with_img) == 40 and 3 <= len(text_only) <= 6
    groups = collections.defaultdict(collections.Counter)
    for p in problems.values():
        assert set(p) >= {"question", "choices", "answer", "hint", "image", "split", "subject", "grade", "topic",
                          "category", "skill", "lecture", "solution"}
        assert p["split"] == "test" and 2 <= len(p["choices"]) <= 5 and len(set(p["choices"])) == len(p["choices"])
        assert 0 <= p["answer"] < len(p["choices"])
        groups[len(p["choices"])][p["answer"]] += 1
    for n, cnt in groups.items():
        assert max(cnt[k] for k in range(n)) - min(cnt[k] for k in range(n)) <= 1, (n, cnt)
    for pid, p in with_img.items():
        assert p["hint"] == "" and p["image"] == "image.png"
        png = sqa / "images" / "test" / pid / "image.png"
        rec = records["val"][f"{int(pid) - 1:06d}"]
        # PNG is lossless: the image is exactly the JSON scene re-rendered.
        assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), np.asarray(sw.render_scene(rec, 128)))
        right = p["choices"][p["answer"]]
        if "largest shape" in p["question"] and "colour" in p["question"]:
            assert right == rec["objects"][0]["colour"]
        if p["question"].startswith("How many"):
            assert right == str(len(rec["objects"]))
        if p["question"].startswith("Where is") or p["question"].startswith("In which part"):
            name = p["question"].rstrip("?").split("the ")[-1]
            assert right == [o["position"].replace("-", " ") for o in rec["objects"]
                             if f"{o['colour']} {o['shape']}" == name][0]
    for p in text_only.values():
        assert len(p["hint"]) > 20 and p["question"].startswith("Based on the context")


def test_scienceqa_readable_mix_weights_question_types():
    """The "readable" mix puts ~70% of image problems on colour and ~10% on shape; uniform stays ~3/8 colour."""
    recs = [{"index": i, **sw.sample_scene(sw.item_rng(0, "val", i))} for i in range(600)]
    share = {}
    for mix in ("uniform", "readable"):
        problems, _ = sq.scienceqa_problems(recs, 0, sw.sqa_pid, mix=mix)
        types = [sq.SQA_SKILL_TYPE[p["skill"]] for p in problems.values() if p["image"]]
        assert len(types) == 600 and set(types) == set(sq.SQA_ATTRIBUTE)  # every type is asked
        assert {sq.SQA_SKILL_TYPE[p["skill"]] for p in problems.values() if not p["image"]} == {"text_only"}
        attrs = collections.Counter(sq.SQA_ATTRIBUTE[t] for t in types)
        share[mix] = {a: n / len(types) for a, n in attrs.items()}
        for pid, p in problems.items():  # answers stay exact whatever the mix
            if p["image"] and sq.SQA_SKILL_TYPE[p["skill"]] == "colour_largest":
                assert p["choices"][p["answer"]] == recs[int(pid) - 1]["objects"][0]["colour"]
    assert 0.64 <= share["readable"]["colour"] <= 0.76 and 0.05 <= share["readable"]["shape"] <= 0.15
    assert 0.3 <= share["uniform"]["colour"] <= 0.45 and share["uniform"]["shape"] >= 0.3
    with pytest.raises(ValueError, match="mix"):
        sq.scienceqa_problems(recs[:5], 0, sw.sqa_pid, mix="colour")


def test_llavabench(data):
    out, _ = data
    lb = out / "llavabench"
    load = lambda name: read_jsonl(lb / name)  # noqa: E731
    qs, refs, ctx = load("questions.jsonl"), load("answers_gpt4.jsonl"), load("context.jsonl")
    assert len(qs) == 15 and len(ctx) == 5
    assert [q["question_id"] for q in qs] == [r["question_id"] for r in refs] == list(range(15))
    assert collections.Counter(q["category"] for q in qs) == {"conv": 5, "detail": 5, "complex": 5}
    for q in qs:
        assert (lb / "images" / q["image"]).is_file() and q["text"]
    assert all(r["text"] for r in refs) and {c["image"] for c in ctx} == {q["image"] for q in qs}
    rule = json.loads((lb / "rule.json").read_text())
    assert set(rule) == {"llava_bench_conv", "llava_bench_detail", "llava_bench_complex"}
    for v in rule.values():
        assert v["role"] == "Assistant" and "two values" in v["prompt"] and "first" in v["prompt"]


def test_cli_idempotent_and_overwrite(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["--out", str(out), "--n-train", "12", "--n-val", "6", "--shard-size", "5", "--workers", "1",
            "--no-progress", "--image-size", "64"]
    meta = sw.main(args)
    assert not meta["reused"] and len(list(out.glob("train-*.tar"))) == 3
    assert json.loads((out / "meta.json").read_text())["args"]["n_train"] == 12
    assert meta["args"]["sqa_mix"] == "uniform" and 'question-type mix\n  "uniform"' in (out / "README.md").read_text()
    assert "README" not in meta and (out / "README.md").read_text().startswith("# Shapes world")
    mtime = (out / "train-000000.tar").stat().st_mtime_ns
    capsys.readouterr()
    assert sw.main(args)["reused"] and "skipping" in capsys.readouterr().out
    assert (out / "train-000000.tar").stat().st_mtime_ns == mtime
    smaller = [a if a != "12" else "4" for a in args]
    with pytest.raises(FileExistsError, match="different arguments"):
        sw.main(smaller)
    meta = sw.main(smaller + ["--overwrite"])
    assert not meta["reused"] and len(list(out.glob("train-*.tar"))) == 1  # stale shards removed
    assert Image.open(next((out / "imagefolder" / "train").rglob("*.jpg"))).size == (64, 64)
    assert sw.main(smaller + ["--sqa-mix", "readable", "--overwrite"])["args"]["sqa_mix"] == "readable"


def test_library_api():
    s1 = sw.sample_scene(np.random.default_rng(3))
    s2 = sw.sample_scene(np.random.default_rng(3))
    assert s1 == s2 and sw.sample_scene(7) == sw.sample_scene(7)
    assert sw.sample_scene(random.Random(1), cls=5)["classname"] == sw.CLASSNAMES[5]
    img = sw.render_scene(s1, 96)
    assert img.mode == "RGB" and img.size == (96, 96)
    with pytest.raises(ValueError, match="cls"):
        sw.sample_scene(random.Random(0), cls=40)
    with pytest.raises(TypeError):
        sw.sample_scene("seed")
