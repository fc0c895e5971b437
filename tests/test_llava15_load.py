"""LLaVA-1.5 checkpoints (transformers' llava-hf layout and haotian-liu/LLaVA's own) load into DripLlavaForCausalLM
with the CLIP tower as DRIP at compression 1, and answer as the originals: logits within 1e-4, same greedy tokens.

Tiny random models from configs. transformers' LlavaForConditionalGeneration expands "<image>" to one image token
per patch ahead of time; DripLlava takes one placeholder and splices at run time: the same text tokens, so the
spliced sequences line up position by position."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from drip_llava.constants import IMAGE_TOKEN_INDEX
from drip_llava.data.conversation import build_prompt, tokenizer_image_token
from drip_llava.model.builder import detect_checkpoint_kind, load_pretrained_model
from drip_llava.model.llava_llama import DripLlavaForCausalLM

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
              patch_size=8, projection_dim=16, hidden_act="quick_gelu")  # 16 patches
N_PATCHES = 16
LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
             max_position_embeddings=256, vocab_size=49216)
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
GEN = dict(max_new_tokens=6, do_sample=False)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere (HF zero-inits biases) so every converted tensor matters."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + float("norm" in name and name.endswith(".weight")))
    return model.eval()


def save_processor(folder) -> None:
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=MEAN,
                       image_std=STD).save_pretrained(folder)


@pytest.fixture(scope="module")
def llava_tokenizer(embedded_tokenizer_dir):
    """The real tokenizer with an added "<image>" token, as llava-hf folders have (id 49152 here, 32000 there)."""
    tok = AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir))
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def prompt_ids(tok) -> torch.Tensor:
    prompt = build_prompt("vicuna_v1", [{"role": "user", "content": "<image>\nWhat is in the picture?"}], tok)
    ids = tokenizer_image_token(prompt, tok)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1  # the added "<image>" token never reaches the ids: one placeholder
    return torch.tensor([ids])


def expand_placeholder(ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """transformers' input: the placeholder replaced by one image token per patch (what LlavaProcessor does)."""
    row = ids[0].tolist()
    p = row.index(IMAGE_TOKEN_INDEX)
    return torch.tensor([row[:p] + [image_token_id] * N_PATCHES + row[p + 1:]])


def assert_same_answers(loaded, ref_logits: torch.Tensor, ref_tokens: torch.Tensor, ids, pixels) -> None:
    model = loaded.model
    with torch.no_grad():
        logits = model(input_ids=ids, images=pixels).logits
        tokens = model.generate(ids, images=pixels, attention_mask=torch.ones_like(ids), **GEN)
    assert logits.shape == ref_logits.shape
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    assert tokens.tolist() == ref_tokens.tolist()


# ------------------------------------------------------------------------------------------------ llava-hf
@pytest.fixture(scope="module")
def llava_hf_dir(tmp_path_factory, llava_tokenizer):
    folder = tmp_path_factory.mktemp("llava_hf")
    image_token = llava_tokenizer.convert_tokens_to_ids("<image>")
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**VISION), text_config=LlamaConfig(**LLAMA),
                      image_token_index=image_token, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", image_seq_length=N_PATCHES)
    model = randomize_(LlavaForConditionalGeneration(cfg))
    model.generation_config.pad_token_id = llava_tokenizer.pad_token_id
    model.save_pretrained(folder)
    llava_tokenizer.save_pretrained(folder)
    save_processor(folder)
    return folder


def test_llava_hf_folder_gives_transformers_answers(llava_hf_dir, llava_tokenizer):
    assert detect_checkpoint_kind(llava_hf_dir) == "llava_hf"
    loaded = load_pretrained_model(llava_hf_dir, device="cpu", torch_dtype=torch.float32)
    assert loaded.kind == "llava_hf" and isinstance(loaded.model, DripLlavaForCausalLM)
    tower = loaded.model.get_vision_tower().config
    assert (tower.compression, tower.act, tower.class_token, loaded.model.config.mm_vision_select_layer) == \
        (1.0, "quick_gelu", True, -2)
    assert tower.image_mean == pytest.approx(MEAN) and tower.image_std == pytest.approx(STD)
    assert loaded.model.config.conv_mode == "vicuna_v1"

    ref = LlavaForConditionalGeneration.from_pretrained(str(llava_hf_dir), dtype=torch.float32).eval()
    ids = prompt_ids(loaded.tokenizer)
    hf_ids = expand_placeholder(ids, ref.config.image_token_id)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref_logits = ref(input_ids=hf_ids, pixel_values=pixels).logits
        ref_tokens = ref.generate(input_ids=hf_ids, pixel_values=pixels, attention_mask=torch.ones_like(hf_ids),
                                  **GEN)[:, hf_ids.shape[1]:]
    assert_same_answers(loaded, ref_logits, ref_tokens, ids, pixels)


