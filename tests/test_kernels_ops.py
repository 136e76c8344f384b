"""The Triton kernels of align_fa and align_cm against the eager reference (under TRITON_INTERPRET=1 here).

Each program instance costs milliseconds in the interpreter, so shapes are small and the launchers use
the interpreter's large blocks; a few tests force small blocks to cover block edges.
"""

import dataclasses
import functools
import os
import shutil
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from alignseg.ops import align_cm, align_cm_reference, align_fa, align_fa_reference, use_backend
from alignseg.ops.backend import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")

LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    op: Callable
    reference: Callable
    offset_channels: int
    forward_op: str
    backward_op: str
    extra_args: tuple = ()  # trailing non-tensor arguments of the custom ops (align_fa's upsample_first)

    @property
    def is_fa(self) -> bool:
        return self.offset_channels == 4

    def inputs(self, n, c, out_h, out_w, src_h, src_w, scale=2.0, dtype=torch.float32, layout=torch.contiguous_format,
               device="cpu"):
        """The op's arguments in order; features in ``layout``, offsets of ``scale`` pixels, non-integer."""
        fine = torch.randn(n, c, out_h, out_w, device=device).to(dtype).contiguous(memory_format=layout)
        source = torch.randn(n, c, src_h, src_w, device=device).to(dtype).contiguous(memory_format=layout)
        offsets = (torch.randn(n, self.offset_channels, out_h, out_w, device=device) * scale + 0.1).to(dtype)
        if self.is_fa:
            return [fine, source, offsets]
        return [source, offsets, fine]


FA = Op("align_fa", align_fa, align_fa_reference, 4, "alignseg::align_fa_forward", "alignseg::align_fa_backward",
        (True,))
# The one-step variant (upsample_first=False): the same kernels with the other constexpr.
FA_ONE_STEP = Op("align_fa_one_step", functools.partial(align_fa, upsample_first=False),
                 functools.partial(align_fa_reference, upsample_first=False), 4,
                 "alignseg::align_fa_forward", "alignseg::align_fa_backward", (False,))
CM = Op("align_cm", align_cm, align_cm_reference, 2, "alignseg::align_cm_forward", "alignseg::align_cm_backward")
OPS = [pytest.param(FA, id="align_fa"), pytest.param(FA_ONE_STEP, id="align_fa_one_step"),
       pytest.param(CM, id="align_cm")]

# (N, C, H, W, source h, w): odd sizes, coarse and equal-size sources, H = 1, W = 1, a 1x1 source,
# C above the interpreter's channel block (two blocks), H*W above its pixel block.
SHAPES = [
    (2, 5, 7, 9, 4, 3),
    (1, 3, 6, 5, 6, 5),
    (2, 4, 1, 8, 1, 3),
    (1, 3, 5, 1, 2, 1),
    (2, 3, 4, 4, 1, 1),
    (1, 130, 3, 4, 3, 3),
    (1, 2, 33, 40, 5, 5),
]


