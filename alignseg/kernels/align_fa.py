"""AlignFA kernels, forward and backward, in two forms selected by the constexpr ``UPSAMPLE_FIRST``:

* ``True`` (the authors' function): ``out = W(U(high), offsets[:, 0:2]) + W(low, offsets[:, 2:4])``, the
  same-size warp ``W`` of the align-corners upsampling ``U(high)`` to low's size, with ``U`` evaluated
  from the coarse map at each in-range warp tap (never stored). With ``MERGED_CELLS`` (a coarse map no larger
  than low, :func:`merged_cells`) a pixel's 4 warp taps times U's 4 coarse taps fall on at most 3x3 coarse
  cells with separable weights, so the kernels read (and the backward scatters into) 9 cells, not 16;
* ``False`` (the one-step variant): ``out = S(high, offsets[:, 0:2]) + S(low, offsets[:, 2:4])``.

``S``, ``W`` (``S`` of a map as large as the output) and ``U`` are the bilinear rules of
:mod:`alignseg.kernels.bilinear`. Every feature tensor is addressed through its own (n, c, h, w)
strides, so one kernel serves contiguous and channels_last maps; the tiles' orientation (``PIXELS_LAST``,
see :mod:`alignseg.kernels.bilinear`) lets a warp read a channels_last map's channel vectors or a contiguous
map's neighbouring pixels. channels_last is the fast path (each tap is a contiguous channel vector).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .bilinear import (
    align_corners_scale,
    channel_offset,
    load_shift,
    output_pixels,
    per_pixel,
    sample_tile,
    scatter_tile,
    source_coordinate,
    tap_gradients,
    tile_mask,
    tile_pointers,
    unit_scale,
    upsampled_cell_gradients,
    upsampled_cell_sample_tile,
    upsampled_sample_tile,
    upsampled_tap,
    upsampled_tap_gradients,
)
from .fixed_point import SCATTER_FIXED, SCATTER_FLOAT, finalize, fixed_point_buffers, fixed_point_scale
from .launch import (
    KernelLaunch,
    LaunchConfig,
    accumulation_dtype,
    channel_block,
    check_index_range,
    launch_config,
    pixels_last,
    strides,
)
from .launch import align_corners_scale as host_scale
from .relayout import relayout_like


# high's warp taps at a block of output pixels (offset channels 0, 1), shared by the kernels below.
@triton.jit
def high_warp_taps(shift_ptr, off_stride_c, shift_at, mask_p, rows_acc, cols_acc, sx_high, sy_high, H, W, h, w,
                   UPSAMPLE_FIRST: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """(x0, y0, fx, fy, sx_warp, sy_warp): the corners and fractions of high's warp taps on U(high)'s (H, W) grid
    (UPSAMPLE_FIRST: high's offsets warp U(high), a map of low's size) or on high's own grid, and that grid's
    scales (the offsets' gradient is scaled by them)."""
    if UPSAMPLE_FIRST:
        sx_warp, sy_warp, warp_h, warp_w = unit_scale(W, ACC_DTYPE), unit_scale(H, ACC_DTYPE), H, W
    else:
        sx_warp, sy_warp, warp_h, warp_w = sx_high, sy_high, h, w
    x0, fx = source_coordinate(cols_acc, load_shift(shift_ptr, 0, off_stride_c, shift_at, mask_p, ACC_DTYPE),
                               sx_warp, warp_w)
    y0, fy = source_coordinate(rows_acc, load_shift(shift_ptr, 1, off_stride_c, shift_at, mask_p, ACC_DTYPE),
                               sy_warp, warp_h)
    return x0, y0, fx, fy, sx_warp, sy_warp


# out[n, c, i, j] = sum over the 4 taps t of high: w_t * high[n, c, t] + the same over the taps of low
# (UPSAMPLE_FIRST: the taps t lie on U(high)'s fine grid and each is U's own 4-tap sum over high).
# Grid: (pixel blocks, channel blocks, N); a program loads its pixels' four offsets once.
@triton.jit
def align_fa_forward_kernel(
    out_ptr,  # [N, C, H, W] output, low's memory format
    low_ptr,  # [N, C, H, W] fine map
    high_ptr,  # [N, C, h, w] coarse map
    offsets_ptr,  # [N, 4, H, W] (dx, dy) for high, then (dx, dy) for low
    out_stride_n, out_stride_c, out_stride_h, out_stride_w,
    low_stride_n, low_stride_c, low_stride_h, low_stride_w,
    high_stride_n, high_stride_c, high_stride_h, high_stride_w,
    off_stride_n, off_stride_c, off_stride_h, off_stride_w,
    C, H, W, h, w,
    high_scale_x, high_scale_y,  # align-corners scales of high, fp32 (see align_corners_scale)
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    UPSAMPLE_FIRST: tl.constexpr,
    MERGED_CELLS: tl.constexpr,  # UPSAMPLE_FIRST with h <= H and w <= W (see merged_cells)
    PIXELS_LAST: tl.constexpr,
):
    n = tl.program_id(2).to(tl.int64)
    rows, cols, mask_p = output_pixels(tl.program_id(0), H, W, BLOCK_P)
    channels = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = channels < C

    shift_ptr = offsets_ptr + n * off_stride_n
    shift_at = rows * off_stride_h + cols * off_stride_w
    rows_acc = rows.to(ACC_DTYPE)
    cols_acc = cols.to(ACC_DTYPE)

    sx_high = align_corners_scale(w, W, high_scale_x, ACC_DTYPE)
    sy_high = align_corners_scale(h, H, high_scale_y, ACC_DTYPE)
    x0, y0, fx, fy, _, _ = high_warp_taps(shift_ptr, off_stride_c, shift_at, mask_p, rows_acc, cols_acc, sx_high,
                                          sy_high, H, W, h, w, UPSAMPLE_FIRST, ACC_DTYPE)
    if MERGED_CELLS:
        acc = upsampled_cell_sample_tile(high_ptr + n * high_stride_n, channels, high_stride_c, high_stride_h,
                                         high_stride_w, x0, y0, fx, fy, H, W, sx_high, sy_high, h, w, mask_p, mask_c,
                                         PIXELS_LAST)
    elif UPSAMPLE_FIRST:
        acc = upsampled_sample_tile(high_ptr + n * high_stride_n, channels, high_stride_c, high_stride_h, high_stride_w,
                                    x0, y0, fx, fy, H, W, sx_high, sy_high, h, w, mask_p, mask_c, PIXELS_LAST)
    else:
        acc = sample_tile(high_ptr + n * high_stride_n, channels, high_stride_c, high_stride_h, high_stride_w,
                          x0, y0, fx, fy, h, w, mask_p, mask_c, PIXELS_LAST)

    x0, fx = source_coordinate(cols_acc, load_shift(shift_ptr, 2, off_stride_c, shift_at, mask_p, ACC_DTYPE),
                               unit_scale(W, ACC_DTYPE), W)
    y0, fy = source_coordinate(rows_acc, load_shift(shift_ptr, 3, off_stride_c, shift_at, mask_p, ACC_DTYPE),
                               unit_scale(H, ACC_DTYPE), H)
    acc += sample_tile(low_ptr + n * low_stride_n, channels, low_stride_c, low_stride_h, low_stride_w,
                       x0, y0, fx, fy, H, W, mask_p, mask_c, PIXELS_LAST)

    out_ptrs = tile_pointers(out_ptr + n * out_stride_n, rows * out_stride_h + cols * out_stride_w,
                             channels * out_stride_c, PIXELS_LAST)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=tile_mask(mask_p, mask_c, PIXELS_LAST))


