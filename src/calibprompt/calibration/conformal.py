"""Split conformal prediction sets (LAC, APS, RAPS) on class probabilities.

Fit on a calibration set the model was not trained on (the validation shots): with n calibration
scores s_i = s(x_i, y_i), the threshold is the k-th smallest, k = ceil((n + 1)(1 - alpha)). For a new
image the set is every class whose score is at most the threshold:

    C(x) = {k : s(x, k) <= q},   so that   P(y in C(x)) >= 1 - alpha

for exchangeable calibration and test data (marginally, over the draw of both; Vovk et al. 2005).
Validation shots are class-balanced while a test set usually is not: then the two are not exchangeable
and marginal coverage drifts with the model's per-class errors. ``by_class=True`` (Mondrian, class-
conditional conformal) fits one threshold per class from that class's calibration images, which gives
P(y in C(x) | y = c) >= 1 - alpha for every class c, and hence the marginal guarantee under any class
balance of the test set.
The scores, with p the class probabilities and classes ranked by decreasing probability:

- LAC (least ambiguous set-valued classifier, Sadinle et al. 2019): s(x, k) = 1 - p_k.
- APS (adaptive prediction sets, Romano et al. 2020): s(x, k) = total probability of the classes
  ranked at or above k. ``u`` (uniform draws, one per calibration image) gives the randomised
  calibration score s - u * p_y, as MAPIE computes it.
- RAPS (regularised APS, Angelopoulos et al. 2021): APS + lambda * max(0, rank(k) - k_reg), rank
  1-based; defaults lambda = 0.001, k_reg = 1 as in the medical few-shot conformal work (SCA-T).

APS and RAPS are randomised by default (``randomized=True``), as their authors define them: the score of
class k becomes s(x, k) - u * p_k with u uniform in [0, 1), at calibration and at prediction. Without
it, a binary task's APS sets hold both classes as soon as the calibration error rate exceeds alpha
(coverage far above 1 - alpha); with it, coverage is close to 1 - alpha. Each image's u is derived from
the hash of its decoded pixels (:func:`uniform_from_keys`), so the same picture always gets the same set,
in every run and process, whether it is read from a PNG file or a MedMNIST array. LAC is never randomised. A score within 1e-8 of the threshold counts as below it (cumulative
sums round), as in MAPIE.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

SCORES = ("lac", "aps", "raps")
TOLERANCE = 1e-8


def _check_probs(probs, where: str = "probs") -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"{where} must be (N, K) class probabilities with K >= 2, got shape {probs.shape}")
    if not np.isfinite(probs).all() or (probs < 0).any() or not np.allclose(probs.sum(1), 1.0, atol=1e-5):
        raise ValueError(f"{where} must be finite, non-negative and sum to 1 per row (softmax of the logits)")
    return probs


def class_scores(probs, score: str = "aps", lam: float = 0.001, k_reg: int = 1) -> np.ndarray:
    """(N, K) conformity score of every class for every image (larger = less conforming)."""
    if score not in SCORES:
        raise ValueError(f"unknown conformal score {score!r}; valid: {', '.join(SCORES)}")
    probs = _check_probs(probs)
    if score == "lac":
        return 1.0 - probs
    order = np.argsort(-probs, axis=1, kind="stable")
    ranked = np.take_along_axis(probs, order, axis=1)
    cumulative = np.empty_like(probs)
    np.put_along_axis(cumulative, order, np.cumsum(ranked, axis=1), axis=1)
    if score == "raps":
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(1, probs.shape[1] + 1)[None, :].repeat(len(probs), 0), axis=1)
        cumulative = cumulative + lam * np.maximum(rank - k_reg, 0)
    return cumulative


def conformity_scores(probs, labels, score: str = "aps", lam: float = 0.001, k_reg: int = 1,
                      u=None) -> np.ndarray:
    """(N,) score of each image's true class; ``u`` (N,) in [0, 1) randomises APS/RAPS (s - u * p_y)."""
    labels = np.asarray(labels, dtype=np.int64)
    scores = class_scores(probs, score, lam, k_reg)
    if labels.shape != (scores.shape[0],) or labels.min(initial=0) < 0 or labels.max(initial=0) >= scores.shape[1]:
        raise ValueError(f"labels must be (N,) class indices in 0..{scores.shape[1] - 1}")
    own = scores[np.arange(len(labels)), labels]
    if u is not None and score != "lac":
        own = own - _check_u(u, len(labels)) * np.asarray(probs, dtype=np.float64)[np.arange(len(labels)), labels]
    return own


def _check_u(u, n: int) -> np.ndarray:
    u = np.asarray(u, dtype=np.float64)
    if u.shape != (n,) or (u < 0).any() or (u >= 1).any():
        raise ValueError(f"u must hold one number in [0, 1) per image: {n} expected, got shape {u.shape}")
    return u


def uniform_from_keys(keys: Sequence[str]) -> np.ndarray:
    """(N,) numbers in [0, 1), one per key (e.g. an image's content hash), the same on every machine."""
    return np.array([int.from_bytes(hashlib.sha256(f"conformal/{k}".encode()).digest()[:8], "little") / 2.0**64
                     for k in keys], dtype=np.float64)


