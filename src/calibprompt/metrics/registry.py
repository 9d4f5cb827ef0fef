"""What every consumer of metrics needs to know about each one, in one table: its column label, its
title, whether higher is better (None: not ranked), whether it is shown in percent, and whether the
results store keeps it as a column. Reports, the demo's tables and the store read it from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricSpec:
    name: str  # key in metrics.json
    label: str  # short column label in paper-style tables
    title: str  # longer name for prose tables
    higher_is_better: bool | None
    percent: bool  # a fraction shown x100
    stored: bool = False  # a column of the results store


METRICS: dict[str, MetricSpec] = {m.name: m for m in (
    MetricSpec("accuracy", "ACC", "Accuracy", True, True, stored=True),
    MetricSpec("macro_f1", "F1", "Macro-F1", True, True),
    MetricSpec("confidence", "Conf", "Confidence", None, True),
    MetricSpec("ece", "ECE", "ECE", False, True, stored=True),
    MetricSpec("mce", "MCE", "MCE", False, True, stored=True),
    MetricSpec("ace", "ACE", "Adaptive ECE", False, True, stored=True),
    MetricSpec("adaptive_ece", "ACE", "Adaptive ECE", False, True),
    MetricSpec("classwise_ece", "cw-ECE", "Classwise ECE", False, True),
    MetricSpec("smece", "smECE", "smECE", False, True),
    MetricSpec("ece_kde", "ECE-KDE", "ECE-KDE (reference)", False, True),
    MetricSpec("nll", "NLL", "NLL", False, False, stored=True),
    MetricSpec("brier", "Brier", "Brier", False, False, stored=True),
    # selective prediction (docs/metrics.md) and decisions fitted on the validation shots (docs/deploy.md)
    MetricSpec("aurc", "AURC", "Area under the risk-coverage curve", False, True),
    MetricSpec("eaurc", "E-AURC", "Excess AURC", False, True),
    MetricSpec("cp_coverage", "Cov", "Conformal coverage", None, True),
    MetricSpec("cp_set_size", "Size", "Mean conformal set size", False, False),
    MetricSpec("cp_singleton", "Single", "Singleton sets", None, True),
    MetricSpec("cp_empty", "Empty", "Empty sets", None, True),
    MetricSpec("cp_ccv", "CCV", "Class coverage gap", False, True),
    MetricSpec("cp_sscv", "SSCV", "Size-stratified coverage gap", False, True),
    MetricSpec("cp_worst_class_coverage", "WCov", "Worst class coverage", True, True),
    MetricSpec("sel_coverage", "SelCov", "Coverage of selective prediction", True, True),
    MetricSpec("sel_risk", "SelRisk", "Risk of selective prediction", False, True),
)}


def metric_spec(name: str) -> MetricSpec:
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; valid: {', '.join(METRICS)}")
    return METRICS[name]


def stored_metrics() -> tuple[str, ...]:
    """The metrics the results store keeps as columns (its schema; adding one needs a migration)."""
    return tuple(m.name for m in METRICS.values() if m.stored)
