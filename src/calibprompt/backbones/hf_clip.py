"""transformers ``CLIPModel`` checkpoints (PLIP ``vinid/plip``, PubMedCLIP, ``openai/clip-vit-base-*``).

A folder in the hub's own format holds ``config.json``, the weights (``model.safetensors`` or
``pytorch_model.bin``, possibly sharded) and the CLIP BPE tokenizer (``vocab.json`` + ``merges.txt``).

Text pooling follows the checkpoint's own rule: a legacy ``text_config.eos_token_id`` of 2 (PLIP) means
"the position of the largest token id", otherwise "the first position of ``eos_token_id``". The HF
tokenizer pads with ``<|endoftext|>`` (49407), so both rules must pick the *first* end-of-text token:
``torch.argmax`` returns the first maximum, and :meth:`HFClipBackbone.real_lengths` ends each row
there, so trimming keeps it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from calibprompt.backbones.base import Backbone, BackboneInfo, WeightsError
from calibprompt.backbones.loading import (
    DTYPES, build_empty, cast_floating_, random_fill_, read_weight_files, replace_output,
)
from calibprompt.backbones.prefix import causal_mask, suffix_rows
from calibprompt.backbones.preprocess import CLIP_MEAN, CLIP_STD, Preprocess
from calibprompt.backbones.weights import load_strict, write_state_dict

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
LEGACY_EOS = 2  # text_config.eos_token_id of checkpoints saved before transformers PR #24773


def clip_tokenizer(folder: str | Path, context_length: int = 77):
    """The HF CLIP BPE tokenizer from ``vocab.json`` + ``merges.txt`` (or ``tokenizer.json``).

    Files are passed explicitly, so stale absolute paths in a ``tokenizer_config.json`` are ignored."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    vocab, merges, fast = folder / "vocab.json", folder / "merges.txt", folder / "tokenizer.json"
    if vocab.is_file() and merges.is_file():
        # Positional: transformers 4 names them vocab_file/merges_file, 5 names them vocab/merges.
        tok = CLIPTokenizer(str(vocab), str(merges))
    elif fast.is_file():
        from transformers import CLIPTokenizerFast

        tok = CLIPTokenizerFast(tokenizer_file=str(fast))
    else:
        raise WeightsError(
            f"no CLIP tokenizer in {folder}: expected vocab.json and merges.txt (or tokenizer.json). Copy "
            "them from the model's hub folder, or set backbone.tokenizer_dir to a folder that has them."
        )
    probe = tok(["a"]).input_ids[0]
    if probe[0] != tok.bos_token_id or probe[-1] != tok.eos_token_id or len(probe) != 3:
        raise WeightsError(f"the CLIP tokenizer built from {folder} gives {probe} for 'a'; expected [SOT, a, EOT]")
    tok.model_max_length = context_length
    return tok


