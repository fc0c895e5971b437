"""A-ViT (Yin et al., CVPR 2022): adaptive token halting on the plain ViT body.

After every block each still-running token (CLS included) gets a halting score from one neuron of its embedding,
h = sigmoid(gamma * x[..., 0] + beta) (gamma, beta: two scalars shared by all blocks); the last block gives h = 1.
Scores add up per token; a token halts at the first block where the sum reaches 1 - eps, and its remainder R is 1
minus the scores before. The token's output is the A-ViT mean of its states, weighted by its halting distribution
(h at each block before halting, R at the halting block; the weights sum to 1), in training and eval alike.

Training: the sequence keeps every token; halted tokens keep their state and are masked out of later attention as
keys (each halted query still sees itself, so a fully halted image gives no NaN). Eval: halted tokens are really
skipped: each block runs on the running tokens of each image only (gathered and padded to the batch's longest
count, padded keys masked), so an image's result never depends on its batch-mates.
`rate_loss` = ponder_weight * ponder + distr_weight * KL(target || H): ponder is the mean over tokens of blocks run
+ remainder; H is the batch's mean halting distribution over depths 1..depth and the target a Gaussian over
depths centred at `target_depth` (std `target_std`), normalised. `rate_loss_weight` is 1: the paper's weights are
inside (5e-4, 0.1).

Outputs: `features` keep all L patch tokens at their halting state; `hidden_states[i]` holds every token's state
after min(i, its halting depth) blocks (what the LLaVA tower reads). With `drop_halted_before = k`, tokens that
halted before block k (halting depth <= k) are masked out of `mask` / `hidden_masks` (at hidden state i, those
with depth <= min(i, k)), so the LLM does not see them. `patch_depth` is each patch's halting depth;
`token_depth` (AViTOutput) the same for every token, CLS first.

`output_layer` = k (what the LLaVA tower reads) runs blocks 1..k only and returns hidden_states[k] with its mask:
each token's state after min(k, its halting depth) blocks, the state the halting rule leaves it with, not the
depth-weighted mean of the full output (a token still running at k has no halting distribution yet). Depths are
then min(halting depth, k), and `rate_loss` is the loss of those depths: tokens still running count as halting at
k (their remainder there) against the target with its mass past k folded onto k (the full loss when k = depth).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import nn
from transformers import initialization as init

from .config import DripVisionConfig
from .families import FamilyVisionModel, TowerOutput, check_family_config, register_family


class AViTConfig(DripVisionConfig):
    """The ViT fields plus the halting rule (`halt_eps`, initial `halt_gamma` / `halt_beta`), the auxiliary loss
    (`ponder_weight`, `distr_weight`, `target_depth` (default 2/3 of depth, as A-ViT's 8 of 12), `target_std`)
    and `drop_halted_before` (None, or a block index 1..depth-1: see the module docstring)."""

    family = "avit"

    def __init__(self, halt_eps: float = 0.01, halt_gamma: float = 10.0, halt_beta: float = -10.0,
                 ponder_weight: float = 5e-4, distr_weight: float = 0.1, target_depth: Optional[float] = None,
                 target_std: float = 1.0, drop_halted_before: Optional[int] = None, rate_loss_weight: float = 1.0,
                 **kwargs):
        super().__init__(rate_loss_weight=rate_loss_weight, **kwargs)
        check_family_config(self)
        d = self.depth
        if not 0 < halt_eps < 1:
            raise ValueError(f"halt_eps must be in (0, 1), got {halt_eps}")
        target_depth = 2 * d / 3 if target_depth is None else float(target_depth)
        if not 1 <= target_depth <= d or target_std <= 0:
            raise ValueError(f"target_depth must be in 1..{d} and target_std > 0, got {target_depth}, {target_std}")
        if drop_halted_before is not None and not 1 <= int(drop_halted_before) < d:
            raise ValueError(f"drop_halted_before must be None or a block index in 1..{d - 1}, "
                             f"got {drop_halted_before}")
        self.halt_eps, self.halt_gamma, self.halt_beta = float(halt_eps), float(halt_gamma), float(halt_beta)
        self.ponder_weight, self.distr_weight = float(ponder_weight), float(distr_weight)
        self.target_depth, self.target_std = target_depth, float(target_std)
        self.drop_halted_before = None if drop_halted_before is None else int(drop_halted_before)

    def target_distribution(self) -> torch.Tensor:
        """[depth] float: target probability of halting at depth 1..depth (a normalised Gaussian)."""
        d = torch.arange(1, self.depth + 1, dtype=torch.float64)
        p = torch.exp(-0.5 * ((d - self.target_depth) / self.target_std) ** 2)
        return (p / p.sum()).float()

    def reference_depths(self) -> list[int]:
        """Halting depth of each patch in raster order when the patches follow the target distribution
        (patch p runs block i iff p < round(L * P(depth > i))); used for the config's MAC figure."""
        L = self.num_patches
        survive = 1 - self.target_distribution().double().cumsum(0)  # P(depth > i), i = 1..depth
        running = [L] + [round(L * max(0.0, float(s))) for s in survive[:-1]]  # patches entering block i
        return [sum(p < m for m in running) for p in range(L)]

    def reference_tokens(self) -> list[int]:
        """Tokens (CLS included, it runs every block) entering each block under `reference_depths`."""
        depths = self.reference_depths()
        return [int(self.class_token) + sum(d > i for d in depths) for i in range(self.depth)]

    def tokens_after_block(self, i: int) -> int:
        """Non-CLS tokens in hidden_states[i]: every patch (halted ones keep their state; masks say which the
        LLM sees)."""
        return self.num_patches

    @property
    def max_tokens(self) -> int:
        return self.num_patches


@dataclass
class AViTOutput(TowerOutput):
    """TowerOutput plus token_depth: [B,T] long, the halting depth (1..depth) of every token, CLS first."""

    token_depth: Optional[torch.Tensor] = None


@register_family("avit")
class AViTVisionModel(FamilyVisionModel):
    config_class = AViTConfig

    def __init__(self, config: AViTConfig):
        super().__init__(config)
        # shape [1], not a scalar: DeepSpeed broadcasts parameters as bytes (p.data.view(torch.uint8)), which a
        # 0-dim bf16 tensor cannot do
        self.halt_gamma = nn.Parameter(torch.full((1,), config.halt_gamma))
        self.halt_beta = nn.Parameter(torch.full((1,), config.halt_beta))
        self._forced_depth: Optional[torch.Tensor] = None
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if module is self and hasattr(self, "halt_gamma"):  # the halting neuron starts from the config
            init.constant_(self.halt_gamma, self.config.halt_gamma)
            init.constant_(self.halt_beta, self.config.halt_beta)

    @contextmanager
    def reference_tokens(self):
        """Within: every image's tokens halt at `config.reference_depths()` (CLS at the last block), so an eval
        forward runs the token counts `config.reference_tokens()` (the halting neuron still runs)."""
        c = self.config
        depths = [c.depth] * int(c.class_token) + c.reference_depths()
        self._forced_depth = torch.tensor(depths, device=self.halt_beta.device)
        try:
            yield
        finally:
            self._forced_depth = None

    def _halting(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """[B,T] halting score after block i (0-based)."""
        h = torch.sigmoid(self.halt_gamma * x[..., 0].float() + self.halt_beta)
        if i == self.config.depth - 1:
            return torch.ones_like(h)
        if self._forced_depth is not None:
            return h * 0 + (self._forced_depth == i + 1).float().expand_as(h)
        return h

    def _run_running(self, blk, x: torch.Tensor, running: torch.Tensor) -> torch.Tensor:
        """Eval: the block on each image's running tokens only; halted tokens are returned unchanged."""
        counts = running.sum(1)
        n = int(counts.max())
        if n == 0:
            return x
        B, T, D = x.shape
        order = (~running).to(torch.int8).argsort(dim=1, stable=True)[:, :n]  # running tokens first, in order
        xs = x.gather(1, order[..., None].expand(-1, -1, D))
        valid = torch.arange(n, device=x.device)[None] < counts[:, None]  # [B,n]
        attn_mask = None if bool(valid.all()) else valid[:, None, None, :]
        ys = torch.where(valid[..., None], blk(xs, attn_mask), xs)  # rows of a fully halted image: kept as is
        return x.scatter(1, order[..., None].expand(-1, -1, D), ys)

    def forward_features(self, pixel_values: torch.Tensor, boundaries: Optional[torch.Tensor] = None,
                         output_hidden_states: bool = False, output_layer: Optional[int] = None) -> AViTOutput:
        """`output_layer` = k: see the module docstring (hidden_states[k], its mask, the loss truncated at k)."""
        c = self.config
        x, stop, n_cls = self.begin(pixel_values, boundaries, output_layer)
        B, T, D = x.shape
        eye = torch.eye(T, dtype=torch.bool, device=x.device)
        running = torch.ones(B, T, dtype=torch.bool, device=x.device)
        cumul = x.new_zeros(B, T, dtype=torch.float32)
        remainder = x.new_ones(B, T, dtype=torch.float32)
        ponder = x.new_zeros(B, T, dtype=torch.float32)
        token_depth = torch.full((B, T), c.depth, dtype=torch.long, device=x.device)
        out = torch.zeros_like(x)
        weights = []  # per block [B,T]: the halting distribution's mass at that depth
        k_drop = c.drop_halted_before
        hidden, masks = ([x], [running.clone()]) if output_hidden_states else (None, None)
        for i, blk in enumerate(self.blocks[:stop]):
            if self.training:  # sequence kept: halted keys masked, each halted query sees itself
                attn_mask = None if bool(running.all()) else (running[:, None, :] | eye)[:, None]
                x = torch.where(running[..., None], self.run_block(blk, x, attn_mask), x)
            elif bool(running.any()):
                x = self._run_running(blk, x, running)
            h = self._halting(x, i) * running
            cumul = cumul + h
            ponder = ponder + running.float()
            reached = running & (cumul >= 1 - c.halt_eps)
            going = running & ~reached
            w = torch.where(reached, remainder, h * going)
            ponder = ponder + remainder * reached
            remainder = remainder - h * going
            out = out + w[..., None].to(x.dtype) * x
            weights.append(w)
            token_depth = torch.where(reached, i + 1, token_depth)
            running = going
            if hidden is not None:
                hidden.append(x)
                masks.append(token_depth > min(i + 1, k_drop) if k_drop is not None else torch.ones_like(running))
        loss = self._halting_loss(weights, ponder, remainder * running, stop)
        # tokens still running at `stop` < depth keep depth as their sentinel for the mask, stop as blocks run
        mask = token_depth[:, n_cls:] > (min(stop, k_drop) if k_drop is not None else 0)
        token_depth = token_depth.clamp(max=stop)
        patch_depth = token_depth[:, n_cls:]
        patch_token = torch.where(mask, torch.arange(T - n_cls, device=x.device), -1)
        stopped = output_layer is not None
        res = self.finish(x if stopped else out, mask, loss, hidden, masks, patch_token, patch_depth,
                          ln_post=not stopped)
        return AViTOutput(**{f.name: getattr(res, f.name) for f in fields(res)}, token_depth=token_depth)

    def _halting_loss(self, weights: list, ponder: torch.Tensor, left: torch.Tensor, stop: int) -> torch.Tensor:
        """Ponder + KL(target || mean halting distribution) over the `stop` blocks run. Stopped before the last
        block, the loss is that of min(halting depth, stop): tokens still running (`left` = their remainder,
        [B,T]) count as halting at `stop`, and the target's mass past `stop` is folded onto it."""
        c = self.config
        if stop == 0:
            return ponder.new_zeros(())
        if stop < c.depth:
            weights = weights[:-1] + [weights[-1] + left]
            ponder = ponder + left
        dist = torch.stack(weights, -1).mean(dim=(0, 1))  # [stop] H: mean halting distribution
        target = c.target_distribution().to(dist.device)
        target = torch.cat([target[:stop - 1], target[stop - 1:].sum(0, keepdim=True)])
        kl = (target * (target.log() - dist.clamp(min=1e-6).log())).sum()
        return c.ponder_weight * ponder.mean() + c.distr_weight * kl

    @staticmethod
    def mean_depth(out: AViTOutput) -> torch.Tensor:
        """[B] float: mean halting depth of each image's tokens."""
        return out.token_depth.float().mean(1)
