"""open_clip models of both text families behind the :class:`Backbone` interface.

* CLIP causal text transformer (CLIP, PLIP/QuiltNet as OpenAI-format files, QuiltNet-B hub models):
  token + positional embeddings, causal mask, ``ln_final``, pooling at the end-of-text token, projection.
* Hugging Face BERT text tower (BiomedCLIP, QuiltNet-B-16-PMB, UniMed-CLIP): ``inputs_embeds`` with an
  attention mask, CLS pooling of the last hidden state, projection head.

Models load from an open_clip hub-format folder (``open_clip_config.json`` + weights) with
:meth:`OpenClipBackbone.from_dir`, or from a model config plus a state dict
(:meth:`OpenClipBackbone.from_state_dict`, used by the OpenAI-format and UniMed-CLIP readers).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from calibprompt.backbones.base import Backbone, BackboneInfo, WeightsError
from calibprompt.backbones.loading import DTYPES, build_empty, cast_floating_, hub_offline, read_weight_files
from calibprompt.backbones.prefix import suffix_rows
from calibprompt.backbones.preprocess import CLIP_MEAN, CLIP_STD, Preprocess
from calibprompt.backbones.weights import load_strict, write_state_dict

WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)
# Buffers that some checkpoints carry and others do not; they are recomputed, never learned.
IGNORED_KEYS = ("position_ids",)
# BERT towers whose architecture ships with calibprompt (backbones/configs/), so a weights folder that
# holds only the tokenizer files still builds offline.
PACKAGED_BERT = {
    "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract": "biomedbert-base-uncased.json",
    "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract": "biomedbert-base-uncased.json",
}
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CONFIG_DIR = Path(__file__).parent / "configs"


def find_weights(folder: Path) -> Path | None:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def build_open_clip(model_cfg: dict, text_dir: str | None = None, cast_dtype: torch.dtype | None = None,
                    empty: bool = False) -> nn.Module:
    """Instantiate an open_clip model from its ``model_cfg`` (random weights, or uninitialised ones
    with ``empty=True`` when a checkpoint is loaded next).

    ``text_dir`` replaces ``hf_model_name``/``hf_tokenizer_name`` (a local folder with the BERT
    ``config.json`` and tokenizer files), so BERT-family models build offline. ``cast_dtype`` fp16
    selects open_clip's OpenAI-style half precision (LayerNorm computed in fp32)."""
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = copy.deepcopy(model_cfg)
    text_cfg = cfg.get("text_cfg", {})
    is_hf = bool(text_cfg.get("hf_model_name"))
    if is_hf:
        if text_dir is not None:
            text_cfg["hf_model_name"] = str(text_dir)
            text_cfg["hf_tokenizer_name"] = str(text_dir)
        # The full checkpoint carries the text weights: never fetch a separate text checkpoint.
        text_cfg["hf_model_pretrained"] = False
    custom = cfg.pop("custom_text", False) or is_hf
    cls = CustomTextCLIP if custom else CLIP
    model = build_empty(lambda: cls(**cfg, cast_dtype=cast_dtype)) if empty else cls(**cfg, cast_dtype=cast_dtype)
    return model.eval().requires_grad_(False)