class HFClipBackbone(Backbone):
    """A transformers ``CLIPModel``: causal CLIP text transformer, ViT image tower."""

    def __init__(self, model: nn.Module, tokenizer, preprocess: Preprocess, name: str, source: str = "",
                 precision: str = "fp32"):
        super().__init__()
        self.model = model
        self.preprocess = preprocess
        self._tokenizer = tokenizer
        self._dtype = DTYPES[precision]
        text_cfg = model.config.text_config
        self.eos_id = int(text_cfg.eos_token_id) if text_cfg.eos_token_id is not None else LEGACY_EOS
        context = int(text_cfg.max_position_embeddings)
        self.info = BackboneInfo(
            name=name, family="clip", embed_dim=int(model.config.projection_dim),
            token_dim=int(text_cfg.hidden_size), context_length=context, source=source,
            extra={"library": "transformers", "pooling": "argmax" if self.eos_id == LEGACY_EOS else "first_eos"},
        )
        self.requires_grad_(False)
        self.eval()

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, folder: str | Path, name: str | None = None, tokenizer_dir: str | Path | None = None,
                 allow_random: bool = False, precision: str = "fp32",
                 mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD) -> "HFClipBackbone":
        """Load a transformers hub-format folder; ``tokenizer_dir`` when the folder lacks the tokenizer."""
        from transformers import CLIPConfig, CLIPModel

        if precision not in DTYPES:
            raise ValueError(f"precision {precision!r} is not one of {', '.join(DTYPES)}")
        folder = Path(folder)
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise WeightsError(f"{config_path} not found: a transformers model folder holds config.json and weights")
        raw = json.loads(config_path.read_text())
        if raw.get("model_type") != "clip":
            raise WeightsError(f"{config_path} has model_type {raw.get('model_type')!r}; expected 'clip' (CLIPModel)")
        config = CLIPConfig.from_dict(raw)
        # Tokenizer first: a missing one fails before hundreds of MB are read.
        tokenizer = clip_tokenizer(tokenizer_dir or folder, int(config.text_config.max_position_embeddings))
        has_weights = any((folder / n).is_file() for n in WEIGHT_FILES)
        if has_weights:
            state, path = read_weight_files(folder, WEIGHT_FILES)
            model = build_empty(lambda: CLIPModel(config))
            load_strict(model, state, str(path), ignore=("position_ids",))
            source = str(path)
        elif allow_random:
            model = random_fill_(build_empty(lambda: CLIPModel(config)))
            source = str(folder)
        else:
            raise WeightsError(
                f"no weights in {folder}: expected one of {', '.join(WEIGHT_FILES)} "
                "(download the hub folder, e.g. `hf download vinid/plip --local-dir <folder>`)."
            )
        model = model.float() if precision == "fp32" else cast_floating_(model, DTYPES[precision])
        pre = _preprocessor_config(folder)
        preprocess = Preprocess(
            image_size=int(config.vision_config.image_size),
            mean=tuple(pre.get("image_mean", mean)), std=tuple(pre.get("image_std", std)),
        )
        return cls(model.eval().requires_grad_(False), tokenizer, preprocess, name or folder.name,
                   source=source, precision=precision)

    def save_dir(self, folder: str | Path, weights_name: str = "model.safetensors",
                 config_path: str | Path | None = None, tokenizer_dir: str | Path | None = None) -> Path:
        """Write the hub format: ``config.json`` (a copy of ``config_path`` when given, byte for byte),
        the weights, and the tokenizer files copied from ``tokenizer_dir``."""
        import shutil

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if config_path is not None:
            (folder / "config.json").write_bytes(Path(config_path).read_bytes())
        else:
            self.model.config.to_json_file(str(folder / "config.json"))
        write_state_dict(self.model, folder / weights_name)
        for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if tokenizer_dir is not None and (Path(tokenizer_dir) / name).is_file():
                shutil.copyfile(Path(tokenizer_dir) / name, folder / name)
        return folder

    # ---- images ---------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model.vision_model(pixel_values=images.to(self._dtype))
        return self.model.visual_projection(out.pooler_output)

    def image_state(self) -> dict[str, torch.Tensor]:
        state = {f"vision_model.{k}": v for k, v in self.model.vision_model.state_dict().items()}
        state.update({f"visual_projection.{k}": v for k, v in self.model.visual_projection.state_dict().items()})
        return state

    # ---- text -----------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        out = self._tokenizer(list(texts), padding="max_length", truncation=True,
                              max_length=self.info.context_length, return_tensors="pt")
        return out["input_ids"].long()

    def pool_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Where the model pools: the first end-of-text token (argmax returns the first maximum)."""
        if self.eos_id == LEGACY_EOS:
            return ids.argmax(dim=-1)
        return (ids == self.eos_id).int().argmax(dim=-1)

    def real_lengths(self, ids: torch.Tensor) -> torch.Tensor:
        # Causal mask: nothing after the pooled end-of-text token can influence it.
        return self.pool_positions(ids) + 1

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.text_model.embeddings.token_embedding(ids)

    def encode_embeddings(self, embeddings: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # The model's own text forward with the token-embedding lookup replaced: positions, causal mask,
        # final LayerNorm and pooling (by ``ids``) run exactly as for ordinary text.
        with replace_output(self.model.text_model.embeddings.token_embedding, embeddings.to(self._dtype)):
            return self.encode_text(ids)

    def encode_shared_prefix(self, embeddings: torch.Tensor, ids: torch.Tensor, prefix: int,
                             groups: int = 1) -> torch.Tensor:
        """The causal text model with the prefix's hidden states, keys and values computed once (see
        ``Backbone.encode_shared_prefix``); pooling follows the model's own end-token rule."""
        tm = self.model.text_model
        layers = getattr(getattr(tm, "encoder", None), "layers", None)
        if layers is None or prefix < 1 or not all(_plain_layer(layer) for layer in layers):
            return self.encode_embeddings(embeddings, ids)
        rows = suffix_rows(self, ids, prefix, self.pool_positions, groups)
        if rows is None:
            return self.encode_embeddings(embeddings, ids)
        embeddings = embeddings.to(self._dtype)
        x = rows.embed(embeddings, tm.embeddings.position_embedding.weight.to(embeddings.dtype))
        mask = causal_mask(rows.end, embeddings.dtype, embeddings.device)
        for layer in layers:
            attn = layer.self_attn
            h = layer.layer_norm1(x)
            out = rows.attention(attn.q_proj(h), attn.k_proj(h), attn.v_proj(h), attn.num_heads, mask, scale=attn.scale)
            x = x + attn.out_proj(out)
            x = x + layer.mlp(layer.layer_norm2(x))
        return self.model.text_projection(tm.final_layer_norm(x[rows.last]))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model.text_model(input_ids=ids)
        return self.model.text_projection(out.pooler_output)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp().detach()


def _preprocessor_config(folder: Path) -> dict:
    path = folder / "preprocessor_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _plain_layer(layer) -> bool:
    """transformers' CLIPEncoderLayer layout (what the shared-prefix pass mirrors)."""
    attn = getattr(layer, "self_attn", None)
    return all(hasattr(layer, n) for n in ("layer_norm1", "layer_norm2", "mlp")) and attn is not None and \
        all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "scale"))
