"""Attention for the shared-prefix text pass (``Backbone.encode_shared_prefix``), written once for every
causal text tower: a prefix (1, P, D) shared by K prompts and their suffixes (K, S, D) that attend to it.

With queries, keys and values already projected (and per-head scale ``scale``), the prefix attends to
itself causally, once; each suffix token attends to the whole prefix and to the suffix tokens up to
itself. The prefix's keys and values are projected once, not K times.

Between attentions the towers keep the tokens as rows of one flat matrix (:class:`SuffixRows`), each
prompt's suffix only as long as its own class name (measured in benchmarks/bench_prefix.py)."""

from __future__ import annotations

import weakref
from typing import Callable

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
    """(prefix outputs (G, P, D), suffix outputs (K, S, D)) before the output projection, for G prefixes each
    shared by K / G consecutive suffixes (G = 1: one prefix for all). ``mask`` is the additive causal mask
    of the whole (P + S) sequence."""
    qp, kp, vp = (split_heads(t, heads) for t in prefix_qkv)
    qs, ks, vs = (split_heads(t, heads) for t in suffix_qkv)
    g, p, k = qp.shape[0], qp.shape[2], qs.shape[0]
    out_p = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask[:p, :p], scale=scale)
    if g == 1:  # a view, no copy
        kp, vp = kp.expand(k, -1, -1, -1), vp.expand(k, -1, -1, -1)
    else:
        kp, vp = kp.repeat_interleave(k // g, dim=0), vp.repeat_interleave(k // g, dim=0)
    out_s = F.scaled_dot_product_attention(qs, torch.cat([kp, ks], dim=2), torch.cat([vp, vs], dim=2),
                                           attn_mask=mask[p:, :], scale=scale)
    return merge_heads(out_p), merge_heads(out_s)


class SuffixRows:
    """The rows a shared-prefix pass works on: G prefixes of P tokens (one per group of prompts sharing a
    context; G = 1 for one learner), then each prompt's suffix up to its pooled (end) token, K suffixes of
    their own lengths ``lengths`` (K,), in one flat (G*P + sum(lengths), D) matrix.

    Tokens after a prompt's end token never reach its feature in a causal tower, so they are dropped, and
    a short class name does not pay for the longest one: between attentions every layer acts per token on
    the flat rows (one matrix product keeps the cores busier than a padded batch). Attention pads the
    suffixes to the longest (padding sits after each real token, where the causal mask hides it) and
    drops the padding again."""

    def __init__(self, lengths: torch.Tensor, prefix: int, groups: int = 1):
        self.prefix, self.groups, self.k, self.width = prefix, groups, len(lengths), int(lengths.max())
        grid = torch.arange(self.width, device=lengths.device)[None] < lengths[:, None]
        self.slots = grid.flatten().nonzero().squeeze(1)  # the padded (K * width) slot of each real suffix row
        self.last = groups * prefix + torch.cumsum(lengths, 0) - 1  # each prompt's end token in the flat rows
        self.end = prefix + self.width  # positions past this are padding in every prompt

    def embed(self, embeddings: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The flat input rows of (K, L, D) prompt ``embeddings`` plus their ``positions`` (at least
        ``end`` rows): each group's prefix, read from its first prompt, then every prompt's suffix."""
        p, end, d = self.prefix, self.end, embeddings.shape[-1]
        prefixes = embeddings[:: self.k // self.groups, :p] + positions[:p]
        suffixes = embeddings[:, p:end] + positions[p:end]
        return torch.cat([prefixes.reshape(-1, d), suffixes.reshape(-1, d)[self.slots]])

    def _pad(self, rows: torch.Tensor) -> torch.Tensor:
        out = rows.new_zeros(self.k * self.width, rows.shape[-1]).index_copy(0, self.slots, rows)
        return out.view(self.k, self.width, -1)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor,
                  scale: float | None = None) -> torch.Tensor:
        """:func:`prefix_attention` on flat rows: q, k, v (G*P + R, D) -> (G*P + R, D)."""
        p, g = self.prefix * self.groups, self.groups
        out_p, out_s = prefix_attention((q[:p].view(g, self.prefix, -1), k[:p].view(g, self.prefix, -1),
                                         v[:p].view(g, self.prefix, -1)),
                                        (self._pad(q[p:]), self._pad(k[p:]), self._pad(v[p:])), heads, mask, scale)
        return torch.cat([out_p.reshape(-1, out_p.shape[-1]), out_s.reshape(-1, out_s.shape[-1])[self.slots]])


MEMO_SIZE = 8  # prompt tensors whose layout a backbone keeps (a batched trainer's chunks, eval prompts)


def suffix_rows(owner: object, ids: torch.Tensor, prefix: int, pooling: Callable[[torch.Tensor], torch.Tensor],
                groups: int = 1) -> SuffixRows | None:
    """The :class:`SuffixRows` of prompts ``ids`` whose pooled token is ``pooling(ids)`` (None when one lies
    inside the prefix: then the full pass is used). Reading the end positions waits for the device, so the
    layout is kept on ``owner`` for as long as the same ``ids`` tensor (same object, unmodified) comes back,
    as it does at every step of prompt training."""
    if len(ids) % groups:
        raise ValueError(f"{len(ids)} prompts do not split into {groups} groups of equal size")
    pool_of = lambda: pooling(ids)  # noqa: E731
    try:
        version = ids._version
    except RuntimeError:  # an inference-mode tensor has no version counter: no memo
        pool = pool_of()
        return SuffixRows(pool - prefix + 1, prefix, groups) if int(pool.min()) >= prefix else None
    memo = owner.__dict__.setdefault("_suffix_rows", [])
    memo[:] = [m for m in memo if m[0]() is not None]  # forget freed prompt tensors
    for ref, key, rows in memo:
        if ref() is ids and key == (version, prefix, groups):
            return rows
    pool = pool_of()
    rows = SuffixRows(pool - prefix + 1, prefix, groups) if int(pool.min()) >= prefix else None
    memo.append((weakref.ref(ids), (version, prefix, groups), rows))
    del memo[:-MEMO_SIZE]
    return rows