def resolve_text_dir(model_cfg: dict, folder: Path | None, text_dir: str | Path | None) -> str | None:
    """The local folder that provides a BERT text tower's ``config.json`` and tokenizer.

    In order: ``text_dir`` as given; ``hf_model_name`` when it is already a local folder; a folder
    assembled from the packaged BERT config and the tokenizer files inside the weights folder (a
    BiomedCLIP hub snapshot holds them); ``None`` (open_clip fetches the text config by hub name) when
    online. Offline with none of these is an error that names the key to set."""
    text_cfg = model_cfg.get("text_cfg", {})
    hf_name = text_cfg.get("hf_model_name")
    if not hf_name:
        return None
    if text_dir:
        text_dir = Path(text_dir).expanduser()
        missing = [n for n in ("config.json",) if not (text_dir / n).is_file()]
        if not any((text_dir / n).is_file() for n in ("vocab.txt", "tokenizer.json")):
            missing.append("vocab.txt or tokenizer.json")
        if missing:
            raise WeightsError(
                f"backbone.text_dir {text_dir} lacks {', '.join(missing)}: it must hold the BERT text "
                f"tower's config.json and tokenizer files (e.g. `hf download {hf_name} "
                f"config.json vocab.txt tokenizer_config.json --local-dir {text_dir}`)."
            )
        return str(text_dir)
    if Path(hf_name).expanduser().is_dir():
        return str(Path(hf_name).expanduser())
    if folder is not None and hf_name in PACKAGED_BERT and any((folder / n).is_file() for n in TOKENIZER_FILES[:2]):
        return str(_assemble_text_dir(hf_name, folder))
    if not hub_offline():
        return None
    raise WeightsError(
        f"the text tower {hf_name!r} needs its BERT config.json and tokenizer files, and the hub is "
        f"offline. Download them (`hf download {hf_name} config.json vocab.txt "
        f"tokenizer_config.json --local-dir /models/{hf_name.split('/')[-1]}`) and set backbone.text_dir "
        "to that folder."
    )


def _assemble_text_dir(hf_name: str, folder: Path) -> Path:
    """A text folder in the cache: the packaged BERT config plus the tokenizer files of ``folder``."""
    from calibprompt.settings import atomic_write_bytes, cache_dir, sha256_bytes

    config = (CONFIG_DIR / PACKAGED_BERT[hf_name]).read_bytes()
    files = {n: (folder / n).read_bytes() for n in TOKENIZER_FILES if (folder / n).is_file()}
    key = sha256_bytes(config + b"".join(n.encode() + b"\0" + files[n] for n in sorted(files)))[:16]
    target = cache_dir() / "text_towers" / key
    if not (target / "config.json").is_file():
        for name, data in files.items():
            atomic_write_bytes(target / name, data)
        atomic_write_bytes(target / "config.json", config)  # written last: marks the folder complete
    return target


