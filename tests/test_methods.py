"""Method presets expand into the documented loss specs; paper hyper-parameters; errors."""

from __future__ import annotations

import pytest
import torch

from calibprompt.losses import build_objective
from calibprompt.methods import PAPER_HPARAMS, list_methods, paper_hparams, paper_method, resolve_method

REQUIRED = [
    "zeroshot", "coop-ce", "coop-ls", "coop-fl", "coop-ce-mdca", "coop-ls-mdca", "coop-fl-mdca", "coop-ce-dca",
    "coop-ce-mmce", "coop-mbls", "coop-logitnorm", "coop-zsnorm", "coop-ce-penalty", "coop-ce-smac",
    "coop-ce-smac-as", "coop-fl-smac", "coop-fl-smac-as", "coop-ls-smac", "calibprompt", "calibprompt-ce",
    "calibprompt-fl", "kgcoop", "coop-ctpt", "coop-otpt",
]  # fmt: skip

EXPECTED = {
    "coop-ce": [{"name": "CE", "weight": 1.0}],
    "coop-ls": [{"name": "LS", "weight": 1.0, "alpha": 0.1}],
    "coop-fl": [{"name": "FL", "weight": 1.0, "gamma": 3.0}],
    "coop-ce-mdca": [{"name": "CE", "weight": 1.0}, {"name": "MDCA", "weight": 1.0}],
    "coop-ls-mdca": [{"name": "LS", "weight": 1.0, "alpha": 0.1}, {"name": "MDCA", "weight": 1.0}],
    "coop-fl-mdca": [{"name": "FL", "weight": 1.0, "gamma": 3.0}, {"name": "MDCA", "weight": 1.0}],
    "coop-ce-dca": [{"name": "CE", "weight": 1.0}, {"name": "DCA", "weight": 1.0}],
    "coop-ce-mmce": [{"name": "CE", "weight": 1.0}, {"name": "MMCE", "weight": 2.0}],
    "coop-mbls": [{"name": "MBLS", "weight": 1.0, "margin": 10.0, "alpha": 0.1}],
    "coop-logitnorm": [{"name": "LOGITNORM", "weight": 1.0, "t": 1.0}],
    "coop-zsnorm": [{"name": "ECCV_ZS", "weight": 1.0}],
    "coop-ce-penalty": [{"name": "CE", "weight": 1.0}, {"name": "ECCV_PENALTY", "weight": 1.0}],
    "coop-ce-smac": [{"name": "CE", "weight": 1.0}, {"name": "SMAC", "weight": 1.0, "alpha": 0.1}],
    "coop-ce-smac-as": [
        {"name": "CE", "weight": 1.0},
        {"name": "SMAC", "weight": 1.0, "alpha": 0.1},
        {"name": "AS", "weight": 1.0},
    ],
    "coop-fl-smac": [{"name": "FL", "weight": 1.0, "gamma": 3.0}, {"name": "SMAC", "weight": 1.0, "alpha": 0.1}],
    "coop-ls-smac": [{"name": "LS", "weight": 1.0, "alpha": 0.1}, {"name": "SMAC", "weight": 1.0, "alpha": 0.1}],
    "calibprompt": [
        {"name": "LS", "weight": 1.0, "alpha": 0.1},
        {"name": "SMAC", "weight": 1.0, "alpha": 0.1},
        {"name": "AS", "weight": 1.0},
    ],
    "calibprompt-fl": [
        {"name": "FL", "weight": 1.0, "gamma": 3.0},
        {"name": "SMAC", "weight": 1.0, "alpha": 0.1},
        {"name": "AS", "weight": 1.0},
    ],
    "kgcoop": [{"name": "CE", "weight": 1.0}, {"name": "KGCOOP", "weight": 8.0}],
    "coop-ctpt": [{"name": "CE", "weight": 1.0}, {"name": "CTPT_DISPERSION", "weight": 50.0}],
    "coop-otpt": [
        {"name": "CE", "weight": 1.0},
        {"name": "OTPT_ORTHO", "weight": 2.0, "squared": True, "reduction": "sum"},
    ],
}


def test_all_required_presets_exist_with_descriptions():
    listed = {m["name"]: m for m in list_methods()}
    assert set(REQUIRED) <= set(listed)
    assert listed["calibprompt"]["params"] == {"alpha": 0.1, "lambda_as": 1.0}
    assert all(m["description"] for m in listed.values())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_presets_expand_to_the_documented_specs(name):
    spec = resolve_method(name)
    assert spec.losses == EXPECTED[name]
    assert spec.trains and spec.posthoc is None and spec.name == name


