"""AlignCM kernels: ``out = S(context, offsets) + local``, forward and backward.

``context`` is tiny (k1 x k2 cells, 3x3 in the paper) and every output pixel samples it, so in the
backward each program reduces its pixels' contributions per cell (one ``tl.dot`` per pixel block and
channel block) into its own slot of a partial-sum buffer [N, programs, cells, C], and a second small
kernel sums the slots in a fixed order into the context gradient: no atomics, every gradient bitwise
reproducible. Each program walks several pixel blocks, so the buffer stays about 1-10 % of the
gradient's bytes. Contexts with more than ``MAX_REDUCED_CELLS`` cells take the binned gather of
:mod:`alignseg.kernels.align_fa_gather` (deterministic too).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .align_fa_gather import DIRECT, binned_transpose
from .bilinear import (
    align_corners_scale,
    bilinear_tap,
    channel_offset,
    load_shift,
    output_pixels,
    sample_tile,
    source_coordinate,
    tap_gradients,
    tile_mask,
    tile_pointers,
)
from .launch import (
    MAX_REDUCED_CELLS,
    MIN_DOT_SIZE,
    KernelLaunch,
    LaunchConfig,
    accumulation_dtype,
    channel_block,
    check_index_range,
    interpreting,
    launch_config,
    pixels_last,
    strides,
)
from .launch import (
    align_corners_scale as host_scale,
)


# out[n, c, i, j] = sum over the 4 taps t of context: w_t * context[n, c, t] + local[n, c, i, j].
# Grid: (pixel blocks, channel blocks, N).
@triton.jit
def align_cm_forward_kernel(
    out_ptr,  # [N, C, H, W] output, local's memory format
    context_ptr,  # [N, C, k1, k2] pooled context
    offsets_ptr,  # [N, 2, H, W] (dx, dy)
    local_ptr,  # [N, C, H, W]
    out_stride_n, out_stride_c, out_stride_h, out_stride_w,
    ctx_stride_n, ctx_stride_c, ctx_stride_h, ctx_stride_w,
    off_stride_n, off_stride_c, off_stride_h, off_stride_w,
    loc_stride_n, loc_stride_c, loc_stride_h, loc_stride_w,
    C, H, W, k1, k2,
    scale_x, scale_y,  # align-corners scales of context, fp32 (see align_corners_scale)
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PIXELS_LAST: tl.constexpr,
):
    n = tl.program_id(2).to(tl.int64)
    rows, cols, mask_p = output_pixels(tl.program_id(0), H, W, BLOCK_P)
    channels = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = channels < C
    mask = tile_mask(mask_p, mask_c, PIXELS_LAST)

    shift_ptr = offsets_ptr + n * off_stride_n
    shift_at = rows * off_stride_h + cols * off_stride_w
    x0, fx = source_coordinate(cols.to(ACC_DTYPE), load_shift(shift_ptr, 0, off_stride_c, shift_at, mask_p, ACC_DTYPE),
                               align_corners_scale(k2, W, scale_x, ACC_DTYPE), k2)
    y0, fy = source_coordinate(rows.to(ACC_DTYPE), load_shift(shift_ptr, 1, off_stride_c, shift_at, mask_p, ACC_DTYPE),
                               align_corners_scale(k1, H, scale_y, ACC_DTYPE), k1)
    acc = sample_tile(context_ptr + n * ctx_stride_n, channels, ctx_stride_c, ctx_stride_h, ctx_stride_w,
                      x0, y0, fx, fy, k1, k2, mask_p, mask_c, PIXELS_LAST)

    local_ptrs = tile_pointers(local_ptr + n * loc_stride_n, rows * loc_stride_h + cols * loc_stride_w,
                               channels * loc_stride_c, PIXELS_LAST)
    acc += tl.load(local_ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
    out_ptrs = tile_pointers(out_ptr + n * out_stride_n, rows * out_stride_h + cols * out_stride_w,
                             channels * out_stride_c, PIXELS_LAST)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def cell_weights(x0, y0, fx, fy, k1, k2, mask_p, CELLS: tl.constexpr):
    """[BLOCK_P, CELLS] matrix: the total bilinear weight each pixel puts on each context cell."""
    cells = tl.arange(0, CELLS)
    weights = tl.zeros((x0.shape[0], CELLS), dtype=fx.dtype)
    for DY in tl.static_range(2):
        for DX in tl.static_range(2):
            xx, yy, weight, _, _, inside = bilinear_tap(x0, y0, fx, fy, k1, k2, DX, DY)
            hit = ((yy * k2 + xx)[:, None] == cells[None, :]) & (inside & mask_p)[:, None]
            weights += tl.where(hit, weight[:, None], 0.0)
    return weights


# d out / d offset as in align_fa (sum over channels, program loops over channel blocks).
# d out / d context[cell, c] = sum over pixels p of W[p, cell] * grad[p, c] = (W^T @ grad)[cell, c]:
# one tl.dot per (pixel block, channel block), summed over the program's pixel blocks into its own slot
# of the partial buffer (REDUCE_CELLS; reduce_context_partials_kernel adds the slots). Contexts with more
# than MAX_REDUCED_CELLS cells leave grad_context to the binned gather (align_fa_gather.py).
# Grid: (programs, N); program g owns pixel blocks [g, g + 1) * BLOCKS_PER_PROGRAM.
@triton.jit
def align_cm_backward_kernel(
    grad_context_ptr,  # REDUCE_CELLS: [N, programs, k1 * k2, C] ACC_DTYPE partial sums, written by their owner
    grad_offsets_ptr,  # [N, 2, H, W] written once per pixel
    grad_ptr,  # [N, C, H, W] gradient of the output
    context_ptr,  # [N, C, k1, k2]
    offsets_ptr,  # [N, 2, H, W]
    go_stride_n, go_stride_c, go_stride_h, go_stride_w,
    grad_stride_n, grad_stride_c, grad_stride_h, grad_stride_w,
    ctx_stride_n, ctx_stride_c, ctx_stride_h, ctx_stride_w,
    off_stride_n, off_stride_c, off_stride_h, off_stride_w,
    C, H, W, k1, k2,
    scale_x, scale_y,  # align-corners scales of context, fp32 (see align_corners_scale)
    BLOCKS_PER_PROGRAM,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CELLS: tl.constexpr,
    REDUCE_CELLS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PIXELS_LAST: tl.constexpr,
):
    n = tl.program_id(1).to(tl.int64)
    sx = align_corners_scale(k2, W, scale_x, ACC_DTYPE)
    sy = align_corners_scale(k1, H, scale_y, ACC_DTYPE)
    context_at = context_ptr + n * ctx_stride_n
    if REDUCE_CELLS:
        cells = tl.arange(0, CELLS)
        mask_cells = cells < k1 * k2
        # this program's slot: partial[n, program, cell, c], cells x C contiguous
        slot_at = grad_context_ptr + (n * tl.num_programs(0) + tl.program_id(0)) * (k1 * k2) * C
    first_block = tl.program_id(0) * BLOCKS_PER_PROGRAM
    last_block = tl.minimum(first_block + BLOCKS_PER_PROGRAM, tl.cdiv(H * W, BLOCK_P))
    for block in range(first_block, last_block):
        rows, cols, mask_p = output_pixels(block, H, W, BLOCK_P)
        shift_ptr = offsets_ptr + n * off_stride_n
        shift_at = rows * off_stride_h + cols * off_stride_w
        x0, fx = source_coordinate(cols.to(ACC_DTYPE),
                                   load_shift(shift_ptr, 0, off_stride_c, shift_at, mask_p, ACC_DTYPE), sx, k2)
        y0, fy = source_coordinate(rows.to(ACC_DTYPE),
                                   load_shift(shift_ptr, 1, off_stride_c, shift_at, mask_p, ACC_DTYPE), sy, k1)
        if REDUCE_CELLS:
            weights = cell_weights(x0, y0, fx, fy, k1, k2, mask_p, CELLS)  # [BLOCK_P, CELLS]
            if not PIXELS_LAST:
                weights = tl.trans(weights)
            # the slot's previous values were stored by other threads of this program
            tl.debug_barrier()

        grad_at = grad_ptr + n * grad_stride_n
        grad_pixel_at = rows * grad_stride_h + cols * grad_stride_w
        dfx = tl.zeros((BLOCK_P,), dtype=ACC_DTYPE)
        dfy = tl.zeros((BLOCK_P,), dtype=ACC_DTYPE)
        for c_start in range(0, C, BLOCK_C):
            channels = c_start + tl.arange(0, BLOCK_C).to(tl.int64)
            mask_c = channels < C
            grad = tl.load(tile_pointers(grad_at, grad_pixel_at, channels * grad_stride_c, PIXELS_LAST),
                           mask=tile_mask(mask_p, mask_c, PIXELS_LAST), other=0.0)
            grad = grad.to(ACC_DTYPE)
            # no scatter: the second pointer and its strides are unused
            block_dfx, block_dfy = tap_gradients(context_at, context_at, grad, channels,
                                                 ctx_stride_c, ctx_stride_h, ctx_stride_w, 0, 0, 0,
                                                 x0, y0, fx, fy, k1, k2, mask_p, mask_c, SCATTER=False,
                                                 PIXELS_LAST=PIXELS_LAST)
            dfx += block_dfx
            dfy += block_dfy
            if REDUCE_CELLS:
                # the cells play the pixels' part: [CELLS, BLOCK_C], or [BLOCK_C, CELLS] with PIXELS_LAST
                if PIXELS_LAST:
                    per_cell = tl.dot(grad, weights, input_precision="ieee", out_dtype=ACC_DTYPE)
                else:
                    per_cell = tl.dot(weights, grad, input_precision="ieee", out_dtype=ACC_DTYPE)
                slot_ptrs = tile_pointers(slot_at, cells * C, channels, PIXELS_LAST)
                slot_mask = tile_mask(mask_cells, mask_c, PIXELS_LAST)
                if block > first_block:
                    per_cell += tl.load(slot_ptrs, mask=slot_mask, other=0.0)
                tl.store(slot_ptrs, per_cell, mask=slot_mask)

        out_ty = grad_offsets_ptr.dtype.element_ty
        go_at = grad_offsets_ptr + n * go_stride_n + rows * go_stride_h + cols * go_stride_w
        tl.store(go_at, (dfx * sx).to(out_ty), mask=mask_p)
        tl.store(go_at + channel_offset(1, go_stride_c), (dfy * sy).to(out_ty), mask=mask_p)


# grad_context[n, c, cell] = sum over programs g, in order, of partial[n, g, cell, c]; written once in the
# context's dtype. Grid: (N * cells, channel blocks).
@triton.jit
def reduce_context_partials_kernel(
    grad_context_ptr,  # [N, C, k1, k2] in the context's dtype
    partial_ptr,  # [N, programs, k1 * k2, C] ACC_DTYPE
    gc_stride_n, gc_stride_c, gc_stride_h, gc_stride_w,
    C, k1, k2, programs,
    BLOCK_C: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    cells = k1 * k2
    n = tl.program_id(0) // cells
    cell = tl.program_id(0) % cells
    channels = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = (channels < C)[None, :]
    at = partial_ptr + (n.to(tl.int64) * programs * cells + cell) * C + channels[None, :]
    acc = tl.zeros((1, BLOCK_C), dtype=ACC_DTYPE)
    for g in range(0, programs):
        acc += tl.load(at + g * cells * C, mask=mask_c, other=0.0)
    out = (grad_context_ptr + n.to(tl.int64) * gc_stride_n + (cell // k2).to(tl.int64) * gc_stride_h
           + (cell % k2).to(tl.int64) * gc_stride_w + channels[None, :] * gc_stride_c)
    tl.store(out, acc.to(grad_context_ptr.dtype.element_ty), mask=mask_c)


def plan_align_cm_forward(
    context: torch.Tensor,
    offsets: torch.Tensor,
    local: torch.Tensor,
    out: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
) -> tuple[KernelLaunch, torch.Tensor]:
    """The forward launch and its output (``out``, default a new tensor shaped and laid out like ``local``)."""
    check_index_range("local", local)
    n, c, H, W = local.shape
    k1, k2 = context.shape[-2:]
    if out is None:
        out = torch.empty_like(local)
    cfg = launch_config("align_cm_forward", local, config)
    block_c = channel_block(c, cfg)
    launch = KernelLaunch(
        align_cm_forward_kernel,
        grid=(triton.cdiv(H * W, cfg.block_p), triton.cdiv(c, block_c), n),
        args=(out, context, offsets, local, *strides(out), *strides(context), *strides(offsets), *strides(local),
              c, H, W, k1, k2, host_scale(k2, W), host_scale(k1, H)),
        constexprs=dict(BLOCK_P=cfg.block_p, BLOCK_C=block_c, ACC_DTYPE=accumulation_dtype(local.dtype)[1],
                        PIXELS_LAST=pixels_last(local)),
        num_warps=cfg.num_warps,
    )
    return launch, out


def align_cm_forward(
    context: torch.Tensor,
    offsets: torch.Tensor,
    local: torch.Tensor,
    out: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """``S(context, offsets) + local`` written into ``out`` (see the plan)."""
    launch, out = plan_align_cm_forward(context, offsets, local, out, config)
    launch()
    return out


def reduced_cells(k1: int, k2: int) -> int:
    """CELLS constexpr of the backward: 0 for large contexts (the binned gather sums their gradient)."""
    if k1 * k2 > MAX_REDUCED_CELLS:
        return 0
    return max(MIN_DOT_SIZE, triton.next_power_of_2(k1 * k2))


# Programs per launch the context reduction aims for (about four per SM of an H100): more pixel blocks per
# program keep the partial buffer small, enough programs keep every SM busy.
TARGET_PROGRAMS = 512


def blocks_per_program(pixel_blocks: int, batch: int, target_programs: int = TARGET_PROGRAMS) -> int:
    return max(1, triton.cdiv(pixel_blocks * batch, target_programs))


def plan_align_cm_backward(
    grad: torch.Tensor,
    context: torch.Tensor,
    offsets: torch.Tensor,
    grad_offsets: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
    pixel_blocks_per_program: int | None = None,
) -> tuple[KernelLaunch, tuple[torch.Tensor, torch.Tensor]]:
    """The per-pixel backward launch and its outputs (context buffer, grad_offsets).

    The context buffer is, for contexts of at most ``MAX_REDUCED_CELLS`` cells, the partial sums
    [N, programs, k1 * k2, C] (fp32/fp64) that :func:`reduce_context_partials` adds up; for larger
    contexts an empty tensor (the context gradient is gathered separately).
    """
    check_index_range("grad", grad)
    n, c, H, W = grad.shape
    k1, k2 = context.shape[-2:]
    acc_torch, acc_triton = accumulation_dtype(context.dtype)
    if grad_offsets is None:
        grad_offsets = torch.empty_like(offsets)
    cfg = launch_config("align_cm_backward", grad, config)
    cells = reduced_cells(k1, k2)
    # tl.dot needs BLOCK_P and BLOCK_C of at least 16 too.
    block_c = channel_block(c, cfg, minimum=MIN_DOT_SIZE if cells else 1)
    block_p = max(cfg.block_p, MIN_DOT_SIZE) if cells else cfg.block_p
    pixel_blocks = triton.cdiv(H * W, block_p)
    per_program = pixel_blocks_per_program or (1 if interpreting() else blocks_per_program(pixel_blocks, n))
    programs = triton.cdiv(pixel_blocks, per_program)
    if cells:
        buffer = torch.empty(n, programs, k1 * k2, c, dtype=acc_torch, device=grad.device)
    else:
        buffer = torch.empty(0, dtype=acc_torch, device=grad.device)
    launch = KernelLaunch(
        align_cm_backward_kernel,
        grid=(programs, n),
        args=(
            buffer, grad_offsets, grad, context, offsets,
            *strides(grad_offsets), *strides(grad), *strides(context), *strides(offsets),
            c, H, W, k1, k2, host_scale(k2, W), host_scale(k1, H), per_program,
        ),
        constexprs=dict(BLOCK_P=block_p, BLOCK_C=block_c, CELLS=max(cells, 1), REDUCE_CELLS=cells > 0,
                        ACC_DTYPE=acc_triton, PIXELS_LAST=pixels_last(grad)),
        num_warps=cfg.num_warps,
    )
    return launch, (buffer, grad_offsets)


def plan_reduce_context_partials(partial: torch.Tensor, context: torch.Tensor,
                                 grad_context: torch.Tensor | None = None) -> tuple[KernelLaunch, torch.Tensor]:
    """The launch that sums ``partial`` [N, programs, k1 * k2, C] over programs into a gradient shaped like
    ``context``."""
    n, programs, cells, c = partial.shape
    k1, k2 = context.shape[-2:]
    if grad_context is None:
        grad_context = torch.empty_like(context)
    block_c = min(128 if interpreting() else 256, triton.next_power_of_2(c))
    launch = KernelLaunch(
        reduce_context_partials_kernel,
        grid=(n * cells, triton.cdiv(c, block_c)),
        args=(grad_context, partial, *strides(grad_context), c, k1, k2, programs),
        constexprs=dict(BLOCK_C=block_c, ACC_DTYPE=accumulation_dtype(context.dtype)[1]),
        num_warps=4,
    )
    return launch, grad_context


def reduce_context_partials(partial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    launch, grad_context = plan_reduce_context_partials(partial, context)
    launch()
    return grad_context


def align_cm_backward(
    grad: torch.Tensor,
    context: torch.Tensor,
    offsets: torch.Tensor,
    grad_offsets: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
    pixel_blocks_per_program: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of (context, offsets) in their dtypes; local's gradient is ``grad`` itself.

    Bitwise reproducible from run to run on every path: the partial slots for contexts of at most
    ``MAX_REDUCED_CELLS`` cells, the binned gather for larger ones; no host read.
    """
    k1, k2 = context.shape[-2:]
    launch, (partial, grad_offsets) = plan_align_cm_backward(
        grad, context, offsets, grad_offsets=grad_offsets, config=config,
        pixel_blocks_per_program=pixel_blocks_per_program)
    launch()
    if reduced_cells(k1, k2):
        return reduce_context_partials(partial, context), grad_offsets
    return binned_transpose(grad, offsets, torch.empty_like(context), DIRECT), grad_offsets