# The per-pixel backward of one block of output pixels (rows, cols, mask_p) of image n: writes their four offset
# gradients, and with SCATTER_SOURCES scatters d out / d low and d out / d high (see align_fa_backward_kernel).
# Shared by align_fa_backward_kernel and the deterministic gather backward (align_fa_gather.py), which runs it
# over the pixels of its tile with the scatter off.
@triton.jit
def pixel_block_backward(
    grad_low_ptr, grad_high_ptr, grad_offsets_ptr, grad_ptr, low_ptr, high_ptr, offsets_ptr,
    gl_stride_n, gl_stride_c, gl_stride_h, gl_stride_w,
    gh_stride_n, gh_stride_c, gh_stride_h, gh_stride_w,
    go_stride_n, go_stride_c, go_stride_h, go_stride_w,
    grad_stride_n, grad_stride_c, grad_stride_h, grad_stride_w,
    low_stride_n, low_stride_c, low_stride_h, low_stride_w,
    high_stride_n, high_stride_c, high_stride_h, high_stride_w,
    off_stride_n, off_stride_c, off_stride_h, off_stride_w,
    C, H, W, h, w,
    high_scale_x, high_scale_y,
    n, rows, cols, mask_p,  # int64 image; [BLOCK_P] int64 rows and columns and their mask
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    UPSAMPLE_FIRST: tl.constexpr,
    MERGED_CELLS: tl.constexpr,
    SCATTER_SOURCES: tl.constexpr,
    PIXELS_LAST: tl.constexpr,
):
    shift_ptr = offsets_ptr + n * off_stride_n
    shift_at = rows * off_stride_h + cols * off_stride_w
    rows_acc = rows.to(ACC_DTYPE)
    cols_acc = cols.to(ACC_DTYPE)
    sx_high = align_corners_scale(w, W, high_scale_x, ACC_DTYPE)
    sy_high = align_corners_scale(h, H, high_scale_y, ACC_DTYPE)
    sx_low = unit_scale(W, ACC_DTYPE)
    sy_low = unit_scale(H, ACC_DTYPE)
    hx0, hy0, hfx, hfy, sx_warp, sy_warp = high_warp_taps(shift_ptr, off_stride_c, shift_at, mask_p, rows_acc,
                                                          cols_acc, sx_high, sy_high, H, W, h, w, UPSAMPLE_FIRST,
                                                          ACC_DTYPE)
    lx0, lfx = source_coordinate(cols_acc, load_shift(shift_ptr, 2, off_stride_c, shift_at, mask_p, ACC_DTYPE),
                                 sx_low, W)
    ly0, lfy = source_coordinate(rows_acc, load_shift(shift_ptr, 3, off_stride_c, shift_at, mask_p, ACC_DTYPE),
                                 sy_low, H)

    grad_at = grad_ptr + n * grad_stride_n
    grad_pixel_at = rows * grad_stride_h + cols * grad_stride_w
    high_dfx = tl.zeros((BLOCK_P,), dtype=ACC_DTYPE)
    high_dfy = tl.zeros((BLOCK_P,), dtype=ACC_DTYPE)
    low_dfx = tl.zeros((BLOCK_P,), dtype=ACC_DTYPE)
    low_dfy = tl.zeros((BLOCK_P,), dtype=ACC_DTYPE)
    for c_start in range(0, C, BLOCK_C):
        channels = c_start + tl.arange(0, BLOCK_C).to(tl.int64)
        mask_c = channels < C
        grad = tl.load(tile_pointers(grad_at, grad_pixel_at, channels * grad_stride_c, PIXELS_LAST),
                       mask=tile_mask(mask_p, mask_c, PIXELS_LAST), other=0.0)
        grad = grad.to(ACC_DTYPE)
        if MERGED_CELLS:
            dfx, dfy = upsampled_cell_gradients(high_ptr + n * high_stride_n, grad_high_ptr + n * gh_stride_n,
                                                grad_high_ptr, 1.0, grad, channels, high_stride_c, high_stride_h,
                                                high_stride_w, gh_stride_c, gh_stride_h, gh_stride_w,
                                                hx0, hy0, hfx, hfy, H, W, sx_high, sy_high, h, w, mask_p, mask_c,
                                                OFFSETS=True, SCATTER=SCATTER_FLOAT if SCATTER_SOURCES else 0,
                                                PIXELS_LAST=PIXELS_LAST)
        elif UPSAMPLE_FIRST:
            dfx, dfy = upsampled_tap_gradients(high_ptr + n * high_stride_n, grad_high_ptr + n * gh_stride_n, grad,
                                               channels, high_stride_c, high_stride_h, high_stride_w,
                                               gh_stride_c, gh_stride_h, gh_stride_w,
                                               hx0, hy0, hfx, hfy, H, W, sx_high, sy_high, h, w, mask_p, mask_c,
                                               SCATTER=SCATTER_SOURCES, PIXELS_LAST=PIXELS_LAST)
        else:
            dfx, dfy = tap_gradients(high_ptr + n * high_stride_n, grad_high_ptr + n * gh_stride_n, grad, channels,
                                     high_stride_c, high_stride_h, high_stride_w, gh_stride_c, gh_stride_h, gh_stride_w,
                                     hx0, hy0, hfx, hfy, h, w, mask_p, mask_c, SCATTER=SCATTER_SOURCES,
                                     PIXELS_LAST=PIXELS_LAST)
        high_dfx += dfx
        high_dfy += dfy
        dfx, dfy = tap_gradients(low_ptr + n * low_stride_n, grad_low_ptr + n * gl_stride_n, grad, channels,
                                 low_stride_c, low_stride_h, low_stride_w, gl_stride_c, gl_stride_h, gl_stride_w,
                                 lx0, ly0, lfx, lfy, H, W, mask_p, mask_c, SCATTER=SCATTER_SOURCES,
                                 PIXELS_LAST=PIXELS_LAST)
        low_dfx += dfx
        low_dfy += dfy

    out_ty = grad_offsets_ptr.dtype.element_ty
    go_at = grad_offsets_ptr + n * go_stride_n + rows * go_stride_h + cols * go_stride_w
    tl.store(go_at, (high_dfx * sx_warp).to(out_ty), mask=mask_p)
    tl.store(go_at + channel_offset(1, go_stride_c), (high_dfy * sy_warp).to(out_ty), mask=mask_p)
    tl.store(go_at + channel_offset(2, go_stride_c), (low_dfx * sx_low).to(out_ty), mask=mask_p)
    tl.store(go_at + channel_offset(3, go_stride_c), (low_dfy * sy_low).to(out_ty), mask=mask_p)




