"""Deterministic transposes of the bilinear sampling, as gathers: AlignFA's backward (and AlignCM's large contexts).

Every forward here is a sum over output pixels q of tap weights times a source map; its transpose sends
``grad[q] * w_k(q)`` to the source cell ``t = tap_k(q)``. The scatter form (atomics into a zeroed fp32
buffer, then a cast pass) is fast to write and nondeterministic. Here a program owns a 2-D tile of
*source* cells x a channel block, visits the output pixels q whose taps can land in its tile, in a fixed
order, and writes the gradient once in its own dtype: no zero fill, no atomics, no cast pass, and
bitwise the same result on every run.

Which q can reach a source cell t: the **pixel bins**. A first pass puts each output pixel in the bin of
the first source cell its taps reach (:func:`pixel_bins`: one small kernel for the keys, a stable
``torch.sort``, ``torch.searchsorted`` for where each bin starts; all on the device, no host read). A
pixel's taps reach at most ``SPAN`` cells per axis from its bin's cell: 2 for a plain bilinear sample, 3
for the upsample-then-warp of a source no larger than the output (two fine taps, each upsampled from two
coarse cells at most one apart), ``ceil(scale) + 3`` for a larger source (one cell of margin for the fp32
rounding of ``p * scale``). So cell t visits the pixels of the bins ``t - (a, b)``, ``0 <= a, b < SPAN``,
and tests each exactly with the forward's own arithmetic (:func:`accumulate_candidates`): the steps
follow each tile's fullest bin, not the largest offset (pixels crowding onto a few cells cost steps; far ones
do not). The stable sort keeps each bin's pixels
in index order, so the order of addition is fixed. NaN, infinite and huge offsets whose taps all leave the
map go to a bin after every other, which no cell visits.

These bins replaced a *window* scan: each cell visited every output pixel within the largest offset of
its own anchor, (2R + 2)^2 candidates for offsets up to R px, most of them misses; on an H200 that scan,
not memory, bound the gathers (bench/README.md, run 3's ncu reading: 35.6 ms where the atomic backward
took 3.06).

Two forms share the kernels (``MODE``):

* ``DIRECT``: ``S(src, d)`` of :mod:`alignseg.kernels.bilinear` with the source's align-corners scale:
  :func:`warp_transpose` (same size, the ``grad_low`` of AlignFA), :func:`upsample_transpose` (no
  offsets: the transpose of ``F.interpolate(..., align_corners=True)``), :func:`sample_transpose`
  (the one-step AlignFA ``grad_high``, AlignCM's large contexts).
* ``COMPOSITE``: ``W(U(high), d)``, the authors' upsample-then-warp: each output pixel's four fine taps
  are themselves bilinear upsamples of the coarse map, the weight a coarse cell receives from q is
  separable, ``(sum_DY w_DY u_y) * (sum_DX w_DX u_x)``, so :func:`upsample_warp_transpose` computes
  ``U^T W^T grad`` in one pass and the upsampled gradient never touches memory.

AlignFA's whole deterministic backward is one launch (:func:`align_fa_backward_deterministic`,
``align_fa_gather_backward_kernel``): per tile, one program writes the offsets' gradient of its pixels (the
per-pixel backward's code) and, per channel block, one gathers low's gradient and one high's, side by side, so the
output gradient they all read comes from memory about once.

Nothing here reads the device from the host, so the backward can be captured in a CUDA graph.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

from .align_fa import backward_config_name, merged_cells, pixel_block_backward
from .bilinear import (
    align_corners_scale,
    channel_offset,
    output_pixels,
    per_pixel,
    source_coordinate,
    tile_mask,
    tile_offsets,
    unit_scale,
    upsampled_axis_weight,
    zero_tile,
)
from .launch import (
    KernelLaunch,
    accumulation_dtype,
    channel_block,
    check_index_range,
    contiguous_channels,
    interpreting,
    launch_config,
    pixels_last,
    strides,
    target_arch,
)
from .launch import align_corners_scale as host_scale

DIRECT = 0
COMPOSITE = 1


@dataclasses.dataclass(frozen=True)
class GatherConfig:
    tile_h: int  # source rows per program (power of two)
    tile_w: int  # source columns per program (power of two)
    max_block_c: int
    num_warps: int
    # align_fa_gather_backward_kernel's offsets-gradient steps: pixels and channels per step (default: the
    # per-pixel backward's launch config; capped at the tile, and at that config's channel block)
    pixel_block: int | None = None
    pixel_block_c: int | None = None


# channels_last: each pixel is a contiguous channel vector, square tiles reuse gradient rows from L1.
# contiguous (NCHW): the lanes of a warp run along W (launch.pixels_last orients the tile so), so tiles
# are wide along W. 8 warps: 16 accumulator elements per thread. fp64 (two registers per element): 4x8 tiles of
# 32 channels at 16 warps (the window gathers that came before reached 255 registers and a stack at 8x8x64 on
# 8 warps). The binned gather takes 25-163 registers across the compile matrix (sm_80/sm_90, triton 3.9), no
# spills (bench/README.md has the table).
GATHER_CONFIGS = {
    "channels_last": GatherConfig(tile_h=8, tile_w=8, max_block_c=64, num_warps=8),
    "contiguous": GatherConfig(tile_h=2, tile_w=32, max_block_c=32, num_warps=8),
    ("channels_last", torch.float64): GatherConfig(tile_h=4, tile_w=8, max_block_c=32, num_warps=16),
}
# align_fa_gather_backward_kernel: one kernel for three roles (the offsets' gradient, low's gather, high's), its
# registers the largest of the three. With the gathers' tiles, ptxas (triton 3.9) capped some at 64-128 registers and
# left 8-48 B stacks; offsets-gradient steps of 8 or 16 pixels, and fp64 on 4 warps, compile clean across the matrix.
FUSED_GATHER_CONFIGS = {
    "channels_last": GatherConfig(tile_h=8, tile_w=8, max_block_c=64, num_warps=8, pixel_block=8),
    "contiguous": GatherConfig(tile_h=2, tile_w=32, max_block_c=16, num_warps=8, pixel_block=16),
    ("channels_last", torch.float64): GatherConfig(tile_h=2, tile_w=8, max_block_c=32, num_warps=4, pixel_block=8),
    # contiguous fp64: no one config compiled clean for both archs (8-16 B stacks in one or the other)
    ("contiguous", torch.float64, 80): GatherConfig(tile_h=2, tile_w=32, max_block_c=8, num_warps=4),
    ("contiguous", torch.float64): GatherConfig(tile_h=2, tile_w=32, max_block_c=8, num_warps=4, pixel_block=8),
}
INTERPRETER_GATHER_CONFIG = GatherConfig(tile_h=16, tile_w=32, max_block_c=128, num_warps=1)
BIN_BLOCK_P = 256  # pixels per program of the bin keys


def gather_config(t: torch.Tensor, config: GatherConfig | None = None,
                  table: dict = GATHER_CONFIGS) -> GatherConfig:
    """``config`` if given, else the interpreter's, else ``table``'s for the layout, dtype (and target arch) of
    ``t``."""
    if config is not None:
        return config
    if interpreting():
        return INTERPRETER_GATHER_CONFIG
    layout = "channels_last" if contiguous_channels(t) else "contiguous"
    return table.get((layout, t.dtype, target_arch(t)), table.get((layout, t.dtype), table[layout]))


# ----------------------------------------------------------------------------------------------
# Kernel helpers: the weight a target row (or column) receives from one output pixel along one axis.


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


# Per output pixel q of image n: its bin, the first source cell its taps reach, (ylo, xlo), as
# n * th * tw + ylo * tw + xlo; a pixel whose taps all leave the map goes to bin N * th * tw, after every
# other. The taps of the pixels of bin b reach cells b .. b + SPAN - 1 along each axis. Grid: (pixel blocks, N).
@triton.jit
def pixel_bin_kernel(
    keys_ptr,  # [N * H * W] int32, pixel-major (n, i, j)
    offsets_ptr,  # [N, 2, H, W] (dx, dy); unused without HAS_OFFSETS
    off_stride_n, off_stride_c, off_stride_h, off_stride_w,
    H, W, th, tw,
    empty_bin,  # N * th * tw
    scale_x, scale_y,  # host fp32 scales: the source's (DIRECT) or the upsample's (COMPOSITE)
    BLOCK_P: tl.constexpr,
    MODE: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    rows, cols, mask_p = output_pixels(tl.program_id(0), H, W, BLOCK_P)
    if HAS_OFFSETS:
        at = offsets_ptr + n * off_stride_n + rows * off_stride_h + cols * off_stride_w
        dx = tl.load(at, mask=mask_p, other=0.0).to(ACC_DTYPE)
        dy = tl.load(at + off_stride_c, mask=mask_p, other=0.0).to(ACC_DTYPE)
    else:
        dx = tl.zeros(rows.shape, dtype=ACC_DTYPE)
        dy = tl.zeros(rows.shape, dtype=ACC_DTYPE)
    # (target - 1) / (out - 1): the source's scale (DIRECT) or the upsample's (COMPOSITE), the same rule.
    sx = align_corners_scale(tw, W, scale_x, ACC_DTYPE)
    sy = align_corners_scale(th, H, scale_y, ACC_DTYPE)
    ylo, yhi = reachable_targets(rows.to(ACC_DTYPE), dy, sy, H, th, MODE, ACC_DTYPE)
    xlo, xhi = reachable_targets(cols.to(ACC_DTYPE), dx, sx, W, tw, MODE, ACC_DTYPE)
    key = tl.where((ylo <= yhi) & (xlo <= xhi), (n * th + ylo) * tw + xlo, empty_bin)
    tl.store(keys_ptr + n * H * W + rows * W + cols, key.to(tl.int32), mask=mask_p)


@triton.jit
def accumulate_candidates(
    acc,  # [TILE, BLOCK_C] (or transposed) accumulator of the tile's source cells
    grad_at, shift_at,  # the output gradient and the (dx, dy) offsets of batch row n
    channel_at,  # [BLOCK_C] channel offsets into grad
    grad_stride_h, grad_stride_w,
    off_stride_c, off_stride_h, off_stride_w,
    qi, qj, valid,  # [TILE] int64 candidate output pixel of each source cell, and whether there is one
    ty, tx, mask_c,  # [TILE] source rows, columns; [BLOCK_C] channel mask
    H, W, th, tw,
    sx, sy,  # ACC_DTYPE scales
    MODE: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
    PIXELS_LAST: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """``acc`` plus w(q, t) * grad[q] for each cell t = (ty, tx) whose candidate q = (qi, qj) has a tap on t,
    tested with the forward's own tap arithmetic; the gradient is loaded only where it does."""
    if HAS_OFFSETS:
        q_at = shift_at + qi * off_stride_h + qj * off_stride_w
        dx = tl.load(q_at, mask=valid, other=0.0).to(ACC_DTYPE)
        dy = tl.load(q_at + off_stride_c, mask=valid, other=0.0).to(ACC_DTYPE)
    else:
        dx = tl.zeros(qi.shape, dtype=ACC_DTYPE)
        dy = tl.zeros(qi.shape, dtype=ACC_DTYPE)
    if MODE == 0:
        wy, hy = direct_axis_weight(qi.to(ACC_DTYPE), dy, sy, th, ty)
        wx, hx = direct_axis_weight(qj.to(ACC_DTYPE), dx, sx, tw, tx)
    else:
        wy, hy = composite_axis_weight(qi.to(ACC_DTYPE), dy, H, sy, th, ty, ACC_DTYPE)
        wx, hx = composite_axis_weight(qj.to(ACC_DTYPE), dx, W, sx, tw, tx, ACC_DTYPE)
    hit = valid & hy & hx
    ptrs = grad_at + tile_offsets(qi * grad_stride_h + qj * grad_stride_w, channel_at, PIXELS_LAST)
    g = tl.load(ptrs, mask=tile_mask(hit, mask_c, PIXELS_LAST), other=0.0).to(ACC_DTYPE)
    return acc + per_pixel(wy * wx, PIXELS_LAST) * g


