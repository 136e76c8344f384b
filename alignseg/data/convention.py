"""The input convention of a network: how an RGB uint8 photo becomes the float tensor the weights expect.

A network trained on ImageNet-initialised weights expects the channel order, value scale, mean and std of
its training; feeding it anything else gives confident nonsense, not an error. :class:`InputConvention`
records the four facts (as timm's ``default_cfg`` records ``mean``/``std``), applies them
(:meth:`InputConvention.normalize`) and round-trips through plain dicts, so it can travel in a checkpoint.
This module imports only torch, so models, data and the API can all use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB, in [0, 1] units
IMAGENET_STD = (0.229, 0.224, 0.225)
_CHANNEL_ORDERS = ("RGB", "BGR")


@dataclass(frozen=True)
class InputConvention:
    """``normalize(x) = (x[channel_order] * scale - mean) / std``, per channel.

    Attributes:
        channel_order: ``"RGB"`` or ``"BGR"``: the order the network expects (photos are read as RGB).
        scale: multiplies the uint8 values first (``1/255`` gives [0, 1]).
        mean, std: per channel, in the order ``channel_order``, in the units after ``scale``.
    """

    channel_order: str = "RGB"
    scale: float = 1 / 255
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if self.channel_order not in _CHANNEL_ORDERS:
            raise ValueError(f"channel_order must be one of {_CHANNEL_ORDERS}, got {self.channel_order!r}")
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool) or not self.scale > 0:
            raise ValueError(f"scale must be a positive number, got {self.scale!r}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if (
                not isinstance(values, (tuple, list))
                or len(values) != 3
                or not all(isinstance(v, (int, float)) for v in values)
            ):
                raise ValueError(f"{name} must be 3 numbers, one per channel, got {values!r}")
            object.__setattr__(self, name, tuple(float(v) for v in values))
        if not all(s > 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        object.__setattr__(self, "scale", float(self.scale))

    def normalize(self, image: Tensor) -> Tensor:
        """``uint8 Tensor[..., 3, H, W]`` RGB -> ``float32 Tensor[..., 3, H, W]`` as the network expects."""
        if not isinstance(image, Tensor) or image.dtype != torch.uint8:
            what = image.dtype if isinstance(image, Tensor) else type(image).__name__
            raise TypeError(f"image must be a uint8 tensor of RGB values 0..255, got {what}")
        _check_channels(image)
        x = image.float()
        divisor = 1 / self.scale
        # 1/255: divide, as torchvision does (x * (1/255) can differ from x / 255 in the last bit)
        if abs(divisor - round(divisor)) < 1e-9:
            x = x / round(divisor) if divisor != 1 else x
        else:
            x = x * self.scale
        return self._standardize(x)

    def normalize_unit(self, image: Tensor) -> Tensor:
        """:meth:`normalize` for a float RGB image already in [0, 1] (e.g. after photometric jitter)."""
        if not isinstance(image, Tensor) or not image.is_floating_point():
            what = image.dtype if isinstance(image, Tensor) else type(image).__name__
            raise TypeError(f"image must be a float tensor of RGB values in [0, 1], got {what}")
        _check_channels(image)
        factor = 255 * self.scale
        return self._standardize(image.float() if abs(factor - 1) < 1e-12 else image.float() * factor)

    def _standardize(self, x: Tensor) -> Tensor:
        if self.channel_order == "BGR":
            x = x.flip(-3)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(3, 1, 1)
        return (x - mean) / std

    def __str__(self) -> str:
        scale = "x1/255" if abs(self.scale * 255 - 1) < 1e-12 else f"x{self.scale:g}"
        numbers = lambda values: "(" + ", ".join(f"{v:.6g}" for v in values) + ")"  # noqa: E731
        return f"{self.channel_order} {scale}, mean {numbers(self.mean)}, std {numbers(self.std)}"

    def to_dict(self) -> dict[str, Any]:
        """Plain values (str, float, lists), safe for ``torch.save(weights_only=True)``, JSON and YAML."""
        return {
            "channel_order": self.channel_order,
            "scale": self.scale,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> InputConvention:
        """The inverse of :meth:`to_dict`; unknown or missing keys raise ``ValueError`` naming them."""
        if not isinstance(values, Mapping):
            raise TypeError(f"an input convention must be a mapping, got {type(values).__name__}")
        expected = {"channel_order", "scale", "mean", "std"}
        if set(values) != expected:
            missing, unknown = sorted(expected - set(values)), sorted(set(values) - expected)
            raise ValueError(f"input convention keys must be {sorted(expected)}: missing {missing}, unknown {unknown}")
        return cls(values["channel_order"], values["scale"], tuple(values["mean"]), tuple(values["std"]))


def _check_channels(image: Tensor) -> None:
    if image.ndim < 3 or image.shape[-3] != 3:
        raise ValueError(f"image must have shape [..., 3, H, W] (RGB channels first), got {tuple(image.shape)}")


IMAGENET_CONVENTION = InputConvention()  # RGB, 1/255, ImageNet mean and std: every preset of this project

# The authors' (speedinghzl/AlignSeg): cv2.imread gives BGR (dataset/datasets.py L175), float32 in 0..255 minus
# IMG_MEAN (L182-183; IMG_MEAN in evaluate.py L27 and train.py L30, BGR order), no division by a std.
AUTHORS_CONVENTION = InputConvention("BGR", 1.0, (104.00698793, 116.66876762, 122.67891434), (1.0, 1.0, 1.0))
