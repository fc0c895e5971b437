"""HF CLIP -> DRIP import (same hidden states as transformers' CLIP), HF CLIP folders as LLaVA vision towers,
and open_clip's QuickGELU choice for OpenAI-style pretrained tags (offline, no weights)."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from drip_llava.model.vision_tower import build_vision_tower
from drip_llava.vision import DripVisionModel
from drip_llava.vision.spec import load_drip_model

VISION = dict(hidden_size=32, intermediate_size=80, num_hidden_layers=3, num_attention_heads=2, image_size=32,
              patch_size=8, projection_dim=16)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=49408,
            max_position_embeddings=77)
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def randomize_(model: torch.nn.Module) -> torch.nn.Module:
    """HF zero-inits biases and unit-inits norms: randomise everything so every mapped tensor is checked."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = "norm" in name and name.endswith(".weight")
            p.copy_(torch.randn_like(p) * 0.1 + float(is_norm_scale))
    return model.eval()


def save_clip_vision(folder, act="quick_gelu", with_processor=True) -> CLIPVisionModel:
    model = randomize_(CLIPVisionModel(CLIPVisionConfig(**VISION, hidden_act=act)))
    model.save_pretrained(folder)
    if with_processor:
        CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=MEAN,
                           image_std=STD).save_pretrained(folder)
    return model


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hf_clip_vision_folder_gives_the_same_hidden_states(tmp_path, act):
    hf = save_clip_vision(tmp_path, act)
    drip = DripVisionModel.from_hf_clip(tmp_path).eval()
    c = drip.config
    assert (c.act, c.compression, c.class_token, c.image_size, c.patch_size, c.depth) == (act, 1.0, True, 32, 8, 3)
    assert c.image_mean == pytest.approx(MEAN) and c.image_std == pytest.approx(STD) and c.mlp_ratio == 2.5
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=x, output_hidden_states=True)
        out = drip.forward_features(x, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    for a, b in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cls_token, ref.pooler_output, atol=1e-5, rtol=1e-5)  # post_layernorm(CLS)


def test_hf_clip_model_pooled_embedding_matches_get_image_features(tmp_path):
    hf = randomize_(CLIPModel(CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=16)))
    hf.save_pretrained(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=x)
        ref = getattr(ref, "pooler_output", ref)
        for src in (tmp_path, hf):  # a folder and an instance
            drip = DripVisionModel.from_hf_clip(src).eval()
            assert drip.config.embed_dim == 16
            torch.testing.assert_close(drip(x).pooled, ref, atol=1e-5, rtol=1e-5)


def test_compression_override_adds_a_fresh_predictor_on_the_pretrained_vit(tmp_path):
    save_clip_vision(tmp_path)
    plain = DripVisionModel.from_hf_clip(tmp_path)
    drip = load_drip_model(str(tmp_path), compression=4.0, n_pre=1)  # the vision_tower spec path
    assert drip.config.is_drip and drip.boundary_predictor is not None and drip.config.act == "quick_gelu"
    ref = plain.state_dict()
    for k, v in drip.state_dict().items():
        if not k.startswith(("boundary_predictor.", "proj.")):  # a CLIPVisionModel has no projection
            torch.testing.assert_close(v, ref[k], atol=0, rtol=0)
    out = drip.eval()(torch.randn(2, 3, 32, 32))
    assert out.features.shape[1] <= 16 and out.num_tokens.min() >= 1
    # DRIP fields from a preset, shape checked against the checkpoint
    with pytest.raises(ValueError, match="does not match the CLIP tower"):
        DripVisionModel.from_hf_clip(tmp_path, preset="drip-l-14-4x")


def test_hf_clip_folder_as_llava_vision_tower(tmp_path):
    hf = save_clip_vision(tmp_path)
    tower = build_vision_tower(str(tmp_path), select_layer=-2)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, mask = tower(x)
        ref = hf(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]  # LLaVA: patch tokens, block -2
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-5)
    assert mask.all() and tower.max_tokens == 16
    img = tower.image_processor  # preprocessing follows the folder's preprocessor_config.json
    normalize = img.transforms[-1]
    assert list(normalize.mean) == pytest.approx(MEAN) and list(normalize.std) == pytest.approx(STD)


def test_unsupported_activation_is_an_error(tmp_path):
    save_clip_vision(tmp_path, with_processor=False)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu"}))
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        DripVisionModel.from_hf_clip(tmp_path)


# ---------------------------------------------------------------------------------------- open_clip QuickGELU
def test_open_clip_openai_tag_asks_for_quick_gelu():
    from drip_llava.vision.open_clip_import import open_clip_create_kwargs

    assert open_clip_create_kwargs("ViT-L-14-336", "openai") == {"force_quick_gelu": True}
    assert open_clip_create_kwargs("ViT-L-14-336-quickgelu", "openai") == {}  # already QuickGELU
    assert open_clip_create_kwargs("ViT-B-32", "laion2b_s34b_b79k") == {}  # trained with GELU
    assert open_clip_create_kwargs("ViT-B-32", None) == {}


def test_open_clip_spec_with_openai_tag_builds_quick_gelu(monkeypatch):
    """`open_clip:ViT-B-32:openai` through the vision-tower spec path, weights replaced by a random init: the
    activation chosen is QuickGELU (open_clip's plain config alone would build GELU and only warn)."""
    open_clip = pytest.importorskip("open_clip")
    calls = []
    original = open_clip.create_model

    def offline_create_model(name, pretrained=None, **kwargs):
        calls.append((name, pretrained, kwargs))
        return original(name, pretrained=None, **kwargs)  # same config path, no download

    monkeypatch.setattr(open_clip, "create_model", offline_create_model)
    drip = load_drip_model("open_clip:ViT-B-32:openai")
    assert calls == [("ViT-B-32", "openai", {"force_quick_gelu": True})]
    assert drip.config.act == "quick_gelu"


# ---------------------------------------------------------------------------------------- CLIP trainer init
def test_hf_clip_text_tower_matches_get_text_features(tmp_path):
    """The text half of an HF CLIPModel as open_clip's TextTransformer in DripCLIP: same tokens, same embedding."""
    import open_clip

    from vision_pretrain.clip_model import DripCLIP, text_init_from_hf_clip

    hf = randomize_(CLIPModel(CLIPConfig(vision_config=VISION, text_config=TEXT, projection_dim=16)))
    hf.save_pretrained(tmp_path)
    init = text_init_from_hf_clip(tmp_path)
    assert init.cfg["quick_gelu"] and init.cfg["context_length"] == 77 and init.cfg["width"] == 32
    model = DripCLIP(DripVisionModel.from_hf_clip(tmp_path), init.cfg).eval()
    model.load_text_init(init)
    tokens = open_clip.SimpleTokenizer(context_length=77)(["a red circle", "two small blue squares on grass"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref_t, ref_i = hf.get_text_features(input_ids=tokens), hf.get_image_features(pixel_values=x)
        ref_t, ref_i = getattr(ref_t, "pooler_output", ref_t), getattr(ref_i, "pooler_output", ref_i)
        torch.testing.assert_close(model.encode_text(tokens), ref_t, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_image(x), ref_i, atol=1e-5, rtol=1e-5)
    assert model.logit_scale.item() == pytest.approx(hf.logit_scale.item())
