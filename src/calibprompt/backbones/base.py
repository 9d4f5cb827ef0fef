"""The one interface every Med-VLM adapter implements.

A backbone is frozen. Prompt learning needs five things from it:
1. frozen image features (``encode_image``) and the transforms that feed it;
2. tokenised class prompts (``tokenize``) and where their real tokens end (``real_lengths``);
3. the embeddings of fixed prompt tokens (``embed_tokens``), into which context vectors are spliced;
4. text features *from token embeddings* (``encode_embeddings``), through the same tower as ordinary text;
5. the frozen logit scale.

Adding a model family means one new file with a subclass of :class:`Backbone`.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from calibprompt.backbones.preprocess import Preprocess


class WeightsError(ValueError):
    """Weights missing, unreadable, or not matching the architecture."""


@dataclass(frozen=True)
class BackboneInfo:
    """Static facts about a backbone that callers and result files need."""

    name: str
    family: str  # "clip" (causal, end-of-text pooling), "bert" (CLS pooling), "medclip"
    embed_dim: int  # joint image-text feature width
    token_dim: int  # width of the token-embedding table (= context-vector width)
    context_length: int
    source: str = ""  # where the weights came from (path or hub id)
    extra: dict = field(default_factory=dict)


class Backbone(nn.Module, ABC):
    """Abstract Med-VLM adapter. Subclasses hold the wrapped model as submodules and stay in eval mode."""

    info: BackboneInfo
    preprocess: Preprocess

    # ---- images -------------------------------------------------------------------------------
    @abstractmethod
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, embed_dim) features, not L2-normalised."""

    def image_transform(self, train: bool = False) -> Callable:
        """The transform to apply to a PIL image (it is returned, not applied): it gives a normalised
        (3, H, W) tensor; ``train=True`` adds the paper's crop-and-flip augmentation. Typical use::

            transform = backbone.image_transform(train=False)
            pixels = torch.stack([transform(img) for img in images])   # (B, 3, H, W)
            features = backbone.encode_image(pixels)
        """
        if not isinstance(train, bool):
            raise TypeError(f"image_transform(train) takes True or False and returns the transform, got "
                            f"{type(train).__name__}; use backbone.image_transform(train=False)(image)")
        return self.preprocess.transform(train)

    # ---- text -----------------------------------------------------------------------------------
    @abstractmethod
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Texts -> (K, context_length) token ids, padded as the model's own tokenizer pads."""

    @abstractmethod
    def real_lengths(self, ids: torch.Tensor) -> torch.Tensor:
        """(K,) number of leading positions that influence the pooled feature.

        Sequences may be trimmed to ``real_lengths(ids).max()`` without changing the text features."""

    def token_counts(self, ids: torch.Tensor) -> torch.Tensor:
        """(K,) number of real tokens (start and end tokens included, padding excluded).

        Equals ``real_lengths`` unless pooling also reads padding (MedCLIP), where trimming is not
        exact and ``real_lengths`` returns the full padded length."""
        return self.real_lengths(ids)

    @abstractmethod
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """(K, L) ids -> (K, L, token_dim): the embeddings of fixed prompt tokens, at the depth where
        learned context vectors are spliced in."""

    @abstractmethod
    def encode_embeddings(self, embeddings: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Text features (K, embed_dim) from (K, L, token_dim) embeddings. ``ids`` (K, L) carries the
        token ids of the same positions (for pooling positions and attention masks)."""

    def encode_shared_prefix(self, embeddings: torch.Tensor, ids: torch.Tensor, prefix: int,
                             groups: int = 1) -> torch.Tensor:
        """``encode_embeddings`` for K prompts whose first ``prefix`` positions are the same (the start token
        and a shared learned context) within each of ``groups`` consecutive blocks of K / groups prompts (one
        block per configuration when several train together). A causal text tower computes those positions
        once per block and runs only each prompt's own suffix against them (docs/performance.md); the
        default is the full pass."""
        return self.encode_embeddings(embeddings, ids)

    @abstractmethod
    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """The model's ordinary text path, (K, L) ids -> (K, embed_dim); used for zero-shot."""

    @property
    @abstractmethod
    def logit_scale(self) -> torch.Tensor:
        """exp(s): the frozen multiplier of cosine similarities."""

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the text tower: learned context vectors are kept in it (fp16 in parity
        mode for PLIP/QuiltNet, where some parameters such as LayerNorm stay fp32)."""
        return next(self.parameters()).dtype

    # ---- identity -------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 over the image tower's parameters and buffers: the feature-cache key for weights."""
        cached = getattr(self, "_fingerprint", None)
        if cached is None:
            digest = hashlib.sha256(self.info.name.encode())
            for key, tensor in sorted(self.image_state().items()):
                digest.update(key.encode())
                digest.update(str(tuple(tensor.shape)).encode())
                digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            cached = digest.hexdigest()
            self._fingerprint = cached
        return cached

    @abstractmethod
    def image_state(self) -> dict[str, torch.Tensor]:
        """The image tower's state dict (parameters and buffers), for the fingerprint."""

    def trim(self, ids: torch.Tensor) -> torch.Tensor:
        """Drop trailing positions that cannot influence any pooled feature (exact)."""
        return ids[:, : int(self.real_lengths(ids).max())]

    def train(self, mode: bool = True) -> "Backbone":
        # Frozen: dropout and normalisation statistics never switch to training behaviour.
        return super().train(False)
