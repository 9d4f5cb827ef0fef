"""MedCLIP (ViT variant) on plain transformers, without the ``medclip`` package.

Architecture (MedCLIP's ``MedCLIPModel(vision_cls=MedCLIPVisionModelViT)``):
* image: Swin-T (``microsoft/swin-tiny-patch4-window7-224``) ``pooler_output`` -> Linear 768->512, no bias;
  one-channel input is repeated to three channels, as MedCLIP does;
* text: Bio_ClinicalBERT; hidden states of layers 1, 2 and 12 are each averaged over **all** positions
  (padding included: MedCLIP's own pooling), the three averages are averaged, then Linear 768->512, no bias;
* ``logit_scale``: clamped to [0, ln 100] before use, as MedCLIP's ``compute_logits`` does.

The module layout reproduces the key names of the published ``pytorch_model.bin``
(``vision_model.model.*``, ``vision_model.projection_head.weight``, ``text_model.model.*``,
``text_model.projection_head.weight``, ``logit_scale``). transformers 5 renamed Swin's attention and MLP
modules; :data:`SWIN_RENAMES` maps the published names onto whatever the installed version uses.

Because pooling reads padded positions, the padded length changes the text features: trimming is not
exact, so :meth:`MedClipBackbone.real_lengths` returns the full padded length. ``pooling="masked"``
(not MedCLIP's design) averages over real tokens only, which makes trimming exact.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from calibprompt.backbones.base import Backbone, BackboneInfo, WeightsError
from calibprompt.backbones.loading import DTYPES, build_empty, cast_floating_, random_fill_
from calibprompt.backbones.preprocess import CLIP_MEAN, CLIP_STD, Preprocess
from calibprompt.backbones.weights import load_strict, read_state_dict

CONFIG_DIR = Path(__file__).parent / "configs"
SWIN_CONFIG = CONFIG_DIR / "medclip-swin-tiny.json"
BERT_CONFIG = CONFIG_DIR / "bio-clinicalbert.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_URL = "https://storage.googleapis.com/pytrial/medclip-vit-pretrained.zip"
TOKENIZER_HUB_ID = "emilyalsentzer/Bio_ClinicalBERT"
# MedCLIP's own grey-scale statistics (medclip/constants.py).
MEDCLIP_MEAN = (0.5862785803043838,)
MEDCLIP_STD = (0.27950088968644304,)
MAX_LOGIT_SCALE = 4.6052  # ln(100): MedCLIP clamps logit_scale to [0, this]
POOLED_LAYERS = (1, 2, -1)  # hidden_states indices: outputs of layers 1, 2 and 12
SWIN_PREFIX = "vision_model.model.encoder."
# Published (transformers 4) Swin key fragments -> transformers 5 names. Order matters:
# "attention.output.dense" must be renamed before the plain "output.dense" of the MLP.
SWIN_RENAMES = (
    ("attention.self.query.", "attention.q_proj."),
    ("attention.self.key.", "attention.k_proj."),
    ("attention.self.value.", "attention.v_proj."),
    ("attention.self.relative_position_bias_table",
     "attention.relative_position_bias.relative_position_bias_table"),
    ("attention.output.dense.", "attention.o_proj."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
)
# Buffers the published file carries (older transformers saved them); recomputed, never learned.
IGNORED_KEYS = ("position_ids", "relative_position_index")


class _Tower(nn.Module):
    def __init__(self, model: nn.Module, width: int, proj_dim: int):
        super().__init__()
        self.model = model
        self.projection_head = nn.Linear(width, proj_dim, bias=False)


class MedCLIPModel(nn.Module):
    """The parameter layout of MedCLIP-ViT (key names as in the published checkpoint)."""

    def __init__(self, swin_config=None, bert_config=None, proj_dim: int = 512):
        super().__init__()
        from transformers import BertConfig, BertModel, SwinConfig, SwinModel

        swin_config = swin_config or SwinConfig.from_dict(json.loads(SWIN_CONFIG.read_text()))
        bert_config = bert_config or BertConfig.from_dict(json.loads(BERT_CONFIG.read_text()))
        self.vision_model = _Tower(SwinModel(swin_config, add_pooling_layer=True),
                                   int(swin_config.hidden_size), proj_dim)
        self.text_model = _Tower(BertModel(bert_config, add_pooling_layer=True), int(bert_config.hidden_size), proj_dim)
        self.logit_scale = nn.Parameter(torch.log(torch.tensor(1 / 0.07)))


def _rename(key: str, pairs) -> str:
    for old, new in pairs:
        key = key.replace(old, new)
    return key


def from_published(state: dict[str, torch.Tensor], own_keys: set[str]) -> dict[str, torch.Tensor]:
    """Published key names -> this transformers version's names (identity where they agree)."""
    out = {}
    for key, value in state.items():
        if key not in own_keys and key.startswith(SWIN_PREFIX):
            renamed = _rename(key, SWIN_RENAMES)
            key = renamed if renamed in own_keys else key
        out[key] = value
    return out


