"""The sampling rule shared by AlignFA and AlignCM, in eager PyTorch, plus the argument checks.

``S(src, d)`` samples a map ``src`` of size (h, w) onto an output grid of size (H, W) at positions
shifted by ``d`` (pixels of the *output* grid; channel 0 = dx along the width, 1 = dy along the
height)::

    S(src, d)[n, c, i, j] = bilinear(src[n, c], y = (i + d[n, 1, i, j]) * sy, x = (j + d[n, 0, i, j]) * sx)
    sy = (h - 1) / (H - 1)   (0 when H == 1),   sx likewise

``bilinear`` weighs the four integer neighbours of (y, x); a neighbour outside the map contributes
zero. This is ``F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=True)``, and with
d = 0 it is ``F.interpolate(mode="bilinear", align_corners=True)``. AlignCM and the one-step AlignFA
variant sample a coarse source with ``S`` directly; the default AlignFA warps its upsampled map
(:mod:`alignseg.ops.align_fa`).

Non-finite positions: a NaN coordinate gives zero (as if it lay outside the map) and receives no
gradient; +-inf lie outside the map and give zero. Coordinates are clamped to [-2, size + 1] before
the taps are found, which changes neither value nor gradient (every tap there is already outside)
but keeps the integer conversion of huge offsets safe. The Triton kernels follow the same rule.

The reference gathers the four taps explicitly rather than calling ``grid_sample``: it is then an
oracle independent of ``grid_sample`` (tests compare the two), and it computes in fp32 (fp64 for fp64
inputs) like the kernels' accumulators. :func:`sample_grid_sample` is the fast eager formulation (the
CPU path): it sanitises the positions exactly as the reference does and hands them to ``grid_sample``,
so values, gradients and the NaN rule match the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _align_corners_scale(src_size: int, out_size: int) -> float:
    return (src_size - 1) / (out_size - 1) if out_size > 1 else 0.0


def sample_positions(src: Tensor, offsets: Tensor, compute: torch.dtype) -> tuple[Tensor, Tensor]:
    """Source coordinates (x, y), each ``Tensor[N, H, W]`` in ``compute``, of ``S(src, offsets)``.

    NaN -> -2 (outside), +-inf -> the clamp bounds (outside): see the module docstring.
    """
    h, w = src.shape[-2:]
    out_h, out_w = offsets.shape[-2:]
    d = offsets.to(compute)
    cols = torch.arange(out_w, device=src.device, dtype=compute)
    rows = torch.arange(out_h, device=src.device, dtype=compute).unsqueeze(-1)
    x = (cols + d[:, 0]) * _align_corners_scale(w, out_w)
    y = (rows + d[:, 1]) * _align_corners_scale(h, out_h)
    x = torch.nan_to_num(x, nan=-2.0).clamp(-2.0, w + 1.0)
    y = torch.nan_to_num(y, nan=-2.0).clamp(-2.0, h + 1.0)
    return x, y


def sample_reference(src: Tensor, offsets: Tensor) -> Tensor:
    """``S(src, offsets)``: src ``Tensor[N, C, h, w]``, offsets ``Tensor[N, 2, H, W]`` -> ``Tensor[N, C, H, W]``.

    Differentiable in both arguments. Returns a contiguous tensor of ``src``'s dtype.
    """
    n, c, h, w = src.shape
    out_h, out_w = offsets.shape[-2:]
    compute = torch.promote_types(src.dtype, torch.float32)
    x, y = sample_positions(src, offsets, compute)
    x0f, y0f = x.floor(), y.floor()
    fx, fy = x - x0f, y - y0f  # floor has zero gradient, so d(fx)/dx = 1
    x0, y0 = x0f.long(), y0f.long()

    flat = src.to(compute).reshape(n, c, h * w)
    out = None
    for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
        for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
            inside = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
            index = yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)
            index = index.reshape(n, 1, out_h * out_w).expand(n, c, out_h * out_w)
            tap = flat.gather(2, index).reshape(n, c, out_h, out_w)
            term = tap * (wx * wy * inside).unsqueeze(1)
            out = term if out is None else out + term
    return out.to(src.dtype)


def sample_grid_sample(src: Tensor, offsets: Tensor) -> Tensor:
    """``S(src, offsets)`` through ``F.grid_sample``: the fast eager formulation (the CPU path).

    The positions are those of :func:`sample_reference` (NaN and infinity sanitised, then clamped), so
    the value, every gradient and the NaN rule agree with the reference to rounding. Returns a tensor of
    ``src``'s dtype.

    ``grid_sample`` takes coordinates normalised to [-1, 1]. With ``align_corners=True`` it scales them back
    by (size - 1) / 2, and a whole-pixel position (zero or integer offsets) can come back an ulp below the
    pixel, which moves the one-sided offset gradient to the other side. With ``align_corners=False`` the
    scale is size / 2, exact when the size is a power of two: so the pixel position x is passed as
    (2x + 1) / size - 1 (the same pixel), and a source of another size is first zero-padded on the right
    and bottom to a power of two (padding reads as zeros, as outside taps do).
    """
    h, w = src.shape[-2:]
    compute = torch.promote_types(src.dtype, torch.float32)
    x, y = sample_positions(src, offsets, compute)
    padded_h, padded_w = _next_power_of_two(h), _next_power_of_two(w)
    source = src.to(compute)
    if (padded_h, padded_w) != (h, w):
        source = F.pad(source, (0, padded_w - w, 0, padded_h - h))
    grid = torch.stack(((2.0 * x + 1.0) / padded_w - 1.0, (2.0 * y + 1.0) / padded_h - 1.0), dim=-1)
    out = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.to(src.dtype)


def _next_power_of_two(size: int) -> int:
    """The smallest power of two >= size (``triton.next_power_of_2`` without importing triton)."""
    return 1 << max(size - 1, 0).bit_length()


# ----------------------------------------------------------------------------------------------
# Argument checks shared by the public ops: each names the argument and what was expected.


def check_feature_map(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be a 4-D tensor [N, C, H, W], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16 or float64), "
                        f"got {t.dtype}")
    return t


def check_source_size(name: str, src: Tensor, output_numel: int) -> None:
    """A map that is sampled needs a pixel, unless the output is empty (N, C, H or W of 0) anyway."""
    if output_numel and src.shape[-2] * src.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one pixel to sample, got shape {tuple(src.shape)}")


def check_offsets(name: str, offsets: object, channels: int, n: int, size: tuple[int, int],
                  feature_dtype: torch.dtype) -> Tensor:
    if not isinstance(offsets, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(offsets).__name__}")
    expected = (n, channels, *size)
    if offsets.dim() != 4 or tuple(offsets.shape) != expected:
        raise ValueError(f"{name} must have shape {list(expected)} (N, {channels} offset channels, H, W), "
                         f"got {list(offsets.shape)}")
    if offsets.dtype not in (torch.float32, feature_dtype):
        raise TypeError(f"{name} must be float32 or the features' dtype {feature_dtype}, got {offsets.dtype}")
    return offsets


def check_same_device(**tensors: Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def output_memory_format(t: Tensor) -> torch.memory_format:
    """channels_last when ``t`` is (and is not also trivially contiguous), else contiguous."""
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def empty_output(t: Tensor) -> Tensor:
    """An uninitialised tensor shaped like ``t`` in :func:`output_memory_format` of ``t``."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=output_memory_format(t))
