"""The deterministic backward: gather transposes of the sampling over pixel bins
(alignseg/kernels/align_fa_gather.py) and AlignCM's partial-sum context gradient, against autograd through the
eager references in float64.

Under the interpreter every program costs milliseconds per step, so maps are small and C is tiny; dedicated tests
cover far, huge and NaN offsets, crowded bins, and coarse maps larger than the output.
"""

import pytest
import torch
import torch.nn.functional as F

from alignseg.ops import align_cm, align_cm_reference, use_backend
from alignseg.ops.backend import triton_available
from alignseg.ops.sampling import sample_reference

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
# (H, W, h, w): odd sizes, not multiples of the tiles; 2x-ish, non-power-of-two scales, non-square, size 1.
SIZES = [(13, 11, 8, 6), (10, 7, 5, 4), (1, 8, 1, 3)]


def gather():
    from alignseg.kernels import align_fa_gather

    return align_fa_gather


def offsets_of(n, H, W, scale=1.0, limit=1.5, device="cpu"):
    """Non-integer offsets of a pixel or two, some leaving the map near the border."""
    return (torch.randn(n, 2, H, W, device=device) * scale + 0.1).clamp(-limit, limit)


def transpose_reference(grad, offsets2, src_hw, upsample_first=False):
    """The gradient of the source of S(src, d) (or of W(U(src), d)) by autograd through the eager reference, in
    float64."""
    n, c, H, W = grad.shape
    src = torch.zeros(n, c, *src_hw, dtype=torch.float64, requires_grad=True)
    if upsample_first:
        up = F.interpolate(src, (H, W), mode="bilinear", align_corners=True)
        out = sample_reference(up, offsets2.double())
    else:
        out = sample_reference(src, offsets2.double())
    out.backward(grad.double())
    return src.grad


def upsample_transpose_reference(grad_up, h, w):
    src = torch.zeros(*grad_up.shape[:2], h, w, dtype=torch.float64, requires_grad=True)
    F.interpolate(src, grad_up.shape[-2:], mode="bilinear", align_corners=True).backward(grad_up.double())
    return src.grad


def check_close(result, reference, dtype):
    atol, rtol = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-5, 1e-5)}.get(dtype, (3e-2, 2e-2))
    if dtype in (torch.float16, torch.bfloat16):
        atol = atol * max(1.0, float(reference.abs().max()))
    torch.testing.assert_close(result.double(), reference, atol=atol, rtol=rtol)


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_gather_transposes_match_autograd_fp32(size, layout):
    G = gather()
    H, W, h, w = size
    grad = torch.randn(2, 3, H, W).contiguous(memory_format=layout)
    off = offsets_of(2, H, W)
    for name, result, reference in [
        ("warp", G.warp_transpose(grad, off), transpose_reference(grad, off, (H, W))),
        ("one-step", G.sample_transpose(grad, off, (h, w)), transpose_reference(grad, off, (h, w))),
        ("upsample-then-warp", G.upsample_warp_transpose(grad, off, (h, w)),
         transpose_reference(grad, off, (h, w), True)),
        ("upsample", G.upsample_transpose(grad, h, w), upsample_transpose_reference(grad, h, w)),
    ]:
        assert result.dtype == grad.dtype and result.shape[-2:] == reference.shape[-2:], name
        assert result.is_contiguous(memory_format=layout) or result.shape[1] == 1, f"{name}: layout of grad expected"
        check_close(result, reference, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=["fp64", "fp16", "bf16"])
def test_gather_transposes_precisions(dtype):
    G = gather()
    H, W, h, w = 11, 9, 6, 5
    grad = torch.randn(1, 2, H, W).to(dtype).contiguous(memory_format=torch.channels_last)
    off = offsets_of(1, H, W).to(dtype if dtype == torch.float64 else torch.float32)
    check_close(G.warp_transpose(grad, off), transpose_reference(grad, off, (H, W)), dtype)
    check_close(G.upsample_warp_transpose(grad, off, (h, w)), transpose_reference(grad, off, (h, w), True), dtype)
    check_close(G.upsample_transpose(grad, h, w), upsample_transpose_reference(grad, h, w), dtype)


