"""Reading weight files safely and loading them strictly."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from calibprompt.backbones.base import WeightsError


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors, or from a torch file with ``weights_only=True`` (no pickle
    code execution). A checkpoint wrapping the dict under ``state_dict``/``model`` is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # noqa: BLE001 - a truncated or damaged file: name it and the fix
            raise WeightsError(f"cannot read weight file {path} ({err}); it is damaged or incomplete (an "
                               "interrupted download?): download it again") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file name and the fix
        raise WeightsError(
            f"cannot read {path} as a weights-only torch checkpoint ({err}). Convert it to "
            "safetensors, or re-save its state_dict with torch.save(model.state_dict(), path)."
        ) from err
    if isinstance(obj, torch.jit.ScriptModule):  # OpenAI-format JIT archives
        obj = obj.state_dict()
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str,
                ignore: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``module``; any missing or unexpected key is an error that lists them.
    ``ignore`` names keys that are known to be absent harmlessly (e.g. non-persistent position ids)."""
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state and not k.endswith(ignore or ("\0",)))
    unexpected = sorted(k for k in state if k not in own and not k.endswith(ignore or ("\0",)))
    shape_errors = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shape_errors:
        lines = [f"weights in {source} do not match the architecture:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shape_errors)):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
                lines.append(f"  {title} keys: {shown}")
        lines.append("  Check that the config matches the checkpoint (model name, quick_gelu, widths).")
        raise WeightsError("\n".join(lines))
    module.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def write_state_dict(module: nn.Module, path: str | Path) -> Path:
    """Save ``module``'s state dict atomically: safetensors for ``*.safetensors``, else a plain torch
    file of tensors only (readable with ``weights_only=True``)."""
    path = Path(path)
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(tmp), metadata={"format": "pt"})
    else:
        torch.save(state, tmp)
    tmp.replace(path)
    return path
