"""Attention for the shared-prefix text pass (``Backbone.encode_shared_prefix``), written once for every
causal text tower: a prefix (1, P, D) shared by K prompts and their suffixes (K, S, D) that attend to it.

With queries, keys and values already projected (and per-head scale ``scale``), the prefix attends to
itself causally, once; each suffix token attends to the whole prefix and to the suffix tokens up to
itself. The prefix's keys and values are projected once, not K times."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, D) -> (B, heads, L, D / heads)."""
    return t.reshape(t.shape[0], t.shape[1], heads, t.shape[-1] // heads).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, d) -> (B, L, heads * d)."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


def causal_mask(length: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive (L, L) mask: 0 on and below the diagonal, -inf above."""
    return torch.full((length, length), float("-inf"), dtype=dtype, device=device).triu(1)


def prefix_attention(prefix_qkv: tuple, suffix_qkv: tuple, heads: int, mask: torch.Tensor,
                     scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefix output (1, P, D), suffix outputs (K, S, D)) before the output projection. ``mask`` is the
    additive causal mask of the whole (P + S) sequence."""
    qp, kp, vp = (split_heads(t, heads) for t in prefix_qkv)
    qs, ks, vs = (split_heads(t, heads) for t in suffix_qkv)
    p, k = qp.shape[2], qs.shape[0]
    out_p = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask[:p, :p], scale=scale)
    keys = torch.cat([kp.expand(k, -1, -1, -1), ks], dim=2)
    values = torch.cat([vp.expand(k, -1, -1, -1), vs], dim=2)
    out_s = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask[p:, :], scale=scale)
    return merge_heads(out_p), merge_heads(out_s)
