"""DRIP: a ViT that mean-pools its patch tokens into image-dependent segments.

patch embed (+cls, +pos, ln_pre) -> n_pre blocks on all patches -> boundary predictor -> segment mean-pooling
-> n_short blocks on the segments -> ln_post -> pool (cls or masked mean) -> projection.
With `compression == 1` (or all-ones boundaries) it is exactly a plain ViT with open_clip's layout.

The shortened blocks run either padded ([B, S_max, D] with a key mask) or packed: the real tokens of all images
concatenated ([sum S_i, D], no padding), linear layers on the whole pack and attention per image through a
variable-length kernel (see `varlen_attention`). Both give the same tokens; packed skips the max - mean padding,
which is large in training (Gumbel boundaries) and on real images.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .config import DripVisionConfig, get_preset_config


@dataclass
class DripVisionOutput(ModelOutput):
    """Every field is always present (None where not computed); the count of outputs never depends on flags."""

    features: torch.Tensor = None  # [B,S,D] segment tokens after ln_post, CLS excluded, padded
    mask: torch.Tensor = None  # [B,S] bool, True = real token
    num_tokens: torch.Tensor = None  # [B] long
    boundaries: torch.Tensor = None  # [B,L] float, 1 = last patch of a segment
    rate_loss: torch.Tensor = None  # scalar, unweighted
    pooled: Optional[torch.Tensor] = None  # [B,E]
    cls_token: Optional[torch.Tensor] = None  # [B,D] after ln_post (None without a class token)
    hidden_states: Optional[tuple] = None  # depth+1 x [B,T,D]
    hidden_masks: Optional[tuple] = None  # depth+1 x [B,T] bool


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                pack: Optional["Packing"] = None) -> torch.Tensor:
        """x: [B,T,D] with attn_mask [B,1,1,T] bool (True = attend), or with `pack` the real tokens of several
        images concatenated, [N,D], attention staying within each image (no mask)."""
        if pack is not None:
            N, D = x.shape
            q, k, v = self.qkv(x).view(N, 3, self.num_heads, D // self.num_heads).unbind(1)  # [N,H,Dh] each
            return self.proj(varlen_attention(q, k, v, pack).reshape(N, D))
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        # SDPA picks a fused kernel on GPU
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B,H,T,Dh]
        return self.proj(x.transpose(1, 2).reshape(B, T, D))

    def forward_with_logits(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None):
        """(output, logits [B,H,T,T]): `forward`'s math with an explicit softmax, for callers that reuse the
        pre-softmax logits (bias included), e.g. DVT's relationship reuse. x: [B,T,D]; bias: additive, broadcast
        to [B,H,T,T]."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * (D // self.num_heads) ** -0.5  # [B,H,T,T]
        if bias is not None:
            logits = logits + bias
        x = logits.softmax(dim=-1) @ v  # [B,H,T,Dh]
        return self.proj(x.transpose(1, 2).reshape(B, T, D)), logits


class Block(nn.Module):
    def __init__(self, config: DripVisionConfig):
        super().__init__()
        D = config.hidden_size
        self.ln_1 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.attn = Attention(D, config.num_heads)
        self.ln_2 = nn.LayerNorm(D, eps=config.layer_norm_eps)
        hidden = int(D * config.mlp_ratio)
        act = QuickGELU() if config.act == "quick_gelu" else nn.GELU()
        self.mlp = nn.Sequential(nn.Linear(D, hidden), act, nn.Linear(hidden, D))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                pack: Optional["Packing"] = None) -> torch.Tensor:
        """x: [B,T,D] (padded, attn_mask) or [N,D] packed tokens with `pack` (see `Packing`): the same math."""
        x = x + self.attn(self.ln_1(x), attn_mask, pack)
        return x + self.mlp(self.ln_2(x))


# ---- packed (variable-length) attention --------------------------------------------------------------
VARLEN_KERNELS = ("auto", "flash", "nested", "loop")
CPU_MATMUL_PATCH = 32  # patch size from which the CPU patch embedding runs as a matmul (see `patchify`)
SHORT_PATHS = ("auto", "packed", "padded")


