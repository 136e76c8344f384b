"""The authors' formulation of AlignFA and AlignCM, the eager baseline the Triton kernels must beat.

The released AlignSeg code first upsamples the coarse map to the output size with
``F.interpolate(bilinear, align_corners=True)``, then warps each full-size map with ``F.grid_sample``
at the base grid plus the learned offsets, and adds. This materialises the upsampled map and runs
two ``grid_sample`` calls (forward and backward).

AlignFA: the library's default ``align_fa`` (``upsample_first=True``) computes this same function,
fused, without the upsampled map, so the two agree at every scale. The one-step variant
(``upsample_first=False``) and the library's ``align_cm`` sample the coarse map directly: where every
source-to-output scale ``(H - 1) / (h - 1)`` is a whole number, each output pixel cell lies inside
one source cell, and bilinear sampling of the bilinear upsampling equals bilinear sampling of the
source, so the authors' form then matches them for offsets that stay inside the map (bench tests
check this against the library reference); elsewhere it is another function.

``grid_sample`` needs its grid in the features' dtype, so in bf16 the sampling positions themselves
are rounded to bf16 (a pixel position near 200 is then off by up to half a pixel): one more reason
the library keeps offsets in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _warp(src: Tensor, offsets: Tensor) -> Tensor:
    """Sample ``src`` [N, C, H, W] at (column + dx, row + dy): offsets [N, 2, H, W] in pixels."""
    n, _, height, width = src.shape
    # align_corners=True maps -1 and +1 to the centres of the first and last pixel.
    scale_x = 2.0 / max(width - 1, 1)
    scale_y = 2.0 / max(height - 1, 1)
    cols = torch.arange(width, device=src.device, dtype=src.dtype).view(1, 1, width)
    rows = torch.arange(height, device=src.device, dtype=src.dtype).view(1, height, 1)
    d = offsets.to(src.dtype)
    grid_x = (cols + d[:, 0]) * scale_x - 1.0
    grid_y = (rows + d[:, 1]) * scale_y - 1.0
    grid = torch.stack((grid_x, grid_y), dim=-1)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def align_fa_authors(low: Tensor, high: Tensor, offsets: Tensor) -> Tensor:
    """AlignFA as released: upsample ``high`` to ``low``'s size, warp both with grid_sample, add."""
    upsampled = F.interpolate(high, size=low.shape[-2:], mode="bilinear", align_corners=True)
    return _warp(upsampled, offsets[:, 0:2]) + _warp(low, offsets[:, 2:4])


def align_cm_authors(context: Tensor, offsets: Tensor, local: Tensor) -> Tensor:
    """AlignCM as released: upsample the pooled context to ``local``'s size, warp it, add ``local``."""
    upsampled = F.interpolate(context, size=local.shape[-2:], mode="bilinear", align_corners=True)
    return _warp(upsampled, offsets) + local


def authors_formulation_is_exact(out_hw: tuple[int, int], src_hw: tuple[int, int]) -> bool:
    """True when every (out - 1) / (src - 1) is a whole number (or the source is one pixel wide): there the
    authors' upsample-then-sample equals sampling the source directly (align_cm, one-step align_fa)."""
    return all(src == 1 or (out - 1) % (src - 1) == 0 for out, src in zip(out_hw, src_hw))
