"""The align_fa custom op's backward paths: the float-atomic scatter (the default outside deterministic mode),
the deterministic gathers (the default under ``torch.use_deterministic_algorithms(True)``) and the
deterministic fixed-point scatter, each forced by ``ALIGNSEG_BACKWARD`` or ``set_backward``.

Each test counts which kernels ran (so a passing comparison proves the intended path produced it) and
compares the gradients with autograd through the eager reference in float64. Under the interpreter the
gathers cost milliseconds per window step, so maps are small, C is tiny and offsets a pixel or two (plus
dedicated NaN and huge offsets, which reach no cell and must not widen the window).
"""

import pytest
import torch

from alignseg.ops import (
    align_cm,
    align_cm_reference,
    align_fa,
    align_fa_reference,
    get_backward,
    set_backward,
    use_backend,
    use_backward,
)
from alignseg.ops import backend as backend_module
from alignseg.ops.backend import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
# (H, W, h, w): odd sizes, not multiples of any block; a 1-row map.
SIZES = [(9, 7, 5, 4), (1, 8, 1, 3)]


def needs_kernels(device: torch.device = torch.device("cpu")) -> None:
    why_not = backend_module.triton_unavailable_reason(device)
    if why_not:
        pytest.skip(why_not)


@pytest.fixture
def deterministic_algorithms():
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.fixture
def launches(monkeypatch) -> dict[str, int]:
    """Count the backward launchers the custom op calls (it imports them from their modules on each call)."""
    import alignseg.kernels.align_fa as fa_kernels
    import alignseg.kernels.align_fa_gather as gather_kernels

    counts: dict[str, int] = {}

    def counting(module, name):
        launch = getattr(module, name)

        def counted(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return launch(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    counting(fa_kernels, "align_fa_backward")  # the atomic path
    counting(fa_kernels, "align_fa_offsets_backward")  # the fixed-point path: offsets' gradient
    counting(fa_kernels, "align_fa_sources_fixed_point")  # the fixed-point path: source gradients
    counting(gather_kernels, "align_fa_backward_deterministic")  # the gather path: all three gradients
    return counts


GATHER_PATH = {"align_fa_backward_deterministic": 1}
ATOMIC_PATH = {"align_fa_backward": 1}
FIXED_POINT_PATH = {"align_fa_offsets_backward": 1, "align_fa_sources_fixed_point": 1}
# In deterministic mode: the path requested, and the launches it must make (auto: the gathers).
DETERMINISTIC_PATHS = {"auto": GATHER_PATH, "fixed_point": FIXED_POINT_PATH, "gather": GATHER_PATH}


def make_inputs(H, W, h, w, dtype=torch.float32, layout=torch.contiguous_format, n=2, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, c, H, W, generator=g, dtype=dtype).contiguous(memory_format=layout)
    high = torch.randn(n, c, h, w, generator=g, dtype=dtype).contiguous(memory_format=layout)
    # Non-integer offsets of up to ~1.5 px, some leaving the map at the border.
    offsets = (torch.randn(n, 4, H, W, generator=g, dtype=dtype) * 0.8 + 0.13).clamp(-1.5, 1.5)
    grad = torch.randn(n, c, H, W, generator=g, dtype=dtype).contiguous(memory_format=layout)
    return low, high, offsets, grad


def gradients(low, high, offsets, grad, upsample_first, backend="triton"):
    leaves = [t.detach().clone().requires_grad_(True) for t in (low, high, offsets)]
    if backend == "reference":
        leaves = [t.detach().double().requires_grad_(True) for t in (low, high, offsets)]
        out = align_fa_reference(*leaves, upsample_first=upsample_first)
        out.backward(grad.double())
    else:
        with use_backend(backend):
            align_fa(*leaves, upsample_first=upsample_first).backward(grad)
    return [t.grad for t in leaves]


def check_against_reference(low, high, offsets, grad, upsample_first, atol=2e-5):
    result = gradients(low, high, offsets, grad, upsample_first)
    reference = gradients(low, high, offsets, grad, upsample_first, "reference")
    for name, r, ref, src in zip(("low", "high", "offsets"), result, reference, (low, high, offsets)):
        assert r.dtype == src.dtype and r.shape == src.shape, name
        assert torch.isfinite(r).all(), name
        torch.testing.assert_close(r.double(), ref, atol=atol, rtol=1e-5, msg=lambda m: f"grad of {name}: {m}")
    return result


@pytest.mark.parametrize("path", ["auto", "fixed_point"])
@pytest.mark.parametrize("upsample_first", [True, False])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("size", SIZES)
def test_deterministic_mode_paths_match_the_reference(size, layout, upsample_first, path, launches,
                                                      deterministic_algorithms):
    needs_kernels()
    torch.use_deterministic_algorithms(True)
    inputs = make_inputs(*size, layout=LAYOUTS[layout])
    with use_backward(path):
        result = check_against_reference(*inputs, upsample_first)
    assert launches == DETERMINISTIC_PATHS[path]
    assert (result[0].is_contiguous(memory_format=LAYOUTS[layout])
            and result[1].is_contiguous(memory_format=LAYOUTS[layout]))


@pytest.mark.parametrize("upsample_first", [True, False])
def test_default_path_is_atomic_outside_deterministic_mode_and_every_path_stays_available(
        upsample_first, launches, monkeypatch, deterministic_algorithms):
    needs_kernels()
    monkeypatch.delenv("ALIGNSEG_BACKWARD", raising=False)
    torch.use_deterministic_algorithms(False)
    assert get_backward() == "auto"
    inputs = make_inputs(9, 7, 5, 4, layout=torch.channels_last)
    atomic = check_against_reference(*inputs, upsample_first)
    assert launches == ATOMIC_PATH  # auto, outside deterministic mode: the faster path measured on a GPU
    launches.clear()
    with use_backward("gather"):
        gathered = check_against_reference(*inputs, upsample_first)
    assert launches == GATHER_PATH
    launches.clear()
    monkeypatch.setenv("ALIGNSEG_BACKWARD", "gather")  # the variable, and set_backward over it
    check_against_reference(*inputs, upsample_first)
    assert launches == GATHER_PATH
    set_backward("atomic")
    try:
        check_against_reference(*inputs, upsample_first)
    finally:
        set_backward(None)
    assert launches == {**ATOMIC_PATH, **GATHER_PATH}
    launches.clear()
    with use_backward("fixed_point"):
        fixed = check_against_reference(*inputs, upsample_first)
    assert launches == FIXED_POINT_PATH
    launches.clear()
    monkeypatch.setenv("ALIGNSEG_BACKWARD", "auto")
    torch.use_deterministic_algorithms(True)
    check_against_reference(*inputs, upsample_first)
    assert launches == GATHER_PATH  # auto, in deterministic mode: the gathers (backend.resolve_backward says why)
    launches.clear()
    check_against_reference(*(t.double() for t in inputs), upsample_first)
    assert launches == GATHER_PATH  # float64 maps too
    # The paths sum in different orders (and the fixed point rounds each term): equal to rounding, not bitwise.
    for a, b, c in zip(gathered, atomic, fixed):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(c, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("first_axis_wins_ties", [True, False], ids=["pixels_first", "pixels_last"])
@pytest.mark.parametrize("path", ["atomic", "gather", "fixed_point"])
@pytest.mark.parametrize("upsample_first", [True, False])
def test_every_path_in_both_tile_orientations(upsample_first, path, first_axis_wins_ties, launches, monkeypatch):
    # A contiguous map's tiles are [pixels, channels] or [channels, pixels] by the installed Triton's layout rule
    # (launch.pixels_last); CI's two Triton versions take one each, and both must be right wherever they run.
    from alignseg.kernels import launch

    needs_kernels()
    monkeypatch.setattr(launch, "FIRST_AXIS_WINS_TIES", first_axis_wins_ties)
    with use_backward(path):
        check_against_reference(*make_inputs(9, 7, 5, 4), upsample_first)
    assert launches == {"atomic": ATOMIC_PATH, "gather": GATHER_PATH, "fixed_point": FIXED_POINT_PATH}[path]


def record_layouts(monkeypatch, module, name: str, positions: tuple[int, ...], seen: list[bool]) -> list[bool]:
    """Wrap ``module.name``: each call appends to ``seen`` whether its arguments at ``positions`` are channels_last."""
    launch = getattr(module, name)

    def recorded(*args, **kwargs):
        seen.extend(args[i].is_contiguous(memory_format=torch.channels_last) for i in positions)
        return launch(*args, **kwargs)

    monkeypatch.setattr(module, name, recorded)
    return seen


@pytest.mark.parametrize("path", ["atomic", "gather", "fixed_point"])
@pytest.mark.parametrize("upsample_first", [True, False])
def test_contiguous_maps_run_on_channels_last_copies(upsample_first, path, monkeypatch):
    # C a multiple of 16: the kernels get channels_last copies of grad, low and high (launch.stage_channels_last), and
    # the gradients come back in the inputs' (contiguous) layout.
    import alignseg.kernels.align_fa as fa_kernels
    import alignseg.kernels.align_fa_gather as gather_kernels

    needs_kernels()
    seen: list[bool] = []
    for module, name in ((fa_kernels, "align_fa_backward"), (fa_kernels, "align_fa_offsets_backward"),
                         (fa_kernels, "align_fa_sources_fixed_point"),
                         (gather_kernels, "align_fa_backward_deterministic")):
        record_layouts(monkeypatch, module, name, (0, 1, 2), seen)
    inputs = make_inputs(6, 5, 4, 3, n=1, c=16)
    with use_backward(path):
        low_grad, high_grad, _ = check_against_reference(*inputs, upsample_first)
    assert seen and all(seen)
    assert low_grad.is_contiguous() and high_grad.is_contiguous()
    # Not a multiple of 16 (no vector loads on a copy either): the kernels read the contiguous maps themselves.
    seen.clear()
    with use_backward(path):
        check_against_reference(*make_inputs(6, 5, 4, 3, n=1, c=12), upsample_first)
    assert seen and not any(seen)


def test_align_cm_backward_reads_a_channels_last_copy_of_a_contiguous_gradient(monkeypatch):
    import alignseg.kernels.align_cm as cm_kernels

    needs_kernels()
    seen = record_layouts(monkeypatch, cm_kernels, "align_cm_backward", (0,), [])
    g = torch.Generator().manual_seed(3)
    context, local = torch.randn(2, 16, 3, 3, generator=g), torch.randn(2, 16, 7, 6, generator=g)
    offsets, grad = torch.randn(2, 2, 7, 6, generator=g), torch.randn(2, 16, 7, 6, generator=g)
    results = []
    for backend in ("triton", "reference"):
        leaves = [t.detach().clone().double().requires_grad_(True) if backend == "reference" else
                  t.detach().clone().requires_grad_(True) for t in (context, offsets, local)]
        with use_backend(backend):
            (align_cm if backend == "triton" else align_cm_reference)(*leaves).backward(
                grad.double() if backend == "reference" else grad)
        results.append([t.grad for t in leaves])
    assert seen == [True]
    for r, ref in zip(*results):
        torch.testing.assert_close(r.double(), ref, atol=2e-5, rtol=1e-5)
    assert results[0][2].is_contiguous()  # the local map's gradient keeps its layout


def test_backward_path_names_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="backward path must be one of"):
        set_backward("scatter")
    monkeypatch.setenv("ALIGNSEG_BACKWARD", "fast")
    with pytest.raises(ValueError, match="backward path must be one of"):
        get_backward()


@pytest.mark.parametrize("path", ["auto", "gather"])
@pytest.mark.parametrize("upsample_first", [True, False])
def test_deterministic_mode_nan_and_huge_offsets(upsample_first, path, launches, deterministic_algorithms):
    needs_kernels()
    torch.use_deterministic_algorithms(True)
    low, high, offsets, grad = make_inputs(9, 7, 5, 4, layout=torch.channels_last)
    offsets[0, :, 2, 3] = float("nan")
    offsets[1, 0, 4, 1] = 1e30
    offsets[1, 3, 0, 0] = -float("inf")
    offsets[0, 2, 5, 5] = 3e9
    with use_backward(path):
        result = check_against_reference(low, high, offsets, grad, upsample_first)
    assert launches == DETERMINISTIC_PATHS[path]
    assert torch.equal(result[2][0, :, 2, 3], torch.zeros(4))  # a NaN offset has no gradient


@pytest.mark.parametrize("path", ["auto", "fixed_point"])
@pytest.mark.parametrize("upsample_first", [True, False])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_deterministic_mode_gradcheck_float64(layout, upsample_first, path, launches, deterministic_algorithms):
    needs_kernels()
    torch.use_deterministic_algorithms(True)
    low, high, offsets, _ = make_inputs(5, 6, 3, 4, dtype=torch.float64, layout=LAYOUTS[layout], n=1, c=2)
    inputs = [t.detach().requires_grad_(True) for t in (low, high, offsets)]
    with use_backend("triton"), use_backward(path):
        assert torch.autograd.gradcheck(lambda a, b, o: align_fa(a, b, o, upsample_first=upsample_first), inputs,
                                        eps=1e-6, atol=1e-7, fast_mode=True)
    # auto takes the gathers. The fixed point, forced, is coarser than float64 (its rounding is about 1e-14 of the
    # largest gradient here), still well inside gradcheck's tolerance.
    assert launches.keys() == DETERMINISTIC_PATHS[path].keys() and "align_fa_backward" not in launches


def test_alert_fires_only_for_a_forced_atomic_path(monkeypatch, deterministic_algorithms):
    needs_kernels()
    # Pretend the interpreter's (sequential, so deterministic) atomics were a GPU's.
    monkeypatch.setattr(backend_module, "NONDETERMINISTIC_DEVICE_TYPES", ("cpu",))
    low, high, offsets, _ = make_inputs(5, 6, 3, 3, n=1, c=2)
    leaves = [t.requires_grad_(True) for t in (low, high, offsets)]
    torch.use_deterministic_algorithms(True)
    with use_backend("triton"):
        align_fa(*leaves).sum().backward()  # auto: the gather path in deterministic mode, silent
        align_cm(high, offsets[:, :2], low).sum().backward()  # deterministic on its own: silent
        with use_backward("atomic"):
            with pytest.raises(RuntimeError, match="align_fa_backward does not have a deterministic implementation"):
                align_fa(*leaves).sum().backward()
            torch.use_deterministic_algorithms(True, warn_only=True)
            with pytest.warns(UserWarning, match="ALIGNSEG_BACKWARD=atomic"):
                align_fa(*leaves).sum().backward()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("upsample_first", [True, False])
@pytest.mark.parametrize("path", ["auto", "fixed_point"])
def test_cuda_backward_is_bitwise_reproducible_in_deterministic_mode(path, upsample_first, dtype, launches,
                                                                      deterministic_algorithms):
    needs_kernels(torch.device("cuda"))
    torch.use_deterministic_algorithms(True)
    low, high, offsets, grad = (t.cuda() for t in make_inputs(67, 45, 34, 23, dtype=dtype, layout=torch.channels_last,
                                                               n=2, c=40))
    # A few pixels, many taps landing on the same cells. Not x2: make_inputs clamps at +-1.5, and an offset of exactly
    # +-3.0 puts a tap on a grid line, where the offsets' gradient has a kink and the GPU's fp32 coordinate (fused
    # multiply-add) may take the other side than the float64 reference (seen on an H200: one element of 24120).
    offsets = offsets.float() * 1.9
    with use_backward(path):
        runs = [gradients(low, high, offsets, grad, upsample_first) for _ in range(2)]
    assert launches == {name: 2 for name in DETERMINISTIC_PATHS[path]}
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    reference = gradients(low.float(), high.float(), offsets, grad.float(), upsample_first, "reference")
    for r, ref in zip(runs[0], reference):
        torch.testing.assert_close(r.double(), ref, atol=5e-2 * max(1.0, float(ref.abs().max())), rtol=2e-2)