@dataclass
class Packing:
    """Where the real tokens of a padded batch [B,T,D] sit once packed into [N,D] (N = sum of lengths)."""

    lengths: list  # per image, host ints (CLS included)
    cu_seqlens: torch.Tensor  # [B+1] int32 offsets into the pack, on the tokens' device
    index: torch.Tensor  # [N] long flat positions b*T + t of the real tokens in the padded batch
    padded_len: int  # T
    kernel: str = "auto"

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    @classmethod
    def from_lengths(cls, lengths: list, padded_len: int, device: torch.device, kernel: str = "auto") -> "Packing":
        """lengths: real tokens per image (host ints), each row's real tokens first in a padded row of padded_len.
        Built on the host and copied once, so no further device sync."""
        n = torch.tensor(lengths, dtype=torch.long)
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = n.cumsum(0)
        index = (torch.arange(padded_len)[None, :] < n[:, None]).flatten().nonzero().squeeze(1)
        return cls(list(lengths), cu.to(device, non_blocking=True), index.to(device, non_blocking=True), padded_len,
                   kernel)

    def pack(self, x: torch.Tensor) -> torch.Tensor:  # [B,T,D] -> [N,D]
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:  # [N,D] -> [B,T,D], zeros at the padding
        B = len(self.lengths)
        out = x.new_zeros(B * self.padded_len, x.shape[-1]).index_copy(0, self.index, x)
        return out.view(B, self.padded_len, x.shape[-1])


def _flash_varlen() -> Optional[Callable]:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def resolve_varlen_kernel(device: torch.device, dtype: torch.dtype, kernel: str = "auto") -> str:
    """The variable-length attention used for `device`/`dtype`: CUDA takes flash-attn's varlen function when the
    package is installed (fp16/bf16), else SDPA on jagged nested tensors; CPU loops SDPA over the images, the
    fastest there at S ~ 20-60 (measured: a block-diagonal mask over the pack costs ~4x, nested tensors ~8x)."""
    if kernel not in VARLEN_KERNELS:
        raise ValueError(f"varlen kernel must be one of {VARLEN_KERNELS}, got {kernel!r}")
    if kernel != "auto":
        return kernel
    if device.type == "cuda":
        if dtype in (torch.float16, torch.bfloat16) and _flash_varlen() is not None:
            return "flash"
        return "nested"
    return "loop"


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pack: Packing) -> torch.Tensor:
    """Softmax attention within each image of a pack. q, k, v: [N,H,Dh] -> [N,H,Dh]."""
    kernel = resolve_varlen_kernel(q.device, q.dtype, pack.kernel)
    if kernel == "flash":
        flash = _flash_varlen()
        if flash is None:
            raise ImportError("varlen kernel 'flash' needs the flash-attn package")
        return flash(q, k, v, pack.cu_seqlens, pack.cu_seqlens, pack.max_len, pack.max_len)
    if kernel == "nested":
        offsets = pack.cu_seqlens.long()
        q, k, v = (torch.nested.nested_tensor_from_jagged(t, offsets=offsets).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).values()  # [B,H,j,Dh] -> [N,H,Dh]
    out, start = [], 0
    for n in pack.lengths:
        qi, ki, vi = (t[start:start + n].transpose(0, 1) for t in (q, k, v))  # [H,n,Dh]
        out.append(F.scaled_dot_product_attention(qi, ki, vi).transpose(0, 1))
        start += n
    return torch.cat(out)


class BoundaryPredictor(nn.Module):
    """Per-patch boundary logits, computed in fp32 (the sigmoid/Gumbel tails underflow in bf16)."""

    def __init__(self, config: DripVisionConfig):
        super().__init__()
        D = config.hidden_size
        hidden = int(D * config.predictor_ratio)
        self.mlp = nn.Sequential(nn.Linear(D, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,L,D] -> [B,L]
        # fp32 even when the weights were cast to bf16/fp16 (DeepSpeed casts the whole model)
        fc1, act, fc2 = self.mlp
        with torch.autocast(device_type=x.device.type, enabled=False):
            h = act(F.linear(x.float(), fc1.weight.float(), fc1.bias.float()))
            return F.linear(h, fc2.weight.float(), fc2.bias.float()).squeeze(-1)


def sample_boundaries(logits: torch.Tensor, config: DripVisionConfig, training: bool):
    """Returns (b, soft): b [B,L] hard 0/1 values (straight-through gradient in training), soft [B,L] or None.

    Training: Gumbel-Sigmoid (RelaxedBernoulli) + hard straight-through. Eval: no noise (see
    `DripVisionConfig.eval_boundaries`), so an image always gets the same tokens. The last patch always closes a
    segment (>= 1 segment per image).
    """
    if training:
        u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
        soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / config.boundary_temperature)
        hard = (soft > config.boundary_threshold).to(soft.dtype)
        return force_last_boundary(hard - soft.detach() + soft), force_last_boundary(soft)
    if config.eval_boundaries == "threshold":
        b = (torch.sigmoid(logits) > config.boundary_threshold).to(logits.dtype)
    else:
        b = expected_count_boundaries(logits)
    return force_last_boundary(b), None


