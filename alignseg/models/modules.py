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


OFFSET_CONVENTIONS = ("pixels", "authors")


def check_offset_convention(offset_convention: str) -> str:
    """``offset_convention`` if it is one of :data:`OFFSET_CONVENTIONS`, else a ValueError naming it."""
    if offset_convention not in OFFSET_CONVENTIONS:
        raise ValueError(f"offset_convention must be one of {list(OFFSET_CONVENTIONS)}, got {offset_convention!r}")
    return offset_convention


def scale_offsets(offsets: Tensor, scale_x: float, scale_y: float) -> Tensor:
    """``offsets`` Tensor[N, 2k, H, W] of (dx, dy) pairs with every dx times ``scale_x``, every dy times ``scale_y``.

    One elementwise multiply by shape-derived constants (torch.compile fuses it); keeps the memory format.
    """
    pairs = offsets.shape[1] // 2
    return offsets * offsets.new_tensor([scale_x, scale_y] * pairs).view(1, 2 * pairs, 1, 1)


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

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, norm_layer: NormLayer, act_layer: ActLayer
    ):
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


ALIGN_FA_FORMS = ("exact", "one_step")


class AlignFA(nn.Module):
    """Aligned feature aggregation of a fine map ``low`` and a coarse map ``high`` (paper Sec. 3.2).

    Two offset heads predict ``delta_high`` and ``delta_low`` from ``[low, upsample(high)]``; the output
    is ``align_fa(low, high, [delta_high, delta_low], upsample_first=...)`` on the coarse ``high``:

    * ``form="exact"`` (default): the authors' function, ``upsample(high)`` warped by ``delta_high`` plus
      ``low`` warped by ``delta_low`` (:func:`~alignseg.ops.align_fa` with ``upsample_first=True``), fused:
      the upsampled map is never built, and the offset heads run split (:class:`OffsetHead`).
    * ``form="one_step"``: a variant that samples the coarse map directly (``upsample_first=False``). It
      equals the authors' function at zero offsets only; with offsets of a few pixels the outputs differ
      by a sizeable fraction of their magnitude (a warp of a bilinear upsampling is not a bilinear
      sample of the coarse map; near the border a tap falls outside the coarse map, not the upsampled one).

    ``upsample_high_first=True`` runs the authors' code literally instead: ``high`` is upsampled first,
    the offset heads convolve the concatenation, and the upsampled map is warped at full size. It
    computes the same function as ``form="exact"`` (the check that the fused form is the authors'), so
    it cannot be combined with ``form="one_step"``. Every form has the same parameters: one checkpoint
    serves all.

    ``offset_convention`` says what unit the offset heads predict. ``"pixels"`` (default): pixels of the
    output grid, the ops' convention. ``"authors"``: the unit of the released AlignSeg checkpoints
    (``speedinghzl/AlignSeg`` ``networks/alignseg.py`` before their issue #7 fix, PyTorch 1.2 ``grid_sample``
    = ``align_corners=True``): the sampled map is the (upsampled) H x W map, and the head's channel 0 is
    added to the normalised x coordinate divided by the sampled map's *height*, channel 1 to normalised y
    divided by its *width* (``norm = [h, w]`` against a grid ordered (x, y)). A normalised step of 1 is
    ``(W - 1) / 2`` pixels in x, so both warps (``high`` and ``low``, same H x W) get, before the op::

        dx = d0 * (W - 1) / (2 * H),    dy = d1 * (H - 1) / (2 * W)

    These factors depend on the runtime size, so they cannot be folded into the conv weights.
    """

    def __init__(self, channels: int, norm_layer: NormLayer, act_layer: ActLayer, hidden: int | None = None,
                 upsample_high_first: bool = False, form: str = "exact", offset_convention: str = "pixels"):
        super().__init__()
        if form not in ALIGN_FA_FORMS:
            raise ValueError(f"form must be one of {ALIGN_FA_FORMS}, got {form!r}")
        if upsample_high_first and form != "exact":
            raise ValueError(
                f"upsample_high_first=True computes the authors' (exact) form; it cannot use form={form!r}"
            )
        hidden = channels if hidden is None else hidden
        self.upsample_high_first = upsample_high_first
        self.form = form
        self.offset_convention = check_offset_convention(offset_convention)
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
        if self.offset_convention == "authors":
            out_h, out_w = low.shape[-2:]
            offsets = scale_offsets(offsets, (out_w - 1) / (2 * out_h), (out_h - 1) / (2 * out_w))
        high, offsets = match_dtype(low, high, offsets)
        out = align_fa(low, high, offsets, upsample_first=self.form == "exact")
        return (out, offsets) if return_offsets else out

    def extra_repr(self) -> str:
        return (f"form={self.form}, upsample_high_first={self.upsample_high_first}, "
                f"offset_convention={self.offset_convention}")