@pytest.mark.parametrize("regime", ["huge", "nan", "far-inside"])
def test_gather_offset_regimes(regime):
    """Huge and NaN offsets reach nothing (their pixels go to the bin after every other); a far in-map offset
    is found however far it reaches."""
    G = gather()
    H, W, h, w = 9, 10, 5, 5
    grad = torch.randn(1, 2, H, W)
    off = offsets_of(1, H, W)
    if regime == "huge":
        off[0, 0, ::2] = 1e30
        off[0, 1, 1::3] = -float("inf")
    elif regime == "nan":
        off[0, :, 2:5, 3:7] = float("nan")
    else:
        off[0, :, 4, 4] = torch.tensor([4.5, -3.25])
        off[0, :, 0, 0] = torch.tensor([8.25, 7.5])
    bins = G.pixel_bins(off, 1, (H, W), (H, W))
    if regime == "far-inside":  # pixel (0, 0) samples (x, y) = (8.25, 7.5): bin (7, 8), whatever its neighbours do
        assert 0 in bins.order[bins.starts[7 * W + 8]:bins.starts[7 * W + 9]].tolist()
    else:  # after the last bin: the pixels whose taps all leave the map, these among them
        assert H * W - int(bins.starts[-1]) >= (50 if regime == "huge" else 12)
    check_close(G.warp_transpose(grad, off), transpose_reference(grad, off, (H, W)), torch.float32)
    check_close(G.upsample_warp_transpose(grad, off, (h, w)), transpose_reference(grad, off, (h, w), True),
                torch.float32)


@pytest.mark.parametrize("upsample_first", [True, False], ids=["upsample-then-warp", "one-step"])
def test_gather_onto_a_source_larger_than_the_output(upsample_first):
    """A coarse map larger than the output: wider bin spans for the upsample-then-warp (bin_span)."""
    G = gather()
    H, W = 7, 6
    grad, off = torch.randn(2, 3, H, W), offsets_of(2, H, W)
    for larger in ((H + 3, W + 2), (2 * H + 1, 3 * W)):
        transpose = G.upsample_warp_transpose if upsample_first else G.sample_transpose
        check_close(transpose(grad, off, larger), transpose_reference(grad, off, larger, upsample_first),
                    torch.float32)
    assert G.bin_span(H, 2 * H + 1, G.COMPOSITE) == 6 and G.bin_span(H, H, G.COMPOSITE) == 3
    assert G.bin_span(H, 2 * H + 1, G.DIRECT) == 2


def bins_reference(offsets2, target_hw, upsample_first=False):
    """(order, starts) of the pixel bins in float64: the first source cell (row, column) each pixel's taps reach."""
    n, _, H, W = offsets2.shape
    th, tw = target_hw

    def reached_cells(index, shift, out_size, size):
        # DIRECT: taps floor(x), floor(x) + 1 of x = (index + shift) * scale; COMPOSITE: fine taps f, f + 1 inside
        # the output grid, each upsampled from coarse cells floor(p * scale) and the next.
        scale = (size - 1) / (out_size - 1) if out_size > 1 else 0.0
        if not upsample_first:
            t0 = torch.floor((index + shift) * scale)
            return t0.clamp(min=0), torch.minimum(t0 + 1, torch.tensor(size - 1.0))
        f0 = torch.floor(index + shift)
        lo, hi = f0.clamp(min=0), torch.minimum(f0 + 1, torch.tensor(out_size - 1.0))
        return (torch.where(lo <= hi, torch.floor(lo * scale), torch.tensor(float(size))),
                torch.minimum(torch.floor(hi * scale) + 1, torch.tensor(size - 1.0)))

    rows = torch.arange(H, dtype=torch.float64)[:, None].expand(H, W)
    cols = torch.arange(W, dtype=torch.float64)[None, :].expand(H, W)
    keys = []
    for b in range(n):
        dx, dy = offsets2[b, 0].double(), offsets2[b, 1].double()
        ylo, yhi = reached_cells(rows, dy, H, th)
        xlo, xhi = reached_cells(cols, dx, W, tw)
        reaches = (ylo <= yhi) & (xlo <= xhi) & ~(dx.isnan() | dy.isnan())
        keys.append(torch.where(reaches, (b * th + ylo) * tw + xlo, n * th * tw).flatten().long())
    keys = torch.cat(keys)
    order = torch.argsort(keys, stable=True)
    starts = torch.cat((torch.zeros(1, dtype=torch.long), torch.bincount(keys, minlength=n * th * tw + 1).cumsum(0)))
    return (order % (H * W)).int(), starts[: n * th * tw + 1].int()


