"""The one registry of train-time losses: names, default weights, lookup.

Names follow the official CalibPrompt registry so its configs can be read. Lookup is case-insensitive
and treats "-" like "_"; the canonical (upper-case) name is what every object reports.
"""

from __future__ import annotations

from typing import Any

from .base import Loss
from .calibration import CALIBRATION_LOSSES
from .task import TASK_LOSSES
from .text import TEXT_LOSSES

#: canonical name -> loss class, grouped task / calibration / text
LOSSES: dict[str, type[Loss]] = {cls.name: cls for cls in (*TASK_LOSSES, *CALIBRATION_LOSSES, *TEXT_LOSSES)}

#: Default objective weight of each loss: the official yaml values (method.md §3.3, §5, Q12), which
#: win over the different values hard-coded in the official train.py (DCA 15, MMCE 1, Penalty 10).
DEFAULT_WEIGHTS: dict[str, float] = {
    "CE": 1.0,
    "LS": 1.0,
    "FL": 1.0,
    "MBLS": 1.0,
    "LOGITNORM": 1.0,
    "ECCV_ZS": 1.0,
    "SMAC": 1.0,
    "MDCA": 1.0,
    "DCA": 1.0,
    "MMCE": 2.0,
    "ECCV_PENALTY": 1.0,
    "MARGIN_MEAN_VAR": 1.0,
    "AS": 1.0,
    "TEXT_MOMENT_MATCHING": 5.0,
    "CTPT_DISPERSION": 1.0,
    "OTPT_ORTHO": 1.0,
    "KGCOOP": 1.0,
}

#: Other spellings accepted on input (normalised: upper case, "-" -> "_").
ALIASES: dict[str, str] = {
    "ZS_NORM": "ECCV_ZS",
    "ZSNORM": "ECCV_ZS",
    "PENALTY": "ECCV_PENALTY",
}


def canonical_name(name: str) -> str:
    """The registry's spelling of ``name``, or ValueError listing the valid names."""
    if not isinstance(name, str):
        raise ValueError(f"a loss name must be a string, got {name!r}; valid names: {', '.join(LOSSES)}")
    key = name.strip().upper().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in LOSSES:
        raise ValueError(
            f"unknown loss {name!r}; valid names: {', '.join(LOSSES)} "
            f"(case-insensitive; aliases: {', '.join(f'{a}->{c}' for a, c in ALIASES.items())})"
        )
    return key


def get_loss(name: str, **params: Any) -> Loss:
    """Build the loss ``name`` with its parameters (and ``convention="standard"|"reference"``).

    Raises ValueError for an unknown name, an unknown parameter or an invalid value.
    """
    return LOSSES[canonical_name(name)](**params)


def default_weight(name: str) -> float:
    return DEFAULT_WEIGHTS[canonical_name(name)]


def list_losses() -> list[dict[str, Any]]:
    """One record per loss (name, kind, formula, needs, parameters with defaults, default weight)."""
    out = []
    for name, cls in LOSSES.items():
        out.append(
            {
                "name": name,
                "kind": cls.kind,
                "formula": cls.formula,
                "needs": sorted(cls.needs),
                "uses_logits": cls.uses_logits,
                "params": {p.name: p.default for p in cls.params},
                "default_weight": DEFAULT_WEIGHTS[name],
                "reference_differs": bool(cls.reference_note),
                "reference_note": cls.reference_note,
            }
        )
    return out
