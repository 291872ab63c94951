"""Backbone architectures: a registry of B-cos CNNs and ViTs split into named stages."""

from fact_model.backbones import densenet as _densenet  # noqa: F401  (registers architectures)
from fact_model.backbones import resnet as _resnet  # noqa: F401  (registers architectures)
from fact_model.backbones import vit as _vit  # noqa: F401  (registers architectures)
from fact_model.backbones._registry import create_backbone, list_backbones, register_backbone
from fact_model.backbones.checkpoints import load_bcos_v2_checkpoint, read_state_dict
from fact_model.backbones.staged import StagedBackbone

__all__ = [
    "StagedBackbone",
    "create_backbone",
    "list_backbones",
    "load_bcos_v2_checkpoint",
    "read_state_dict",
    "register_backbone",
]