def expected_count_boundaries(logits: torch.Tensor) -> torch.Tensor:
    """Per image, the k highest-logit patches among the first L-1 (the last is forced later), with k the
    expected number of boundaries under the training noise, round(sum sigmoid). Deterministic, per image."""
    head = logits[:, :-1]
    k = torch.sigmoid(head).sum(dim=1).round()  # [B]
    order = head.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(head.shape[1], device=head.device).expand_as(order))
    b = (ranks < k[:, None]).to(logits.dtype)
    return torch.cat([b, torch.zeros_like(logits[:, -1:])], dim=1)


def force_last_boundary(b: torch.Tensor) -> torch.Tensor:
    return torch.cat([b[:, :-1], torch.ones_like(b[:, -1:])], dim=1)


def segment_weights(b: torch.Tensor, num_segments: int, soft: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Float pooling matrix W [B,L,S], columns normalised: segments = einsum('bld,bls->bsd', x, W).

    Built from FLOAT boundaries so the task loss reaches the predictor (DTP's construction): token l sits in
    segment excl_cumsum(b)_l; the active entry is 1 - (s - excl), which is 1 in value and has gradient +1
    w.r.t. every earlier boundary. With `soft`, tokens get a linear-interpolation membership instead.
    """
    s = torch.arange(num_segments, device=b.device, dtype=b.dtype)
    if soft is None:
        excl = torch.cumsum(b, dim=1) - b  # [B,L]
        diff = s[None, None, :] - excl[..., None]  # [B,L,S]
        W = (1 - diff) * (diff.detach().abs() < 0.5).to(b.dtype)
    else:
        excl = torch.cumsum(soft, dim=1) - soft
        W = (1 - (s[None, None, :] - excl[..., None]).abs()).clamp(min=0)
    return W / W.sum(dim=1, keepdim=True).clamp(min=1e-6)


def rate_loss(b: torch.Tensor, config: DripVisionConfig) -> torch.Tensor:
    """Keeps the boundary rate near 1/compression. b: [B,L] boundaries (with straight-through gradient)."""
    b = b.float()
    p = config.target_rate
    rate = b.mean(dim=1)
    if config.rate_loss == "binomial":  # DTP's prior: -log Binomial(L, p).log_prob(#boundaries) / L
        L = b.shape[1]
        prior = torch.distributions.Binomial(total_count=L, probs=torch.tensor(p, device=b.device))
        return (-prior.log_prob(b.sum(dim=1)) / L).mean()
    if config.rate_loss == "hinge":  # two-sided: no push inside the margin band
        return F.relu((rate - p).abs() - config.rate_hinge_margin).mean()
    return ((rate - p) ** 2).mean()  # squared


def _to_rgb(image):  # module-level so the transform pickles into data-loader workers
    return image.convert("RGB")


class DripVisionModel(PreTrainedModel):
    config_class = DripVisionConfig
    base_model_prefix = "drip"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]

    def __init__(self, config: DripVisionConfig):
        if type(self) is DripVisionModel and config.family != "drip":  # a ToMe/DynamicViT config would build a ViT
            raise ValueError(f"a {config.family!r} config needs its own class: use drip_llava.vision.create_model / "
                             "from_pretrained")
        super().__init__(config)
        D = config.hidden_size
        self.patch_embed = nn.Conv2d(3, D, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        n_pos = config.num_patches + int(config.class_token)
        self.class_embedding = nn.Parameter(torch.zeros(D)) if config.class_token else None
        self.positional_embedding = nn.Parameter(torch.zeros(n_pos, D))
        self.ln_pre = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.boundary_predictor = BoundaryPredictor(config) if config.is_drip else None
        self.ln_post = nn.LayerNorm(D, eps=config.layer_norm_eps)
        self.proj = nn.Linear(D, config.embed_dim, bias=False)
        self.gradient_checkpointing = False
        # runtime choices, not saved: how the shortened blocks run ("auto" = packed when the batch has padding,
        # "padded" = the reference path, "packed" = always), the packed attention kernel (see
        # `resolve_varlen_kernel`), and a per-stage callback for profiling
        self.short_path = "auto"
        self.varlen_kernel = "auto"
        self.stage_hook: Optional[Callable[[str, torch.Tensor], None]] = None
        self.post_init()

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            if std is None:  # PyTorch's default (kaiming-uniform), what open_clip's VisionTransformer trains from
                module.reset_parameters()
                return
            init.normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, DripVisionModel):
            scale = self.config.hidden_size ** -0.5
            init.normal_(module.positional_embedding, std=scale)
            if module.class_embedding is not None:
                init.normal_(module.class_embedding, std=scale)

    # ---- construction helpers -------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DripVisionModel":
        """A randomly initialised model from a named preset (see `list_presets()`)."""
        return cls(get_preset_config(name, **overrides))

    @classmethod
    def from_open_clip(cls, model_or_name, preset: Optional[str] = None, **overrides) -> "DripVisionModel":
        from .open_clip_import import from_open_clip

        return from_open_clip(cls, model_or_name, preset=preset, **overrides)

    @classmethod
    def from_hf_clip(cls, src, preset: Optional[str] = None, **overrides) -> "DripVisionModel":
        """From an HF CLIP folder (config.json model_type clip / clip_vision_model) or a CLIPVisionModel /
        CLIPModel instance; overrides such as compression=4.0 add a fresh boundary predictor."""
        from .hf_clip_import import from_hf_clip

        return from_hf_clip(cls, src, preset=preset, **overrides)

    @property
    def preprocess(self):
        """PIL image -> normalised [3,H,W] tensor (resize shorter side, center crop), open_clip's eval transform."""
        from torchvision import transforms as T

        c = self.config
        return T.Compose([
            T.Resize(c.image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(c.image_size),
            T.Lambda(_to_rgb),
            T.ToTensor(),
            T.Normalize(c.image_mean, c.image_std),
        ])

    def no_weight_decay(self) -> set:
        return {"positional_embedding", "class_embedding"}

    # ---- forward ---------------------------------------------------------------------------------
    def _stage(self, name: str, x: torch.Tensor) -> None:
        """Profiling hook: `stage_hook(name, tensor)` after each stage when set (the bench's per-part timer)."""
        if self.stage_hook is not None:
            self.stage_hook(name, x)

    def _run_blocks(self, blocks, x, attn_mask, hidden, masks, token_mask, pack=None):
        for blk in blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(blk, x, attn_mask, pack, use_reentrant=False)
            else:
                x = blk(x, attn_mask, pack)
            if hidden is not None:
                hidden.append(x if pack is None else pack.unpack(x))
                masks.append(token_mask)
        return x

    def _output_index(self, output_layer: int) -> int:
        n = self.config.depth + 1
        idx = output_layer + n if output_layer < 0 else output_layer
        if not 0 <= idx < n:
            raise ValueError(f"output_layer={output_layer} is out of range for depth {self.config.depth} "
                             f"(valid: {-n}..{n - 1})")
        return idx

    def _use_packed(self, counts: list) -> bool:
        if self.short_path not in SHORT_PATHS:
            raise ValueError(f"short_path must be one of {SHORT_PATHS}, got {self.short_path!r}")
        if self.short_path == "auto":
            return min(counts) < max(counts)  # nothing padded: the padded batch needs no mask and no gather
        return self.short_path == "packed"

    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] -> [B,L,D], the patch embedding. Patches do not overlap, so the conv is a matmul over unfolded
        patches; on CPU that form runs for patches of CPU_MATMUL_PATCH px and more, where oneDNN's large-kernel
        conv is slower (2 threads: 1.2x at 32 px, 2.9x at 64 px; 0.8-0.9x at 14-16 px, where the conv stays)."""
        w, p = self.patch_embed.weight, self.config.patch_size
        if pixel_values.device.type != "cpu" or p < CPU_MATMUL_PATCH:
            return self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        B, C, H, W = pixel_values.shape
        gh, gw = H // p, W // p
        u = pixel_values[..., :gh * p, :gw * p].reshape(B, C, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
        return F.linear(u.reshape(B, gh * gw, C * p * p), w.reshape(w.shape[0], -1))

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch tokens with CLS (when configured) and positions, after ln_pre: [B, n_cls + L, D]. Shared by every
        tower family."""
        x = self.patchify(pixel_values.to(self.patch_embed.weight.dtype))  # [B,L,D]
        B, _, D = x.shape
        if self.config.class_token:
            x = torch.cat([self.class_embedding.to(x.dtype).expand(B, 1, D), x], dim=1)
        return self.ln_pre(x + self.positional_embedding.to(x.dtype))

    def forward_features(self, pixel_values: torch.Tensor, boundaries: Optional[torch.Tensor] = None,
                         output_hidden_states: bool = False, output_layer: Optional[int] = None) -> DripVisionOutput:
        """The encoder without the head. `output_layer` = k (an index into `hidden_states`: 0 = embeddings,
        depth = last block; negative counts from the end) stops after block k: `features`, `cls_token` and `mask`
        are then hidden_states[k] split into CLS / tokens (before ln_post), the later blocks do not run and no
        hidden-state tuple is kept unless `output_hidden_states`. Stopping at or before DRIP's pooling
        (k <= n_pre) skips the predictor: boundaries None, rate_loss 0, every patch a token."""
        c = self.config
        stop = c.depth if output_layer is None else self._output_index(output_layer)
        x = self.embed(pixel_values)  # [B, n_cls + L, D]
        n_cls = int(c.class_token)
        B, L = x.shape[0], x.shape[1] - n_cls
        if boundaries is not None and boundaries.shape != (B, L):
            raise ValueError(f"boundaries must be [B, L] = {(B, L)}, got {tuple(boundaries.shape)}")
        self._stage("embed", x)

        full_mask = torch.ones(B, L + n_cls, dtype=torch.bool, device=x.device)
        hidden, masks = ([x], [full_mask]) if output_hidden_states else (None, None)
        n_pre = c.n_pre if (c.is_drip or boundaries is not None) else c.depth
        x = self._run_blocks(self.blocks[:min(n_pre, stop)], x, None, hidden, masks, full_mask)
        self._stage("pre_blocks", x)
        pack, b, loss = None, None, x.new_zeros(())
        num_tokens = torch.full((B,), L, dtype=torch.long, device=x.device)
        mask = full_mask[:, n_cls:]
        if n_pre < c.depth and stop > n_pre:
            soft = None
            if boundaries is not None:  # caller's artificial boundaries (all ones = plain ViT)
                b = force_last_boundary(boundaries.to(torch.float32))
            else:
                logits = self.boundary_predictor(x[:, n_cls:])
                self._stage("predictor", logits)
                b, soft = sample_boundaries(logits, c, self.training)
                if c.boundary_mode == "hard":
                    soft = None
            num_tokens = b.detach().sum(dim=1).round().long()  # [B], >= 1 (last patch forced)
            if self.boundary_predictor is not None:
                loss = rate_loss(b, c)
            counts = num_tokens.tolist()  # the one host sync: segment counts -> padded length and packing
            S = max(counts)
            W = segment_weights(b, S, soft).to(x.dtype)  # [B,L,S]
            seg = torch.einsum("bld,bls->bsd", x[:, n_cls:], W)  # [B,S,D]
            x = torch.cat([x[:, :n_cls], seg], dim=1)
            mask = torch.arange(S, device=x.device)[None, :] < num_tokens[:, None]  # [B,S]
            tok_mask = torch.cat([full_mask[:, :n_cls], mask], dim=1)
            attn_mask = None
            if self._use_packed(counts):  # real tokens only: [sum(n_cls + S_i), D]
                pack = Packing.from_lengths([n + n_cls for n in counts], S + n_cls, x.device, self.varlen_kernel)
                x = pack.pack(x)
            elif min(counts) < S:  # padded keys are masked (no mask when nothing is padded: SDPA's fastest path)
                attn_mask = tok_mask[:, None, None, :]
            self._stage("pooling", x)
            x = self._run_blocks(self.blocks[n_pre:stop], x, attn_mask, hidden, masks, tok_mask, pack)
            self._stage("short_blocks", x)
        elif boundaries is None and not c.is_drip:  # plain ViT: every patch is its own segment
            b = torch.ones(B, L, device=x.device)

        if output_layer is None:
            x = self.ln_post(x)
        if pack is not None:
            x = pack.unpack(x)  # [B, n_cls + S, D], zeros at the padding
        return DripVisionOutput(
            features=x[:, n_cls:], mask=mask, num_tokens=num_tokens, boundaries=b, rate_loss=loss,
            pooled=None, cls_token=x[:, 0] if n_cls else None,
            hidden_states=tuple(hidden) if hidden is not None else None,
            hidden_masks=tuple(masks) if masks is not None else None,
        )

    def pool_features(self, out: DripVisionOutput) -> torch.Tensor:
        """[B,D] before the projection: CLS token, or the mean over real segments only (padding excluded)."""
        if self.config.pool == "cls":
            return out.cls_token
        m = out.mask.to(out.features.dtype)[..., None]
        return (out.features * m).sum(1) / m.sum(1).clamp(min=1)

    def forward_head(self, out: DripVisionOutput) -> torch.Tensor:
        return self.proj(self.pool_features(out))

    def forward(self, pixel_values: torch.Tensor, boundaries: Optional[torch.Tensor] = None,
                output_hidden_states: bool = False, return_dict: bool = True) -> DripVisionOutput:
        out = self.forward_features(pixel_values, boundaries, output_hidden_states=output_hidden_states)
        out.pooled = self.forward_head(out)
        self._stage("head", out.pooled)
        return out
