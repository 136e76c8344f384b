"""The eager paths of the ops (grid_sample against the gather oracle), empty inputs, and the determinism alert."""

import warnings

import pytest
import torch

from alignseg.ops import (
    align_cm,
    align_cm_grid_sample,
    align_cm_reference,
    align_fa,
    align_fa_grid_sample,
    align_fa_reference,
    use_backend,
    use_backward,
)
from alignseg.ops import backend as backend_module
from alignseg.ops.backend import select_backend

# (N, C, output H, W, source h, w): coarse, equal, rows and columns of 1, 1x1 maps, odd sizes.
SIZES = [(2, 5, 13, 17, 7, 9), (2, 3, 9, 9, 9, 9), (1, 4, 1, 9, 1, 4), (2, 3, 8, 1, 3, 1), (2, 3, 1, 1, 1, 1),
         (1, 2, 6, 7, 1, 1), (2, 3, 16, 32, 8, 16)]
OFFSETS = ["zero", "whole-pixels", "random", "far-outside", "non-finite"]
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12)}


def make_offsets(kind, n, channels, h, w, dtype):
    if kind == "zero":
        return torch.zeros(n, channels, h, w, dtype=dtype)
    if kind == "whole-pixels":  # every position on a source pixel: where a one-sided gradient could flip side
        return torch.randint(-3, 4, (n, channels, h, w)).to(dtype)
    if kind == "far-outside":
        return torch.randn(n, channels, h, w, dtype=dtype) * 40
    offsets = torch.randn(n, channels, h, w, dtype=dtype) * 2.5
    if kind == "non-finite":
        flat = offsets.view(-1)
        flat[::3], flat[1::7], flat[2::11], flat[4::13] = float("nan"), float("inf"), -float("inf"), 1e30
    return offsets


def value_and_gradients(fn, inputs, grad):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.backward(grad)
    return [out, *(t.grad for t in inputs)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", OFFSETS)
@pytest.mark.parametrize("n, c, H, W, h, w", SIZES)
def test_grid_sample_path_equals_the_gather_reference(n, c, H, W, h, w, kind, dtype):
    low, high = torch.randn(n, c, H, W, dtype=dtype), torch.randn(n, c, h, w, dtype=dtype)
    offsets = make_offsets(kind, n, 4, H, W, dtype)
    grad = torch.randn(n, c, H, W, dtype=dtype)
    names = ("out", "grad low", "grad high", "grad offsets")
    expected = value_and_gradients(align_fa_reference, (low, high, offsets), grad)
    actual = value_and_gradients(align_fa_grid_sample, (low, high, offsets), grad)
    for name, a, e in zip(names, actual, expected):
        torch.testing.assert_close(a, e, **TOLERANCE[dtype], msg=lambda m: f"align_fa {name}: {m}")
    if kind == "non-finite":  # no gradient flows into a NaN or infinite offset
        assert torch.all(actual[3][~offsets.isfinite()] == 0)

    names = ("out", "grad context", "grad offsets", "grad local")
    expected = value_and_gradients(align_cm_reference, (high, offsets[:, :2], low), grad)
    actual = value_and_gradients(align_cm_grid_sample, (high, offsets[:, :2], low), grad)
    for name, a, e in zip(names, actual, expected):
        torch.testing.assert_close(a, e, **TOLERANCE[dtype], msg=lambda m: f"align_cm {name}: {m}")


def test_grid_sample_path_keeps_the_channels_last_layout_and_low_precision_dtype():
    low = torch.randn(2, 8, 9, 11).contiguous(memory_format=torch.channels_last).bfloat16()
    high = torch.randn(2, 8, 5, 6).bfloat16()
    offsets = torch.randn(2, 4, 9, 11)
    out = align_fa_grid_sample(low, high, offsets)
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, align_fa_reference(low, high, offsets))


def test_backend_selection_on_cpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(backend_module, "interpreter_enabled", lambda: False)
    with use_backend("auto"):
        assert select_backend(cpu) == "grid_sample"
    with use_backend("reference"):
        assert select_backend(cpu) == "reference"  # the gather oracle stays selectable
    with use_backend("grid_sample"):
        assert select_backend(cpu) == "grid_sample"
    monkeypatch.setattr(backend_module, "interpreter_enabled", lambda: True)
    with use_backend("auto"):
        assert select_backend(cpu) == ("triton" if backend_module.triton_available() else "grid_sample")


# ----------------------------------------------------------------------------------------------
# Empty inputs: like PyTorch's own ops, a zero-size batch, channel count or output size gives an empty
# result of the right shape and dtype, and empty (or zero) gradients.

