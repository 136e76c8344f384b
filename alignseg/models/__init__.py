"""The AlignSeg network: deep-stem ResNet backbone, AlignFA/AlignCM decoder, presets and helpers."""

from .authors import AuthorsCheckpointError, from_authors_checkpoint
from .complexity import complexity, format_model_summary
from .modules import RRB, AlignCM, AlignFA, OffsetHead, SegHead
from .network import OFFSET_NAMES, AlignSeg, convert_sync_batchnorm
from .registry import PRESETS, ModelPreset, build, get_preset, list_models
from .resnet import ResNetBackbone
from .weights import BackboneLoadReport, load_backbone_weights

__all__ = [
    "OFFSET_NAMES",
    "PRESETS",
    "RRB",
    "AlignCM",
    "AlignFA",
    "AlignSeg",
    "AuthorsCheckpointError",
    "BackboneLoadReport",
    "ModelPreset",
    "OffsetHead",
    "ResNetBackbone",
    "SegHead",
    "build",
    "complexity",
    "convert_sync_batchnorm",
    "format_model_summary",
    "from_authors_checkpoint",
    "get_preset",
    "list_models",
    "load_backbone_weights",
]