def conformal_threshold(scores, alpha: float) -> float:
    """The ceil((n + 1)(1 - alpha))-th smallest of ``scores``; an error when n is too small for alpha."""
    scores = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"conformal alpha must be in (0, 1), got {alpha}")
    n = scores.shape[0]
    k = math.ceil((n + 1) * (1.0 - alpha) - 1e-9)  # the tolerance: (n + 1) * 0.55 must not round up to 55.000001
    if k > n:
        need = math.ceil(1.0 / alpha) - 1
        raise ValueError(f"conformal prediction at alpha={alpha} needs at least {need} calibration images, got {n}; "
                         "raise val_shots (the validation shots are the calibration set) or alpha")
    return float(scores[k - 1])


@dataclass
class ConformalPredictor:
    """Split conformal sets: ``fit(probs, labels)`` on calibration data, then ``predict_sets(probs)``.

    ``threshold_`` is the fitted score threshold q; ``n_calibration_`` the calibration size."""

    alpha: float = 0.1
    score: str = "aps"
    lam: float = 0.001
    k_reg: int = 1
    randomized: bool = True  # APS/RAPS: subtract u * p_k (u per image); LAC ignores it
    by_class: bool = False  # Mondrian: one threshold per class, from that class's calibration images
    threshold_: float | None = field(default=None, init=False)
    class_thresholds_: list[float] | None = field(default=None, init=False)
    n_calibration_: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"unknown conformal score {self.score!r}; valid: {', '.join(SCORES)}")
        if not 0.0 < float(self.alpha) < 1.0:
            raise ValueError(f"conformal alpha must be in (0, 1), got {self.alpha}")
        if self.lam < 0 or int(self.k_reg) < 0:
            raise ValueError(f"RAPS lambda and k_reg must be >= 0, got {self.lam}, {self.k_reg}")

    @property
    def uses_u(self) -> bool:
        """Whether ``fit`` and ``predict_sets`` need one uniform number per image."""
        return self.randomized and self.score != "lac"

    def fit(self, probs, labels, u=None) -> "ConformalPredictor":
        """Threshold from calibration probabilities and labels; ``u`` (N,) is required when ``uses_u``."""
        if self.uses_u and u is None:
            raise ValueError(f"randomised {self.score.upper()} needs u: one uniform number per calibration image "
                             "(uniform_from_keys(content hashes))")
        scores = conformity_scores(probs, labels, self.score, self.lam, self.k_reg, u if self.uses_u else None)
        self.threshold_ = conformal_threshold(scores, float(self.alpha))
        self.n_calibration_ = int(scores.shape[0])
        if self.by_class:
            labels = np.asarray(labels)
            self.class_thresholds_ = []
            for k in range(np.asarray(probs).shape[1]):
                if not (labels == k).any():
                    raise ValueError(f"class-conditional conformal sets need calibration images of every class; "
                                     f"class {k} has none")
                try:
                    self.class_thresholds_.append(conformal_threshold(scores[labels == k], float(self.alpha)))
                except ValueError as err:
                    raise ValueError(f"class {k}: {err}") from None
        return self

    def predict_sets(self, probs, u=None) -> np.ndarray:
        """(N, K) boolean: class k is in image i's set; ``u`` (N,) is required when ``uses_u``."""
        if self.threshold_ is None:
            raise RuntimeError("ConformalPredictor.predict_sets before fit(): fit it on calibration probabilities")
        scores = class_scores(probs, self.score, self.lam, self.k_reg)
        if self.uses_u:
            if u is None:
                raise ValueError(f"randomised {self.score.upper()} needs u: one uniform number per image")
            scores = scores - _check_u(u, scores.shape[0])[:, None] * np.asarray(probs, dtype=np.float64)
        if self.by_class:
            if len(self.class_thresholds_) != scores.shape[1]:
                raise ValueError(f"{len(self.class_thresholds_)} class thresholds for {scores.shape[1]} classes")
            return scores <= np.asarray(self.class_thresholds_)[None, :] + TOLERANCE
        return scores <= self.threshold_ + TOLERANCE

    def state(self) -> dict:
        """JSON-able settings and fitted threshold (saved with a run and in an exported model)."""
        return {"alpha": float(self.alpha), "score": self.score, "lambda": float(self.lam), "k_reg": int(self.k_reg),
                "randomized": bool(self.randomized), "by_class": bool(self.by_class), "threshold": self.threshold_,
                "class_thresholds": self.class_thresholds_, "n_calibration": self.n_calibration_}

    @classmethod
    def from_state(cls, state: dict) -> "ConformalPredictor":
        known = {"alpha", "score", "lambda", "k_reg", "randomized", "by_class", "threshold", "class_thresholds",
                 "n_calibration"}
        if set(state) != known:
            raise ValueError(f"conformal state must have exactly the keys {sorted(known)}, got {sorted(state)}")
        out = cls(alpha=float(state["alpha"]), score=str(state["score"]), lam=float(state["lambda"]),
                  k_reg=int(state["k_reg"]), randomized=bool(state["randomized"]), by_class=bool(state["by_class"]))
        if not isinstance(state["threshold"], (int, float)) or not math.isfinite(state["threshold"]):
            raise ValueError(f"conformal threshold must be a finite number, got {state['threshold']!r}")
        out.threshold_, out.n_calibration_ = float(state["threshold"]), int(state["n_calibration"])
        per_class = state["class_thresholds"]
        if out.by_class and (not isinstance(per_class, list) or not all(
                isinstance(t, (int, float)) and math.isfinite(t) for t in per_class)):
            raise ValueError(f"class-conditional conformal state needs finite class_thresholds, got {per_class!r}")
        out.class_thresholds_ = [float(t) for t in per_class] if out.by_class else None
        return out