@pytest.mark.parametrize("name", REQUIRED)
def test_every_preset_builds_an_objective(name):
    spec = resolve_method(name)
    if not spec.trains:
        assert spec.losses == []
        return
    obj = build_objective(spec.losses)
    k, n = 3, 6
    logits = torch.randn(n, k, dtype=torch.float64)
    labels = torch.arange(n) % k
    text = torch.nn.functional.normalize(torch.randn(k, 4, dtype=torch.float64), dim=1)
    value = obj(logits, labels, text, zs_logits=logits * 0.5, zs_text_features=text.flip(0))
    assert torch.isfinite(value)


def test_calibprompt_shares_alpha_and_weights_as_by_lambda():
    spec = resolve_method("calibprompt", alpha=0.05, lambda_as=0.01)
    assert spec.losses == [
        {"name": "LS", "weight": 1.0, "alpha": 0.05},
        {"name": "SMAC", "weight": 1.0, "alpha": 0.05},
        {"name": "AS", "weight": 0.01},
    ]
    assert "LS(alpha) + SMAC(alpha) + lambda_as * AS" in spec.description
    assert "alpha=0.05" in spec.description and "lambda_as=0.01" in spec.description
    assert spec.params == {"alpha": 0.05, "lambda_as": 0.01}


def test_preset_parameters_reach_the_losses():
    assert resolve_method("coop-fl-smac-as", gamma=1.0, alpha=0.2, lambda_as=3.0).losses == [
        {"name": "FL", "weight": 1.0, "gamma": 1.0},
        {"name": "SMAC", "weight": 1.0, "alpha": 0.2},
        {"name": "AS", "weight": 3.0},
    ]
    assert resolve_method("coop-otpt", reduction="mean", squared=False).losses[1] == {
        "name": "OTPT_ORTHO", "weight": 2.0, "squared": False, "reduction": "mean",
    }  # fmt: skip


def test_zeroshot_and_method_kinds():
    zs = resolve_method("zeroshot")
    assert not zs.trains and zs.losses == [] and zs.kind == "zeroshot"
    for name in ("coop-zsnorm", "coop-ce-penalty", "kgcoop", "coop-ce-tmm", "calibprompt"):
        assert resolve_method(name).kind == "coop", name
    for name in ("linear-probe", "zs-lp", "lp++", "clap", "tip-adapter", "tip-adapter-f", "clip-adapter"):
        assert resolve_method(name).kind == name


@pytest.mark.parametrize("suffix", ["ts", "vs", "hb", "iso"])
def test_posthoc_suffix(suffix):
    spec = resolve_method(f"coop-ce+{suffix}")
    assert spec.posthoc == suffix and spec.losses == EXPECTED["coop-ce"] and spec.name == f"coop-ce+{suffix}"
    assert resolve_method(f"zeroshot+{suffix}").posthoc == suffix
    assert resolve_method(f"CalibPrompt+{suffix.upper()}", alpha=0.2).losses[0]["alpha"] == 0.2


@pytest.mark.parametrize(
    "name, params, fragment",
    [
        ("coop-xx", {}, "unknown method 'coop-xx'; valid methods: zeroshot, coop-ce"),
        ("coop-ce+platt", {}, "unknown post-hoc suffix '\\+platt'"),
        ("coop-ce", {"alpha": 0.1}, "method 'coop-ce' has no parameter 'alpha'; valid parameters: none"),
        ("calibprompt", {"beta": 1.0}, "valid parameters: alpha \\(default 0.1\\), lambda_as \\(default 1.0\\)"),
        ("calibprompt", {"alpha": 1.2}, "loss 'LS': alpha=1.2 is invalid"),
        ("calibprompt", {"lambda_as": -1.0}, "lambda_as=-1.0 is invalid"),
        ("coop-fl", {"gamma": -2}, "gamma must be >= 0"),
        ("coop-otpt", {"reduction": "max"}, "valid choices: 'sum', 'mean'"),
    ],
)
def test_resolve_method_errors(name, params, fragment):
    with pytest.raises(ValueError, match=fragment):
        resolve_method(name, **params)


def test_paper_hparams_table():
    assert len(PAPER_HPARAMS) == 10
    assert paper_hparams("plip", "kather") == {"alpha": 0.05, "lambda_as": 0.01}
    assert paper_hparams("QuiltNet-B32", "DigestPath") == {"alpha": 0.05, "lambda_as": 0.001}
    assert paper_hparams("quiltnet", "KatherColon") == {"alpha": 0.01, "lambda_as": 1.0}
    assert paper_hparams("biomedclip", "rsna18") == {"alpha": 0.1, "lambda_as": 3.0}
    assert paper_hparams("medclip-vit", "covid") == {"alpha": 0.2, "lambda_as": 1.0}
    assert paper_hparams("plip", "pannuke") == {"alpha": 0.2, "lambda_as": 0.1}
    spec = paper_method("plip", "digestpath")
    assert spec.losses[0]["alpha"] == 0.03 and spec.losses[2]["weight"] == 0.001
    with pytest.raises(ValueError, match="no paper hyper-parameters for backbone 'plip' on dataset 'covid'"):
        paper_hparams("plip", "covid")
