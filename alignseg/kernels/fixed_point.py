"""Deterministic atomic accumulation in 64-bit fixed point.

Floating-point atomics give a result that depends on the order the additions land in; integer addition does
not (it is associative, and exact while nothing overflows). So a scatter can stay a scatter, with its traffic,
and still be bitwise reproducible: each contribution ``v`` is rounded once to the integer ``round(v * S)``,
the integers are added with 64-bit atomics in any order, and a final pass writes ``sum / S`` in the output's
dtype. Contributions that are not finite cannot be integers: they set bits in a per-cell int32 flag word
instead (``atomic_or``, also order-free), and the final pass turns the flags into inf or NaN, as a float sum
would (NaN if any NaN, or +inf and -inf both).

The scale ``S`` is a power of two, so ``v * S`` is exact, chosen on the device (no host read) from the
largest finite ``|grad|`` so that no sum can overflow: a cell of a sampled map receives the gradient of each
output pixel of its image times weights that sum to at most 1 per pixel, so ``|sum| <= max|grad| * H * W``,
and ``S = 2**(62 - ceil(log2(max|grad| * H * W)))`` keeps every sum under 2**62. The rounding error is at most
``0.5 / S < max|grad| * H * W * 2**-62`` per contribution: about 1e-14 * max|grad| for a 219x219 map,
below fp32's own rounding of the sums, but coarser than fp64's for small gradients (the float64 path keeps
its float atomics or gathers).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import KernelLaunch, interpreting

# Scatter modes of scatter_tile / scatter_add (constexpr SCATTER): float atomics into an fp32/fp64 buffer, or
# fixed-point int64 atomics with flags (this module).
SCATTER_FLOAT = tl.constexpr(1)
SCATTER_FIXED = tl.constexpr(2)

# Flag bits of a cell that received a non-finite contribution.
POS_INF = tl.constexpr(1)
NEG_INF = tl.constexpr(2)
NOT_A_NUMBER = tl.constexpr(4)

SUM_BITS = 62  # |sum| < 2**SUM_BITS: headroom under int64's 2**63 for the 0.5-per-contribution rounding
FINALIZE_BLOCK = 1024


@triton.jit
def scatter_add(buffer_ptr, flags_ptr, at, values, mask, fixed_scale, SCATTER: tl.constexpr):
    """Atomically add ``values`` at ``buffer_ptr + at``: float atomics (SCATTER_FLOAT), or in fixed point with
    the non-finite ones flagged at ``flags_ptr + at`` (SCATTER_FIXED; the flag buffer has the same layout)."""
    if SCATTER == SCATTER_FIXED:
        # A comparison, not arithmetic: ``values - values == 0`` was compiled for sm_90 as fma(a, b, -(a * b)) where
        # values = a * b (the product's rounding error, rarely 0), which flagged nearly every finite contribution
        # as non-finite on an H200 (bench/results/h200-2026-11-27/run3_*).
        finite = tl.abs(values) < float("inf")  # false for inf and NaN
        scaled = tl.where(finite, values, 0.0) * fixed_scale
        tl.atomic_add(buffer_ptr + at, tl.floor(scaled + 0.5).to(tl.int64), mask=mask & finite, sem="relaxed")
        kind = tl.where(values != values, NOT_A_NUMBER, tl.where(values > 0, POS_INF, NEG_INF))
        tl.atomic_or(flags_ptr + at, kind.to(tl.int32), mask=mask & ~finite, sem="relaxed")
    else:
        tl.atomic_add(buffer_ptr + at, values, mask=mask, sem="relaxed")


# out = sums / scale in out's dtype, or inf / NaN where the flags say so. Elementwise over the storage: the
# sums, flags and output share one dense layout. Grid: (blocks of FINALIZE_BLOCK elements,).
@triton.jit
def fixed_point_finalize_kernel(out_ptr, sums_ptr, flags_ptr, scale_ptr, numel, BLOCK: tl.constexpr):
    at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = at < numel
    inverse = 1.0 / tl.load(scale_ptr).to(tl.float64)  # exact: the scale is a power of two
    # int64 -> float64 is exact below 2**53 and correctly rounded above; one rounding more to the output dtype.
    value = tl.load(sums_ptr + at, mask=mask, other=0).to(tl.float64) * inverse
    flags = tl.load(flags_ptr + at, mask=mask, other=0)
    pos, neg = (flags & POS_INF) != 0, (flags & NEG_INF) != 0
    value = tl.where(pos, float("inf"), value)
    value = tl.where(neg, tl.where(pos, float("nan"), -float("inf")), value)
    value = tl.where((flags & NOT_A_NUMBER) != 0, float("nan"), value)
    if out_ptr.dtype.element_ty != tl.float64:
        value = value.to(tl.float32)  # float64 -> bf16 directly gives NaN under triton's interpreter
    tl.store(out_ptr + at, value.to(out_ptr.dtype.element_ty), mask=mask)


def fixed_point_scale(grad: torch.Tensor, pixels: int, dtype: torch.dtype) -> torch.Tensor:
    """The device scalar S (``dtype``, a power of two) for contributions ``grad * weights`` into cells that each
    receive weights summing to at most ``pixels`` per gradient value: no host read."""
    largest = grad.abs().nan_to_num_(0.0, 0.0, 0.0).amax().to(torch.float64) if grad.numel() else grad.new_zeros(
        (), dtype=torch.float64)
    bound = (largest * max(pixels, 1)).clamp_min(2.0**-60)  # all-zero gradients: any scale will do
    exponent = SUM_BITS - torch.ceil(torch.log2(bound))
    return torch.ldexp(torch.ones((), dtype=dtype, device=grad.device), exponent.to(dtype))


def plan_fixed_point_finalize(out: torch.Tensor, sums: torch.Tensor, flags: torch.Tensor,
                              scale: torch.Tensor) -> KernelLaunch:
    """The launch of :func:`fixed_point_finalize_kernel`; ``out``, ``sums`` and ``flags`` must share one dense
    layout (contiguous or channels_last)."""
    dense = sums.is_contiguous() or (sums.dim() == 4 and sums.is_contiguous(memory_format=torch.channels_last))
    if not (dense and out.stride() == sums.stride() == flags.stride()):
        raise ValueError("fixed-point finalize: out, sums and flags must share one dense layout")
    numel = sums.numel()
    block = 4096 if interpreting() else FINALIZE_BLOCK
    return KernelLaunch(fixed_point_finalize_kernel, grid=(max(1, triton.cdiv(numel, block)),),
                        args=(out, sums, flags, scale, numel), constexprs=dict(BLOCK=block), num_warps=4)


def fixed_point_buffers(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed int64 sums and int32 flags with ``like``'s shape and strides (``like`` is dense)."""
    return torch.zeros_like(like, dtype=torch.int64), torch.zeros_like(like, dtype=torch.int32)


def finalize(sums: torch.Tensor, flags: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The accumulated values in ``dtype``: a new tensor with the sums' strides."""
    out = torch.empty_like(sums, dtype=dtype)
    plan_fixed_point_finalize(out, sums, flags, scale)()
    return out
