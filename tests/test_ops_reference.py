"""The eager references, the argument checks and the backend switch of alignseg.ops (no kernels run here)."""

import pytest
import torch
import torch.nn.functional as F

from alignseg.ops import (
    align_cm,
    align_cm_reference,
    align_fa,
    align_fa_reference,
    get_backend,
    sample_grid_sample,
    sample_reference,
    set_backend,
    use_backend,
)
from alignseg.ops.backend import require_triton

pytestmark = pytest.mark.usefixtures("reference_ops")

# (source h, w, output H, W): coarse, equal, H = 1, W = 1, a 1x1 source, a 3x3 context.
SIZES = [(4, 3, 7, 9), (7, 9, 7, 9), (1, 3, 1, 8), (2, 1, 5, 1), (1, 1, 4, 4), (3, 3, 6, 5)]


def offsets_like(n, h, w, scale, channels=2, dtype=torch.float64):
    return torch.randn(n, channels, h, w, dtype=dtype) * scale


@pytest.mark.parametrize("src_h, src_w, out_h, out_w", SIZES)
@pytest.mark.parametrize("scale", [0.0, 2.5, 40.0], ids=["zero", "few-pixels", "far-outside"])
def test_reference_matches_grid_sample(src_h, src_w, out_h, out_w, scale):
    src = torch.randn(2, 3, src_h, src_w, dtype=torch.float64)
    d = offsets_like(2, out_h, out_w, scale)
    torch.testing.assert_close(sample_reference(src, d), sample_grid_sample(src, d), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("src_h, src_w, out_h, out_w", SIZES)
def test_grid_sample_formulation_follows_the_non_finite_rule(src_h, src_w, out_h, out_w):
    """NaN and +-inf offsets: sample_grid_sample gives the reference's values and gradients (zero, none)."""
    src = torch.randn(2, 3, src_h, src_w, dtype=torch.float64)
    d = offsets_like(2, out_h, out_w, 2.5)
    d[0, 0, 0, 0] = float("nan")
    d[1, 1, -1, -1] = float("inf")
    d[0, 1, out_h // 2, out_w // 2] = -float("inf")
    d[1, 0, 0, -1] = 1e30
    grad_out = torch.randn(2, 3, out_h, out_w, dtype=torch.float64)
    results = []
    for fn in (sample_reference, sample_grid_sample):
        leaves = [src.clone().requires_grad_(), d.clone().requires_grad_()]
        out = fn(*leaves)
        out.backward(grad_out)
        results.append([out, *(t.grad for t in leaves)])
    for got, expected in zip(*reversed(results)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("src_h, src_w, out_h, out_w", SIZES)
def test_reference_zero_offsets_is_interpolate(src_h, src_w, out_h, out_w):
    low = torch.randn(2, 3, out_h, out_w, dtype=torch.float64)
    high = torch.randn(2, 3, src_h, src_w, dtype=torch.float64)
    expected = F.interpolate(high, (out_h, out_w), mode="bilinear", align_corners=True) + low
    torch.testing.assert_close(align_fa_reference(low, high, torch.zeros(2, 4, out_h, out_w, dtype=torch.float64)),
                               expected)


def test_reference_known_values():
    src = torch.arange(6.0).reshape(1, 1, 2, 3)  # value = 3 * row + col
    # Output 2x3 equal to the source: shift by half a pixel right and down, then one outside on the left.
    d = torch.zeros(1, 2, 2, 3)
    d[0, 0, 0, 0], d[0, 1, 0, 0] = 0.5, 0.5  # (0.5, 0.5) -> mean of 0, 1, 3, 4
    d[0, 0, 1, 0] = -0.5  # x = -0.5: half of col 0 (value 3) plus zero padding
    d[0, 0, 1, 2] = 0.25  # x = 2.25: 0.75 * col 2 (value 5)
    out = sample_reference(src, d)
    assert out[0, 0, 0, 0] == pytest.approx(2.0)
    assert out[0, 0, 1, 0] == pytest.approx(1.5)
    assert out[0, 0, 1, 2] == pytest.approx(0.75 * 5.0)
    assert out[0, 0, 1, 1] == pytest.approx(4.0)


def test_reference_non_finite_offsets_give_zero_and_no_gradient():
    src = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    d = torch.zeros(1, 2, 4, 5, dtype=torch.float64)
    d[0, 0, 1, 1] = float("nan")
    d[0, 1, 2, 2] = float("inf")
    d[0, 0, 3, 3] = -float("inf")
    d[0, 1, 0, 4] = 1e30
    d.requires_grad_(True)
    out = sample_reference(src, d)
    for i, j in [(1, 1), (2, 2), (3, 3), (0, 4)]:
        assert torch.all(out[0, :, i, j] == 0)
    out.sum().backward()
    assert torch.isfinite(d.grad).all() and torch.isfinite(src.grad).all()
    assert torch.all(d.grad[0, :, 1, 1] == 0)


def test_reference_gradcheck():
    d = lambda *shape: torch.randn(*shape, dtype=torch.float64)  # noqa: E731
    # Non-integer offsets: bilinear sampling has kinks at the grid points.
    args = (d(2, 3, 5, 4).requires_grad_(), d(2, 3, 3, 2).requires_grad_(),
            (d(2, 4, 5, 4) * 1.5 + 0.3).requires_grad_())
    assert torch.autograd.gradcheck(align_fa_reference, args, fast_mode=True)
    args = (d(2, 3, 3, 3).requires_grad_(), (d(2, 2, 5, 4) * 1.5 + 0.3).requires_grad_(),
            d(2, 3, 5, 4).requires_grad_())
    assert torch.autograd.gradcheck(align_cm_reference, args, fast_mode=True)


def test_reference_keeps_memory_format():
    low = torch.randn(2, 3, 5, 6).to(memory_format=torch.channels_last)
    out = align_fa_reference(low, torch.randn(2, 3, 3, 3), torch.randn(2, 4, 5, 6))
    assert out.is_contiguous(memory_format=torch.channels_last)
    out = align_cm_reference(torch.randn(2, 3, 3, 3), torch.randn(2, 2, 5, 6), low.contiguous())
    assert out.is_contiguous()


# ----------------------------------------------------------------------------------------------
# Argument checks: each raises the documented error type and names the argument.

LOW, HIGH, OFF4 = (2, 3, 6, 5), (2, 3, 3, 3), (2, 4, 6, 5)


def fa_args(**changes):
    args = dict(low=torch.randn(LOW), high=torch.randn(HIGH), offsets=torch.randn(OFF4))
    args.update(changes)
    return args


def cm_args(**changes):
    args = dict(context=torch.randn(2, 3, 3, 3), offsets=torch.randn(2, 2, 6, 5), local=torch.randn(LOW))
    args.update(changes)
    return args


FA_BAD = [
    ("not-a-tensor", dict(low=[[1.0]]), TypeError, "low must be a torch.Tensor"),
    ("rank", dict(high=torch.randn(3, 3, 3)), ValueError, "high must be a 4-D tensor"),
    ("integer", dict(low=torch.ones(LOW, dtype=torch.int64)), TypeError, "low must be a floating-point"),
    ("empty", dict(high=torch.randn(2, 3, 0, 3)), ValueError, "high must have at least one pixel to sample"),
    ("batch", dict(high=torch.randn(1, 3, 3, 3)), ValueError, "high must have the batch size and channels of low"),
    ("channels", dict(high=torch.randn(2, 4, 3, 3)), ValueError, "high must have the batch size and channels of low"),
    ("dtypes", dict(high=torch.randn(HIGH, dtype=torch.float64)), TypeError, "high must have low's dtype"),
    ("offset-channels", dict(offsets=torch.randn(2, 2, 6, 5)), ValueError, r"offsets must have shape \[2, 4, 6, 5\]"),
    ("offset-size", dict(offsets=torch.randn(2, 4, 5, 5)), ValueError, r"offsets must have shape \[2, 4, 6, 5\]"),
    ("offset-dtype", dict(offsets=torch.randn(OFF4, dtype=torch.float64)), TypeError,
     "offsets must be float32 or the features' dtype"),
    ("offset-integer", dict(offsets=torch.ones(OFF4, dtype=torch.int32)), TypeError, "offsets must be float32"),
    ("devices", dict(high=torch.randn(HIGH, device="meta")), ValueError, "all tensors must be on one device"),
    ("upsample-first", dict(upsample_first=1), TypeError, "upsample_first must be a bool, got int"),
]

CM_BAD = [
    ("rank", dict(context=torch.randn(2, 3, 9)), ValueError, "context must be a 4-D tensor"),
    ("integer", dict(local=torch.ones(LOW, dtype=torch.int32)), TypeError, "local must be a floating-point"),
    ("channels", dict(context=torch.randn(2, 5, 3, 3)), ValueError,
     "context must have the batch size and channels of local"),
    ("dtypes", dict(context=torch.randn(2, 3, 3, 3, dtype=torch.float16)), TypeError,
     "context must have local's dtype"),
    ("offset-channels", dict(offsets=torch.randn(2, 4, 6, 5)), ValueError, r"offsets must have shape \[2, 2, 6, 5\]"),
    ("offset-not-tensor", dict(offsets=None), TypeError, "offsets must be a torch.Tensor"),
    ("devices", dict(offsets=torch.randn(2, 2, 6, 5, device="meta")), ValueError, "all tensors must be on one device"),
]


@pytest.mark.parametrize("changes, error, message", [c[1:] for c in FA_BAD], ids=[c[0] for c in FA_BAD])
def test_align_fa_argument_checks(changes, error, message):
    with pytest.raises(error, match=message):
        align_fa(**fa_args(**changes))


@pytest.mark.parametrize("changes, error, message", [c[1:] for c in CM_BAD], ids=[c[0] for c in CM_BAD])
def test_align_cm_argument_checks(changes, error, message):
    with pytest.raises(error, match=message):
        align_cm(**cm_args(**changes))


def test_offsets_may_be_float32_or_the_features_dtype():
    for dtype in (torch.float32, torch.float16):
        out = align_fa(**fa_args(low=torch.randn(LOW, dtype=torch.float16), high=torch.randn(HIGH, dtype=torch.float16),
                                 offsets=torch.randn(OFF4, dtype=dtype)))
        assert out.dtype == torch.float16


# ----------------------------------------------------------------------------------------------
# The backend switch.


def test_backend_names(monkeypatch):
    monkeypatch.setenv("ALIGNSEG_BACKEND", "Reference")
    set_backend(None)
    try:
        assert get_backend() == "reference"
        monkeypatch.setenv("ALIGNSEG_BACKEND", "cuda")
        with pytest.raises(ValueError, match="backend must be one of"):
            get_backend()
        with pytest.raises(ValueError, match="backend must be one of"):
            set_backend("fast")
        with use_backend("triton"):
            assert get_backend() == "triton"
    finally:
        set_backend("reference")  # the fixture's state, restored by it afterwards


def test_auto_uses_grid_sample_on_cpu_without_interpreter(monkeypatch):
    import importlib

    align_fa_module = importlib.import_module("alignseg.ops.align_fa")  # the attribute is the function
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    calls = []
    monkeypatch.setitem(align_fa_module.EAGER_ALIGN_FA, "grid_sample",
                        lambda *a: calls.append(a) or align_fa_reference(*a))
    args = fa_args()
    with use_backend("auto"):
        out = align_fa(**args)
    assert len(calls) == 1
    torch.testing.assert_close(out, align_fa_reference(**args))


def test_triton_backend_errors_clearly_when_it_cannot_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with use_backend("triton"), pytest.raises(RuntimeError, match="ALIGNSEG_BACKEND=triton .*TRITON_INTERPRET=1"):
        align_fa(**fa_args())
    with use_backend("triton"), pytest.raises(RuntimeError, match="ALIGNSEG_BACKEND=triton .*TRITON_INTERPRET=1"):
        align_cm(**cm_args())
    # What the custom ops check before launching (not called through torch.ops here: the first call
    # of a custom op sets Triton up for the interpreter state of that moment, and this test flips it).
    with pytest.raises(RuntimeError, match="Triton kernels cannot run: .*TRITON_INTERPRET=1"):
        require_triton(torch.device("cpu"))
    with use_backend("triton"), pytest.raises(RuntimeError, match="does not run on device type 'meta'"):
        align_fa(**{k: v.to("meta") for k, v in fa_args().items()})