@pytest.mark.parametrize("upsample_first, target_hw", [(False, (9, 10)), (False, (5, 4)), (True, (5, 4))],
                         ids=["same-size", "one-step", "upsample-first"])
def test_pixel_bins_group_each_pixel_by_its_first_tap(upsample_first, target_hw):
    """Against the float64 rule: offsets are quarter pixels (exact in fp32), some far outside, some NaN."""
    G = gather()
    n, H, W = 2, 9, 10
    off = torch.randint(-12, 13, (n, 2, H, W)).float() / 4
    off[0, 0, 2, 3] = 40.0  # leaves the map
    off[1, :, 4, 5] = float("nan")
    got = G.pixel_bins(off, n, (H, W), target_hw, G.COMPOSITE if upsample_first else G.DIRECT)
    order, starts = bins_reference(off, target_hw, upsample_first)
    torch.testing.assert_close(got.starts, starts, rtol=0, atol=0)
    torch.testing.assert_close(got.order, order, rtol=0, atol=0)


@pytest.mark.parametrize("upsample_first", [False, True], ids=["warp", "upsample-then-warp"])
def test_binned_gather_where_pixels_crowd_one_cell(upsample_first):
    """Offsets that pull most pixels onto a few cells (bins of tens of pixels), others far outside: the gather's
    step count follows the fullest bin; twice the same bits."""
    G = gather()
    n, c, H, W = 1, 3, 12, 11
    rows = torch.arange(H).float()[:, None].expand(H, W)
    cols = torch.arange(W).float()[None, :].expand(H, W)
    off = torch.stack((5.3 - cols, 4.6 - rows))[None] + 0.2 * torch.randn(n, 2, H, W)
    off[0, :, 0, :3] = 1e6
    grad = torch.randn(n, c, H, W).contiguous(memory_format=torch.channels_last)
    hw = (6, 6) if upsample_first else (H, W)
    mode = G.COMPOSITE if upsample_first else G.DIRECT
    bins = G.pixel_bins(off, n, (H, W), hw, mode)
    assert int((bins.starts[1:] - bins.starts[:-1]).max()) >= 10, "the test needs a crowded bin"
    first = G.binned_transpose(grad, off, torch.full((n, c, *hw), float("nan")), mode)
    check_close(first, transpose_reference(grad, off, hw, upsample_first), torch.float32)
    assert torch.equal(G.binned_transpose(grad, off, torch.empty(n, c, *hw), mode), first)


def test_pixel_bins_refuse_sizes_past_int32():
    """Bin keys and pixel indices are int32: a batch past that range is refused up front, naming the sizes."""
    G = gather()
    with pytest.raises(ValueError, match=r"int32: 65536 images of 256x256 pixels"):
        G.pixel_bins(None, 2**16, (256, 256), (4, 4), device=torch.device("meta"))


class deterministic:
    def __enter__(self):
        self.previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.previous)


def test_gather_writes_every_element():
    """No zero fill: the gather itself must write every element of its output, hit or not."""
    G = gather()
    H, W = 10, 13
    grad, off = torch.randn(1, 3, H, W), offsets_of(1, H, W)
    off[0, :, :4] = float("nan")  # rows no output pixel reaches still get their zeros written
    out = torch.full((1, 3, H, W), float("nan"))
    G.binned_transpose(grad, off, out)
    assert not out.isnan().any()
    check_close(out, transpose_reference(grad, off, (H, W)), torch.float32)
    assert torch.equal(G.binned_transpose(grad, off, torch.empty_like(out)), out), "two runs must be bitwise equal"


