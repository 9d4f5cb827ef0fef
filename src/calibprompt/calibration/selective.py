"""Selective prediction: abstain when the top-class probability is below a threshold chosen on
calibration data for a target risk.

Among calibration images, accepting those with confidence >= tau gives the risk (error rate of the
accepted ones) r(tau). The chosen tau is the smallest one with r(tau) <= target, i.e. the largest
coverage whose empirical risk meets the target (ties accepted or rejected together). This is the
plain empirical rule: with few calibration images the test risk can exceed the target; the report
shows the test risk and coverage achieved. When no threshold meets the target, tau is above every
confidence (abstain on everything) and ``met_`` is False.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def risk_by_threshold(conf: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds tau_j decreasing, accepted counts, risk) when accepting conf >= tau_j, one entry per
    distinct confidence: tied confidences are accepted or rejected together."""
    order = np.argsort(-conf, kind="stable")
    c, e = conf[order], errors[order]
    ends = np.flatnonzero(np.r_[c[1:] != c[:-1], True])  # the last image of each run of equal confidence
    accepted = ends + 1
    return c[ends], accepted, np.cumsum(e)[ends] / accepted


@dataclass
class SelectiveThreshold:
    """``fit(probs, labels)`` chooses ``threshold_``; ``abstain(probs)`` flags images below it."""

    target_risk: float = 0.1
    threshold_: float | None = field(default=None, init=False)
    calibration_coverage_: float = field(default=0.0, init=False)
    met_: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.target_risk) < 1.0:
            raise ValueError(f"selective target_risk must be in [0, 1), got {self.target_risk}")

    def fit(self, probs, labels) -> "SelectiveThreshold":
        probs = np.asarray(probs, dtype=np.float64)
        labels = np.asarray(labels, dtype=np.int64)
        if probs.ndim != 2 or labels.shape != (probs.shape[0],) or probs.shape[0] == 0:
            raise ValueError(f"selective threshold: probs (N, K) and labels (N,) needed, got {probs.shape}, "
                             f"{labels.shape}")
        conf = probs.max(1)
        thresholds, accepted, risk = risk_by_threshold(conf, (probs.argmax(1) != labels).astype(np.float64))
        ok = np.flatnonzero(risk <= self.target_risk + 1e-12)
        if len(ok):
            best = ok[-1]
            self.threshold_, self.calibration_coverage_, self.met_ = float(thresholds[best]), accepted[best] / len(conf), True
        else:
            self.threshold_, self.calibration_coverage_, self.met_ = math.nextafter(float(thresholds[0]), math.inf), 0.0, False
        return self

    def abstain(self, probs) -> np.ndarray:
        """(N,) True where the top-class probability is below the threshold."""
        if self.threshold_ is None:
            raise RuntimeError("SelectiveThreshold.abstain before fit(): fit it on calibration probabilities")
        return np.asarray(probs, dtype=np.float64).max(1) < self.threshold_

    def state(self) -> dict:
        return {"target_risk": float(self.target_risk), "threshold": self.threshold_,
                "calibration_coverage": float(self.calibration_coverage_), "met": bool(self.met_)}

    @classmethod
    def from_state(cls, state: dict) -> "SelectiveThreshold":
        known = {"target_risk", "threshold", "calibration_coverage", "met"}
        if set(state) != known:
            raise ValueError(f"selective state must have exactly the keys {sorted(known)}, got {sorted(state)}")
        out = cls(float(state["target_risk"]))
        if not isinstance(state["threshold"], (int, float)) or math.isnan(state["threshold"]):
            raise ValueError(f"selective threshold must be a number, got {state['threshold']!r}")
        out.threshold_ = float(state["threshold"])
        out.calibration_coverage_, out.met_ = float(state["calibration_coverage"]), bool(state["met"])
        return out
