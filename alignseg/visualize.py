"""Pictures of predictions and of the learned offset fields.

* Label maps as palette PNGs (:func:`colorize`: the pixel values stay the class ids, the palette gives the
  colours; 255 = ignore is black) and blended over the photo (:func:`overlay`).
* Offset fields in the optical-flow colour coding of the Middlebury benchmark (Baker et al., IJCV 2011):
  hue gives the direction, saturation the length; white = no shift (:func:`flow_to_color`).
* The panels of a model's offset fields (:func:`draw_offsets`).

This module only draws; running a model on images is :mod:`alignseg.api` (``segment``, ``predict_folder``,
``render_offsets``).

Palettes are facts of the datasets and live in :mod:`alignseg.data.metainfo` (Cityscapes: the official
colours of its 19 classes; ADE20K and folders: the generic PASCAL VOC bit-interleaving scheme shifted by
one, so class 0 is not black); they are re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .data.metainfo import ADE20K_PALETTE, CITYSCAPES_PALETTE, IGNORE_INDEX, METAINFO, generic_palette  # noqa: F401

IGNORE_COLOUR = (0, 0, 0)

# Palette names: the datasets' (cityscapes, ade20k, synthetic) and "generic" (255 distinct colours).
PALETTES = {**{name: meta.palette for name, meta in METAINFO.items()}, "generic": generic_palette(255)}


def get_palette(palette: str | np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
    """A palette by name (``cityscapes``, ``ade20k``, ``synthetic``, ``generic``) or an ``[K, 3]`` array of
    RGB values."""
    if isinstance(palette, str):
        if palette not in PALETTES:
            raise ValueError(f"palette must be one of {sorted(PALETTES)} or a [K, 3] array, got {palette!r}")
        return PALETTES[palette]
    array = np.asarray(palette)
    if array.ndim != 2 or array.shape[1] != 3 or array.shape[0] < 1 or array.min() < 0 or array.max() > 255:
        raise ValueError(f"palette must be a [K, 3] array of RGB values in 0..255, got shape {array.shape}")
    return array.astype(np.uint8)


def _label_array(label: Tensor | np.ndarray, palette: np.ndarray) -> np.ndarray:
    array = label.detach().cpu().numpy() if isinstance(label, Tensor) else np.asarray(label)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"label must be an integer [H, W] map of class ids, got {array.dtype} shape {array.shape}")
    bad = ((array < 0) | (array >= len(palette))) & (array != IGNORE_INDEX)
    if bad.any():
        raise ValueError(
            f"label holds ids outside the palette's {len(palette)} colours: {np.unique(array[bad])[:10].tolist()}"
        )
    return array


def colorize(label: Tensor | np.ndarray, palette: str | np.ndarray = "cityscapes") -> Image.Image:
    """A palette image (mode ``P``) of an ``[H, W]`` class-id map; saved as PNG it keeps the ids."""
    colours = get_palette(palette)
    array = _label_array(label, colours)
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: min(len(colours), 256)] = colours[:256]
    table[IGNORE_INDEX] = IGNORE_COLOUR
    image = Image.fromarray(array.astype(np.uint8))  # 2-D uint8: mode "L", made "P" below
    image = image.convert("P") if image.mode != "P" else image
    image.putpalette(table.flatten().tolist())
    return image


def _rgb_array(image: Image.Image | np.ndarray | Tensor) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"image must be a PIL image or a uint8 [H, W, 3] array, got {array.dtype} shape {array.shape}")
    return array


def overlay(
    image: Image.Image | np.ndarray,
    label: Tensor | np.ndarray,
    alpha: float = 0.5,
    palette: str | np.ndarray = "cityscapes",
) -> Image.Image:
    """The label colours blended over the photo: ``(1 - alpha) * image + alpha * colour``; ignored pixels keep
    the photo."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colours = get_palette(palette)
    photo = _rgb_array(image).astype(np.float32)
    array = _label_array(label, colours)
    if array.shape != photo.shape[:2]:
        raise ValueError(f"label size {array.shape} does not match image size {photo.shape[:2]}")
    labelled = array != IGNORE_INDEX
    coloured = colours[np.where(labelled, array, 0)].astype(np.float32)
    blend = np.where(labelled[..., None], (1 - alpha) * photo + alpha * coloured, photo)
    return Image.fromarray(np.round(blend).astype(np.uint8))


