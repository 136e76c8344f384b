"""Loading ImageNet weights into the deep-stem ResNet backbone from a local file (never a download).

Three layouts are understood:

* a checkpoint of our own key layout (deep stem ``conv1``..``bn3``, ``layer1``..``layer4``), such as the
  deep-stem ImageNet ResNets the authors start from, or a full AlignSeg checkpoint (its ``backbone.``
  entries are used);
* timm's deep-stem ResNets (``resnet50s``, ``resnet101s``, ``resnet152s``: stem 64-64-128, the authors'
  stem). timm keeps the stem in a Sequential ``conv1`` (``conv1.0`` conv, ``.1`` norm, ``.3`` conv, ``.4``
  norm, ``.6`` conv) and its last norm as ``bn1`` (timm ``models/resnet.py``, ``ResNet.__init__``, deep
  stem); these are renamed to our ``conv1``/``bn1``/``conv2``/``bn2``/``conv3``/``bn3``, the rest matches
  key for key;
* a torchvision ResNet ``state_dict``. Its single 7x7 stem (``conv1``/``bn1``) is not the deep stem, so
  those keys are skipped and the stem keeps its initial values; where the deep stem's 128 output
  channels meet ``layer1`` (its first block and projection) shapes differ and those keys are skipped too.

Every key is accounted for in the returned :class:`BackboneLoadReport` under the file's own names: loaded,
or skipped with the reason.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .network import AlignSeg
from .resnet import ResNetBackbone

log = logging.getLogger(__name__)

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
_TORCHVISION_STEM = ("conv1.", "bn1.")
# timm's deep stem (a Sequential conv1 plus bn1) -> ours.
_TIMM_STEM = {"conv1.0.": "conv1.", "conv1.1.": "bn1.", "conv1.3.": "conv2.", "conv1.4.": "bn2.", "conv1.6.": "conv3.",
              "bn1.": "bn3."}


@dataclass
class BackboneLoadReport:
    """What :func:`load_backbone_weights` did with each key; ``str(report)`` is a readable summary."""

    source: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # checkpoint key -> why it was not loaded
    missing: list[str] = field(default_factory=list)  # backbone keys left at their initial values

    def __str__(self) -> str:
        lines = [f"Backbone weights from {self.source} ({self.layout}):", f"  loaded {len(self.loaded)} tensors"]
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} tensors:")
            by_reason: dict[str, list[str]] = {}
            for key, reason in self.skipped.items():
                by_reason.setdefault(reason, []).append(key)
            for reason, keys in by_reason.items():
                lines.append(f"    {reason}: {', '.join(keys)}")
        if self.missing:
            lines.append(f"  left at their initial values: {len(self.missing)} tensors: {', '.join(self.missing)}")
        return "\n".join(lines)


def load_backbone_weights(model_or_backbone: nn.Module, path: str | os.PathLike) -> BackboneLoadReport:
    """Copy the matching tensors of a local checkpoint into the backbone of ``model_or_backbone``.

    Args:
        model_or_backbone: an :class:`~alignseg.models.network.AlignSeg` or its ``ResNetBackbone``.
        path: a file written by ``torch.save`` holding a state_dict (possibly under ``"state_dict"`` or
            ``"model"``, keys possibly prefixed by ``module.``), in torchvision's or our layout.

    Returns:
        A :class:`BackboneLoadReport` listing the loaded keys, the skipped ones with reasons, and the
        backbone tensors that kept their initial values.
    """
    if isinstance(model_or_backbone, AlignSeg):
        backbone = model_or_backbone.backbone
    elif isinstance(model_or_backbone, ResNetBackbone):
        backbone = model_or_backbone
    else:
        raise TypeError(
            f"model_or_backbone must be an AlignSeg or a ResNetBackbone, got {type(model_or_backbone).__name__}"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path must name an existing checkpoint file, got {os.fspath(path)!r}")

    checkpoint = _unwrap(torch.load(path, map_location="cpu", weights_only=True), path)
    timm_stem = "conv1.0.weight" in checkpoint
    torchvision_stem = not timm_stem and _has_torchvision_stem(checkpoint)
    if timm_stem:
        layout = "timm deep-stem layout (conv1.0/1/3/4/6, bn1)"
    else:
        layout = "torchvision layout, single 7x7 stem" if torchvision_stem else "deep-stem layout"
    report = BackboneLoadReport(source=os.fspath(path), layout=layout)
    targets = backbone.state_dict()
    selected: dict[str, Tensor] = {}
    for key, value in checkpoint.items():
        ours = _timm_to_ours(key) if timm_stem else key
        reason = _skip_reason(ours, value, targets, torchvision_stem)
        if reason is None:
            selected[ours] = value
            report.loaded.append(key)
        else:
            report.skipped[key] = reason
    backbone.load_state_dict(selected, strict=False)
    report.missing = [k for k in targets if k not in selected and not k.endswith("num_batches_tracked")]
    log.info("%s", report)
    return report


def _unwrap(obj: object, path) -> dict[str, Tensor]:
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"the checkpoint at {os.fspath(path)!r} is not a state_dict (a mapping of names to tensors)")
    state = {}
    for key, value in obj.items():
        key = key.removeprefix("module.")
        state[key] = value
    # A full AlignSeg checkpoint: keep the backbone's entries under their backbone names.
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items()}
    return state


def _timm_to_ours(key: str) -> str:
    for prefix, ours in _TIMM_STEM.items():
        if key.startswith(prefix):
            return ours + key.removeprefix(prefix)
    return key


def _has_torchvision_stem(state: Mapping[str, Tensor]) -> bool:
    stem = state.get("conv1.weight")
    return stem is not None and (stem.shape[-1] == 7 or "conv2.weight" not in state)


def _skip_reason(key: str, value: Tensor, targets: Mapping[str, Tensor], torchvision_stem: bool) -> str | None:
    if key.startswith("fc."):
        return "ImageNet classifier, not part of the backbone"
    if torchvision_stem and key.startswith(_TORCHVISION_STEM):
        return "torchvision's single 7x7 stem is not the deep stem (three 3x3 convs), the stem keeps its initial values"
    if key not in targets:
        return "no such tensor in the backbone"
    expected = targets[key].shape
    if value.shape != expected:
        why = f"shape {list(value.shape)} does not match the backbone's {list(expected)}"
        if torchvision_stem and key.startswith("layer1.0."):
            why += " (the deep stem ends at 2x the width, torchvision's stem at 1x)"
        return why
    return None