def test_llava_hf_in_transformers5_key_spelling(llava_hf_dir, tmp_path):
    """The same weights under transformers 5's module names (model.language_model.*, model.vision_tower.*)."""
    from safetensors.torch import load_file, save_file

    for f in llava_hf_dir.iterdir():
        if f.name != "model.safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    state = load_file(str(llava_hf_dir / "model.safetensors"))
    renamed = {}
    for k, v in state.items():
        k = k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head.", "lm_head.")
        for mod in ("vision_tower.", "multi_modal_projector."):
            if k.startswith(mod):
                k = "model." + k
        renamed[k] = v
    save_file(renamed, str(tmp_path / "model.safetensors"))
    a = load_pretrained_model(llava_hf_dir, device="cpu", torch_dtype=torch.float32).model.state_dict()
    b = load_pretrained_model(tmp_path, device="cpu", torch_dtype=torch.float32).model.state_dict()
    for k in a:
        if not k.startswith("vision_tower.model.proj."):  # no CLIP projection: a fresh (unused) tensor
            torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)


def test_converted_folder_reloads_as_full(llava_hf_dir, tmp_path):
    from drip_llava.model.convert_llava import main

    main([str(llava_hf_dir), str(tmp_path / "out"), "--dtype", "float32"])
    assert detect_checkpoint_kind(tmp_path / "out") == "full"
    a = load_pretrained_model(llava_hf_dir, device="cpu", torch_dtype=torch.float32).model
    b = load_pretrained_model(tmp_path / "out", device="cpu", torch_dtype=torch.float32)
    ids, pixels = prompt_ids(b.tokenizer), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(b.model(input_ids=ids, images=pixels).logits,
                                   a(input_ids=ids, images=pixels).logits, atol=0, rtol=0)
    assert b.model.config.conv_mode == "vicuna_v1"
    img = Image.new("RGB", (40, 24), (200, 30, 60))
    torch.testing.assert_close(b.image_processor(img), load_pretrained_model(llava_hf_dir, device="cpu")
                               .image_processor(img), atol=0, rtol=0)  # same preprocessing as the source


# ------------------------------------------------------------------------------------------------ upstream LLaVA
UPSTREAM_EXTRA = {"model_type": "llava_llama", "architectures": ["LlavaLlamaForCausalLM"],
                  "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu",
                  "mm_hidden_size": 32, "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
                  "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat",
                  "image_aspect_ratio": "pad", "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False,
                  "use_mm_proj": True, "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right"}


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, embedded_tokenizer_dir):
    """(llava folder, CLIP folder, reference forward): LlavaLlamaForCausalLM's files (two .bin shards + index,
    no tower weights) beside openai/clip-vit-large-patch14-336's (a CLIPModel folder), tiny and random."""
    root = tmp_path_factory.mktemp("upstream")
    clip_dir, llava_dir = root / "clip", root / "llava"
    clip = randomize_(CLIPModel(CLIPConfig(vision_config=VISION, text_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2), projection_dim=16)))
    clip.save_pretrained(clip_dir)
    save_processor(clip_dir)
    llama = randomize_(LlamaForCausalLM(LlamaConfig(**{**LLAMA, "vocab_size": 49152})), seed=1)
    torch.manual_seed(2)
    proj = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 32)).eval()
    state = {**llama.state_dict(), **{f"model.mm_projector.{k}": v for k, v in proj.state_dict().items()}}
    llava_dir.mkdir()
    shards = {"pytorch_model-00001-of-00002.bin": {k: v for k, v in state.items() if "layers.1." not in k},
              "pytorch_model-00002-of-00002.bin": {k: v for k, v in state.items() if "layers.1." in k}}
    for name, part in shards.items():
        torch.save({k: v.clone() for k, v in part.items()}, llava_dir / name)
    (llava_dir / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}))
    (llava_dir / "config.json").write_text(json.dumps({**llama.config.to_dict(), **UPSTREAM_EXTRA}))
    AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir)).save_pretrained(llava_dir)

    vision = CLIPVisionModel.from_pretrained(str(clip_dir)).eval()

    def reference(ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """haotian-liu/LLaVA's forward: CLIP hidden_states[-2] without CLS -> projector -> spliced -> Llama."""
        feats = proj(vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:])[0]
        row = ids[0].tolist()
        p = row.index(IMAGE_TOKEN_INDEX)
        emb = llama.get_input_embeddings()
        embeds = torch.cat([emb(ids[:, :p])[0], feats, emb(ids[:, p + 1:])[0]])[None]
        return llama(inputs_embeds=embeds).logits

    return llava_dir, clip_dir, reference


def test_upstream_hub_tower_name_needs_a_local_folder(upstream):
    llava_dir, clip_dir, _ = upstream
    assert detect_checkpoint_kind(llava_dir) == "llava_upstream"
    with pytest.raises(FileNotFoundError, match="openai/clip-vit-large-patch14-336.*huggingface-cli download.*"
                                                "vision_tower=DIR"):
        load_pretrained_model(llava_dir, device="cpu", torch_dtype=torch.float32)


