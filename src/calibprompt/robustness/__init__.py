"""Certified robustness by randomized smoothing, for prompt-tuned Med-VLMs (docs/robustness.md).

``certified_radius`` and the rest of ``certify.py`` are pure functions of vote counts;
``smoothing.certify_run`` certifies a finished run on noisy views of its test images (cached like
any feature), optionally after PromptSmooth's test-time prompt tuning (``tta.py``).
"""

from calibprompt.robustness.certify import (
    DEFAULT_RADII,
    certified_accuracy,
    certified_radius,
    certify_counts,
    lower_confidence_bound,
)

__all__ = ["DEFAULT_RADII", "certified_accuracy", "certified_radius", "certify_counts", "lower_confidence_bound"]
