"""Helpers shared by the backbone adapters: building a model without wasted initialisation, filling it
with fast random weights (tests), reading weight folders, hub snapshots, and a hook that feeds
prepared token embeddings through a model's own text path."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch
from torch import nn

from calibprompt.backbones.base import WeightsError
from calibprompt.backbones.weights import read_state_dict

M = TypeVar("M", bound=nn.Module)

# Norm layers whose weight is a scale (random fill centres it on 1, not 0).
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# ---- construction ----------------------------------------------------------------------------------
@contextmanager
def _params_on_meta() -> Iterator[None]:
    """Register every new parameter on the meta device: constructors then skip the (slow) random
    initialisation of weights that are about to be overwritten. Buffers stay real, so non-persistent
    buffers (causal masks, position ids, Swin's relative position index) are computed as usual."""
    original = nn.Module.register_parameter

    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_empty(factory: Callable[[], M]) -> M:
    """``factory()`` with uninitialised parameters (allocated, not initialised).

    Only for models whose every parameter is then loaded strictly (or filled by :func:`random_fill_`):
    the values are whatever the allocator returns. Shared (tied) parameters stay shared."""
    with _params_on_meta():
        module = factory()
    made: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is None or param.device.type != "meta":
                continue
            if id(param) not in made:
                made[id(param)] = nn.Parameter(torch.empty(param.shape, dtype=param.dtype),
                                               requires_grad=param.requires_grad)
            sub._parameters[name] = made[id(param)]
    return module


_POOL_SIZE = 1_000_003  # prime, so tiled values never line up with row widths


@torch.no_grad()
def random_fill_(module: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Fill every parameter with seeded pseudo-random values, fast: slices of one N(0, std^2) pool at
    random offsets (drawing 150 M fresh normals costs seconds on a small CPU). Norm-layer scales are
    centred on 1. Architecture-exact models for tests only; buffers are left alone."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(_POOL_SIZE, generator=gen) * std
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is None:
                continue
            n = param.numel()
            offset = int(torch.randint(_POOL_SIZE, (1,), generator=gen))
            reps = (offset + n) // _POOL_SIZE + 1
            values = pool.repeat(reps)[offset : offset + n] if reps > 1 else pool[offset : offset + n]
            values = values.view(param.shape).to(param.dtype)
            if isinstance(sub, _NORMS) and name == "weight":
                values = values + 1.0
            param.copy_(values)
    return module


# ---- weights ---------------------------------------------------------------------------------------
def read_weight_files(folder: Path, names: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], Path]:
    """The state dict in ``folder`` under the first of ``names`` that exists; a ``*.index.json`` name
    reads every shard it lists. Raises :class:`WeightsError` naming the expected files."""
    for name in names:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(read_state_dict(folder / shard))
            return state, path
        return read_state_dict(path), path
    raise WeightsError(f"no weights in {folder}: expected one of {', '.join(names)}")


def cast_floating_(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast floating parameters and buffers to ``dtype`` (integer buffers such as ids stay)."""
    for tensor_dict in (p for m in module.modules() for p in (m._parameters, m._buffers)):
        for key, tensor in tensor_dict.items():
            if tensor is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                tensor.data = tensor.data.to(dtype)
    return module


DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


# ---- hub -------------------------------------------------------------------------------------------
def hub_offline() -> bool:
    """True when the Hugging Face hub must not be contacted (read at call time, not import time)."""
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f.strip().lower() in {"1", "true", "yes", "on"} for f in flags)


def hub_snapshot(repo_id: str, how_to: str, allow_patterns: list[str] | None = None) -> Path:
    """Local folder of ``repo_id`` from the Hugging Face cache, downloading it when online.

    Only plain files are fetched (configs, weights, tokenizer files); no code is ever executed.
    ``how_to`` is appended to the error when the snapshot is unavailable (what to download, which
    key to set)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:  # pragma: no cover - a transformers dependency
        raise WeightsError(f"huggingface_hub is needed to fetch {repo_id!r}. {how_to}") from err
    offline = hub_offline()
    cache = os.environ.get("HF_HUB_CACHE") or None
    if not offline:
        try:
            _probe_hub(repo_id, how_to)
        except WeightsError as unreachable:
            try:  # the hub does not answer: a complete cached copy still serves
                return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache,
                                              allow_patterns=allow_patterns))
            except Exception:  # noqa: BLE001 - not cached either: say why the hub failed
                raise unreachable from None
    try:
        return Path(snapshot_download(repo_id, local_files_only=offline, cache_dir=cache,
                                      allow_patterns=allow_patterns))
    except Exception as err:  # noqa: BLE001 - any failure means: not available here
        state = "the hub is offline (HF_HUB_OFFLINE)" if offline else f"download failed ({type(err).__name__})"
        raise WeightsError(f"{repo_id!r} is not in the local Hugging Face cache and {state}. {how_to}") from err


HUB_TIMEOUT_ENV = "CALIBPROMPT_HUB_TIMEOUT"


def _probe_hub(repo_id: str, how_to: str) -> None:
    """Fail fast, naming the hub and the timeout, when the hub does not answer: a server that accepts
    connections but never replies would otherwise hold a download forever. Connect and read timeouts
    are ``$CALIBPROMPT_HUB_TIMEOUT`` seconds (default 20)."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    timeout = float(os.environ.get(HUB_TIMEOUT_ENV) or 20)
    url = f"{constants.ENDPOINT.rstrip('/')}/api/models/{repo_id}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # the hub answered (e.g. 401/404): snapshot_download gives the precise error
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise WeightsError(
            f"the Hugging Face hub at {constants.ENDPOINT} did not answer within {timeout:g} s for {repo_id!r} "
            f"({reason}). Work offline: set HF_HUB_OFFLINE=1 and backbone.path to a local folder, or raise "
            f"{HUB_TIMEOUT_ENV}. {how_to}") from None


# ---- text path -------------------------------------------------------------------------------------
@contextmanager
def replace_output(module: nn.Module, value: torch.Tensor) -> Iterator[None]:
    """While active, ``module``'s forward returns ``value``. Used to hand prepared token embeddings
    (learned context spliced in) to a model's own text forward, so positions, masks, pooling and
    projection run exactly as for ordinary ids."""
    handle = module.register_forward_hook(lambda _m, _inputs, _output: value)
    try:
        yield
    finally:
        handle.remove()
