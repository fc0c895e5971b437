"""DVT (Wang et al., NeurIPS 2021, "Not All Images are Worth 16x16 Words"): a cascade of transformers on coarse ->
fine token grids, each image leaving at the first exit that is confident enough.

Exit k tokenises the image on a g_k x g_k grid with its own patch embedding (patch = image_size / g_k: the official
code gives each exit a larger patch / soft-split stride; it does not resize the image) and runs its own ViT body
(depth blocks, ln_post, projection = the exit's head). The last exit is this model's own body, with
DripVisionModel's layout, so a trained ViT folder loads as DVT's last exit (coarse exits and reuse modules fresh).

Reuse of exit k-1 by exit k (each switchable; zero-initialised, so a fresh reuse path changes nothing):
- feature reuse: in every block of exit k, an MLP (LN, D -> 128 -> GELU -> 48) of exit k-1's final patch tokens
  (before ln_post), upsampled to exit k's grid, joins the block's MLP input (CLS gets zeros). A linear layer on
  [LN(z), e] is fc1(LN(z)) + W e, so it enters as W e (48 -> mlp hidden, zero at init) added to the first MLP
  layer's output. The paper normalises the concatenation with one LN; here e keeps its own LN, which is what keeps
  the ViT's block weights (and a ViT checkpoint) valid in the last exit.
- relationship reuse: the attention logits of every block of exit k-1, [depth*heads, T', T'] per image, pass a
  1x1 MLP over those channels (x3 hidden, GELU; last layer zero at init), are upsampled on the query and the key
  grid (the CLS row and column kept) and added to the logits of the same block of exit k.
Upsampling follows the official code: nearest by ceil(g_k / g_{k-1}), then adaptive average pooling to g_k.

Training: every exit runs on every image; `exit_pooled` / `exit_features` carry each exit's embedding and tokens
and the trainer sums the exits' losses (the paper's objective); `features` / `pooled` are the last exit's and
`rate_loss` is 0 (DVT has no auxiliary loss).
Eval (`exit_policy`): "threshold" stops an image at the first exit k whose confidence (max softmax of the exit
classifier, see `set_exit_classifier`) reaches `exit_thresholds[k]` (no thresholds: every image takes the last
exit); "fixed:k" stops every image at exit k. Later exits never run on a stopped image. Each image's output holds
its exit's tokens (g_k^2, padded to the batch's longest, `mask`) and does not depend on its batch-mates.
`fit_exit_thresholds` fits thresholds for a MAC budget on a train split (the official procedure); `exit_predictions`
gives each exit's confidence and prediction for anytime / budgeted top-1.
`output_layer` = i (the LLaVA tower's block): each image's hidden state i of the exit it takes; the last reachable
exit stops after block i, the exits before it run in full only when they decide or feed its reuse.
"""
from __future__ import annotations

import functools
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import initialization as init

from .config import DripVisionConfig
from .families import FamilyVisionModel, TowerOutput, check_family_config, register_family
from .model import DripVisionModel, DripVisionOutput

# ViT fields every exit's body shares with the last exit (the patch size differs per exit)
_BODY_FIELDS = ("image_size", "hidden_size", "depth", "num_heads", "mlp_ratio", "embed_dim", "pool", "class_token",
                "act", "layer_norm_eps", "image_mean", "image_std", "initializer_range")


def default_exit_grids(image_size: int, grid: int) -> list[int]:
    """Three exits as the paper's 7x7 / 10x10 / 14x14 spacing allows with whole patches: the divisors of
    image_size nearest grid/3.5 and grid/2, then the grid (224 px, patch 16: [4, 7, 14]; 128 px: [2, 4, 8])."""
    divisors = [g for g in range(1, grid) if image_size % g == 0]
    picks = [min(divisors, key=lambda g: (abs(g - t), g)) for t in (grid / 3.5, grid / 2)] if divisors else []
    return sorted(set(picks)) + [grid]


def _parse_policy(policy: str, num_exits: int) -> Optional[int]:
    if policy == "threshold":
        return None
    m = re.fullmatch(r"fixed:(\d+)", str(policy))
    if m is None or int(m.group(1)) >= num_exits:
        raise ValueError(f"exit_policy must be 'threshold' or 'fixed:k' with k in 0..{num_exits - 1}, got {policy!r}")
    return int(m.group(1))


