"""calibprompt: calibration-aware prompt learning (CalibPrompt) and few-shot baselines for medical
vision-language models.

The curated API (imported lazily, so ``import calibprompt`` and the CLI start fast)::

    from calibprompt import load_config, run
    result = run(load_config("run.yaml", ["seed=2"]), "out/run1")

    from calibprompt import calibration_metrics, get_loss, get_calibrator, resolve_method
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_API: dict[str, str] = {
    "load_config": "calibprompt.config",
    "resolve": "calibprompt.config",
    "run": "calibprompt.engine.run",
    "resolve_method": "calibprompt.methods",
    "list_methods": "calibprompt.methods",
    "register_method": "calibprompt.methods",
    "load_head": "calibprompt.methods",
    "get_loss": "calibprompt.losses",
    "build_objective": "calibprompt.losses",
    "list_losses": "calibprompt.losses",
    "get_calibrator": "calibprompt.calibration",
    "register_calibrator": "calibprompt.calibration",
    "calibration_metrics": "calibprompt.metrics",
    "load_backbone": "calibprompt.backbones",
    "list_backbones": "calibprompt.backbones",
    "register_backbone": "calibprompt.backbones",
    "register_loss": "calibprompt.losses",
    "load_plugins": "calibprompt.plugins",
    "open_dataset": "calibprompt.data",
    "make_split": "calibprompt.data",
    "FeatureCache": "calibprompt.features",
    "CalibPromptClassifier": "calibprompt.deploy",
    "load_model": "calibprompt.deploy",
}
__all__ = ["__version__", *sorted(_API)]

if TYPE_CHECKING:  # for editors and type checkers; at run time names load on first use
    from calibprompt.backbones import list_backbones, load_backbone, register_backbone
    from calibprompt.calibration import get_calibrator, register_calibrator
    from calibprompt.config import load_config, resolve
    from calibprompt.data import make_split, open_dataset
    from calibprompt.deploy import CalibPromptClassifier, load_model
    from calibprompt.engine.run import run
    from calibprompt.features import FeatureCache
    from calibprompt.losses import build_objective, get_loss, list_losses, register_loss
    from calibprompt.plugins import load_plugins
    from calibprompt.methods import list_methods, load_head, register_method, resolve_method
    from calibprompt.metrics import calibration_metrics


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'calibprompt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
