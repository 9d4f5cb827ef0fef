"""Calibrators follow scikit-learn's estimator protocol, checked with scikit-learn's own utilities."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from calibprompt.calibration import CALIBRATORS, get_calibrator


def _overconfident(n: int = 400, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(0.0, 1.0, (n, k))
    logits[np.arange(n), labels] += 1.5
    return logits * 4.0, labels  # scaled up: the right temperature is well above 1


@pytest.mark.parametrize("name", [n for n in CALIBRATORS if n != "zs-ts"] + ["zs-ts"])
def test_clone_set_params_and_check_is_fitted(name):
    logits, labels = _overconfident()
    cal = get_calibrator(name)
    with pytest.raises(NotFittedError):
        check_is_fitted(cal)
    cal.fit(logits, labels)
    check_is_fitted(cal)
    learned = [k for k in vars(cal) if k.endswith("_") and not k.startswith("_")]
    assert "num_classes_" in learned and "n_fit_" in learned
    copy = clone(cal)  # same parameters, nothing learned
    assert type(copy) is type(cal) and copy.get_params() == cal.get_params()
    with pytest.raises(NotFittedError):
        check_is_fitted(copy)
    np.testing.assert_allclose(copy.fit(logits, labels).predict_proba(logits), cal.predict_proba(logits))


def test_set_params_validates_and_refits():
    cal = get_calibrator("hb").fit(*_overconfident())
    assert cal.set_params(n_bins=5) is cal and cal.n_bins == 5
    with pytest.raises(NotFittedError):
        check_is_fitted(cal)  # new parameters drop what was learned with the old ones
    cal.fit(*_overconfident())
    check_is_fitted(cal)
    assert len(cal.values_[0]) == 5  # refitted with the new number of bins
    with pytest.raises(ValueError, match="n_bins"):
        cal.set_params(n_bins=0)
    assert cal.n_bins == 5 and len(cal.values_[0]) == 5  # a bad value leaves it as it was
    with pytest.raises(ValueError, match="no parameter 'bins'.*valid parameters: n_bins, mode"):
        cal.set_params(bins=5)


class _LogitsModel(ClassifierMixin, BaseEstimator):
    """A 'classifier' whose decision function is its input: lets scikit-learn calibrate given logits."""

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        return self

    def decision_function(self, X):
        return np.asarray(X)

    def predict(self, X):
        return self.classes_[np.asarray(X).argmax(1)]


def test_temperature_matches_scikit_learn():
    from sklearn.calibration import CalibratedClassifierCV

    try:
        from sklearn.frozen import FrozenEstimator
    except ImportError:
        pytest.skip("scikit-learn < 1.6 has no FrozenEstimator (and < 1.8 no temperature scaling)")
    logits, labels = _overconfident(n=600, k=5, seed=3)
    ours = get_calibrator("ts").fit(logits, labels)
    ref = CalibratedClassifierCV(FrozenEstimator(_LogitsModel().fit(logits, labels)), method="temperature")
    try:
        ref.fit(logits, labels)
    except ValueError as err:
        pytest.skip(f"this scikit-learn has no method='temperature' ({err})")
    beta = ref.calibrated_classifiers_[0].calibrators[0].beta_
    assert ours.temperature_ > 2.0  # a case where calibration matters
    assert ours.temperature_ == pytest.approx(1.0 / beta, rel=1e-3)
    np.testing.assert_allclose(ours.predict_proba(logits), ref.predict_proba(logits), atol=1e-4)