@triton.jit
def gather_bins(
    acc,  # [TILE, BLOCK_C] (or transposed) accumulator of the tile's source cells
    grad_at, shift_at, channel_at,  # as in accumulate_candidates
    order_ptr, starts_ptr,  # the pixel bins (PixelBins)
    grad_stride_h, grad_stride_w,
    off_stride_c, off_stride_h, off_stride_w,
    n, ty, tx, mask_t, mask_c,  # int64 image; [TILE] source rows, columns, mask; [BLOCK_C] channel mask
    H, W, th, tw,
    sx, sy,  # ACC_DTYPE scales
    SPAN_Y: tl.constexpr,
    SPAN_X: tl.constexpr,
    MODE: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
    PIXELS_LAST: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    """``acc`` plus the contributions of the pixels of the bins ``t - (a, b)``, 0 <= a < SPAN_Y, 0 <= b < SPAN_X,
    to each cell t of the tile: bins in that order, each bin's pixels by ascending index. Each step takes, per
    cell, the next pixel of the current bin, for as many steps as the tile's fullest bin holds pixels."""
    for s in range(SPAN_Y * SPAN_X):
        by = ty - s // SPAN_X
        bx = tx - s % SPAN_X
        has_bin = mask_t & (by >= 0) & (bx >= 0)
        bin_at = starts_ptr + (n * th + by) * tw + bx
        start = tl.load(bin_at, mask=has_bin, other=0)
        count = tl.load(bin_at + 1, mask=has_bin, other=0) - start
        for k in range(0, tl.max(count, axis=0)):
            valid = k < count
            q = tl.load(order_ptr + start + k, mask=valid, other=0)
            qi = q // W
            acc = accumulate_candidates(acc, grad_at, shift_at, channel_at, grad_stride_h, grad_stride_w,
                                        off_stride_c, off_stride_h, off_stride_w,
                                        qi.to(tl.int64), (q - qi * W).to(tl.int64), valid, ty, tx, mask_c,
                                        H, W, th, tw, sx, sy, MODE, HAS_OFFSETS, PIXELS_LAST, ACC_DTYPE)
    return acc


# grad_src[n, c, t] for every source cell t of a TILE_H x TILE_W tile, from the output pixels listed in the
# bins t - (a, b), 0 <= a < SPAN_Y, 0 <= b < SPAN_X (pixel_bin_kernel: a pixel of bin s reaches cells s .. s +
# SPAN - 1 per axis), visited in a fixed order (gather_bins) and stored once.
# Grid: (tiles, channel blocks, N).
@triton.jit
def binned_transpose_kernel(
    out_ptr,  # [N, C, th, tw] the source gradient, in its own dtype
    grad_ptr,  # [N, C, H, W] gradient of the output
    offsets_ptr,  # [N, 2, H, W] (dx, dy); unused without HAS_OFFSETS
    order_ptr,  # [N * H * W] int32: each image's pixels i * W + j, by bin, ascending within one
    starts_ptr,  # [N * th * tw + 1] int32: bin b holds order[starts[b]:starts[b + 1]]
    out_stride_n, out_stride_c, out_stride_h, out_stride_w,
    grad_stride_n, grad_stride_c, grad_stride_h, grad_stride_w,
    off_stride_n, off_stride_c, off_stride_h, off_stride_w,
    C, H, W, th, tw,
    scale_x, scale_y,  # host fp32 scales: the source's (DIRECT) or the upsample's (COMPOSITE)
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
    SPAN_Y: tl.constexpr,  # source cells a pixel's taps reach per axis from its bin's cell (bin_span)
    SPAN_X: tl.constexpr,
    MODE: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,
    PIXELS_LAST: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    n = tl.program_id(2).to(tl.int64)
    tiles_w = tl.cdiv(tw, TILE_W)
    tile = tl.program_id(0)
    r = tl.arange(0, TILE_H * TILE_W)
    ty = (tile // tiles_w) * TILE_H + r // TILE_W
    tx = (tile % tiles_w) * TILE_W + r % TILE_W
    mask_t = (ty < th) & (tx < tw)
    channels = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = channels < C
    sx = align_corners_scale(tw, W, scale_x, ACC_DTYPE)
    sy = align_corners_scale(th, H, scale_y, ACC_DTYPE)
    grad_at = grad_ptr + n * grad_stride_n
    shift_at = offsets_ptr + n * off_stride_n
    channel_at = channels * grad_stride_c
    acc = gather_bins(zero_tile(ty, channels, ACC_DTYPE, PIXELS_LAST), grad_at, shift_at, channel_at, order_ptr,
                      starts_ptr, grad_stride_h, grad_stride_w, off_stride_c, off_stride_h, off_stride_w,
                      n, ty, tx, mask_t, mask_c, H, W, th, tw, sx, sy,
                      SPAN_Y, SPAN_X, MODE, HAS_OFFSETS, PIXELS_LAST, ACC_DTYPE)
    ptrs = out_ptr + n * out_stride_n + tile_offsets(ty.to(tl.int64) * out_stride_h + tx.to(tl.int64) * out_stride_w,
                                                     channels * out_stride_c, PIXELS_LAST)
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=tile_mask(mask_t, mask_c, PIXELS_LAST))


# The whole deterministic AlignFA backward in one launch. Each TILE_H x TILE_W tile of output pixels (which are
# also the cells of low: the same grid) has 1 + 2 x (channel blocks) programs, adjacent in the grid:
# * role 0 writes the offsets' gradient of its pixels (align_fa.pixel_block_backward with the scatter off),
#   PIXEL_BLOCK pixels at a time over all channels, as the per-pixel backward kernel does;
# * per channel block, one program gathers grad_low over the tile from the low bins (DIRECT), and one grad_high
#   over a tile of as many coarse cells from the high bins (HIGH_MODE). A coarse tile covers group_h x group_w
#   fine tiles (2 x 2 at a 2x upsample): the first fine tile of each group runs it, the others mask it.
# A tile's programs run side by side and read the same rows of grad, so after the first read they come from L2
# (neighbouring tiles share the halos): about one read of grad from memory, not three (bench/README.md's bytes
# model). Every sum runs in a fixed order: bitwise reproducible.
# Grid: (tile rows x tile columns x roles, N), over enough fine tiles for both maps; a program past either masks it.
@triton.jit
def align_fa_gather_backward_kernel(
    grad_low_ptr,  # [N, C, H, W] written once, in low's dtype
    grad_high_ptr,  # [N, C, h, w] written once, in high's dtype
    grad_offsets_ptr,  # [N, 4, H, W] written once per pixel
    grad_ptr,  # [N, C, H, W] gradient of the output
    low_ptr,  # [N, C, H, W]
    high_ptr,  # [N, C, h, w]
    offsets_ptr,  # [N, 4, H, W]: (dx, dy) of high, then of low
    low_order_ptr, low_starts_ptr,  # the pixel bins over low's cells (PixelBins, DIRECT)
    high_order_ptr, high_starts_ptr,  # the pixel bins over high's cells (PixelBins, HIGH_MODE)
    gl_stride_n, gl_stride_c, gl_stride_h, gl_stride_w,
    gh_stride_n, gh_stride_c, gh_stride_h, gh_stride_w,
    go_stride_n, go_stride_c, go_stride_h, go_stride_w,
    grad_stride_n, grad_stride_c, grad_stride_h, grad_stride_w,
    low_stride_n, low_stride_c, low_stride_h, low_stride_w,
    high_stride_n, high_stride_c, high_stride_h, high_stride_w,
    off_stride_n, off_stride_c, off_stride_h, off_stride_w,
    C, H, W, h, w,
    high_scale_x, high_scale_y,  # host fp32 align-corners scales of high (the upsample's, or the one-step sample's)
    low_scale_x, low_scale_y,  # host fp32 scales of low (1, or 0 for a size of 1)
    tiles_w,  # tile columns of the grid
    group_h, group_w,  # fine tiles per coarse tile along each axis (tile_group)
    roles,  # programs per tile: 1 (the offsets' gradient) + 2 per channel block (low's gather, high's)
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    BLOCK_C: tl.constexpr,  # channels per gather step
    PIXEL_BLOCK: tl.constexpr,  # pixels per step of the offsets' gradient (divides TILE_H * TILE_W)
    PIXEL_BLOCK_C: tl.constexpr,  # its channels per step
    HIGH_SPAN_Y: tl.constexpr,  # bin_span of the high bins
    HIGH_SPAN_X: tl.constexpr,
    HIGH_MODE: tl.constexpr,  # COMPOSITE (UPSAMPLE_FIRST) or DIRECT
    ACC_DTYPE: tl.constexpr,
    UPSAMPLE_FIRST: tl.constexpr,
    MERGED_CELLS: tl.constexpr,
    PIXELS_LAST: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    tile = tl.program_id(0) // roles
    role = tl.program_id(0) % roles
    tile_y = tile // tiles_w
    tile_x = tile % tiles_w
    if role == 0:
        for p0 in range(0, TILE_H * TILE_W, PIXEL_BLOCK):
            rp = p0 + tl.arange(0, PIXEL_BLOCK)
            rows = tile_y * TILE_H + rp // TILE_W
            cols = tile_x * TILE_W + rp % TILE_W
            pixel_block_backward(grad_low_ptr, grad_high_ptr, grad_offsets_ptr, grad_ptr, low_ptr, high_ptr,
                                 offsets_ptr,
                                 gl_stride_n, gl_stride_c, gl_stride_h, gl_stride_w,
                                 gh_stride_n, gh_stride_c, gh_stride_h, gh_stride_w,
                                 go_stride_n, go_stride_c, go_stride_h, go_stride_w,
                                 grad_stride_n, grad_stride_c, grad_stride_h, grad_stride_w,
                                 low_stride_n, low_stride_c, low_stride_h, low_stride_w,
                                 high_stride_n, high_stride_c, high_stride_h, high_stride_w,
                                 off_stride_n, off_stride_c, off_stride_h, off_stride_w,
                                 C, H, W, h, w, high_scale_x, high_scale_y,
                                 n, rows.to(tl.int64), cols.to(tl.int64), (rows < H) & (cols < W),
                                 PIXEL_BLOCK, PIXEL_BLOCK_C, ACC_DTYPE, UPSAMPLE_FIRST, MERGED_CELLS, False,
                                 PIXELS_LAST)
    else:
        channels = ((role - 1) // 2).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = channels < C
        channel_at = channels * grad_stride_c
        grad_at = grad_ptr + n * grad_stride_n
        shift_at = offsets_ptr + n * off_stride_n
        if role % 2 == 1:
            rl = tl.arange(0, TILE_H * TILE_W)
            ty = tile_y * TILE_H + rl // TILE_W
            tx = tile_x * TILE_W + rl % TILE_W
            mask_t = (ty < H) & (tx < W)
            acc_low = gather_bins(zero_tile(ty, channels, ACC_DTYPE, PIXELS_LAST), grad_at,
                                  shift_at + channel_offset(2, off_stride_c), channel_at, low_order_ptr, low_starts_ptr,
                                  grad_stride_h, grad_stride_w, off_stride_c, off_stride_h, off_stride_w,
                                  n, ty, tx, mask_t, mask_c, H, W, H, W,
                                  align_corners_scale(W, W, low_scale_x, ACC_DTYPE),
                                  align_corners_scale(H, H, low_scale_y, ACC_DTYPE),
                                  2, 2, 0, True, PIXELS_LAST, ACC_DTYPE)
            low_pixels = ty.to(tl.int64) * gl_stride_h + tx.to(tl.int64) * gl_stride_w
            tl.store(grad_low_ptr + n * gl_stride_n + tile_offsets(low_pixels, channels * gl_stride_c, PIXELS_LAST),
                     acc_low.to(grad_low_ptr.dtype.element_ty), mask=tile_mask(mask_t, mask_c, PIXELS_LAST))
        else:
            # the first program of a group_h x group_w group of fine tiles runs high's tile over their region; in
            # the others every lane is masked (no bin is read, no step taken)
            rh = tl.arange(0, TILE_H * TILE_W)
            first = (tile_y % group_h + tile_x % group_w) == 0
            hy = tl.where(first, (tile_y // group_h) * TILE_H + rh // TILE_W, h)
            hx = (tile_x // group_w) * TILE_W + rh % TILE_W
            mask_h = (hy < h) & (hx < w)
            acc_high = gather_bins(zero_tile(hy, channels, ACC_DTYPE, PIXELS_LAST), grad_at, shift_at, channel_at,
                                   high_order_ptr, high_starts_ptr, grad_stride_h, grad_stride_w,
                                   off_stride_c, off_stride_h, off_stride_w, n, hy, hx, mask_h, mask_c, H, W, h, w,
                                   align_corners_scale(w, W, high_scale_x, ACC_DTYPE),
                                   align_corners_scale(h, H, high_scale_y, ACC_DTYPE),
                                   HIGH_SPAN_Y, HIGH_SPAN_X, HIGH_MODE, True, PIXELS_LAST, ACC_DTYPE)
            high_pixels = hy.to(tl.int64) * gh_stride_h + hx.to(tl.int64) * gh_stride_w
            tl.store(grad_high_ptr + n * gh_stride_n + tile_offsets(high_pixels, channels * gh_stride_c, PIXELS_LAST),
                     acc_high.to(grad_high_ptr.dtype.element_ty), mask=tile_mask(mask_h, mask_c, PIXELS_LAST))


# ----------------------------------------------------------------------------------------------
# Launchers.


def _scales(out_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[float, float]:
    """(scale_x, scale_y) for fp32 kernels: the source's align-corners scale (DIRECT) or the upsample's (COMPOSITE)."""
    (H, W), (th, tw) = out_hw, target_hw
    return host_scale(tw, W), host_scale(th, H)


def bin_span(out_size: int, target_size: int, mode: int) -> int:
    """Source cells along one axis that the taps of one output pixel reach from its bin's cell.

    DIRECT: two taps. COMPOSITE: two fine taps, each upsampled from two coarse cells; a coarse map no larger
    than the output puts them at most one cell apart (3 in all), a larger one up to ``ceil(scale)``, plus one
    cell for the fp32 rounding of ``p * scale`` near an integer (the hit test is exact, so a wider span only
    costs steps).
    """
    if mode == DIRECT:
        return 2
    if target_size <= out_size:
        return 3
    return math.ceil((target_size - 1) / max(out_size - 1, 1)) + 3


@dataclasses.dataclass(frozen=True)
class PixelBins:
    """The output pixels grouped by the first source cell their taps reach (:func:`pixel_bin_kernel`)."""

    order: torch.Tensor  # [N * H * W] int32: each image's pixel indices i * W + j, by bin, ascending within one
    starts: torch.Tensor  # [N * th * tw + 1] int32: bin b holds order[starts[b]:starts[b + 1]]


def plan_pixel_bins(offsets2: torch.Tensor | None, keys: torch.Tensor, out_hw: tuple[int, int],
                    target_hw: tuple[int, int], mode: int = DIRECT) -> KernelLaunch:
    """The launch of :func:`pixel_bin_kernel`: each output pixel's bin into ``keys`` [N * H * W] int32."""
    H, W = out_hw
    th, tw = target_hw
    n = keys.numel() // (H * W)
    sx, sy = _scales(out_hw, target_hw)
    off = offsets2 if offsets2 is not None else keys  # a placeholder pointer without offsets
    return KernelLaunch(
        pixel_bin_kernel,
        grid=(triton.cdiv(H * W, BIN_BLOCK_P), n),
        args=(keys, off, *(strides(offsets2) if offsets2 is not None else (0, 0, 0, 0)),
              H, W, th, tw, n * th * tw, sx, sy),
        constexprs=dict(BLOCK_P=BIN_BLOCK_P, MODE=mode, HAS_OFFSETS=offsets2 is not None,
                        ACC_DTYPE=accumulation_dtype(offsets2.dtype if offsets2 is not None else torch.float32)[1]),
        num_warps=4,
    )


def pixel_bins(offsets2: torch.Tensor | None, n: int, out_hw: tuple[int, int], target_hw: tuple[int, int],
               mode: int = DIRECT, device: torch.device | None = None) -> PixelBins:
    """Bin the N x H x W output pixels by the first source cell their taps reach, on the device (no host read).

    ``offsets2``: [N, 2, H, W] (dx, dy), or None for zero offsets. A stable sort of the bin keys orders each
    bin's pixels by index, so the gather's order of addition is the same on every run; ``searchsorted`` finds
    where each bin starts.
    """
    H, W = out_hw
    bins = n * target_hw[0] * target_hw[1]
    if max(bins + 1, n * H * W) >= 2**31:
        raise ValueError(f"the gather's pixel bins index in int32: {n} images of {H}x{W} pixels and "
                         f"{target_hw[0]}x{target_hw[1]} cells are too many")
    device = offsets2.device if offsets2 is not None else device
    keys = torch.empty(n * H * W, dtype=torch.int32, device=device)
    plan_pixel_bins(offsets2, keys, out_hw, target_hw, mode)()
    sorted_keys, order = torch.sort(keys, stable=True)
    starts = torch.searchsorted(sorted_keys, torch.arange(bins + 1, dtype=torch.int32, device=device),
                                out_int32=True)
    return PixelBins(order=order.remainder_(H * W).to(torch.int32), starts=starts)


def plan_binned_transpose(grad: torch.Tensor, offsets2: torch.Tensor | None, out: torch.Tensor, bins: PixelBins,
                          mode: int = DIRECT, config: GatherConfig | None = None) -> KernelLaunch:
    """The launch of :func:`binned_transpose_kernel` into ``out`` [N, C, th, tw] from ``bins`` (:func:`pixel_bins`)."""
    check_index_range("grad", grad)
    check_index_range("out", out)
    n, c, H, W = grad.shape
    th, tw = out.shape[-2:]
    cfg = gather_config(grad, config)
    block_c = channel_block(c, cfg)
    sx, sy = _scales((H, W), (th, tw))
    off = offsets2 if offsets2 is not None else grad  # a placeholder pointer without offsets
    return KernelLaunch(
        binned_transpose_kernel,
        grid=(triton.cdiv(th, cfg.tile_h) * triton.cdiv(tw, cfg.tile_w), triton.cdiv(c, block_c), n),
        args=(out, grad, off, bins.order, bins.starts, *strides(out), *strides(grad),
              *(strides(offsets2) if offsets2 is not None else (0, 0, 0, 0)), c, H, W, th, tw, sx, sy),
        constexprs=dict(TILE_H=cfg.tile_h, TILE_W=cfg.tile_w, BLOCK_C=block_c, SPAN_Y=bin_span(H, th, mode),
                        SPAN_X=bin_span(W, tw, mode), MODE=mode, HAS_OFFSETS=offsets2 is not None,
                        PIXELS_LAST=pixels_last(grad), ACC_DTYPE=accumulation_dtype(out.dtype)[1]),
        num_warps=cfg.num_warps,
    )


def binned_transpose(grad: torch.Tensor, offsets2: torch.Tensor | None, out: torch.Tensor, mode: int = DIRECT,
                     config: GatherConfig | None = None) -> torch.Tensor:
    """The gather into ``out`` [N, C, th, tw] over the pixel bins: deterministic, no host read."""
    n, _, H, W = grad.shape
    bins = pixel_bins(offsets2, n, (H, W), tuple(out.shape[-2:]), mode, grad.device)
    plan_binned_transpose(grad, offsets2, out, bins, mode, config)()
    return out


def _empty_source(grad: torch.Tensor, size: tuple[int, int], dtype: torch.dtype | None,
                  like: torch.Tensor | None = None) -> torch.Tensor:
    """An uninitialised [N, C, *size] gradient in ``like``'s (else ``grad``'s) layout and dtype."""
    ref = like if like is not None else grad
    fmt = torch.channels_last if contiguous_channels(ref) and ref.dim() == 4 else torch.contiguous_format
    return torch.empty(*grad.shape[:2], *size, dtype=dtype or ref.dtype, device=grad.device, memory_format=fmt)


# ----------------------------------------------------------------------------------------------
# Public functions.


def warp_transpose(grad: torch.Tensor, offsets2: torch.Tensor, out_dtype: torch.dtype | None = None,
                   config: GatherConfig | None = None) -> torch.Tensor:
    """Transpose of the same-size warp ``W(src, d)``: the gradient of ``src``.

    Args:
        grad (Tensor[N, C, H, W]): gradient of ``W(src, offsets2)``.
        offsets2 (Tensor[N, 2, H, W]): (dx, dy) in pixels (a channel slice of AlignFA's offsets is fine).
        out_dtype: default ``grad``'s dtype.

    Returns:
        Tensor[N, C, H, W] in ``grad``'s memory format:
        ``out[t] = sum over q, k with tap_k(q) == t of w_k(q) * grad[q]``.
    """
    out = _empty_source(grad, tuple(grad.shape[-2:]), out_dtype)
    return binned_transpose(grad, offsets2, out, DIRECT, config)


def sample_transpose(grad: torch.Tensor, offsets2: torch.Tensor, src_hw: tuple[int, int],
                     out_dtype: torch.dtype | None = None, like: torch.Tensor | None = None,
                     config: GatherConfig | None = None) -> torch.Tensor:
    """Transpose of the one-step sampling ``S(src, d)`` of a source of size ``src_hw``: Tensor[N, C, *src_hw].

    ``like``: a tensor whose memory format (and dtype, unless ``out_dtype``) the result takes.
    """
    out = _empty_source(grad, tuple(src_hw), out_dtype, like)
    return binned_transpose(grad, offsets2, out, DIRECT, config)


def upsample_warp_transpose(grad: torch.Tensor, offsets2: torch.Tensor, src_hw: tuple[int, int],
                            out_dtype: torch.dtype | None = None, like: torch.Tensor | None = None,
                            config: GatherConfig | None = None) -> torch.Tensor:
    """``U^T W^T grad`` in one gather: the coarse gradient of the authors' ``W(U(high), d)``, Tensor[N, C, *src_hw].

    The upsampled map's gradient is never written (see the module docstring).
    """
    out = _empty_source(grad, tuple(src_hw), out_dtype, like)
    return binned_transpose(grad, offsets2, out, COMPOSITE, config)


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
    return binned_transpose(grad_up, None, out, DIRECT, config)


def tile_group(out_size: int, target_size: int) -> int:
    """Fine tiles per coarse tile along one axis: a coarse tile of as many cells as a fine one covers about
    (out_size - 1) / (target_size - 1) fine tiles (1 where the coarse map is not smaller)."""
    if target_size >= out_size:
        return 1
    return max(1, round((out_size - 1) / max(target_size - 1, 1)))


def plan_align_fa_gather_backward(grad: torch.Tensor, low: torch.Tensor, high: torch.Tensor, offsets: torch.Tensor,
                                  outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], low_bins: PixelBins,
                                  high_bins: PixelBins, upsample_first: bool = True,
                                  config: GatherConfig | None = None) -> KernelLaunch:
    """The launch of :func:`align_fa_gather_backward_kernel` into ``outputs`` = (grad_low, grad_high, grad_offsets),
    from the bins of low's cells (DIRECT) and of high's (COMPOSITE if ``upsample_first``, else DIRECT)."""
    check_index_range("grad", grad)
    check_index_range("high", high)
    grad_low, grad_high, grad_offsets = outputs
    n, c, H, W = grad.shape
    h, w = high.shape[-2:]
    cfg = gather_config(grad, config, FUSED_GATHER_CONFIGS)
    pixel_cfg = launch_config(backward_config_name(low, high, upsample_first), low)
    group_h = min(tile_group(H, h), triton.cdiv(H, cfg.tile_h))
    group_w = min(tile_group(W, w), triton.cdiv(W, cfg.tile_w))
    tiles_h = max(triton.cdiv(H, cfg.tile_h), triton.cdiv(h, cfg.tile_h) * group_h)
    tiles_w = max(triton.cdiv(W, cfg.tile_w), triton.cdiv(w, cfg.tile_w) * group_w)
    high_mode = COMPOSITE if upsample_first else DIRECT
    block_c = channel_block(c, cfg)
    roles = 1 + 2 * triton.cdiv(c, block_c)
    (high_sx, high_sy), (low_sx, low_sy) = _scales((H, W), (h, w)), _scales((H, W), (H, W))
    return KernelLaunch(
        align_fa_gather_backward_kernel,
        grid=(tiles_h * tiles_w * roles, n),
        args=(grad_low, grad_high, grad_offsets, grad, low, high, offsets,
              low_bins.order, low_bins.starts, high_bins.order, high_bins.starts,
              *strides(grad_low), *strides(grad_high), *strides(grad_offsets), *strides(grad), *strides(low),
              *strides(high), *strides(offsets), c, H, W, h, w, high_sx, high_sy, low_sx, low_sy, tiles_w, group_h,
              group_w, roles),
        constexprs=dict(TILE_H=cfg.tile_h, TILE_W=cfg.tile_w,
                        BLOCK_C=block_c, PIXEL_BLOCK=min(cfg.pixel_block or pixel_cfg.block_p, cfg.tile_h * cfg.tile_w),
                        PIXEL_BLOCK_C=min(cfg.pixel_block_c or pixel_cfg.max_block_c, channel_block(c, pixel_cfg)),
                        HIGH_SPAN_Y=bin_span(H, h, high_mode),
                        HIGH_SPAN_X=bin_span(W, w, high_mode), HIGH_MODE=high_mode,
                        ACC_DTYPE=accumulation_dtype(low.dtype)[1], UPSAMPLE_FIRST=bool(upsample_first),
                        MERGED_CELLS=merged_cells(low, high, upsample_first), PIXELS_LAST=pixels_last(grad)),
        num_warps=cfg.num_warps,
    )


def align_fa_backward_deterministic(
    grad: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    offsets: torch.Tensor,
    upsample_first: bool = True,
    config: GatherConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_low, grad_high, grad_offsets)`` of AlignFA, bitwise reproducible, the sources' gradients in their
    inputs' dtypes and layouts.

    ``upsample_first=True``: the authors' ``W(U(high), offsets[:, 0:2]) + W(low, offsets[:, 2:4])``;
    ``False``: the one-step ``S(high, offsets[:, 0:2]) + S(low, offsets[:, 2:4])``. The pixel bins of both
    maps (:func:`pixel_bins`), then one launch (:func:`align_fa_gather_backward_kernel`) for all three gradients;
    no host read.
    """
    check_index_range("low", low)
    n, _, H, W = grad.shape
    h, w = high.shape[-2:]
    low_bins = pixel_bins(offsets[:, 2:4], n, (H, W), (H, W), DIRECT)
    high_bins = pixel_bins(offsets[:, 0:2], n, (H, W), (h, w), COMPOSITE if upsample_first else DIRECT)
    outputs = (_empty_source(grad, (H, W), low.dtype, low), _empty_source(grad, (h, w), high.dtype, high),
               torch.empty_like(offsets))
    plan_align_fa_gather_backward(grad, low, high, offsets, outputs, low_bins, high_bins, upsample_first, config)()
    return outputs
