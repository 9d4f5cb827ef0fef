"""What ``calibprompt tune`` writes about its studies: ``tuned.yaml`` cells (best values, how far they are
from the noise) and ``trials.csv``."""

from __future__ import annotations

import csv
import io
import math
from typing import TYPE_CHECKING, Any

from calibprompt.experiments.grid import TUNED_FORMAT, Grid

if TYPE_CHECKING:
    from calibprompt.experiments.tune import CellStudy


def summary(grid: Grid, cells: list[CellStudy], section: dict, objective: str, objective_doc: str, storage: str,
            seeds, shots, params, space, acc_floor) -> dict:
    import optuna

    from calibprompt.experiments.store import public_url

    out_cells = []
    for cell in cells:
        done = [t for t in cell.study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        best = min(done, key=lambda t: t.value)
        first = min(done, key=lambda t: t.number)
        entry = {
            "backbone": cell.backbone,
            "dataset": cell.dataset,
            "set": {space[p][0]: _plain(best.params[p]) for p in params},
            "value": float(best.value),
            "first_value": float(first.value),  # trial 0: the preset's defaults unless they were out of range
            "best_trial": best.number,
            "trials": len(done),
            "val_metrics": {k[4:]: float(v) for k, v in best.user_attrs.items() if k.startswith("val_")},
            "study": cell.study.study_name,
            **separation(best, first, done),
        }
        if cell.reference is not None:
            entry["reference_val_accuracy"] = cell.reference
        out_cells.append(entry)
    return {
        "format": TUNED_FORMAT,
        "grid": grid.name,
        "method": section["name"],
        "objective": objective,
        "objective_doc": objective_doc + (f" (acc_floor {acc_floor})" if objective == "val_ece_floor" else ""),
        "selection": "validation shots only; no test image is encoded or scored",
        "storage": public_url(storage),
        "seeds": list(seeds),
        "shots": shots,
        "params": {p: {"key": space[p][0], "choices": list(space[p][2])} if space[p][1] == "cat" else
                   {"key": space[p][0], "low": space[p][2], "high": space[p][3], "log": True} for p in params},
        "cells": out_cells,
    }


def separation(best, first, done: list) -> dict:
    """Is the winner distinguishable from the starting point? Its gain over trial 0 against the noise:
    twice the standard error of its own objective over seeds (with >= 2 seeds), else the trial-to-trial
    spread. Returned as ``gain``, ``trial_spread``, ``seed_se``, ``distinguishable`` and a sentence."""
    import statistics

    values = [float(t.value) for t in done]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    seeds = best.user_attrs.get("seed_values") or []
    se = statistics.stdev(seeds) / math.sqrt(len(seeds)) if len(seeds) > 1 else None
    gain = float(first.value) - float(best.value)
    noise = 2 * se if se is not None else spread
    distinguishable = gain > noise and gain > 0
    reading = (f"the best trial improves on trial 0 by {gain:.4g}, more than the noise ({noise:.4g}"
               if distinguishable else
               f"the best trial is not distinguishable from trial 0: gain {gain:.4g} is within the noise "
               f"({noise:.4g}") + (f", 2 x the standard error over {len(seeds)} seeds)" if se is not None
                                   else ", the trial-to-trial spread)")
    return {"gain": gain, "trial_spread": spread, "seed_se": se, "distinguishable": distinguishable,
            "reading": reading}


def _plain(value: Any) -> Any:
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.6g}")
    return value


def trials_csv(cells: list[CellStudy], params) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["backbone", "dataset", "trial", "state", *params, "value", "val_accuracy", "val_ece",
                     "val_nll", "val_brier", "error"])
    for cell in cells:
        for t in cell.study.trials:
            writer.writerow([cell.backbone, cell.dataset, t.number, t.state.name,
                             *[t.params.get(p, "") for p in params], "" if t.value is None else t.value,
                             *[t.user_attrs.get(f"val_{k}", "") for k in ("accuracy", "ece", "nll", "brier")],
                             t.user_attrs.get("error", "")])
    return buf.getvalue()