BACKENDS = ["reference", "grid_sample"] + (["triton"] if backend_module.triton_available() else [])
EMPTY = [  # (N, C, H, W, h, w)
    (0, 4, 6, 5, 3, 3),
    (2, 0, 6, 5, 3, 3),
    (2, 4, 0, 5, 3, 3),
    (2, 4, 6, 0, 3, 3),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("n, c, H, W, h, w", EMPTY)
def test_empty_inputs_give_empty_results_and_gradients(n, c, H, W, h, w, layout, backend):
    if backend == "triton" and backend_module.triton_unavailable_reason(torch.device("cpu")):
        pytest.skip("the Triton interpreter is not enabled")
    low = torch.randn(n, c, H, W).contiguous(memory_format=layout).requires_grad_()
    high = torch.randn(n, c, h, w).requires_grad_()
    offsets = torch.randn(n, 4, H, W).requires_grad_()
    local = torch.randn(n, c, H, W).contiguous(memory_format=layout).requires_grad_()
    with use_backend(backend):
        out_fa = align_fa(low, high, offsets)
        out_cm = align_cm(high, offsets[:, :2], local)
        (out_fa.sum() + out_cm.sum()).backward()
    for out in (out_fa, out_cm):
        assert out.shape == (n, c, H, W) and out.dtype == torch.float32 and out.numel() == 0
    for t in (low, high, offsets, local):
        assert t.grad is not None and t.grad.shape == t.shape and torch.count_nonzero(t.grad) == 0


def test_an_empty_source_is_an_error_only_when_the_output_is_not_empty():
    with pytest.raises(ValueError, match="high must have at least one pixel"):
        align_fa(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 0, 2), torch.zeros(1, 4, 3, 3))
    with pytest.raises(ValueError, match="context must have at least one pixel"):
        align_cm(torch.randn(1, 2, 2, 0), torch.zeros(1, 2, 3, 3), torch.randn(1, 2, 3, 3))
    assert align_fa(torch.randn(0, 2, 3, 3), torch.randn(0, 2, 0, 2), torch.zeros(0, 4, 3, 3)).shape == (0, 2, 3, 3)


# ----------------------------------------------------------------------------------------------
# Determinism: the atomic backward path of align_fa (ALIGNSEG_BACKWARD=atomic) adds with atomics on a GPU;
# with deterministic algorithms requested it must raise (or warn under warn_only) like PyTorch's own
# nondeterministic ops. The default ("auto") takes the gather path in that mode; it, the fixed-point path
# and align_cm are deterministic (tests/test_backward_paths.py).


@pytest.fixture
def deterministic_algorithms():
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def test_alert_follows_torch_deterministic_settings(deterministic_algorithms):
    cuda = torch.device("cuda")
    torch.use_deterministic_algorithms(False)
    backend_module.alert_nondeterministic("alignseg::align_fa_backward", cuda)  # not requested: silent
    torch.use_deterministic_algorithms(True)
    with pytest.raises(RuntimeError, match="alignseg::align_fa_backward does not have a deterministic implementation"):
        backend_module.alert_nondeterministic("alignseg::align_fa_backward", cuda)
    backend_module.alert_nondeterministic("alignseg::align_fa_backward", torch.device("cpu"))  # the interpreter is
    torch.use_deterministic_algorithms(True, warn_only=True)
    with pytest.warns(UserWarning, match="does not have a deterministic implementation"):
        backend_module.alert_nondeterministic("alignseg::align_fa_backward", cuda)


@pytest.mark.skipif(not backend_module.triton_available(), reason="needs triton")
def test_triton_backward_alerts_and_forward_does_not(monkeypatch, deterministic_algorithms):
    if backend_module.triton_unavailable_reason(torch.device("cpu")):
        pytest.skip("the Triton interpreter is not enabled")
    # Pretend the interpreter's (sequential, so deterministic) atomics were a GPU's.
    monkeypatch.setattr(backend_module, "NONDETERMINISTIC_DEVICE_TYPES", ("cpu",))
    low, high = torch.randn(1, 2, 5, 6, requires_grad=True), torch.randn(1, 2, 3, 3, requires_grad=True)
    offsets = torch.randn(1, 4, 5, 6, requires_grad=True)
    torch.use_deterministic_algorithms(True)
    with use_backend("triton"), use_backward("atomic"):
        out_fa = align_fa(low, high, offsets)
        out_cm = align_cm(high, offsets[:, :2], low)
        with pytest.raises(RuntimeError, match="align_fa_backward does not have a deterministic implementation"):
            out_fa.sum().backward()
        out_cm.sum().backward()  # no atomic path in deterministic mode: silent
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="align_fa_backward does not have a deterministic implementation"):
            align_fa(low, high, offsets).sum().backward()
    with use_backend("grid_sample"), warnings.catch_warnings():
        warnings.simplefilter("error")  # the eager paths do not alert (PyTorch checks their own ops)
        align_fa(low, high, offsets).sum().backward()
