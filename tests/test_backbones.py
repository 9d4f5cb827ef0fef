"""The backbone registry, `load_backbone` config handling, offline errors and `calibprompt models`.

Also holds the checks shared by the per-family modules (test_backbones_*.py), which build each full
architecture once from the real configs in the shared data folder."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from calibprompt.backbones import WeightsError
from calibprompt.backbones import load_backbone
from calibprompt.backbones.registry import (
    BACKBONE_KEYS, BACKBONES, SWITCHES, get_entry, list_backbones, resolve_switches,
)
from calibprompt.methods.prompt_learner import PromptLearner

PAPER_MODELS = {"plip", "quiltnet-b32", "biomedclip", "medclip-vit"}
REQUIRED = {"plip", "quiltnet-b32", "quiltnet-b16", "biomedclip", "medclip-vit", "pubmedclip",
            "clip-vit-b32", "clip-vit-b16", "unimedclip-b16"}


# ---- shared checks (used by test_backbones_*.py) ---------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def hub_offline():
    """No test here may reach the network: the hub counts as offline for the whole module (modules
    that import this fixture get the same guarantee)."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield
    if old is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = old


def probe_images(backbone, n: int = 1, seed: int = 0) -> torch.Tensor:
    """``n`` small random RGB images through the backbone's own test transform."""
    rng = np.random.default_rng(seed)
    transform = backbone.image_transform(train=False)
    pics = [Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)) for _ in range(n)]
    return torch.stack([transform(p) for p in pics])


def zero_shot_logits(backbone, ids: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The calibprompt computation: exp(s) * cos(image, text), on trimmed ids (trimming is exact)."""
    with torch.no_grad():
        img = torch.nn.functional.normalize(backbone.encode_image(images).float(), dim=-1)
        txt = torch.nn.functional.normalize(backbone.encode_text(backbone.trim(ids)).float(), dim=-1)
    return backbone.logit_scale.float() * img @ txt.T


def assert_zero_shot_equals_open_clip(backbone, ids: torch.Tensor) -> None:
    """Our zero-shot logits (trimmed ids) equal open_clip's own ``get_logits`` on the full ids."""
    images = probe_images(backbone)
    ours = zero_shot_logits(backbone, ids, images)
    with torch.no_grad():
        direct = backbone.model.get_logits(images, ids)[0]
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, direct, atol=1e-4, rtol=1e-5)


def written_prompts(phrase: str, classnames: list[str], position: str) -> list[str]:
    """The prompt text a learner with ctx = token embeddings of ``phrase`` stands for."""
    words = phrase.split()
    half = len(words) // 2
    if position == "end":
        return [f"{phrase} {c}." for c in classnames]
    if position == "front":
        return [f"{c} {phrase}." for c in classnames]
    return [f"{' '.join(words[:half])} {c} {' '.join(words[half:])}." for c in classnames]


def injection_errors(backbone, classnames: list[str], phrase: str,
                     positions: tuple[str, ...] = ("end", "front", "middle")) -> dict[str, float]:
    """Max |text features of a learner whose ctx is the token embeddings of ``phrase`` - features of
    the written prompt encoded normally|, per class-token position. Each word of ``phrase`` must be one
    token (checked: n_ctx equals the word count)."""
    errors = {}
    with torch.no_grad():
        for position in positions:
            learner = PromptLearner(backbone, classnames, init=phrase, position=position)
            assert learner.n_ctx == len(phrase.split()), f"a word of {phrase!r} is not one token"
            got = learner.text_features(backbone)
            ids = backbone.trim(backbone.tokenize(written_prompts(phrase, classnames, position)))
            want = torch.nn.functional.normalize(backbone.encode_text(ids).float(), dim=-1)
            errors[position] = float((got - want).abs().max())
    print(f"[injection] {backbone.info.name} ({backbone.info.family}): {errors}")  # shown with pytest -s
    return errors


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- registry ------------------------------------------------------------------------------------
def test_registry_has_the_zoo_with_complete_entries():
    assert REQUIRED <= set(BACKBONES)
    rows = {row["name"]: row for row in list_backbones()}
    for name, row in rows.items():
        assert row["family"] in ("clip", "bert", "medclip")
        assert row["library"] in ("open_clip", "transformers", "own")
        assert row["source"] and row["download"] and "{}" in row["template"]
        if row["local"]:  # made here (the micro model), not a downloaded Med-VLM
            assert row["embed_dim"] == row["token_dim"] == 128 and row["download"].startswith("no download")
        else:
            assert row["context_length"] > 0 and row["embed_dim"] == 512 and row["token_dim"] in (512, 768)
        assert len(row["mean"]) == len(row["std"]) in (1, 3)
        assert row["precision"] == "fp32"  # the standard default; fp16 only through parity: reference
        json.dumps(row)
    assert {n for n, r in rows.items() if r["paper"]} == PAPER_MODELS
    # Q8: warm-up lr 1e-3 for MedCLIP, 1e-5 for the others.
    assert {n for n, r in rows.items() if r["warmup_lr"] == 1e-3} == {"medclip-vit"}
    assert all(r["warmup_lr"] == 1e-5 for n, r in rows.items() if n != "medclip-vit")
    # Family and token width follow the text tower.
    assert rows["biomedclip"]["family"] == rows["unimedclip-b16"]["family"] == "bert"
    assert rows["biomedclip"]["context_length"] == 256 and rows["biomedclip"]["token_dim"] == 768
    assert rows["medclip-vit"]["family"] == "medclip" and rows["medclip-vit"]["mean"] == [0.5862785803043838]
    # Parity presets (docs/method.md §10): Q1, Q2, Q3.
    assert rows["biomedclip"]["reference"] == {"double_embedding": True}
    assert rows["medclip-vit"]["reference"] == {"medclip_max_length": 25, "medclip_norm": "clip"}
    assert rows["plip"]["reference"] == rows["quiltnet-b32"]["reference"] == {"precision": "fp16"}


