"""Frozen image features, computed once per (weights, transform, image content, view) and reused."""

from calibprompt.features.cache import FeatureCache

__all__ = ["FeatureCache"]
