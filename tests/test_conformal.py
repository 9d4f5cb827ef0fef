"""Split conformal sets (LAC, APS, RAPS), their metrics and the selective-prediction threshold: hand-computed
cases, the coverage guarantee on exchangeable data, and MAPIE as the independent oracle for thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from calibprompt.calibration.conformal import ConformalPredictor, class_scores, conformal_threshold
from calibprompt.calibration.selective import SelectiveThreshold
from calibprompt.metrics.conformal import conformal_metrics
from calibprompt.metrics.selective import selective_outcome


def _data(n: int, k: int, sharp: float = 2.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * sharp
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = np.array([rng.choice(k, p=row) for row in probs])  # calibrated by construction
    return probs, labels


def test_scores_by_hand():
    p = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    assert np.allclose(class_scores(p, "lac"), [[0.5, 0.7, 0.8], [0.9, 0.4, 0.7]])
    assert np.allclose(class_scores(p, "aps"), [[0.5, 0.8, 1.0], [1.0, 0.6, 0.9]])
    # RAPS: + lambda * max(0, rank - k_reg); ranks (1-based) row 0: 1,2,3; row 1: 3,1,2
    assert np.allclose(class_scores(p, "raps", lam=0.1, k_reg=1), [[0.5, 0.9, 1.2], [1.2, 0.6, 1.0]])
    assert np.allclose(class_scores(p, "raps", lam=0.0), class_scores(p, "aps"))


def test_threshold_is_the_split_conformal_order_statistic():
    scores = np.arange(1, 20) / 20.0  # n = 19: k = ceil(20 * 0.9) = 18
    assert conformal_threshold(scores, 0.1) == pytest.approx(18 / 20)
    # (99 + 1) * 0.55 is 55 exactly, though 1 - 0.45 is a hair above 0.55 in floating point
    assert conformal_threshold(np.arange(1, 100), 0.45) == 55
    with pytest.raises(ValueError, match="one number in"):
        ConformalPredictor(0.2, "aps").fit(*_data(20, 2), u=np.full(3, 0.5))
    with pytest.raises(ValueError, match=r"needs at least 9 calibration images, got 8.*val_shots"):
        conformal_threshold(np.ones(8), 0.1)
    with pytest.raises(ValueError, match="unknown conformal score 'thr'"):
        ConformalPredictor(score="thr")
    with pytest.raises(RuntimeError, match="before fit"):
        ConformalPredictor().predict_sets(np.full((1, 2), 0.5))
    with pytest.raises(ValueError, match="sum to 1"):
        ConformalPredictor(score="lac").fit(np.ones((20, 2)), np.zeros(20, dtype=int))
    with pytest.raises(ValueError, match="needs u"):
        ConformalPredictor(score="aps").fit(*_data(20, 2))


@pytest.mark.parametrize("score", ["lac", "aps", "raps"])
def test_coverage_guarantee_on_exchangeable_data(score):
    """Over 200 random calibration/test splits of calibrated data, mean coverage lies in
    [1 - alpha, 1 - alpha + 1/(n + 1)] up to Monte-Carlo error, and sets shrink as alpha grows."""
    probs, labels = _data(2000, 5, seed=1)
    rng = np.random.default_rng(2)
    alpha, n = 0.1, 100
    cov, sizes = [], {0.1: [], 0.3: []}
    for _ in range(200):
        idx = rng.permutation(len(labels))
        cal, test = idx[:n], idx[n : n + 400]
        u = rng.uniform(size=len(labels))  # randomised APS/RAPS: one draw per image
        for a in sizes:
            cp = ConformalPredictor(a, score).fit(probs[cal], labels[cal], u[cal])
            sets = cp.predict_sets(probs[test], u[test])
            sizes[a].append(sets.sum(1).mean())
            if a == alpha:
                cov.append(sets[np.arange(len(test)), labels[test]].mean())
    assert 1 - alpha - 0.01 <= np.mean(cov) <= 1 - alpha + 1 / (n + 1) + 0.01
    assert np.mean(sizes[0.3]) < np.mean(sizes[0.1])



def _mapie(probs, labels, score, confidence=0.9, seed=3):
    from sklearn.base import BaseEstimator, ClassifierMixin

    mapie = pytest.importorskip("mapie.classification", reason="MAPIE is the test oracle: pip install mapie")

    class Probs(ClassifierMixin, BaseEstimator):
        def fit(self, X, y):
            self.classes_ = np.arange(np.asarray(X).shape[1])
            return self

        def predict_proba(self, X):
            return np.asarray(X)

        def predict(self, X):
            return np.asarray(X).argmax(1)

    model = mapie.SplitConformalClassifier(Probs().fit(probs, labels), confidence_level=confidence,
                                           conformity_score=score, prefit=True, random_state=seed)
    return model.conformalize(probs, labels)


@pytest.mark.parametrize("k", [3, 10])
def test_lac_threshold_and_sets_equal_mapie(k):
    probs, labels = _data(300, k, sharp=3.0)
    model = _mapie(probs[:250], labels[:250], "lac")
    _, mapie_sets = model.predict_set(probs[250:])
    ours = ConformalPredictor(0.1, "lac").fit(probs[:250], labels[:250])
    assert ours.threshold_ == pytest.approx(float(model._mapie_classifier.quantiles_[0]), abs=1e-12)
    assert np.array_equal(ours.predict_sets(probs[250:]), mapie_sets[:, :, 0])


def test_aps_threshold_equals_mapie_with_its_randomisation():
    probs, labels = _data(300, 6, sharp=3.0)
    model = _mapie(probs, labels, "aps")
    model.predict_set(probs[:5])  # MAPIE computes its quantile here
    u = np.random.RandomState(3).uniform(size=len(labels))  # MAPIE's draw for random_state=3
    ours = ConformalPredictor(0.1, "aps").fit(probs, labels, u=u)
    assert ours.threshold_ == pytest.approx(float(model._mapie_classifier.quantiles_[0]), abs=1e-12)


def test_raps_threshold_equals_mapie_for_its_chosen_penalty():
    """MAPIE chooses (k_reg, lambda) on a 10% stratified split and conformalises on the rest; with the same
    split, draws and penalty our RAPS threshold is MAPIE's."""
    from sklearn.model_selection import StratifiedShuffleSplit

    probs, labels = _data(300, 10, sharp=4.0)
    model = _mapie(probs, labels, "raps")
    model.predict_set(probs[:5])
    score = model._mapie_classifier.conformity_score_function_
    k_reg, lam = int(np.ravel(score.k_star)[0]), float(np.ravel(score.lambda_star)[0])
    assert k_reg < 10 and lam > 0  # the penalty is active in this case
    cal, _ = next(StratifiedShuffleSplit(n_splits=1, test_size=0.1, random_state=3).split(probs, labels))
    u = np.random.RandomState(3).uniform(size=len(cal))
    ours = ConformalPredictor(0.1, "raps", lam=lam, k_reg=k_reg).fit(probs[cal], labels[cal], u=u)
    assert ours.threshold_ == pytest.approx(float(model._mapie_classifier.quantiles_[0]), abs=1e-12)


