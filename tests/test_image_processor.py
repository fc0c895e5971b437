"""drip_llava.data.image_processor: one preprocessing (EXIF orientation, transparency on white, pad/square, the
tower's transform), saved with the model, gives bit-identical pixels in training, the chat engine, eval.generate,
eval.rank_choices and eval.image_use."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from drip_llava.data.image_processor import (
    PROCESSOR_FILE,
    DripLlavaImageProcessor,
    llava_pad_color,
    load_image_processor,
)
from drip_llava.vision import DripVisionModel

W, H = 80, 40  # stored size; EXIF orientation 6 displays it rotated: 40 wide, 80 high


def _odd_image(path):
    """A non-square RGBA PNG with EXIF orientation 6 (rotate 90 degrees clockwise to display). A third of it is
    fully transparent over black; the rest opaque, with a different colour per pixel (so orientation shows)."""
    y, x = np.mgrid[0:H, 0:W]
    rgba = np.stack([x * 3, y * 6, (x + y) % 256, np.full_like(x, 255)], -1).astype(np.uint8)
    rgba[:, : W // 3] = (0, 0, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgba, "RGBA").save(path, exif=exif)
    return path


def _expected_view(path, pad_color):
    """The processor's first steps written out by hand with numpy: rotate clockwise, transparent -> white (alpha
    is 0 or 255, so compositing is exact), centre on a square of the pad colour."""
    rgba = np.asarray(Image.open(path).convert("RGBA"))  # stored orientation (PIL does not rotate on open)
    rgba = np.rot90(rgba, k=-1)
    rgb = np.where(rgba[..., 3:] == 255, rgba[..., :3], 255).astype(np.uint8)
    h, w = rgb.shape[:2]
    side = max(h, w)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = pad_color
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = rgb
    return Image.fromarray(canvas)


@pytest.fixture(scope="module")
def tower_model():
    torch.manual_seed(0)
    return DripVisionModel.from_preset("drip-tiny-16-4x")


def test_steps_match_a_hand_written_reference_and_the_tower_transform(tower_model, tmp_path):
    path = _odd_image(tmp_path / "odd.png")
    proc = DripLlavaImageProcessor.from_vision_config(tower_model.config, "pad")
    assert proc.image_size == 128 and proc.pad_color == (122, 116, 104)  # LLaVA's int(x * 255), not rounded
    assert proc.pad_color == llava_pad_color(tower_model.config.image_mean)
    view = _expected_view(path, proc.pad_color)
    assert view.size == (80, 80)
    expected = tower_model.preprocess(view)  # the tower's own transform is the last step
    assert torch.equal(proc(path), expected)
    with Image.open(path) as im:
        assert torch.equal(proc(im), expected)  # a PIL image as opened, or a path: the same pixels
        assert np.array_equal(np.asarray(proc.prepare(im)), np.asarray(view))
    # "square": no padding, resize + center crop; on an upright RGB image exactly the tower's transform
    square = proc.with_aspect_ratio("square")
    rgb = Image.fromarray(np.asarray(view)[:, 10:60])
    assert torch.equal(square(rgb), tower_model.preprocess(rgb)) and square.pad_color == proc.pad_color
    assert not torch.equal(square(path), expected)


def test_file_roundtrip_fallbacks_and_errors(tower_model, tmp_path):
    proc = DripLlavaImageProcessor.from_vision_config(tower_model.config, "pad")
    written = proc.save_pretrained(tmp_path / "ckpt")
    assert written.name == PROCESSOR_FILE
    saved = json.loads(written.read_text())
    assert saved["image_processor_type"] == "DripLlavaImageProcessor" and saved["aspect_ratio"] == "pad"
    assert DripLlavaImageProcessor.from_pretrained(tmp_path / "ckpt") == proc
    cfg = tower_model.config
    assert load_image_processor(tmp_path / "ckpt", cfg) == (proc, None)

    # folders without the file: the aspect ratio recorded in config.json, then in drip_llava_args.json, else square
    old = tmp_path / "old"
    old.mkdir()
    got, note = load_image_processor(old, cfg, type("Cfg", (), {"image_aspect_ratio": "pad"})())
    assert got == proc and "config.json" in note
    (old / "drip_llava_args.json").write_text(json.dumps({"data": {"image_aspect_ratio": "pad"}}))
    got, note = load_image_processor(old, cfg.to_dict())
    assert got == proc and "drip_llava_args.json" in note
    (old / "drip_llava_args.json").unlink()
    got, note = load_image_processor(old, cfg)
    assert got.aspect_ratio == "square" and "square" in note

    other = DripLlavaImageProcessor(image_size=224)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="image_size 224, but the vision tower takes 128"):
        load_image_processor(tmp_path / "other", cfg)
    (tmp_path / "typo").mkdir()
    (tmp_path / "typo" / PROCESSOR_FILE).write_text(json.dumps({**saved, "aspect": "pad"}))
    with pytest.raises(ValueError, match=r"unknown fields \['aspect'\]"):
        DripLlavaImageProcessor.from_pretrained(tmp_path / "typo")
    with pytest.raises(ValueError, match="valid: square, pad"):
        DripLlavaImageProcessor(aspect_ratio="crop")
    with pytest.raises(ValueError, match="custom transform"):
        DripLlavaImageProcessor.with_transform(tower_model.preprocess).save_pretrained(tmp_path / "x")

    # a llava-hf folder's CLIPImageProcessor / LlavaImageProcessor config describes the same steps
    hf = {"image_processor_type": "LlavaImageProcessor", "size": {"shortest_edge": 336},
          "crop_size": {"height": 336, "width": 336}, "resample": 3, "do_pad": True,
          "image_mean": list(cfg.image_mean), "image_std": list(cfg.image_std)}
    assert DripLlavaImageProcessor.from_dict(hf) == DripLlavaImageProcessor(336, cfg.image_mean, cfg.image_std, "pad")
    with pytest.raises(ValueError, match="differ"):
        DripLlavaImageProcessor.from_dict({**hf, "resample": 2})


def test_legacy_image_loader_arguments_use_the_same_steps(tower_model, tmp_path):
    """ImageLoader(folder, tower transform, aspect_ratio, image_mean) still works, through the processor's steps."""
    from drip_llava.data.dataset import ImageLoader

    _odd_image(tmp_path / "odd.png")
    proc = DripLlavaImageProcessor.from_vision_config(tower_model.config, "pad")
    legacy = ImageLoader(str(tmp_path), tower_model.preprocess, "pad", tower_model.config.image_mean)
    assert legacy.aspect_ratio == "pad" and torch.equal(legacy("odd.png"), ImageLoader(str(tmp_path), proc)("odd.png"))
    with pytest.raises(ValueError, match="fields of the DripLlavaImageProcessor"):
        ImageLoader(str(tmp_path), proc, "square")


