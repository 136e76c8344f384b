"""The tiled layout copy (alignseg/kernels/relayout.py) against PyTorch's own copy: bitwise, across layouts, dtype
casts and sizes that are not multiples of the tiles."""

import pytest
import torch

from alignseg.ops.backend import interpreter_enabled, triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")

FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
# (N, C, H, W): odd channels and pixels, one row, one channel, one pixel.
SHAPES = [(2, 20, 7, 9), (1, 3, 1, 13), (3, 1, 5, 4), (2, 16, 1, 1)]


def relayout_module():
    from alignseg.kernels import relayout

    return relayout


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("source", list(FORMATS))
@pytest.mark.parametrize("target", list(FORMATS))
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                    (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float64),
                                    (torch.float32, torch.float16)], ids=lambda d: f"{d[0]}->{d[1]}")
def test_relayout_matches_torch_copy(shape, source, target, dtypes):
    R = relayout_module()
    src = (torch.randn(*shape, dtype=torch.float64) * 3).to(dtypes[0]).contiguous(memory_format=FORMATS[source])
    out = torch.full(shape, float("nan"), dtype=dtypes[1]).contiguous(memory_format=FORMATS[target])
    result = R.relayout(src, out)
    assert result is out and result.is_contiguous(memory_format=FORMATS[target])
    assert_cast_like_torch(result, src)


def assert_cast_like_torch(result, src):
    """Every element written (the outputs start as NaN) and cast as torch casts: bitwise, except fp32 -> bf16 under
    triton's interpreter, which truncates where the GPU rounds to nearest even (cvt.rn, checked in
    test_relayout_compiles_coalesced_on_both_sides_and_rounds_like_torch): there within one bf16 step."""
    expected = src.to(result.dtype)
    if result.dtype == torch.bfloat16 and src.dtype != torch.bfloat16 and interpreter_enabled():
        assert not result.isnan().any()
        torch.testing.assert_close(result.float(), expected.float(), rtol=2.0**-7, atol=0)
    else:
        assert torch.equal(result, expected)


def test_relayout_like_and_to_channels_last():
    R = relayout_module()
    g = torch.randn(2, 32, 5, 6).contiguous(memory_format=torch.channels_last)
    like = torch.empty(2, 32, 5, 6, dtype=torch.bfloat16)
    back = R.relayout_like(g, like)
    assert back.dtype == torch.bfloat16 and back.is_contiguous()
    assert_cast_like_torch(back, g)
    assert R.relayout_like(g, g) is g  # same strides and dtype: no copy
    view = torch.randn(2, 32, 5, 9)[..., :6]  # not dense: empty_like gives contiguous strides
    assert R.relayout_like(g, view).is_contiguous() and torch.equal(R.relayout_like(g, view), g)
    staged = R.to_channels_last(like.normal_())
    assert staged.is_contiguous(memory_format=torch.channels_last) and torch.equal(staged, like)


def test_relayout_of_a_view_falls_back_to_copy():
    R = relayout_module()
    base = torch.randn(2, 8, 6, 10)
    view = base[:, :, :, :5]  # stride_h (10) != W * stride_w (5): pixels are not one axis
    assert not R.flat_pixels(view)
    out = R.relayout(view, torch.empty(2, 8, 6, 5, memory_format=torch.channels_last))
    assert torch.equal(out, view)
    with pytest.raises(ValueError, match="relayout: needs two 4-D maps of one shape"):
        R.plan_relayout(view, torch.empty(2, 8, 6, 5))



# Ahead of time for sm_90, no GPU: in a subprocess, since the compiler needs the kernels imported without
# TRITON_INTERPRET=1 (as tests/test_kernels_compile.py runs the report).
AOT_SCRIPT = r"""
import json, torch
from alignseg.kernels.relayout import plan_relayout
from alignseg.kernels.report import compile_launch, memory_op_spans
formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
result = {}
for source, target in (("contiguous", "channels_last"), ("channels_last", "contiguous")):
    src = torch.empty(2, 64, 16, 16, device="meta", memory_format=formats[source])
    out = torch.empty(2, 64, 16, 16, dtype=torch.bfloat16, device="meta", memory_format=formats[target])
    launch = plan_relayout(src, out)
    compiled = compile_launch(launch, 90)
    spans = dict(memory_op_spans(compiled.asm["ttgir"], (launch.constexprs["BLOCK_C"], launch.constexprs["BLOCK_P"])))
    result[source] = dict(spans=spans, rounds_to_nearest="cvt.rn.bf16" in compiled.asm["ptx"],
                          truncates="cvt.rz" in compiled.asm["ptx"])
print(json.dumps(result))
"""


def test_relayout_compiles_coalesced_on_both_sides_and_rounds_like_torch():
    # The tile is [channels, pixels]: a contiguous map's adjacent addresses are its pixels (axis 1), a channels_last
    # map's its channels (axis 0); the load and the store must each cover MIN_SPAN of their own map's per warp
    # instruction. And fp32 -> bf16 rounds to nearest even (cvt.rn), as torch's cast does.
    import json
    import os
    import subprocess
    import sys

    from alignseg.kernels.report import MIN_SPAN

    done = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=dict(os.environ, TRITON_INTERPRET="0"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    axis = {"contiguous": 1, "channels_last": 0}
    for source, target in (("contiguous", "channels_last"), ("channels_last", "contiguous")):
        spans = result[source]["spans"]
        assert spans["load"][axis[source]] >= MIN_SPAN and spans["store"][axis[target]] >= MIN_SPAN, (source, spans)
        assert result[source]["rounds_to_nearest"] and not result[source]["truncates"]
