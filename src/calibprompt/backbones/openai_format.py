"""Single-file checkpoints that become open_clip models.

* **OpenAI format**: the state dict of OpenAI's CLIP code (``visual.conv1.weight``,
  ``transformer.resblocks.*``, ``token_embedding.weight``, ...), the form in which BAPLe and CalibPrompt
  ship PLIP (``plip_vit_b32.pt``) and QuiltNet (``quiltnet_b32.pt``), OpenAI ships CLIP, and PubMedCLIP
  ships its ``.pth``. open_clip's ``CLIP`` uses the same key names; the architecture is read off the
  tensor shapes, and QuickGELU is on because OpenAI's code always uses it (Q18).
* **UniMed-CLIP**: the authors' checkpoint of their open_clip fork (a ViT with OpenAI key names under
  ``visual.``, BiomedBERT under ``text_encoder.``). It maps onto open_clip's ``CustomTextCLIP`` by
  renaming ``text_encoder.`` to ``text.``.

Both are read with ``torch.load(weights_only=True)``; no pickled code runs.
"""

from __future__ import annotations

import torch

from calibprompt.backbones.base import WeightsError
from calibprompt.backbones.open_clip_model import OpenClipBackbone

# Integer "buffers" found in OpenAI's JIT archives and some re-saved state dicts; not weights.
OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")
BIOMEDBERT = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
# The authors' HFTextEncoder: BiomedBERT without its pooler, CLS token of the last layer, MLP head.
UNIMED_TEXT_CFG = {
    "hf_model_name": BIOMEDBERT, "hf_tokenizer_name": BIOMEDBERT,
    "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256,
}


def is_openai_state(state: dict) -> bool:
    return "visual.conv1.weight" in state and "token_embedding.weight" in state and "ln_final.weight" in state


def is_unimed_state(state: dict) -> bool:
    return "visual.conv1.weight" in state and any(k.startswith("text_encoder.transformer.") for k in state)


def vision_cfg_from_state(state: dict[str, torch.Tensor], source: str) -> dict:
    """open_clip ``vision_cfg`` of an OpenAI-style ViT, read off the tensor shapes."""
    if "visual.proj" not in state:
        raise WeightsError(
            f"{source}: only ViT image towers are supported in OpenAI format (no 'visual.proj'; a ResNet "
            "checkpoint such as PubMedCLIP RN50 is not supported)"
        )
    width, _, patch, _ = state["visual.conv1.weight"].shape
    layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    return {"image_size": int(patch * grid), "layers": layers, "width": int(width), "patch_size": int(patch)}


