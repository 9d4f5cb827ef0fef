"""CoOp prompt learner: learned context vectors spliced into each class prompt.

For class k the tokenised prompt is ``[SOT] X X ... X <class name>. [EOT] pad...`` with n_ctx
placeholder words X. Their embeddings are replaced by the context vectors; everything else (start
token, class tokens, period, end token, padding) is embedded once, without gradient, as frozen buffers.
Positions: ``end`` = ctx then class; ``front`` = class then ctx; ``middle`` = half, class, half.
"""

from __future__ import annotations

import torch
from torch import nn

from calibprompt.backbones.base import Backbone

POSITIONS = ("end", "middle", "front")
PLACEHOLDER = "X"


class PromptLearner(nn.Module):
    """Context vectors ``ctx`` of shape (n_ctx, D) (shared) or (K, n_ctx, D) (class-specific, CSC).

    ``init``: ``None`` draws ctx i.i.d. from N(0, init_std^2) (the paper: std 0.02); a phrase such as
    "a photo of a" starts ctx at that phrase's token embeddings, with n_ctx = its token count.
    """

    def __init__(self, backbone: Backbone, classnames: list[str], n_ctx: int = 16,
                 init: str | None = None, position: str = "end", csc: bool = False,
                 init_std: float = 0.02, generator: torch.Generator | None = None):
        super().__init__()
        if position not in POSITIONS:
            raise ValueError(f"class-token position {position!r} is not one of {', '.join(POSITIONS)}")
        if not classnames:
            raise ValueError("PromptLearner needs at least one class name")
        self.classnames = [c.replace("_", " ") for c in classnames]
        self.position = position
        k = len(self.classnames)
        dim = backbone.info.token_dim
        dtype = backbone.dtype
        with torch.no_grad():
            if init:
                init_ids = backbone.tokenize([init])
                n_init = int(backbone.token_counts(init_ids)[0]) - 2  # minus start and end tokens
                ctx = backbone.embed_tokens(init_ids)[0, 1 : 1 + n_init].clone()
                n_ctx = n_init
                if csc:
                    ctx = ctx.unsqueeze(0).repeat(k, 1, 1)
            else:
                if n_ctx < 1:
                    raise ValueError(f"n_ctx must be >= 1, got {n_ctx}")
                shape = (k, n_ctx, dim) if csc else (n_ctx, dim)
                ctx = torch.randn(shape, generator=generator, dtype=torch.float32) * init_std
        self.n_ctx = n_ctx
        self.ctx = nn.Parameter(ctx.to(dtype))

        prompts = [" ".join([PLACEHOLDER] * n_ctx) + " " + name + "." for name in self.classnames]
        ids = backbone.tokenize(prompts)
        ids = ids[:, : int(backbone.real_lengths(ids).max())]  # exact: see Backbone.real_lengths
        placeholder = ids[0, 1]
        if n_ctx + 2 > int(backbone.info.context_length):  # start token + context + end token must fit
            raise ValueError(f"prompt.n_ctx {n_ctx} does not fit {backbone.info.name}'s text encoder of "
                             f"{backbone.info.context_length} tokens (with the start and end tokens); lower prompt.n_ctx")
        if not bool((ids[:, 1 : 1 + n_ctx] == placeholder).all()):
            raise ValueError(
                f"the tokenizer of {backbone.info.name} does not map each placeholder word "
                f"{PLACEHOLDER!r} to one token; cannot locate the context positions"
            )
        # Number of tokens of each class name (needed to move the class tokens for front/middle).
        name_ids = backbone.tokenize(self.classnames)
        self.register_buffer("name_lens", (backbone.token_counts(name_ids) - 2).clamp(min=1), persistent=False)
        needed = 1 + n_ctx + int(self.name_lens.max()) + 2  # start, context, class name, ".", end
        if needed > int(backbone.info.context_length):
            from calibprompt.progress import note

            note(f"prompt.n_ctx {n_ctx}: the longest class prompt needs {needed} tokens and {backbone.info.name}'s text "
                 f"encoder keeps {backbone.info.context_length}, so class names are cut (all classes may get the same "
                 "prompt); lower prompt.n_ctx unless this reproduces the official code's truncation",
                 key=f"truncated:{backbone.info.name}:{n_ctx}")
        with torch.no_grad():
            embedded = backbone.embed_tokens(ids).to(dtype)
        self.register_buffer("ids", ids, persistent=False)
        self.register_buffer("prefix", embedded[:, :1].clone(), persistent=False)
        self.register_buffer("suffix", embedded[:, 1 + n_ctx :].clone(), persistent=False)

    @classmethod
    def from_config(cls, backbone: Backbone, classnames: list[str], prompt_cfg: dict, seed: int) -> "PromptLearner":
        """The learner of a run config's ``prompt:`` section, its random context drawn from its own
        generator seeded with ``seed`` (the run's seed)."""
        p = prompt_cfg
        return cls(backbone, classnames, n_ctx=int(p["n_ctx"]), init=p["init"], position=p["position"],
                   csc=bool(p["csc"]), init_std=float(p["init_std"]), generator=torch.Generator().manual_seed(int(seed)))

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    @property
    def prefix_length(self) -> int:
        """Positions every class prompt shares (the start token and a shared context placed before the
        class name), for ``Backbone.encode_shared_prefix``; 0 when they differ (CSC, class in front/middle)."""
        return 1 + self.n_ctx if self.position == "end" and self.ctx.dim() == 2 else 0

    def forward(self, ctx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Assembled prompt embeddings (K, L, D) and the matching token ids (K, L).

        ``ctx`` overrides the learner's own context (used to run several configurations at once)."""
        ctx = self.ctx if ctx is None else ctx
        k = self.n_classes
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(k, -1, -1)
        if self.position == "end":
            return torch.cat([self.prefix, ctx, self.suffix], dim=1), self.ids
        rows = []
        half = self.n_ctx // 2
        for i in range(k):
            n = int(self.name_lens[i])
            name, rest = self.suffix[i : i + 1, :n], self.suffix[i : i + 1, n:]
            pieces = [self.prefix[i : i + 1]]
            if self.position == "front":
                pieces += [name, ctx[i : i + 1], rest]
            else:
                pieces += [ctx[i : i + 1, :half], name, ctx[i : i + 1, half:], rest]
            rows.append(torch.cat(pieces, dim=1))
        return torch.cat(rows, dim=0), self.ids

    def text_features(self, backbone: Backbone, ctx: torch.Tensor | None = None,
                      shared_prefix: bool = False) -> torch.Tensor:
        """L2-normalised class features (K, embed_dim) for the current context. ``shared_prefix``: with a
        shared context before the class name, let a causal tower compute the start token and the context
        once for all classes (``Backbone.encode_shared_prefix``; equal to the full pass within 1e-5)."""
        embeddings, ids = self(ctx)
        # Pooling and masks depend only on where real tokens are; moving the class tokens (front/middle)
        # keeps every sequence's length and its end-token position, so the prompt's own ids serve.
        if shared_prefix and self.prefix_length:
            feats = backbone.encode_shared_prefix(embeddings, ids, self.prefix_length)
        else:
            feats = backbone.encode_embeddings(embeddings, ids)
        return torch.nn.functional.normalize(feats.float(), dim=-1)
