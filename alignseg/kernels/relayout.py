"""A 4-D map copied into another memory format and dtype by tiles: the staging of the backward passes, which
run a contiguous (NCHW) map's kernels on a channels_last copy (:func:`alignseg.kernels.launch.stage_channels_last`)
and hand the gradients back in the inputs' layouts.

PyTorch's permuting copy (``t.contiguous(memory_format=torch.channels_last)``) reads or writes with a stride on
one side. On an H200 the staging of one bf16 align_cm gradient through it (4x256x219x219) cost about 0.5 ms,
about 0.4 TB/s (bench/results/h200-2026-11-27/run4_deterministic_backward.txt). Here a program copies a
[BLOCK_C, BLOCK_P] tile: its load is contiguous along one axis, its store along the other, and Triton gives
each its own coalesced layout and converts between them through shared memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import KernelLaunch, launch_config


# out[n, c, p] = src[n, c, p] in out's dtype, p = h * W + w (both maps' pixels are one strided axis: see
# flat_pixels). Grid: (pixel blocks, channel blocks, N).
@triton.jit
def relayout_kernel(
    out_ptr,
    src_ptr,
    C,
    HW,
    src_stride_n, src_stride_c, src_stride_p,
    out_stride_n, out_stride_c, out_stride_p,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    n = tl.program_id(2).to(tl.int64)
    channels = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pixels = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = (channels[:, None] < C) & (pixels[None, :] < HW)
    c = channels.to(tl.int64)[:, None]
    p = pixels.to(tl.int64)[None, :]
    tile = tl.load(src_ptr + n * src_stride_n + c * src_stride_c + p * src_stride_p, mask=mask)
    # A narrowing cast rounds to nearest even (cvt.rn), as torch's does; triton's interpreter truncates fp32 to bf16.
    tl.store(out_ptr + n * out_stride_n + c * out_stride_c + p * out_stride_p, tile.to(out_ptr.dtype.element_ty),
             mask=mask)


def flat_pixels(t: torch.Tensor) -> bool:
    """Whether a 4-D map's pixels are one strided axis (stride_h == W * stride_w), as in both dense layouts."""
    return t.dim() == 4 and (t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3))


def plan_relayout(src: torch.Tensor, out: torch.Tensor) -> KernelLaunch:
    """The launch of :func:`relayout_kernel` copying ``src`` into ``out`` (same shape, both :func:`flat_pixels`)."""
    if src.shape != out.shape or not (flat_pixels(src) and flat_pixels(out)):
        raise ValueError(f"relayout: needs two 4-D maps of one shape with flat pixels, got {tuple(src.shape)} "
                         f"strides {src.stride()} and {tuple(out.shape)} strides {out.stride()}")
    n, c, h, w = src.shape
    cfg = launch_config("relayout", src)
    block_c = min(cfg.max_block_c, triton.next_power_of_2(c))
    return KernelLaunch(
        relayout_kernel,
        grid=(triton.cdiv(h * w, cfg.block_p), triton.cdiv(c, block_c), n),
        args=(out, src, c, h * w, src.stride(0), src.stride(1), src.stride(3),
              out.stride(0), out.stride(1), out.stride(3)),
        constexprs=dict(BLOCK_P=cfg.block_p, BLOCK_C=block_c),
        num_warps=cfg.num_warps,
    )


def relayout(src: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Copy ``src`` into ``out`` (its layout and dtype) and return ``out``; a plain ``copy_`` where either map's
    pixels are not one strided axis (a non-dense view) or the maps are empty."""
    if src.numel() == 0 or not (flat_pixels(src) and flat_pixels(out)):
        return out.copy_(src)
    plan_relayout(src, out)()
    return out


def to_channels_last(t: torch.Tensor) -> torch.Tensor:
    """A channels_last copy of the 4-D map ``t``."""
    return relayout(t, torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=torch.channels_last))


def relayout_like(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``g`` in the dtype and strides of ``torch.empty_like(like)`` (what the ops' fake kernels return for
    ``like``'s gradient): ``g.to(dtype)`` when the strides already match (``g`` itself if the dtype does too),
    else one tiled copy."""
    dense = like.is_contiguous() or like.is_contiguous(memory_format=torch.channels_last)
    if dense and g.stride() == like.stride():  # empty_like keeps a dense tensor's strides: no allocation to ask
        return g.to(like.dtype)
    out = torch.empty_like(like)
    return g.to(like.dtype) if g.stride() == out.stride() else relayout(g, out)