def to_published(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This transformers version's names -> the published key names."""
    back = tuple((new, old) for old, new in SWIN_RENAMES)
    return {(_rename(k, back) if k.startswith(SWIN_PREFIX) else k): v for k, v in state.items()}


def published_model(state: dict[str, torch.Tensor], source: str) -> MedCLIPModel:
    """A :class:`MedCLIPModel` holding ``state`` (published key names), loaded strictly."""
    model = build_empty(MedCLIPModel)
    load_strict(model, from_published(state, set(model.state_dict())), source, ignore=IGNORED_KEYS)
    return model


def bert_tokenizer(folder: str | Path):
    from transformers import BertTokenizer

    folder = Path(folder)
    if not (folder / "vocab.txt").is_file():
        raise WeightsError(
            f"no vocab.txt in {folder}: MedCLIP needs the Bio_ClinicalBERT tokenizer files "
            f"(`hf download {TOKENIZER_HUB_ID} vocab.txt tokenizer_config.json --local-dir "
            "<folder>`); set backbone.tokenizer_dir to that folder."
        )
    # BertTokenizer lower-cases by default, as Bio_ClinicalBERT's tokenizer_config asks.
    return BertTokenizer.from_pretrained(str(folder))


class MedClipBackbone(Backbone):
    """MedCLIP-ViT behind the :class:`Backbone` interface (family ``medclip``)."""

    def __init__(self, model: MedCLIPModel, tokenizer, name: str = "medclip-vit", source: str = "",
                 max_length: int = 77, norm: str = "medclip", pooling: str = "all", precision: str = "fp32"):
        super().__init__()
        if norm not in ("medclip", "clip"):
            raise ValueError(f"medclip_norm {norm!r} is not one of medclip, clip")
        if pooling not in ("all", "masked"):
            raise ValueError(f"medclip_pooling {pooling!r} is not one of all, masked")
        if not 3 <= int(max_length) <= 512:
            raise ValueError(f"medclip_max_length must be in 3..512, got {max_length}")
        self.model = model
        self._tokenizer = tokenizer
        self.max_length = int(max_length)
        self.pooling = pooling
        self._dtype = DTYPES[precision]
        self.pad_id = int(tokenizer.pad_token_id)
        if norm == "medclip":  # MedCLIP's own: grey, one channel (repeated to three in encode_image)
            self.preprocess = Preprocess(mean=MEDCLIP_MEAN, std=MEDCLIP_STD, grey=True)
        else:  # what the official CalibPrompt code feeds it (Q2)
            self.preprocess = Preprocess(mean=CLIP_MEAN, std=CLIP_STD)
        bert = model.text_model.model
        self.info = BackboneInfo(
            name=name, family="medclip", embed_dim=int(model.text_model.projection_head.out_features),
            token_dim=int(bert.config.hidden_size), context_length=self.max_length, source=source,
            extra={"library": "own"},
        )
        self.requires_grad_(False)
        self.eval()

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path | None, tokenizer_dir: str | Path, name: str = "medclip-vit",
                  allow_random: bool = False, precision: str = "fp32", **options) -> "MedClipBackbone":
        """Load the published ``pytorch_model.bin`` (or a folder holding it) strictly.
        ``path=None`` with ``allow_random`` builds random weights (tests, benchmarks)."""
        if precision not in DTYPES:
            raise ValueError(f"precision {precision!r} is not one of {', '.join(DTYPES)}")
        tokenizer = bert_tokenizer(tokenizer_dir)
        vocab = json.loads(BERT_CONFIG.read_text())["vocab_size"]
        if len(tokenizer) != vocab:
            raise WeightsError(f"tokenizer in {tokenizer_dir} has {len(tokenizer)} entries; MedCLIP's text "
                               f"tower has {vocab} (Bio_ClinicalBERT). Check backbone.tokenizer_dir.")
        if path is None:
            if not allow_random:
                raise WeightsError(f"MedCLIP needs its {WEIGHTS_NAME}: download {WEIGHTS_URL}, unzip it and "
                                   "set backbone.path to the folder.")
            model = random_fill_(build_empty(MedCLIPModel))
            model.logit_scale.data.fill_(math.log(1 / 0.07))
            source = "random"
        else:
            path = Path(path)
            if path.is_dir():
                path = path / WEIGHTS_NAME
            model = published_model(read_state_dict(path), str(path))
            source = str(path)
        if precision != "fp32":
            cast_floating_(model, DTYPES[precision])
        return cls(model.eval().requires_grad_(False), tokenizer, name=name, source=source,
                   precision=precision, **options)

    def save_published(self, path: str | Path) -> Path:
        """Write the state dict under the published key names, with the buffers the published file
        carries (BERT position ids, Swin relative position indices), as ``pytorch_model.bin``."""
        state = to_published({k: v.contiguous().clone() for k, v in self.model.state_dict().items()})
        bert = self.model.text_model.model
        state["text_model.model.embeddings.position_ids"] = torch.arange(
            bert.config.max_position_embeddings).unsqueeze(0)
        for key, buf in self.model.vision_model.named_buffers():
            if key.endswith("relative_position_index"):
                prefix = key.split(".attention.")[0]
                side = int(math.isqrt(buf.numel()))
                state[f"vision_model.{prefix}.attention.self.relative_position_index"] = buf.reshape(side, side).clone()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(state, tmp)
        tmp.replace(path)
        return path

    # ---- images ---------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:  # grey input, as MedCLIP's vision model accepts it
            images = images.repeat(1, 3, 1, 1)
        vision = self.model.vision_model
        return vision.projection_head(vision.model(pixel_values=images.to(self._dtype)).pooler_output)

    def image_state(self) -> dict[str, torch.Tensor]:
        return self.model.vision_model.state_dict()

    # ---- text -----------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        out = self._tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                              return_tensors="pt")
        return out["input_ids"].long()

    def token_counts(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids != self.pad_id).sum(dim=1)

    def real_lengths(self, ids: torch.Tensor) -> torch.Tensor:
        if self.pooling == "masked":  # padded positions are neither attended to nor pooled
            return self.token_counts(ids)
        # MedCLIP pools over every position, padding included: nothing can be trimmed.
        return torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long, device=ids.device)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        # Word embeddings only: BERT adds position and type embeddings itself (MedCLIP's learner is correct).
        return self.model.text_model.model.embeddings.word_embeddings(ids)

    def encode_embeddings(self, embeddings: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self._encode(ids, inputs_embeds=embeddings.to(self._dtype))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self._encode(ids)

    def _encode(self, ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        text = self.model.text_model
        mask = (ids != self.pad_id).long()
        if inputs_embeds is None:
            out = text.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        else:
            out = text.model(inputs_embeds=inputs_embeds, attention_mask=mask, output_hidden_states=True)
        layers = torch.stack([out.hidden_states[i] for i in POOLED_LAYERS])  # (3, K, L, D)
        if self.pooling == "all":
            pooled = layers.mean(dim=2).mean(dim=0)
        else:
            weights = mask[None, :, :, None].to(layers.dtype)
            pooled = ((layers * weights).sum(dim=2) / weights.sum(dim=2)).mean(dim=0)
        return text.projection_head(pooled)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().clamp(0, MAX_LOGIT_SCALE).exp()