def run_with_grads(fn, inputs, grad_output):
    """fn(*inputs) and the gradients of every input, for one shared grad_output."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(grad_output)
    return out.detach(), [t.grad for t in leaves]


def assert_matches_reference(op, inputs, atol=1e-5, rtol=1e-5, grad_atol=1e-4):
    grad_output = torch.randn(op.reference(*inputs).shape, dtype=inputs[0].dtype)
    with use_backend("triton"):
        out, grads = run_with_grads(op.op, inputs, grad_output)
    ref_out, ref_grads = run_with_grads(op.reference, inputs, grad_output)
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    assert out.stride() == ref_out.stride(), "the output must keep the memory format of low/local"
    for name, grad, ref_grad in zip(("first", "second", "third"), grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, atol=grad_atol, rtol=rtol,
                                   msg=lambda m: f"gradient of the {name} input: {m}")
    return out, grads


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", OPS)
def test_kernels_match_reference_fp32(op, shape, layout):
    assert_matches_reference(op, op.inputs(*shape, layout=layout))


@pytest.mark.parametrize("first_axis_wins_ties", [True, False], ids=["pixels_first", "pixels_last"])
@pytest.mark.parametrize("op", OPS)
def test_contiguous_maps_match_reference_in_both_tile_orientations(op, first_axis_wins_ties, monkeypatch):
    # A contiguous map's tiles are [pixels, channels] or [channels, pixels] by the installed Triton's layout rule
    # (launch.pixels_last): check both here. Shapes: two channel blocks of the interpreter's config, two pixel
    # blocks, and (align_cm) a context of 90 cells, past MAX_REDUCED_CELLS (the gather transpose).
    from alignseg.kernels import launch

    monkeypatch.setattr(launch, "FIRST_AXIS_WINS_TIES", first_axis_wins_ties)
    for shape in [(1, 130, 3, 4, 3, 3), (1, 2, 33, 40, 5, 5), (2, 3, 7, 9, 9, 10)]:
        assert_matches_reference(op, op.inputs(*shape))


@pytest.mark.parametrize("regime", ["zero", "far-outside", "non-finite"])
@pytest.mark.parametrize("op", OPS)
def test_kernels_offset_regimes(op, regime):
    inputs = op.inputs(2, 3, 6, 7, 4, 3)
    offsets = inputs[2 if op.is_fa else 1]
    if regime == "zero":
        offsets.zero_()
    elif regime == "far-outside":
        offsets.copy_(torch.randn_like(offsets).sign() * 40 + torch.rand_like(offsets))
        offsets[:, :, 0, 0] = 3e4
        offsets[:, :, 1, 1] = -1e30
    else:
        offsets[0, 0, 0, 0] = float("nan")
        offsets[0, 1, 1, 1] = float("inf")
        offsets[1, 0, 2, 2] = -float("inf")
        offsets[1, :, 3, 3] = float("nan")
        offsets[0, -1, 4, 4] = 1e38
    out, grads = assert_matches_reference(op, inputs)
    assert all(torch.isfinite(g).all() for g in grads)
    if regime == "non-finite" and op is CM:
        # A NaN position samples nothing: only local (the third input) remains.
        torch.testing.assert_close(out[1, :, 3, 3], inputs[2][1, :, 3, 3])


@pytest.mark.parametrize("src_size", [(3, 4), (6, 7), (1, 1)], ids=["coarse", "equal", "1x1"])
def test_align_fa_zero_offsets_is_interpolate(src_size):
    low, high, offsets = FA.inputs(2, 3, 6, 7, *src_size)
    with use_backend("triton"):
        out = align_fa(low, high, torch.zeros_like(offsets))
    expected = F.interpolate(high, size=(6, 7), mode="bilinear", align_corners=True) + low
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)


def test_align_cm_large_context_gathers():
    # More cells than the per-program reduction handles: the binned gather sums the context's gradient.
    from alignseg.kernels.align_cm import reduced_cells

    assert reduced_cells(9, 9) == 0 and reduced_cells(3, 3) == 16
    assert_matches_reference(CM, CM.inputs(2, 3, 6, 7, 9, 9))


@pytest.mark.parametrize("offsets_dtype", ["float32", "features"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("op", OPS)
def test_kernels_low_precision(op, dtype, offsets_dtype):
    """Error vs an fp64 oracle at most twice the reference's own error at that precision, plus an ulp."""
    inputs = op.inputs(2, 6, 7, 9, 4, 5, dtype=dtype, layout=torch.channels_last)
    k = 2 if op.is_fa else 1
    if offsets_dtype == "float32":
        inputs[k] = inputs[k].float()
    grad_output = torch.randn(2, 6, 7, 9).to(dtype)
    with use_backend("triton"):
        out, grads = run_with_grads(op.op, inputs, grad_output)
    ref_out, ref_grads = run_with_grads(op.reference, inputs, grad_output)
    oracle_out, oracle_grads = run_with_grads(op.reference, [t.double() for t in inputs], grad_output.double())
    assert out.dtype == dtype and all(g.dtype == t.dtype for g, t in zip(grads, inputs))
    for got, ref, oracle in zip([out, *grads], [ref_out, *ref_grads], [oracle_out, *oracle_grads]):
        ulp = torch.finfo(got.dtype).eps * oracle.abs().max().item()
        error, ref_error = (got.double() - oracle).abs().max().item(), (ref.double() - oracle).abs().max().item()
        assert error <= 2 * ref_error + ulp, f"{got.dtype}: error {error:.3g}, reference's own {ref_error:.3g}"


