"""Named presets of the AlignSeg network: ``build(name, num_classes, **overrides)``."""

from __future__ import annotations

import inspect
from typing import Any

from .network import AlignSeg

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's network: ResNet-101 with the deep stem, 256-wide decoder.
    "alignseg_r101": dict(depth=101, backbone_width=64, decoder_channels=256),
    "alignseg_r50": dict(depth=50, backbone_width=64, decoder_channels=256),
    "alignseg_r18": dict(depth=18, backbone_width=64, decoder_channels=256),
    # Small CPU preset for the built-in demo and tests: ResNet-18 layout at a quarter of the width,
    # 32-wide decoder. Same structure as the others, so it exercises every module.
    "alignseg_tiny": dict(depth=18, backbone_width=16, decoder_channels=32),
}

PRESET_DESCRIPTIONS: dict[str, str] = {
    "alignseg_r101": "the paper's network: deep-stem ResNet-101, 256-wide decoder",
    "alignseg_r50": "deep-stem ResNet-50, 256-wide decoder",
    "alignseg_r18": "deep-stem ResNet-18, 256-wide decoder",
    "alignseg_tiny": "small CPU preset for demos and tests: ResNet-18 layout at width 16, 32-wide decoder",
}


def list_models() -> list[str]:
    """Names accepted by :func:`build`."""
    return sorted(PRESETS)


def build(name: str, num_classes: int, **overrides: Any) -> AlignSeg:
    """Build the preset ``name`` with ``num_classes`` outputs; ``overrides`` replace any
    :class:`~alignseg.models.network.AlignSeg` constructor argument (e.g. ``decoder_channels=128``,
    ``upsample_high_first=True``, ``norm_layer=...``).

    Example:
        >>> model = build("alignseg_tiny", num_classes=19)
    """
    if name not in PRESETS:
        raise ValueError(f"model name must be one of {list_models()}, got {name!r}")
    allowed = [p for p in inspect.signature(AlignSeg.__init__).parameters if p not in ("self", "num_classes")]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise TypeError(f"unknown override(s) {unknown} for {name}; allowed: {allowed}")
    return AlignSeg(num_classes, **{**PRESETS[name], **overrides})