def test_switch_resolution_explicit_beats_preset_beats_default():
    plip, medclip = get_entry("plip"), get_entry("medclip-vit")
    assert resolve_switches({}, "clip", plip) == {"parity": "standard", "precision": "fp32"}
    assert resolve_switches({"parity": "reference"}, "clip", plip)["precision"] == "fp16"
    assert resolve_switches({"parity": "reference", "precision": "fp32"}, "clip", plip)["precision"] == "fp32"
    ref = resolve_switches({"parity": "reference"}, "medclip", medclip)
    assert ref == {"parity": "reference", "precision": "fp32", "medclip_max_length": 25,
                   "medclip_norm": "clip", "medclip_pooling": "all"}
    std = resolve_switches({}, "medclip", medclip)
    assert std["medclip_max_length"] == 77 and std["medclip_norm"] == "medclip"
    assert resolve_switches({"parity": "reference"}, "bert", get_entry("biomedclip"))["double_embedding"] is True
    with pytest.raises(ValueError, match="applies only to medclip"):
        resolve_switches({"medclip_max_length": 25}, "clip", plip)
    with pytest.raises(ValueError, match="applies only to bert"):
        resolve_switches({"double_embedding": True}, "clip", plip)
    assert set(SWITCHES) < set(BACKBONE_KEYS)


@pytest.mark.parametrize("cfg, message", [
    ({"name": "plip", "colour": "red"}, "unknown backbone key"),
    ({"name": "plip", "parity": "official"}, "parity"),
    ({"name": "plip", "precision": "bf16"}, "precision"),
    ({"name": "plip", "format": "onnx"}, "format"),
    ({"name": "medclip-vit", "medclip_max_length": "25"}, "medclip_max_length"),
    ({"name": "no-such-model"}, "unknown backbone 'no-such-model'"),
    ({}, "set `name`"),
])
def test_bad_configs_are_clear_value_errors(cfg, message):
    with pytest.raises(ValueError, match=message) as info:
        load_backbone(cfg)
    if "colour" in cfg:  # the error lists the valid keys
        assert "hub_id" in str(info.value) and "medclip_norm" in str(info.value)


@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))


@pytest.mark.parametrize("name, hint", [
    ("plip", "vinid/plip"),
    ("biomedclip", "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"),
    ("quiltnet-b32", "wisdomik/QuiltNet-B-32"),
])
def test_offline_without_weights_says_what_to_download(offline_empty_cache, name, hint):
    with pytest.raises(WeightsError) as info:
        load_backbone({"name": name})
    message = str(info.value)
    assert hint in message and "offline" in message and "backbone.path" in message


def test_models_without_hub_copy_point_to_their_files(offline_empty_cache):
    with pytest.raises(WeightsError, match="medclip-vit-pretrained.zip") as info:
        load_backbone({"name": "medclip-vit"})
    assert "backbone.path" in str(info.value)
    with pytest.raises(WeightsError, match="unimed_clip_vit_b16.pt"):
        load_backbone({"name": "unimedclip-b16"})


def test_missing_path_is_named(tmp_path):
    with pytest.raises(WeightsError, match=r"does not exist.*vinid/plip"):
        load_backbone({"name": "plip", "path": str(tmp_path / "nowhere")})


def test_unknown_file_format_is_explained(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(WeightsError, match="cannot tell the format"):
        load_backbone({"path": str(path)})
    (tmp_path / "folder").mkdir()
    with pytest.raises(WeightsError, match="backbone.format"):
        load_backbone({"path": str(tmp_path / "folder")})


# ---- CLI -----------------------------------------------------------------------------------------
def test_cli_models_json(capsys):
    from calibprompt.cli import main

    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert REQUIRED <= {r["name"] for r in rows}
    assert all({"name", "family", "source"} <= set(r) for r in rows)
    assert {r["name"]: r["source"] for r in rows}["biomedclip"].startswith("hf-hub:microsoft/BiomedCLIP")


def test_cli_models_table(capsys):
    from calibprompt.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["name", "family", "library"]
    assert all(name in out for name in REQUIRED)
