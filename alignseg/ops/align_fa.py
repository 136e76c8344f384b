"""AlignFA: aligned feature aggregation (AlignSeg, Huang et al., TPAMI 2021, Sec. 3.2).

``align_fa(low, high, offsets) = S(high, offsets[:, 0:2]) + S(low, offsets[:, 2:4])`` where ``S`` is
the shifted bilinear sampling of :mod:`alignseg.ops.sampling`. The coarse map ``high`` is upsampled
to ``low``'s size and shifted in one step ("learnable interpolation").
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import alert_nondeterministic, require_triton, select_backend
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


def align_fa_reference(low: Tensor, high: Tensor, offsets: Tensor) -> Tensor:
    """Eager PyTorch version of :func:`align_fa` (no argument checks), gathering the taps: the test oracle."""
    out = sample_reference(high, offsets[:, 0:2]) + sample_reference(low, offsets[:, 2:4])
    return out.contiguous(memory_format=output_memory_format(low))


def align_fa_grid_sample(low: Tensor, high: Tensor, offsets: Tensor) -> Tensor:
    """:func:`align_fa` through ``F.grid_sample`` (no argument checks): the fast eager path, the reference's values."""
    out = sample_grid_sample(high, offsets[:, 0:2]) + sample_grid_sample(low, offsets[:, 2:4])
    return out.contiguous(memory_format=output_memory_format(low))


# The eager formulations by backend name (alignseg.ops.backend.EAGER_BACKENDS); each takes checked arguments.
EAGER_ALIGN_FA = {"grid_sample": align_fa_grid_sample, "reference": align_fa_reference}


def _check_align_fa(low: Tensor, high: Tensor, offsets: Tensor) -> None:
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
    check_source_size("high", high, low.numel())


def align_fa(low: Tensor, high: Tensor, offsets: Tensor) -> Tensor:
    """Aligned feature aggregation: warp both maps by learned offsets and sum them.

    Args:
        low (Tensor[N, C, H, W]): the fine (low-level) feature map; sets the output size.
        high (Tensor[N, C, h, w]): the coarse (high-level) map, any h, w >= 1 (equal to H, W allowed).
        offsets (Tensor[N, 4, H, W]): pixel offsets on the output grid. Channels 0, 1 = (dx, dy) for
            ``high``, channels 2, 3 = (dx, dy) for ``low``. float32 or the features' dtype.

    Returns:
        Tensor[N, C, H, W]: ``S(high, offsets[:, 0:2]) + S(low, offsets[:, 2:4])`` in ``low``'s dtype
        and memory format (contiguous or channels_last).

    With zero offsets this is ``F.interpolate(high, (H, W), mode="bilinear", align_corners=True) + low``.
    Taps outside a map contribute zero; non-finite offsets give zero (see :mod:`alignseg.ops.sampling`).

    Example:
        >>> low, high = torch.randn(2, 8, 32, 32), torch.randn(2, 8, 16, 16)
        >>> align_fa(low, high, torch.zeros(2, 4, 32, 32)).shape
        torch.Size([2, 8, 32, 32])
    """
    _check_align_fa(low, high, offsets)
    backend = select_backend(low.device)
    if backend == "triton" and low.numel() > 0:  # an empty output (N, C, H or W of 0) needs no kernel
        return torch.ops.alignseg.align_fa_forward(low, high, offsets)
    return EAGER_ALIGN_FA.get(backend, align_fa_reference)(low, high, offsets)


# ----------------------------------------------------------------------------------------------
# Custom ops around the Triton kernels (alignseg.kernels.align_fa, imported on first use so that
# TRITON_INTERPRET is read then and alignseg imports without triton). The backward is its own op, so
# torch.compile sees both as opaque nodes with fake (meta) versions and traces them without a break.


@torch.library.custom_op("alignseg::align_fa_forward", mutates_args=())
def _align_fa_forward(low: Tensor, high: Tensor, offsets: Tensor) -> Tensor:
    require_triton(low.device)
    from alignseg.kernels.align_fa import align_fa_forward

    return align_fa_forward(low, high, offsets, out=empty_output(low))


@_align_fa_forward.register_fake
def _(low: Tensor, high: Tensor, offsets: Tensor) -> Tensor:
    return empty_output(low)


@torch.library.custom_op("alignseg::align_fa_backward", mutates_args=())
def _align_fa_backward(grad: Tensor, low: Tensor, high: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    require_triton(low.device)
    alert_nondeterministic("alignseg::align_fa_backward", low.device)
    from alignseg.kernels.align_fa import align_fa_backward

    return align_fa_backward(grad, low, high, offsets)


@_align_fa_backward.register_fake
def _(grad: Tensor, low: Tensor, high: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(low), torch.empty_like(high), torch.empty_like(offsets)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    low, high, offsets = ctx.saved_tensors
    return torch.ops.alignseg.align_fa_backward(grad, low, high, offsets)


_align_fa_forward.register_autograd(_backward, setup_context=_setup_context)
