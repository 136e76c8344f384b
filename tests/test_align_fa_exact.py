"""align_fa's default form is the authors' function: upsample ``high`` (bilinear, align_corners=True), then warp.

The oracle is written here, independently of alignseg: ``F.interpolate`` then ``F.grid_sample`` (zero
padding, align_corners=True) in float64, as the authors' CAB computes it. Sizes are those where the
fused exact form and the one-step variant differ ((h-1)/(H-1) not a power of 1/2, non-square, h or
w = 1), with offsets that leave the map. Both backends: the Triton kernels (interpreter here) and the
eager reference; low precision, NaN/inf, opcheck and gradcheck of the exact form run in
test_kernels_ops.py (its ``align_fa`` cases use the default form).
"""

import pytest
import torch
import torch.nn.functional as F

from alignseg.ops import align_fa, align_fa_grid_sample, align_fa_reference, use_backend
from alignseg.ops.backend import triton_available

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
# (coarse h, w) -> (fine H, W)
# The last is larger than the fine map along one axis: the kernels' unmerged 16 taps (align_fa.merged_cells).
SIZES = [((13, 13), (26, 26)), ((9, 9), (17, 17)), ((7, 11), (13, 21)), ((1, 5), (4, 9)), ((6, 1), (11, 1)),
         ((5, 12), (9, 7))]
BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="needs triton")),
    "reference",
]


def authors_chain(low, high, offsets):
    """The authors' AlignFA on float64 inputs: interpolate, then grid_sample both maps by pixel offsets."""
    out_h, out_w = low.shape[-2:]
    upsampled = F.interpolate(high, size=(out_h, out_w), mode="bilinear", align_corners=True)
    cols = torch.arange(out_w, dtype=low.dtype).view(1, 1, out_w)
    rows = torch.arange(out_h, dtype=low.dtype).view(1, out_h, 1)

    def warp(x, d):
        gx = (cols + d[:, 0]) * (2 / max(out_w - 1, 1)) - 1
        gy = (rows + d[:, 1]) * (2 / max(out_h - 1, 1)) - 1
        grid = torch.stack((gx, gy), dim=-1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)

    return warp(upsampled, offsets[:, 0:2]) + warp(low, offsets[:, 2:4])


def make_inputs(coarse, fine, channels=3, dtype=torch.float32, layout=torch.contiguous_format):
    """Features and offsets of 2.5 pixels, a few far outside the map (non-integer, so no kink is hit)."""
    low = torch.randn(2, channels, *fine, dtype=torch.float64)
    high = torch.randn(2, channels, *coarse, dtype=torch.float64)
    offsets = torch.randn(2, 4, *fine, dtype=torch.float64) * 2.5 + 0.1
    offsets[:, :, 0, 0] = torch.tensor([-30.3, 41.7, 12.2, -9.6])
    feature = lambda t: t.to(dtype).contiguous(memory_format=layout)  # noqa: E731
    return [feature(low), feature(high), offsets.to(dtype)]


