"""drip_llava.model: tower wrapper, projectors, splicing, generate with/without cache, save/load, builder."""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from drip_llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from drip_llava.model import (
    DripLlavaConfig,
    DripLlavaForCausalLM,
    build_projector,
    build_vision_tower,
    detect_checkpoint_kind,
    list_projectors,
    load_pretrained_model,
    register_projector,
)
from drip_llava.model.projector import load_projector_weights, save_projector

IMG = 128  # drip-tiny-16 image size


@pytest.fixture(scope="module")
def llava(tiny_llm_dir, tiny_drip_dir):
    model = DripLlavaForCausalLM.from_pretrained(str(tiny_llm_dir))
    model.initialize_vision_modules(str(tiny_drip_dir), "mlp2x_gelu", select_layer=-2)
    return model.eval()


@pytest.fixture(scope="module")
def images(llava):
    """4 images whose token counts differ (checked), so padding inside the batch is real."""
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(16, 3, IMG, IMG, generator=g)
    imgs[8:] = imgs[8:] * 0.2 + torch.linspace(-2, 2, IMG)[None, None, :]  # smoother images: other counts
    with torch.no_grad():
        counts = [t.shape[0] for t in llava.encode_images(imgs)]
    order = sorted(range(16), key=lambda i: counts[i])
    pick = [order[0], order[-1], order[5], order[10]]
    assert len({counts[i] for i in pick}) >= 3, counts
    return imgs[pick]


def _sample(ids_text, image_at=None):
    ids = list(ids_text)
    if image_at is not None:
        ids.insert(image_at, IMAGE_TOKEN_INDEX)
    return torch.tensor(ids)


def _batch(samples, pad_id, side="right"):
    T = max(len(s) for s in samples)
    ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(samples), T, dtype=torch.long)
    for i, s in enumerate(samples):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    labels = ids.clone()
    labels[mask == 0] = IGNORE_INDEX
    labels[ids == IMAGE_TOKEN_INDEX] = IGNORE_INDEX
    return ids, mask, labels


def _per_sample_loss(logits, labels):
    """Mean next-token CE per row, ignoring IGNORE_INDEX (what HF's loss does for a batch of one)."""
    lg, lb = logits[:, :-1].float(), labels[:, 1:]
    ce = F.cross_entropy(lg.transpose(1, 2), lb, ignore_index=IGNORE_INDEX, reduction="none")
    n = (lb != IGNORE_INDEX).sum(1)
    return ce.sum(1) / n


SAMPLES = [
    (list(range(100, 112)), 3),  # image after 3 tokens
    (list(range(200, 205)), 0),  # image first, short text
    (list(range(300, 320)), None),  # text only, longest text
    (list(range(400, 407)), 7),  # image last
]


# ---------------------------------------------------------------------------------------------- tokenizer

def test_embedded_tokenizer_facts(embedded_tokenizer_dir, tiny_llm_dir):
    from transformers import AutoTokenizer

    for d in (embedded_tokenizer_dir, tiny_llm_dir):
        tok = AutoTokenizer.from_pretrained(str(d))
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
        assert len(tok) == 49152
        assert tok("Hello world").input_ids == [19556, 905]  # no BOS is prepended
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nhi<|im_end|>\n"
                                                                          "<|im_start|>assistant\n")
        assert tok.model_max_length == 8192
    cfg = json.loads((tiny_llm_dir / "config.json").read_text())
    assert cfg["pad_token_id"] == 2 and cfg["eos_token_id"] == 2 and cfg["vocab_size"] == 49152


# ---------------------------------------------------------------------------------------------- tower

def test_tower_variable_tokens_frozen_and_batch_independent(llava, images):
    tower = llava.vision_tower
    assert tower.hidden_size == 192 and tower.layer_index == 5  # depth 6, select -2
    llava.train()
    try:
        assert not tower.model.training, "a frozen tower must stay in eval mode (deterministic boundaries)"
        feats, mask = tower(images)
        assert not feats.requires_grad and not any(p.requires_grad for p in tower.parameters())
    finally:
        llava.eval()
    counts = mask.sum(1).tolist()
    assert feats.shape == (4, max(counts), 192) and len(set(counts)) >= 3
    assert max(counts) < tower.config.num_patches  # pooled tokens, not patches
    alone, mask1 = tower(images[1:2])
    assert torch.allclose(alone[0][mask1[0]], feats[1][mask[1]], atol=1e-5)


