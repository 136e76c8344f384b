"""Deterministic transposes of the bilinear sampling, as gathers: the source gradients of AlignFA (and AlignCM).

Every forward here is a sum over output pixels q of tap weights times a source map; its transpose sends
``grad[q] * w_k(q)`` to the source cell ``t = tap_k(q)``. The scatter form (atomics into a zeroed fp32
buffer, then a cast pass) is fast to write and nondeterministic. Here a program owns a 2-D tile of
*source* cells x a channel block, visits the output pixels q whose taps can land in its tile, in a fixed
order, and writes the gradient once in its own dtype: no zero fill, no atomics, no cast pass, and
bitwise the same result on every run.

Which q can reach a source cell t: each output pixel q = (i, j) is anchored at ``home(t) = t * (H - 1) //
(t_size - 1)`` per axis (exact integers: the identity for a same-size map, about t / scale for a coarse
one), and a q reaches t only if ``i - home(t)`` lies in a window ``[d_min, d_max]``. A small device
reduction over the offsets (:func:`gather_window_device`, the same coordinate rule as the forward) finds the
window; the gather then tests every candidate exactly with the forward's arithmetic, so the window
only has to contain the hits. A candidate displacement that hits no cell of the tile is skipped with a
scalar branch before its gradient tile is loaded.

Three forms share one kernel (``MODE``):

* ``DIRECT``: ``S(src, d)`` of :mod:`alignseg.kernels.bilinear` with the source's align-corners scale:
  :func:`warp_transpose` (same size, the ``grad_low`` of AlignFA), :func:`upsample_transpose` (zero
  offsets: the transpose of ``F.interpolate(..., align_corners=True)``), :func:`sample_transpose`
  (the one-step AlignFA ``grad_high``, AlignCM's large contexts).
* ``COMPOSITE``: ``W(U(high), d)``, the authors' upsample-then-warp: each output pixel's four fine taps
  are themselves bilinear upsamples of the coarse map, the weight a coarse cell receives from q is
  separable, ``(sum_DY w_DY u_y) * (sum_DX w_DX u_x)``, so :func:`upsample_warp_transpose` computes
  ``U^T W^T grad`` in one pass and the upsampled gradient never touches memory.

Window limit: learned offsets are a few pixels. A window wider than the zero-offset window plus
``2 * max_shift`` pixels per axis (default :data:`MAX_GATHER_SHIFT` = 8 px) would make every program
scan (2 * 8 + 2)^2 = 324+ candidates, each reloading a tile of offsets, so outside deterministic mode
the transpose then falls back to an atomic scatter (:func:`scatter_transpose`: zero-filled fp32/fp64
buffer, a cast pass; nondeterministic). Under ``torch.use_deterministic_algorithms(True)`` the gather
always runs, however wide the window: deterministic, slower for such offsets. NaN, infinite and huge
offsets whose taps all leave the map reach no cell and never widen the window.

Host synchronisation: outside deterministic mode the window is read back to the host (one read of four
integers per offset map; :func:`align_fa_backward_deterministic` batches both maps into one read),
because the launch must choose between gather and scatter. In deterministic mode there is no choice to
make, and the gathers load their loop bounds from the device tensor: no host synchronisation at all.
The same holds while a CUDA graph is being captured (a host read is illegal there), so the backward can
be captured and replayed.
:func:`upsample_transpose` needs none either (its window follows from the sizes).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .bilinear import (
    align_corners_scale,
    channel_offset,
    output_pixels,
    per_pixel,
    scatter_tile,
    source_coordinate,
    tile_mask,
    tile_offsets,
    tile_pointers,
    unit_scale,
    upsampled_axis_weight,
    zero_tile,
)
from .fixed_point import SCATTER_FLOAT
from .launch import (
    KernelLaunch,
    accumulation_dtype,
    check_index_range,
    contiguous_channels,
    interpreting,
    pixels_last,
    strides,
)
from .launch import align_corners_scale as host_scale

DIRECT = 0
COMPOSITE = 1
MAX_GATHER_SHIFT = 8  # px of the output grid, see the module docstring
# Window sentinel: no output pixel reaches any source cell. A constexpr, since a kernel may read no other global.
_EMPTY = tl.constexpr(2**30)


@dataclasses.dataclass(frozen=True)
class GatherConfig:
    tile_h: int  # source rows per program (power of two)
    tile_w: int  # source columns per program (power of two)
    max_block_c: int
    num_warps: int


# channels_last: each pixel is a contiguous channel vector, square tiles reuse gradient rows from L1.
# contiguous (NCHW): the lanes of a warp run along W (launch.pixels_last orients the tile so), so tiles
# are wide along W. 8 warps: 16 accumulator elements per thread, 72-128 registers at sm_90 (no spills),
# two programs per SM (see bench/README.md, "Backward: bytes moved").
# fp64 (two registers per element): 8x8 tiles of 64 channels at 8 warps reached ptxas's 255 registers with a
# 176-304 B stack in align_fa_gather (sm_80/sm_90, triton 3.9); 4x8x32 at 16 warps compiles it at 95-97 registers
# without a stack (example shape). Smaller tiles at fewer warps (8x8x32 or 4x8x32 at 8, 4x4x32 at 4) left 8-24 B
# stacks at 64-128 registers, where triton 3.9's ptxas (--regAllocOptLevel=2) aims for an occupancy step.
GATHER_CONFIGS = {
    "channels_last": GatherConfig(tile_h=8, tile_w=8, max_block_c=64, num_warps=8),
    "contiguous": GatherConfig(tile_h=2, tile_w=32, max_block_c=32, num_warps=8),
    ("channels_last", torch.float64): GatherConfig(tile_h=4, tile_w=8, max_block_c=32, num_warps=16),
}
INTERPRETER_GATHER_CONFIG = GatherConfig(tile_h=16, tile_w=32, max_block_c=128, num_warps=1)
WINDOW_BLOCK_P = 256  # pixels per program of the window reduction


def gather_config(t: torch.Tensor, config: GatherConfig | None = None) -> GatherConfig:
    if config is not None:
        return config
    if interpreting():
        return INTERPRETER_GATHER_CONFIG
    layout = "channels_last" if contiguous_channels(t) else "contiguous"
    return GATHER_CONFIGS.get((layout, t.dtype), GATHER_CONFIGS[layout])


# ----------------------------------------------------------------------------------------------
# Kernel helpers: the weight a target row (or column) receives from one output pixel along one axis.


@triton.jit
def home_index(target, out_size, target_size):
    """The output index a source index is anchored at: target * (out_size - 1) // (target_size - 1), exact."""
    return (target.to(tl.int64) * (out_size - 1)) // tl.maximum(target_size - 1, 1)


