"""Feature-space methods: formulas against hand computations, the linear probe against scikit-learn,
heads saved and loaded (and refused when damaged)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from calibprompt.losses import build_objective
from calibprompt.methods import FitContext, HeadError, LinearHead, TipAdapterHead, load_head, resolve_method
from calibprompt.methods.heads import ClipAdapterHead, head_bytes
from calibprompt.methods.linear_probe import C_GRID, fit_logistic, search_c
from calibprompt.methods.tip_adapter import search_grid


def _blobs(k: int, n_per: int, d: int = 16, seed: int = 0, spread: float = 1.2):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * spread
    x = torch.cat([centres[c] + torch.randn(n_per, d, generator=g) for c in range(k)])
    y = torch.arange(k).repeat_interleave(n_per)
    return x, y


def _ctx(k=3, n_per=6, views=2, val=True, seed=0, spread=1.2) -> FitContext:
    x, y = _blobs(k, n_per, seed=seed, spread=spread)
    g = torch.Generator().manual_seed(seed + 1)
    train_views = x.unsqueeze(1) + 0.05 * torch.randn(x.shape[0], views, x.shape[1], generator=g)
    xv, yv = _blobs(k, 4, seed=seed + 7)
    zs = F.normalize(torch.stack([x[y == c].mean(0) for c in range(k)]) + torch.randn(k, x.shape[1], generator=g), dim=-1)
    return FitContext(backbone=None, classnames=[f"class {i}" for i in range(k)], train_views=train_views, labels=y,
                      zs_text=zs, scale=20.0, seed=seed, device=torch.device("cpu"),
                      val_features=xv if val else None, val_labels=yv if val else None)


# ------------------------------------------------------------------------------------ linear probe
@pytest.mark.parametrize("k,c", [(2, 1.0), (2, 0.05), (3, 1.0), (4, 10.0)])
def test_linear_probe_equals_sklearn_logistic_regression(k, c):
    x, y = _blobs(k, 10, seed=k)
    xn = F.normalize(x.double(), dim=-1)
    w, b, _ = fit_logistic(xn, y, k, c, build_objective([{"name": "CE"}]))
    ours = torch.softmax(xn @ w.t() + b, dim=1).numpy()
    ref = LogisticRegression(C=c, tol=1e-12, max_iter=10_000).fit(xn.numpy(), y.numpy())
    theirs = ref.predict_proba(xn.numpy())
    assert np.abs(ours - theirs).max() < 1e-4
    xt, _ = _blobs(k, 5, seed=k + 100)
    xtn = F.normalize(xt.double(), dim=-1)
    assert np.abs(torch.softmax(xtn @ w.t() + b, dim=1).numpy() - ref.predict_proba(xtn.numpy())).max() < 1e-4


def test_c_search_follows_coop_protocol():
    # accuracy peaks at C = 1 on the grid and rises to the right of it: the bisection moves right
    def score(c):
        return 0.5 + 0.1 * (c == 1.0) + (0.2 if 1.0 < c <= 10.0 else 0.0)

    chosen, trace = search_c(score, steps=3)
    assert [c for c, _ in trace[: len(C_GRID)]] == list(C_GRID)
    # step 1: left 0.1 (0.5) < right 10 (0.7): keep 10, left -> 1; step 2: left 1 (0.6) < right 10: keep 10,
    # left -> sqrt(10); step 3: left 3.16 (0.7) == right 10 (0.7): keep left, so the winner is 10**0.5
    assert math.isclose(chosen, 10 ** 0.5)
    assert len(trace) == len(C_GRID) + 2 * 3


def test_linear_probe_method_searches_c_on_validation_and_fixed_c_skips_it():
    ctx = _ctx()
    searched = resolve_method("linear-probe").build().fit(ctx)
    assert len(searched.info["C_search"]) == len(C_GRID) + 16 and searched.info["C"] > 0
    fixed = resolve_method("linear-probe", C=0.5).build().fit(_ctx(val=False))
    assert fixed.info["C"] == 0.5 and "C_search" not in fixed.info
    with pytest.raises(ValueError, match="val_shots"):
        resolve_method("linear-probe").build().fit(_ctx(val=False))


def test_linear_probe_with_smac_changes_the_fit():
    ctx = _ctx(k=2, n_per=8)
    plain = resolve_method("linear-probe", C=10.0).build().fit(ctx).head
    smac = resolve_method("linear-probe", C=10.0, losses=["CE", {"name": "SMAC", "alpha": 0.1}]).build().fit(ctx).head
    assert not torch.allclose(plain.weight, smac.weight)


# ---------------------------------------------------------------------------------------------- LP++
def test_lp_plus_plus_head_folds_alpha_into_the_weights():
    ctx = _ctx(val=False, spread=0.1)
    result = resolve_method("lp++", epochs=20).build().fit(ctx)
    head = result.head
    f = torch.randn(5, ctx.train_views.shape[-1])
    fn = F.normalize(f, dim=-1)
    assert head.scale == 1.0 and not head.normalize_weight
    assert torch.allclose(head(f), fn @ head.weight.t() + head.bias, atol=1e-6)
    assert result.info["selected_epoch"] == 19 and len(result.info["epoch_losses"]) == 20
    assert result.info["epoch_losses"][-1] < result.info["epoch_losses"][0]


def test_lp_plus_plus_initial_alpha_and_step_sizes():
    ctx = _ctx(k=2, n_per=4, views=1, val=False)
    result = resolve_method("lp++", epochs=1, alpha_every=1000).build().fit(ctx)
    x = F.normalize(ctx.train_views[:, 0], dim=-1)
    m = x.shape[0]
    assert math.isclose(result.info["lr_w"], 4 * m / float(torch.linalg.eigvalsh((x.t() @ x).double()).max()),
                        rel_tol=1e-5)
    text = x @ ctx.zs_text.t()
    assert math.isclose(result.info["lr_alpha"], m / (4 * float((text ** 2).sum(0).max())), rel_tol=1e-5)


# ------------------------------------------------------------------------------------- ZS-LP and CLAP
def test_zs_lp_starts_at_zero_shot_and_learns():
    ctx = _ctx(val=False)
    result = resolve_method("zs-lp", epochs=30).build().fit(ctx)
    assert result.info["epoch_losses"][-1] < result.info["epoch_losses"][0]
    zero = resolve_method("zs-lp", epochs=1, lr=1e-12, warmup_epochs=0).build().fit(ctx).head
    assert torch.allclose(F.normalize(zero.weight, dim=-1), ctx.zs_text, atol=1e-6)


def test_clap_multipliers_are_zero_shot_class_accuracy_and_hold_prototypes_closer():
    from calibprompt.methods.clap import CLAP

    ctx = _ctx(val=False)
    clap = resolve_method("clap", epochs=40).build()
    lam = clap.multipliers(ctx, ctx.zs_text)
    feats = F.normalize(ctx.train_views.reshape(-1, ctx.train_views.shape[-1]), dim=-1)
    probs = torch.softmax(ctx.scale * feats @ ctx.zs_text.t(), dim=1)
    labels = ctx.labels.repeat_interleave(ctx.train_views.shape[1])
    expected = torch.stack([probs[labels == c, c].mean() for c in range(3)])
    assert torch.allclose(lam, expected, atol=1e-6)
    assert isinstance(clap, CLAP)
    free = resolve_method("zs-lp", epochs=40).build().fit(ctx).head.weight
    held = resolve_method("clap", epochs=40, multipliers="balanced").build().fit(ctx).head.weight
    assert ((held - ctx.zs_text) ** 2).sum() < ((free - ctx.zs_text) ** 2).sum()


# ------------------------------------------------------------------------------------ Tip-Adapter
def test_tip_adapter_logits_follow_the_formula():
    g = torch.Generator().manual_seed(0)
    text, keys = F.normalize(torch.randn(3, 8, generator=g), dim=-1), torch.randn(6, 8, generator=g)
    values = F.one_hot(torch.tensor([0, 0, 1, 1, 2, 2]), 3).float()
    head = TipAdapterHead(text, keys, values, alpha=2.0, beta=5.0, scale=50.0)
    f = torch.randn(4, 8, generator=g)
    fn, kn = F.normalize(f, dim=-1), F.normalize(keys, dim=-1)
    expected = 50.0 * fn @ text.t() + 2.0 * torch.exp(-5.0 * (1 - fn @ kn.t())) @ values
    assert torch.allclose(head(f), expected, atol=1e-5)


def test_tip_adapter_search_matches_brute_force_and_keys_are_pooled_views():
    ctx = _ctx()
    method = resolve_method("tip-adapter", search_step=[12, 6]).build()
    result = method.fit(ctx)
    keys = F.normalize(ctx.train_views.mean(1), dim=-1)
    assert torch.allclose(result.head.keys, keys, atol=1e-6)
    best = (1.0, 1.0, -1.0)
    for beta in search_grid(7.0, 12):
        for alpha in search_grid(3.0, 6):
            h = TipAdapterHead(ctx.zs_text, keys, result.head.values, alpha, beta, ctx.scale)
            acc = float((h(ctx.val_features).argmax(1) == ctx.val_labels).float().mean())
            if acc > best[2]:
                best = (alpha, beta, acc)
    assert (result.head.alpha, result.head.beta) == pytest.approx(best[:2])


def test_tip_adapter_f_trains_the_keys_only():
    ctx = _ctx(val=False)
    before = resolve_method("tip-adapter").build().fit(ctx).head
    after = resolve_method("tip-adapter-f", epochs=5, lr=0.01).build().fit(ctx).head
    assert not torch.allclose(before.keys, after.keys)
    assert torch.equal(before.text, after.text) and torch.equal(before.values, after.values)


def test_clip_adapter_residual_ratio_zero_is_zero_shot():
    ctx = _ctx(val=False)
    head = resolve_method("clip-adapter", epochs=2, ratio=0.0).build().fit(ctx).head
    f = torch.randn(5, ctx.train_views.shape[-1])
    assert torch.allclose(head(f), ctx.scale * F.normalize(f, dim=-1) @ ctx.zs_text.t(), atol=1e-5)


# -------------------------------------------------------------------------------------------- heads
@pytest.mark.parametrize("kind", ["linear", "tip", "adapter"])
def test_heads_round_trip_through_safetensors(kind, tmp_path):
    g = torch.Generator().manual_seed(1)
    text = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    head = {"linear": lambda: LinearHead(torch.randn(3, 8, generator=g), torch.randn(3, generator=g), 1.0, False),
            "tip": lambda: TipAdapterHead(text, torch.randn(5, 8, generator=g), torch.eye(3)[[0, 1, 2, 0, 1]], 1.5, 2.0, 30.0),
            "adapter": lambda: ClipAdapterHead(text, torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), 0.2, 30.0),
            }[kind]()
    path = tmp_path / "head.safetensors"
    path.write_bytes(head_bytes(head, {"method": "x"}))
    loaded, meta = load_head(path, num_classes=3, feature_dim=8)
    f = torch.randn(4, 8, generator=g)
    assert torch.equal(loaded(f), head(f)) and meta == {"method": "x"}


def test_damaged_or_mismatched_head_files_are_refused(tmp_path):
    head = LinearHead(torch.randn(3, 8), None, 10.0, False)
    good = head_bytes(head)
    path = tmp_path / "head.safetensors"
    path.write_bytes(good)
    with pytest.raises(HeadError, match="3 classes, this task has 2"):
        load_head(path, num_classes=2)
    with pytest.raises(HeadError, match="feature width"):
        load_head(path, feature_dim=16)
    flipped = bytearray(good)
    flipped[10] ^= 0xFF  # inside the JSON header
    path.write_bytes(bytes(flipped))
    with pytest.raises(HeadError):
        load_head(path)
    from safetensors.torch import save

    path.write_bytes(save({"weight": torch.randn(3, 8)}, metadata={"format": "calibprompt.head/1", "kind": "linear",
                                                                     "settings": "{}", "meta": "{}"}))
    with pytest.raises(HeadError, match="missing tensors \\['bias'\\]"):
        load_head(path)
    with pytest.raises(HeadError, match="does not exist"):
        load_head(tmp_path / "nope.safetensors")


def test_text_feature_losses_need_a_head_with_prototypes():
    with pytest.raises(ValueError, match="AS needs text_features, which a tip-adapter-f head does not provide"):
        resolve_method("tip-adapter-f", losses=["CE", "AS"])
    assert [s["name"] for s in resolve_method("clap", losses=["CE", "AS"]).losses] == ["CE", "AS"]
    with pytest.raises(ValueError, match="takes no 'losses'"):
        resolve_method("tip-adapter", losses=["CE"])