@pytest.mark.parametrize("op", OPS)
def test_kernels_write_every_element(op):
    """Outputs poisoned with NaN before the launch: small blocks, several of them in every grid axis."""
    from alignseg.kernels.align_cm import align_cm_backward, align_cm_forward
    from alignseg.kernels.align_fa import align_fa_backward, align_fa_forward
    from alignseg.kernels.launch import LaunchConfig

    small = LaunchConfig(block_p=16, max_block_c=4, num_warps=1)
    inputs = op.inputs(2, 6, 5, 7, 3, 4, layout=torch.channels_last)
    ref_out = op.reference(*inputs)
    grad_output = torch.randn_like(ref_out)
    out = torch.full_like(ref_out, float("nan"))
    offsets = inputs[2 if op.is_fa else 1]
    grad_offsets = torch.full_like(offsets, float("nan"))
    if op.is_fa:
        align_fa_forward(*inputs, out=out, config=small, upsample_first=op.extra_args[0])
        grads = align_fa_backward(grad_output, *inputs, grad_offsets=grad_offsets, config=small,
                                  upsample_first=op.extra_args[0])
    else:
        align_cm_forward(*inputs, out=out, config=small)
        grads = align_cm_backward(grad_output, *inputs[:2], grad_offsets=grad_offsets, config=small)
    assert not out.isnan().any() and not grad_offsets.isnan().any()
    torch.testing.assert_close(out, ref_out)
    _, ref_grads = run_with_grads(op.reference, inputs, grad_output)
    order = [0, 1, 2] if op.is_fa else [0, 1]
    for got, i in zip(grads, order):
        torch.testing.assert_close(got, ref_grads[i], atol=1e-4, rtol=1e-5)


def gpu_backward_configs() -> list:
    """Every distinct launch config of the backward kernels in the GPU tables (the interpreter runs its own)."""
    from alignseg.kernels import launch

    tables = (launch.GPU_CONFIGS, launch.GPU_CONFIGS_CONTIGUOUS, launch.GPU_CONFIGS_SM90)
    names = ("align_fa_backward", "align_fa_backward_exact", "align_fa_backward_exact_16_taps", "align_cm_backward")
    return sorted({table[name] for table in tables for name in names if name in table},
                  key=lambda c: (c.block_p, c.max_block_c, c.num_warps))


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_backward_kernels_match_reference_at_every_gpu_config(layout):
    # The GPU tables' block sizes (the interpreter's own config is larger): masks and channel loops at the tiles real
    # launches use, C over two channel blocks of most of them and H*W not a multiple of any pixel block.
    from alignseg.kernels.align_cm import align_cm_backward
    from alignseg.kernels.align_fa import align_fa_backward

    for config in gpu_backward_configs():
        for op in (FA, FA_ONE_STEP, CM):
            inputs = op.inputs(1, 40, 9, 11, 5, 6, layout=layout)
            grad_output = torch.randn(op.reference(*inputs).shape)
            _, ref_grads = run_with_grads(op.reference, inputs, grad_output)
            if op.is_fa:
                grads = align_fa_backward(grad_output, *inputs, config=config, upsample_first=op.extra_args[0])
            else:
                grads = align_cm_backward(grad_output, *inputs[:2], config=config)
            for got, ref in zip(grads, ref_grads):
                torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5, msg=lambda m: f"{op.name} {config}: {m}")


@pytest.mark.parametrize("op", OPS)
def test_kernels_gradcheck_fp64(op):
    inputs = [t.requires_grad_(True) for t in op.inputs(2, 3, 5, 4, 3, 3, scale=1.5, dtype=torch.float64)]
    with use_backend("triton"):
        assert torch.autograd.gradcheck(op.op, inputs, fast_mode=True)


@pytest.mark.parametrize("op", OPS)
def test_custom_ops_opcheck(op):
    examples = [
        op.inputs(2, 3, 5, 6, 3, 4, layout=torch.channels_last),
        op.inputs(1, 2, 4, 3, 4, 3, dtype=torch.float64),
    ]
    examples[0] = [t.requires_grad_(True) for t in examples[0]]
    # Non-contiguous offsets: a slice of a wider tensor.
    sliced = op.inputs(1, 2, 4, 5, 2, 2)
    k = 2 if op.is_fa else 1
    sliced[k] = torch.randn(1, op.offset_channels + 2, 4, 5)[:, 1:-1]
    examples.append(sliced)
    forward = torch.ops.alignseg.align_fa_forward if op.is_fa else torch.ops.alignseg.align_cm_forward
    for args in examples:
        torch.library.opcheck(forward, [*args, *op.extra_args])
    inputs = examples[1]
    grad = torch.randn(op.reference(*inputs).shape, dtype=torch.float64)
    if op.is_fa:
        torch.library.opcheck(torch.ops.alignseg.align_fa_backward, [grad, *inputs, *op.extra_args])
    else:
        torch.library.opcheck(torch.ops.alignseg.align_cm_backward, [grad, *inputs[:2]])