def test_select_layer_before_pooling_is_an_error():
    with pytest.raises(ValueError, match="before DRIP's pooling"):
        build_vision_tower("drip-tiny-16-4x", select_layer=2)  # n_pre = 2
    with pytest.raises(ValueError, match="out of range"):
        build_vision_tower("drip-tiny-16-4x", select_layer=7)
    assert build_vision_tower("drip-tiny-16-4x", select_layer=-4).layer_index == 3  # first block after pooling
    vit = build_vision_tower("vit-tiny-16", select_layer=1)  # a plain ViT: every block is fine
    feats, mask = vit(torch.zeros(2, 3, IMG, IMG))
    assert feats.shape == (2, 64, 192) and bool(mask.all())
    with pytest.raises(ValueError, match="valid presets"):
        build_vision_tower("no-such-tower")


def test_open_clip_vit_tower_is_the_plain_llava_baseline(tiny_llm_dir):
    """An open_clip ViT goes through the same code: all patch tokens of block -2, equal to open_clip's own."""
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=32, patch_size=8, width=64, layers=3, heads=2, mlp_ratio=4.0,
                            output_dim=32).eval()
    x = torch.randn(2, 3, 32, 32)
    tower = build_vision_tower(vit, select_layer=-2)
    feats, mask = tower(x)
    ref = vit.forward_intermediates(x, indices=[1], intermediates_only=True, output_fmt="NLC")["image_intermediates"][0]
    assert feats.shape == (2, 16, 64) and bool(mask.all()) and tower.config.compression == 1.0
    assert torch.allclose(feats, ref, atol=1e-5)
    model = DripLlavaForCausalLM.from_pretrained(str(tiny_llm_dir))
    model.initialize_vision_modules(vit, "linear")
    assert [t.shape for t in model.encode_images(x)] == [(16, 64), (16, 64)]


