"""AlignFA kernels, forward and backward, in two forms selected by the constexpr ``UPSAMPLE_FIRST``:

* ``True`` (the authors' function): ``out = W(U(high), offsets[:, 0:2]) + W(low, offsets[:, 2:4])``, the
  same-size warp ``W`` of the align-corners upsampling ``U(high)`` to low's size, with ``U`` evaluated
  from the coarse map at each in-range warp tap (never stored);
* ``False`` (the one-step variant): ``out = S(high, offsets[:, 0:2]) + S(low, offsets[:, 2:4])``.

``S``, ``W`` (``S`` of a map as large as the output) and ``U`` are the bilinear rules of
:mod:`alignseg.kernels.bilinear`. Every feature tensor is addressed through its own (n, c, h, w)
strides, so one kernel serves contiguous and channels_last maps; channels_last is the fast path (each
tap reads contiguous channel vectors).
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
    sample_tile,
    source_coordinate,
    tap_gradients,
    unit_scale,
    upsampled_sample_tile,
    upsampled_tap_gradients,
)
from .fixed_point import SCATTER_FIXED, SCATTER_FLOAT, SCATTER_NONE, finalize, fixed_point_buffers, fixed_point_scale
from .launch import (
    KernelLaunch,
    LaunchConfig,
    accumulation_dtype,
    channel_block,
    check_index_range,
    launch_config,
    strides,
)
from .launch import align_corners_scale as host_scale


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
    if UPSAMPLE_FIRST:  # high's offsets warp U(high), a map of low's size
        sx_warp, sy_warp, warp_h, warp_w = unit_scale(W, ACC_DTYPE), unit_scale(H, ACC_DTYPE), H, W
    else:
        sx_warp, sy_warp, warp_h, warp_w = sx_high, sy_high, h, w
    x0, fx = source_coordinate(cols_acc, load_shift(shift_ptr, 0, off_stride_c, shift_at, mask_p, ACC_DTYPE),
                               sx_warp, warp_w)
    y0, fy = source_coordinate(rows_acc, load_shift(shift_ptr, 1, off_stride_c, shift_at, mask_p, ACC_DTYPE),
                               sy_warp, warp_h)
    if UPSAMPLE_FIRST:
        acc = upsampled_sample_tile(high_ptr + n * high_stride_n, channels, high_stride_c, high_stride_h, high_stride_w,
                                    x0, y0, fx, fy, H, W, sx_high, sy_high, h, w, mask_p, mask_c)
    else:
        acc = sample_tile(high_ptr + n * high_stride_n, channels, high_stride_c, high_stride_h, high_stride_w,
                          x0, y0, fx, fy, h, w, mask_p, mask_c)

    x0, fx = source_coordinate(cols_acc, load_shift(shift_ptr, 2, off_stride_c, shift_at, mask_p, ACC_DTYPE),
                               unit_scale(W, ACC_DTYPE), W)
    y0, fy = source_coordinate(rows_acc, load_shift(shift_ptr, 3, off_stride_c, shift_at, mask_p, ACC_DTYPE),
                               unit_scale(H, ACC_DTYPE), H)
    acc += sample_tile(low_ptr + n * low_stride_n, channels, low_stride_c, low_stride_h, low_stride_w,
                       x0, y0, fx, fy, H, W, mask_p, mask_c)

    out_ptrs = (out_ptr + n * out_stride_n + (rows * out_stride_h + cols * out_stride_w)[:, None]
                + channels[None, :] * out_stride_c)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


# d out / d offset = scale * sum over c and taps of grad[c] * d(w_t)/d(frac) * src[c, t]: a sum over
# all channels, so one program owns a block of pixels and loops over channel blocks, writing each
# offset gradient once. d out / d src is a scatter of grad * w_t: atomics into an fp32/fp64 buffer
# (UPSAMPLE_FIRST: src[t] is U(high) at a fine tap, and d out / d high scatters grad * w_t * u_k into
# U's coarse taps k). SCATTER_SOURCES: SCATTER_FLOAT (float atomics), SCATTER_FIXED (int64 fixed-point
# atomics, deterministic: fixed_point.py) or SCATTER_NONE, which writes the offsets' gradient only (the
# source gradients come from the gathers of align_fa_gather.py): the buffer pointers are then never touched.
# Grid: (pixel blocks, N).
@triton.jit
def align_fa_backward_kernel(
    grad_low_ptr,  # [N, C, H, W] buffer, zero-filled, accumulated with atomics: ACC_DTYPE, or int64 (fixed point)
    grad_high_ptr,  # [N, C, h, w] buffer, likewise
    flags_low_ptr,  # SCATTER_FIXED: int32 flags with grad_low's strides, zero-filled (else unused)
    flags_high_ptr,  # SCATTER_FIXED: int32 flags with grad_high's strides
    fixed_scale_ptr,  # SCATTER_FIXED: the fixed-point scale, a device scalar (fixed_point_scale)
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
    SCATTER_SOURCES: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    rows, cols, mask_p = output_pixels(tl.program_id(0), H, W, BLOCK_P)

    shift_ptr = offsets_ptr + n * off_stride_n
    shift_at = rows * off_stride_h + cols * off_stride_w
    rows_acc = rows.to(ACC_DTYPE)
    cols_acc = cols.to(ACC_DTYPE)
    sx_high = align_corners_scale(w, W, high_scale_x, ACC_DTYPE)
    sy_high = align_corners_scale(h, H, high_scale_y, ACC_DTYPE)
    sx_low = unit_scale(W, ACC_DTYPE)
    sy_low = unit_scale(H, ACC_DTYPE)
    if UPSAMPLE_FIRST:  # high's offsets warp U(high), a map of low's size
        sx_warp, sy_warp, warp_h, warp_w = sx_low, sy_low, H, W
    else:
        sx_warp, sy_warp, warp_h, warp_w = sx_high, sy_high, h, w
    hx0, hfx = source_coordinate(cols_acc, load_shift(shift_ptr, 0, off_stride_c, shift_at, mask_p, ACC_DTYPE),
                                 sx_warp, warp_w)
    hy0, hfy = source_coordinate(rows_acc, load_shift(shift_ptr, 1, off_stride_c, shift_at, mask_p, ACC_DTYPE),
                                 sy_warp, warp_h)
    lx0, lfx = source_coordinate(cols_acc, load_shift(shift_ptr, 2, off_stride_c, shift_at, mask_p, ACC_DTYPE),
                                 sx_low, W)
    ly0, lfy = source_coordinate(rows_acc, load_shift(shift_ptr, 3, off_stride_c, shift_at, mask_p, ACC_DTYPE),
                                 sy_low, H)

    grad_at = grad_ptr + n * grad_stride_n + (rows * grad_stride_h + cols * grad_stride_w)[:, None]
    if SCATTER_SOURCES == SCATTER_FIXED:
        fixed_scale = tl.load(fixed_scale_ptr).to(ACC_DTYPE)
    else:
        fixed_scale = tl.full((), 1.0, ACC_DTYPE)
    high_dfx = tl.zeros((BLOCK_P,), dtype=ACC_DTYPE)
    high_dfy = tl.zeros((BLOCK_P,), dtype=ACC_DTYPE)
    low_dfx = tl.zeros((BLOCK_P,), dtype=ACC_DTYPE)
    low_dfy = tl.zeros((BLOCK_P,), dtype=ACC_DTYPE)
    for c_start in range(0, C, BLOCK_C):
        channels = c_start + tl.arange(0, BLOCK_C).to(tl.int64)
        mask_c = channels < C
        grad = tl.load(grad_at + channels[None, :] * grad_stride_c, mask=mask_p[:, None] & mask_c[None, :], other=0.0)
        grad = grad.to(ACC_DTYPE)
        if UPSAMPLE_FIRST:
            dfx, dfy = upsampled_tap_gradients(high_ptr + n * high_stride_n, grad_high_ptr + n * gh_stride_n,
                                               flags_high_ptr + n * gh_stride_n, fixed_scale, grad,
                                               channels, high_stride_c, high_stride_h, high_stride_w,
                                               gh_stride_c, gh_stride_h, gh_stride_w,
                                               hx0, hy0, hfx, hfy, H, W, sx_high, sy_high, h, w, mask_p, mask_c,
                                               SCATTER=SCATTER_SOURCES)
        else:
            dfx, dfy = tap_gradients(high_ptr + n * high_stride_n, grad_high_ptr + n * gh_stride_n,
                                     flags_high_ptr + n * gh_stride_n, fixed_scale, grad, channels,
                                     high_stride_c, high_stride_h, high_stride_w, gh_stride_c, gh_stride_h, gh_stride_w,
                                     hx0, hy0, hfx, hfy, h, w, mask_p, mask_c, SCATTER=SCATTER_SOURCES)
        high_dfx += dfx
        high_dfy += dfy
        dfx, dfy = tap_gradients(low_ptr + n * low_stride_n, grad_low_ptr + n * gl_stride_n,
                                 flags_low_ptr + n * gl_stride_n, fixed_scale, grad, channels,
                                 low_stride_c, low_stride_h, low_stride_w, gl_stride_c, gl_stride_h, gl_stride_w,
                                 lx0, ly0, lfx, lfy, H, W, mask_p, mask_c, SCATTER=SCATTER_SOURCES)
        low_dfx += dfx
        low_dfy += dfy

    out_ty = grad_offsets_ptr.dtype.element_ty
    go_at = grad_offsets_ptr + n * go_stride_n + rows * go_stride_h + cols * go_stride_w
    tl.store(go_at, (high_dfx * sx_warp).to(out_ty), mask=mask_p)
    tl.store(go_at + channel_offset(1, go_stride_c), (high_dfy * sy_warp).to(out_ty), mask=mask_p)
    tl.store(go_at + channel_offset(2, go_stride_c), (low_dfx * sx_low).to(out_ty), mask=mask_p)
    tl.store(go_at + channel_offset(3, go_stride_c), (low_dfy * sy_low).to(out_ty), mask=mask_p)


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
                        UPSAMPLE_FIRST=bool(upsample_first)),
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


def plan_align_fa_backward(
    grad: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    offsets: torch.Tensor,
    grad_offsets: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
    upsample_first: bool = True,
    scatter_sources: bool = True,
    fixed_point: bool = False,
) -> tuple[KernelLaunch, tuple[torch.Tensor, ...]]:
    """The backward launch and its outputs: zeroed buffers for low and high, and grad_offsets.

    The buffers are fp32/fp64 (float atomics), or with ``fixed_point`` int64 sums plus int32 flags and the
    scale (``(grad_low, grad_high, grad_offsets, flags_low, flags_high, scale)``, see fixed_point.py).
    ``scatter_sources=False``: the launch writes grad_offsets only; the two buffers are then empty
    placeholders (no zero fill), the source gradients being left to
    :func:`alignseg.kernels.align_fa_gather.align_fa_backward_deterministic`.
    """
    check_index_range("low", low)
    n, c, H, W = low.shape
    h, w = high.shape[-2:]
    acc_torch, acc_triton = accumulation_dtype(low.dtype)
    placeholder = torch.empty(0, dtype=acc_torch, device=low.device)
    flags_low = flags_high = scale = placeholder
    if not scatter_sources:
        mode, grad_low, grad_high = SCATTER_NONE, placeholder, placeholder
    elif fixed_point:
        mode = SCATTER_FIXED
        grad_low, flags_low = fixed_point_buffers(low)
        grad_high, flags_high = fixed_point_buffers(high)
        scale = fixed_point_scale(grad, H * W, acc_torch)  # per cell, weights sum to at most H * W
    else:
        mode = SCATTER_FLOAT
        grad_low = torch.zeros_like(low, dtype=acc_torch)
        grad_high = torch.zeros_like(high, dtype=acc_torch)
    if grad_offsets is None:
        grad_offsets = torch.empty_like(offsets)
    cfg = launch_config("align_fa_backward_exact" if upsample_first else "align_fa_backward", low, config)
    buffer_strides = (*strides(grad_low), *strides(grad_high)) if scatter_sources else (0,) * 8
    launch = KernelLaunch(
        align_fa_backward_kernel,
        grid=(triton.cdiv(H * W, cfg.block_p), n),
        args=(
            grad_low, grad_high, flags_low, flags_high, scale, grad_offsets, grad, low, high, offsets,
            *buffer_strides, *strides(grad_offsets), *strides(grad),
            *strides(low), *strides(high), *strides(offsets),
            c, H, W, h, w, host_scale(w, W), host_scale(h, H),
        ),
        constexprs=dict(BLOCK_P=cfg.block_p, BLOCK_C=channel_block(c, cfg), ACC_DTYPE=acc_triton,
                        UPSAMPLE_FIRST=bool(upsample_first), SCATTER_SOURCES=mode.value),
        num_warps=cfg.num_warps,
    )
    if fixed_point and scatter_sources:
        return launch, (grad_low, grad_high, grad_offsets, flags_low, flags_high, scale)
    return launch, (grad_low, grad_high, grad_offsets)


def align_fa_backward(
    grad: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    offsets: torch.Tensor,
    grad_offsets: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
    upsample_first: bool = True,
    fixed_point: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (low, high, offsets) in their dtypes, given the output gradient ``grad``.

    ``fixed_point``: the source gradients are scattered as int64 fixed-point atomics (fixed_point.py), so
    they are bitwise reproducible; else fp32/fp64 float atomics (not, on a GPU).
    """
    launch, outputs = plan_align_fa_backward(grad, low, high, offsets, grad_offsets, config, upsample_first,
                                             fixed_point=fixed_point)
    launch()
    if fixed_point:
        sums_low, sums_high, grad_offsets, flags_low, flags_high, scale = outputs
        return (finalize(sums_low, flags_low, scale, low.dtype), finalize(sums_high, flags_high, scale, high.dtype),
                grad_offsets)
    grad_low, grad_high, grad_offsets = outputs
    return grad_low.to(low.dtype), grad_high.to(high.dtype), grad_offsets


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