def offsets_gradient_reference(grad, low, high, offsets, upsample_first):
    """d out / d offsets of AlignFA by autograd through the eager reference, in float64."""
    from alignseg.ops import align_fa_reference

    leaf = offsets.detach().double().requires_grad_(True)
    align_fa_reference(low.double(), high.double(), leaf, upsample_first=upsample_first).backward(grad.double())
    return leaf.grad


# (H, W, h, w, config): the interpreter's one tile per image, then small tiles (several tiles, tile edges inside the
# maps, channel blocks of 2 over C = 3, offsets' gradient steps of 2 pixels), a coarse map larger than the output.
FUSED_CASES = {
    "one-tile": (9, 13, 5, 7, None),
    "small-tiles": (7, 9, 4, 5, (2, 4, 2, 1, 2, 1)),
    "high-larger-small-tiles": (5, 6, 7, 9, (4, 2, 2, 1, 4, 1)),
}


@pytest.mark.parametrize("upsample_first", [True, False], ids=["upsample-first", "one-step"])
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("case", FUSED_CASES, ids=FUSED_CASES.keys())
def test_align_fa_backward_deterministic(case, layout, upsample_first, monkeypatch):
    """All three gradients from one launch: the sources' against the float64 transposes, the offsets' against
    autograd through the reference and bitwise against the per-pixel kernel's (the same sums in the same order)."""
    from alignseg.kernels.align_fa import align_fa_offsets_backward

    G = gather()
    H, W, h, w, config = FUSED_CASES[case]
    config = G.GatherConfig(*config) if config else None
    if case != "one-tile" and (layout == torch.contiguous_format or not upsample_first):
        pytest.skip("small tiles: channels_last, upsample-first only (each costs ~10 s under the interpreter)")
    launches = []
    plan = G.plan_align_fa_gather_backward
    monkeypatch.setattr(G, "plan_align_fa_gather_backward", lambda *a, **k: launches.append(1) or plan(*a, **k))
    n, c = 2, 3
    low = torch.randn(n, c, H, W).contiguous(memory_format=layout)
    high = torch.randn(n, c, h, w).contiguous(memory_format=layout)
    offsets = torch.cat((offsets_of(n, H, W), offsets_of(n, H, W)), 1).contiguous(memory_format=layout)
    grad = torch.randn(n, c, H, W).contiguous(memory_format=layout)
    grad_low, grad_high, grad_offsets = G.align_fa_backward_deterministic(grad, low, high, offsets, upsample_first,
                                                                          config)
    assert launches == [1]
    assert grad_low.shape == low.shape and grad_high.shape == high.shape and grad_offsets.shape == offsets.shape
    assert grad_high.stride() == high.stride() and grad_low.stride() == low.stride()
    check_close(grad_low, transpose_reference(grad, offsets[:, 2:4], (H, W)), torch.float32)
    check_close(grad_high, transpose_reference(grad, offsets[:, 0:2], (h, w), upsample_first), torch.float32)
    check_close(grad_offsets, offsets_gradient_reference(grad, low, high, offsets, upsample_first), torch.float32)
    if config is None:
        assert torch.equal(grad_offsets, align_fa_offsets_backward(grad, low, high, offsets,
                                                                   upsample_first=upsample_first))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=["fp64", "fp16", "bf16"])
def test_align_fa_backward_deterministic_dtypes(dtype):
    """The one launch in float64 (to float64's rounding) and in half precision (accumulated in fp32, written in the
    maps' dtype), all three gradients against autograd through the reference."""
    G = gather()
    n, c, H, W, h, w = 1, 3, 9, 13, 5, 7
    low = torch.randn(n, c, H, W).to(dtype).contiguous(memory_format=torch.channels_last)
    high = torch.randn(n, c, h, w).to(dtype).contiguous(memory_format=torch.channels_last)
    offsets = torch.cat((offsets_of(n, H, W), offsets_of(n, H, W)), 1).to(dtype if dtype == torch.float64 else
                                                                              torch.float32)
    grad = torch.randn(n, c, H, W).to(dtype).contiguous(memory_format=torch.channels_last)
    grad_low, grad_high, grad_offsets = G.align_fa_backward_deterministic(grad, low, high, offsets)
    assert grad_low.dtype == grad_high.dtype == dtype and grad_offsets.dtype == offsets.dtype
    check_close(grad_low, transpose_reference(grad, offsets[:, 2:4], (H, W)), dtype)
    check_close(grad_high, transpose_reference(grad, offsets[:, 0:2], (h, w), True), dtype)
    check_close(grad_offsets, offsets_gradient_reference(grad, low, high, offsets, True), dtype)


