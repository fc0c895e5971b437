"""ToMe (Bolya et al., ICLR 2023): Token Merging on the plain ViT body.

In each block, between attention and MLP, bipartite soft matching merges `r` tokens: the tokens alternate into
sets A and B, each A token points at its most similar B token (cosine of the attention keys, averaged over
heads), and the r most similar pairs are averaged into their B token, weighted by how many patches each holds.
Later attention adds log(size) to the keys' logits (proportional attention), so a merged token counts as the
patches it stands for. The matching is computed without gradient (as in ToMe); training still works through
the merged averages, and a trained ViT works without any training (no new parameters). Every image loses the
same number of tokens per block, so batches need no padding; r = 0 is the plain ViT exactly.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional, Union

import torch

from .config import DripVisionConfig
from .families import FamilyVisionModel, TowerOutput, check_family_config, register_family


class ToMeConfig(DripVisionConfig):
    """The ViT fields plus `merge_r`: tokens merged per block (an int for every block, or one int per block),
    `proportional_attention` (log-size key bias) and `protect_cls` (the CLS token is never merged)."""

    family = "tome"

    def __init__(self, merge_r: Union[int, list] = 8, proportional_attention: bool = True, protect_cls: bool = True,
                 rate_loss_weight: float = 0.0, **kwargs):
        super().__init__(rate_loss_weight=rate_loss_weight, **kwargs)
        check_family_config(self)
        if isinstance(merge_r, (list, tuple)) and len(merge_r) != self.depth:
            raise ValueError(f"merge_r as a list needs one entry per block ({self.depth}), got {len(merge_r)}")
        if any(r < 0 for r in self.merge_schedule_raw(merge_r)):
            raise ValueError(f"merge_r must be >= 0, got {merge_r}")
        self.merge_r = list(merge_r) if isinstance(merge_r, (list, tuple)) else int(merge_r)
        self.proportional_attention, self.protect_cls = proportional_attention, protect_cls

    def merge_schedule_raw(self, merge_r) -> list[int]:
        return [int(r) for r in merge_r] if isinstance(merge_r, (list, tuple)) else [int(merge_r)] * self.depth

    def merge_schedule(self) -> list[tuple[int, int]]:
        """Per block: (tokens entering it incl. CLS, tokens merged in it), r clipped to what matching allows."""
        n_cls = int(self.class_token)
        T, out = self.num_patches + n_cls, []
        for r in self.merge_schedule_raw(self.merge_r):
            protected = n_cls if self.protect_cls else 0
            r = min(r, (T - protected) // 2)  # set A holds ceil(T/2) tokens, the protected ones unmergeable
            out.append((T, r))
            T -= r
        return out

    def tokens_after_block(self, i: int) -> int:
        """Non-CLS tokens in hidden_states[i] (0 = embeddings; negative i counts from the end), every image alike."""
        i = i % (self.depth + 1)
        if i == 0:
            return self.num_patches
        T, r = self.merge_schedule()[i - 1]
        return T - r - int(self.class_token)

    @property
    def max_tokens(self) -> int:
        """Tokens per image after the last block (every image gets the same count)."""
        return self.tokens_after_block(self.depth)


@contextmanager
def _capture_output(module: torch.nn.Module, store: dict):
    handle = module.register_forward_hook(lambda m, args, out: store.__setitem__("out", out))
    try:
        yield
    finally:
        handle.remove()


def bipartite_soft_matching(metric: torch.Tensor, r: int, protect_first: bool):
    """Indices of one ToMe merge step. metric: [B,T,C] -> (unm_idx [B,Ta-r,1] sorted, src_idx [B,r,1],
    dst_idx [B,r,1]): A = even positions, B = odd; src A tokens merge into dst B tokens."""
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)  # [B,Ta,Tb]
        if protect_first:
            scores[:, 0, :] = -torch.inf
        node_max, node_idx = scores.max(dim=-1)  # [B,Ta]
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]  # [B,Ta,1]
        unm_idx = edge_idx[:, r:].sort(dim=1).values  # keeps CLS first and the raster order of the rest
        src_idx = edge_idx[:, :r]
        dst_idx = node_idx[..., None].gather(dim=1, index=src_idx)
    return unm_idx, src_idx, dst_idx


def merge_tokens(t: torch.Tensor, unm_idx, src_idx, dst_idx) -> torch.Tensor:
    """[B,T,C] -> [B,T-r,C]: unmerged A tokens, then B tokens with their merged A tokens summed in."""
    C = t.shape[-1]
    src, dst = t[:, ::2], t[:, 1::2]
    unm = src.gather(1, unm_idx.expand(-1, -1, C))
    moved = src.gather(1, src_idx.expand(-1, -1, C))
    dst = dst.scatter_reduce(1, dst_idx.expand(-1, -1, C), moved, reduce="sum")
    return torch.cat([unm, dst], dim=1)


def new_positions(T: int, unm_idx, src_idx, dst_idx) -> torch.Tensor:
    """[B,T] long: where each token before the merge ends up after it (merged A tokens -> their B token)."""
    B, n_unm = unm_idx.shape[0], unm_idx.shape[1]
    Ta, Tb = (T + 1) // 2, T // 2
    dev = unm_idx.device
    pos_a = torch.empty(B, Ta, dtype=torch.long, device=dev)
    pos_a.scatter_(1, unm_idx[..., 0], torch.arange(n_unm, device=dev).expand(B, -1))
    pos_a.scatter_(1, src_idx[..., 0], n_unm + dst_idx[..., 0])
    pos_b = (n_unm + torch.arange(Tb, device=dev)).expand(B, -1)
    pos = torch.empty(B, T, dtype=torch.long, device=dev)
    pos[:, ::2], pos[:, 1::2] = pos_a, pos_b
    return pos


@register_family("tome")
class ToMeVisionModel(FamilyVisionModel):
    config_class = ToMeConfig

    def forward_features(self, pixel_values: torch.Tensor, boundaries: Optional[torch.Tensor] = None,
                         output_hidden_states: bool = False, output_layer: Optional[int] = None) -> TowerOutput:
        """`output_layer` = k: the merged tokens after block k (hidden_states[k]); later blocks do not run."""
        c = self.config
        x, stop, n_cls = self.begin(pixel_values, boundaries, output_layer)
        B, T, D = x.shape
        size = None  # [B,T,1] patches per token; None while nothing is merged (ViT path, exact)
        patch_token = torch.arange(n_cls, T, device=x.device).expand(B, -1)  # [B,L] token index of each patch
        hidden, masks = ([x], [x.new_ones(B, T, dtype=torch.bool)]) if output_hidden_states else (None, None)
        for blk, (_, r) in zip(self.blocks[:stop], c.merge_schedule()):
            if r == 0 and size is None:
                x = self.run_block(blk, x)
            else:
                x, size, patch_token = self._merge_block(blk, x, size, patch_token, r)
            if hidden is not None:
                hidden.append(x)
                masks.append(x.new_ones(B, x.shape[1], dtype=torch.bool))
        mask = x.new_ones(B, x.shape[1] - n_cls, dtype=torch.bool)
        return self.finish(x, mask, x.new_zeros(()), hidden, masks, patch_token - n_cls,
                           torch.full_like(patch_token, stop), ln_post=output_layer is None)

    def _merge_block(self, blk, x, size, patch_token, r: int):
        """One Block with proportional attention, then r merges between its attention and its MLP."""
        c = self.config
        B, T, D = x.shape
        bias = None
        if size is not None and c.proportional_attention:
            bias = size.log().transpose(1, 2)[:, None]  # [B,1,1,T] additive, per key
        store = {}
        with _capture_output(blk.attn.qkv, store):
            x = x + blk.attn(blk.ln_1(x), bias)
        if r > 0:
            H = blk.attn.num_heads
            keys = store["out"][..., D:2 * D].reshape(B, T, H, D // H).mean(dim=2)  # [B,T,D/H] ToMe's metric
            unm_idx, src_idx, dst_idx = bipartite_soft_matching(keys, r, c.protect_cls and c.class_token)
            size = x.new_ones(B, T, 1) if size is None else size
            x = merge_tokens(x * size, unm_idx, src_idx, dst_idx)
            size = merge_tokens(size, unm_idx, src_idx, dst_idx)
            x = x / size
            patch_token = new_positions(T, unm_idx, src_idx, dst_idx).gather(1, patch_token)
        x = x + blk.mlp(blk.ln_2(x))
        return x, size, patch_token
