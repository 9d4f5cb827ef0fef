"""Randomized smoothing and PromptSmooth: the certified radius against an independent scipy computation and
against a classifier whose smoothed prediction is known exactly; noisy views in the feature cache;
`calibprompt certify` end to end on a tiny model (few-shot PromptSmooth, the test-time step, zero-shot);
bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from scipy.stats import beta, norm

from calibprompt.cli import main
from calibprompt.robustness import certified_accuracy, certified_radius, certify_counts, lower_confidence_bound
from tests.tiny_models import tiny_model_dir, write_image_folder


def _independent(n_top, n, sigma, alpha):
    p = beta.ppf(alpha, n_top, n - n_top + 1) if n_top > 0 else 0.0
    return sigma * norm.ppf(p) if p > 0.5 else float("nan")


@pytest.mark.parametrize("n_top, n, sigma, alpha", [(100, 100, 0.25, 0.001), (9990, 10000, 0.5, 0.001),
                                                    (730, 1000, 1.0, 0.01), (0, 50, 0.25, 0.05), (37, 40, 0.12, 0.2)])
def test_radius_equals_an_independent_scipy_computation(n_top, n, sigma, alpha):
    ours, theirs = certified_radius(n_top, n, sigma, alpha), _independent(n_top, n, sigma, alpha)
    assert (math.isnan(ours) and math.isnan(theirs)) or ours == pytest.approx(theirs, rel=1e-12)


def test_abstain_boundary_and_the_ceiling():
    n, alpha = 1000, 0.001
    # the smallest n_top whose lower bound exceeds 1/2 certifies; one fewer abstains
    first = next(k for k in range(n + 1) if beta.ppf(alpha, k, n - k + 1) > 0.5)
    assert math.isnan(certified_radius(first - 1, n, 0.5, alpha))
    assert certified_radius(first, n, 0.5, alpha) > 0
    assert lower_confidence_bound(first - 1, n, alpha) <= 0.5 < lower_confidence_bound(first, n, alpha)
    # every vote for the top class: pA_lower = alpha^(1/n), the largest radius n draws can certify
    assert certified_radius(n, n, 1.0, alpha) == pytest.approx(norm.ppf(alpha ** (1 / n)), rel=1e-9)
    assert certified_radius(n, n, 1.0, alpha) == pytest.approx(2.46, abs=0.01)  # 2.46 sigma at n = 1,000


def test_a_linear_classifier_on_gaussian_inputs():
    """f(x) = 1[w.x + b > 0]: the smoothed classifier's exact radius is the distance to the hyperplane,
    |w.x + b| / ||w||; CERTIFY's radius stays below it (with probability 1 - alpha) and close with n large."""
    rng = np.random.default_rng(0)
    w, b, sigma, alpha, n0, n = np.array([3.0, -4.0]), 0.5, 0.5, 0.001, 100, 20000
    points = np.array([[0.4, -0.1], [-0.3, 0.2], [0.05, 0.05], [0.2, 0.0]])  # distances up to 0.42 = 0.84 sigma
    selection, estimation = np.zeros((len(points), 2), int), np.zeros((len(points), 2), int)
    for i, x in enumerate(points):
        for counts, m in ((selection, n0), (estimation, n)):
            noisy = x + sigma * rng.standard_normal((m, 2))
            counts[i] = np.bincount((noisy @ w + b > 0).astype(int), minlength=2)
    pred, radius = certify_counts(selection, estimation, sigma, alpha)
    exact = np.abs(points @ w + b) / np.linalg.norm(w)
    truth = (points @ w + b > 0).astype(int)
    for i in range(len(points)):
        if math.isnan(radius[i]):
            assert exact[i] < 0.1 * sigma  # only a point next to the boundary may abstain
            continue
        assert pred[i] == truth[i]
        # the Clopper-Pearson margin at n = 20,000 costs at most ~0.015 of radius here (sigma 0.5)
        assert exact[i] - 0.03 <= radius[i] <= exact[i]
    labels = truth
    acc = certified_accuracy(pred, radius, labels, [0.0, 0.5, 2.0])
    assert acc[0.0] == np.mean(~np.isnan(radius)) and acc[2.0] == 0.0


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="sigma"):
        certified_radius(5, 10, 0.0, 0.01)
    with pytest.raises(ValueError, match="alpha"):
        certified_radius(5, 10, 0.25, 1.0)
    with pytest.raises(ValueError, match="n_top"):
        certified_radius(11, 10, 0.25, 0.01)
    from calibprompt.robustness.certify import check_settings

    with pytest.raises(ValueError, match=r"n0 \(200\) .* must not exceed n \(100\)"):
        check_settings(0.25, 0.001, n0=200, n=100)


