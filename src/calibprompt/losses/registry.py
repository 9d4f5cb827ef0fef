"""The one registry of train-time losses: names, lookup, and each loss's metadata read from its class
(kind, formula, parameters, default weight).

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

#: Other spellings accepted on input (normalised: upper case, "-" -> "_").
ALIASES: dict[str, str] = {
    "ZS_NORM": "ECCV_ZS",
    "ZSNORM": "ECCV_ZS",
    "PENALTY": "ECCV_PENALTY",
}


def register_loss(cls: type[Loss]) -> type[Loss]:
    """Class decorator: add a :class:`Loss` subclass to the registry under ``cls.name`` (upper case,
    unique); then it works in every loss list (``losses:``, ``method.losses``) and in ``list_losses``."""
    if not (isinstance(cls, type) and issubclass(cls, Loss)):
        raise ValueError(f"register_loss takes a Loss subclass, got {cls!r}")
    name = str(getattr(cls, "name", "") or "")
    if not name or name != name.upper().replace("-", "_") or name in LOSSES or name in ALIASES:
        raise ValueError(f"loss class {cls.__name__} needs a unique upper-case name without '-' "
                         f"(got {name!r}; taken: {', '.join(LOSSES)})")
    if cls.kind not in ("task", "calibration", "text"):
        raise ValueError(f"loss {name}: kind must be 'task', 'calibration' or 'text', got {cls.kind!r}")
    LOSSES[name] = cls
    return cls


def canonical_name(name: str) -> str:
    """The registry's spelling of ``name``, or ValueError listing the valid names."""
    if not isinstance(name, str):
        raise ValueError(f"a loss name must be a string, got {name!r}; valid names: {', '.join(LOSSES)}")
    key = name.strip().upper().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in LOSSES:
        from calibprompt.plugins import load_plugins

        load_plugins()  # a plug-in package may register it
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
    return LOSSES[canonical_name(name)].default_weight


def list_losses() -> list[dict[str, Any]]:
    """One record per loss (name, kind, formula, needs, parameters with defaults, default weight)."""
    from calibprompt.plugins import load_plugins

    load_plugins()
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
                "default_weight": cls.default_weight,
                "reference_differs": bool(cls.reference_note),
                "reference_note": cls.reference_note,
            }
        )
    return out
