"""Named presets of the AlignSeg network, one record each: ``build(name, num_classes, **overrides)``.

A :class:`ModelPreset` holds everything known about a preset (as timm's ``default_cfg``): the
:class:`~alignseg.models.network.AlignSeg` constructor arguments, a description, the input convention
its weights expect, and where those weights come from.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..data.convention import IMAGENET_CONVENTION, InputConvention
from .network import AlignSeg

# No weights are downloaded: ImageNet backbone weights come from a local file (config model.pretrained,
# or train --pretrained), read by alignseg.models.load_backbone_weights.
_IMAGENET_BACKBONE = (
    "ImageNet ResNet-{depth} backbone from a local file (model.pretrained), deep-stem or torchvision layout"
)


@dataclass(frozen=True)
class ModelPreset:
    """One named network: ``architecture`` are :class:`AlignSeg` keyword arguments (read-only mapping)."""

    name: str
    architecture: Mapping[str, Any]
    description: str
    weights: str  # where the weights come from, in words
    input: InputConvention = field(default=IMAGENET_CONVENTION)

    def __post_init__(self):
        object.__setattr__(self, "architecture", MappingProxyType(dict(self.architecture)))


def _preset(name: str, description: str, weights: str | None = None, **architecture: Any) -> ModelPreset:
    weights = weights or _IMAGENET_BACKBONE.format(depth=architecture["depth"])
    return ModelPreset(name, architecture, description, weights)


PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        _preset("alignseg_r101", "the paper's network: deep-stem ResNet-101, 256-wide decoder",
                depth=101, backbone_width=64, decoder_channels=256),
        _preset("alignseg_r50", "deep-stem ResNet-50, 256-wide decoder",
                depth=50, backbone_width=64, decoder_channels=256),
        _preset("alignseg_r18", "deep-stem ResNet-18, 256-wide decoder",
                depth=18, backbone_width=64, decoder_channels=256),
        # ResNet-18 layout at a quarter of the width: the same structure, so it exercises every module.
        _preset("alignseg_tiny", "small CPU preset for demos and tests: ResNet-18 layout at width 16, 32-wide decoder",
                "none: trained from scratch (no ImageNet weights at width 16)",
                depth=18, backbone_width=16, decoder_channels=32),
    )
}  # fmt: skip


def list_models() -> list[str]:
    """Names accepted by :func:`build`."""
    return sorted(PRESETS)


def get_preset(name: str) -> ModelPreset:
    """The :class:`ModelPreset` called ``name``; ``ValueError`` listing the names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"model name must be one of {list_models()}, got {name!r}")
    return PRESETS[name]


def build(name: str, num_classes: int, **overrides: Any) -> AlignSeg:
    """Build the preset ``name`` with ``num_classes`` outputs; ``overrides`` replace any
    :class:`~alignseg.models.network.AlignSeg` constructor argument (e.g. ``decoder_channels=128``,
    ``upsample_high_first=True``, ``norm_layer=...``).

    Example:
        >>> model = build("alignseg_tiny", num_classes=19)
    """
    preset = get_preset(name)
    allowed = [p for p in inspect.signature(AlignSeg.__init__).parameters if p not in ("self", "num_classes")]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise TypeError(f"unknown override(s) {unknown} for {name}; allowed: {allowed}")
    return AlignSeg(num_classes, **{**preset.architecture, **overrides})
