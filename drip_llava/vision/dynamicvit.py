"""DynamicViT (Rao et al., NeurIPS 2021): learned token pruning on the plain ViT body.

Before the blocks listed in `prune_locations` (default n/4, n/2, 3n/4) a small prediction module scores every
remaining patch token from its own features and the mean of the kept ones; stage s keeps keep_rate**s of the
L patches (the CLS token is always kept).

Training: keep decisions are hard Gumbel-Softmax samples (straight-through), multiplied by the previous stage's.
The sequence is not shortened: later blocks get an additive key bias log(keep + eps), so a dropped token still
gets a weight of about eps and the gradient reaches the predictor through attention; `rate_loss` is the ratio
loss mean_s (mean keep_s - keep_rate**s)^2 (scaled by `rate_loss_weight`, 2 as in the paper). A policy that keeps
no patch leaves CLS (or, without CLS, a uniform attention) and the predictor's mean is over max(1, kept): no NaN.
Training therefore saves no compute; only eval does.
Eval: each stage keeps the top-k scores (k = `keep_counts()`, the same for every image) and really removes the
rest, so the output has k_last tokens per image and no padding.
Distillation to the unpruned ViT (the paper's option): `distillation_loss(student_out, teacher_out, ...)` = KL of
the class distributions + MSE of each kept token against the teacher's token of the same patch (matched through
`patch_token`); `unpruned_teacher(model)` builds the teacher from the student's own weights. Trainers add
weight * (kl + mse) (0.5 in the paper) with the teacher frozen.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import DripVisionConfig
from .families import FamilyVisionModel, TowerOutput, check_family_config, create_model, register_family
from .model import DripVisionModel, DripVisionOutput

_MASK_EPS = 1e-6  # weight left to a dropped key in training (the paper's eps)


class DynamicViTConfig(DripVisionConfig):
    """The ViT fields plus `keep_rate` (rho: stage s keeps rho**s of the patches), `prune_locations` (block indices
    a pruning stage runs before; None = n/4, n/2, 3n/4) and `gumbel_temperature`."""

    family = "dynamicvit"

    def __init__(self, keep_rate: float = 0.7, prune_locations: Optional[list] = None,
                 gumbel_temperature: float = 1.0, rate_loss_weight: float = 2.0, **kwargs):
        super().__init__(rate_loss_weight=rate_loss_weight, **kwargs)
        check_family_config(self)
        if not 0 < keep_rate <= 1:
            raise ValueError(f"keep_rate must be in (0, 1], got {keep_rate}")
        d = self.depth
        locs = [d // 4, d // 2, 3 * d // 4] if prune_locations is None else [int(i) for i in prune_locations]
        if not locs or locs != sorted(set(locs)) or not 0 < locs[0] or locs[-1] >= d:
            raise ValueError(f"prune_locations must be increasing block indices in 1..{d - 1}, got {locs}")
        self.keep_rate, self.prune_locations = float(keep_rate), locs
        self.gumbel_temperature = gumbel_temperature

    def keep_counts(self) -> list[int]:
        """Patches kept after each stage in eval: round(L * rho**s), at least 1."""
        L = self.num_patches
        return [max(1, round(L * self.keep_rate ** s)) for s in range(1, len(self.prune_locations) + 1)]

    def tokens_after_block(self, i: int) -> int:
        """Non-CLS tokens in hidden_states[i] in eval (0 = embeddings; negative i counts from the end). In training
        the sequence keeps all L tokens and hidden_masks mark the kept ones."""
        i = i % (self.depth + 1)
        passed = [k for loc, k in zip(self.prune_locations, self.keep_counts()) if loc < i]
        return passed[-1] if passed else self.num_patches

    @property
    def max_tokens(self) -> int:
        return self.keep_counts()[-1]


class KeepPredictor(nn.Module):
    """Per-token (keep, drop) log-probabilities from [local half | masked mean of the global half] features."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                      nn.Linear(dim // 4, 2))

    def forward(self, x: torch.Tensor, policy: Optional[torch.Tensor]) -> torch.Tensor:
        """x: [B,N,D] patch tokens; policy: [B,N,1] current keep (None = all kept) -> [B,N,2] log-probs."""
        x = self.in_conv(x)
        half = x.shape[-1] // 2
        local, glob = x[..., :half], x[..., half:]
        if policy is None:
            glob = glob.mean(dim=1, keepdim=True)
        else:  # mean over kept tokens; clamp so a policy that keeps nothing gives 0, not 0/0
            glob = (glob * policy).sum(dim=1, keepdim=True) / policy.sum(dim=1, keepdim=True).clamp(min=1)
        return F.log_softmax(self.out_conv(torch.cat([local, glob.expand_as(local)], dim=-1)), dim=-1)