class AlignCM(nn.Module):
    """Aligned context modelling on the last backbone map (paper Sec. 3.3).

    A context branch (adaptive average pool to ``pool_size`` x ``pool_size``, 1x1 conv ``in -> in`` +
    norm + act, 3x3 conv ``in -> out`` + norm + act) and a local branch (the same layers, own weights,
    on the full map); an offset head on ``[local, upsample(context)]``; the output is
    ``align_cm(context, offsets, local)``: each pixel adds the pooled context sampled at its own
    learned position.

    ``offset_convention="authors"`` reads the offset head in the unit of the released checkpoints (see
    :class:`AlignFA`): the sampled map is the p x p context, so channel 0 is normalised x divided by p
    (its height), channel 1 normalised y divided by p (its width). Context pixel x = j * (p - 1) / (W - 1)
    + d0 * (p - 1) / (2 * p), i.e. in pixels of the H x W output grid, before the op::

        dx = d0 * (W - 1) / (2 * p),    dy = d1 * (H - 1) / (2 * p)

    (non-square context: x divides by its height, y by its width). On an output of width 1 (or height 1)
    the op pins x (y) to 0 while the authors' grid still moves it, so that case is an error.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_layer: NormLayer, act_layer: ActLayer,
                 pool_size: int = 3, hidden: int | None = None, concat: bool = False,
                 offset_convention: str = "pixels"):
        super().__init__()
        if not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"pool_size must be a positive int, got {pool_size!r}")
        hidden = out_channels if hidden is None else hidden
        self.pool_size = pool_size
        self.offset_convention = check_offset_convention(offset_convention)
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
        if self.offset_convention == "authors":
            (ctx_h, ctx_w), (out_h, out_w) = context.shape[-2:], local.shape[-2:]
            if (out_h == 1 and ctx_h > 1) or (out_w == 1 and ctx_w > 1):
                raise ValueError(
                    f"offset_convention='authors' needs an AlignCM input of at least 2 x 2 (the op cannot move "
                    f"along an axis of size 1 as the authors' grid does), got {out_h} x {out_w}"
                )
            offsets = scale_offsets(offsets, (out_w - 1) / (2 * ctx_h), (out_h - 1) / (2 * ctx_w))
        context, offsets = match_dtype(local, context, offsets)
        out = align_cm(context, offsets, local)
        return (out, offsets) if return_offsets else out

    def extra_repr(self) -> str:
        return f"pool_size={self.pool_size}, offset_convention={self.offset_convention}"


class SegHead(nn.Sequential):
    """3x3 conv + norm + act + Dropout2d + 1x1 conv to class scores (main and auxiliary heads)."""

    def __init__(
        self, in_channels: int, num_classes: int, norm_layer: NormLayer, act_layer: ActLayer, dropout: float = 0.1
    ):
        super().__init__(
            ConvNormAct(in_channels, in_channels, 3, norm_layer, act_layer),
            nn.Dropout2d(dropout),
            nn.Conv2d(in_channels, num_classes, 1, bias=True),
        )
        init_weights(self)