def values_and_grads(fn, inputs, grad_output):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(grad_output)
    return [out.detach(), *(t.grad for t in leaves)]


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("coarse, fine", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_form_is_the_authors_chain(backend, coarse, fine, layout):
    inputs = make_inputs(coarse, fine, layout=layout)
    grad_output = torch.randn(2, 3, *fine, dtype=torch.float64)
    with use_backend(backend):
        got = values_and_grads(align_fa, inputs, grad_output.float())
    expected = values_and_grads(authors_chain, [t.double() for t in inputs], grad_output)
    assert got[0].is_contiguous(memory_format=layout)
    for name, g, e in zip(("out", "grad_low", "grad_high", "grad_offsets"), got, expected):
        torch.testing.assert_close(g.double(), e, atol=2e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("coarse, fine", SIZES[:3], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_form_fp64_to_rounding_and_the_one_step_variant_differs(backend, coarse, fine):
    inputs = make_inputs(coarse, fine, dtype=torch.float64)
    with use_backend(backend):
        exact = align_fa(*inputs)
        one_step = align_fa(*inputs, upsample_first=False)
    expected = authors_chain(*inputs)
    torch.testing.assert_close(exact, expected, atol=1e-12, rtol=1e-12)
    # At these sizes the one-step form is another function (the review measured up to 0.78 inside the map).
    assert (one_step - expected).abs().max() > 0.1


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_exact_kernels_gradcheck_fp64():
    low, high, offsets = (t.requires_grad_(True) for t in make_inputs((4, 3), (7, 5), channels=2, dtype=torch.float64))
    with use_backend("triton"):
        assert torch.autograd.gradcheck(align_fa, (low, high, offsets), fast_mode=True)


@pytest.mark.skipif(not triton_available(), reason="needs triton")
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("path", ["forward", "atomic", "fixed_point"])
def test_merged_coarse_cells_match_the_sixteen_taps(path, layout):
    """A coarse map no larger than the fine one: each pixel's 16 coarse taps (4 fine taps of U, 4 coarse taps
    each) are merged into at most 3x3 cells (bilinear.upsampled_cell_*). Against the same kernels with the 16
    taps: the same values to rounding, and the same elements non-finite when the output gradient has NaN and
    inf. Integer offsets in some rows give fine taps of weight 0."""
    from alignseg.kernels import align_fa as kernels
    from alignseg.kernels.fixed_point import finalize

    low, high, offsets = make_inputs((5, 4), (9, 7), layout=layout)
    offsets[:, :, 2:4] = offsets[:, :, 2:4].round()
    grad = torch.randn(2, 3, 9, 7).contiguous(memory_format=layout)
    grad[0, 0, 4, 4] = float("nan")
    grad[0, 1, 2, 2] = float("inf")  # an integer-offset row
    grad[1, 2, 6, 3] = -float("inf")
    grad[1, 2, 6, 4] = float("inf")
    grad[1, 0, 0, 0] = float("inf")  # a corner: taps leave the map
    assert kernels.merged_cells(low, high, True) and not kernels.merged_cells(low, high, False)
    assert not kernels.merged_cells(high, low, True)

    def gradients(merged):
        if path == "forward":
            launch, out = kernels.plan_align_fa_forward(low, high, offsets)
            launch.constexprs["MERGED_CELLS"] = merged
            launch()
            return (out,)
        if path == "atomic":
            launch, (_, grad_high, grad_offsets) = kernels.plan_align_fa_backward(grad, low, high, offsets)
            launch.constexprs["MERGED_CELLS"] = merged
            launch()
            return grad_high, grad_offsets
        launch, (_, _, sums, flags, scale) = kernels.plan_align_fa_fixed_point_scatter(grad, low, high, offsets)
        launch.constexprs["MERGED_CELLS"] = merged
        launch()
        return (finalize(sums, flags, scale, torch.float32),)

    names = ("out",) if path == "forward" else ("grad_high", "grad_offsets")
    for name, merged, taps in zip(names, gradients(True), gradients(False)):
        finite = torch.isfinite(taps)
        assert torch.equal(torch.isfinite(merged), finite), name
        assert finite.all() if path == "forward" else not finite.all(), name
        torch.testing.assert_close(merged[finite], taps[finite], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_form_non_finite_offsets(backend):
    """NaN samples nothing and gets no gradient, +-inf lie outside: the same in the kernels, the reference
    and the grid_sample formulation."""
    low, high, offsets = make_inputs((5, 4), (9, 7), dtype=torch.float64)
    offsets[0, 0, 1, 1] = float("nan")
    offsets[0, 1, 2, 2] = float("inf")
    offsets[1, 0, 3, 3] = -float("inf")
    offsets[1, :, 4, 4] = float("nan")
    offsets[0, 2:, 5, 5] = float("nan")
    grad_output = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    with use_backend(backend):
        got = values_and_grads(align_fa, [low, high, offsets], grad_output)
    by_grid_sample = values_and_grads(align_fa_grid_sample, [low, high, offsets], grad_output)
    assert all(torch.isfinite(t).all() for t in got)
    for g, e in zip(got, by_grid_sample):
        torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12)
    # Every offset NaN at (1, :, 4, 4): both warps sample nothing there, and the offsets get no gradient.
    assert torch.all(got[0][1, :, 4, 4] == 0) and torch.all(got[3][1, :, 4, 4] == 0)


@pytest.mark.parametrize("upsample_first", [True, False])
@pytest.mark.parametrize("coarse, fine", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_grid_sample_formulation_matches_the_reference(coarse, fine, upsample_first):
    inputs = make_inputs(coarse, fine, dtype=torch.float64)
    grad_output = torch.randn(2, 3, *fine, dtype=torch.float64)
    reference = values_and_grads(lambda *a: align_fa_reference(*a, upsample_first=upsample_first), inputs, grad_output)
    by_grid_sample = values_and_grads(
        lambda *a: align_fa_grid_sample(*a, upsample_first=upsample_first), inputs, grad_output
    )
    for r, g in zip(reference, by_grid_sample):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=1e-12)
