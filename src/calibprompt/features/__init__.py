"""Frozen image features, computed once per (weights, transform, image content, view[, pixel noise]) and
reused."""

from calibprompt.features.cache import FeatureCache, Noise

__all__ = ["FeatureCache", "Noise"]