def test_compile_fullgraph_forward_and_backward():
    def head(low, high, fa_offsets, context, cm_offsets):
        return align_cm(context, cm_offsets, align_fa(low, high, fa_offsets)).square().sum()

    low, high, fa_offsets = FA.inputs(2, 3, 6, 7, 3, 4, layout=torch.channels_last)
    context, cm_offsets, _ = CM.inputs(2, 3, 6, 7, 3, 3)
    inputs = [low, high, fa_offsets, context, cm_offsets]
    torch._dynamo.reset()
    # fullgraph fails on any graph break; Inductor where it can build its CPU code, else AOTAutograd alone
    # (which still traces both custom ops and the backward through their fake kernels).
    backend = "inductor" if shutil.which(os.environ.get("CXX", "c++")) else "aot_eager"
    compiled = torch.compile(head, fullgraph=True, backend=backend)
    with use_backend("triton"):
        loss, grads = run_with_grads(compiled, inputs, torch.tensor(1.0))
    with use_backend("reference"):
        ref_loss, ref_grads = run_with_grads(head, inputs, torch.tensor(1.0))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# On a GPU: the same comparisons at realistic sizes (skipped without CUDA).


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("op", OPS)
def test_gpu_kernels_match_reference_fp32(op, layout):
    shape = (2, 96, 65, 129, 33, 65) if op.is_fa else (2, 96, 65, 129, 3, 3)
    inputs = op.inputs(*shape, layout=layout, device="cuda")
    grad_output = torch.randn(op.reference(*inputs).shape, device="cuda")
    with use_backend("triton"):
        out, grads = run_with_grads(op.op, inputs, grad_output)
    ref_out, ref_grads = run_with_grads(op.reference, inputs, grad_output)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, atol=1e-3, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("op", OPS)
def test_gpu_kernels_low_precision(op, dtype):
    shape = (2, 256, 64, 128, 32, 64) if op.is_fa else (2, 256, 64, 128, 3, 3)
    inputs = op.inputs(*shape, dtype=dtype, layout=torch.channels_last, device="cuda")
    grad_output = torch.randn(op.reference(*inputs).shape, device="cuda").to(dtype)
    with use_backend("triton"):
        out, grads = run_with_grads(op.op, inputs, grad_output)
    ref_out, ref_grads = run_with_grads(op.reference, inputs, grad_output)
    oracle_out, oracle_grads = run_with_grads(op.reference, [t.double() for t in inputs], grad_output.double())
    for got, ref, oracle in zip([out, *grads], [ref_out, *ref_grads], [oracle_out, *oracle_grads]):
        ulp = torch.finfo(got.dtype).eps * oracle.abs().max().item()
        error, ref_error = (got.double() - oracle).abs().max().item(), (ref.double() - oracle).abs().max().item()
        assert error <= 2 * ref_error + ulp


@pytest.mark.gpu
def test_gpu_compile_fullgraph():
    def head(low, high, fa_offsets, context, cm_offsets):
        return align_cm(context, cm_offsets, align_fa(low, high, fa_offsets)).square().sum()

    low, high, fa_offsets = FA.inputs(2, 64, 32, 48, 16, 24, layout=torch.channels_last, device="cuda")
    context, cm_offsets, _ = CM.inputs(2, 64, 32, 48, 3, 3, device="cuda")
    inputs = [low, high, fa_offsets, context, cm_offsets]
    torch._dynamo.reset()
    with use_backend("triton"):
        loss, grads = run_with_grads(torch.compile(head, fullgraph=True), inputs, torch.tensor(1.0, device="cuda"))
    with use_backend("reference"):
        ref_loss, ref_grads = run_with_grads(head, inputs, torch.tensor(1.0, device="cuda"))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-3)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-3)
