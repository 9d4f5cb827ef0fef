"""Med-VLM backbones behind one interface (:class:`Backbone`), and the registry that builds them."""

from calibprompt.backbones.base import Backbone, BackboneInfo, WeightsError
from calibprompt.backbones.factory import load_backbone
from calibprompt.backbones.registry import BACKBONE_KEYS, BackboneEntry, list_backbones, register_backbone

__all__ = ["Backbone", "BackboneEntry", "BackboneInfo", "WeightsError", "BACKBONE_KEYS", "list_backbones",
           "load_backbone", "register_backbone"]
