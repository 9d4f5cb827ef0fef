"""Selective prediction with the maximum softmax probability as the confidence score.

Accept the samples with conf ≥ τ. For each distinct confidence τ (descending), the curve has
coverage(τ) = |{i: conf_i ≥ τ}| / N and risk(τ) = error rate among them. Tied confidences are
accepted or rejected together, so the curve does not depend on the order of tied samples.

AURC = Σ_j (coverage_j − coverage_{j−1}) · risk_j (coverage_0 = 0): the step integral of the curve,
which without ties equals the usual (1/N) Σ_{k=1..N} risk of the k most confident samples
(Geifman et al., 2019). E-AURC = AURC − AURC of an oracle ranking every error last, with the
same number of errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from calibprompt.calibration.selective import risk_by_threshold

from .inputs import top_label


@dataclass(frozen=True)
class RiskCoverage:
    coverage: np.ndarray   # (J,) increasing, ends at 1.0
    risk: np.ndarray       # (J,) error rate of the accepted samples
    threshold: np.ndarray  # (J,) the confidence τ_j, decreasing

    def as_dict(self) -> dict[str, list[float]]:
        return {k: getattr(self, k).tolist() for k in ("coverage", "risk", "threshold")}


def _curve(conf: np.ndarray, errors: np.ndarray) -> RiskCoverage:
    thresholds, accepted, risk = risk_by_threshold(conf, errors)
    return RiskCoverage(accepted / conf.shape[0], risk, thresholds)


def _aurc(curve: RiskCoverage) -> float:
    return float(np.sum(np.diff(curve.coverage, prepend=0.0) * curve.risk))


def _oracle_aurc(n: int, n_errors: int) -> float:
    k = np.arange(1, n + 1)
    return float(np.mean(np.maximum(k - (n - n_errors), 0) / k))


def risk_coverage_curve(logits: Any, labels: Any, *, inputs: str = "logits") -> RiskCoverage:
    """Risk-coverage curve (coverage, risk, threshold) arrays, one point per distinct confidence."""
    t = top_label(logits, labels, inputs)
    return _curve(t.conf, 1.0 - t.correct)


def accuracy_at_coverage(curve: RiskCoverage, coverage: float = 0.9) -> tuple[float, float]:
    """(accuracy, coverage achieved) at the highest threshold whose coverage reaches ``coverage``;
    ties can push the achieved coverage above the target."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must lie in (0, 1], got {coverage!r} (e.g. 0.9)")
    j = int(np.argmax(curve.coverage >= coverage - 1e-12))
    return float(1.0 - curve.risk[j]), float(curve.coverage[j])


def selective_metrics(logits: Any, labels: Any, *, inputs: str = "logits") -> dict[str, float]:
    """AURC, E-AURC and accuracy / risk at 90 % coverage (fractions), plus the coverage achieved."""
    t = top_label(logits, labels, inputs)
    errors = 1.0 - t.correct
    curve = _curve(t.conf, errors)
    aurc = _aurc(curve)
    acc90, cov90 = accuracy_at_coverage(curve, 0.9)
    return {
        "aurc": aurc,
        "eaurc": aurc - _oracle_aurc(t.n, int(errors.sum())),
        "accuracy_at_90_coverage": acc90,
        "risk_at_90_coverage": 1.0 - acc90,
        "coverage_at_90": cov90,
    }


def selective_outcome(probs, labels, abstain) -> dict:
    """Test coverage (share not abstained) and risk (error rate of the accepted) of an abstention rule."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    keep = ~np.asarray(abstain, dtype=bool)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],) or keep.shape != labels.shape:
        raise ValueError(f"probs (N, K), labels (N,) and abstain (N,) needed, got {probs.shape}, {labels.shape}, "
                         f"{keep.shape}")
    errors = probs.argmax(1) != labels
    return {"sel_coverage": float(keep.mean()) if len(keep) else float("nan"),
            "sel_risk": float(errors[keep].mean()) if keep.any() else float("nan")}