class OpenClipBackbone(Backbone):
    """An open_clip ``CLIP`` (causal text) or ``CustomTextCLIP`` (HF BERT text) model."""

    def __init__(self, model: nn.Module, model_cfg: dict, preprocess: Preprocess, name: str,
                 source: str = "", text_dir: str | None = None, double_embedding: bool = False,
                 precision: str = "fp32"):
        super().__init__()
        self.model = model
        self.model_cfg = model_cfg
        self.preprocess = preprocess
        text_cfg = model_cfg.get("text_cfg", {})
        self.is_bert = bool(text_cfg.get("hf_model_name"))
        self._dtype = DTYPES[precision]
        # Parity switch (docs/parity.md, Q1): embed fixed prompt tokens with BERT's *full* embedding module,
        # so BERT adds position/type embeddings and LayerNorm a second time. Off by default.
        self.double_embedding = double_embedding
        if double_embedding and not self.is_bert:
            raise ValueError("double_embedding applies only to BERT text towers (BiomedCLIP parity)")
        context = int(text_cfg.get("context_length", 77))
        if self.is_bert:
            from open_clip.tokenizer import HFTokenizer

            self._tokenizer = HFTokenizer(text_dir or text_cfg["hf_tokenizer_name"], context_length=context)
            bert = model.text.transformer
            token_dim = bert.config.hidden_size
            self.pad_id = int(bert.config.pad_token_id or 0)
        else:
            from open_clip.tokenizer import SimpleTokenizer

            self._tokenizer = SimpleTokenizer(context_length=context)
            token_dim = model.token_embedding.weight.shape[1]
            self.pad_id = 0
            if getattr(model, "text_pool_type", "argmax") != "argmax":
                raise ValueError(f"text pool type {model.text_pool_type!r} is not supported; expected 'argmax'")
        self.info = BackboneInfo(
            name=name, family="bert" if self.is_bert else "clip", embed_dim=int(model_cfg["embed_dim"]),
            token_dim=int(token_dim), context_length=context, source=source,
            extra={"library": "open_clip", "quick_gelu": bool(model_cfg.get("quick_gelu", False))},
        )
        self.requires_grad_(False)
        self.eval()

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, folder: str | Path, name: str | None = None, text_dir: str | None = None,
                 allow_random: bool = False, double_embedding: bool = False,
                 precision: str = "fp32") -> "OpenClipBackbone":
        """Load a hub-format folder. Without a weight file this is an error unless ``allow_random``
        (used for architecture-exact tests and the benchmark)."""
        folder = Path(folder)
        config_path = folder / "open_clip_config.json"
        if not config_path.is_file():
            raise WeightsError(
                f"{config_path} not found: an open_clip model folder holds open_clip_config.json and "
                f"one of {', '.join(WEIGHT_FILES)} (download it with `hf download <hub id> "
                f"--local-dir {folder}`)."
            )
        config = json.loads(config_path.read_text())
        if "model_cfg" not in config:
            raise WeightsError(f"{config_path} has no 'model_cfg' key; is it an open_clip config?")
        model_cfg = config["model_cfg"]
        pre = config.get("preprocess_cfg", {})
        preprocess = Preprocess(
            image_size=_image_size(model_cfg),
            mean=tuple(pre.get("mean", CLIP_MEAN)), std=tuple(pre.get("std", CLIP_STD)),
            interpolation=pre.get("interpolation", "bicubic"),
        )
        text_dir = resolve_text_dir(model_cfg, folder, text_dir)
        weights = find_weights(folder)
        if weights is None and not allow_random:
            raise WeightsError(
                f"no weights in {folder}: expected one of {', '.join(WEIGHT_FILES)}. Download them from "
                "the model hub into that folder, or pass allow_random for an untrained model."
            )
        state = read_weight_files(folder, (weights.name,))[0] if weights is not None else None
        return cls.from_state_dict(model_cfg, state, source=str(weights or folder), name=name or folder.name,
                                   preprocess=preprocess, text_dir=text_dir,
                                   double_embedding=double_embedding, precision=precision)

    @classmethod
    def from_state_dict(cls, model_cfg: dict, state: dict[str, torch.Tensor] | None, source: str, name: str,
                        preprocess: Preprocess | None = None, text_dir: str | None = None,
                        double_embedding: bool = False, precision: str = "fp32") -> "OpenClipBackbone":
        """Build ``model_cfg`` and load ``state`` strictly (``None``: random weights, tests only)."""
        if precision not in DTYPES:
            raise ValueError(f"precision {precision!r} is not one of {', '.join(DTYPES)}")
        is_bert = bool(model_cfg.get("text_cfg", {}).get("hf_model_name"))
        # OpenAI-style half precision (as the official code runs PLIP/QuiltNet): matmul weights in fp16,
        # LayerNorm in fp32. BERT towers are simply cast (the official code never runs them in fp16).
        cast = DTYPES[precision] if precision != "fp32" and not is_bert else None
        model = build_open_clip(model_cfg, text_dir, cast_dtype=cast, empty=state is not None)
        if state is not None:
            load_strict(model, state, source, ignore=IGNORED_KEYS)
        if precision != "fp32":
            if is_bert:
                cast_floating_(model, DTYPES[precision])
            else:
                from open_clip.model import convert_weights_to_lp

                convert_weights_to_lp(model, DTYPES[precision])
        if preprocess is None:
            preprocess = Preprocess(image_size=_image_size(model_cfg))
        return cls(model, model_cfg, preprocess, name, source=source, text_dir=text_dir,
                   double_embedding=double_embedding, precision=precision)

    def save_dir(self, folder: str | Path, weights_name: str = "open_clip_model.safetensors") -> Path:
        """Write the hub format (config + weights) that :meth:`from_dir` reads. ``weights_name``
        ``open_clip_pytorch_model.bin`` writes a torch file, as older hub uploads (BiomedCLIP) do."""
        from calibprompt.settings import atomic_write_json

        if weights_name not in WEIGHT_FILES:
            raise ValueError(f"weights_name must be one of {', '.join(WEIGHT_FILES)}")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        p = self.preprocess
        atomic_write_json(folder / "open_clip_config.json", {
            "model_cfg": self.model_cfg,
            "preprocess_cfg": {"mean": list(p.mean), "std": list(p.std), "interpolation": p.interpolation},
        })
        write_state_dict(self.model, folder / weights_name)
        return folder

    def copy_tokenizer_files(self, folder: str | Path, text_dir: str | Path) -> None:
        """Copy a BERT tower's tokenizer files next to the weights (as a hub snapshot has them)."""
        for name in TOKENIZER_FILES:
            if (Path(text_dir) / name).is_file():
                shutil.copyfile(Path(text_dir) / name, Path(folder) / name)

    # ---- images ---------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images.to(self._dtype))

    def image_state(self) -> dict[str, torch.Tensor]:
        return self.model.visual.state_dict()

    # ---- text -----------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self._tokenizer(list(texts)).long()

    def real_lengths(self, ids: torch.Tensor) -> torch.Tensor:
        if self.is_bert:
            # Padding sits at the end; masked positions never reach the CLS output.
            return (ids != self.pad_id).sum(dim=1)
        # Causal mask: positions after the end-of-text token cannot influence it. EOT has the largest id.
        return ids.argmax(dim=1) + 1

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.is_bert:
            return self.model.token_embedding(ids)
        embeddings = self.model.text.transformer.embeddings
        if self.double_embedding:
            return embeddings(input_ids=ids)
        return embeddings.word_embeddings(ids)

    def encode_embeddings(self, embeddings: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        embeddings = embeddings.to(self._dtype)
        if self.is_bert:
            text = self.model.text
            mask = (ids != self.pad_id).long()
            out = text.transformer(inputs_embeds=embeddings, attention_mask=mask)
            return text.proj(text.pooler(out, mask))
        m = self.model
        length = embeddings.shape[1]
        x = embeddings + m.positional_embedding[:length].to(embeddings.dtype)
        x = m.transformer(x, attn_mask=m.attn_mask[:length, :length])
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
        proj = m.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def encode_shared_prefix(self, embeddings: torch.Tensor, ids: torch.Tensor, prefix: int,
                             groups: int = 1) -> torch.Tensor:
        """Causal towers: the prefix's hidden states (and its keys and values in every layer) are computed
        once, from the first prompt, and each prompt's suffix (up to the last end token) attends to them;
        tokens after the end token never reach the pooled feature. Equal to ``encode_embeddings`` up to
        float rounding, gradients into the shared context included (tests/test_prefix_text.py)."""
        m = self.model
        blocks = getattr(getattr(m, "transformer", None), "resblocks", None)
        if self.is_bert or blocks is None or not all(_plain_block(b) for b in blocks) or prefix < 1:
            return self.encode_embeddings(embeddings, ids)
        embeddings = embeddings.to(self._dtype)
        rows = suffix_rows(self, ids, prefix, lambda t: t.argmax(dim=-1), groups)  # end token: the highest id
        if rows is None:
            return self.encode_embeddings(embeddings, ids)
        x = rows.embed(embeddings, m.positional_embedding.to(embeddings.dtype))
        causal = m.attn_mask[: rows.end, : rows.end].to(embeddings.dtype)
        for block in blocks:
            q, k, v = F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
            x = x + block.ls_1(block.attn.out_proj(rows.attention(q, k, v, block.attn.num_heads, causal)))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
        x = m.ln_final(x[rows.last])
        proj = m.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        missing = self.info.context_length - ids.shape[1]
        if missing > 0 and not self.is_bert:
            # open_clip's causal path needs the full context; padding after EOT changes nothing.
            ids = torch.nn.functional.pad(ids, (0, missing), value=self.pad_id)
        return self.model.encode_text(ids)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp().detach()


def _image_size(model_cfg: dict) -> int:
    size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _plain_block(block) -> bool:
    """open_clip's standard pre-norm block with ``nn.MultiheadAttention`` (what the prefix pass mirrors)."""
    attn = getattr(block, "attn", None)
    return (isinstance(attn, nn.MultiheadAttention) and attn.batch_first and attn.in_proj_weight is not None
            and attn.bias_k is None and not hasattr(block, "ln_1_kv")
            and all(hasattr(block, name) for name in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2")))
