"""Every kernel compiles ahead of time for sm_80 and sm_90, in every dtype, layout and edge shape, without spills.

No GPU is needed: ``triton.compile`` targets ``GPUTarget("cuda", arch, 32)`` and the cuobjdump shipped with
triton reads registers and local memory (spills) from the cubin. The kernels must not be interpreted
functions, so the report runs in subprocesses with ``TRITON_INTERPRET=0`` (this process imported them under
the interpreter), one per arch, side by side on CI's two cores.

The matrix: 4 kernels x {fp32, fp16, bf16, fp64} x {channels_last, contiguous} x 4 argument shapes x 2 archs
= 256 compiles. The interpreter does not specialise, so this is the only test that sees the code Triton's JIT
builds for each case. The shapes (``alignseg.kernels.report.SHAPES``) are chosen by what changes that code:
Triton turns an integer argument equal to 1 into a constant and marks one divisible by 16, per argument.

* ``example``: the real decoder shape; every size and most strides divisible by 16 (vectorised loads).
* ``ones``: N = C = 1 and 1x1 maps and context: every size and stride is the constant 1 (the fp64 scale
  failed to compile here), and channels_last with C = 1 takes the contiguous block sizes.
* ``row``: 1xW maps (H = h = 1 constants, W, w odd) with C = 20: sizes and channels_last strides not
  divisible by 16, the widest register use (fp64 reaches ~250 registers at sm_90 on triton 3.9).
* ``column``: Hx1 maps (W = w = 1 constants) with C = 3 and a 2x2 context.

The full cross product is affordable: ~0.4 s a compile, ~1-2 min per arch on a loaded 2-core machine
(measured with triton 3.9, fresh cache), so nothing is sampled. The report needs triton >= 3.3.
"""

import json
import os
import subprocess
import sys

import pytest

from alignseg.kernels.report import MIN_TRITON, SHAPES, SPILLED
from alignseg.ops.backend import triton_available

KERNELS = {"align_fa_forward", "align_fa_backward", "align_fa_forward_one_step", "align_fa_backward_one_step",
           "align_cm_forward", "align_cm_backward"}
DTYPES = ("float32", "float16", "bfloat16", "float64")
LAYOUTS = ("channels_last", "contiguous")
ARCHS = (80, 90)


def _triton_version() -> tuple[int, ...]:
    import triton

    return tuple(int(part) for part in triton.__version__.split(".")[:2])


pytestmark = [
    pytest.mark.skipif(not triton_available(), reason="needs triton"),
    pytest.mark.skipif(triton_available() and _triton_version() < MIN_TRITON, reason="the kernel report needs triton >= 3.3"),
    pytest.mark.slow,
]


def start_report(arch: int) -> subprocess.Popen:
    env = dict(os.environ, TRITON_INTERPRET="0")
    command = [sys.executable, "-m", "alignseg.kernels.report", "--json", "--keep-going", "--arch", str(arch),
               "--dtype", *DTYPES, "--layout", *LAYOUTS, "--shape", *SHAPES]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_every_kernel_dtype_layout_and_edge_shape_compiles_for_sm80_and_sm90_without_spills():
    jobs = {arch: start_report(arch) for arch in ARCHS}
    rows, failures = [], []
    for arch, job in jobs.items():
        stdout, stderr = job.communicate(timeout=900)
        errors = [line for line in stderr.splitlines() if line.startswith("compile error:")]
        failures += errors
        assert errors or job.returncode in (0, SPILLED), f"the kernel report for sm_{arch} crashed:\n{stderr[-4000:]}"
        rows += json.loads(stdout.strip().splitlines()[-1])
    assert not failures, "compile errors:\n" + "\n".join(failures)
    compiled = {(r["kernel"], r["shape"], r["arch"], r["dtype"], r["layout"]) for r in rows}
    expected = {(k, s, a, d, lay) for k in KERNELS for s in SHAPES for a in ARCHS for d in DTYPES for lay in LAYOUTS}
    assert compiled == expected
    spilled = [r for r in rows if r["local_bytes"] or r["stack_bytes"]]
    assert not spilled, f"register spills: {spilled}"
    assert all(0 < r["registers"] <= 255 for r in rows)
