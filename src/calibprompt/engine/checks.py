"""Sanity checks of a finished run, recorded as ``flags`` in metrics.json, shown as notes and marked in
reports: results that look fine in a table but mean nothing."""

from __future__ import annotations

import numpy as np

#: a run "did not learn" when its training loss fell by less than this fraction from the first epoch
MIN_LOSS_DROP = 0.05


def run_flags(train_info: dict, posthoc_info: dict | None, metrics: dict, test_labels: np.ndarray,
              trains: bool) -> list[dict]:
    """``[{"code", "message"}, ...]`` for: training whose loss did not decrease, accuracy at or below
    the majority-class rate, and a post-hoc temperature stuck at its search bound."""
    flags = []
    losses = train_info.get("epoch_losses") or []
    # (a loss that starts near 0 -- a head initialised at a fitting solution -- has nothing to drop)
    if trains and len(losses) >= 2 and losses[0] > 0.1 and losses[-1] > (1 - MIN_LOSS_DROP) * losses[0]:
        flags.append({"code": "did_not_learn",
                      "message": f"the training loss did not decrease (first epoch {losses[0]:.4f}, last "
                                 f"{losses[-1]:.4f}): the head is close to its starting point. Check the "
                                 "learning rate and epochs (e.g. train.lr, train.optimizer: adam)"})
    if len(test_labels):
        majority = float(np.bincount(test_labels).max() / len(test_labels))
        if metrics["accuracy"] <= majority + 1e-12:
            flags.append({"code": "at_majority_rate",
                          "message": f"accuracy {metrics['accuracy']:.1%} is at or below the majority-class rate "
                                     f"{majority:.1%}: a constant prediction does as well, so its calibration "
                                     "numbers say nothing"})
    at_bound = ((posthoc_info or {}).get("params") or {}).get("at_bound")
    if at_bound:
        flags.append({"code": "temperature_at_bound", "message": f"post-hoc {posthoc_info['name']}: {at_bound}"})
    return flags
