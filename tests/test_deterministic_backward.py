"""The deterministic backward: gather transposes of the sampling (alignseg/kernels/align_fa_gather.py) and
AlignCM's partial-sum context gradient, against autograd through the eager references in float64.

Under the interpreter every program costs milliseconds per window step, so maps are small, C is tiny and
offsets are a few pixels (the window grows with the largest offset); dedicated tests cover far, huge and
NaN offsets.
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
    """Huge and NaN offsets reach nothing and do not widen the window; a far in-map offset widens it."""
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
    window = tuple(G.gather_window_device(off, (H, W)).tolist())
    assert window_width(window) <= (20 if regime == "far-inside" else 8)
    check_close(G.warp_transpose(grad, off), transpose_reference(grad, off, (H, W)), torch.float32)
    check_close(G.upsample_warp_transpose(grad, off, (h, w)), transpose_reference(grad, off, (h, w), True),
                torch.float32)


def window_width(window):
    return max(window[1] - window[0] + 1, window[3] - window[2] + 1)


def test_gather_window_is_tight():
    """The device window of zero offsets on a same-size map is i - t in {-1, 0} per axis."""
    G = gather()
    assert G.gather_window_device(torch.zeros(2, 2, 7, 6), (7, 6)).tolist() == [-1, 0, -1, 0]
    off = torch.zeros(1, 2, 7, 6)
    off[0, 0, 3, 2] = 2.5  # x = 4.5: taps 4 and 5, i.e. i - t in {-3, -2}
    assert G.gather_window_device(off, (7, 6)).tolist() == [-1, 0, -3, 0]


def test_fallback_scatter_path(monkeypatch):
    """A window wider than the limit scatters (and still matches); in deterministic mode the gather runs anyway."""
    G = gather()
    H, W, h, w = 9, 11, 5, 6
    grad, off = torch.randn(2, 3, H, W), offsets_of(2, H, W)
    calls = []
    scatter = G.scatter_transpose
    monkeypatch.setattr(G, "scatter_transpose", lambda *a: calls.append(1) or scatter(*a))
    check_close(G.warp_transpose(grad, off, max_shift=-10), transpose_reference(grad, off, (H, W)), torch.float32)
    check_close(G.sample_transpose(grad, off, (h, w), max_shift=-10), transpose_reference(grad, off, (h, w)),
                torch.float32)
    check_close(G.upsample_warp_transpose(grad, off, (h, w), max_shift=-10),
                transpose_reference(grad, off, (h, w), True), torch.float32)
    assert len(calls) == 3
    with deterministic():
        check_close(G.warp_transpose(grad, off, max_shift=-10), transpose_reference(grad, off, (H, W)), torch.float32)
    assert len(calls) == 3, "deterministic mode must not take the atomic scatter"


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
    window = tuple(G.gather_window_device(off, (H, W)).tolist())
    G.launch_gather(grad, off, out, window)
    assert not out.isnan().any()
    check_close(out, transpose_reference(grad, off, (H, W)), torch.float32)
    assert torch.equal(G.launch_gather(grad, off, torch.empty_like(out), window), out), "two runs must be bitwise equal"


@pytest.mark.parametrize("upsample_first, layout, max_shift", [
    (True, torch.contiguous_format, 8), (True, torch.channels_last, 8), (False, torch.contiguous_format, 8),
    (False, torch.channels_last, 8), (True, torch.channels_last, -10)],
    ids=["upsample-first-contiguous", "upsample-first-channels_last", "one-step-contiguous", "one-step-channels_last",
         "upsample-first-fallback"])
def test_align_fa_backward_deterministic(upsample_first, layout, max_shift, monkeypatch):
    """Both source gradients: the fused gather (one launch) or, past the window limit, the separate fallbacks."""
    G = gather()
    fused = []
    plan = G.plan_align_fa_gather
    monkeypatch.setattr(G, "plan_align_fa_gather", lambda *a, **k: fused.append(1) or plan(*a, **k))
    n, c, H, W, h, w = 1, 3, 9, 13, 5, 7
    low = torch.randn(n, c, H, W).contiguous(memory_format=layout)
    high = torch.randn(n, c, h, w).contiguous(memory_format=layout)
    offsets = torch.cat((offsets_of(n, H, W), offsets_of(n, H, W)), 1).contiguous(memory_format=layout)
    grad = torch.randn(n, c, H, W).contiguous(memory_format=layout)
    grad_low, grad_high = G.align_fa_backward_deterministic(grad, low, high, offsets, upsample_first, max_shift)
    assert len(fused) == (max_shift > 0)
    assert grad_low.shape == low.shape and grad_high.shape == high.shape
    assert grad_high.stride() == high.stride() and grad_low.stride() == low.stride()
    check_close(grad_low, transpose_reference(grad, offsets[:, 2:4], (H, W)), torch.float32)
    check_close(grad_high, transpose_reference(grad, offsets[:, 0:2], (h, w), upsample_first), torch.float32)


@pytest.mark.parametrize("upsample_first", [True, False], ids=["upsample-first", "one-step"])
def test_align_fa_backward_deterministic_mode_reads_window_on_device(upsample_first, monkeypatch):
    """In deterministic mode the gathers load their window from the device: no host read, no fallback choice."""
    G = gather()

    def no_host_window(*args, **kwargs):
        raise AssertionError("deterministic mode must not read the window on the host")

    monkeypatch.setattr(G, "window_fits", no_host_window)
    n, c, H, W, h, w = 1, 2, 9, 8, 5, 4
    low, high, grad = torch.randn(n, c, H, W), torch.randn(n, c, h, w), torch.randn(n, c, H, W)
    offsets = torch.cat((offsets_of(n, H, W), offsets_of(n, H, W)), 1)
    with deterministic():
        grad_low, grad_high = G.align_fa_backward_deterministic(grad, low, high, offsets, upsample_first)
        warped = G.warp_transpose(grad, offsets[:, 2:4], max_shift=-10)
    check_close(grad_low, transpose_reference(grad, offsets[:, 2:4], (H, W)), torch.float32)
    check_close(warped, transpose_reference(grad, offsets[:, 2:4], (H, W)), torch.float32)
    check_close(grad_high, transpose_reference(grad, offsets[:, 0:2], (h, w), upsample_first), torch.float32)


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
        seen.append(kwargs.get("scatter", False))
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
    assert seen == [False], "the atomic scatter must not run"


def test_align_cm_large_context_far_offsets(monkeypatch):
    """A large context with offsets beyond the window limit scatters, except in deterministic mode."""
    from alignseg.kernels import align_cm as kernels

    plan = kernels.plan_align_cm_backward
    seen = []
    monkeypatch.setattr(kernels, "plan_align_cm_backward",
                        lambda *a, **k: seen.append(k.get("scatter", False)) or plan(*a, **k))
    monkeypatch.setattr(kernels, "MAX_GATHER_SHIFT", -20)
    n, c, H, W = 1, 3, 8, 9
    context, local, grad = torch.randn(n, c, 9, 9), torch.randn(n, c, H, W), torch.randn(n, c, H, W)
    offsets = offsets_of(n, H, W)
    want = cm_grads(context, offsets, local, grad, "reference")
    from alignseg.kernels.align_cm import align_cm_backward

    for mode in ("default", "deterministic"):
        if mode == "deterministic":
            with deterministic():
                got = align_cm_backward(grad, context, offsets, max_shift=-20)
        else:
            got = align_cm_backward(grad, context, offsets, max_shift=-20)
        torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(got[1], want[1], atol=2e-5, rtol=1e-5)
    assert seen == [True, False]


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
    window = torch.empty(4, dtype=torch.int32, device="meta")
    plans = [("gather_warp", G.plan_gather(grad, offsets[:, 2:4], m(8, 256, 219, 219), (-3, 2, -3, 2), G.DIRECT)),
             ("gather_upsample_warp", G.plan_gather(grad, offsets[:, 0:2], high, (-4, 5, -4, 5), G.COMPOSITE)),
             ("gather_upsample", G.plan_gather(grad, None, high, (-2, 3, -2, 3), G.DIRECT)),
             ("fused_exact", G.plan_align_fa_gather(grad, offsets, m(8, 256, 219, 219), high, (-3, 2, -3, 2),
                                                    (-4, 5, -4, 5), G.COMPOSITE)),
             ("fused_one_step", G.plan_align_fa_gather(grad, offsets, m(8, 256, 219, 219), high, (-3, 2, -3, 2),
                                                       (-4, 5, -4, 5), G.DIRECT)),
             ("fused_exact_device_window", G.plan_align_fa_gather(grad, offsets, m(8, 256, 219, 219), high, window,
                                                                  window, G.COMPOSITE))]
    ctx = m(4, 256, 3, 3)
    launch, (partial, _) = plan_align_cm_backward(m(4, 256, 219, 219), ctx, m(4, 2, 219, 219, dt=torch.float32))
    plans += [("align_cm_backward", launch), ("reduce_context_partials", plan_reduce_context_partials(partial, ctx)[0])]
    for name, plan in plans:
        registers, local, _ = cubin_usage(compile_launch(plan, 90).asm["cubin"])
        rows.append(dict(kernel=name, dtype=str(dtype), layout=str(fmt), registers=registers, local_bytes=local))
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
    assert len(rows) == 24
    assert not [r for r in rows if r["local_bytes"]], f"register spills: {rows}"
    assert all(0 < r["registers"] <= 255 for r in rows)


@pytest.mark.gpu
def test_gpu_backward_captures_in_a_cuda_graph():
    """While a CUDA graph is captured the gathers read their window on the device (no host read), so the
    backward can be captured; the replay equals an eager run bitwise."""
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
