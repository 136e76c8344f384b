"""The fixed-point scatter of align_fa's source gradients (alignseg/kernels/fixed_point.py; the op's
``ALIGNSEG_BACKWARD=fixed_point`` path).

Each contribution is rounded once to an int64 and the integers are added with atomics, so the result cannot
depend on the order of the additions. Under the interpreter the order is fixed, so order-independence is
shown by changing the launch's blocks (another decomposition into programs, another order of the adds): the
fixed-point gradients stay bitwise equal. Values are checked against autograd through the eager reference in
float64; non-finite gradients against the float-atomic path of the same kernel and against the reference.
"""

import pytest
import torch

from alignseg.ops import align_fa_reference
from alignseg.ops.backend import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def inputs(n=2, c=5, H=13, W=11, h=7, w=6, dtype=torch.float32, layout=torch.contiguous_format, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, c, H, W, generator=g).to(dtype).contiguous(memory_format=layout)
    high = torch.randn(n, c, h, w, generator=g).to(dtype).contiguous(memory_format=layout)
    # Offsets of a pixel or two, many leaving the map at the border; never whole numbers (kinks).
    offsets = (torch.randn(n, 4, H, W, generator=g) * 1.3 + 0.05).contiguous(memory_format=layout)
    grad = torch.randn(n, c, H, W, generator=g).to(dtype).contiguous(memory_format=layout)
    return low, high, offsets, grad


def backward(grad, low, high, offsets, upsample_first=True, fixed_point=True, config=None):
    """(grad_low, grad_high): the fixed-point scatter, or the float atomics of the per-pixel backward."""
    from alignseg.kernels.align_fa import align_fa_backward, align_fa_sources_fixed_point

    if fixed_point:
        return align_fa_sources_fixed_point(grad, low, high, offsets, config=config, upsample_first=upsample_first)
    return align_fa_backward(grad, low, high, offsets, config=config, upsample_first=upsample_first)[:2]


def reference(grad, low, high, offsets, upsample_first=True):
    leaves = [t.detach().double().requires_grad_(True) for t in (low, high, offsets)]
    align_fa_reference(*leaves, upsample_first=upsample_first).backward(grad.double())
    return [t.grad for t in leaves]


