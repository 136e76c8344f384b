"""Every kernel compiles ahead of time for sm_80 and sm_90 at the launchers' block sizes, without spills.

No GPU is needed: ``triton.compile`` targets ``GPUTarget("cuda", arch, 32)`` and the cuobjdump shipped with
triton reads registers and local memory (spills) from the cubin. The kernels must not be interpreted functions, so the report runs in a
subprocess with ``TRITON_INTERPRET=0`` (this process imported them under the interpreter).
"""

import json
import os
import subprocess
import sys

import pytest

from alignseg.kernels.report import SPILLED
from alignseg.ops.backend import triton_available

pytestmark = [pytest.mark.skipif(not triton_available(), reason="needs triton"), pytest.mark.slow]

KERNELS = {"align_fa_forward", "align_fa_backward", "align_fa_forward_one_step", "align_fa_backward_one_step",
           "align_cm_forward", "align_cm_backward"}


def start_report(*args: str) -> subprocess.Popen:
    env = dict(os.environ, TRITON_INTERPRET="0")
    return subprocess.Popen([sys.executable, "-m", "alignseg.kernels.report", "--json", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kernels_compile_for_sm80_and_sm90_without_spills():
    # Two reports side by side: every kernel in both layouts at both archs in fp32, and bf16 at sm_90.
    jobs = {
        ("float32",): start_report("--arch", "80", "90", "--dtype", "float32", "--layout", "channels_last", "contiguous"),
        ("bfloat16",): start_report("--arch", "90", "--dtype", "bfloat16", "--layout", "channels_last"),
    }
    rows = []
    for job in jobs.values():
        stdout, stderr = job.communicate(timeout=600)
        assert job.returncode in (0, SPILLED), f"the kernel report failed:\n{stderr[-4000:]}"
        rows += json.loads(stdout.strip().splitlines()[-1])
    compiled = {(r["kernel"], r["arch"], r["dtype"], r["layout"]) for r in rows}
    for arch in (80, 90):
        for layout in ("channels_last", "contiguous"):
            assert {k for k, a, d, lay in compiled if a == arch and d == "float32" and lay == layout} == KERNELS
    assert {k for k, a, d, _ in compiled if a == 90 and d == "bfloat16"} == KERNELS
    spilled = [r for r in rows if r["local_bytes"] or r["stack_bytes"]]
    assert not spilled, f"register spills: {spilled}"
    assert all(0 < r["registers"] <= 255 for r in rows)
