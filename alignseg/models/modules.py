"""Building blocks of the AlignSeg decoder: RRB, the offset head, AlignFA, AlignCM and the heads.

Each block owns its parameters and initialisation and calls only :mod:`alignseg.ops` for the
alignment itself. Offsets are in pixels of the output (fine) grid, channel 0 = dx, 1 = dy, and every
upsampling is bilinear with ``align_corners=True``: the convention of the ops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignseg.ops import align_cm, align_fa

from .resnet import NormLayer, init_weights

ActLayer = Callable[[], nn.Module]

# The authors' InPlaceABNSync defaults to leaky ReLU with slope 0.01 after every decoder norm.
ACTIVATIONS: dict[str, ActLayer] = {
    "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True),
    "relu": lambda: nn.ReLU(inplace=True),
}


def activation_layer(name: str) -> ActLayer:
    """The activation factory called ``name`` (one of :data:`ACTIVATIONS`)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


def upsample(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear resize with ``align_corners=True`` (the convention of the alignment ops)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


def match_dtype(features: Tensor, source: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """``source`` in the dtype of ``features``, and ``offsets`` too unless fp32: what the alignment ops accept.

    Under CUDA autocast the bilinear upsample runs in fp32 while convolutions give bf16/fp16, so a map
    that went through an upsample reaches the op in another dtype than its partner.
    """
    if source.dtype != features.dtype:
        source = source.to(features.dtype)
    if offsets.dtype not in (torch.float32, features.dtype):
        offsets = offsets.to(features.dtype)
    return source, offsets


class ConvNormAct(nn.Sequential):
    """Convolution (no bias: a norm follows), normalisation, activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm_layer: NormLayer, act_layer: ActLayer):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            norm_layer(out_channels),
            act_layer(),
        )
        init_weights(self)


class RRB(nn.Module):
    """Residual refinement block: 1x1 conv to ``channels``, then ``act(norm(x + residual(x)))``.

    The residual branch is 3x3 conv to ``channels // 4``, norm, act, 3x3 conv back to ``channels``.
    """

    def __init__(self, in_channels: int, channels: int, norm_layer: NormLayer, act_layer: ActLayer):
        super().__init__()
        bottleneck = max(channels // 4, 1)
        self.unify = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.residual = nn.Sequential(
            ConvNormAct(channels, bottleneck, 3, norm_layer, act_layer),
            nn.Conv2d(bottleneck, channels, 3, padding=1, bias=False),
        )
        self.norm = norm_layer(channels)
        self.act = act_layer()
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.unify(x)
        return self.act(self.norm(x + self.residual(x)))


class OffsetHead(nn.Module):
    """Predicts a (dx, dy) offset field from a fine map and a coarse map of ``channels`` each.

    1x1 conv (``2 * channels -> hidden``, no bias) of ``[fine, upsample(coarse)]``, norm, act, then a 3x3
    conv (``hidden -> 2``, no bias) whose weights start at zero, so the offsets start at zero.

    With ``concat=False`` (default) the 1x1 conv is split into its ``fine`` and ``coarse`` halves and the
    coarse half runs at the coarse size before upsampling: a 1x1 conv and a bilinear upsample commute,
    so the result is the same without building the upsampled ``channels``-wide map. ``concat=True`` is
    the authors' form (concatenate, then convolve). Both forms use the same weight tensor, so one
    checkpoint serves both.
    """

    def __init__(self, channels: int, hidden: int, norm_layer: NormLayer, act_layer: ActLayer, concat: bool = False):
        super().__init__()
        self.channels = channels
        self.concat = concat
        self.reduce = nn.Conv2d(2 * channels, hidden, 1, bias=False)
        self.norm = norm_layer(hidden)
        self.act = act_layer()
        self.predict = nn.Conv2d(hidden, 2, 3, padding=1, bias=False)
        init_weights(self)
        nn.init.zeros_(self.predict.weight)

    def forward(self, fine: Tensor, coarse: Tensor) -> Tensor:
        size = fine.shape[-2:]
        if self.concat:
            if coarse.shape[-2:] != size:
                coarse = upsample(coarse, size)
            x = self.reduce(torch.cat([fine, coarse], dim=1))
        else:
            weight = self.reduce.weight
            x_coarse = F.conv2d(coarse, weight[:, self.channels:])
            if coarse.shape[-2:] != size:
                x_coarse = upsample(x_coarse, size)
            x = F.conv2d(fine, weight[:, : self.channels]) + x_coarse
        return self.predict(self.act(self.norm(x)))

    def extra_repr(self) -> str:
        return f"form={'concat' if self.concat else 'split'}"


class AlignFA(nn.Module):
    """Aligned feature aggregation of a fine map ``low`` and a coarse map ``high`` (paper Sec. 3.2).

    Two offset heads predict ``delta_high`` and ``delta_low`` from ``[low, upsample(high)]``; the output
    is ``align_fa(low, high, [delta_high, delta_low])``, which upsamples and shifts ``high`` in one step.

    With ``upsample_high_first=True`` the module follows the authors' released code instead: ``high``
    is upsampled to ``low``'s size first, the offset heads convolve the concatenation, and the
    upsampled map is warped at full size. The offsets are the same as in the default form (same
    weights), and so is the output at zero offsets; at non-zero offsets the two differ slightly,
    because bilinear sampling of a bilinearly upsampled map is not bilinear sampling of the map.
    """

    def __init__(self, channels: int, norm_layer: NormLayer, act_layer: ActLayer, hidden: int | None = None,
                 upsample_high_first: bool = False):
        super().__init__()
        hidden = channels if hidden is None else hidden
        self.upsample_high_first = upsample_high_first
        self.offset_high = OffsetHead(channels, hidden, norm_layer, act_layer, concat=upsample_high_first)
        self.offset_low = OffsetHead(channels, hidden, norm_layer, act_layer, concat=upsample_high_first)

    def forward(self, low: Tensor, high: Tensor, return_offsets: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``low`` Tensor[N, C, H, W], ``high`` Tensor[N, C, h, w] -> Tensor[N, C, H, W].

        With ``return_offsets=True`` also returns the offsets Tensor[N, 4, H, W]
        (channels 0, 1 = (dx, dy) of ``high``; 2, 3 = (dx, dy) of ``low``).
        """
        if self.upsample_high_first:
            high = upsample(high, low.shape[-2:])
        offsets = torch.cat([self.offset_high(low, high), self.offset_low(low, high)], dim=1)
        high, offsets = match_dtype(low, high, offsets)
        out = align_fa(low, high, offsets)
        return (out, offsets) if return_offsets else out

    def extra_repr(self) -> str:
        return f"upsample_high_first={self.upsample_high_first}"


class AlignCM(nn.Module):
    """Aligned context modelling on the last backbone map (paper Sec. 3.3).

    A context branch (adaptive average pool to ``pool_size`` x ``pool_size``, 1x1 conv ``in -> in`` +
    norm + act, 3x3 conv ``in -> out`` + norm + act) and a local branch (the same layers, own weights,
    on the full map); an offset head on ``[local, upsample(context)]``; the output is
    ``align_cm(context, offsets, local)``: each pixel adds the pooled context sampled at its own
    learned position.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_layer: NormLayer, act_layer: ActLayer,
                 pool_size: int = 3, hidden: int | None = None, concat: bool = False):
        super().__init__()
        if not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"pool_size must be a positive int, got {pool_size!r}")
        hidden = out_channels if hidden is None else hidden
        self.pool_size = pool_size
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.context = nn.Sequential(
            ConvNormAct(in_channels, in_channels, 1, norm_layer, act_layer),
            ConvNormAct(in_channels, out_channels, 3, norm_layer, act_layer),
        )
        self.local = nn.Sequential(
            ConvNormAct(in_channels, in_channels, 1, norm_layer, act_layer),
            ConvNormAct(in_channels, out_channels, 3, norm_layer, act_layer),
        )
        self.offset = OffsetHead(out_channels, hidden, norm_layer, act_layer, concat=concat)

    def forward(self, x: Tensor, return_offsets: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """``x`` Tensor[N, C_in, H, W] -> Tensor[N, C_out, H, W] (and the offsets Tensor[N, 2, H, W])."""
        context = self.context(self.pool(x))
        local = self.local(x)
        offsets = self.offset(local, context)
        context, offsets = match_dtype(local, context, offsets)
        out = align_cm(context, offsets, local)
        return (out, offsets) if return_offsets else out

    def extra_repr(self) -> str:
        return f"pool_size={self.pool_size}"


class SegHead(nn.Sequential):
    """3x3 conv + norm + act + Dropout2d + 1x1 conv to class scores (main and auxiliary heads)."""

    def __init__(self, in_channels: int, num_classes: int, norm_layer: NormLayer, act_layer: ActLayer, dropout: float = 0.1):
        super().__init__(
            ConvNormAct(in_channels, in_channels, 3, norm_layer, act_layer),
            nn.Dropout2d(dropout),
            nn.Conv2d(in_channels, num_classes, 1, bias=True),
        )
        init_weights(self)