@triton.jit
def direct_axis_weight(index, shift, scale, target_size, target):
    """(weight, hit) of source index ``target`` for output index ``index`` shifted by ``shift`` along one axis."""
    t0, frac = source_coordinate(index, shift, scale, target_size)
    d = target - t0
    hit = (d == 0) | (d == 1)
    return tl.where(d == 0, 1.0 - frac, frac), hit


@triton.jit
def composite_axis_weight(index, shift, fine_size, up_scale, target_size, target, ACC_DTYPE: tl.constexpr):
    """(weight, hit) of coarse index ``target`` for output index ``index`` in W(U(high), d) along one axis.

    The output reads fine taps f0, f0 + 1 (zero outside the fine map); a fine tap p is the upsample of the
    coarse map at p * up_scale, from coarse taps u0, u0 + 1 (:func:`~alignseg.kernels.bilinear.upsampled_axis_weight`).
    """
    f0, ff = source_coordinate(index, shift, unit_scale(fine_size, ACC_DTYPE), fine_size)
    weight, _, hit = upsampled_axis_weight(f0, ff, fine_size, up_scale, target_size, target)
    return weight, hit


@triton.jit
def reachable_targets(index, shift, scale, out_size, target_size, MODE: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """(lowest, highest) source index an output index reaches along one axis (lowest > highest: none)."""
    if MODE == 0:
        t0, _ = source_coordinate(index, shift, scale, target_size)
        lo = tl.maximum(t0, 0)
        hi = tl.minimum(t0 + 1, target_size - 1)
    else:
        f0, _ = source_coordinate(index, shift, unit_scale(out_size, ACC_DTYPE), out_size)
        p_lo = tl.maximum(f0, 0)
        p_hi = tl.minimum(f0 + 1, out_size - 1)
        u_lo, _ = source_coordinate(p_lo.to(ACC_DTYPE), 0.0, scale, target_size)
        u_hi, _ = source_coordinate(p_hi.to(ACC_DTYPE), 0.0, scale, target_size)
        lo = tl.where(p_lo <= p_hi, tl.maximum(u_lo, 0), target_size)
        hi = tl.minimum(u_hi + 1, target_size - 1)
    return lo, hi


# Per program of output pixels: the range of i - home(t) over every (pixel, reachable source index) pair,
# per axis, as [d_min_y, d_max_y, d_min_x, d_max_x] (empty: _EMPTY, -_EMPTY). Grid: (pixel blocks, N).
@triton.jit
def gather_window_kernel(
    window_ptr,  # [N * pixel blocks, 4] int32
    offsets_ptr,  # [N, 2, H, W] (dx, dy)
    off_stride_n, off_stride_c, off_stride_h, off_stride_w,
    H, W, th, tw,
    scale_x, scale_y,  # host fp32 scales: the source's (DIRECT) or the upsample's (COMPOSITE)
    BLOCK_P: tl.constexpr,
    MODE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    rows, cols, mask_p = output_pixels(tl.program_id(0), H, W, BLOCK_P)
    at = offsets_ptr + n * off_stride_n + rows * off_stride_h + cols * off_stride_w
    dx = tl.load(at, mask=mask_p, other=0.0).to(ACC_DTYPE)
    dy = tl.load(at + off_stride_c, mask=mask_p, other=0.0).to(ACC_DTYPE)
    # (target - 1) / (out - 1): the source's scale (DIRECT) or the upsample's (COMPOSITE), the same rule.
    sx = align_corners_scale(tw, W, scale_x, ACC_DTYPE)
    sy = align_corners_scale(th, H, scale_y, ACC_DTYPE)
    ylo, yhi = reachable_targets(rows.to(ACC_DTYPE), dy, sy, H, th, MODE, ACC_DTYPE)
    xlo, xhi = reachable_targets(cols.to(ACC_DTYPE), dx, sx, W, tw, MODE, ACC_DTYPE)
    reaches = mask_p & (ylo <= yhi) & (xlo <= xhi)
    # home() is non-decreasing, so i - home(t) is largest at the lowest t and smallest at the highest.
    dy_min = tl.where(reaches, rows - home_index(tl.maximum(yhi, 0), H, th), _EMPTY)
    dy_max = tl.where(reaches, rows - home_index(tl.maximum(ylo, 0), H, th), -_EMPTY)
    dx_min = tl.where(reaches, cols - home_index(tl.maximum(xhi, 0), W, tw), _EMPTY)
    dx_max = tl.where(reaches, cols - home_index(tl.maximum(xlo, 0), W, tw), -_EMPTY)
    out = window_ptr + (n * tl.num_programs(0) + tl.program_id(0)) * 4
    tl.store(out, tl.min(dy_min, axis=0).to(tl.int32))
    tl.store(out + 1, tl.max(dy_max, axis=0).to(tl.int32))
    tl.store(out + 2, tl.min(dx_min, axis=0).to(tl.int32))
    tl.store(out + 3, tl.max(dx_max, axis=0).to(tl.int32))


@triton.jit
def window_bounds(window_ptr, d_min_y, d_max_y, d_min_x, d_max_x, ON_DEVICE: tl.constexpr):
    """The window (d_min_y, d_max_y, d_min_x, d_max_x): loaded from the device (no host read) or the arguments."""
    if ON_DEVICE:
        return tl.load(window_ptr), tl.load(window_ptr + 1), tl.load(window_ptr + 2), tl.load(window_ptr + 3)
    else:
        return d_min_y, d_max_y, d_min_x, d_max_x


@triton.jit
def gather_tile(
    out_at,  # the source gradient of batch row n
    grad_at,  # the output gradient of batch row n
    shift_at,  # the (dx, dy) offsets of batch row n
    out_stride_c, out_stride_h, out_stride_w,
    grad_stride_c, grad_stride_h, grad_stride_w,
    off_stride_c, off_stride_h, off_stride_w,
    ty, tx, mask_t,  # [TILE] source rows, columns (int32) and mask of the tile
    home_y, home_x,  # [TILE] int64 home(ty), home(tx)
    channels, mask_c,  # [BLOCK_C]
    H, W, th, tw,
    sx, sy,  # ACC_DTYPE scales
    dy_min, dy_max, dx_min, dx_max,
    MODE: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
    PIXELS_LAST: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """grad_src[t] = sum over q = home(t) + (ky, kx) in the window and their taps hitting t, stored once."""
    TILE: tl.constexpr = ty.shape[0]
    channel_at = channels * grad_stride_c
    acc = zero_tile(ty, channels, ACC_DTYPE, PIXELS_LAST)
    for ky in range(dy_min, dy_max + 1):
        qi = home_y + ky
        valid_y = mask_t & (qi >= 0) & (qi < H)
        for kx in range(dx_min, dx_max + 1):
            qj = home_x + kx
            valid = valid_y & (qj >= 0) & (qj < W)
            if HAS_OFFSETS:
                q_at = shift_at + qi * off_stride_h + qj * off_stride_w
                dx = tl.load(q_at, mask=valid, other=0.0).to(ACC_DTYPE)
                dy = tl.load(q_at + off_stride_c, mask=valid, other=0.0).to(ACC_DTYPE)
            else:
                dx = tl.zeros((TILE,), dtype=ACC_DTYPE)
                dy = tl.zeros((TILE,), dtype=ACC_DTYPE)
            if MODE == 0:
                wy, hy = direct_axis_weight(qi.to(ACC_DTYPE), dy, sy, th, ty)
                wx, hx = direct_axis_weight(qj.to(ACC_DTYPE), dx, sx, tw, tx)
            else:
                wy, hy = composite_axis_weight(qi.to(ACC_DTYPE), dy, H, sy, th, ty, ACC_DTYPE)
                wx, hx = composite_axis_weight(qj.to(ACC_DTYPE), dx, W, sx, tw, tx, ACC_DTYPE)
            hit = valid & hy & hx
            # a displacement that hits no cell of the tile loads no gradient
            if tl.max(hit.to(tl.int32), axis=0) > 0:
                ptrs = grad_at + tile_offsets(qi * grad_stride_h + qj * grad_stride_w, channel_at, PIXELS_LAST)
                g = tl.load(ptrs, mask=tile_mask(hit, mask_c, PIXELS_LAST), other=0.0).to(ACC_DTYPE)
                acc += per_pixel(wy * wx, PIXELS_LAST) * g
    ptrs = out_at + tile_offsets(ty.to(tl.int64) * out_stride_h + tx.to(tl.int64) * out_stride_w,
                                 channels * out_stride_c, PIXELS_LAST)
    tl.store(ptrs, acc.to(out_at.dtype.element_ty), mask=tile_mask(mask_t, mask_c, PIXELS_LAST))


# grad_src[n, c, t] = sum over output pixels q and taps k with tap_k(q) == t of w_k(q) * grad[n, c, q], for
# every source cell t of a TILE_H x TILE_W tile, accumulated over the window's displacements in a fixed
# order (rows, then columns) and stored once. Grid: (tiles, channel blocks, N).
@triton.jit
def sampling_transpose_kernel(
    out_ptr,  # [N, C, th, tw] the source gradient, in its own dtype
    grad_ptr,  # [N, C, H, W] gradient of the output
    offsets_ptr,  # [N, 2, H, W] (dx, dy); unused without HAS_OFFSETS
    window_ptr,  # [4] int32 window on the device (WINDOW_ON_DEVICE), else unused
    out_stride_n, out_stride_c, out_stride_h, out_stride_w,
    grad_stride_n, grad_stride_c, grad_stride_h, grad_stride_w,
    off_stride_n, off_stride_c, off_stride_h, off_stride_w,
    C, H, W, th, tw,
    scale_x, scale_y,  # host fp32 scales: the source's (DIRECT) or the upsample's (COMPOSITE)
    dy_min, dy_max, dx_min, dx_max,  # the window of i - home(t), see gather_window_kernel
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
    MODE: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
    SAME_SIZE: tl.constexpr,  # th == H and tw == W: home() is the identity (and provably contiguous)
    PIXELS_LAST: tl.constexpr,
    WINDOW_ON_DEVICE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    n = tl.program_id(2).to(tl.int64)
    dy_min, dy_max, dx_min, dx_max = window_bounds(window_ptr, dy_min, dy_max, dx_min, dx_max, WINDOW_ON_DEVICE)
    tiles_w = tl.cdiv(tw, TILE_W)
    tile = tl.program_id(0)
    r = tl.arange(0, TILE_H * TILE_W)
    ty = (tile // tiles_w) * TILE_H + r // TILE_W
    tx = (tile % tiles_w) * TILE_W + r % TILE_W
    channels = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    if SAME_SIZE:
        home_y = ty.to(tl.int64)
        home_x = tx.to(tl.int64)
    else:
        home_y = home_index(ty, H, th)
        home_x = home_index(tx, W, tw)
    # (target - 1) / (out - 1): the source's scale (DIRECT) or the upsample's (COMPOSITE), the same rule.
    sx = align_corners_scale(tw, W, scale_x, ACC_DTYPE)
    sy = align_corners_scale(th, H, scale_y, ACC_DTYPE)
    gather_tile(out_ptr + n * out_stride_n, grad_ptr + n * grad_stride_n, offsets_ptr + n * off_stride_n,
                out_stride_c, out_stride_h, out_stride_w, grad_stride_c, grad_stride_h, grad_stride_w,
                off_stride_c, off_stride_h, off_stride_w,
                ty, tx, (ty < th) & (tx < tw), home_y, home_x, channels, channels < C,
                H, W, th, tw, sx, sy, dy_min, dy_max, dx_min, dx_max, MODE, HAS_OFFSETS, PIXELS_LAST, ACC_DTYPE)


# Both source gradients of AlignFA in one pass over the output gradient: a program gathers grad_low for
# its TILE_H x TILE_W tile of the fine map, then grad_high for the coarse cells whose home lies in that
# tile (at most TILE_H x TILE_W of them when h <= H and w <= W), whose candidates mostly re-read the
# gradient lines the first gather just loaded (from L1/L2, not DRAM). Grid: (fine tiles, channel blocks, N).
@triton.jit
def align_fa_gather_kernel(
    grad_low_ptr,  # [N, C, H, W] in low's dtype
    grad_high_ptr,  # [N, C, h, w] in high's dtype
    grad_ptr,  # [N, C, H, W] gradient of the output
    offsets_ptr,  # [N, 4, H, W] (dx, dy) for high, then (dx, dy) for low
    low_window_ptr, high_window_ptr,  # [4] int32 windows on the device (WINDOW_ON_DEVICE), else unused
    gl_stride_n, gl_stride_c, gl_stride_h, gl_stride_w,
    gh_stride_n, gh_stride_c, gh_stride_h, gh_stride_w,
    grad_stride_n, grad_stride_c, grad_stride_h, grad_stride_w,
    off_stride_n, off_stride_c, off_stride_h, off_stride_w,
    C, H, W, h, w,
    high_scale_x, high_scale_y,  # host fp32 (w - 1) / (W - 1), (h - 1) / (H - 1)
    low_dy_min, low_dy_max, low_dx_min, low_dx_max,
    high_dy_min, high_dy_max, high_dx_min, high_dx_max,
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HIGH_MODE: tl.constexpr,
    PIXELS_LAST: tl.constexpr,
    WINDOW_ON_DEVICE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    n = tl.program_id(2).to(tl.int64)
    low_dy_min, low_dy_max, low_dx_min, low_dx_max = window_bounds(
        low_window_ptr, low_dy_min, low_dy_max, low_dx_min, low_dx_max, WINDOW_ON_DEVICE)
    high_dy_min, high_dy_max, high_dx_min, high_dx_max = window_bounds(
        high_window_ptr, high_dy_min, high_dy_max, high_dx_min, high_dx_max, WINDOW_ON_DEVICE)
    tiles_w = tl.cdiv(W, TILE_W)
    tile = tl.program_id(0)
    i0 = (tile // tiles_w) * TILE_H
    j0 = (tile % tiles_w) * TILE_W
    r = tl.arange(0, TILE_H * TILE_W)
    channels = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = channels < C
    grad_at = grad_ptr + n * grad_stride_n
    shift_at = offsets_ptr + n * off_stride_n

    ty = i0 + r // TILE_W
    tx = j0 + r % TILE_W
    gather_tile(grad_low_ptr + n * gl_stride_n, grad_at, shift_at + channel_offset(2, off_stride_c),
                gl_stride_c, gl_stride_h, gl_stride_w, grad_stride_c, grad_stride_h, grad_stride_w,
                off_stride_c, off_stride_h, off_stride_w,
                ty, tx, (ty < H) & (tx < W), ty.to(tl.int64), tx.to(tl.int64), channels, mask_c,
                H, W, H, W, unit_scale(W, ACC_DTYPE), unit_scale(H, ACC_DTYPE),
                low_dy_min, low_dy_max, low_dx_min, low_dx_max, 0, True, PIXELS_LAST, ACC_DTYPE)

    # the coarse cells a with home(a) in [i0, i0 + TILE_H) (likewise columns): from ceil(i0 (h - 1) / (H - 1))
    cy = tl.cdiv(i0 * (h - 1), tl.maximum(H - 1, 1)) + r // TILE_W
    cx = tl.cdiv(j0 * (w - 1), tl.maximum(W - 1, 1)) + r % TILE_W
    home_y = home_index(cy, H, h)
    home_x = home_index(cx, W, w)
    owned = ((cy < h) & (home_y >= i0) & (home_y < i0 + TILE_H)
             & (cx < w) & (home_x >= j0) & (home_x < j0 + TILE_W))
    gather_tile(grad_high_ptr + n * gh_stride_n, grad_at, shift_at,
                gh_stride_c, gh_stride_h, gh_stride_w, grad_stride_c, grad_stride_h, grad_stride_w,
                off_stride_c, off_stride_h, off_stride_w,
                cy, cx, owned, home_y, home_x, channels, mask_c,
                H, W, h, w,
                align_corners_scale(w, W, high_scale_x, ACC_DTYPE), align_corners_scale(h, H, high_scale_y, ACC_DTYPE),
                high_dy_min, high_dy_max, high_dx_min, high_dx_max, HIGH_MODE, True, PIXELS_LAST, ACC_DTYPE)


# The nondeterministic fallback for wide windows (DIRECT form only): every output pixel scatters
# grad * w_k into its four taps with atomics, into a zeroed ACC_DTYPE buffer. Grid: (pixel blocks, channel blocks, N).
@triton.jit
def scatter_transpose_kernel(
    buffer_ptr,  # [N, C, th, tw] ACC_DTYPE, zero-filled
    grad_ptr,  # [N, C, H, W]
    offsets_ptr,  # [N, 2, H, W]
    buf_stride_n, buf_stride_c, buf_stride_h, buf_stride_w,
    grad_stride_n, grad_stride_c, grad_stride_h, grad_stride_w,
    off_stride_n, off_stride_c, off_stride_h, off_stride_w,
    C, H, W, th, tw,
    scale_x, scale_y,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PIXELS_LAST: tl.constexpr,
):
    n = tl.program_id(2).to(tl.int64)
    rows, cols, mask_p = output_pixels(tl.program_id(0), H, W, BLOCK_P)
    channels = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = channels < C
    at = offsets_ptr + n * off_stride_n + rows * off_stride_h + cols * off_stride_w
    dx = tl.load(at, mask=mask_p, other=0.0).to(ACC_DTYPE)
    dy = tl.load(at + off_stride_c, mask=mask_p, other=0.0).to(ACC_DTYPE)
    x0, fx = source_coordinate(cols.to(ACC_DTYPE), dx, tl.cast(scale_x, ACC_DTYPE), tw)
    y0, fy = source_coordinate(rows.to(ACC_DTYPE), dy, tl.cast(scale_y, ACC_DTYPE), th)
    g = tl.load(tile_pointers(grad_ptr + n * grad_stride_n, rows * grad_stride_h + cols * grad_stride_w,
                              channels * grad_stride_c, PIXELS_LAST),
                mask=tile_mask(mask_p, mask_c, PIXELS_LAST), other=0.0).to(ACC_DTYPE)
    scatter_tile(buffer_ptr + n * buf_stride_n, buffer_ptr, 1.0, g, channels, buf_stride_c, buf_stride_h, buf_stride_w,
                 x0, y0, fx, fy, th, tw, mask_p, mask_c, SCATTER_FLOAT, PIXELS_LAST)


# ----------------------------------------------------------------------------------------------
# Launchers.


def _scales(out_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[float, float]:
    """(scale_x, scale_y) for fp32 kernels: the source's align-corners scale (DIRECT) or the upsample's (COMPOSITE)."""
    (H, W), (th, tw) = out_hw, target_hw
    return host_scale(tw, W), host_scale(th, H)


def plan_gather_window(offsets2: torch.Tensor, partial: torch.Tensor, target_hw: tuple[int, int],
                       mode: int = DIRECT) -> KernelLaunch:
    """The launch of :func:`gather_window_kernel`: per-program windows into ``partial`` [N * programs, 4] int32."""
    n, _, H, W = offsets2.shape
    th, tw = target_hw
    sx, sy = _scales((H, W), target_hw)
    return KernelLaunch(
        gather_window_kernel,
        grid=(triton.cdiv(H * W, WINDOW_BLOCK_P), n),
        args=(partial, offsets2, *strides(offsets2), H, W, th, tw, sx, sy),
        constexprs=dict(BLOCK_P=WINDOW_BLOCK_P, MODE=mode, ACC_DTYPE=accumulation_dtype(offsets2.dtype)[1]),
        num_warps=4,
    )


def gather_window_device(offsets2: torch.Tensor, target_hw: tuple[int, int], mode: int = DIRECT) -> torch.Tensor:
    """Int32 device tensor [4]: (d_min_y, d_max_y, d_min_x, d_max_x) of i - home(t) over all hits (no host sync)."""
    n, _, H, W = offsets2.shape
    partial = torch.empty(n * triton.cdiv(H * W, WINDOW_BLOCK_P), 4, dtype=torch.int32, device=offsets2.device)
    plan_gather_window(offsets2, partial, target_hw, mode)()
    # (min, max) per axis, interleaved without an index tensor (a host-made index would be a copy to the device,
    # illegal during CUDA graph capture).
    return torch.stack((partial[:, 0::2].amin(0), partial[:, 1::2].amax(0)), dim=1).reshape(4)


def window_without_offsets(out_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """The window of the plain upsample transpose (zero offsets), from the sizes on the host, widened by one.

    The gather tests every candidate exactly, so the margin only guards against an fp32 rounding of the
    host's arithmetic differing from the kernel's.
    """
    window = []
    for out_size, target_size in zip(out_hw, target_hw):
        index = torch.arange(out_size, dtype=torch.float64)
        scale = torch.tensor(host_scale(target_size, out_size), dtype=torch.float32).double()
        t0 = torch.floor(index * scale).long()
        lo, hi = t0.clamp(0, target_size - 1), (t0 + 1).clamp(0, target_size - 1)
        home = lambda t: (t * (out_size - 1)) // max(target_size - 1, 1)  # noqa: E731
        window += [int((index.long() - home(hi)).min()) - 1, int((index.long() - home(lo)).max()) + 1]
    return tuple(window)


def zero_offset_width(out_size: int, target_size: int, mode: int = DIRECT) -> int:
    """Candidates per axis of the window with zero offsets (about 2 / scale + 3; one more for COMPOSITE's fine taps)."""
    d_min, d_max, _, _ = window_without_offsets((out_size, 1), (target_size, 1))
    return d_max - d_min + 1 + (mode == COMPOSITE)


def window_fits(window: tuple[int, int, int, int], out_hw: tuple[int, int], target_hw: tuple[int, int],
                max_shift: int, mode: int = DIRECT) -> bool:
    """Whether the gather's window stays within the zero-offset window plus ``2 * max_shift`` per axis."""
    d_min_y, d_max_y, d_min_x, d_max_x = window
    return (d_max_y - d_min_y + 1 <= zero_offset_width(out_hw[0], target_hw[0], mode) + 2 * max_shift
            and d_max_x - d_min_x + 1 <= zero_offset_width(out_hw[1], target_hw[1], mode) + 2 * max_shift)


Window = tuple[int, int, int, int] | torch.Tensor  # host integers, or an int32 device tensor [4] (no host read)


def _window_args(window, placeholder: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], bool]:
    """(pointer argument, the four integer arguments, on the device?) of a window."""
    if isinstance(window, torch.Tensor):
        return window, (0, 0, 0, 0), True
    return placeholder, tuple(window), False


def plan_gather(grad: torch.Tensor, offsets2: torch.Tensor | None, out: torch.Tensor, window: Window,
                mode: int = DIRECT, config: GatherConfig | None = None) -> KernelLaunch:
    """The launch of :func:`sampling_transpose_kernel` into ``out`` [N, C, th, tw] for a window (host or device)."""
    check_index_range("grad", grad)
    check_index_range("out", out)
    n, c, H, W = grad.shape
    th, tw = out.shape[-2:]
    cfg = gather_config(grad, config)
    block_c = max(1, min(cfg.max_block_c, triton.next_power_of_2(c)))
    sx, sy = _scales((H, W), (th, tw))
    off = offsets2 if offsets2 is not None else grad  # a placeholder pointer without offsets
    off_strides = strides(offsets2) if offsets2 is not None else (0, 0, 0, 0)
    window_ptr, window_ints, on_device = _window_args(window, grad)
    return KernelLaunch(
        sampling_transpose_kernel,
        grid=(triton.cdiv(th, cfg.tile_h) * triton.cdiv(tw, cfg.tile_w), triton.cdiv(c, block_c), n),
        args=(out, grad, off, window_ptr, *strides(out), *strides(grad), *off_strides,
              c, H, W, th, tw, sx, sy, *window_ints),
        constexprs=dict(TILE_H=cfg.tile_h, TILE_W=cfg.tile_w, BLOCK_C=block_c, MODE=mode,
                        HAS_OFFSETS=offsets2 is not None,
                        SAME_SIZE=(th, tw) == (H, W), PIXELS_LAST=pixels_last(grad),
                        WINDOW_ON_DEVICE=on_device, ACC_DTYPE=accumulation_dtype(out.dtype)[1]),
        num_warps=cfg.num_warps,
    )


def launch_gather(grad: torch.Tensor, offsets2: torch.Tensor | None, out: torch.Tensor, window: Window,
                  mode: int = DIRECT, config: GatherConfig | None = None) -> torch.Tensor:
    """Run :func:`sampling_transpose_kernel` into ``out`` [N, C, th, tw] for a window (host or device)."""
    plan_gather(grad, offsets2, out, window, mode, config)()
    return out


def plan_scatter_transpose(grad: torch.Tensor, offsets2: torch.Tensor, buffer: torch.Tensor) -> KernelLaunch:
    """The launch of :func:`scatter_transpose_kernel`: atomic adds into the zeroed fp32/fp64 ``buffer``."""
    n, c, H, W = grad.shape
    th, tw = buffer.shape[-2:]
    # fp64 at 32 x 64 on 4 warps takes 255 registers and a 200 B stack (sm_80/sm_90, AOT); 32 x 32 on 8 warps, 80-95.
    wide = buffer.dtype == torch.float64
    block_p, block_c = (1024, 128) if interpreting() else ((32, 32) if wide else (32, 64))
    block_c = min(block_c, triton.next_power_of_2(c))
    sx, sy = _scales((H, W), (th, tw))
    return KernelLaunch(
        scatter_transpose_kernel,
        grid=(triton.cdiv(H * W, block_p), triton.cdiv(c, block_c), n),
        args=(buffer, grad, offsets2, *strides(buffer), *strides(grad), *strides(offsets2), c, H, W, th, tw, sx, sy),
        constexprs=dict(BLOCK_P=block_p, BLOCK_C=block_c, ACC_DTYPE=accumulation_dtype(buffer.dtype)[1],
                        PIXELS_LAST=pixels_last(grad)),
        num_warps=8 if wide and not interpreting() else 4,
    )


def scatter_transpose(grad: torch.Tensor, offsets2: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The atomic fallback of the DIRECT form into ``out``: nondeterministic, for windows too wide to gather."""
    buffer = torch.zeros_like(out, dtype=accumulation_dtype(out.dtype)[0])
    plan_scatter_transpose(grad, offsets2, buffer)()
    out.copy_(buffer)
    return out


def _empty_source(grad: torch.Tensor, size: tuple[int, int], dtype: torch.dtype | None,
                  like: torch.Tensor | None = None) -> torch.Tensor:
    """An uninitialised [N, C, *size] gradient in ``like``'s (else ``grad``'s) layout and dtype."""
    ref = like if like is not None else grad
    fmt = torch.channels_last if contiguous_channels(ref) and ref.dim() == 4 else torch.contiguous_format
    return torch.empty(*grad.shape[:2], *size, dtype=dtype or ref.dtype, device=grad.device, memory_format=fmt)


def window_stays_on_device(t: torch.Tensor) -> bool:
    """Gather with the window read on the device, never choosing the scatter: in deterministic mode, and while
    a CUDA graph is being captured (a host read is illegal there)."""
    return torch.are_deterministic_algorithms_enabled() or (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _transpose(grad: torch.Tensor, offsets2: torch.Tensor, out: torch.Tensor, mode: int, max_shift: int,
               window: Window | None = None, config: GatherConfig | None = None) -> torch.Tensor:
    """Gather when the window fits (or determinism is required), else the scatter (DIRECT) or scatter-then-gather.

    In deterministic mode the gather reads its window on the device: no host synchronisation.
    """
    out_hw, target_hw = tuple(grad.shape[-2:]), tuple(out.shape[-2:])
    if window is None:
        window = gather_window_device(offsets2, target_hw, mode)
    if window_stays_on_device(grad):
        return launch_gather(grad, offsets2, out, window, mode, config)
    if isinstance(window, torch.Tensor):
        window = tuple(window.tolist())  # the one host read: gather or scatter?
    if window_fits(window, out_hw, target_hw, max_shift, mode):
        return launch_gather(grad, offsets2, out, window, mode, config)
    if mode == DIRECT:
        return scatter_transpose(grad, offsets2, out)
    # COMPOSITE: warp-transpose onto the fine grid by scatter, then the (deterministic) upsample transpose.
    fine = scatter_transpose(grad, offsets2, torch.empty_like(grad, dtype=accumulation_dtype(out.dtype)[0]))
    return upsample_transpose(fine, *target_hw, out=out, config=config)


# ----------------------------------------------------------------------------------------------
# Public functions.


def warp_transpose(grad: torch.Tensor, offsets2: torch.Tensor, max_shift: int = MAX_GATHER_SHIFT,
                   out_dtype: torch.dtype | None = None, config: GatherConfig | None = None) -> torch.Tensor:
    """Transpose of the same-size warp ``W(src, d)``: the gradient of ``src``.

    Args:
        grad (Tensor[N, C, H, W]): gradient of ``W(src, offsets2)``.
        offsets2 (Tensor[N, 2, H, W]): (dx, dy) in pixels (a channel slice of AlignFA's offsets is fine).
        max_shift: window limit in pixels beyond which the nondeterministic scatter runs (not in
            deterministic mode, see the module docstring).
        out_dtype: default ``grad``'s dtype.

    Returns:
        Tensor[N, C, H, W] in ``grad``'s memory format:
        ``out[t] = sum over q, k with tap_k(q) == t of w_k(q) * grad[q]``.
    """
    out = _empty_source(grad, tuple(grad.shape[-2:]), out_dtype)
    return _transpose(grad, offsets2, out, DIRECT, max_shift, config=config)


def sample_transpose(grad: torch.Tensor, offsets2: torch.Tensor, src_hw: tuple[int, int],
                     max_shift: int = MAX_GATHER_SHIFT, out_dtype: torch.dtype | None = None,
                     like: torch.Tensor | None = None, config: GatherConfig | None = None) -> torch.Tensor:
    """Transpose of the one-step sampling ``S(src, d)`` of a source of size ``src_hw``: Tensor[N, C, *src_hw].

    ``like``: a tensor whose memory format (and dtype, unless ``out_dtype``) the result takes.
    """
    out = _empty_source(grad, tuple(src_hw), out_dtype, like)
    return _transpose(grad, offsets2, out, DIRECT, max_shift, config=config)


def upsample_warp_transpose(grad: torch.Tensor, offsets2: torch.Tensor, src_hw: tuple[int, int],
                            max_shift: int = MAX_GATHER_SHIFT, out_dtype: torch.dtype | None = None,
                            like: torch.Tensor | None = None, config: GatherConfig | None = None) -> torch.Tensor:
    """``U^T W^T grad`` in one gather: the coarse gradient of the authors' ``W(U(high), d)``, Tensor[N, C, *src_hw].

    The upsampled map's gradient is never written (see the module docstring).
    """
    out = _empty_source(grad, tuple(src_hw), out_dtype, like)
    return _transpose(grad, offsets2, out, COMPOSITE, max_shift, config=config)


def upsample_transpose(grad_up: torch.Tensor, h: int, w: int, out: torch.Tensor | None = None,
                       out_dtype: torch.dtype | None = None, config: GatherConfig | None = None) -> torch.Tensor:
    """Transpose of ``F.interpolate(x, (H, W), mode="bilinear", align_corners=True)``, deterministic.

    Args:
        grad_up (Tensor[N, C, H, W]): gradient of the upsampled map.
        h, w: the size of the map that was upsampled.

    Returns:
        Tensor[N, C, h, w] in ``grad_up``'s memory format and dtype (or ``out_dtype``), written once; no host sync.
    """
    if out is None:
        out = _empty_source(grad_up, (h, w), out_dtype)
    window = window_without_offsets(tuple(grad_up.shape[-2:]), (h, w))
    return launch_gather(grad_up, None, out, window, DIRECT, config)


def align_fa_backward_deterministic(
    grad: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    offsets: torch.Tensor,
    upsample_first: bool = True,
    max_shift: int = MAX_GATHER_SHIFT,
    config: GatherConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_low, grad_high)`` of AlignFA by gathers, bitwise reproducible, each in its input's dtype and layout.

    ``upsample_first=True``: the authors' ``W(U(high), offsets[:, 0:2]) + W(low, offsets[:, 2:4])``;
    ``False``: the one-step ``S(high, offsets[:, 0:2]) + S(low, offsets[:, 2:4])``. The offsets'
    gradient is not computed here (the per-pixel backward kernel writes it, with its scatter off).
    One host read of both windows (eight integers) per call. When both windows fit (or in deterministic
    mode) and ``high`` is no larger than ``low``, one fused launch (:func:`align_fa_gather_kernel`)
    writes both gradients; otherwise each goes through :func:`_transpose` (gather or fallback scatter).
    """
    check_index_range("low", low)
    high_hw, low_hw = tuple(high.shape[-2:]), tuple(low.shape[-2:])
    mode_high = COMPOSITE if upsample_first else DIRECT
    windows = torch.cat((gather_window_device(offsets[:, 0:2], high_hw, mode_high),
                         gather_window_device(offsets[:, 2:4], low_hw, DIRECT)))
    if window_stays_on_device(grad):
        window_high, window_low = windows[:4], windows[4:]  # read on the device: no host synchronisation
        gather_both = True
    else:
        windows = windows.tolist()  # the one host read of the backward
        window_high, window_low = tuple(windows[:4]), tuple(windows[4:])
        gather_both = (window_fits(window_high, low_hw, high_hw, max_shift, mode_high)
                       and window_fits(window_low, low_hw, low_hw, max_shift))
    grad_low = _empty_source(grad, low_hw, low.dtype, low)
    grad_high = _empty_source(grad, high_hw, high.dtype, high)
    if gather_both and high_hw[0] <= low_hw[0] and high_hw[1] <= low_hw[1]:
        plan_align_fa_gather(grad, offsets, grad_low, grad_high, window_low, window_high, mode_high, config)()
        return grad_low, grad_high
    _transpose(grad, offsets[:, 0:2], grad_high, mode_high, max_shift, window_high, config)
    _transpose(grad, offsets[:, 2:4], grad_low, DIRECT, max_shift, window_low, config)
    return grad_low, grad_high


def plan_align_fa_gather(grad: torch.Tensor, offsets: torch.Tensor, grad_low: torch.Tensor, grad_high: torch.Tensor,
                         window_low: Window, window_high: Window,
                         mode_high: int = COMPOSITE, config: GatherConfig | None = None) -> KernelLaunch:
    """The launch of :func:`align_fa_gather_kernel` (needs h <= H and w <= W) writing ``grad_low`` and ``grad_high``."""
    check_index_range("grad", grad)
    n, c, H, W = grad.shape
    h, w = grad_high.shape[-2:]
    if h > H or w > W:
        raise ValueError(f"the fused gather needs a coarse map no larger than the fine one, got {h}x{w} and {H}x{W}")
    cfg = gather_config(grad, config)
    block_c = max(1, min(cfg.max_block_c, triton.next_power_of_2(c)))
    low_ptr, low_ints, on_device = _window_args(window_low, grad)
    high_ptr, high_ints, high_on_device = _window_args(window_high, grad)
    if on_device != high_on_device:
        raise ValueError("window_low and window_high must both be host integers or both device tensors")
    return KernelLaunch(
        align_fa_gather_kernel,
        grid=(triton.cdiv(H, cfg.tile_h) * triton.cdiv(W, cfg.tile_w), triton.cdiv(c, block_c), n),
        args=(grad_low, grad_high, grad, offsets, low_ptr, high_ptr,
              *strides(grad_low), *strides(grad_high), *strides(grad), *strides(offsets),
              c, H, W, h, w, host_scale(w, W), host_scale(h, H), *low_ints, *high_ints),
        constexprs=dict(TILE_H=cfg.tile_h, TILE_W=cfg.tile_w, BLOCK_C=block_c, HIGH_MODE=mode_high,
                        PIXELS_LAST=pixels_last(grad), WINDOW_ON_DEVICE=on_device,
                        ACC_DTYPE=accumulation_dtype(grad_low.dtype)[1]),
        num_warps=cfg.num_warps,
    )