@register_family("dynamicvit")
class DynamicViTVisionModel(FamilyVisionModel):
    config_class = DynamicViTConfig

    def __init__(self, config: DynamicViTConfig):
        super().__init__(config)
        self.predictors = nn.ModuleList(KeepPredictor(config.hidden_size) for _ in config.prune_locations)
        self.post_init()

    def forward_features(self, pixel_values: torch.Tensor, boundaries: Optional[torch.Tensor] = None,
                         output_hidden_states: bool = False, output_layer: Optional[int] = None) -> TowerOutput:
        """`output_layer` = k: hidden_states[k] (the stages before block k applied; training: all L tokens, `mask`
        = kept) and the ratio loss of those stages (0 when none ran); later blocks and stages do not run."""
        c = self.config
        x, stop, n_cls = self.begin(pixel_values, boundaries, output_layer)
        B, T, D = x.shape
        L = T - n_cls
        stage_of = {loc: s for s, loc in enumerate(c.prune_locations)}
        patch_depth = torch.full((B, L), stop, dtype=torch.long, device=x.device)
        patch_idx = torch.arange(L, device=x.device).expand(B, -1)  # [B,N] original patch of each current token
        policy = None  # training: [B,L,1] hard keep decisions (straight-through)
        attn_mask = None
        losses = []
        cls_mask = x.new_ones(B, n_cls, dtype=torch.bool)
        tok_mask = x.new_ones(B, T, dtype=torch.bool)
        hidden, masks = ([x], [tok_mask]) if output_hidden_states else (None, None)
        for i, blk in enumerate(self.blocks[:stop]):
            if i in stage_of:
                s = stage_of[i]
                logp = self.predictors[s](x[:, n_cls:], policy)  # [B,N,2]
                if self.training:
                    keep = F.gumbel_softmax(logp.float(), tau=c.gumbel_temperature, hard=True)[..., :1].to(x.dtype)
                    policy = keep if policy is None else keep * policy  # [B,L,1]
                    losses.append((policy.float().mean(dim=(1, 2)) - c.keep_rate ** (s + 1)).square().mean())
                    kept = policy[..., 0] > 0
                    patch_depth = torch.where(kept | (patch_depth < stop), patch_depth, i)
                    tok_mask = torch.cat([cls_mask, kept], dim=1)
                    full = torch.cat([x.new_ones(B, n_cls, 1), policy], dim=1)  # [B,T,1]
                    attn_mask = (full + _MASK_EPS).log().transpose(1, 2)[:, None]  # [B,1,1,T] per key
                else:  # top-k, tokens really removed; kept ones stay in raster order
                    k = c.keep_counts()[s]
                    top = logp[..., 0].argsort(dim=1, descending=True, stable=True)[:, :k].sort(dim=1).values
                    dropped = torch.ones_like(patch_idx, dtype=torch.bool).scatter_(1, top, False)
                    patch_depth.scatter_(1, patch_idx.masked_select(dropped).view(B, -1), i)
                    patch_idx = patch_idx.gather(1, top)
                    x = torch.cat([x[:, :n_cls], x[:, n_cls:].gather(1, top[..., None].expand(-1, -1, D))], dim=1)
                    tok_mask = x.new_ones(B, x.shape[1], dtype=torch.bool)
            x = self.run_block(blk, x, attn_mask)
            if hidden is not None:
                hidden.append(x)
                masks.append(tok_mask)
        mask = tok_mask[:, n_cls:]
        if self.training:
            patch_token = torch.where(mask, patch_idx, -1)
        else:
            patch_token = torch.full((B, L), -1, dtype=torch.long, device=x.device)
            patch_token.scatter_(1, patch_idx, torch.arange(patch_idx.shape[1], device=x.device).expand(B, -1))
        loss = torch.stack(losses).mean() if losses else x.new_zeros((), dtype=torch.float32)
        return self.finish(x, mask, loss, hidden, masks, patch_token, patch_depth, ln_post=output_layer is None)


# ---- distillation to the unpruned ViT ---------------------------------------------------------------------------
def unpruned_teacher(model: DripVisionModel) -> DripVisionModel:
    """A frozen plain ViT (family "drip", compression 1) with a copy of `model`'s body weights (a family's own
    parameters, such as the predictors, left out), in eval mode: the teacher when no trained ViT is given."""
    base = DripVisionConfig().to_dict()
    values = {k: v for k, v in model.config.to_dict().items() if k in base}
    teacher = create_model({**values, "family": "drip", "compression": 1.0})
    missing, _ = teacher.load_state_dict(model.state_dict(), strict=False)
    if missing:
        raise ValueError(f"{type(model).__name__} lacks ViT weights the teacher needs: {missing}")
    return teacher.requires_grad_(False).eval()


def distillation_loss(student: TowerOutput, teacher: DripVisionOutput, student_logits: torch.Tensor,
                      teacher_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kl, mse), DynamicViT's distillation terms (its DistillDiffPruningLoss with the token MSE used for ViTs).

    kl: KL(teacher || student) of softmax(logits) [B,C], mean over images. mse: squared difference, averaged over
    channels and over the (image, patch) pairs the student kept, between the student's output token of each patch
    (`patch_token`, training or eval) and the teacher's token of that patch; 0 when no patch is kept. `teacher` must
    give every patch a token in raster order (a plain ViT); it is not differentiated."""
    patch_token = getattr(student, "patch_token", None)
    if patch_token is None:
        raise ValueError("distillation needs a tower family's output (TowerOutput.patch_token); DRIP has none")
    B, L = patch_token.shape
    if teacher.features.shape[:2] != (B, L) or not bool(teacher.mask.all()):
        raise ValueError(f"the teacher must give all {L} patches a token (a plain ViT), got features "
                         f"{tuple(teacher.features.shape)}")
    kl = F.kl_div(F.log_softmax(student_logits.float(), dim=-1), F.log_softmax(teacher_logits.detach().float(), dim=-1),
                  reduction="batchmean", log_target=True)
    kept = patch_token >= 0  # [B,L]
    D = student.features.shape[-1]
    own = student.features.gather(1, patch_token.clamp(min=0)[..., None].expand(-1, -1, D))  # [B,L,D] patch's token
    err = (own.float() - teacher.features.detach().float()).square().mean(-1)  # [B,L]
    mse = (err * kept).sum() / kept.sum().clamp(min=1)
    return kl, mse
