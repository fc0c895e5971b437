"""LLaVA on any Llama-architecture LLM with a DRIP vision tower.

One placeholder (IMAGE_TOKEN_INDEX) per image sample in input_ids; the model encodes the image, projects its
tokens (a different count per image) and splices them in at the placeholder, then pads the batch. Because
DRIP only knows the count after encoding, the splice happens inside the model (HF's processors expand
"<image>" to a fixed N ahead of time, which cannot work here).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaModel, LlamaPreTrainedModel

from drip_llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from drip_llava.model.projector import build_projector, load_projector_weights, save_projector
from drip_llava.model.vision_tower import DripVisionTower
from drip_llava.vision.spec import load_drip_model


@strict
class DripLlavaConfig(LlamaConfig):
    """A LlamaConfig plus what rebuilds the vision side: the DRIP config itself (not a path), the block to
    read features from and the projector kind. `mm_vision_tower` only records where the tower came from."""

    model_type = "drip_llava_llama"

    vision_config: dict | None = None
    mm_vision_select_layer: int = -2
    mm_projector_type: str = "mlp2x_gelu"
    mm_hidden_size: int | None = None
    mm_vision_tower: str | None = None
    unfreeze_mm_vision_tower: bool = False

    def __post_init__(self, **kwargs):
        if self.vision_config is not None and not isinstance(self.vision_config, dict):
            self.vision_config = self.vision_config.to_dict()  # a DripVisionConfig
        super().__post_init__(**kwargs)


def _zero3_gathered(params: list[nn.Parameter]):
    """Under DeepSpeed ZeRO-3 partitioned params are empty (torch.Size([0])); gather them to load weights
    (LLaVA's "size mismatch ... torch.Size([0])"). A no-op otherwise."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    return contextlib.nullcontext()


@dataclass
class DripLlavaCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast + what the vision side did in this forward: `rate_loss` (DRIP's unweighted rate loss,
    mean over this batch's images; only when the tower trains, else None), `num_images` and `visual_tokens`
    (images encoded and tokens spliced in, a dummy image excluded). The trainer weights and adds the rate loss."""

    rate_loss: torch.Tensor | None = None
    num_images: int | None = None
    visual_tokens: int | None = None


def _partitioned(module: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions this module's weights (each forward then gathers them collectively)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _left_pad(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_id: int | None):
    """Move padding to the left (generation appends on the right)."""
    if attention_mask is None or bool(attention_mask[:, -1].all()):
        return input_ids, attention_mask
    keep = attention_mask.bool()
    lengths = keep.sum(dim=1)
    T = input_ids.shape[1]
    ids = input_ids.new_full(input_ids.shape, 0 if pad_id is None else pad_id)
    mask = torch.zeros_like(attention_mask)
    for i in range(input_ids.shape[0]):
        n = int(lengths[i])
        ids[i, T - n:] = input_ids[i][keep[i]]
        mask[i, T - n:] = 1
    return ids, mask


class DripLlavaForCausalLM(LlamaForCausalLM):
    config_class = DripLlavaConfig
    # The projector is trained: keep it fp32 when the LLM loads in fp16/bf16 (its output is cast explicitly).
    # DRIP's boundary predictor computes in fp32 (sigmoid tails underflow in bf16), so its weights stay fp32 too.
    _keep_in_fp32_modules_strict = ["mm_projector", "boundary_predictor"]

    def __init__(self, config: DripLlavaConfig):
        # LlamaForCausalLM.__init__ inlined so the vision modules exist before post_init (weight init, tied keys).
        LlamaPreTrainedModel.__init__(self, config)
        self.model = LlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.vision_tower: DripVisionTower | None = None
        self.mm_projector: nn.Module | None = None
        if config.vision_config is not None:
            self.vision_tower = DripVisionTower(load_drip_model(config.vision_config),
                                                config.mm_vision_select_layer,
                                                frozen=not config.unfreeze_mm_vision_tower)
            self.mm_projector = self._new_projector()
        self.post_init()

    # ------------------------------------------------------------------------------------ vision setup
    def _new_projector(self) -> nn.Module:
        c = self.config
        if c.mm_hidden_size is not None and c.mm_hidden_size != self.vision_tower.hidden_size:
            raise ValueError(f"mm_hidden_size mismatch: config says {c.mm_hidden_size}, the vision tower has width "
                             f"{self.vision_tower.hidden_size}")
        return build_projector(c.mm_projector_type, self.vision_tower.hidden_size, c.hidden_size)

    def get_vision_tower(self) -> DripVisionTower | None:
        return self.vision_tower

    def initialize_vision_modules(self, vision_tower_spec: Any, projector_type: str = "mlp2x_gelu",
                                  select_layer: int = -2, pretrain_mm_mlp_adapter: str | os.PathLike | None = None,
                                  unfreeze_vision_tower: bool = False, **tower_overrides) -> None:
        """Attach a tower + fresh projector to a model loaded from a plain Llama checkpoint (stage 1), or load
        a stage-1 projector (`pretrain_mm_mlp_adapter`: mm_projector.safetensors / .bin / its folder) for
        stage 2. Records everything needed to rebuild them in self.config."""
        drip = load_drip_model(vision_tower_spec, **tower_overrides)
        tower = DripVisionTower(drip, select_layer=select_layer, frozen=not unfreeze_vision_tower)
        ref = self.get_input_embeddings().weight
        device = ref.device if ref.device.type != "meta" else torch.device("cpu")
        # A frozen tower may follow the LLM's dtype; trainable weights stay fp32 (autocast handles compute).
        tower_dtype = ref.dtype if (not unfreeze_vision_tower and ref.dtype.is_floating_point) else torch.float32
        tower = tower.to(device=device, dtype=tower_dtype).train(self.training)
        if drip.boundary_predictor is not None:
            drip.boundary_predictor.float()
        projector = build_projector(projector_type, tower.hidden_size, self.config.hidden_size)
        projector = projector.to(device=device, dtype=torch.float32).train(self.training)
        if pretrain_mm_mlp_adapter is not None:  # before touching self: a failed load leaves the model as it was
            with _zero3_gathered(list(projector.parameters())):
                load_projector_weights(projector, pretrain_mm_mlp_adapter, tower.hidden_size, self.config.hidden_size)
        self.vision_tower, self.mm_projector = tower, projector
        c = self.config
        c.vision_config = tower.config.to_dict()
        c.mm_vision_select_layer = select_layer
        c.mm_projector_type = projector_type
        c.mm_hidden_size = tower.hidden_size
        c.unfreeze_mm_vision_tower = unfreeze_vision_tower
        c.mm_vision_tower = str(vision_tower_spec) if isinstance(vision_tower_spec, (str, os.PathLike)) else None

    def load_mm_projector(self, path: str | os.PathLike) -> dict[str, str]:
        """Load projector weights, checking they were trained for this tower's width and this LLM's width."""
        params = list(self.mm_projector.parameters())
        with _zero3_gathered(params):
            return load_projector_weights(self.mm_projector, path, self.config.mm_hidden_size, self.config.hidden_size)

    def save_mm_projector(self, out_dir: str | os.PathLike, state_dict: dict | None = None,
                          include_vision_tower: bool = True) -> Path:
        """Stage-1 output: mm_projector.safetensors (+ widths), config.json, and the tower's own folder
        (`vision_tower/`) so the folder reloads without the original tower path. Pass `state_dict` with
        gathered projector weights under ZeRO-3 (keys relative to the projector or prefixed `mm_projector.`)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        c = self.config
        path = save_projector(self.mm_projector, out, kind=c.mm_projector_type, mm_hidden_size=c.mm_hidden_size,
                              hidden_size=c.hidden_size, state_dict=state_dict)
        c.save_pretrained(out)
        if include_vision_tower:
            self.vision_tower.model.save_pretrained(out / "vision_tower")
        return path

    # ------------------------------------------------------------------------------------ encoding
    def encode_images(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images [N,3,H,W] -> N tensors [n_i, hidden] (projected visual tokens, a different n_i per image)."""
        return self._encode(images)[0]

    def _tower_trains(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.vision_tower.parameters())

    def _encode(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """(projected tokens per image, the tower's rate loss when the tower trains, else None)."""
        if self.vision_tower is None:
            raise RuntimeError("this model has no vision tower; call initialize_vision_modules(...) first")
        feats, mask, rate = self.vision_tower(images, return_rate_loss=True)  # [N,S,D], [N,S], scalar
        return self.project_features(feats, mask), (rate if self._tower_trains() else None)

    def project_features(self, feats: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Tower features [N,S,D] + mask [N,S] -> N projected tensors [n_i, hidden] (the padding rows dropped)."""
        proj_dtype = next(self.mm_projector.parameters(), feats).dtype
        tokens = self.mm_projector(feats.to(proj_dtype))  # [N,S,hidden]; per-token, so padding rows are inert
        return [t[m] for t, m in zip(tokens, mask)]

    def _needs_vision_pass(self) -> bool:
        """Whether a batch without images must still run the vision modules: in training with grad (every
        trainable parameter gets a gradient, as DDP / ZeRO require) and whenever ZeRO-3 partitions the vision
        weights (each forward of a partitioned module is a collective gather: a rank that skips the tower while
        another encodes images issues different collectives, so gloo aborts and NCCL hangs)."""
        if self.vision_tower is None:
            return False
        if self.training and torch.is_grad_enabled():
            return True
        return _partitioned(self.vision_tower) or _partitioned(self.mm_projector)

    def _vision_keeper(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The whole tower + projector on one blank image, for batches without images (see _needs_vision_pass):
        every rank runs the same modules in the same order every step. Returns (0 * the tokens' sum, 0 * the rate loss
        or None),
        zero-weighted so the batch's result does not change while every vision parameter joins the graph."""
        s = self.vision_tower.config.image_size
        dummy = torch.zeros(1, 3, s, s, device=device)
        tokens, rate = self._encode(dummy)
        keeper = sum(t.float().sum() for t in tokens) * 0
        return keeper, (rate * 0 if rate is not None else None)

    def prepare_inputs_labels_for_multimodal(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                             labels: torch.Tensor | None = None, images: torch.Tensor | None = None,
                                             padding_side: str = "right",
                                             image_features: list[torch.Tensor] | None = None):
        """Splice image tokens in at the placeholders and re-pad. Returns (inputs_embeds [B,T',H], attention_mask
        [B,T'] long, position_ids [B,T'], labels [B,T'] or None). Padding in the input (by attention_mask, on any
        side) is dropped first; `padding_side` is that of the output ("left" for generation).
        `images`: [B,3,H,W] aligned with the batch (rows of text-only samples are ignored), or only the
        images of the samples that have a placeholder, in batch order. `image_features` instead of `images`:
        already projected visual tokens ([n_i, hidden], e.g. from `encode_images`), one per placeholder sample in
        batch order; the tower does not run (an image encoded once serves every question about it)."""
        return self._prepare_multimodal(input_ids, attention_mask, labels, images, padding_side,
                                        image_features=image_features)[:4]

    def _prepare_multimodal(self, input_ids, attention_mask=None, labels=None, images=None, padding_side="right",
                            image_features=None):
        """prepare_inputs_labels_for_multimodal + a dict of what the vision side did (rate_loss, num_images,
        visual_tokens; see DripLlavaCausalLMOutput)."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        B = input_ids.shape[0]
        device = input_ids.device
        keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        is_ph = input_ids == IMAGE_TOKEN_INDEX  # [B,T]
        n_ph = is_ph.sum(dim=1)
        bad = (n_ph > 1).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"samples {bad} of the batch hold {[int(n_ph[i]) for i in bad]} image placeholders "
                             f"(IMAGE_TOKEN_INDEX={IMAGE_TOKEN_INDEX}); exactly one per image sample is supported")
        if (is_ph & ~keep).any():
            raise ValueError("an image placeholder sits in a padded position (attention_mask == 0)")
        has_image = n_ph == 1
        n_img = int(has_image.sum())

        feats: list[torch.Tensor] = []
        rate = keeper = None
        if n_img and image_features is not None:
            if len(image_features) != n_img:
                raise ValueError(f"got {len(image_features)} image_features for {n_img} samples with a placeholder")
            feats = list(image_features)
        elif n_img:
            if images is None:
                raise ValueError(f"{n_img} samples hold an image placeholder but images=None")
            if self.vision_tower is None:
                raise RuntimeError("input_ids hold image placeholders but the model has no vision tower")
            if images.shape[0] == B:
                images = images[has_image.to(images.device)]
            elif images.shape[0] != n_img:
                raise ValueError(f"got {images.shape[0]} images for a batch of {B} samples of which {n_img} hold a "
                                 "placeholder: pass one image per sample or one per placeholder")
            feats, rate = self._encode(images)
        elif self._needs_vision_pass():  # before the embeddings, as with images: ZeRO-3 gathers in the same order
            keeper, rate = self._vision_keeper(device)

        embed = self.get_input_embeddings()
        embeds = embed(input_ids.clamp(min=0))  # placeholder rows are replaced below
        rows, row_labels = [], []
        img_iter = iter(feats)
        for i in range(B):
            e = embeds[i][keep[i]]
            lab = labels[i][keep[i]] if labels is not None else None
            if has_image[i]:
                p = int(is_ph[i][keep[i]].nonzero()[0, 0])
                f = next(img_iter).to(e.dtype)
                e = torch.cat([e[:p], f, e[p + 1:]])
                if lab is not None:
                    lab = torch.cat([lab[:p], lab.new_full((f.shape[0],), IGNORE_INDEX), lab[p + 1:]])
            rows.append(e)
            row_labels.append(lab)

        T = max(r.shape[0] for r in rows)
        H = embeds.shape[-1]
        out = embeds.new_zeros(B, T, H)
        mask = torch.zeros(B, T, dtype=torch.long, device=device)
        pos = torch.zeros(B, T, dtype=torch.long, device=device)
        new_labels = None if labels is None else torch.full((B, T), IGNORE_INDEX, dtype=labels.dtype, device=device)
        for i, e in enumerate(rows):
            n = e.shape[0]
            sl = slice(T - n, T) if padding_side == "left" else slice(0, n)
            out[i, sl] = e
            mask[i, sl] = 1
            pos[i, sl] = torch.arange(n, device=device)
            if new_labels is not None:
                new_labels[i, sl] = row_labels[i]
        if keeper is not None and keeper.requires_grad:  # without grad the pass is there for ZeRO-3's gathers only
            out = out + keeper.to(out.dtype)
        vision = {"rate_loss": rate, "num_images": n_img, "visual_tokens": sum(int(f.shape[0]) for f in feats)}
        return out, mask, pos, new_labels, vision

    # ------------------------------------------------------------------------------------ forward / generate
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values=None,
                inputs_embeds: torch.FloatTensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                images: torch.Tensor | None = None, mm_padding_side: str = "right", **kwargs):
        """LlamaForCausalLM.forward plus `images` [B,3,H,W] (see prepare_inputs_labels_for_multimodal).
        Splicing happens on prompt passes (no cache yet); decoding steps with a cache are plain Llama steps."""
        vision_info = None
        if inputs_embeds is None and input_ids is not None:
            decoding = past_key_values is not None and past_key_values.get_seq_length() > 0
            has_ph = bool((input_ids == IMAGE_TOKEN_INDEX).any())
            if decoding and has_ph:
                raise ValueError("image placeholders are only allowed in the prompt pass, not with a filled cache")
            # Text-only batches take the splice path too when the vision modules must run (_needs_vision_pass).
            vision = self.vision_tower is not None
            if not decoding and (has_ph or (vision and images is not None) or self._needs_vision_pass()):
                inputs_embeds, attention_mask, position_ids, labels, vision_info = self._prepare_multimodal(
                    input_ids, attention_mask, labels, images, padding_side=mm_padding_side)
                input_ids = None
        if labels is not None and self.training and torch.is_grad_enabled():
            out = self._supervised_loss_forward(input_ids=input_ids, attention_mask=attention_mask,
                                                position_ids=position_ids, past_key_values=past_key_values,
                                                inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                                **kwargs)
            return DripLlavaCausalLMOutput(**out, **(vision_info or {}))
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                               use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)

    def _supervised_loss_forward(self, labels: torch.Tensor, num_items_in_batch=None, **model_kwargs):
        """Training forward: the LM head and the cross-entropy run on the supervised positions only.

        In LLaVA data most positions (image tokens, system prompt, questions) are IGNORE_INDEX, yet the full
        [B,T,vocab] logits are the largest activation of a step (Vicuna, 2048 tokens: 262 MB per sample in fp32)
        and their log-softmax a large share of its time (measured: ~10% of a SmolLM2 LoRA step on CPU). The loss
        is the same as LlamaForCausalLM's (shifted labels; sum / num_items_in_batch under gradient accumulation,
        else the mean). `logits` is None: training never reads them."""
        out = self.model(**model_kwargs)
        target = labels[:, 1:].to(out.last_hidden_state.device)
        keep = target != IGNORE_INDEX
        logits = self.lm_head(out.last_hidden_state[:, :-1][keep]).float()
        loss = nn.functional.cross_entropy(logits, target[keep], reduction="sum")
        denom = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
        if torch.is_tensor(denom):
            denom = denom.to(loss.device)
        return CausalLMOutputWithPast(loss=loss / denom, logits=None, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states, attentions=out.attentions)

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, images: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **kwargs):
        """Generate from input_ids holding image placeholders. Returns only the NEW tokens (like LLaVA).
        With the KV cache (default): splice once, prefill via inputs_embeds, decode with the cache. With
        use_cache=False: every step re-splices the full sequence (a slow reference path, same tokens)."""
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        if inputs is None or "inputs_embeds" in kwargs:
            return super().generate(inputs, attention_mask=attention_mask, **kwargs)
        gen_config = kwargs.get("generation_config") or self.generation_config
        use_cache = kwargs.get("use_cache", gen_config.use_cache)
        if not use_cache:
            inputs, attention_mask = _left_pad(inputs, attention_mask, gen_config.pad_token_id)
            out = super().generate(inputs, attention_mask=attention_mask, images=images, mm_padding_side="left",
                                   **kwargs)
            n = inputs.shape[1]
            if isinstance(out, torch.Tensor):
                return out[:, n:]
            out.sequences = out.sequences[:, n:]
            return out
        embeds, mask, _, _ = self.prepare_inputs_labels_for_multimodal(inputs, attention_mask, None, images,
                                                                       padding_side="left")
        return super().generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)


AutoConfig.register(DripLlavaConfig.model_type, DripLlavaConfig, exist_ok=True)
AutoModelForCausalLM.register(DripLlavaConfig, DripLlavaForCausalLM, exist_ok=True)
