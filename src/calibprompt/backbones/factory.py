"""The one place that builds a backbone from a ``backbone:`` config section: format detection (open_clip
hub folder, transformers folder, OpenAI-format state dict, MedCLIP's published file, UniMed-CLIP) and one
loader per format. :func:`load_backbone` records every resolved switch in ``backbone.info.extra``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from calibprompt.backbones.base import Backbone, WeightsError
from calibprompt.backbones.preprocess import CLIP_MEAN, CLIP_STD
from calibprompt.backbones.registry import (
    BACKBONES,
    FORMATS,
    HUB_FILES,
    BackboneEntry,
    check_backbone_config,
    get_entry,
    resolve_switches,
)


# ---- format detection ----------------------------------------------------------------------------
def _detect_folder(folder: Path) -> str:
    if (folder / "open_clip_config.json").is_file():
        return "open_clip"
    if (folder / "config.json").is_file():
        return "transformers"
    if (folder / "pytorch_model.bin").is_file():
        return "medclip"
    raise WeightsError(
        f"cannot tell the format of {folder}: expected open_clip_config.json (open_clip), config.json "
        "(transformers) or MedCLIP's pytorch_model.bin. Set backbone.format or point backbone.path at the file."
    )


def _detect_state(state: dict, path: Path) -> str:
    from calibprompt.backbones.openai_format import is_openai_state, is_unimed_state

    if is_openai_state(state):
        return "openai"
    if is_unimed_state(state):
        return "unimed"
    keys = list(state)
    if any(k.startswith("vision_model.model.") for k in keys) and any(k.startswith("text_model.model.") for k in keys):
        return "medclip"
    if any(k.startswith("text_model.embeddings.") for k in state):
        raise WeightsError(f"{path} is a transformers CLIPModel state dict: point backbone.path at the folder "
                           "that holds it together with its config.json")
    raise WeightsError(f"cannot tell the format of {path} from its keys (first: {sorted(state)[:5]}); "
                       f"set backbone.format to one of {', '.join(FORMATS)}")


def _how_to_download(entry: BackboneEntry | None) -> str:
    if entry is None:
        return "Set backbone.path to a local checkpoint."
    hub = f" `hf download {entry.hub_id.removeprefix('hf-hub:')} --local-dir /models/{entry.name}`" \
        if entry.hub_id else ""
    return (f"Download {entry.title} ({entry.download}){' e.g.' + hub if hub else ''} and set backbone.path "
            f"to it (see docs/backbones.md).")


# ---- loading -------------------------------------------------------------------------------------
def load_backbone(cfg: dict) -> Backbone:
    """Build a backbone from the ``backbone:`` config section (see :data:`BACKBONE_KEYS`).

    Sources, in order: ``path`` (format detected, or ``format``); else the hub id (``hub_id`` or the
    entry's) from the local Hugging Face cache, downloading it only when online; else an error saying
    what to download and to set ``backbone.path``. Weights load strictly: missing or unexpected keys are
    an error that lists them. ``backbone.info.extra`` records the resolved switches and the source."""
    cfg = {k: v for k, v in dict(cfg).items() if v is not None}
    check_backbone_config(cfg)
    name = cfg.get("name")
    entry = BACKBONES.get(name) if name else None
    if name and entry is None and not cfg.get("path"):
        get_entry(name)  # raises: unknown name and nothing to load
    if entry is None and not cfg.get("path") and not cfg.get("hub_id"):
        raise ValueError("backbone: set `name` to a registry name (see `calibprompt models`) or `path` to a "
                         "local checkpoint")

    state = None
    hub_id = None
    if cfg.get("path"):
        path = Path(cfg["path"]).expanduser()
        if not path.exists():
            raise WeightsError(f"backbone.path {path} does not exist. {_how_to_download(entry)}")
    elif cfg.get("allow_random") and entry is not None and entry.formats[0] == "medclip":
        path = None  # MedCLIP's architecture ships with calibprompt: random weights need no file
    elif entry is not None and entry.local:
        from calibprompt.settings import cache_dir

        path = cache_dir() / entry.local
        if not path.is_dir():
            raise WeightsError(f"backbone {name!r} is not in {path}: {entry.download}, or set backbone.path")
    else:
        hub_id = cfg.get("hub_id") or (entry.hub_id if entry else None)
        if not hub_id:
            raise WeightsError(f"backbone {name!r} has no hub copy: {_how_to_download(entry)}")
        from calibprompt.backbones.loading import hub_snapshot

        path = hub_snapshot(hub_id.removeprefix("hf-hub:"), _how_to_download(entry), allow_patterns=HUB_FILES)

    fmt = cfg.get("format", "auto")
    if fmt == "auto":
        if path is None:
            fmt = "medclip"
        elif path.is_dir():
            fmt = _detect_folder(path)
        else:
            from calibprompt.backbones.weights import read_state_dict

            state = read_state_dict(path)
            fmt = _detect_state(state, path)
    if entry is not None and fmt not in entry.formats:
        raise WeightsError(f"{path} is in {fmt} format; {entry.name} loads from {', '.join(entry.formats)}. "
                           "Check backbone.name, backbone.path and backbone.format.")

    label = name or (hub_id.split("/")[-1] if hub_id else path.stem if path is not None else "backbone")
    backbone = _load_format(fmt, path, state, cfg, entry, label)
    switches = resolve_switches(cfg, backbone.info.family, entry)  # already applied; recorded here
    extra = {**backbone.info.extra, **switches, "format": fmt, "registry": entry.name if entry else None,
             "hub_id": hub_id, "weights": backbone.info.source, "random_weights": _is_random(backbone)}
    backbone.info = dataclasses.replace(backbone.info, extra=extra)
    check_finite(backbone, label)
    return backbone


def check_finite(backbone: Backbone, source: str) -> None:
    """NaN or infinite weights are an error naming the tensor, before any work (not "bad samples" later)."""
    import torch

    # parameters must be finite; buffers only free of NaN (causal attention masks hold -inf by design)
    tensors = [(n, t, torch.isfinite) for n, t in backbone.named_parameters()]
    tensors += [(n, t, lambda x: ~torch.isnan(x)) for n, t in backbone.named_buffers()]
    for name, tensor, ok in tensors:
        if tensor.is_floating_point() and not bool(ok(tensor).all()):
            bad = int((~ok(tensor)).sum())
            raise WeightsError(f"{source}: weight tensor {name!r} holds {bad} NaN or infinite value(s) of "
                               f"{tensor.numel()}; the checkpoint is damaged: download it again")


@dataclass(frozen=True)
class Request:
    """What a format loader gets: the resolved source, the config section, the switches."""

    path: Path | None  # None only for random MedCLIP weights
    state: dict | None  # the state dict when format detection already read the file
    cfg: dict
    entry: BackboneEntry | None
    label: str
    switches: dict

    def single_file_state(self, fmt: str) -> dict:
        from calibprompt.backbones.weights import read_state_dict

        if self.path is None or self.path.is_dir():
            raise WeightsError(f"{fmt} format is a single checkpoint file; got {self.path}")
        return self.state if self.state is not None else read_state_dict(self.path)


def _load_open_clip(req: Request) -> Backbone:
    from calibprompt.backbones.open_clip_model import OpenClipBackbone

    if req.path is None or not req.path.is_dir():
        raise WeightsError(f"open_clip format needs a folder with open_clip_config.json; got {req.path}")
    return OpenClipBackbone.from_dir(req.path, name=req.label, text_dir=req.cfg.get("text_dir"),
                                     allow_random=bool(req.cfg.get("allow_random", False)),
                                     double_embedding=req.switches.get("double_embedding", False),
                                     precision=req.switches["precision"])


def _load_transformers(req: Request) -> Backbone:
    from calibprompt.backbones.hf_clip import HFClipBackbone

    mean, std = (req.entry.mean, req.entry.std) if req.entry else (CLIP_MEAN, CLIP_STD)
    return HFClipBackbone.from_dir(req.path, name=req.label, tokenizer_dir=req.cfg.get("tokenizer_dir"),
                                   allow_random=bool(req.cfg.get("allow_random", False)),
                                   precision=req.switches["precision"], mean=mean, std=std)


def _load_medclip(req: Request) -> Backbone:
    from calibprompt.backbones.medclip import TOKENIZER_HUB_ID, MedClipBackbone

    tokenizer_dir = req.cfg.get("tokenizer_dir")
    if tokenizer_dir is None:
        from calibprompt.backbones.loading import hub_snapshot

        tokenizer_dir = hub_snapshot(
            TOKENIZER_HUB_ID, "MedCLIP's text tower needs the Bio_ClinicalBERT tokenizer: download "
            f"vocab.txt and tokenizer_config.json of {TOKENIZER_HUB_ID} and set backbone.tokenizer_dir.",
            allow_patterns=["vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"],
        )
    sw = req.switches
    return MedClipBackbone.from_file(req.path, tokenizer_dir, name=req.label,
                                     allow_random=bool(req.cfg.get("allow_random", False)),
                                     precision=sw["precision"], max_length=sw["medclip_max_length"],
                                     norm=sw["medclip_norm"], pooling=sw["medclip_pooling"])


def _load_openai(req: Request) -> Backbone:
    from calibprompt.backbones.openai_format import load_openai

    expected = None
    if req.entry is not None and req.entry.arch:
        import open_clip

        expected = open_clip.get_model_config(req.entry.arch)
    return load_openai(req.single_file_state("openai"), str(req.path), req.label,
                       precision=req.switches["precision"], expected=expected)


def _load_unimed(req: Request) -> Backbone:
    from calibprompt.backbones.openai_format import load_unimed

    return load_unimed(req.single_file_state("unimed"), str(req.path), req.label, text_dir=req.cfg.get("text_dir"),
                       precision=req.switches["precision"], double_embedding=req.switches["double_embedding"])


# format -> (text family, or None when the files say; loader). A new format is one line here.
LOADERS = {
    "open_clip": (None, _load_open_clip),
    "transformers": ("clip", _load_transformers),
    "openai": ("clip", _load_openai),
    "medclip": ("medclip", _load_medclip),
    "unimed": ("bert", _load_unimed),
}
assert set(LOADERS) == set(FORMATS)


def _load_format(fmt: str, path: Path | None, state: dict | None, cfg: dict, entry: BackboneEntry | None,
                 label: str) -> Backbone:
    family, loader = LOADERS[fmt]
    if family is None:  # open_clip folders hold either text family
        family = _open_clip_family(path) if path is not None and path.is_dir() else "clip"
    switches = resolve_switches(cfg, family, entry)
    return loader(Request(path, state, cfg, entry, label, switches))


def _open_clip_family(folder: Path) -> str:
    import json

    config = json.loads((folder / "open_clip_config.json").read_text())
    return "bert" if config.get("model_cfg", {}).get("text_cfg", {}).get("hf_model_name") else "clip"


def _is_random(backbone: Backbone) -> bool:
    # Adapters report a folder (no weight file in it) or "random" as the source of random weights.
    source = backbone.info.source
    return source == "random" or Path(source).is_dir()
