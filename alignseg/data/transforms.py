"""Training and evaluation transforms: ``(PIL image, PIL label) -> (Tensor[3, H, W] float32, Tensor[H, W] int64)``.

Training: random rescale (image bilinear, label nearest), photometric jitter, normalisation, pad to the
crop size (image 0 *after* normalisation, i.e. the mean colour, as in the authors' CCNet-based code;
label 255), random crop, horizontal flip. Normalisation is the model's :class:`InputConvention`
(channel order, scale, mean, std; default the ImageNet one of this project's presets). All randomness
comes from the torch RNG, so seeding torch (and the DataLoader's per-worker seeds) makes runs reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .convention import IMAGENET_CONVENTION, IMAGENET_MEAN, IMAGENET_STD, InputConvention  # noqa: F401
from .metainfo import IGNORE_INDEX


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair (height, width) of positive ints, got {value!r}")
    return pair


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def to_tensor_pair(image: Image.Image, label: Image.Image) -> tuple[Tensor, Tensor]:
    """PIL RGB image and label -> (uint8 Tensor[3, H, W], int64 Tensor[H, W]), no scaling."""
    image_t = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
    label_t = torch.from_numpy(np.array(label, dtype=np.int64))
    if label_t.shape != image_t.shape[1:]:
        raise ValueError(f"label size {tuple(label_t.shape)} does not match image size {tuple(image_t.shape[1:])}")
    return image_t, label_t


def photometric_jitter(image: Tensor, strength: float) -> Tensor:
    """Random brightness, contrast and saturation, each a factor in ``[1 - strength, 1 + strength]``, random order.

    ``image`` is float in [0, 1], Tensor[3, H, W]; the result is clamped back to [0, 1].
    """
    if strength <= 0:
        return image
    weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)  # ITU-R 601 luma
    for which in torch.randperm(3).tolist():
        factor = _uniform(1 - strength, 1 + strength)
        if which == 0:
            image = image * factor
        elif which == 1:
            mean_luma = (image * weights).sum(0).mean()
            image = (image - mean_luma) * factor + mean_luma
        else:
            gray = (image * weights).sum(0, keepdim=True)
            image = (image - gray) * factor + gray
        image = image.clamp(0, 1)
    return image


class TrainTransform:
    """Random rescale, jitter, normalise, pad, random crop, flip; see :func:`build_train_transform`."""

    def __init__(self, crop_size, scale_range, convention: InputConvention, flip, jitter, scale_step=0.0):
        self.crop_size = _pair(crop_size, "crop_size")
        low, high = scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range!r}")
        if not scale_step >= 0:
            raise ValueError(f"scale_step must be 0 (a continuous scale) or positive, got {scale_step!r}")
        # With a step, the scales low, low + step, ... up to high (the authors' 0.7 + randint(0, 14) / 10).
        count = int((high - low) / scale_step + 1e-6) + 1 if scale_step > 0 else 0
        self.scales = [round(low + i * scale_step, 10) for i in range(count)] if count else None
        if jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {jitter}")
        self.scale_range = (float(low), float(high))
        self.convention = _convention(convention)
        self.flip = flip
        self.jitter = float(jitter)

    def __call__(self, image: Image.Image, label: Image.Image) -> tuple[Tensor, Tensor]:
        if image.size != label.size:
            raise ValueError(f"label size {label.size} does not match image size {image.size} (width, height)")
        if self.scales is None:
            scale = _uniform(*self.scale_range)
        else:
            scale = self.scales[int(torch.randint(len(self.scales), ()))]
        if scale != 1.0:
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.BILINEAR)
            label = label.resize(size, Image.NEAREST)
        image_u8, label_full = to_tensor_pair(image, label)

        # Crop a window of the padded image; only the part inside the image is converted, then
        # placed on a canvas that already holds the padding (normalised 0 / label 255).
        crop_h, crop_w = self.crop_size
        h, w = label_full.shape
        top = int(torch.randint(0, max(h, crop_h) - crop_h + 1, ()))
        left = int(torch.randint(0, max(w, crop_w) - crop_w + 1, ()))
        bottom, right = min(top + crop_h, h), min(left + crop_w, w)
        inside = image_u8[:, top:bottom, left:right].float() / 255
        inside = self.convention.normalize_unit(photometric_jitter(inside, self.jitter))
        out_image = torch.zeros(3, crop_h, crop_w)
        out_label = torch.full((crop_h, crop_w), IGNORE_INDEX, dtype=torch.int64)
        out_image[:, : bottom - top, : right - left] = inside
        out_label[: bottom - top, : right - left] = label_full[top:bottom, left:right]
        if self.flip and torch.rand(()).item() < 0.5:
            out_image, out_label = out_image.flip(-1), out_label.flip(-1)
        return out_image, out_label

    def __repr__(self) -> str:
        return (
            f"TrainTransform(crop_size={self.crop_size}, scale_range={self.scale_range}, "
            f"scales={self.scales or 'uniform'}, flip={self.flip}, "
            f"jitter={self.jitter}, input {self.convention})"
        )


class EvalTransform:
    """Normalise the image (``normalize``: the convention's), keep the label; no resizing."""

    def __init__(self, convention: InputConvention = IMAGENET_CONVENTION):
        self.convention = _convention(convention)
        self.normalize = self.convention.normalize

    def __call__(self, image: Image.Image, label: Image.Image) -> tuple[Tensor, Tensor]:
        image_u8, label_t = to_tensor_pair(image, label)
        return self.normalize(image_u8), label_t

    def __repr__(self) -> str:
        return f"EvalTransform(input {self.convention})"


def build_train_transform(
    crop_size: int | Sequence[int],
    scale_range: tuple[float, float] = (0.5, 2.0),
    convention: InputConvention = IMAGENET_CONVENTION,
    flip: bool = True,
    jitter: float = 0.25,
    scale_step: float = 0.0,
) -> TrainTransform:
    """The training augmentation.

    Args:
        crop_size: output (height, width), or one int for a square crop.
        scale_range: the image is rescaled by a factor drawn uniformly from this range.
        scale_step: when positive, the factor is drawn uniformly from ``low, low + step, ..., high`` instead.
        convention: the model's input convention (channel order, scale, mean, std).
        flip: horizontal flip with probability 0.5.
        jitter: photometric jitter strength: brightness, contrast and saturation factors are drawn from
            ``[1 - jitter, 1 + jitter]``; 0 turns it off.
    """
    return TrainTransform(crop_size, scale_range, convention, flip, jitter, scale_step)


def build_eval_transform(convention: InputConvention = IMAGENET_CONVENTION) -> EvalTransform:
    """The evaluation transform: normalise only (the image keeps its size)."""
    return EvalTransform(convention)


def _convention(convention: InputConvention) -> InputConvention:
    if not isinstance(convention, InputConvention):
        raise TypeError(f"convention must be an InputConvention, got {type(convention).__name__}")
    return convention
