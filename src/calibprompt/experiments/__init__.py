"""Experiments: grids of runs (``grid``), the results store (``store``), executors (local, Ray),
sweeps (``sweep``) and validation-only tuning (``tune``); reports are in ``calibprompt.reporting``.
See docs/experiments.md.

Names are imported lazily, so ``calibprompt --help`` (which lists the grid presets) stays fast."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Grid": "grid", "GridError": "grid", "RunSpec": "grid", "list_presets": "grid",
    "ResultStore": "store",
    "SweepSummary": "sweep", "run_sweep": "sweep",
    "run_tune": "tune",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"calibprompt.experiments.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'calibprompt.experiments' has no attribute {name!r}")