def test_embedded_smollm2_answers_through_drip_llava():
    """The real embedded LLM (converted once from the GGUF) inside DripLlava: text-only generation still works."""
    from transformers import AutoTokenizer

    from drip_demo.embedded_llm import prepare_embedded_llm

    path = prepare_embedded_llm()
    assert prepare_embedded_llm() == path  # reused, not rebuilt
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["hidden_size"] == 576 and "quantization_config" not in cfg
    tok = AutoTokenizer.from_pretrained(str(path))
    model = DripLlavaForCausalLM.from_pretrained(str(path)).eval()
    model.initialize_vision_modules("drip-tiny-16-4x", "mlp2x_gelu")
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = torch.tensor([tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)["input_ids"]])
    new = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(new[0], skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------- projector

def test_projector_registry():
    mlp = build_projector("mlp3x_gelu", 192, 64)
    assert [type(m) for m in mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert mlp[0].in_features == 192 and mlp[-1].out_features == 64
    assert isinstance(build_projector("linear", 192, 64), nn.Linear)
    x = torch.randn(3, 64)
    assert torch.equal(build_projector("identity", 64, 64)(x), x)
    with pytest.raises(ValueError, match="equal widths"):
        build_projector("identity", 192, 64)
    with pytest.raises(ValueError, match=r"valid: .*linear.*mlp\{N\}x_gelu"):
        build_projector("mlp2x_relu", 192, 64)
    assert {"linear", "identity", "mlp{N}x_gelu"} <= set(list_projectors())
    with pytest.raises(ValueError, match="already registered"):
        register_projector("linear")(lambda a, b: nn.Linear(a, b))


def test_projector_width_mismatch_names_both_widths(tmp_path, llava):
    proj = build_projector("mlp2x_gelu", 192, 64)
    path = save_projector(proj, tmp_path, kind="mlp2x_gelu", mm_hidden_size=192, hidden_size=64)
    with pytest.raises(ValueError, match=r"mm_hidden_size mismatch.*width 192.*width 96"):
        load_projector_weights(build_projector("mlp2x_gelu", 96, 64), path, 96, 64)
    # LLaVA's own .bin (no metadata, prefixed keys): widths are read from the weights
    torch.save({f"model.mm_projector.{k}": v for k, v in proj.state_dict().items()}, tmp_path / "mm_projector.bin")
    with pytest.raises(ValueError, match=r"width 192.*width 96"):
        load_projector_weights(build_projector("mlp2x_gelu", 96, 64), tmp_path / "mm_projector.bin", 96, 64)
    fresh = build_projector("mlp2x_gelu", 192, 64)
    load_projector_weights(fresh, tmp_path / "mm_projector.bin", 192, 64)
    assert torch.equal(fresh[0].weight, proj[0].weight)
    # The same through the model: a stage-1 projector next to another tower (width 96).
    other = DripLlavaForCausalLM(copy.deepcopy(llava.config))
    with pytest.raises(ValueError, match=r"mm_hidden_size mismatch.*192.*96"):
        other.initialize_vision_modules({**llava.vision_tower.config.to_dict(), "hidden_size": 96},
                                        "mlp2x_gelu", pretrain_mm_mlp_adapter=path)
    assert other.config.mm_hidden_size == 192 and other.vision_tower.hidden_size == 192  # left as it was


# ---------------------------------------------------------------------------------------------- splicing

def test_batch_loss_equals_each_sample_alone(llava, images):
    """Different token counts per image + a text-only sample: padding must not leak into any sample."""
    pad = llava.config.pad_token_id
    samples = [_sample(t, at) for t, at in SAMPLES]
    ids, mask, labels = _batch(samples, pad)
    with torch.no_grad():
        out = llava(input_ids=ids, attention_mask=mask, labels=labels, images=images)
        _, new_mask, _, new_labels = llava.prepare_inputs_labels_for_multimodal(ids, mask, labels, images)
        batch_losses = _per_sample_loss(out.logits, new_labels)
        counts = [t.shape[0] for t in llava.encode_images(images)]
        for i, (t, at) in enumerate(SAMPLES):
            has_img = at is not None
            n_img = counts[i] if has_img else 0
            assert int(new_mask[i].sum()) == len(t) + n_img  # placeholder replaced by n_i tokens
            assert int((new_labels[i] == IGNORE_INDEX).sum()) - int((new_mask[i] == 0).sum()) == n_img
            s_ids, s_mask, s_labels = _batch([samples[i]], pad)
            single = llava(input_ids=s_ids, attention_mask=s_mask, labels=s_labels,
                           images=images[i:i + 1] if has_img else None)
            assert torch.allclose(batch_losses[i], single.loss, atol=1e-5), (i, batch_losses[i], single.loss)
        # One image per placeholder (instead of one per sample) gives the same batch.
        only = torch.stack([images[i] for i, (_, at) in enumerate(SAMPLES) if at is not None])
        out2 = llava(input_ids=ids, attention_mask=mask, labels=labels, images=only)
    assert torch.allclose(out.loss, out2.loss, atol=1e-6)


def test_training_loss_on_supervised_positions_equals_full_logits_loss(llava, images):
    """Training computes the LM head only where labels are supervised: same loss and gradients as the full-logits
    loss of LlamaForCausalLM, also with the Trainer's num_items_in_batch (gradient accumulation)."""
    pad = llava.config.pad_token_id
    ids, mask, labels = _batch([_sample(t, at) for t, at in SAMPLES], pad)
    labels[:, :4] = IGNORE_INDEX  # a prompt part, as in LLaVA data
    proj = list(llava.mm_projector.parameters())

    def loss_and_grads(train: bool, **kw):
        llava.train(train)
        llava.zero_grad()
        out = llava(input_ids=ids, attention_mask=mask, labels=labels, images=images, **kw)
        out.loss.backward()
        return out, [p.grad.clone() for p in proj]

    try:
        ref, ref_g = loss_and_grads(False)
        fast, fast_g = loss_and_grads(True)
        assert ref.logits is not None and fast.logits is None
        assert torch.allclose(fast.loss, ref.loss, atol=1e-5), (fast.loss, ref.loss)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(fast_g, ref_g))
        n = torch.tensor(50)
        ref_n, _ = loss_and_grads(False, num_items_in_batch=n)
        fast_n, _ = loss_and_grads(True, num_items_in_batch=n)
        assert torch.allclose(fast_n.loss, ref_n.loss, atol=1e-5) and not torch.allclose(fast_n.loss, fast.loss)
    finally:
        llava.zero_grad()
        llava.eval()


def test_placeholder_errors(llava, images):
    two = torch.tensor([[5, IMAGE_TOKEN_INDEX, 6, IMAGE_TOKEN_INDEX]])
    with torch.no_grad(), pytest.raises(ValueError, match=r"samples \[0\].*exactly one"):
        llava(input_ids=two, images=images[:1])
    with torch.no_grad(), pytest.raises(ValueError, match="images=None"):
        llava(input_ids=torch.tensor([[5, IMAGE_TOKEN_INDEX, 6]]))
    with torch.no_grad(), pytest.raises(ValueError, match="3 images for a batch of 2"):
        llava(input_ids=torch.tensor([[5, IMAGE_TOKEN_INDEX], [6, IMAGE_TOKEN_INDEX]]), images=images[:3])


def test_text_only_batch_keeps_projector_in_graph(llava, images):
    pad = llava.config.pad_token_id
    llava.train()
    try:
        for with_image in (False, True):
            llava.zero_grad(set_to_none=True)
            samples = [_sample(SAMPLES[2][0])] + ([_sample(*SAMPLES[0])] if with_image else [])
            ids, mask, labels = _batch(samples, pad)
            llava(input_ids=ids, attention_mask=mask, labels=labels,
                  images=images[:2] if with_image else None).loss.backward()
            grads = [p.grad for p in llava.mm_projector.parameters()]
            assert all(g is not None for g in grads), "every projector param must be in the graph"
            total = sum(float(g.abs().sum()) for g in grads)
            assert (total > 0) == with_image
            assert all(p.grad is None for p in llava.vision_tower.parameters())  # frozen tower
    finally:
        llava.zero_grad(set_to_none=True)
        llava.eval()


# ---------------------------------------------------------------------------------------------- generate

def test_generate_with_cache_equals_without(llava, images):
    pad = llava.config.pad_token_id
    llava = copy.deepcopy(llava)
    torch.manual_seed(1)
    with torch.no_grad():  # make the random tiny LLM less repetitive so the comparison means something
        for p in llava.model.layers.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    samples = [_sample(*SAMPLES[0]), _sample(*SAMPLES[2]), _sample(*SAMPLES[1])]
    ids, mask, _ = _batch(samples, pad)  # right-padded on purpose: generate re-pads on the left
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=pad, eos_token_id=None)
    cached = llava.generate(ids, images=images[:3], attention_mask=mask, **kw)
    uncached = llava.generate(ids, images=images[:3], attention_mask=mask, use_cache=False, **kw)
    assert cached.shape == (3, 8)  # only new tokens, like LLaVA
    assert torch.equal(cached, uncached)
    assert len(set(cached.flatten().tolist())) > 3
    alone = llava.generate(samples[2][None], images=images[2:3], **kw)  # batch-mates do not change the output
    assert torch.equal(alone[0], cached[2])