def test_upstream_with_another_tower_width_is_refused(upstream, tmp_path):
    llava_dir, _, _ = upstream
    CLIPVisionModel(CLIPVisionConfig(**{**VISION, "hidden_size": 48})).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="mm_hidden_size mismatch.*width 32.*width 48"):
        load_pretrained_model(llava_dir, device="cpu", vision_tower=tmp_path)


def test_upstream_folder_gives_llavas_answers(upstream):
    llava_dir, clip_dir, reference = upstream
    loaded = load_pretrained_model(llava_dir, device="cpu", torch_dtype=torch.float32, vision_tower=clip_dir)
    assert loaded.kind == "llava_upstream"
    cfg = loaded.model.config
    assert (cfg.mm_projector_type, cfg.conv_mode, cfg.image_aspect_ratio, cfg.vision_config["act"]) == \
        ("mlp2x_gelu", "vicuna_v1", "pad", "quick_gelu")
    ids, pixels = prompt_ids(loaded.tokenizer), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref_logits = reference(ids, pixels)
        ref_tokens = []  # greedy decoding by re-running the reference on the growing sequence
        seq = ids
        for _ in range(GEN["max_new_tokens"]):
            nxt = reference(seq, pixels)[:, -1].argmax(-1, keepdim=True)
            ref_tokens.append(int(nxt))
            if int(nxt) == loaded.tokenizer.eos_token_id:
                break
            seq = torch.cat([seq, nxt], dim=1)
    assert_same_answers(loaded, ref_logits, torch.tensor([ref_tokens]), ids, pixels)


def test_upstream_relative_tower_path(upstream, tmp_path):
    """mm_vision_tower as a path relative to the checkpoint folder resolves without an override."""
    llava_dir, clip_dir, _ = upstream
    for f in llava_dir.iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "clip").symlink_to(clip_dir, target_is_directory=True)
    cfg = json.loads((llava_dir / "config.json").read_text())
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "mm_vision_tower": "clip"}))
    loaded = load_pretrained_model(tmp_path, device="cpu", torch_dtype=torch.float32)
    assert loaded.model.config.mm_vision_tower == str(tmp_path / "clip")


def test_upstream_checkpoint_with_its_own_tower_weights(upstream, tmp_path):
    """A checkpoint trained with an unfrozen tower saves it (model.vision_tower.vision_tower.vision_model.*):
    those weights win over the CLIP folder's, which then only supplies the tower's config and preprocessing."""
    llava_dir, clip_dir, _ = upstream
    own = randomize_(CLIPVisionModel(CLIPVisionConfig(**VISION)), seed=5)
    state = {}
    for f in sorted(llava_dir.glob("*.bin")):
        state.update(torch.load(f, weights_only=True))
    state.update({f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in own.state_dict().items()})
    torch.save(state, tmp_path / "pytorch_model.bin")
    for f in llava_dir.iterdir():
        if f.suffix != ".bin" and f.name != "pytorch_model.bin.index.json":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    loaded = load_pretrained_model(tmp_path, device="cpu", torch_dtype=torch.float32, vision_tower=clip_dir)
    assert "vision tower weights from the checkpoint" in loaded.notes
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, _ = loaded.model.get_vision_tower()(x)
        ref = own(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [[], ["compression=4", "n_pre=1"]])
def test_hf_clip_folder_as_stage1_tower(upstream, tiny_llm_dir, tmp_path, overrides):
    """The trainer's `--vision_tower CLIP_FOLDER [--vision_override compression=4 n_pre=1]`: the unmodified CLIP
    (the baseline) or DRIP on its ViT; the stage-1 output folder reloads with the same tower."""
    from drip_llava.train.params import parse_args
    from drip_llava.train.recipes import get_recipe

    _, clip_dir, _ = upstream
    data = tmp_path / "data.json"
    data.write_text("[]")
    argv = ["--model_name_or_path", str(tiny_llm_dir), "--vision_tower", str(clip_dir), "--data_path", str(data),
            "--output_dir", str(tmp_path / "out"), "--tune_mm_mlp_adapter", "True", "--use_cpu", "True"]
    if overrides:
        argv += ["--vision_override", *overrides]
    model_args, data_args, training_args = parse_args(argv)
    model = get_recipe("stage1", model_args, data_args, training_args).load_model()
    vc = model.config.vision_config
    assert (vc["compression"], vc["act"], vc["image_size"]) == (4.0 if overrides else 1.0, "quick_gelu", 32)
    assert (model.vision_tower.model.boundary_predictor is not None) == bool(overrides)
    model.save_mm_projector(tmp_path / "stage1")
    loaded = load_pretrained_model(tmp_path / "stage1", model_base=tiny_llm_dir, device="cpu",
                                   torch_dtype=torch.float32)
    assert loaded.kind == "projector"
    a, b = model.vision_tower.state_dict(), loaded.model.vision_tower.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