@pytest.mark.parametrize("upsample_first", [True, False], ids=["upsample-first", "one-step"])
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_fixed_point_gradients_match_the_reference(dtype, layout, upsample_first):
    low, high, offsets, grad = inputs(dtype=dtype, layout=layout)
    result = backward(grad, low, high, offsets, upsample_first)
    atol, rtol = (2e-5, 1e-5) if dtype == torch.float32 else (3e-2, 2e-2)
    for name, r, ref, src in zip(("low", "high"), result, reference(grad, low, high, offsets, upsample_first),
                                 (low, high)):
        assert r.dtype == src.dtype and r.stride() == src.stride(), name
        torch.testing.assert_close(r.double(), ref, atol=atol * max(1.0, float(ref.abs().max())), rtol=rtol,
                                   msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("upsample_first", [True, False], ids=["upsample-first", "one-step"])
def test_fixed_point_sums_do_not_depend_on_the_order(upsample_first):
    from alignseg.kernels.launch import LaunchConfig

    low, high, offsets, grad = inputs(n=1, c=6, H=17, W=15, h=9, w=8, layout=torch.channels_last)
    offsets = offsets * 2  # more taps per cell
    # Other pixel and channel blocks: other programs, each adding its taps in another order.
    configs = [LaunchConfig(block_p=256, max_block_c=8, num_warps=4), LaunchConfig(block_p=16, max_block_c=2,
                                                                                   num_warps=4),
               LaunchConfig(block_p=64, max_block_c=4, num_warps=4)]
    results = [backward(grad, low, high, offsets, upsample_first, config=cfg) for cfg in configs]
    for other in results[1:]:
        assert torch.equal(other[0], results[0][0]) and torch.equal(other[1], results[0][1])
    # Not a tautology: the float path's sums do change with the order (fp32 addition is not associative).
    floats = [backward(grad, low, high, offsets, upsample_first, fixed_point=False, config=cfg) for cfg in configs]
    assert any(not torch.equal(f[1], floats[0][1]) for f in floats[1:])


@pytest.mark.parametrize("upsample_first", [True, False], ids=["upsample-first", "one-step"])
def test_non_finite_gradients_propagate_like_float_sums(upsample_first):
    low, high, offsets, grad = inputs(n=1, c=3, H=9, W=8, h=5, w=4)
    grad[0, 0, 4, 4] = float("nan")
    grad[0, 1, 2, 2] = float("inf")
    grad[0, 2, 6, 3] = -float("inf")
    grad[0, 2, 6, 4] = float("inf")  # +inf and -inf into neighbouring taps: NaN where both land
    grad[0, 1, 0, 0] = -float("inf")  # a corner: some taps leave the map
    fixed = backward(grad, low, high, offsets, upsample_first)
    floats = backward(grad, low, high, offsets, upsample_first, fixed_point=False)
    ref = reference(grad, low, high, offsets, upsample_first)
    for name, f, a, r in zip(("low", "high"), fixed, floats, ref):
        for kind in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(kind(f), kind(a)), f"{name}: {kind.__name__} differs from the float atomics"
        assert torch.isnan(f).any() and torch.isinf(f).any(), name
        # The eager reference reads an out-of-map tap at the clamped border cell with weight 0, so its gradient
        # adds inf * 0 = NaN there, where the kernels (and grid_sample) add nothing: compare where it is finite.
        finite = torch.isfinite(r)
        assert torch.equal(torch.isfinite(f) | ~finite, torch.ones_like(finite)), name
        torch.testing.assert_close(f.double()[finite], r[finite], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("magnitude", [1e-30, 1.0, 1e30])
def test_the_scale_follows_the_gradient_magnitude(magnitude):
    low, high, offsets, grad = inputs(n=1, c=4)
    scaled = grad * magnitude
    fixed = backward(scaled, low, high, offsets)
    ref = reference(scaled, low, high, offsets)
    for f, r in zip(fixed, ref):
        torch.testing.assert_close(f.double(), r, atol=2e-5 * magnitude, rtol=1e-5)
    zeros = backward(torch.zeros_like(grad), low, high, offsets)
    assert not zeros[0].any() and not zeros[1].any()


def test_scale_is_a_power_of_two_that_bounds_every_sum():
    from alignseg.kernels.fixed_point import SUM_BITS, fixed_point_scale

    grad = torch.randn(2, 3, 5, 7) * 37.0
    grad[0, 0, 0, 0] = float("nan")
    grad[1, 2, 3, 4] = -float("inf")  # non-finite values are flagged, not scaled: they do not set the scale
    scale = fixed_point_scale(grad, 35, torch.float32)
    mantissa, _ = torch.frexp(scale)
    assert scale.dtype == torch.float32 and mantissa.item() == 0.5
    largest = grad.nan_to_num(0.0, 0.0, 0.0).abs().max().item()
    assert largest * 35 * scale.item() <= 2.0**SUM_BITS < 2 * largest * 35 * scale.item()
    assert torch.isfinite(fixed_point_scale(torch.zeros(1, 1, 2, 2), 4, torch.float32))
    assert torch.isfinite(fixed_point_scale(torch.zeros(0, 1, 2, 2), 4, torch.float64))


def test_finalize_refuses_mismatched_layouts():
    from alignseg.kernels.fixed_point import fixed_point_buffers, plan_fixed_point_finalize

    sums, flags = fixed_point_buffers(torch.empty(1, 3, 4, 5))
    out = torch.empty(1, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="share one dense layout"):
        plan_fixed_point_finalize(out, sums, flags, torch.ones(()))