class DVTConfig(DripVisionConfig):
    """The last exit's ViT fields plus the cascade: `exit_grids` (coarse -> fine, the last = grid_size; None = see
    `default_exit_grids`), reuse switches and sizes (`feature_reuse`, `feature_reuse_hidden` 128,
    `feature_reuse_dim` 48, `relation_reuse`, `relation_reuse_ratio` 3, the official values), the eval policy
    (`exit_policy` "threshold" | "fixed:k", `exit_thresholds`: one per exit but the last, None = no early exit) and
    the exit classifier's shape and scoring (`exit_num_classes`, 0 = none; `exit_logit_scale`, `exit_normalize`;
    its weights are buffers set by `set_exit_classifier`)."""

    family = "dvt"

    def __init__(self, exit_grids: Optional[list] = None, feature_reuse: bool = True, feature_reuse_hidden: int = 128,
                 feature_reuse_dim: int = 48, relation_reuse: bool = True, relation_reuse_ratio: int = 3,
                 exit_policy: str = "threshold", exit_thresholds: Optional[list] = None, exit_num_classes: int = 0,
                 exit_logit_scale: float = 1.0, exit_normalize: bool = False, rate_loss_weight: float = 0.0,
                 **kwargs):
        super().__init__(rate_loss_weight=rate_loss_weight, **kwargs)
        check_family_config(self)
        g, size = self.grid_size, self.image_size
        grids = default_exit_grids(size, g) if exit_grids is None else [int(v) for v in exit_grids]
        if len(grids) < 2 or grids != sorted(set(grids)) or grids[0] < 1 or grids[-1] != g or any(size % v
                                                                                                  for v in grids):
            raise ValueError(f"exit_grids must be >= 2 increasing grids dividing image_size {size}, the last = "
                             f"grid_size {g}; got {grids}")
        self.exit_grids = grids
        self.feature_reuse, self.relation_reuse = bool(feature_reuse), bool(relation_reuse)
        self.feature_reuse_hidden, self.feature_reuse_dim = int(feature_reuse_hidden), int(feature_reuse_dim)
        self.relation_reuse_ratio = int(relation_reuse_ratio)
        _parse_policy(exit_policy, len(grids))  # fails early on a bad policy
        self.exit_policy = exit_policy
        if exit_thresholds is not None:
            exit_thresholds = [float(t) for t in exit_thresholds]
            if len(exit_thresholds) != len(grids) - 1:
                raise ValueError(f"exit_thresholds needs one value per exit but the last ({len(grids) - 1}), got "
                                 f"{exit_thresholds}")
        self.exit_thresholds = exit_thresholds
        if exit_num_classes < 0:
            raise ValueError(f"exit_num_classes must be >= 0, got {exit_num_classes}")
        self.exit_num_classes, self.exit_logit_scale = int(exit_num_classes), float(exit_logit_scale)
        self.exit_normalize = bool(exit_normalize)

    @property
    def num_exits(self) -> int:
        return len(self.exit_grids)

    @property
    def fixed_exit(self) -> Optional[int]:
        """k for exit_policy "fixed:k", None for "threshold"."""
        return _parse_policy(self.exit_policy, self.num_exits)

    def exit_patch_size(self, k: int) -> int:
        return self.image_size // self.exit_grids[k]

    def exit_tokens(self) -> list[int]:
        """Patch tokens of each exit (g_k^2)."""
        return [g * g for g in self.exit_grids]

    def exit_config(self, k: int) -> DripVisionConfig:
        """The plain-ViT config of exit k's body (the last exit's fields, exit k's patch size)."""
        return DripVisionConfig(**{f: getattr(self, f) for f in _BODY_FIELDS}, patch_size=self.exit_patch_size(k))

    def reference_exit(self) -> int:
        """The exit of the config's MAC figure: k for "fixed:k", else the last (the worst case; per-image MACs
        depend on the exit: `flops.dvt_macs(config, exit=k)`)."""
        k = self.fixed_exit
        return self.num_exits - 1 if k is None else k

    def tokens_after_block(self, i: int) -> int:
        """Upper bound of non-CLS tokens in hidden_states[i] in eval: the largest exit the policy reaches."""
        return self.exit_tokens()[self.reference_exit()]

    @property
    def max_tokens(self) -> int:
        return self.tokens_after_block(-1)