def _colour_wheel() -> np.ndarray:
    """The 55 hues of the Middlebury flow colour wheel, float [55, 3] in [0, 1]."""
    # Red->yellow->green->cyan->blue->magenta->red in 15, 6, 4, 11, 13, 6 steps: one channel full,
    # another ramping up or down.
    segments = [
        (15, 0, 1, True), (6, 1, 0, False), (4, 1, 2, True), (11, 2, 1, False), (13, 2, 0, True), (6, 0, 2, False)
    ]
    wheel = []
    for steps, full_channel, ramp_channel, rising in segments:
        for i in range(steps):
            colour = np.zeros(3)
            colour[full_channel] = 255
            ramp = np.floor(255 * i / steps)
            colour[ramp_channel] = ramp if rising else 255 - ramp
            wheel.append(colour)
    return np.array(wheel) / 255


_WHEEL = _colour_wheel()


def flow_to_color(offsets: Tensor | np.ndarray, max_magnitude: float | None = None) -> Image.Image:
    """Colour-code an offset field ``[2, H, W]`` (dx, dy) with the Middlebury flow wheel.

    Direction sets the hue (right = red, down = yellow-orange, left = cyan-blue, up = blue-magenta) and
    length over ``max_magnitude`` the saturation (default: the field's longest offset); 0 is white,
    offsets longer than ``max_magnitude`` are drawn darker.
    """
    field = (
        offsets.detach().float().cpu().numpy() if isinstance(offsets, Tensor) else np.asarray(offsets, dtype=np.float64)
    )
    if field.ndim != 3 or field.shape[0] != 2:
        raise ValueError(f"offsets must be [2, H, W] (dx, dy), got shape {field.shape}")
    dx, dy = np.nan_to_num(field[0]), np.nan_to_num(field[1])
    radius = np.hypot(dx, dy)
    if max_magnitude is None:
        max_magnitude = float(radius.max())
    if max_magnitude < 0:
        raise ValueError(f"max_magnitude must be >= 0, got {max_magnitude}")
    scale = max_magnitude if max_magnitude > 0 else 1.0
    radius = radius / scale
    n = len(_WHEEL)
    position = (np.arctan2(-dy, -dx) / np.pi + 1) / 2 * (n - 1)  # 0..n-1 around the wheel
    k0 = np.floor(position).astype(int) % n
    k1 = (k0 + 1) % n
    frac = (position - np.floor(position))[..., None]
    hue = (1 - frac) * _WHEEL[k0] + frac * _WHEEL[k1]
    inside = (radius <= 1)[..., None]
    colour = np.where(inside, 1 - radius[..., None] * (1 - hue), hue * 0.75)
    return Image.fromarray(np.round(255 * colour).astype(np.uint8))


def flow_legend(size: int = 65) -> Image.Image:
    """The colour wheel itself: the colour of each offset direction and length, centre = no shift."""
    centre = (size - 1) / 2
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    field = np.stack([xs - centre, ys - centre])
    picture = np.asarray(flow_to_color(field, max_magnitude=centre)).copy()
    picture[np.hypot(*field) > centre] = 255
    return Image.fromarray(picture)


def draw_offsets(
    fields: Mapping[str, Tensor], size: tuple[int, int], max_magnitude: float | None = None
) -> dict[str, tuple[Image.Image, float]]:
    """One flow-colour picture per offset field of one image: ``{name: (picture, colour scale in px)}``.

    ``fields`` maps a module name to ``Tensor[1, 4 or 2, h, w]``. An AlignFA field (4 channels) is drawn as
    two panels side by side, the shift of the coarse map (channels 0-1) then of the fine map (2-3), on one
    colour scale; an AlignCM field (2 channels) as one panel. Panels are enlarged to ``size`` = (height,
    width) (nearest neighbour). The colour scale is the module's longest offset unless ``max_magnitude`` is given.
    """
    if not isinstance(fields, Mapping) or not fields:
        raise ValueError(f"forward_offsets must return a non-empty dict of offset tensors, got {type(fields).__name__}")
    height, width = size
    pictures = {}
    for name, offsets in fields.items():
        if not isinstance(offsets, Tensor) or offsets.dim() != 4 or offsets.shape[1] not in (2, 4):
            got = tuple(offsets.shape) if isinstance(offsets, Tensor) else type(offsets).__name__
            raise ValueError(f"offsets of {name!r} must be Tensor[N, 4 or 2, h, w], got {got}")
        field = offsets[0].float().cpu()
        panels = [field[0:2], field[2:4]] if field.shape[0] == 4 else [field]
        scale = max_magnitude
        if scale is None:  # one scale for both panels of a module, so their colours compare
            scale = max(float(torch.linalg.vector_norm(p, dim=0).max()) for p in panels)
        drawn = [flow_to_color(p, scale).resize((width, height), Image.NEAREST) for p in panels]
        gap = 8
        canvas = Image.new("RGB", (len(drawn) * width + (len(drawn) - 1) * gap, height), (255, 255, 255))
        for i, picture in enumerate(drawn):
            canvas.paste(picture, (i * (width + gap), 0))
        pictures[name] = (canvas, scale)
    return pictures