# ---------------------------------------------------------------------------------------------- save / load

def _logits(model, images):
    ids, mask, _ = _batch([_sample(*SAMPLES[0]), _sample(*SAMPLES[3])], 2)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, images=images[:2]).logits


def test_save_pretrained_round_trip(tmp_path, llava, images):
    from transformers import AutoConfig, AutoModelForCausalLM

    llava.save_pretrained(tmp_path)
    cfg = AutoConfig.from_pretrained(str(tmp_path))
    assert isinstance(cfg, DripLlavaConfig) and cfg.mm_hidden_size == 192 and cfg.vision_config["compression"] == 4.0
    for cls in (AutoModelForCausalLM, DripLlavaForCausalLM):
        re = cls.from_pretrained(str(tmp_path)).eval()
        assert isinstance(re, DripLlavaForCausalLM) and not re.vision_tower.model.training
        assert torch.allclose(_logits(re, images), _logits(llava, images), atol=1e-5)
    bf16 = DripLlavaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    assert bf16.mm_projector[0].weight.dtype == torch.float32  # trainable projector stays fp32
    assert bf16.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert _logits(bf16.eval(), images).dtype == torch.bfloat16


def test_load_pretrained_model_full_and_projector_only(tmp_path, llava, images, tiny_llm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llm_dir))
    ref = _logits(llava, images)
    full = tmp_path / "any-name"  # names never matter
    llava.save_pretrained(full)
    tok.save_pretrained(full)
    assert detect_checkpoint_kind(full) == "full"
    loaded = load_pretrained_model(full, device="cpu")
    assert loaded.kind == "full" and loaded.context_len == 2048
    assert torch.allclose(_logits(loaded.model, images), ref, atol=1e-5)
    tokenizer, model, processor, ctx = loaded  # LLaVA-style unpacking
    from PIL import Image

    assert processor(Image.new("RGB", (200, 150))).shape == (3, IMG, IMG)

    proj = tmp_path / "stage1"
    llava.save_mm_projector(proj)
    assert detect_checkpoint_kind(proj) == "projector"
    with pytest.raises(ValueError, match="pass model_base"):
        load_pretrained_model(proj, device="cpu")
    loaded = load_pretrained_model(proj, model_base=tiny_llm_dir, device="cpu")
    assert loaded.kind == "projector"
    assert torch.allclose(_logits(loaded.model, images), ref, atol=1e-5)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"not a drip-llava checkpoint.*notes.txt"):
        load_pretrained_model(empty)
    with pytest.raises(ValueError, match="plain 'llama' model"):
        load_pretrained_model(tiny_llm_dir)


