"""Inference modes: whole image, sliding window, multi-scale, each optionally with horizontal flip.

The model in eval mode maps normalised images ``Tensor[N, 3, H, W]`` to logits ``Tensor[N, C, H, W]``
(a tuple's first element is taken; logits of another size are resized bilinearly, ``align_corners=True``).

* ``whole``: one forward pass on the full image.
* ``slide``: ``tile``-sized windows every ``stride`` pixels, the last window flush with the border;
  logits are averaged where windows overlap. An image smaller than a tile is padded with 0 (the mean
  colour after normalisation) and the padding cropped off again.
* ``multiscale``: the image resized by each factor in ``scales`` (bilinear, ``align_corners=True``),
  each run whole or, when ``tile`` is given, by sliding window, as the authors' evaluation does;
  the logits are resized back to the image size, turned into probabilities and averaged.
* ``flip``: every pass is also run on the mirrored image, mirrored back and averaged.

:func:`infer` returns class probabilities (softmax; averaged over passes), float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The one list of inference modes: the config's eval.mode type, the CLI's --mode choices and the checks here.
EvalMode = Literal["whole", "slide", "multiscale"]
MODES: tuple[str, ...] = get_args(EvalMode)
# Multiscale factors when none are given; also the config's eval.scales default.
DEFAULT_SCALES = (0.75, 1.0, 1.25, 1.5, 1.75)


def _size_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or (height, width) of positive ints, got {value!r}")
    return pair


@dataclass(frozen=True)
class InferenceMode:
    """A validated inference setting; build it with :func:`build_inference_mode`. ``str()`` describes it."""

    mode: str = "whole"
    tile: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    def __str__(self) -> str:
        window = f"tile {self.tile[0]}x{self.tile[1]}, stride {self.stride[0]}x{self.stride[1]}" if self.tile else ""
        if self.mode == "whole":
            text = "whole"
        elif self.mode == "slide":
            text = f"slide({window})"
        else:
            text = f"multiscale(scales {','.join(f'{s:g}' for s in self.scales)}; {window or 'whole'})"
        return text + ("+flip" if self.flip else "")


def build_inference_mode(
    mode: str = "whole",
    tile: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    scales: Sequence[float] | None = None,
    flip: bool = False,
) -> InferenceMode:
    """Check and complete an inference setting.

    ``whole`` ignores ``tile``, ``stride`` and ``scales``. ``slide`` needs ``tile`` and ignores ``scales``;
    ``stride`` defaults to two thirds of the tile (and must not exceed it, or pixels between windows
    would get no prediction). ``multiscale`` takes ``scales`` (default :data:`DEFAULT_SCALES`) and an
    optional ``tile``/``stride`` for sliding at each scale. ``flip`` applies to every mode.
    """
    if isinstance(mode, InferenceMode):
        return mode
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    # Settings a mode does not use are dropped (configs carry all of them), so the description is exact.
    if mode == "whole":
        tile = stride = None
    if mode != "multiscale":
        scales = None
    if mode == "slide" and tile is None:
        raise ValueError("mode='slide' needs tile=(height, width) (e.g. the training crop size)")
    if tile is None and stride is not None:
        raise ValueError("stride needs tile")
    tile_hw = stride_hw = None
    if tile is not None:
        tile_hw = _size_pair(tile, "tile")
        stride_hw = (
            _size_pair(stride, "stride") if stride is not None else tuple(max(1, math.ceil(t * 2 / 3)) for t in tile_hw)
        )
        if stride_hw[0] > tile_hw[0] or stride_hw[1] > tile_hw[1]:
            raise ValueError(
                f"stride {stride_hw} must not exceed tile {tile_hw}: pixels between windows would get no prediction"
            )
    scale_tuple = (1.0,)
    if mode == "multiscale":
        scale_tuple = tuple(float(s) for s in (DEFAULT_SCALES if scales is None else scales))
        if not scale_tuple or any(not s > 0 for s in scale_tuple):
            raise ValueError(f"scales must be a non-empty list of positive factors, got {scales!r}")
    return InferenceMode(mode, tile_hw, stride_hw, scale_tuple, bool(flip))


def forward_logits(model: nn.Module, images: Tensor) -> Tensor:
    """The model's logits at the images' size, float32."""
    out = model(images)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, Tensor) or out.dim() != 4 or out.shape[0] != images.shape[0]:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the model must return logits Tensor[N, C, H, W] for N={images.shape[0]} images, got {got}")
    out = out.float()
    if out.shape[-2:] != images.shape[-2:]:
        out = F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=True)
    return out


def _window_starts(size: int, tile: int, stride: int) -> list[int]:
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)  # the last window flush with the border
    return starts


def slide_logits(model: nn.Module, images: Tensor, tile: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """Sliding-window logits ``Tensor[N, C, H, W]``, averaged over overlapping windows."""
    _, _, height, width = images.shape
    tile_h, tile_w = tile
    padded_h, padded_w = max(height, tile_h), max(width, tile_w)
    if (padded_h, padded_w) != (height, width):
        images = F.pad(images, (0, padded_w - width, 0, padded_h - height))
    scores = None
    count = torch.zeros(1, 1, padded_h, padded_w, device=images.device)
    for top in _window_starts(padded_h, tile_h, stride[0]):
        for left in _window_starts(padded_w, tile_w, stride[1]):
            logits = forward_logits(model, images[:, :, top : top + tile_h, left : left + tile_w])
            if scores is None:
                scores = logits.new_zeros(images.shape[0], logits.shape[1], padded_h, padded_w)
            scores[:, :, top : top + tile_h, left : left + tile_w] += logits
            count[:, :, top : top + tile_h, left : left + tile_w] += 1
    return (scores / count)[:, :, :height, :width]


def infer(model: nn.Module, images: Tensor, mode: InferenceMode | str = "whole", **kw) -> Tensor:
    """Class probabilities ``Tensor[N, C, H, W]`` (float32) for normalised ``images`` ``Tensor[N, 3, H, W]``.

    ``mode`` is an :class:`InferenceMode` or a mode name, with ``tile``, ``stride``, ``scales``, ``flip``
    as keywords (see :func:`build_inference_mode`). Runs without gradients; leaves the model's mode alone.
    """
    setting = build_inference_mode(mode, **kw) if not isinstance(mode, InferenceMode) else mode
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be Tensor[N, 3, H, W], got {got}")
    height, width = images.shape[-2:]
    total, passes = None, 0
    with torch.no_grad():
        for scale in setting.scales:
            scaled = images
            if scale != 1.0:
                size = (max(1, round(height * scale)), max(1, round(width * scale)))
                scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=True)
            for flipped in (False, True) if setting.flip else (False,):
                x = scaled.flip(-1) if flipped else scaled
                logits = (
                    slide_logits(model, x, setting.tile, setting.stride) if setting.tile else forward_logits(model, x)
                )
                if flipped:
                    logits = logits.flip(-1)
                if logits.shape[-2:] != (height, width):
                    logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=True)
                prob = logits.softmax(1)
                total = prob if total is None else total + prob
                passes += 1
    return total / passes
