"""Experiments: grids of runs (``grid``), the results store (``store``), executors (local, Ray),
sweeps (``sweep``), paper-style reports (``report``) and validation-only tuning (``tune``).
See docs/experiments.md."""

from calibprompt.experiments.grid import Grid, GridError, RunSpec, list_presets
from calibprompt.experiments.store import ResultStore
from calibprompt.experiments.sweep import SweepSummary, run_sweep

__all__ = ["Grid", "GridError", "ResultStore", "RunSpec", "SweepSummary", "list_presets", "run_sweep"]