@dataclass
class DVTOutput(TowerOutput):
    """TowerOutput plus the cascade (K exits):
    exit_index: [B] long, the exit each image took (the last in training).
    exit_ran: [B,K] bool, the exits each image ran.
    exit_pooled: K x [B,E], each exit's embedding (zero rows where it did not run); a trainer sums their losses.
        None with `output_layer`.
    exit_features: K x [B, g_k^2, D], each exit's patch tokens after its ln_post (zero rows where it did not run).
        None with `output_layer`.
    exit_confidence: [B,K] float, the exit classifier's max softmax where a threshold decision was taken (0
        elsewhere), None when no decision was taken."""

    exit_index: Optional[torch.Tensor] = None
    exit_ran: Optional[torch.Tensor] = None
    exit_pooled: Optional[list] = None
    exit_features: Optional[list] = None
    exit_confidence: Optional[torch.Tensor] = None


class ZeroLinear(nn.Linear):
    """A Linear layer that starts at zero (weight and bias): the last layer of a reuse path, so a fresh path adds
    nothing to the exit it feeds."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def resize_grid(t: torch.Tensor, g_out: int) -> torch.Tensor:
    """[N,C,g,g] -> [N,C,g_out,g_out]: nearest upsampling by ceil(g_out/g), then adaptive average pooling (the
    official code's resampling between exits)."""
    g = t.shape[-1]
    f = -(-g_out // g)
    if f > 1:
        t = F.interpolate(t, scale_factor=f, mode="nearest")
    return t if t.shape[-1] == g_out else F.adaptive_avg_pool2d(t, g_out)


@functools.lru_cache(maxsize=32)
def token_resampler(g_in: int, g_out: int, n_cls: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`resize_grid` on the token axis as a sparse map: (idx [T', S] long, w [T', S] float or None when every output
    token copies one input token), T = n_cls + g^2, S = the most input tokens one output token averages. Output
    token o = sum_s w[o, s] * input token idx[o, s]; the CLS tokens map to themselves. Gathers instead of a
    resampling of the whole [.., g, g] layout (and no matmul, so FlopCounterMode counts only the model's MACs)."""
    L = g_in * g_in
    basis = torch.eye(L, dtype=torch.float64).reshape(L, 1, g_in, g_in)
    m = resize_grid(basis, g_out).reshape(L, g_out * g_out).T  # [g_out^2, g_in^2]: output <- input weights
    m = torch.block_diag(torch.eye(n_cls, dtype=m.dtype), m)
    S = int((m != 0).sum(1).max())
    w, idx = m.topk(S, dim=1)  # zero weights pad rows with fewer inputs
    return idx, (None if S == 1 else w.float())  # rows sum to 1: one input means a copy


def resample(t: torch.Tensor, dim: int, g_in: int, g_out: int, n_cls: int) -> torch.Tensor:
    """Tokens on a g_in grid along `dim` (n_cls + g_in^2 of them) -> on the g_out grid (see `token_resampler`)."""
    idx, w = token_resampler(g_in, g_out, n_cls)
    idx = idx.to(t.device)
    if w is None:
        return t.index_select(dim, idx[:, 0])
    shape = [1] * t.dim()
    shape[dim] = -1
    w = w.to(device=t.device, dtype=t.dtype)
    return sum(t.index_select(dim, idx[:, s]) * w[:, s].reshape(shape) for s in range(idx.shape[1]))


def resize_tokens(t: torch.Tensor, g_in: int, g_out: int) -> torch.Tensor:
    """Patch tokens on a grid: [B, g_in^2, C] -> [B, g_out^2, C]."""
    return resample(t, 1, g_in, g_out, 0)


def resize_relation(r: torch.Tensor, g_in: int, g_out: int, n_cls: int) -> torch.Tensor:
    """Attention maps [B,C,T,T] (T = n_cls + g_in^2, queries x keys) -> [B,C,T',T'] (T' = n_cls + g_out^2): the key
    grid, then the query grid resized; CLS rows / columns are kept."""
    return resample(resample(r, 3, g_in, g_out, n_cls), 2, g_in, g_out, n_cls)


class FeatureReuse(nn.Module):
    """One block's feature reuse: the previous exit's patch tokens -> [B, n_cls + L, mlp hidden] added to the
    block's first MLP layer output."""

    def __init__(self, config: DVTConfig):
        super().__init__()
        D, Fh, Fd = config.hidden_size, config.feature_reuse_hidden, config.feature_reuse_dim
        self.mlp = nn.Sequential(nn.LayerNorm(D, eps=config.layer_norm_eps), nn.Linear(D, Fh), nn.GELU(),
                                 nn.Linear(Fh, Fd))
        self.into_mlp = ZeroLinear(Fd, int(D * config.mlp_ratio), bias=False)

    def forward(self, prev: torch.Tensor, g_in: int, g_out: int, n_cls: int) -> torch.Tensor:
        e = resize_tokens(self.mlp(prev[:, n_cls:]), g_in, g_out)  # [B, g_out^2, Fd]
        e = self.into_mlp(e)
        return torch.cat([e.new_zeros(e.shape[0], n_cls, e.shape[2]), e], dim=1)


class RelationReuse(nn.Module):
    """The previous exit's attention logits of every block [B, depth, H, T', T'] -> per block [B,H,T,T] biases."""

    def __init__(self, config: DVTConfig):
        super().__init__()
        C = config.depth * config.num_heads
        self.mlp = nn.Sequential(nn.Linear(C, config.relation_reuse_ratio * C), nn.GELU(),
                                 ZeroLinear(config.relation_reuse_ratio * C, C))

    def forward(self, logits: torch.Tensor, g_in: int, g_out: int, n_cls: int) -> list[torch.Tensor]:
        B, depth, H, T, _ = logits.shape
        r = self.mlp(logits.reshape(B, depth * H, T, T).permute(0, 2, 3, 1))  # [B,T,T,C]: 1x1 conv over channels
        r = resize_relation(r.permute(0, 3, 1, 2), g_in, g_out, n_cls)  # [B,C,T2,T2]
        return list(r.reshape(B, depth, H, *r.shape[-2:]).unbind(1))


def exit_patch_token(config: DVTConfig, k: int) -> torch.Tensor:
    """[L] long: exit k's token holding each patch of the last exit's grid (the coarse cell of its centre)."""
    g, p, gk, pk = config.grid_size, config.patch_size, config.exit_grids[k], config.exit_patch_size(k)
    cell = ((2 * torch.arange(g) + 1) * p) // (2 * pk)  # [g]
    return (cell[:, None] * gk + cell[None, :]).flatten()


def _fill(rows: torch.Tensor, t: torch.Tensor, B: int) -> torch.Tensor:
    """t [b,...] for batch `rows` -> [B,...] with zeros elsewhere (t itself when every image is there)."""
    if t.shape[0] == B:
        return t
    return t.new_zeros(B, *t.shape[1:]).index_copy(0, rows, t)


@register_family("dvt")
class DVTVisionModel(FamilyVisionModel):
    config_class = DVTConfig

    def __init__(self, config: DVTConfig):
        super().__init__(config)
        K = config.num_exits
        self.coarse_exits = nn.ModuleList(DripVisionModel(config.exit_config(k)) for k in range(K - 1))
        self.feature_reuse = nn.ModuleList(nn.ModuleList(FeatureReuse(config) for _ in range(config.depth))
                                           for _ in range(K - 1)) if config.feature_reuse else None
        self.relation_reuse = (nn.ModuleList(RelationReuse(config) for _ in range(K - 1))
                               if config.relation_reuse else None)
        C, E = config.exit_num_classes, config.embed_dim
        if C:  # filled by set_exit_classifier or a checkpoint
            self.register_buffer("exit_head_weight", torch.zeros(K, C, E))
            self.register_buffer("exit_head_bias", torch.zeros(K, C))
        self._forced_exit: Optional[int] = None
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, ZeroLinear):
            init.zeros_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
            return
        super()._init_weights(module)

    @property
    def exit_bodies(self) -> list[DripVisionModel]:
        """The ViT body of every exit, coarse -> fine; the last is this model."""
        return [*self.coarse_exits, self]

    # ---- exit classifier and policy -----------------------------------------------------------------
    def set_exit_classifier(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                            logit_scale: float = 1.0, normalize: bool = False) -> None:
        """The heads whose confidence decides the early exit: `weight` [C,E] shared by every exit (e.g. CLIP text
        prototypes with normalize=True and CLIP's logit scale) or [K,C,E] (a linear head per exit, as DVT trains);
        `bias` None, [C] or [K,C]. logits_k = logit_scale * z_k @ W_k^T + b_k, z_k = exit k's pooled embedding
        (L2-normalised when `normalize`). Saved with the model (buffers; the config records C, scale, normalize:
        a wrapper that copied the config, such as LLaVA's vision_config, needs those fields at build)."""
        c = self.config
        K, E = c.num_exits, c.embed_dim
        w = weight.detach()
        w = w.expand(K, *w.shape) if w.dim() == 2 else w
        if w.dim() != 3 or w.shape[0] != K or w.shape[2] != E:
            raise ValueError(f"exit classifier weight must be [C,{E}] or [{K},C,{E}], got {tuple(weight.shape)}")
        C = w.shape[1]
        b = torch.zeros(K, C) if bias is None else bias.detach()
        b = b.expand(K, C) if b.dim() == 1 else b
        if tuple(b.shape) != (K, C):
            raise ValueError(f"exit classifier bias must be [{C}] or [{K},{C}], got {tuple(bias.shape)}")
        ref = self.proj.weight
        self.register_buffer("exit_head_weight", w.to(device=ref.device, dtype=torch.float32).contiguous().clone())
        self.register_buffer("exit_head_bias", b.to(device=ref.device, dtype=torch.float32).contiguous().clone())
        c.exit_num_classes, c.exit_logit_scale, c.exit_normalize = C, float(logit_scale), bool(normalize)

    def exit_logits(self, pooled: torch.Tensor, k: int) -> torch.Tensor:
        """[B,E] exit k's pooled embedding -> [B,C] fp32 logits of the exit classifier."""
        c = self.config
        if not c.exit_num_classes:
            raise RuntimeError("this DVT tower has no exit classifier: call set_exit_classifier(...) or use "
                               "exit_policy='fixed:k'")
        z = pooled.float()
        z = F.normalize(z, dim=-1) if c.exit_normalize else z
        return c.exit_logit_scale * F.linear(z, self.exit_head_weight[k].float()) + self.exit_head_bias[k].float()

    @contextmanager
    def forced_exit(self, k: int):
        """Within: in eval every image stops at exit k whatever the policy (no classifier; exits after k never run).
        k = the last exit gives every exit's output for every image (anytime accuracy)."""
        if not 0 <= k < self.config.num_exits:
            raise ValueError(f"exit must be in 0..{self.config.num_exits - 1}, got {k}")
        old, self._forced_exit = self._forced_exit, k
        try:
            yield
        finally:
            self._forced_exit = old

    @contextmanager
    def reference_tokens(self):
        """Within: every image takes `config.reference_exit()` (what `flops.counted_macs` counts)."""
        with self.forced_exit(self.config.reference_exit()):
            yield

    def _last_exit(self) -> int:
        """The last exit any image of an eval batch can reach."""
        if self._forced_exit is not None:
            return self._forced_exit
        return self.config.reference_exit()

    def _decides(self) -> bool:
        c = self.config
        return (not self.training and self._forced_exit is None and c.fixed_exit is None
                and c.exit_thresholds is not None)

    # ---- forward ------------------------------------------------------------------------------------
    def _block(self, blk, x, bias, ctx, want_logits: bool):
        """Block.forward with DVT's two inputs: `bias` [B,H,T,T] added to the attention logits, `ctx` [B,T,H_mlp]
        added to the first MLP layer's output; returns (x, logits or None)."""
        h = blk.ln_1(x)
        if want_logits:
            a, logits = blk.attn.forward_with_logits(h, bias)
        else:
            a, logits = blk.attn(h, None if bias is None else bias.to(h.dtype)), None
        x = x + a
        if ctx is None:
            return x + blk.mlp(blk.ln_2(x)), logits
        fc1, act, fc2 = blk.mlp
        return x + fc2(act(fc1(blk.ln_2(x)) + ctx.to(x.dtype))), logits

    def _run_exit(self, k: int, pixel_values: torch.Tensor, prev, want_logits: bool, output_hidden_states: bool,
                  stop: int):
        """Exit k's transformer on its images, blocks 1..stop; prev = (exit k-1's final tokens [b,T',D] before
        ln_post, its logits [b,depth,H,T',T'] or None) for k > 0, None when no block of exit k reads it. Returns
        (tokens after block `stop`, [b,stop,H,T,T] logits or None, hidden states or None)."""
        c = self.config
        n_cls = int(c.class_token)
        body = self.exit_bodies[k]
        x = body.embed(pixel_values)  # [b, n_cls + g_k^2, D]
        biases = tokens = None
        if prev is not None:
            g_in, g_out = c.exit_grids[k - 1], c.exit_grids[k]
            tokens, prev_logits = prev
            if self.relation_reuse is not None:
                biases = self.relation_reuse[k - 1](prev_logits, g_in, g_out, n_cls)
        hidden = [x] if output_hidden_states else None
        logits = []
        for i, blk in enumerate(body.blocks[:stop]):
            ctx = None
            if tokens is not None and self.feature_reuse is not None:
                ctx = self.feature_reuse[k - 1][i](tokens, g_in, g_out, n_cls)
            bias = None if biases is None else biases[i]
            if self.gradient_checkpointing and self.training:
                x, lg = checkpoint(self._block, blk, x, bias, ctx, want_logits, use_reentrant=False)
            else:
                x, lg = self._block(blk, x, bias, ctx, want_logits)
            logits.append(lg)
            if hidden is not None:
                hidden.append(x)
        return x, (torch.stack(logits, 1) if want_logits else None), hidden

    def _head(self, k: int, post: torch.Tensor) -> torch.Tensor:
        """Exit k's pooled embedding [b,E] from its tokens after ln_post [b,T,D] (its body's pooling + projection)."""
        n_cls = int(self.config.class_token)
        o = DripVisionOutput(features=post[:, n_cls:], mask=post.new_ones(post.shape[0], post.shape[1] - n_cls,
                                                                             dtype=torch.bool),
                             cls_token=post[:, 0] if n_cls else None)
        return DripVisionModel.forward_head(self.exit_bodies[k], o)

    def forward_features(self, pixel_values: torch.Tensor, boundaries: Optional[torch.Tensor] = None,
                         output_hidden_states: bool = False, output_layer: Optional[int] = None) -> DVTOutput:
        """`output_layer` = k (what the LLaVA tower reads): each image's hidden_states[k] of the exit it takes,
        before ln_post. The last exit an image can reach runs blocks 1..k only; the exits before it run in full
        when they decide (their confidence needs their embedding) or feed its reuse (k > 0), and are skipped
        otherwise; `exit_pooled` / `exit_features` are then None (no exit's output is complete)."""
        self.check_no_boundaries(boundaries)
        c = self.config
        K, B = c.num_exits, pixel_values.shape[0]
        dev = pixel_values.device
        stop = self.stop_index(output_layer)
        stopped = output_layer is not None
        last = K - 1 if self.training else self._last_exit()
        decides = self._decides()
        reuses = c.feature_reuse or c.relation_reuse
        first = 0 if not stopped or decides or (stop > 0 and reuses) else last
        thresholds = c.exit_thresholds
        rows = torch.arange(B, device=dev)  # images still running, as batch indices
        exit_index = torch.full((B,), last, dtype=torch.long, device=dev)
        exit_ran = torch.zeros(B, K, dtype=torch.bool, device=dev)
        confidence = torch.zeros(B, K, device=dev) if decides and last > 0 else None
        ran = {}  # per exit run: (rows, its output tokens, pooled or None, hidden or None)
        prev = None
        for k in range(first, last + 1):
            n_blocks = stop if k == last else c.depth
            keep = stopped and k < last  # a full run whose state after block `stop` may be an image's output
            x, logits, hidden = self._run_exit(k, pixel_values if len(rows) == B else pixel_values[rows], prev,
                                               c.relation_reuse and k < last, output_hidden_states or keep,
                                               n_blocks)
            exit_ran[rows, k] = True
            if stopped:
                pooled = self._head(k, self.exit_bodies[k].ln_post(x)) if k < last else None
                ran[k] = (rows, hidden[stop] if keep else x, pooled, None)
            else:
                post = self.exit_bodies[k].ln_post(x)
                pooled = self._head(k, post)
                ran[k] = (rows, post, pooled, hidden)
            if k == last:
                break
            if decides:
                conf = self.exit_logits(pooled, k).softmax(dim=-1).max(dim=-1).values  # [b]
                confidence[rows, k] = conf
                stop_here = conf >= thresholds[k]
                exit_index[rows[stop_here]] = k
                go = ~stop_here
                rows, x = rows[go], x[go]
                logits = None if logits is None else logits[go]
                if len(rows) == 0:
                    break
            prev = (x, logits)
        return self._assemble(ran, exit_index, exit_ran, confidence, B, stop, stopped)

    def _assemble(self, ran: dict, exit_index, exit_ran, confidence, B: int, stop: int, stopped: bool) -> DVTOutput:
        """Each image's exit's tokens (padded to the longest), and every exit's embedding and tokens."""
        c = self.config
        n_cls, L, dev = int(c.class_token), c.num_patches, exit_index.device
        taken = sorted(set(exit_index.tolist()))
        S = max(c.exit_tokens()[k] for k in taken)
        features = mask = hidden = None
        patch_token = torch.zeros(B, L, dtype=torch.long, device=dev)
        for k in taken:
            rows, post, _, hid = ran[k]
            sel = exit_index[rows] == k  # rows of this exit that stopped here
            r, n = rows[sel], c.exit_tokens()[k]
            part = F.pad(post[sel], (0, 0, 0, S - n))  # [b, n_cls + S, D]
            features = _fill(r, part, B) if features is None else features.index_copy(0, r, part)
            m = (torch.arange(n_cls + S, device=dev) < n_cls + n).expand(len(r), -1)
            mask = _fill(r, m, B) if mask is None else mask.index_copy(0, r, m)
            if hid is not None:
                parts = [F.pad(h[sel], (0, 0, 0, S - n)) for h in hid]
                hidden = ([_fill(r, p, B) for p in parts] if hidden is None
                          else [h.index_copy(0, r, p) for h, p in zip(hidden, parts)])
            patch_token[r] = exit_patch_token(c, k).to(dev)
        exit_pooled = exit_features = None
        if not stopped:
            E, D = c.embed_dim, c.hidden_size
            exit_pooled = [_fill(ran[k][0], ran[k][2], B) if k in ran else features.new_zeros(B, E)
                           for k in range(c.num_exits)]
            exit_features = [_fill(ran[k][0], ran[k][1][:, n_cls:], B) if k in ran else features.new_zeros(B, n, D)
                             for k, n in enumerate(c.exit_tokens())]
        return DVTOutput(
            features=features[:, n_cls:], mask=mask[:, n_cls:], num_tokens=mask[:, n_cls:].sum(1), boundaries=None,
            rate_loss=features.new_zeros((), dtype=torch.float32), pooled=None,
            cls_token=features[:, 0] if n_cls else None,
            hidden_states=tuple(hidden) if hidden is not None else None,
            hidden_masks=tuple(mask for _ in hidden) if hidden is not None else None,
            patch_token=patch_token, patch_depth=torch.full_like(patch_token, stop),
            exit_index=exit_index, exit_ran=exit_ran, exit_pooled=exit_pooled, exit_features=exit_features,
            exit_confidence=confidence)

    def forward_head(self, out: DVTOutput) -> torch.Tensor:
        """[B,E]: each image's embedding from the exit it took."""
        return torch.stack(out.exit_pooled)[out.exit_index, torch.arange(len(out.exit_index),
                                                                         device=out.exit_index.device)]


def task_embeddings(out) -> list:
    """The embeddings a trainer puts its task loss on, summed (the paper's joint objective): every exit's
    (`exit_pooled`) for a cascade's output, else [pooled] (any other tower family)."""
    exits = getattr(out, "exit_pooled", None)
    return list(exits) if exits is not None else [out.pooled]


# ---- thresholds for a budget, anytime / budgeted accuracy -------------------------------------------------
def assign_exits(confidence: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """[N] long: the exit each sample takes, the first k < K-1 with confidence[:, k] >= thresholds[k], else K-1."""
    N, K = confidence.shape
    T = torch.tensor([*thresholds, -math.inf], dtype=confidence.dtype, device=confidence.device)
    if len(T) != K:
        raise ValueError(f"{K} exits need {K - 1} thresholds, got {len(thresholds)}")
    return (confidence >= T).to(torch.int8).argmax(dim=1)  # the first True (the last column always is)


def thresholds_for_fractions(confidence: torch.Tensor, fractions: Sequence[float]) -> list[float]:
    """The official rule: at exit k, the floor(N * fractions[k]) most confident samples still running leave (none
    when that many do not remain: threshold inf). The official threshold is the n-th confidence itself; here it is
    halfway to the next one, so the same samples leave and a sample's decision does not hinge on float rounding
    when the model recomputes its confidence (ties still leave together)."""
    N, K = confidence.shape
    out = [math.inf] * (K - 1)
    done = torch.zeros(N, dtype=torch.bool, device=confidence.device)
    for k in range(K - 1):
        n_out = math.floor(N * float(fractions[k]))
        s = confidence[~done, k].sort(descending=True).values
        if 0 < n_out <= len(s):
            out[k] = float(s[n_out - 1] + s[n_out]) / 2 if n_out < len(s) else float(s[n_out - 1])
        done |= confidence[:, k] >= out[k]
    return out


def fit_exit_thresholds(confidence: torch.Tensor, exit_macs: Sequence[float], budget_macs: float,
                        ratios: Optional[Sequence[float]] = None) -> list[float]:
    """Thresholds (one per exit but the last) whose mean MACs per image on this split are <= budget_macs, the most
    compute (hence accuracy) that fits, as the paper fits them on a train split: exit fractions follow a geometric
    law p_k ~ q^k (the official code sweeps q = 0.05..2.95; here `ratios`, default 601 values from 1e-3 to 1e3,
    plus everyone at the first / the last exit), `thresholds_for_fractions` turns each law into thresholds, and the
    thresholds' realised mean cost decides.

    confidence: [N,K] each exit's confidence (max softmax) per sample; exit_macs: [K] MACs of an image that leaves at
    exit k (cumulative: every exit it ran, e.g. `flops.dvt_exit_macs(config)`)."""
    conf = torch.as_tensor(confidence, dtype=torch.float64)
    macs = torch.as_tensor(exit_macs, dtype=torch.float64)
    N, K = conf.shape
    if len(macs) != K:
        raise ValueError(f"exit_macs needs {K} values, got {len(macs)}")
    if budget_macs < float(macs[0]):
        raise ValueError(f"budget {budget_macs:.4g} MACs is below the first exit's {float(macs[0]):.4g}")
    qs = torch.logspace(-3, 3, 601, dtype=torch.float64) if ratios is None else torch.as_tensor(ratios)
    candidates = [[-math.inf] * (K - 1), [math.inf] * (K - 1)]
    for q in qs.tolist():
        p = torch.tensor([q ** k for k in range(K)], dtype=torch.float64)
        candidates.append(thresholds_for_fractions(conf, (p / p.sum()).tolist()))
    best, best_cost = None, -math.inf
    for T in candidates:
        cost = float(macs[assign_exits(conf, T)].mean())
        if best_cost < cost <= budget_macs:
            best, best_cost = T, cost
    return best


@dataclass
class ExitPredictions:
    """Every exit's answer on a labelled set: confidence / prediction [N,K], labels [N]."""

    confidence: torch.Tensor
    prediction: torch.Tensor
    labels: torch.Tensor

    def anytime_top1(self) -> list[float]:
        """Top-1 of each exit on every image (the paper's anytime classification)."""
        return (self.prediction == self.labels[:, None]).double().mean(0).tolist()

    def budgeted(self, thresholds: Sequence[float], exit_macs: Sequence[float]) -> dict:
        """Top-1, mean MACs and the fraction leaving at each exit when each image leaves by `thresholds`."""
        exits = assign_exits(self.confidence, thresholds)
        pred = self.prediction.gather(1, exits[:, None])[:, 0]
        K = self.confidence.shape[1]
        return {"top1": float((pred == self.labels).double().mean()),
                "mean_macs": float(torch.as_tensor(exit_macs, dtype=torch.float64)[exits].mean()),
                "exit_fractions": (torch.bincount(exits, minlength=K).double() / len(exits)).tolist()}


@torch.no_grad()
def exit_predictions(model: DVTVisionModel, batches: Iterable) -> ExitPredictions:
    """Every exit's confidence and prediction (exit classifier, `set_exit_classifier`) on (pixel_values, labels)
    batches, in eval mode, every image through every exit."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    conf, pred, labels = [], [], []
    p = next(model.parameters())
    try:
        with model.forced_exit(model.config.num_exits - 1):
            for x, y in tqdm(batches, desc="dvt exits", leave=False):
                out = model.forward_features(x.to(device=p.device, dtype=p.dtype))
                probs = torch.stack([model.exit_logits(z, k).softmax(-1) for k, z in enumerate(out.exit_pooled)], 1)
                c, a = probs.max(dim=-1)  # [b,K]
                conf.append(c.cpu())
                pred.append(a.cpu())
                labels.append(torch.as_tensor(y).cpu())
    finally:
        model.train(was_training)
    return ExitPredictions(torch.cat(conf), torch.cat(pred), torch.cat(labels))
