"""Named backbones (the Med-VLM zoo): every entry says where its weights come from, which library runs
it, its text family and its defaults (context length, normalisation, zero-shot template, warm-up lr,
precision), plus the parity switches that ``parity: reference`` turns on (docs/parity.md). The
``backbone:`` config keys are validated here; :mod:`calibprompt.backbones.factory` builds the model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

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
    local: str | None = None  # default folder under the calibprompt cache (models made here, not downloaded)

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
        name="micro-medmnist", title="micro Med-VLM (pretrained here by `calibprompt pretrain-micro`)",
        family="clip", library="open_clip", formats=("open_clip",), local="models/micro-medmnist",
        download="no download: `calibprompt pretrain-micro` (or `calibprompt demo`) writes it into the cache",
        context_length=32, embed_dim=128, token_dim=128, template="An image of {}.",
        notes="a 7.8 M-parameter test bed pretrained on MedMNIST train splits (docs/demo.md), not a research model",
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
    from calibprompt.plugins import load_plugins

    load_plugins()
    return [entry.as_dict() for entry in BACKBONES.values()]


def register_backbone(entry: BackboneEntry) -> BackboneEntry:
    """Add a named backbone (a :class:`BackboneEntry`: name, family, hub id, defaults) to the registry, so
    ``backbone: {name: ...}`` and ``calibprompt models`` know it; returns the entry."""
    if not isinstance(entry, BackboneEntry):
        raise ValueError(f"register_backbone takes a BackboneEntry, got {type(entry).__name__}")
    if not entry.name or entry.name in BACKBONES:
        raise ValueError(f"backbone name {entry.name!r} is empty or taken; taken: {', '.join(BACKBONES)}")
    BACKBONES[entry.name] = entry
    return entry


def get_entry(name: str) -> BackboneEntry:
    if name not in BACKBONES:
        from calibprompt.plugins import load_plugins

        load_plugins()  # a plug-in package may register it
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)} "
                         "(or set backbone.path to load any supported checkpoint)") from None


# ---- config validation and switch resolution -----------------------------------------------------
STRING_KEYS = ("name", "path", "hub_id", "text_dir", "tokenizer_dir")


def check_backbone_config(cfg: dict) -> None:
    """Unknown keys, invalid switch values and an unknown model name (with nothing else to load) are
    errors naming the key and the valid choices; called by config resolution before any work."""
    if not isinstance(cfg, dict):
        raise ValueError(f"backbone must be a mapping such as {{name: biomedclip, path: /models/x}}, got {cfg!r}")
    cfg = {k: v for k, v in cfg.items() if v is not None}
    unknown = sorted(set(cfg) - set(BACKBONE_KEYS))
    if unknown:
        raise ValueError(f"unknown backbone key(s) {unknown}; valid keys: {sorted(BACKBONE_KEYS)}")
    for key in STRING_KEYS:
        if key in cfg and not isinstance(cfg[key], str):
            raise ValueError(f"backbone.{key} = {cfg[key]!r}; expected a string (a name, folder, file or hub id)")
    for key, choices in _CHOICES.items():
        if cfg.get(key) is not None and cfg[key] not in choices:
            raise ValueError(f"backbone.{key} = {cfg[key]!r}; expected one of {', '.join(choices)}")
    length = cfg.get("medclip_max_length")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 3):
        raise ValueError(f"backbone.medclip_max_length = {length!r}; expected an integer >= 3")
    for key in ("double_embedding", "allow_random"):
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise ValueError(f"backbone.{key} = {cfg[key]!r}; expected true or false")
    if cfg.get("name") and cfg["name"] not in BACKBONES and not cfg.get("path") and not cfg.get("hub_id"):
        get_entry(cfg["name"])  # raises: unknown name and nothing else to load


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
