"""Train-time losses: one registry (``LOSSES``), ``get_loss`` and ``build_objective``.

Every loss is called as
``loss(logits, labels, text_features=None, *, zs_logits=None, zs_text_features=None) -> scalar``
and accepts ``convention="standard"|"reference"`` (see docs/losses.md).
"""

from .base import CONVENTIONS, Loss, LossInputs
from .calibration import class_frequencies, smoothed_frequencies
from .objective import Objective, build_objective
from .registry import LOSSES, canonical_name, default_weight, get_loss, list_losses, register_loss

__all__ = [
    "CONVENTIONS",
    "LOSSES",
    "Loss",
    "LossInputs",
    "Objective",
    "build_objective",
    "canonical_name",
    "class_frequencies",
    "default_weight",
    "get_loss",
    "list_losses",
    "register_loss",
    "smoothed_frequencies",
]