@pytest.mark.parametrize("upsample_first", [True, False], ids=["upsample-first", "one-step"])
def test_align_fa_backward_deterministic_reads_nothing_on_the_host(upsample_first, monkeypatch):
    """The gather backward takes its bins from the device: no host read, in any mode."""
    G = gather()

    def no_host_read(*args, **kwargs):
        raise AssertionError("the gather backward reads nothing back to the host")

    monkeypatch.setattr(torch.Tensor, "tolist", no_host_read)
    monkeypatch.setattr(torch.Tensor, "item", no_host_read)
    n, c, H, W, h, w = 1, 2, 9, 8, 5, 4
    low, high, grad = torch.randn(n, c, H, W), torch.randn(n, c, h, w), torch.randn(n, c, H, W)
    offsets = torch.cat((offsets_of(n, H, W), offsets_of(n, H, W)), 1)
    grad_low, grad_high, _ = G.align_fa_backward_deterministic(grad, low, high, offsets, upsample_first)
    monkeypatch.undo()
    check_close(grad_low, transpose_reference(grad, offsets[:, 2:4], (H, W)), torch.float32)
    check_close(grad_high, transpose_reference(grad, offsets[:, 0:2], (h, w), upsample_first), torch.float32)


def test_tile_group_is_the_fine_tiles_a_coarse_tile_covers():
    """A gather-backward program's coarse tile (as many cells as a fine tile) covers about (H - 1) / (h - 1) fine
    tiles per axis; 1 where the coarse map is not smaller."""
    G = gather()
    assert [G.tile_group(219, 110), G.tile_group(219, 55), G.tile_group(29, 15), G.tile_group(13, 5)] == [2, 4, 2, 3]
    assert [G.tile_group(219, 219), G.tile_group(219, 240), G.tile_group(1, 1), G.tile_group(219, 1)] == [1, 1, 1, 218]


# ----------------------------------------------------------------------------------------------
# AlignCM: partial sums per program, reduced in a fixed order.


def cm_grads(context, offsets, local, grad, backend):
    leaves = [t.detach().clone().requires_grad_(True) for t in (context, offsets, local)]
    with use_backend(backend):
        (align_cm(*leaves) if backend == "triton" else align_cm_reference(*leaves)).backward(grad)
    return [t.grad for t in leaves]


@pytest.mark.parametrize("blocks_per_program", [1, 3])
@pytest.mark.parametrize("context_size", [(3, 3), (9, 9)], ids=["3x3", "9x9-gather"])
def test_align_cm_deterministic_backward(context_size, blocks_per_program, monkeypatch):
    """Small contexts: several pixel blocks per program, the partial slots read back and summed; large: the gather."""
    from alignseg.kernels import align_cm as kernels
    from alignseg.kernels.launch import LaunchConfig

    plan = kernels.plan_align_cm_backward
    seen = []

    def small_blocks(*args, **kwargs):
        kwargs.update(config=LaunchConfig(block_p=16, max_block_c=16, num_warps=1),
                      pixel_blocks_per_program=blocks_per_program)
        seen.append(kwargs.get("pixel_blocks_per_program"))
        return plan(*args, **kwargs)

    monkeypatch.setattr(kernels, "plan_align_cm_backward", small_blocks)
    n, c, H, W = 2, 17, 9, 11
    context = torch.randn(n, c, *context_size, dtype=torch.float64)
    offsets = offsets_of(n, H, W).double()
    local = torch.randn(n, c, H, W, dtype=torch.float64)
    grad = torch.randn(n, c, H, W, dtype=torch.float64)
    if blocks_per_program == 3:
        with deterministic():
            grads = cm_grads(context, offsets, local, grad, "triton")
    else:
        grads = cm_grads(context, offsets, local, grad, "triton")
    for got, want in zip(grads, cm_grads(context, offsets, local, grad, "reference")):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    assert seen == [blocks_per_program]