def test_state_round_trip_and_validation():
    probs, labels = _data(50, 3)
    u = np.linspace(0, 0.99, 50)
    cp = ConformalPredictor(0.2, "raps", lam=0.01, k_reg=1, by_class=True).fit(probs, labels, u)
    again = ConformalPredictor.from_state(cp.state())
    assert np.array_equal(again.predict_sets(probs, u), cp.predict_sets(probs, u))
    assert again.class_thresholds_ == cp.class_thresholds_ and len(cp.class_thresholds_) == 3
    with pytest.raises(ValueError, match="exactly the keys"):
        ConformalPredictor.from_state({**cp.state(), "extra": 1})
    with pytest.raises(ValueError, match="finite number"):
        ConformalPredictor.from_state({**cp.state(), "threshold": float("nan")})


def test_conformal_metrics_by_hand():
    sets = np.array([[1, 0], [1, 1], [0, 1], [0, 0], [1, 0]], dtype=bool)
    labels = np.array([0, 1, 0, 1, 0])
    m = conformal_metrics(sets, labels, alpha=0.2)
    assert m["cp_coverage"] == pytest.approx(3 / 5) and m["cp_set_size"] == pytest.approx(1.0)
    assert m["cp_empty"] == pytest.approx(0.2) and m["cp_singleton"] == pytest.approx(0.6)
    # class 0: images 0, 2, 4 -> covered 2 of 3; class 1: images 1, 3 -> 1 of 2
    assert m["details"]["class_coverage"] == {0: pytest.approx(2 / 3), 1: pytest.approx(0.5)}
    assert m["cp_ccv"] == pytest.approx((abs(2 / 3 - 0.8) + abs(0.5 - 0.8)) / 2)
    assert m["cp_worst_class_coverage"] == pytest.approx(0.5)
    # sizes: 0 -> {3}: 0/1; 1 -> {0, 2, 4}: 2/3; 2 -> {1}: 1/1
    assert m["details"]["size_stratified"][1] == {"n": 3, "coverage": pytest.approx(2 / 3)}
    # SSCV over the size bins 0-1 (images 3, 0, 2, 4: 2 of 4 covered) and 2-3 (image 1: covered)
    assert m["cp_sscv"] == pytest.approx(abs(0.5 - 0.8))
    with pytest.raises(ValueError, match="class indices in 0..1"):
        conformal_metrics(sets, np.array([0, 1, 2, 0, 0]), alpha=0.2)


