"""AlignCM: aligned context modelling (AlignSeg, Huang et al., TPAMI 2021, Sec. 3.3).

``align_cm(context, offsets, local) = S(context, offsets) + local``: every pixel samples the small
pooled context map (3x3 in the paper) at its own learned position, see :mod:`alignseg.ops.sampling`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backend import use_triton
from .sampling import (
    check_feature_map,
    check_offsets,
    check_same_device,
    output_memory_format,
    sample_reference,
)


def align_cm_reference(context: Tensor, offsets: Tensor, local: Tensor) -> Tensor:
    """Eager PyTorch version of :func:`align_cm` (no argument checks): the oracle and CPU path."""
    out = sample_reference(context, offsets) + local
    return out.contiguous(memory_format=output_memory_format(local))


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


def align_cm(context: Tensor, offsets: Tensor, local: Tensor) -> Tensor:
    """Aligned context: each pixel adds the context sampled at its own learned position.

    Args:
        context (Tensor[N, C, k1, k2]): the pooled context map (3x3 in the paper), any k1, k2 >= 1.
        offsets (Tensor[N, 2, H, W]): (dx, dy) in pixels of the output grid; float32 or the features' dtype.
        local (Tensor[N, C, H, W]): the per-pixel features; sets the output size.

    Returns:
        Tensor[N, C, H, W]: ``S(context, offsets) + local`` in ``local``'s dtype and memory format.

    Example:
        >>> ctx, local = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 20, 20)
        >>> align_cm(ctx, torch.zeros(2, 2, 20, 20), local).shape
        torch.Size([2, 8, 20, 20])
    """
    _check_align_cm(context, offsets, local)
    if use_triton(local.device):
        return _align_cm_triton(context, offsets, local)
    return align_cm_reference(context, offsets, local)


def _align_cm_triton(context: Tensor, offsets: Tensor, local: Tensor) -> Tensor:
    raise NotImplementedError("the Triton path of align_cm is not written yet")
