"""Calibration metrics (two conventions), reliability diagrams, bootstrap CIs, selective prediction.

All values are fractions. ``convention="standard"`` is the textbook definition (default);
``convention="reference"`` reproduces the official CalibPrompt / DAC code. See docs/metrics.md.
"""

from .bootstrap import bootstrap_ci
from .calibration import accuracy, adaptive_ece, brier, classwise_ece, confidence, ece, macro_f1, mce, nll
from .inputs import CLOSED_SIDES, CONVENTIONS
from .reference import (
    ace_reference,
    ece_kde_reference,
    ece_reference,
    kde_bandwidth_reference,
    mce_reference,
    per_class_ece_reference,
)
from .reliability import classwise_reliability_diagram, reliability_diagram
from .selective import RiskCoverage, accuracy_at_coverage, risk_coverage_curve, selective_metrics
from .smooth import smooth_ece
from .suite import calibration_metrics, calibration_metrics_from_probs, metric_names

__all__ = [
    "CLOSED_SIDES",
    "CONVENTIONS",
    "RiskCoverage",
    "accuracy",
    "accuracy_at_coverage",
    "ace_reference",
    "adaptive_ece",
    "bootstrap_ci",
    "brier",
    "calibration_metrics",
    "calibration_metrics_from_probs",
    "classwise_ece",
    "classwise_reliability_diagram",
    "confidence",
    "ece",
    "ece_kde_reference",
    "ece_reference",
    "kde_bandwidth_reference",
    "macro_f1",
    "mce",
    "mce_reference",
    "metric_names",
    "nll",
    "per_class_ece_reference",
    "reliability_diagram",
    "risk_coverage_curve",
    "selective_metrics",
    "smooth_ece",
]