# d out / d offset = scale * sum over c and taps of grad[c] * d(w_t)/d(frac) * src[c, t]: a sum over
# all channels, so one program owns a block of pixels and loops over channel blocks, writing each
# offset gradient once. d out / d src is a scatter of grad * w_t: atomics into an fp32/fp64 buffer
# (UPSAMPLE_FIRST: src[t] is U(high) at a fine tap, and d out / d high scatters grad * w_t * u_k into
# U's coarse taps k, merged into 3x3 cells with MERGED_CELLS). SCATTER_SOURCES=False writes the offsets'
# gradient only (the source gradients come from the gathers of align_fa_gather.py or the fixed-point scatter):
# the buffer pointers are then never touched.
# Grid: (pixel blocks, N).
@triton.jit
def align_fa_backward_kernel(
    grad_low_ptr,  # [N, C, H, W] ACC_DTYPE buffer, zero-filled, accumulated with atomics (SCATTER_SOURCES)
    grad_high_ptr,  # [N, C, h, w] ACC_DTYPE buffer, zero-filled, accumulated with atomics (SCATTER_SOURCES)
    grad_offsets_ptr,  # [N, 4, H, W] written once per pixel
    grad_ptr,  # [N, C, H, W] gradient of the output
    low_ptr,  # [N, C, H, W]
    high_ptr,  # [N, C, h, w]
    offsets_ptr,  # [N, 4, H, W]
    gl_stride_n, gl_stride_c, gl_stride_h, gl_stride_w,
    gh_stride_n, gh_stride_c, gh_stride_h, gh_stride_w,
    go_stride_n, go_stride_c, go_stride_h, go_stride_w,
    grad_stride_n, grad_stride_c, grad_stride_h, grad_stride_w,
    low_stride_n, low_stride_c, low_stride_h, low_stride_w,
    high_stride_n, high_stride_c, high_stride_h, high_stride_w,
    off_stride_n, off_stride_c, off_stride_h, off_stride_w,
    C, H, W, h, w,
    high_scale_x, high_scale_y,  # align-corners scales of high, fp32 (see align_corners_scale)
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    UPSAMPLE_FIRST: tl.constexpr,
    MERGED_CELLS: tl.constexpr,  # UPSAMPLE_FIRST with h <= H and w <= W (see merged_cells)
    SCATTER_SOURCES: tl.constexpr,
    PIXELS_LAST: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    rows, cols, mask_p = output_pixels(tl.program_id(0), H, W, BLOCK_P)
    pixel_block_backward(grad_low_ptr, grad_high_ptr, grad_offsets_ptr, grad_ptr, low_ptr, high_ptr, offsets_ptr,
                         gl_stride_n, gl_stride_c, gl_stride_h, gl_stride_w,
                         gh_stride_n, gh_stride_c, gh_stride_h, gh_stride_w,
                         go_stride_n, go_stride_c, go_stride_h, go_stride_w,
                         grad_stride_n, grad_stride_c, grad_stride_h, grad_stride_w,
                         low_stride_n, low_stride_c, low_stride_h, low_stride_w,
                         high_stride_n, high_stride_c, high_stride_h, high_stride_w,
                         off_stride_n, off_stride_c, off_stride_h, off_stride_w,
                         C, H, W, h, w, high_scale_x, high_scale_y, n, rows, cols, mask_p,
                         BLOCK_P, BLOCK_C, ACC_DTYPE, UPSAMPLE_FIRST, MERGED_CELLS, SCATTER_SOURCES, PIXELS_LAST)


# The deterministic source gradients without gathers: d out / d low and d out / d high scattered as int64
# fixed-point atomics (fixed_point.py: the sums do not depend on the order). Scatter only: no source taps are
# loaded and no offset gradient is formed (align_fa_offsets_backward writes that), which keeps it light where
# the per-pixel backward with fixed-point atomics ran out of registers. UPSAMPLE_FIRST: each of the 4 warp
# taps on U(high)'s grid is spread over its 4 coarse cells (16 cells a pixel, 3x3 merged ones with MERGED_CELLS).
# Grid: (pixel blocks, channel blocks, N).
@triton.jit
def align_fa_scatter_kernel(
    sums_low_ptr,  # [N, C, H, W] int64, zero-filled
    sums_high_ptr,  # [N, C, h, w] int64, zero-filled
    flags_low_ptr,  # [N, C, H, W] int32 flags, sums_low's strides, zero-filled
    flags_high_ptr,  # [N, C, h, w] int32 flags, sums_high's strides
    fixed_scale_ptr,  # the fixed-point scale, a device scalar (fixed_point_scale)
    grad_ptr,  # [N, C, H, W] gradient of the output
    offsets_ptr,  # [N, 4, H, W]
    gl_stride_n, gl_stride_c, gl_stride_h, gl_stride_w,
    gh_stride_n, gh_stride_c, gh_stride_h, gh_stride_w,
    grad_stride_n, grad_stride_c, grad_stride_h, grad_stride_w,
    off_stride_n, off_stride_c, off_stride_h, off_stride_w,
    C, H, W, h, w,
    high_scale_x, high_scale_y,  # align-corners scales of high, fp32 (see align_corners_scale)
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    UPSAMPLE_FIRST: tl.constexpr,
    MERGED_CELLS: tl.constexpr,  # UPSAMPLE_FIRST with h <= H and w <= W (see merged_cells)
    PIXELS_LAST: tl.constexpr,
):
    n = tl.program_id(2).to(tl.int64)
    rows, cols, mask_p = output_pixels(tl.program_id(0), H, W, BLOCK_P)
    channels = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = channels < C
    shift_ptr = offsets_ptr + n * off_stride_n
    shift_at = rows * off_stride_h + cols * off_stride_w
    rows_acc = rows.to(ACC_DTYPE)
    cols_acc = cols.to(ACC_DTYPE)
    sx_high = align_corners_scale(w, W, high_scale_x, ACC_DTYPE)
    sy_high = align_corners_scale(h, H, high_scale_y, ACC_DTYPE)
    sx_low = unit_scale(W, ACC_DTYPE)
    sy_low = unit_scale(H, ACC_DTYPE)
    fixed_scale = tl.load(fixed_scale_ptr).to(ACC_DTYPE)
    grad = tl.load(tile_pointers(grad_ptr + n * grad_stride_n, rows * grad_stride_h + cols * grad_stride_w,
                                 channels * grad_stride_c, PIXELS_LAST),
                   mask=tile_mask(mask_p, mask_c, PIXELS_LAST), other=0.0)
    grad = grad.to(ACC_DTYPE)

    lx0, lfx = source_coordinate(cols_acc, load_shift(shift_ptr, 2, off_stride_c, shift_at, mask_p, ACC_DTYPE),
                                 sx_low, W)
    ly0, lfy = source_coordinate(rows_acc, load_shift(shift_ptr, 3, off_stride_c, shift_at, mask_p, ACC_DTYPE),
                                 sy_low, H)
    scatter_tile(sums_low_ptr + n * gl_stride_n, flags_low_ptr + n * gl_stride_n, fixed_scale, grad, channels,
                 gl_stride_c, gl_stride_h, gl_stride_w, lx0, ly0, lfx, lfy, H, W, mask_p, mask_c, SCATTER_FIXED,
                 PIXELS_LAST)

    high_at = sums_high_ptr + n * gh_stride_n
    high_flags_at = flags_high_ptr + n * gh_stride_n
    hx0, hy0, hfx, hfy, _, _ = high_warp_taps(shift_ptr, off_stride_c, shift_at, mask_p, rows_acc, cols_acc,
                                              sx_high, sy_high, H, W, h, w, UPSAMPLE_FIRST, ACC_DTYPE)
    if MERGED_CELLS:
        upsampled_cell_gradients(high_at, high_at, high_flags_at, fixed_scale, grad, channels, 0, 0, 0,
                                 gh_stride_c, gh_stride_h, gh_stride_w, hx0, hy0, hfx, hfy, H, W, sx_high, sy_high,
                                 h, w, mask_p, mask_c, OFFSETS=False, SCATTER=SCATTER_FIXED, PIXELS_LAST=PIXELS_LAST)
    elif UPSAMPLE_FIRST:
        for DY in tl.static_range(2):
            for DX in tl.static_range(2):
                weight, _, _, inside, cx0, cy0, cfx, cfy = upsampled_tap(hx0, hy0, hfx, hfy, H, W, sx_high, sy_high,
                                                                         h, w, DX, DY)
                scatter_tile(high_at, high_flags_at, fixed_scale, grad * per_pixel(weight, PIXELS_LAST), channels,
                             gh_stride_c, gh_stride_h, gh_stride_w, cx0, cy0, cfx, cfy, h, w, inside & mask_p, mask_c,
                             SCATTER_FIXED, PIXELS_LAST)
    else:
        scatter_tile(high_at, high_flags_at, fixed_scale, grad, channels, gh_stride_c, gh_stride_h, gh_stride_w,
                     hx0, hy0, hfx, hfy, h, w, mask_p, mask_c, SCATTER_FIXED, PIXELS_LAST)


def merged_cells(low: torch.Tensor, high: torch.Tensor, upsample_first: bool) -> bool:
    """Whether the exact form's backward merges each pixel's 16 coarse taps into at most 3x3 cells
    (``bilinear.upsampled_cell_gradients``): a coarse map no larger than the fine one along either axis."""
    return bool(upsample_first) and high.shape[-2] <= low.shape[-2] and high.shape[-1] <= low.shape[-1]


def plan_align_fa_forward(
    low: torch.Tensor,
    high: torch.Tensor,
    offsets: torch.Tensor,
    out: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
    upsample_first: bool = True,
) -> tuple[KernelLaunch, torch.Tensor]:
    """The forward launch and its output (``out``, default a new tensor shaped and laid out like ``low``).

    ``upsample_first`` selects the authors' upsample-then-warp form (default) or the one-step form.
    """
    check_index_range("low", low)
    n, c, H, W = low.shape
    h, w = high.shape[-2:]
    if out is None:
        out = torch.empty_like(low)
    cfg = launch_config("align_fa_forward_exact" if upsample_first else "align_fa_forward", low, config)
    block_c = channel_block(c, cfg)
    launch = KernelLaunch(
        align_fa_forward_kernel,
        grid=(triton.cdiv(H * W, cfg.block_p), triton.cdiv(c, block_c), n),
        args=(out, low, high, offsets, *strides(out), *strides(low), *strides(high), *strides(offsets), c, H, W, h, w,
              host_scale(w, W), host_scale(h, H)),
        constexprs=dict(BLOCK_P=cfg.block_p, BLOCK_C=block_c, ACC_DTYPE=accumulation_dtype(low.dtype)[1],
                        UPSAMPLE_FIRST=bool(upsample_first), MERGED_CELLS=merged_cells(low, high, upsample_first),
                        PIXELS_LAST=pixels_last(low)),
        num_warps=cfg.num_warps,
    )
    return launch, out


def align_fa_forward(
    low: torch.Tensor,
    high: torch.Tensor,
    offsets: torch.Tensor,
    out: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
    upsample_first: bool = True,
) -> torch.Tensor:
    """``W(U(high), offsets[:, 0:2]) + W(low, offsets[:, 2:4])`` (or, with ``upsample_first=False``,
    ``S(high, offsets[:, 0:2]) + S(low, offsets[:, 2:4])``) written into ``out`` (see the plan)."""
    launch, out = plan_align_fa_forward(low, high, offsets, out, config, upsample_first)
    launch()
    return out


def backward_config_name(low: torch.Tensor, high: torch.Tensor, upsample_first: bool) -> str:
    """The launch-config name (launch.GPU_CONFIGS) of the per-pixel backward of these maps."""
    if not upsample_first:
        return "align_fa_backward"
    return "align_fa_backward_exact" if merged_cells(low, high, upsample_first) else "align_fa_backward_exact_16_taps"


def plan_align_fa_backward(
    grad: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    offsets: torch.Tensor,
    grad_offsets: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
    upsample_first: bool = True,
    scatter_sources: bool = True,
) -> tuple[KernelLaunch, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The backward launch and its outputs: zeroed fp32/fp64 buffers for low and high, and grad_offsets.

    ``scatter_sources=False``: the launch writes grad_offsets only; the two buffers are then empty
    placeholders (no zero fill), the source gradients being left to the fixed-point scatter
    (:func:`align_fa_sources_fixed_point`).
    """
    check_index_range("low", low)
    n, c, H, W = low.shape
    h, w = high.shape[-2:]
    acc_torch, acc_triton = accumulation_dtype(low.dtype)
    if scatter_sources:
        grad_low = torch.zeros_like(low, dtype=acc_torch)
        grad_high = torch.zeros_like(high, dtype=acc_torch)
    else:
        grad_low = grad_high = torch.empty(0, dtype=acc_torch, device=low.device)
    if grad_offsets is None:
        grad_offsets = torch.empty_like(offsets)
    merged = merged_cells(low, high, upsample_first)
    cfg = launch_config(backward_config_name(low, high, upsample_first), low, config)
    buffer_strides = (*strides(grad_low), *strides(grad_high)) if scatter_sources else (0,) * 8
    launch = KernelLaunch(
        align_fa_backward_kernel,
        grid=(triton.cdiv(H * W, cfg.block_p), n),
        args=(
            grad_low, grad_high, grad_offsets, grad, low, high, offsets,
            *buffer_strides, *strides(grad_offsets), *strides(grad),
            *strides(low), *strides(high), *strides(offsets),
            c, H, W, h, w, host_scale(w, W), host_scale(h, H),
        ),
        constexprs=dict(BLOCK_P=cfg.block_p, BLOCK_C=channel_block(c, cfg), ACC_DTYPE=acc_triton,
                        UPSAMPLE_FIRST=bool(upsample_first), MERGED_CELLS=merged, SCATTER_SOURCES=bool(scatter_sources),
                        PIXELS_LAST=pixels_last(low)),
        num_warps=cfg.num_warps,
    )
    return launch, (grad_low, grad_high, grad_offsets)


def align_fa_backward(
    grad: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    offsets: torch.Tensor,
    grad_offsets: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
    upsample_first: bool = True,
    sources_like: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (low, high, offsets) given the output gradient ``grad``: the sources' in the dtypes and layouts
    of ``sources_like`` (default ``(low, high)``; the staging of contiguous maps passes the originals, so the cast
    of the float buffers and the copy back to their layout are one pass)."""
    launch, (grad_low, grad_high, grad_offsets) = plan_align_fa_backward(grad, low, high, offsets, grad_offsets, config,
                                                                          upsample_first)
    launch()
    like_low, like_high = sources_like or (low, high)
    return relayout_like(grad_low, like_low), relayout_like(grad_high, like_high), grad_offsets


def align_fa_offsets_backward(
    grad: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    offsets: torch.Tensor,
    grad_offsets: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
    upsample_first: bool = True,
) -> torch.Tensor:
    """The gradient of ``offsets`` alone (the backward kernel with its source scatter off: no buffers, no
    atomics), each offset gradient written once by the program that owns its pixel: deterministic."""
    launch, (_, _, grad_offsets) = plan_align_fa_backward(grad, low, high, offsets, grad_offsets, config,
                                                          upsample_first, scatter_sources=False)
    launch()
    return grad_offsets


def plan_align_fa_fixed_point_scatter(
    grad: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    offsets: torch.Tensor,
    config: LaunchConfig | None = None,
    upsample_first: bool = True,
) -> tuple[KernelLaunch, tuple[torch.Tensor, ...]]:
    """The launch of :func:`align_fa_scatter_kernel` and its outputs: (sums_low, flags_low, sums_high,
    flags_high, scale), zero-filled, the sums and flags in ``low``'s and ``high``'s strides."""
    check_index_range("low", low)
    n, c, H, W = low.shape
    h, w = high.shape[-2:]
    acc_torch, acc_triton = accumulation_dtype(low.dtype)
    sums_low, flags_low = fixed_point_buffers(low)
    sums_high, flags_high = fixed_point_buffers(high)
    scale = fixed_point_scale(grad, H * W, acc_torch)  # a cell receives weights summing to at most H * W
    cfg = launch_config("align_fa_scatter_exact" if upsample_first else "align_fa_scatter", low, config)
    block_c = channel_block(c, cfg)
    launch = KernelLaunch(
        align_fa_scatter_kernel,
        grid=(triton.cdiv(H * W, cfg.block_p), triton.cdiv(c, block_c), n),
        args=(sums_low, sums_high, flags_low, flags_high, scale, grad, offsets,
              *strides(sums_low), *strides(sums_high), *strides(grad), *strides(offsets),
              c, H, W, h, w, host_scale(w, W), host_scale(h, H)),
        constexprs=dict(BLOCK_P=cfg.block_p, BLOCK_C=block_c, ACC_DTYPE=acc_triton,
                        UPSAMPLE_FIRST=bool(upsample_first), MERGED_CELLS=merged_cells(low, high, upsample_first),
                        PIXELS_LAST=pixels_last(low)),
        num_warps=cfg.num_warps,
    )
    return launch, (sums_low, flags_low, sums_high, flags_high, scale)


def align_fa_sources_fixed_point(
    grad: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    offsets: torch.Tensor,
    config: LaunchConfig | None = None,
    upsample_first: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_low, grad_high)`` in their inputs' dtypes and strides, by fixed-point atomics: bitwise
    reproducible (the int64 sums do not depend on the order of the adds). The offsets' gradient comes from
    :func:`align_fa_offsets_backward`."""
    launch, (sums_low, flags_low, sums_high, flags_high, scale) = plan_align_fa_fixed_point_scatter(
        grad, low, high, offsets, config, upsample_first)
    launch()
    return finalize(sums_low, flags_low, scale, low.dtype), finalize(sums_high, flags_high, scale, high.dtype)
