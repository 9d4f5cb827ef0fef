"""The loss registry, errors, conventions, gradients and build_objective."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from calibprompt.losses import LOSSES, build_objective, get_loss, list_losses

OFFICIAL_NAMES = [
    "CE", "LS", "FL", "SMAC", "MDCA", "DCA", "MMCE", "MBLS", "LOGITNORM", "ECCV_ZS", "ECCV_PENALTY", "AS",
    "MARGIN_MEAN_VAR", "TEXT_MOMENT_MATCHING", "CTPT_DISPERSION", "OTPT_ORTHO", "KGCOOP",
]  # fmt: skip


def _inputs(n: int = 10, k: int = 3, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, k, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    labels = torch.randint(0, k, (n,), generator=g)
    text = F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1).requires_grad_(True)
    zs_logits = torch.randn(n, k, generator=g, dtype=torch.float64) * 0.5  # narrow: Penalty is active
    zs_text = F.normalize(torch.randn(k, d, generator=g, dtype=torch.float64), dim=1)
    return logits, labels, text, zs_logits, zs_text


def _call(loss, logits, labels, text, zs_logits, zs_text):
    return loss(logits, labels, text, zs_logits=zs_logits, zs_text_features=zs_text)


# ----------------------------------------------------------------------------------------- registry
def test_registry_has_the_official_names_and_weights_on_the_classes():
    assert set(OFFICIAL_NAMES) <= set(LOSSES)
    weights = {name: cls.default_weight for name, cls in LOSSES.items()}
    assert weights["MMCE"] == 2.0 and weights["TEXT_MOMENT_MATCHING"] == 5.0
    assert all(w == 1.0 for n, w in weights.items() if n not in ("MMCE", "TEXT_MOMENT_MATCHING"))
    assert [r["name"] for r in list_losses()] == list(LOSSES)


def test_names_are_case_insensitive_and_reported_canonically():
    assert get_loss("ls", alpha=0.2).name == "LS"
    assert get_loss("Margin_Mean_Var").name == "MARGIN_MEAN_VAR"
    assert get_loss("eccv-zs").name == "ECCV_ZS"
    assert repr(get_loss("smac", alpha=0.2)) == "SMAC(alpha=0.2, convention='standard')"
    assert "gamma=3.0" in repr(get_loss("fl"))


def test_needs_are_declared():
    expected = {
        "ECCV_ZS": {"zs_logits"},
        "ECCV_PENALTY": {"zs_logits"},
        "AS": {"text_features"},
        "CTPT_DISPERSION": {"text_features"},
        "OTPT_ORTHO": {"text_features"},
        "TEXT_MOMENT_MATCHING": {"text_features", "zs_text_features"},
        "KGCOOP": {"text_features", "zs_text_features"},
    }
    for name in LOSSES:
        assert get_loss(name).needs == expected.get(name, set()), name


# ----------------------------------------------------------------------------------------- errors
def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown loss 'XENT'.*valid names: CE, LS"):
        get_loss("XENT")


def test_unknown_parameter_names_loss_and_valid_parameters():
    with pytest.raises(ValueError, match="loss 'LS' has no parameter 'gamma'; valid parameters: alpha, convention"):
        get_loss("LS", gamma=2.0)
    with pytest.raises(ValueError, match="loss 'CE' has no parameter 'alpha'"):
        get_loss("CE", alpha=0.1)


@pytest.mark.parametrize(
    "name, params, fragment",
    [
        ("LS", {"alpha": 1.0}, "alpha=1.0 is invalid; alpha must be in \\[0, 1\\)"),
        ("LS", {"alpha": -0.1}, "alpha must be in \\[0, 1\\)"),
        ("SMAC", {"alpha": 1.5}, "loss 'SMAC': alpha=1.5"),
        ("LS", {"alpha": True}, "finite number"),
        ("LS", {"alpha": float("nan")}, "finite number"),
        ("FL", {"gamma": -1}, "gamma must be >= 0"),
        ("LOGITNORM", {"t": 0.0}, "t must be > 0"),
        ("MBLS", {"margin": -1}, "margin must be >= 0"),
        ("MBLS", {"reduction": "max"}, "valid choices: 'sum', 'mean'"),
        ("OTPT_ORTHO", {"reduction": "max"}, "valid choices: 'sum', 'mean'"),
        ("OTPT_ORTHO", {"squared": 1}, "use True or False"),
        ("CE", {"convention": "official"}, "valid choices: 'standard', 'reference'"),
    ],
)
def test_invalid_values_raise(name, params, fragment):
    with pytest.raises(ValueError, match=fragment):
        get_loss(name, **params)


def test_bad_inputs_raise():
    logits, labels, *_ = _inputs()
    ce = get_loss("CE")
    with pytest.raises(ValueError, match="labels must lie in \\[0, 2\\]"):
        ce(logits, labels + 3)
    with pytest.raises(ValueError, match="labels must be an integer tensor of shape \\(10,\\)"):
        ce(logits, labels[:4])
    with pytest.raises(ValueError, match="labels must be integers"):
        ce(logits, labels.double())
    with pytest.raises(ValueError, match="floating \\(N, K\\) torch tensor"):
        ce(logits[0], labels)
    with pytest.raises(ValueError, match="at least 2 classes"):
        ce(logits[:, :1], torch.zeros(10, dtype=torch.long))


# ----------------------------------------------------------------------------------------- conventions
@pytest.mark.parametrize("name", [n for n in OFFICIAL_NAMES if n not in ("MMCE", "MBLS")])
def test_reference_equals_standard_where_the_official_code_is_textbook(name):
    args = _inputs(seed=3)  # unit-norm text features: AS and moment matching agree there too
    std = _call(get_loss(name), *args)
    ref = _call(get_loss(name, convention="reference"), *args)
    assert torch.allclose(std, ref, atol=1e-12, rtol=0)
    assert bool(get_loss(name).reference_note) == (name in ("AS", "TEXT_MOMENT_MATCHING"))


@pytest.mark.parametrize("name", ["MMCE", "MBLS"])
def test_reference_differs_where_documented(name):
    args = _inputs(n=16, seed=4)
    params = {"margin": 1.0} if name == "MBLS" else {}
    std = _call(get_loss(name, **params), *args)
    ref = _call(get_loss(name, convention="reference", **params), *args)
    assert abs(std.item() - ref.item()) > 1e-6
    assert get_loss(name).reference_note


# ----------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", OFFICIAL_NAMES)
def test_gradients_flow(name):
    logits, labels, text, zs_logits, zs_text = _inputs(n=16, seed=5)
    params = {"margin": 1.0} if name == "MBLS" else {}
    loss = get_loss(name, **params)
    value = _call(loss, logits, labels, text, zs_logits, zs_text)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    target = logits if loss.uses_logits else text
    assert target.grad is not None and torch.isfinite(target.grad).all()
    assert target.grad.abs().sum() > 0, f"{name}: zero gradient"


# ----------------------------------------------------------------------------------------- objective
def test_objective_is_the_weighted_sum_of_its_terms():
    args = _inputs(seed=6)
    obj = build_objective(
        [{"name": "LS", "alpha": 0.2}, {"name": "SMAC", "alpha": 0.2}, {"name": "AS", "weight": 0.5}, {"name": "MMCE"}]
    )
    assert obj.weights == [1.0, 1.0, 0.5, 2.0]  # MMCE's registry default is 2
    terms = obj.terms(*args[:3], zs_logits=args[3])
    assert list(terms) == ["LS", "SMAC", "AS", "MMCE"]
    total = obj(*args[:3], zs_logits=args[3])
    assert torch.allclose(total, sum(w * v for w, v in zip(obj.weights, terms.values())), atol=1e-12)
    weighted = obj.terms(*args[:3], weighted=True)
    assert torch.allclose(total, sum(weighted.values()), atol=1e-12)
    # each term is the stand-alone loss
    assert torch.allclose(terms["AS"], get_loss("AS")(*args[:3]))
    assert obj.needs == {"text_features"}
    assert "0.5*AS" in repr(obj)


def test_objective_specs_convention_and_duplicates():
    obj = build_objective([{"name": "mmce"}, {"name": "ce"}, {"name": "CE", "weight": 0.0}], convention="reference")
    assert obj.labels == ["MMCE", "CE", "CE#2"]
    assert [s["convention"] for s in obj.specs()] == ["reference"] * 3
    assert obj.specs()[0] == {"name": "MMCE", "normalisation": None, "convention": "reference", "weight": 2.0}
    own = build_objective([{"name": "MMCE", "convention": "standard"}], convention="reference")
    assert own.losses[0].convention == "standard"


def test_objective_needs_and_missing_inputs():
    obj = build_objective([{"name": "CE"}, {"name": "ECCV_PENALTY"}, {"name": "KGCOOP"}])
    assert obj.needs == {"zs_logits", "text_features", "zs_text_features"}
    logits, labels, *_ = _inputs()
    with pytest.raises(ValueError, match="needs zs_logits"):
        obj(logits, labels)


@pytest.mark.parametrize(
    "specs, fragment",
    [
        ([{"name": "CE", "weight": -1}], "weight=-1 is invalid"),
        ([{"name": "CE", "weight": "1"}], "weight='1' is invalid"),
        ([{"weight": 1}], "with a 'name' key"),
        ({"name": "CE"}, "list of loss specs"),
        ([{"name": "LS", "gamma": 1}], "no parameter 'gamma'"),
        ([], "at least one loss"),
    ],
)
def test_build_objective_errors(specs, fragment):
    with pytest.raises(ValueError, match=fragment):
        build_objective(specs)
