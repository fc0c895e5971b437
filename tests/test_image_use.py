"""drip_llava.eval.image_use: the wrong-image gap is ~0 for a model that ignores the image and clearly positive
once a tiny model has learned an answer only the image gives."""
import json

import torch
from PIL import Image

from drip_llava.data.dataset import DataCollatorForSupervisedDataset, ImageLoader, LazySupervisedDataset
from drip_llava.data.image_processor import DripLlavaImageProcessor
from drip_llava.eval import image_use
from drip_llava.model import DripLlavaForCausalLM

COLOURS = {"Red": (220, 30, 30), "Blue": (35, 65, 225)}


def _data(folder, n=16):
    """Flat red / blue images, alternating, so every sample's "wrong" image (the next one) has the other colour."""
    records = []
    for i in range(n):
        name = list(COLOURS)[i % 2]
        Image.new("RGB", (128, 128), COLOURS[name]).save(folder / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the image?"}, {"from": "gpt", "value": name}]})
    return records


def test_gap_grows_when_the_answer_needs_the_image(tiny_llm_dir, tiny_drip_dir, tmp_path, fit_batch):
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(tiny_llm_dir))
    model = DripLlavaForCausalLM.from_pretrained(str(tiny_llm_dir))
    model.initialize_vision_modules(str(tiny_drip_dir), "mlp2x_gelu", select_layer=-2)
    records = _data(tmp_path)
    (tmp_path / "data.json").write_text(json.dumps(records))
    tower = model.get_vision_tower()
    loader = ImageLoader(str(tmp_path), DripLlavaImageProcessor.from_vision_config(tower.config, "pad"))
    ds = LazySupervisedDataset(records, tok, "chat_template", loader, 128, skip_bad_samples=False)
    collate = DataCollatorForSupervisedDataset(pad_token_id=tok.pad_token_id)

    before = image_use.image_use(model, ds, collate, batch_size=8)
    assert abs(before["gap_wrong"]) < 0.2, before
    assert before["samples"] == 16 and before["tokens"] >= 16

    fit_batch(model, collate([ds[i] for i in range(len(ds))]))
    after = image_use.image_use(model, ds, collate, batch_size=8)
    # right image: the colour is known; wrong image: the other colour is predicted, confidently
    assert after["loss"]["right"] < 0.5 * before["loss"]["right"], (before, after)
    assert after["gap_wrong"] > 1.0, after
    assert after["gap_wrong"] > before["gap_wrong"] + 1.0


def test_cli_reads_the_template_from_the_checkpoint(tiny_llm_dir, tiny_drip_dir, tmp_path):
    model = DripLlavaForCausalLM.from_pretrained(str(tiny_llm_dir))
    model.initialize_vision_modules(str(tiny_drip_dir), "mlp2x_gelu", select_layer=-2)
    out = tmp_path / "stage1"
    model.save_mm_projector(out)
    (out / "drip_llava_args.json").write_text(json.dumps({"model": {"version": "plain"}}))
    (tmp_path / "img").mkdir()
    (tmp_path / "val.json").write_text(json.dumps(_data(tmp_path / "img", n=4)))
    res = image_use.main(["--model-path", str(out), "--model-base", str(tiny_llm_dir), "--data-path",
                          str(tmp_path / "val.json"), "--image-folder", str(tmp_path / "img"), "--device", "cpu",
                          "--json", str(tmp_path / "gap.json")])
    assert res["version"] == "plain" and res["samples"] == 4
    assert json.loads((tmp_path / "gap.json").read_text())["gap_wrong"] == res["gap_wrong"]
