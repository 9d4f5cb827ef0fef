"""Methods: everything that turns a frozen backbone plus a few labelled shots into a classifier head.

``resolve_method(name, **params)`` expands a preset name into a :class:`MethodSpec`; ``spec.build()``
gives the :class:`Method`, whose ``fit(FitContext)`` returns a :class:`FitResult` holding the head.
"""

from calibprompt.methods.base import METHODS, FitContext, FitResult, Method, register_method
from calibprompt.methods.heads import HEADS, ClipAdapterHead, Head, HeadError, LinearHead, TipAdapterHead, load_head
from calibprompt.methods.presets import (
    PAPER_HPARAMS,
    PRESETS,
    MethodSpec,
    list_methods,
    paper_hparams,
    paper_method,
    posthoc_suffixes,
    resolve_method,
)

__all__ = [
    "HEADS",
    "METHODS",
    "PAPER_HPARAMS",
    "PRESETS",
    "ClipAdapterHead",
    "FitContext",
    "FitResult",
    "Head",
    "HeadError",
    "LinearHead",
    "Method",
    "MethodSpec",
    "TipAdapterHead",
    "list_methods",
    "load_head",
    "paper_hparams",
    "paper_method",
    "posthoc_suffixes",
    "register_method",
    "resolve_method",
]
