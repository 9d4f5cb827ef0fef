"""Named backbones (the Med-VLM zoo) and the one function that builds any of them from a config section.

Every entry says where its weights come from, which library runs it, its text family and its defaults
(context length, normalisation, zero-shot template, warm-up lr, precision), plus the parity switches
that ``parity: reference`` turns on (docs/method.md §10). :func:`load_backbone` resolves a ``backbone:``
config section to a loaded :class:`~calibprompt.backbones.base.Backbone` and records every resolved
switch in ``backbone.info.extra``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from calibprompt.backbones.base import Backbone, WeightsError
from calibprompt.backbones.preprocess import CLIP_MEAN, CLIP_STD

FAMILIES = ("clip", "bert", "medclip")
FORMATS = ("open_clip", "transformers", "openai", "medclip", "unimed")
PARITIES = ("standard", "reference")
PRECISIONS = ("fp32", "fp16")
MEDCLIP_MEAN = (0.5862785803043838,)
MEDCLIP_STD = (0.27950088968644304,)
# Files fetched from a hub repo: configs, tokenizers and PyTorch weights (not TF/Flax/ONNX copies).
HUB_FILES = ["*.json", "*.txt", "*.safetensors", "*.bin", "*.pt", "*.pth"]

# Keys accepted in the `backbone:` section of a run config.
BACKBONE_KEYS = {
    "name": "registry name (see `calibprompt models`) or a free label when `path` is given",
    "path": "local weights: a hub-format folder (open_clip or transformers), an OpenAI-format .pt/.pth, "
            "a UniMed-CLIP .pt, or MedCLIP's pytorch_model.bin (or the folder holding it)",
    "hub_id": "Hugging Face repo to use when `path` is not set (default: the registry entry's); "
              "fetched only when online, never with remote code",
    "format": "weight format: auto (default, detected) | " + " | ".join(FORMATS),
    "text_dir": "local folder with a BERT text tower's config.json and tokenizer files (BiomedCLIP, UniMed-CLIP)",
    "tokenizer_dir": "local folder with the tokenizer files when the weights lack them "
                     "(CLIP BPE vocab.json + merges.txt; Bio_ClinicalBERT vocab.txt for MedCLIP)",
    "parity": "standard (default: correct behaviour) | reference (the official code's quirks, docs/method.md §10)",
    "precision": "fp32 | fp16 (default fp32; fp16 under parity: reference for PLIP and QuiltNet, Q3)",
    "double_embedding": "BERT towers: embed fixed prompt tokens with the full embedding module (Q1; "
                        "default false, true under parity: reference for BiomedCLIP)",
    "medclip_max_length": "MedCLIP: pad/truncate prompts to this many tokens (default 77; 25 under "
                          "parity: reference, Q2)",
    "medclip_norm": "MedCLIP: medclip (default, its own grey statistics) | clip (parity: reference, Q2)",
    "medclip_pooling": "MedCLIP: all (default, MedCLIP's pooling over every position, padding included) "
                       "| masked (average over real tokens only)",
    "allow_random": "build the architecture with random weights when no weight file exists (tests only)",
}


@dataclass(frozen=True)
class BackboneEntry:
    """One named Med-VLM: where it comes from and its defaults."""

    name: str
    title: str
    family: str  # clip | bert | medclip
    library: str  # open_clip | transformers | own (calibprompt's module on transformers)
    formats: tuple[str, ...]  # weight formats the loader accepts for it, default first
    download: str  # where a user gets the weights
    context_length: int
    embed_dim: int
    token_dim: int
    template: str  # default zero-shot template
    hub_id: str | None = None  # used when no path is given and the hub is reachable
    file: str | None = None  # the single-file checkpoint the official code / authors distribute
    arch: str | None = None  # open_clip architecture an OpenAI-format file must match
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    warmup_lr: float = 1e-5  # Q8: 1e-3 for MedCLIP
    precision: str = "fp32"
    reference: dict = field(default_factory=dict)  # switches that parity: reference sets
    paper: bool = False  # one of the four models of the CalibPrompt paper
    notes: str = ""

    @property
    def source(self) -> str:
        return self.hub_id or self.file or self.download

    def as_dict(self) -> dict:
        row = dataclasses.asdict(self)
        row["source"] = self.source
        row["mean"], row["std"] = list(self.mean), list(self.std)
        row["formats"] = list(self.formats)
        return row


_HISTO = "An H&E image of {}."
_CXR = "A chest X-ray image of {} patient"
_BAPLE = "OpenAI-format .pt packaged by BAPLe (github.com/asif-hanif/baple, model download link in its README)"

BACKBONES: dict[str, BackboneEntry] = {e.name: e for e in (
    BackboneEntry(
        name="plip", file="plip_vit_b32.pt",
        title="PLIP", family="clip", library="transformers", hub_id="vinid/plip",
        formats=("transformers", "openai"), arch="ViT-B-32-quickgelu",
        download=f"hub vinid/plip (transformers CLIPModel); plip_vit_b32.pt: {_BAPLE}",
        context_length=77, embed_dim=512, token_dim=512, template=_HISTO,
        reference={"precision": "fp16"}, paper=True,
        notes="official code: OpenAI-format plip_vit_b32.pt in fp16; hub config has legacy eos_token_id 2",
    ),
    BackboneEntry(
        name="quiltnet-b32", file="quiltnet_b32.pt",
        title="QuiltNet-B-32", family="clip", library="open_clip",
        hub_id="hf-hub:wisdomik/QuiltNet-B-32", formats=("open_clip", "openai"), arch="ViT-B-32-quickgelu",
        download=f"hub wisdomik/QuiltNet-B-32 (open_clip); quiltnet_b32.pt: {_BAPLE}",
        context_length=77, embed_dim=512, token_dim=512, template=_HISTO,
        reference={"precision": "fp16"}, paper=True,
        notes="official code: OpenAI-format quiltnet_b32.pt (QuickGELU) in fp16; the hub config's "
              "activation is unverified (Q18): compare logits against the .pt",
    ),
    BackboneEntry(
        name="quiltnet-b16", title="QuiltNet-B-16", family="clip", library="open_clip",
        hub_id="hf-hub:wisdomik/QuiltNet-B-16", formats=("open_clip",),
        download="hub wisdomik/QuiltNet-B-16 (open_clip)",
        context_length=77, embed_dim=512, token_dim=512, template=_HISTO,
        reference={"precision": "fp16"},
        notes="not in the paper; parity: reference treats it like QuiltNet-B-32 (fp16)",
    ),
    BackboneEntry(
        name="biomedclip", title="BiomedCLIP", family="bert", library="open_clip",
        hub_id="hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", formats=("open_clip",),
        download="hub microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 (open_clip); text tower "
                 "config/tokenizer: microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
        context_length=256, embed_dim=512, token_dim=768, template=_CXR,
        reference={"double_embedding": True}, paper=True,
        notes="needs the hf-hub: prefix (open_clip #505); timm ViT-B/16 + PubMedBERT, CLS pooling, MLP head",
    ),
    BackboneEntry(
        name="medclip-vit", file="medclip-vit-pretrained.zip:pytorch_model.bin",
        title="MedCLIP (ViT)", family="medclip", library="own", formats=("medclip",),
        download="pytorch_model.bin in https://storage.googleapis.com/pytrial/medclip-vit-pretrained.zip; "
                 "tokenizer: hub emilyalsentzer/Bio_ClinicalBERT",
        context_length=77, embed_dim=512, token_dim=768, template=_CXR,
        mean=MEDCLIP_MEAN, std=MEDCLIP_STD, warmup_lr=1e-3,
        reference={"medclip_max_length": 25, "medclip_norm": "clip"}, paper=True,
        notes="Swin-T + Bio_ClinicalBERT (layers 1, 2, 12 mean-pooled over all positions); grey input; "
              "published weights are reported hard to reproduce (MedCLIP #27, #42, #43)",
    ),
    BackboneEntry(
        name="pubmedclip", file="PubMedCLIP_ViT32.pth",
        title="PubMedCLIP (ViT-B/32)", family="clip", library="transformers",
        hub_id="flaviagiammarino/pubmed-clip-vit-base-patch32", formats=("transformers", "openai"),
        arch="ViT-B-32-quickgelu",
        download="hub flaviagiammarino/pubmed-clip-vit-base-patch32 (transformers); original "
                 "PubMedCLIP_ViT32.pth (OpenAI format) in hub sarahESL/PubMedCLIP",
        context_length=77, embed_dim=512, token_dim=512, template="An image of {}.",
        notes="extension, not in the paper",
    ),
    BackboneEntry(
        name="clip-vit-b32", file="ViT-B-32.pt",
        title="CLIP ViT-B/32 (OpenAI)", family="clip", library="transformers",
        hub_id="openai/clip-vit-base-patch32", formats=("transformers", "openai"), arch="ViT-B-32-quickgelu",
        download="hub openai/clip-vit-base-patch32 (transformers); OpenAI's ViT-B-32.pt",
        context_length=77, embed_dim=512, token_dim=512, template="a photo of a {}.",
        notes="general-domain baseline",
    ),
    BackboneEntry(
        name="clip-vit-b16", file="ViT-B-16.pt",
        title="CLIP ViT-B/16 (OpenAI)", family="clip", library="open_clip",
        hub_id="hf-hub:timm/vit_base_patch16_clip_224.openai", formats=("open_clip", "openai"),
        arch="ViT-B-16-quickgelu",
        download="hub timm/vit_base_patch16_clip_224.openai (open_clip); OpenAI's ViT-B-16.pt",
        context_length=77, embed_dim=512, token_dim=512, template="a photo of a {}.",
        notes="general-domain baseline",
    ),
    BackboneEntry(
        name="unimedclip-b16", file="unimed_clip_vit_b16.pt",
        title="UniMed-CLIP ViT-B/16", family="bert", library="open_clip",
        formats=("unimed",),
        download="unimed_clip_vit_b16.pt from the authors' release (github.com/mbzuai-oryx/UniMed-CLIP); "
                 "text tower: microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
        context_length=256, embed_dim=512, token_dim=768, template="An image of {}.",
        notes="extension; the authors' open_clip fork is not needed: its checkpoint maps onto open_clip's "
              "CustomTextCLIP (ViT-B/16 QuickGELU + BiomedBERT, CLS pooling, MLP head); not yet checked "
              "against the released weights",
    ),
)}

# Switches and the families they apply to; their standard defaults.
SWITCHES = {
    "precision": (FAMILIES, "fp32"),
    "double_embedding": (("bert",), False),
    "medclip_max_length": (("medclip",), 77),
    "medclip_norm": (("medclip",), "medclip"),
    "medclip_pooling": (("medclip",), "all"),
}
_CHOICES = {"parity": PARITIES, "precision": PRECISIONS, "medclip_norm": ("medclip", "clip"),
            "medclip_pooling": ("all", "masked"), "format": ("auto",) + FORMATS}


def list_backbones() -> list[dict]:
    """Every registry entry as a JSON-ready dict (``name``, ``family``, ``source``, defaults, ...)."""
    return [entry.as_dict() for entry in BACKBONES.values()]


def get_entry(name: str) -> BackboneEntry:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)} "
                         "(or set backbone.path to load any supported checkpoint)") from None


# ---- config validation and switch resolution -----------------------------------------------------
def _validate(cfg: dict) -> None:
    unknown = sorted(set(cfg) - set(BACKBONE_KEYS))
    if unknown:
        raise ValueError(f"unknown backbone key(s) {unknown}; valid keys: {sorted(BACKBONE_KEYS)}")
    for key, choices in _CHOICES.items():
        if cfg.get(key) is not None and cfg[key] not in choices:
            raise ValueError(f"backbone.{key} = {cfg[key]!r}; expected one of {', '.join(choices)}")
    length = cfg.get("medclip_max_length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 3):
        raise ValueError(f"backbone.medclip_max_length = {length!r}; expected an integer >= 3")
    for key in ("double_embedding", "allow_random"):
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise ValueError(f"backbone.{key} = {cfg[key]!r}; expected true or false")


def resolve_switches(cfg: dict, family: str, entry: BackboneEntry | None) -> dict:
    """The parity switches for ``family``: explicit key > ``parity: reference`` preset > standard default.
    A switch set for a family it does not apply to is an error."""
    parity = cfg.get("parity") or "standard"
    preset = (entry.reference if entry is not None else {}) if parity == "reference" else {}
    resolved: dict = {"parity": parity}
    for key, (families, default) in SWITCHES.items():
        if family not in families:
            if cfg.get(key) is not None:
                raise ValueError(f"backbone.{key} applies only to {'/'.join(families)} backbones; "
                                 f"{cfg.get('name') or 'this model'} is {family}")
            continue
        value = cfg.get(key)
        resolved[key] = value if value is not None else preset.get(key, default)
    return resolved


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
    hub = f" `huggingface-cli download {entry.hub_id.removeprefix('hf-hub:')} --local-dir /models/{entry.name}`" \
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
    _validate(cfg)
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
    return backbone


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
