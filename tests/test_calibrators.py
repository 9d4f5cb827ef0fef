"""Post-hoc calibrators on real data: an overconfident logistic regression on PneumoniaMNIST pixels,
calibrators fitted on its validation split and evaluated on its test split."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from scipy.special import softmax

from calibprompt.calibration import CALIBRATORS, get_calibrator, load_calibrator
from tests.conftest import require_shared


def _ece(logits: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> float:
    """Equal-width ECE on the top-label confidence (bins [a, b), the last one closed)."""
    probs = softmax(logits, axis=1)
    conf, correct = probs.max(1), probs.argmax(1) == labels
    idx = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    return float(sum(np.mean(idx == b) * abs(conf[idx == b].mean() - correct[idx == b].mean())
                     for b in range(n_bins) if np.any(idx == b)))  # fmt: skip


def _nll(logits: np.ndarray, labels: np.ndarray) -> float:
    probs = softmax(logits, axis=1)
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))))


@pytest.fixture(scope="module")
def pneumonia_logits():
    """(val_logits, val_labels, test_logits, test_labels) of a nearly unregularised logistic regression
    trained on 1,000 PneumoniaMNIST training images: it overfits, so it is overconfident on new data."""
    from sklearn.linear_model import LogisticRegression

    data = np.load(require_shared("medmnist/pneumoniamnist.npz"), allow_pickle=False)

    def pixels(split):
        x = data[f"{split}_images"]
        return x.reshape(len(x), -1).astype(np.float64) / 255.0, data[f"{split}_labels"][:, 0].astype(np.int64)

    x_train, y_train = pixels("train")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lbfgs may stop before convergence at this C; that is fine
        clf = LogisticRegression(C=1e4, max_iter=300).fit(x_train[:1000], y_train[:1000])

    def logits(split):
        x, y = pixels(split)
        s = clf.decision_function(x)
        return np.stack([-s / 2, s / 2], axis=1), y

    (zv, yv), (zt, yt) = logits("val"), logits("test")
    assert _nll(zt, yt) > 1.0  # sanity: the model really is overconfident
    return zv, yv, zt, yt


# ----------------------------------------------------------------------------------------- TS
def test_ts_keeps_argmax_and_lowers_nll(pneumonia_logits):
    zv, yv, zt, yt = pneumonia_logits
    ts = get_calibrator("ts").fit(zv, yv)
    out = ts.transform(zt)
    assert ts.temperature_ > 1.0  # overconfident -> softened
    assert np.array_equal(out.argmax(1), zt.argmax(1))
    assert _nll(out, yt) < _nll(zt, yt) - 0.5
    assert _ece(out, yt) < _ece(zt, yt)


def test_ts_finds_the_nll_minimum(pneumonia_logits):
    zv, yv, *_ = pneumonia_logits
    ts = get_calibrator("ts").fit(zv, yv)
    grid = np.exp(np.linspace(np.log(0.1), np.log(100), 4001))
    best = grid[np.argmin([_nll(zv / t, yv) for t in grid])]
    assert ts.temperature_ == pytest.approx(best, rel=5e-3)
    assert ts.fitted_params()["nll_after"] <= ts.fitted_params()["nll_before"]


def test_ts_is_robust_to_huge_logits():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(2000, 3)) * 2
    labels = np.array([rng.choice(3, p=p) for p in softmax(scores, axis=1)])  # calibrated at T = 1
    logits = scores * 300.0  # wildly overconfident: the right temperature is 300
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warnings, and not stuck at a bound
        ts = get_calibrator("ts").fit(logits, labels)
    assert ts.temperature_ == pytest.approx(300.0, rel=0.15)
    assert np.all(np.isfinite(ts.transform(logits)))


# ----------------------------------------------------------------------------------------- all calibrators
@pytest.mark.parametrize(
    "name, params",
    [("ts", {}), ("zs-ts", {}), ("vs", {}), ("hb", {}), ("hb", {"mode": "one-vs-rest"}), ("iso", {})],
)
def test_every_calibrator_improves_nll_or_ece(pneumonia_logits, name, params):
    zv, yv, zt, yt = pneumonia_logits
    out = get_calibrator(name, **params).fit(zv, yv).transform(zt)
    assert out.shape == zt.shape and np.all(np.isfinite(out))
    assert _nll(out, yt) < _nll(zt, yt) or _ece(out, yt) < _ece(zt, yt)


@pytest.mark.parametrize("name, params", [("hb", {}), ("hb", {"mode": "one-vs-rest"}), ("iso", {})])
def test_binning_calibrators_return_log_probabilities(pneumonia_logits, name, params):
    zv, yv, zt, _ = pneumonia_logits
    cal = get_calibrator(name, **params).fit(zv, yv)
    out = cal.transform(zt)
    assert np.allclose(np.exp(out).sum(1), 1.0)  # log-probabilities
    assert np.allclose(softmax(out, axis=1), np.exp(out))  # so softmax(out) is the calibrated probability
    assert np.allclose(cal.predict_proba(zt), np.exp(out))


def test_top_label_binning_maps_confidence_to_bin_accuracy():
    rng = np.random.default_rng(1)
    conf = rng.uniform(0.5, 1.0, 400)
    logits = np.stack([np.zeros(400), np.log(conf / (1 - conf))], axis=1)  # p_1 = conf, predicted class 1
    labels = np.where(conf < 0.6, 0, 1)  # every prediction in [0.5, 0.6) is wrong, the rest right
    hb = get_calibrator("hb", n_bins=10).fit(logits, labels)
    probs = softmax(hb.transform(logits), axis=1)
    high = conf >= 0.6
    assert np.allclose(probs[high, 1], 1.0, atol=1e-9)
    # bin [0.5, 0.6) had accuracy 0: the top class drops to ~0 and the argmax flips (accuracy can change)
    assert np.allclose(probs[~high, 1], 0.0, atol=1e-9)
    assert np.all(probs[~high].argmax(1) == 0)
    values = hb.fitted_params()["values"][0]
    assert values[:5] == [None] * 5 and values[5] == 0.0 and values[6:] == [1.0] * 4


# ----------------------------------------------------------------------------------------- I/O and errors
def test_torch_in_torch_out_numpy_in_numpy_out(pneumonia_logits):
    zv, yv, zt, _ = pneumonia_logits
    ts = get_calibrator("ts").fit(torch.from_numpy(zv).float(), torch.from_numpy(yv)[:, None])
    out = ts.transform(torch.from_numpy(zt))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    assert isinstance(ts.transform(zt), np.ndarray)
    assert np.allclose(out.numpy(), ts.transform(zt))


@pytest.mark.parametrize("name", sorted(CALIBRATORS))
def test_save_load_round_trip_and_json_params(pneumonia_logits, tmp_path, name):
    zv, yv, zt, _ = pneumonia_logits
    cal = get_calibrator(name).fit(zv, yv)
    json.dumps(cal.fitted_params())  # JSON-serialisable
    cal.save(tmp_path / f"{name}.json")
    again = load_calibrator(tmp_path / f"{name}.json")
    assert type(again) is type(cal)
    assert np.allclose(again.transform(zt), cal.transform(zt))


def test_zero_shot_temperature_is_reused_on_another_dataset(pneumonia_logits, tmp_path):
    zv, yv, *_ = pneumonia_logits
    cal = get_calibrator("zs-ts").fit(zv, yv, source="pneumoniamnist")
    path = tmp_path / "zs_temperature.json"
    cal.save(path)
    loaded = type(cal).load(path)
    assert loaded.temperature_ == cal.temperature_ and loaded.fitted_params()["source"] == "pneumoniamnist"
    other = np.random.default_rng(2).normal(size=(5, 9)) * 20  # another dataset with K = 9
    assert np.allclose(loaded.transform(other), other / cal.temperature_)


def test_errors_are_clear(pneumonia_logits):
    zv, yv, zt, _ = pneumonia_logits
    with pytest.raises(ValueError, match="call fit"):
        get_calibrator("ts").transform(zt)
    with pytest.raises(ValueError, match="fitted on K=2 classes, got logits with 3 columns"):
        get_calibrator("vs").fit(zv, yv).transform(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="got 3 validation samples; at least 10"):
        get_calibrator("ts").fit(zv[:3], yv[:3])
    with pytest.raises(ValueError, match="at least 20"):
        get_calibrator("hb", n_bins=20).fit(zv[:15], yv[:15])
    with pytest.raises(ValueError, match="labels must lie in \\[0, 1\\]"):
        get_calibrator("iso").fit(zv, yv + 1)
    with pytest.raises(ValueError, match="labels must have shape"):
        get_calibrator("ts").fit(zv, yv[:-1])
    with pytest.raises(ValueError, match="NaN or infinite"):
        get_calibrator("ts").fit(np.full((20, 2), np.nan), np.zeros(20, int))
    with pytest.raises(ValueError, match="unknown calibrator 'platt'; valid names: ts, zs-ts, vs, hb, iso"):
        get_calibrator("platt")
    with pytest.raises(ValueError, match="calibrator 'ts' has no parameter 'n_bins'"):
        get_calibrator("ts", n_bins=10)
    with pytest.raises(ValueError, match="mode='top' is invalid"):
        get_calibrator("hb", mode="top")
