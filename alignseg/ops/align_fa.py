"""AlignFA: aligned feature aggregation (AlignSeg, Huang et al., TPAMI 2021, Sec. 3.2).

With ``S`` the shifted bilinear sampling of :mod:`alignseg.ops.sampling`, ``U(high) = S(high, 0)`` the
bilinear align-corners upsampling of the coarse map to ``low``'s size (H, W), and ``W(x, d) = S(x, d)``
for a map ``x`` of that size (a warp; taps outside [0, H-1] x [0, W-1] contribute zero):

* ``align_fa(low, high, offsets)`` (``upsample_first=True``, the default) is the authors' function,
  ``W(U(high), offsets[:, 0:2]) + W(low, offsets[:, 2:4])``: their CAB upsamples ``high`` with
  ``F.interpolate(align_corners=True)`` and warps the result with ``F.grid_sample``. The Triton kernel
  evaluates ``U(high)`` at each in-range warp tap from the coarse map and never stores it.
* ``upsample_first=False`` is a variant, ``S(high, offsets[:, 0:2]) + S(low, offsets[:, 2:4])``: the
  coarse map is upsampled and shifted in one step. It equals the authors' function at zero offsets
  only: a bilinear sample of a bilinear upsampling is not a bilinear sample of the coarse map (unless
  (h-1)/(H-1) is a power of 1/2), and near the border a tap is zero on the coarse grid instead of on
  the upsampled one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import alert_nondeterministic, require_triton, resolve_backward, select_backend
from .sampling import (
    check_feature_map,
    check_offsets,
    check_same_device,
    check_source_size,
    empty_output,
    output_memory_format,
    sample_grid_sample,
    sample_reference,
)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def align_fa_reference(low: Tensor, high: Tensor, offsets: Tensor, upsample_first: bool = True) -> Tensor:
    """Eager PyTorch version of :func:`align_fa` (no argument checks): the oracle, four explicit gathers per sample.

    ``U(high)`` is :func:`sample_reference` at zero offsets, kept in fp32 (fp64) like the kernels' values.
    """
    if upsample_first:
        n, _, out_h, out_w = low.shape
        zero = torch.zeros(n, 2, out_h, out_w, dtype=_compute_dtype(high), device=high.device)
        upsampled = sample_reference(high.to(zero.dtype), zero)
        high_part = sample_reference(upsampled, offsets[:, 0:2]).to(high.dtype)
    else:
        high_part = sample_reference(high, offsets[:, 0:2])
    out = high_part + sample_reference(low, offsets[:, 2:4])
    return out.contiguous(memory_format=output_memory_format(low))


def align_fa_grid_sample(low: Tensor, high: Tensor, offsets: Tensor, upsample_first: bool = True) -> Tensor:
    """:func:`align_fa` through ``F.interpolate`` and ``F.grid_sample`` (no argument checks): the fast eager path.

    With ``upsample_first=True`` it is the authors' chain: ``F.interpolate(high, (H, W), mode="bilinear",
    align_corners=True)``, then a same-size ``F.grid_sample`` of it and of ``low`` (zero padding,
    align_corners=True) by the pixel offsets, added. Non-finite offsets follow the documented rule
    (:func:`~alignseg.ops.sampling.sample_grid_sample`), so it agrees with :func:`align_fa_reference`.
    """
    if low.numel() == 0:  # F.interpolate rejects empty maps; the gather form gives the empty result and gradients
        return align_fa_reference(low, high, offsets, upsample_first)
    if upsample_first:
        upsampled = F.interpolate(high.to(_compute_dtype(high)), size=low.shape[-2:], mode="bilinear",
                                  align_corners=True)
        high_part = sample_grid_sample(upsampled, offsets[:, 0:2]).to(high.dtype)
    else:
        high_part = sample_grid_sample(high, offsets[:, 0:2])
    out = high_part + sample_grid_sample(low, offsets[:, 2:4])
    return out.contiguous(memory_format=output_memory_format(low))


# The eager formulations by backend name (alignseg.ops.backend.EAGER_BACKENDS); each takes checked arguments.
EAGER_ALIGN_FA = {"grid_sample": align_fa_grid_sample, "reference": align_fa_reference}


def _check_align_fa(low: Tensor, high: Tensor, offsets: Tensor, upsample_first: bool) -> None:
    check_feature_map("low", low)
    check_feature_map("high", high)
    n, c, h, w = low.shape
    if high.shape[0] != n or high.shape[1] != c:
        raise ValueError(
            f"high must have the batch size and channels of low (N={n}, C={c}), got shape {list(high.shape)}"
        )
    if high.dtype != low.dtype:
        raise TypeError(f"high must have low's dtype {low.dtype}, got {high.dtype}")
    check_offsets("offsets", offsets, 4, n, (h, w), low.dtype)
    check_same_device(low=low, high=high, offsets=offsets)
    if not isinstance(upsample_first, bool):
        raise TypeError(f"upsample_first must be a bool, got {type(upsample_first).__name__}")
    check_source_size("high", high, low.numel())


def align_fa(low: Tensor, high: Tensor, offsets: Tensor, upsample_first: bool = True) -> Tensor:
    """Aligned feature aggregation: warp both maps by learned offsets and sum them.

    Args:
        low (Tensor[N, C, H, W]): the fine (low-level) feature map; sets the output size.
        high (Tensor[N, C, h, w]): the coarse (high-level) map, any h, w >= 1 (equal to H, W allowed).
        offsets (Tensor[N, 4, H, W]): pixel offsets on the output grid. Channels 0, 1 = (dx, dy) for
            ``high``, channels 2, 3 = (dx, dy) for ``low``. float32 or the features' dtype.
        upsample_first (bool): ``True`` (default): the authors' function, warp the upsampled ``high``;
            ``False``: the one-step variant, sample ``high`` directly (see the module docstring).

    Returns:
        Tensor[N, C, H, W]: ``W(U(high), offsets[:, 0:2]) + W(low, offsets[:, 2:4])`` (or
        ``S(high, offsets[:, 0:2]) + S(low, offsets[:, 2:4])``) in ``low``'s dtype and memory format
        (contiguous or channels_last).

    With zero offsets both forms are ``F.interpolate(high, (H, W), mode="bilinear", align_corners=True) + low``.
    Taps outside a map contribute zero; non-finite offsets give zero (see :mod:`alignseg.ops.sampling`).

    Example:
        >>> low, high = torch.randn(2, 8, 32, 32), torch.randn(2, 8, 16, 16)
        >>> align_fa(low, high, torch.zeros(2, 4, 32, 32)).shape
        torch.Size([2, 8, 32, 32])
    """
    _check_align_fa(low, high, offsets, upsample_first)
    backend = select_backend(low.device)
    if backend == "triton" and low.numel() > 0:  # an empty output (N, C, H or W of 0) needs no kernel
        return torch.ops.alignseg.align_fa_forward(low, high, offsets, upsample_first)
    return EAGER_ALIGN_FA.get(backend, align_fa_reference)(low, high, offsets, upsample_first)


# ----------------------------------------------------------------------------------------------
# Custom ops around the Triton kernels (alignseg.kernels.align_fa, imported on first use so that
# TRITON_INTERPRET is read then and alignseg imports without triton). The backward is its own op, so
# torch.compile sees both as opaque nodes with fake (meta) versions and traces them without a break.


@torch.library.custom_op("alignseg::align_fa_forward", mutates_args=())
def _align_fa_forward(low: Tensor, high: Tensor, offsets: Tensor, upsample_first: bool = True) -> Tensor:
    require_triton(low.device)
    from alignseg.kernels.align_fa import align_fa_forward

    return align_fa_forward(low, high, offsets, out=empty_output(low), upsample_first=upsample_first)


@_align_fa_forward.register_fake
def _(low: Tensor, high: Tensor, offsets: Tensor, upsample_first: bool = True) -> Tensor:
    return empty_output(low)


@torch.library.custom_op("alignseg::align_fa_backward", mutates_args=())
def _align_fa_backward(
    grad: Tensor, low: Tensor, high: Tensor, offsets: Tensor, upsample_first: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of (low, high, offsets), by the path of :func:`alignseg.ops.backend.resolve_backward`.

    ``atomic`` (default outside deterministic mode): one kernel, the source gradients scattered with float
    atomic adds into zeroed fp32/fp64 buffers. ``gather`` (deterministic mode): the pixel bins, then one launch
    of :mod:`alignseg.kernels.align_fa_gather` for all three gradients. ``fixed_point``: the per-pixel kernel
    writes the offsets' gradient only, a scatter with int64 fixed-point atomics
    (:mod:`alignseg.kernels.fixed_point`) the source gradients. Both deterministic paths are bitwise
    reproducible.
    """
    require_triton(low.device)
    path = resolve_backward()
    if path == "atomic":
        alert_nondeterministic("alignseg::align_fa_backward", low.device)
    from alignseg.kernels.launch import stage_channels_last
    from alignseg.kernels.relayout import relayout_like, to_channels_last

    # Contiguous maps: the kernels run on channels_last copies, and the source gradients go back to the inputs'
    # layouts (launch.stage_channels_last says why).
    staged = stage_channels_last(low)
    grad_k, low_k, high_k = (to_channels_last(t) if staged else t for t in (grad, low, high))
    if path == "atomic":
        from alignseg.kernels.align_fa import align_fa_backward

        return align_fa_backward(grad_k, low_k, high_k, offsets, upsample_first=upsample_first,
                                 sources_like=(low, high))
    if path == "gather":
        from alignseg.kernels.align_fa_gather import align_fa_backward_deterministic

        grad_low, grad_high, grad_offsets = align_fa_backward_deterministic(grad_k, low_k, high_k, offsets,
                                                                            upsample_first=upsample_first)
    else:
        from alignseg.kernels.align_fa import align_fa_offsets_backward, align_fa_sources_fixed_point

        grad_offsets = align_fa_offsets_backward(grad_k, low_k, high_k, offsets, upsample_first=upsample_first)
        grad_low, grad_high = align_fa_sources_fixed_point(grad_k, low_k, high_k, offsets,
                                                           upsample_first=upsample_first)
    return relayout_like(grad_low, low), relayout_like(grad_high, high), grad_offsets


@_align_fa_backward.register_fake
def _(grad: Tensor, low: Tensor, high: Tensor, offsets: Tensor,
      upsample_first: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(low), torch.empty_like(high), torch.empty_like(offsets)


def _setup_context(ctx, inputs, output) -> None:
    low, high, offsets, upsample_first = inputs
    ctx.save_for_backward(low, high, offsets)
    ctx.upsample_first = upsample_first


def _backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
    low, high, offsets = ctx.saved_tensors
    return (*torch.ops.alignseg.align_fa_backward(grad, low, high, offsets, ctx.upsample_first), None)


_align_fa_forward.register_autograd(_backward, setup_context=_setup_context)