def test_load_pretrained_model_lora(tmp_path, llava, images, tiny_llm_dir):
    """A peft adapter + non_lora_trainables (peft-style key names) + config.json: merged on load."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    base = DripLlavaForCausalLM.from_pretrained(str(tiny_llm_dir), config=llava.config)
    base.load_state_dict(llava.state_dict())
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False)).eval()
    ref = _logits(peft_model, images)
    assert not torch.allclose(ref, _logits(llava, images), atol=1e-4)  # the adapter changes the output
    out = tmp_path / "ckpt"
    peft_model.save_pretrained(out)
    llava.config.save_pretrained(out)
    trainables = {n: p.detach() for n, p in peft_model.named_parameters() if "mm_projector" in n}
    assert all(k.startswith("base_model.model.mm_projector.") for k in trainables)
    save_file(trainables, str(out / "non_lora_trainables.safetensors"))
    llava.vision_tower.model.save_pretrained(out / "vision_tower")
    loaded = load_pretrained_model(out, model_base=tiny_llm_dir, device="cpu")
    assert loaded.kind == "lora" and isinstance(loaded.model, DripLlavaForCausalLM)  # merged
    assert torch.allclose(_logits(loaded.model, images), ref, atol=1e-4)
    # On a 4-bit base the adapter stays unmerged (peft model) and still generates with images.
    q = load_pretrained_model(out, model_base=tiny_llm_dir, device="cpu", load_4bit=True)
    assert q.kind == "lora" and not isinstance(q.model, DripLlavaForCausalLM) and q.notes
    ids, mask, _ = _batch([_sample(*SAMPLES[0])], 2)
    assert q.model.generate(ids, images=images[:1], attention_mask=mask, max_new_tokens=2,
                            do_sample=False, pad_token_id=2).shape == (1, 2)


def test_load_4bit_keeps_projector_and_tower_unquantized(tmp_path, llava, images, tiny_llm_dir):
    import bitsandbytes as bnb
    from transformers import AutoTokenizer

    llava.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(str(tiny_llm_dir)).save_pretrained(tmp_path)
    loaded = load_pretrained_model(tmp_path, load_4bit=True, device="cpu", torch_dtype=torch.float32)
    m = loaded.model
    assert isinstance(m.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    vision_linears = [mod for name, mod in m.named_modules()
                      if name.startswith(("mm_projector", "vision_tower")) and isinstance(mod, nn.Linear)]
    assert vision_linears and not any(isinstance(mod, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
                                      for mod in vision_linears)
    assert m.mm_projector[0].weight.dtype == torch.float32
    ids, mask, _ = _batch([_sample(*SAMPLES[0])], 2)
    new = m.generate(ids, images=images[:1], attention_mask=mask, max_new_tokens=3, do_sample=False,
                     pad_token_id=2)
    assert new.shape == (1, 3)
    # a 4-bit model is close to the fp32 one (same tower + projector, quantized LLM)
    assert F.cosine_similarity(_logits(m, images).flatten(), _logits(llava, images).flatten(), dim=0) > 0.9


def test_projector_checkpoint_of_another_tower_family_loads(tmp_path, tiny_llm_dir, images):
    """A stage-1 folder whose tower is another family (here ToMe) loads with its own tower class: the builder reads
    the tower folder through the family registry (a DripVisionModel refuses a `family: tome` config)."""
    from drip_llava.vision.families import create_model

    tower_dir = tmp_path / "tome-tower"
    create_model("vit-tiny-16", family="tome", merge_r=4).save_pretrained(tower_dir)
    model = DripLlavaForCausalLM.from_pretrained(str(tiny_llm_dir))
    model.initialize_vision_modules(str(tower_dir), "mlp2x_gelu", select_layer=-2)
    model.eval()
    ref = _logits(model, images)
    proj = tmp_path / "stage1"
    model.save_mm_projector(proj)
    loaded = load_pretrained_model(proj, model_base=tiny_llm_dir, device="cpu")
    assert type(loaded.model.vision_tower.model).__name__ == "ToMeVisionModel"
    assert torch.allclose(_logits(loaded.model, images), ref, atol=1e-5)