def test_align_cm_large_context_far_offsets(monkeypatch):
    """A large context (more cells than the partial slots take) gets its gradient from the binned gather, far
    offsets or not, in either mode: no atomic scatter is left in align_cm."""
    from alignseg.kernels import align_cm as kernels
    from alignseg.kernels import align_fa_gather as G

    seen = []
    transpose = G.binned_transpose
    monkeypatch.setattr(kernels, "binned_transpose", lambda *a, **k: seen.append(1) or transpose(*a, **k))
    n, c, H, W = 1, 3, 8, 9
    context, local, grad = torch.randn(n, c, 9, 9), torch.randn(n, c, H, W), torch.randn(n, c, H, W)
    offsets = offsets_of(n, H, W) * 4  # up to 6 px: far across the 9x9 context's coarse grid
    want = cm_grads(context, offsets, local, grad, "reference")
    from alignseg.kernels.align_cm import align_cm_backward

    for mode in ("default", "deterministic"):
        if mode == "deterministic":
            with deterministic():
                got = align_cm_backward(grad, context, offsets)
        else:
            got = align_cm_backward(grad, context, offsets)
        torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], want[1], atol=2e-5, rtol=1e-5)
    assert len(seen) == 2


# ----------------------------------------------------------------------------------------------
# On a GPU: two backward runs are bitwise equal.


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_gpu_backward_bitwise_reproducible(dtype, layout):
    G = gather()
    n, c, H, W, h, w = 2, 64, 219, 219, 110, 110
    low = torch.randn(n, c, H, W, device="cuda", dtype=dtype).contiguous(memory_format=layout)
    high = torch.randn(n, c, h, w, device="cuda", dtype=dtype).contiguous(memory_format=layout)
    offsets = torch.cat((offsets_of(n, H, W, device="cuda"), offsets_of(n, H, W, device="cuda")), 1)
    grad = torch.randn(n, c, H, W, device="cuda", dtype=dtype).contiguous(memory_format=layout)
    for upsample_first in (True, False):
        first = G.align_fa_backward_deterministic(grad, low, high, offsets, upsample_first=upsample_first)
        second = G.align_fa_backward_deterministic(grad, low, high, offsets, upsample_first=upsample_first)
        assert all(torch.equal(a, b) for a, b in zip(first, second))
        reference = transpose_reference(grad.cpu().float(), offsets[:, 2:4].cpu(), (H, W))
        if dtype == torch.float32:
            # A tap's fp32 coordinate j + d carries an error of up to ulp(W) (1.5e-5 near 219), and so does its
            # weight, where the float64 reference is exact: on an H200, 5.6e-5 at 219x219 (run4_gpu_tests.txt).
            ulp = torch.finfo(torch.float32).eps * max(H, W)
            torch.testing.assert_close(first[0].double().cpu(), reference, rtol=1e-5,
                                       atol=4 * ulp * float(reference.abs().max()))
        else:
            check_close(first[0].float().cpu(), reference, dtype)
    up = G.upsample_transpose(grad, h, w)
    assert torch.equal(up, G.upsample_transpose(grad, h, w))
    context = torch.randn(n, c, 3, 3, device="cuda", dtype=dtype)
    cm_offsets = offsets_of(n, H, W, device="cuda")
    runs = [cm_grads(context, cm_offsets, low, grad, "triton") for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compile for sm_90 (no GPU needed), as tests/test_kernels_compile.py does for the other kernels.

AOT_SCRIPT = r"""
import json, sys, torch
from alignseg.kernels.report import compile_launch, cubin_usage
from alignseg.kernels import align_fa_gather as G
from alignseg.kernels.align_cm import plan_align_cm_backward, plan_reduce_context_partials
rows = []
for dtype, fmt in ((torch.float32, torch.channels_last), (torch.bfloat16, torch.channels_last),
                   (torch.float32, torch.contiguous_format)):
    m = lambda *s, dt=dtype: torch.empty(*s, dtype=dt, device="meta", memory_format=fmt)
    grad, high, offsets = m(8, 256, 219, 219), m(8, 256, 110, 110), m(8, 4, 219, 219, dt=torch.float32)
    index = lambda *s: torch.empty(*s, dtype=torch.int32, device="meta")  # noqa: E731
    bins_low, bins_high = G.PixelBins(index(8 * 219 * 219), index(8 * 219 * 219 + 1)), G.PixelBins(
        index(8 * 219 * 219), index(8 * 110 * 110 + 1))
    larger = m(8, 256, 240, 240)
    bins_larger = G.PixelBins(index(8 * 219 * 219), index(8 * 240 * 240 + 1))
    plans = [("binned_warp", G.plan_binned_transpose(grad, offsets[:, 2:4], m(8, 256, 219, 219), bins_low, G.DIRECT)),
             ("binned_upsample_warp", G.plan_binned_transpose(grad, offsets[:, 0:2], high, bins_high, G.COMPOSITE)),
             ("binned_one_step", G.plan_binned_transpose(grad, offsets[:, 0:2], high, bins_high, G.DIRECT)),
             ("binned_upsample", G.plan_binned_transpose(grad, None, high, bins_high, G.DIRECT)),
             ("binned_upsample_warp_larger", G.plan_binned_transpose(grad, offsets[:, 0:2], larger, bins_larger,
                                                                     G.COMPOSITE)),
             ("gather_backward", G.plan_align_fa_gather_backward(grad, grad, high, offsets, (grad, high, offsets),
                                                                  bins_low, bins_high)),
             ("gather_backward_one_step", G.plan_align_fa_gather_backward(grad, grad, high, offsets,
                                                                           (grad, high, offsets), bins_low, bins_high,
                                                                           upsample_first=False)),
             ("pixel_bins", G.plan_pixel_bins(offsets[:, 0:2], index(8 * 219 * 219), (219, 219), (110, 110),
                                              G.COMPOSITE)),
             ("pixel_bins_upsample", G.plan_pixel_bins(None, index(8 * 219 * 219), (219, 219), (110, 110)))]
    ctx = m(4, 256, 3, 3)
    launch, (partial, _) = plan_align_cm_backward(m(4, 256, 219, 219), ctx, m(4, 2, 219, 219, dt=torch.float32))
    plans += [("align_cm_backward", launch), ("reduce_context_partials", plan_reduce_context_partials(partial, ctx)[0])]
    for name, plan in plans:
        registers, local, stack = cubin_usage(compile_launch(plan, 90).asm["cubin"])
        rows.append(dict(kernel=name, dtype=str(dtype), layout=str(fmt), registers=registers, local_bytes=local,
                         stack_bytes=stack))
print(json.dumps(rows))
"""


@pytest.mark.slow
def test_new_kernels_compile_for_sm90_without_spills():
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"the ahead-of-time compile failed:\n{done.stderr[-4000:]}"
    import json

    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(rows) == 33
    assert not [r for r in rows if r["local_bytes"] or r["stack_bytes"]], f"register spills: {rows}"
    assert all(0 < r["registers"] <= 255 for r in rows)


@pytest.mark.gpu
def test_gpu_backward_captures_in_a_cuda_graph():
    """The binned gathers read nothing back to the host, so the backward can be captured; the replay equals an
    eager run bitwise."""
    G = gather()
    n, c, H, W, h, w = 2, 32, 65, 65, 33, 33
    low = torch.randn(n, c, H, W, device="cuda").contiguous(memory_format=torch.channels_last)
    high = torch.randn(n, c, h, w, device="cuda").contiguous(memory_format=torch.channels_last)
    offsets = torch.cat((offsets_of(n, H, W, device="cuda"), offsets_of(n, H, W, device="cuda")), 1)
    grad = torch.randn(n, c, H, W, device="cuda").contiguous(memory_format=torch.channels_last)
    eager = G.align_fa_backward_deterministic(grad, low, high, offsets)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        G.align_fa_backward_deterministic(grad, low, high, offsets)  # warm-up: compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = G.align_fa_backward_deterministic(grad, low, high, offsets)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(eager, captured))
