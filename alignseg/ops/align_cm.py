"""AlignCM: aligned context modelling (AlignSeg, Huang et al., TPAMI 2021, Sec. 3.3).

``align_cm(context, offsets, local) = S(context, offsets) + local``: every pixel samples the small
pooled context map (3x3 in the paper) at its own learned position, see :mod:`alignseg.ops.sampling`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import require_triton, select_backend
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


def align_cm_reference(context: Tensor, offsets: Tensor, local: Tensor) -> Tensor:
    """Eager PyTorch version of :func:`align_cm` (no argument checks), gathering the taps: the test oracle."""
    out = sample_reference(context, offsets) + local
    return out.contiguous(memory_format=output_memory_format(local))


def align_cm_grid_sample(context: Tensor, offsets: Tensor, local: Tensor) -> Tensor:
    """:func:`align_cm` through ``F.grid_sample`` (no argument checks): the fast eager path, the reference's values."""
    out = sample_grid_sample(context, offsets) + local
    return out.contiguous(memory_format=output_memory_format(local))


# The eager formulations by backend name (alignseg.ops.backend.EAGER_BACKENDS); each takes checked arguments.
EAGER_ALIGN_CM = {"grid_sample": align_cm_grid_sample, "reference": align_cm_reference}


def _check_align_cm(context: Tensor, offsets: Tensor, local: Tensor) -> None:
    check_feature_map("context", context)
    check_feature_map("local", local)
    n, c, h, w = local.shape
    if context.shape[0] != n or context.shape[1] != c:
        raise ValueError(
            f"context must have the batch size and channels of local (N={n}, C={c}), got shape {list(context.shape)}"
        )
    if context.dtype != local.dtype:
        raise TypeError(f"context must have local's dtype {local.dtype}, got {context.dtype}")
    check_offsets("offsets", offsets, 2, n, (h, w), local.dtype)
    check_same_device(context=context, offsets=offsets, local=local)
    check_source_size("context", context, local.numel())


def align_cm(context: Tensor, offsets: Tensor, local: Tensor) -> Tensor:
    """Aligned context: each pixel adds the context sampled at its own learned position.

    Args:
        context (Tensor[N, C, k1, k2]): the pooled context map (3x3 in the paper), any k1, k2 >= 1.
        offsets (Tensor[N, 2, H, W]): (dx, dy) in pixels of the output grid; float32 or the features' dtype.
        local (Tensor[N, C, H, W]): the per-pixel features; sets the output size.

    Returns:
        Tensor[N, C, H, W]: ``S(context, offsets) + local`` in ``local``'s dtype and memory format.

    The backward is deterministic on every backend: the Triton kernels reduce the context gradient in
    per-program partial sums added in a fixed order (no atomics), so every gradient is bitwise the same
    from run to run on the same device, whether or not ``torch.use_deterministic_algorithms(True)`` is
    set. (It is also the fast path: it moves the bytes of the atomic one within 10 %, see
    bench/README.md.) Contexts of more than 64 cells get their gradient from the binned gather of
    ``alignseg.kernels.align_fa_gather``, deterministic too.

    Example:
        >>> ctx, local = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 20, 20)
        >>> align_cm(ctx, torch.zeros(2, 2, 20, 20), local).shape
        torch.Size([2, 8, 20, 20])
    """
    _check_align_cm(context, offsets, local)
    backend = select_backend(local.device)
    if backend == "triton" and local.numel() > 0:  # an empty output (N, C, H or W of 0) needs no kernel
        return torch.ops.alignseg.align_cm_forward(context, offsets, local)
    return EAGER_ALIGN_CM.get(backend, align_cm_reference)(context, offsets, local)


# ----------------------------------------------------------------------------------------------
# Custom ops around the Triton kernels (alignseg.kernels.align_cm, imported on first use), as in
# align_fa.py. The gradient of local is the output gradient itself, so the backward op returns
# only the gradients of context and offsets.


@torch.library.custom_op("alignseg::align_cm_forward", mutates_args=())
def _align_cm_forward(context: Tensor, offsets: Tensor, local: Tensor) -> Tensor:
    require_triton(local.device)
    from alignseg.kernels.align_cm import align_cm_forward

    return align_cm_forward(context, offsets, local, out=empty_output(local))


@_align_cm_forward.register_fake
def _(context: Tensor, offsets: Tensor, local: Tensor) -> Tensor:
    return empty_output(local)


@torch.library.custom_op("alignseg::align_cm_backward", mutates_args=())
def _align_cm_backward(grad: Tensor, context: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    # Deterministic (no atomics) on every path that deterministic mode can take: no alert.
    require_triton(context.device)
    from alignseg.kernels.align_cm import align_cm_backward
    from alignseg.kernels.launch import stage_channels_last
    from alignseg.kernels.relayout import to_channels_last

    if stage_channels_last(grad):  # a contiguous map's gradient: read from a channels_last copy (launch.py says why)
        grad = to_channels_last(grad)
    return align_cm_backward(grad, context, offsets)


@_align_cm_backward.register_fake
def _(grad: Tensor, context: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    return torch.empty_like(context), torch.empty_like(offsets)


def _setup_context(ctx, inputs, output) -> None:
    context, offsets, local = inputs
    ctx.save_for_backward(context, offsets)
    ctx.local_format = output_memory_format(local)


def _backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    context, offsets = ctx.saved_tensors
    grad_context, grad_offsets = torch.ops.alignseg.align_cm_backward(grad, context, offsets)
    return grad_context, grad_offsets, grad.contiguous(memory_format=ctx.local_format)


_align_cm_forward.register_autograd(_backward, setup_context=_setup_context)