def openai_model_cfg(state: dict[str, torch.Tensor], source: str = "checkpoint") -> dict:
    """open_clip ``model_cfg`` of an OpenAI-format state dict (as OpenAI's ``build_model`` infers it)."""
    width = state["ln_final.weight"].shape[0]
    return {
        "embed_dim": int(state["text_projection"].shape[1]),
        "quick_gelu": True,  # OpenAI's CLIP code uses QuickGELU for every model it runs
        "vision_cfg": vision_cfg_from_state(state, source),
        "text_cfg": {
            "context_length": int(state["positional_embedding"].shape[0]),
            "vocab_size": int(state["token_embedding.weight"].shape[0]),
            "width": int(width),
            "heads": int(width // 64),
            "layers": len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")}),
        },
    }


def unimed_model_cfg(state: dict[str, torch.Tensor], source: str = "checkpoint") -> dict:
    """open_clip ``model_cfg`` of a UniMed-CLIP checkpoint: OpenAI-style ViT with QuickGELU, BiomedBERT
    text tower with CLS pooling and an MLP projection, 256 tokens (the authors' ``HFTextEncoder``)."""
    width = state["text_encoder.transformer.embeddings.word_embeddings.weight"].shape[1]
    if width != 768:
        raise WeightsError(f"{source}: text width {width}; only the BiomedBERT-base UniMed-CLIP models are supported")
    return {"embed_dim": int(state["visual.proj"].shape[1]), "quick_gelu": True,
            "vision_cfg": vision_cfg_from_state(state, source), "text_cfg": dict(UNIMED_TEXT_CFG)}


def check_arch(model_cfg: dict, expected: dict, name: str, source: str) -> None:
    """Error when a checkpoint's inferred architecture differs from a registry entry's."""
    diffs = []
    for section in ("vision_cfg", "text_cfg"):
        for key, want in expected.get(section, {}).items():
            got = model_cfg.get(section, {}).get(key)
            if got is not None and got != want:
                diffs.append(f"{section}.{key}: file {got} vs {name} {want}")
    if model_cfg.get("embed_dim") != expected.get("embed_dim", model_cfg.get("embed_dim")):
        diffs.append(f"embed_dim: file {model_cfg.get('embed_dim')} vs {name} {expected['embed_dim']}")
    if diffs:
        raise WeightsError(f"{source} is not a {name} checkpoint: " + "; ".join(diffs)
                           + ". Check backbone.name and backbone.path.")


def load_openai(state: dict[str, torch.Tensor], source: str, name: str, precision: str = "fp32",
                expected: dict | None = None) -> OpenClipBackbone:
    """An OpenAI-format state dict as an open_clip ``CLIP`` backbone (strict loading)."""
    state = {k: v for k, v in state.items() if k not in OPENAI_META_KEYS}
    model_cfg = openai_model_cfg(state, source)
    if expected:
        check_arch(model_cfg, expected, name, source)
    backbone = OpenClipBackbone.from_state_dict(model_cfg, state, source=source, name=name, precision=precision)
    backbone.info.extra["quick_gelu"] = True
    return backbone


def load_unimed(state: dict[str, torch.Tensor], source: str, name: str, text_dir: str | None,
                precision: str = "fp32", double_embedding: bool = False) -> OpenClipBackbone:
    """A UniMed-CLIP checkpoint as an open_clip ``CustomTextCLIP`` backbone (strict loading)."""
    from calibprompt.backbones.open_clip_model import resolve_text_dir

    model_cfg = unimed_model_cfg(state, source)
    renamed = {("text." + k[len("text_encoder."):] if k.startswith("text_encoder.") else k): v
               for k, v in state.items()}
    text_dir = resolve_text_dir(model_cfg, None, text_dir)
    return OpenClipBackbone.from_state_dict(model_cfg, renamed, source=source, name=name, text_dir=text_dir,
                                            precision=precision, double_embedding=double_embedding)


def openai_state_dict(backbone_or_model, dtype: torch.dtype | None = None,
                      meta_keys: bool = False) -> dict[str, torch.Tensor]:
    """The OpenAI-format state dict of an open_clip ``CLIP`` (or its backbone): same key names.
    ``dtype`` casts floating tensors (OpenAI's own files are fp16); ``meta_keys`` adds the integer
    entries OpenAI's JIT archives carry."""
    model = getattr(backbone_or_model, "model", backbone_or_model)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous().clone()
             for k, v in model.state_dict().items()}
    if not is_openai_state(state):
        raise ValueError("not an open_clip CLIP with a causal text tower; cannot write OpenAI format")
    if meta_keys:
        cfg = openai_model_cfg(state)
        state["input_resolution"] = torch.tensor(cfg["vision_cfg"]["image_size"])
        state["context_length"] = torch.tensor(cfg["text_cfg"]["context_length"])
        state["vocab_size"] = torch.tensor(cfg["text_cfg"]["vocab_size"])
    return state


def unimed_state_dict(backbone_or_model) -> dict[str, torch.Tensor]:
    """The UniMed-CLIP checkpoint layout of an open_clip ``CustomTextCLIP`` (``text.`` -> ``text_encoder.``)."""
    model = getattr(backbone_or_model, "model", backbone_or_model)
    return {("text_encoder." + k[len("text."):] if k.startswith("text.") else k): v.contiguous().clone()
            for k, v in model.state_dict().items()}