#: the key of a clean feature as calibprompt 0.2 computed it (before noisy views existed)
CLEAN_KEY = "7d961a46e3e6fce2f4de70b69f0d7f48a567e8d61e2e4895f4151acb11629de8"


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    model = tiny_model_dir(root / "model", "clip")
    images = write_image_folder(root / "images", n_train=8, n_test=6)
    base = {"backbone": {"path": str(model)}, "data": {"source": "folder", "path": str(images)}, "shots": 2,
            "train": {"epochs": 3, "batch_size": 2}, "eval": {"bootstrap": 0},
            "cache_dir": str(root / "cache")}
    return {"root": root, "base": base, "model": model, "images": images}


def _config(setup, name, method):
    path = setup["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**setup["base"], "method": method}))
    return path


def test_noisy_views_are_cached_and_deterministic(setup):
    from calibprompt.backbones import load_backbone
    from calibprompt.data import open_dataset
    from calibprompt.features import FeatureCache

    backbone = load_backbone({"path": str(setup["model"])})
    dataset = open_dataset(setup["base"]["data"])
    samples = dataset.samples[:5]
    first = FeatureCache(setup["root"] / "n1")
    a = first.noisy_features(backbone, dataset, samples, 0.25, range(3), seed=1)
    assert a.shape == (5, 3, backbone.info.embed_dim) and first.encoded == 15
    again = first.noisy_features(backbone, dataset, samples, 0.25, range(4), seed=1)
    assert first.encoded == 15 + 5 and torch.equal(again[:, :3], a)  # only the new draw is encoded
    other = FeatureCache(setup["root"] / "n2").noisy_features(backbone, dataset, samples, 0.25, range(3), seed=1)
    assert torch.equal(other, a)  # deterministic by seed, in a fresh cache
    clean = FeatureCache(setup["root"] / "n2").features(backbone, dataset, samples)
    assert not torch.allclose(a[:, 0], clean) and not torch.allclose(a[:, 0], a[:, 1])
    louder = FeatureCache(setup["root"] / "n2").noisy_features(backbone, dataset, samples, 1.0, range(1), seed=1)
    assert (louder[:, 0] - clean).norm() > (a[:, 0] - clean).norm()


def test_certify_promptsmooth_end_to_end(setup, capsys):
    cfg = _config(setup, "ps", {"name": "promptsmooth-as", "sigmas": [0.25], "lambda_as": 0.5})
    out = setup["root"] / "certify-ps"
    args = ["certify", str(cfg), "--out", str(out), "--sigma", "0.25", "--n0", "4", "--n", "20", "--alpha", "0.01",
            "--json", "-q"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == "promptsmooth-as" and report["n_images"] == 12
    assert set(report["certified_accuracy"]) == {"0.0", "0.25", "0.5", "0.75", "1.0"}
    assert report["noisy_views_encoded"] == 12 * 24
    for part in ("smoothed_votes", "single_draw", "clean"):
        assert 0.0 <= report[part]["ece"] <= 1.0
    rows = (out / "certify.csv").read_text().splitlines()
    assert len(rows) == 13 and rows[0].startswith("idx,image,label,predict,radius,correct,selected,n_top,n")
    assert (out / "certified_accuracy.png").stat().st_size > 1000
    # every row's radius, or its abstention, is the pure function of the selected class's vote count
    for row in rows[1:]:
        fields = row.split(",")
        expected = certified_radius(int(fields[7]), int(fields[8]), 0.25, 0.01)
        if fields[4]:
            assert float(fields[4]) == pytest.approx(expected, rel=1e-12) and int(fields[3]) == int(fields[6])
        else:
            assert math.isnan(expected) and fields[3] == "-1"
    assert report["certificate"].startswith("randomized smoothing")
    # a second certification (more radii) reuses the run and every noisy view
    assert main(args + ["--radii", "0,0.1"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["noisy_views_encoded"] == 0 and set(again["certified_accuracy"]) == {"0.0", "0.1"}
    run = json.loads((out / "run" / "metrics.json").read_text())
    assert run["config"]["resolved_method"]["kind"] == "promptsmooth"
    # another method on the same images and sigma: its certification encodes no noisy view either
    other = _config(setup, "ps-plain", {"name": "promptsmooth", "sigmas": [0.25]})
    assert main(["certify", str(other), "--out", str(setup["root"] / "certify-ps2"), *args[4:]]) == 0
    assert json.loads(capsys.readouterr().out)["noisy_views_encoded"] == 0


def test_test_time_step_for_prompts_and_zero_shot(setup, capsys):
    common = ["--sigma", "0.25", "--n0", "2", "--n", "6", "--alpha", "0.1", "--tta", "--tta-copies", "4",
              "--max-images", "4", "--json", "-q"]
    coop = _config(setup, "coop", {"name": "coop-ce"})
    assert main(["certify", str(coop), "--out", str(setup["root"] / "tta-coop"), *common]) == 0
    combined = json.loads(capsys.readouterr().out)
    assert combined["settings"]["tta"] == {"copies": 4, "steps": 1, "lr": 0.005} and combined["n_images"] == 4
    zs = _config(setup, "zs", {"name": "zeroshot"})
    assert main(["certify", str(zs), "--out", str(setup["root"] / "tta-zs"), *common]) == 0
    zero = json.loads(capsys.readouterr().out)
    assert zero["method"] == "zeroshot" and 0.0 <= zero["smoothed_accuracy"] <= 1.0
    assert zero["certificate"].startswith("heuristic")  # the prompt depends on the certified input
    lp = _config(setup, "lp", {"name": "linear-probe", "C": 1.0})
    assert main(["certify", str(lp), "--out", str(setup["root"] / "tta-lp"), *common]) == 2
    assert "learns none" in capsys.readouterr().err
    assert not (setup["root"] / "tta-lp" / "run").exists()  # refused before training


def test_the_test_time_step_lowers_the_entropy_and_restarts_for_every_image(setup):
    from calibprompt.backbones import load_backbone
    from calibprompt.methods.prompt_learner import PromptLearner
    from calibprompt.robustness.tta import TTASettings, average_entropy, tuned_text_features

    backbone = load_backbone({"path": str(setup["model"])})
    learner = PromptLearner(backbone, ["normal", "tumor"], n_ctx=4, generator=torch.Generator().manual_seed(0))
    start = learner.ctx.detach().clone()
    gen = torch.Generator().manual_seed(3)
    copies = [torch.randn(16, backbone.info.embed_dim, generator=gen) for _ in range(2)]
    scale = float(backbone.logit_scale)
    settings = TTASettings(copies=16, steps=3, lr=0.05)
    before = learner.text_features(backbone).detach()
    tuned = tuned_text_features(backbone, learner, start, copies[0], scale, settings)
    assert not torch.allclose(tuned, before)
    feats = torch.nn.functional.normalize(copies[0], dim=-1)
    assert average_entropy(scale * feats @ tuned.t()) < average_entropy(scale * feats @ before.t())
    assert torch.equal(learner.ctx.detach(), start)  # the learner's own prompt is never moved
    # each image starts afresh: the order in which images are tuned does not matter
    second_then_first = [tuned_text_features(backbone, learner, start, c, scale, settings) for c in copies[::-1]]
    assert torch.equal(second_then_first[1], tuned)


def test_pixel_noise_has_std_sigma_on_the_unit_image_and_clean_keys_do_not_change():
    from calibprompt.features import FeatureCache, Noise
    from calibprompt.features.loader import add_pixel_noise

    for mean, std in (((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)), ((0.5862,), (0.2757,))):
        m, s = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
        unit = torch.full((len(mean), 96, 96), 0.4)
        noisy = add_pixel_noise((unit - m) / s, 0.25, seed=11, mean=mean, std=std)
        added = noisy * s + m - unit
        assert abs(float(added.std()) - 0.25) < 0.005 and abs(float(added.mean())) < 0.005
        assert torch.equal(noisy, add_pixel_noise((unit - m) / s, 0.25, seed=11, mean=mean, std=std))
    # a clean feature's key is what it was before noisy views existed: caches from earlier versions stay valid
    assert FeatureCache.key("w", {"t": 1}, "c", None, 0) == CLEAN_KEY
    keys = {FeatureCache.key("w", {"t": 1}, "c", None, 0, Noise(0.25, 1, 0, stream)) for stream in ("train", "certify", "tta")}
    assert len(keys) == 3 and CLEAN_KEY not in keys


def test_certify_refuses_bad_input(setup, capsys):
    coop = _config(setup, "coop-bad", {"name": "coop-ce"})
    out = str(setup["root"] / "bad")
    assert main(["certify", str(coop), "--out", out, "--sigma", "0.25"]) == 2
    assert "was not trained under noise" in capsys.readouterr().err
    ps = _config(setup, "ps-bad", {"name": "promptsmooth"})
    for flags, text in ((["--sigma", "0"], "sigma"), (["--sigma", "0.25", "--n0", "50", "--n", "10"], "n0"),
                        (["--sigma", "0.25", "--alpha", "1.5"], "alpha")):
        assert main(["certify", str(ps), "--out", out, *flags]) == 2
        assert text in capsys.readouterr().err
    assert not (setup["root"] / "bad" / "run").exists()  # nothing was trained
    with pytest.raises(ValueError, match="sigmas"):
        from calibprompt.methods import resolve_method

        resolve_method("promptsmooth", sigmas=[0.25, -1]).build()