@pytest.fixture
def seen_images(monkeypatch):
    """Every image tensor that reaches the DRIP encoder (training and inference alike)."""
    seen = []
    original = DripVisionModel.forward_features

    def record(self, pixel_values, *args, **kwargs):
        seen.extend(im.detach().float().cpu().clone() for im in pixel_values)
        return original(self, pixel_values, *args, **kwargs)

    monkeypatch.setattr(DripVisionModel, "forward_features", record)
    return seen


def test_same_pixels_in_training_serving_and_every_eval(tiny_llm_dir, tiny_drip_dir, tmp_path, seen_images):
    """Stage 1 trained with --image_aspect_ratio pad on a rotated RGBA image saves its processor; the chat engine,
    eval.generate, eval.rank_choices and eval.image_use then feed the model the very same tensor."""
    from drip_llava.eval import generate, image_use, rank_choices
    from drip_llava.inference import ChatEngine, GenerationSettings
    from drip_llava.model import load_pretrained_model
    from drip_llava.train.train import main as train

    images = tmp_path / "images"
    images.mkdir()
    path = _odd_image(images / "odd.png")
    tower = DripVisionModel.from_pretrained(str(tiny_drip_dir))
    expected = tower.preprocess(_expected_view(path, llava_pad_color(tower.config.image_mean)))

    def check(where, n_min=1, allowed=()):
        rows = list(seen_images)
        seen_images.clear()
        same = sum(torch.equal(r, expected) for r in rows)
        assert same >= n_min, f"{where}: {same} of {len(rows)} image tensors equal the expected pixels"
        assert all(torch.equal(r, expected) or any(torch.equal(r, a) for a in allowed) for r in rows), where

    records = [{"id": str(i), "image": "odd.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": "a picture"}]}
        for i in range(2)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    out = tmp_path / "stage1"
    train(["--model_name_or_path", str(tiny_llm_dir), "--vision_tower", str(tiny_drip_dir), "--data_path",
           str(tmp_path / "data.json"), "--image_folder", str(images), "--output_dir", str(out), "--report_to",
           "none", "--version", "plain", "--tune_mm_mlp_adapter", "True", "--image_aspect_ratio", "pad",
           "--per_device_train_batch_size", "2", "--max_steps", "1", "--save_steps", "1", "--use_cpu", "True"])
    check("training", n_min=2)
    for folder in (out, out / "checkpoint-1"):
        assert DripLlavaImageProcessor.from_pretrained(folder).aspect_ratio == "pad", folder

    loaded = load_pretrained_model(str(out), model_base=str(tiny_llm_dir), device="cpu")
    assert loaded.image_processor.aspect_ratio == "pad" and loaded.notes == []
    engine = ChatEngine(loaded)
    image, _ = engine.load_image(path)
    assert torch.equal(engine.pixel_values(image)[0], expected)
    engine.generate([{"role": "user", "content": "What is it?"}], image, GenerationSettings(0, None, 1))
    check("chat engine")

    (tmp_path / "q.jsonl").write_text(json.dumps({"question_id": 1, "image": "odd.png", "text": "What is it?"}) + "\n")
    generate.main(["--model-path", str(out), "--model-base", str(tiny_llm_dir), "--question-file",
                   str(tmp_path / "q.jsonl"), "--image-folder", str(images), "--answers-file",
                   str(tmp_path / "answers.jsonl"), "--temperature", "0", "--max-new-tokens", "1", "--device", "cpu"])
    check("eval.generate")

    sqa = tmp_path / "sqa"
    (sqa / "images" / "test" / "1").mkdir(parents=True)
    (sqa / "images" / "test" / "1" / "image.png").write_bytes(path.read_bytes())
    problem = {"question": "What is it?", "choices": ["a picture", "a sound"], "answer": 0, "hint": "",
               "image": "image.png", "split": "test"}
    (sqa / "problems.json").write_text(json.dumps({"1": problem}))
    (sqa / "pid_splits.json").write_text(json.dumps({"test": ["1"]}))
    rank_choices.main(["--base-dir", str(sqa), "--model-path", str(out), "--model-base", str(tiny_llm_dir),
                       "--answers-file", str(tmp_path / "ranked.jsonl"), "--conv-mode", "vicuna_v1",
                       "--device", "cpu"])
    check("eval.rank_choices")

    image_use.main(["--model-path", str(out), "--model-base", str(tiny_llm_dir), "--data-path",
                    str(tmp_path / "data.json"), "--image-folder", str(images), "--device", "cpu"])
    blank = image_use.blank_image(loaded.image_processor)
    check("eval.image_use", n_min=4, allowed=(blank,))  # right and wrong image: both odd.png here