def test_selective_threshold_by_hand():
    # confidences 0.9 (right), 0.8 (right), 0.7 (wrong), 0.6 (right), 0.55 (wrong)
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.4, 0.6], [0.55, 0.45]])
    labels = np.array([0, 1, 1, 1, 1])
    sel = SelectiveThreshold(target_risk=0.25).fit(probs, labels)
    # risks by threshold: 0.9 -> 0, 0.8 -> 0, 0.7 -> 1/3, 0.6 -> 1/4, 0.55 -> 2/5: the lowest meeting 0.25 is 0.6
    assert sel.threshold_ == pytest.approx(0.6) and sel.calibration_coverage_ == pytest.approx(0.8) and sel.met_
    assert sel.abstain(probs).tolist() == [False, False, False, False, True]
    out = selective_outcome(probs, labels, sel.abstain(probs))
    assert out == {"sel_coverage": pytest.approx(0.8), "sel_risk": pytest.approx(0.25)}
    never = SelectiveThreshold(target_risk=0.0).fit(probs[2:3], labels[2:3])
    assert not never.met_ and never.abstain(probs[2:3]).all()
    assert SelectiveThreshold.from_state(sel.state()).threshold_ == sel.threshold_


def test_class_conditional_sets_keep_coverage_when_the_test_class_balance_differs():
    """Balanced calibration, test set 96% class 0: marginal split conformal is off target (the data are not
    exchangeable), class-conditional thresholds hold every class, hence any mixture, at 1 - alpha."""
    rng = np.random.default_rng(5)

    def draw(n, k):  # class 1 is harder: its probabilities are flatter
        probs, labels = _data(n, 2, sharp=4.0 if k == 0 else 0.2, seed=int(rng.integers(1 << 30)))
        keep = labels == k
        return probs[keep], labels[keep]

    marginal, by_class = [], []
    for _ in range(60):
        cal = [draw(400, k) for k in (0, 1)]
        cal = (np.concatenate([c[0][:60] for c in cal]), np.concatenate([c[1][:60] for c in cal]))
        t0, t1 = draw(2000, 0), draw(400, 1)
        test = (np.concatenate([t0[0][:480], t1[0][:20]]), np.concatenate([t0[1][:480], t1[1][:20]]))
        for store, flag in ((marginal, False), (by_class, True)):
            cp = ConformalPredictor(0.1, "lac", by_class=flag).fit(*cal)
            sets = cp.predict_sets(test[0])
            store.append(sets[np.arange(len(test[1])), test[1]].mean())
    assert np.mean(marginal) - 0.9 > 0.015  # above target: the test set is mostly the easy class
    assert abs(np.mean(by_class) - 0.9) <= 0.01
    with pytest.raises(ValueError, match="class 1 has none"):
        ConformalPredictor(0.1, "lac", by_class=True).fit(cal[0][:60], cal[1][:60])
