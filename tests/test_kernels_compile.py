"""Every kernel compiles ahead of time for sm_80 and sm_90, in every dtype, layout and edge shape, without spills.

No GPU is needed: ``triton.compile`` targets ``GPUTarget("cuda", arch, 32)`` and the cuobjdump shipped with
triton reads registers and local memory (spills) from the cubin. The kernels must not be interpreted
functions, so the report runs in subprocesses with ``TRITON_INTERPRET=0`` (this process imported them under
the interpreter), one per arch, side by side on CI's two cores.

The matrix: 27 kernels (the forward and backward of each op and form, the align_fa backward without its
scatter, the fixed-point scatter of each form and its final pass, the exact form's forward, backward and
fixed-point scatter with a coarse map larger than the fine one (16 coarse taps a pixel, unmerged), the staging
copies, and the deterministic backward's one-launch gather backward (both forms, and a larger coarse map), binned
gathers, pixel bins and context reduction) x {fp32, fp16, bf16, fp64} x {channels_last, contiguous} x 4 argument
shapes x 2 archs = 1728 compiles.
The interpreter does not specialise, so
this is the only test that sees the code Triton's JIT builds for each case. The shapes
(``alignseg.kernels.report.SHAPES``) are chosen by what changes that code: Triton turns an integer argument equal
to 1 into a constant and marks one divisible by 16, per argument.

* ``example``: the real decoder shape; every size and most strides divisible by 16 (vectorised loads).
* ``ones``: N = C = 1 and 1x1 maps and context: every size and stride is the constant 1 (the fp64 scale
  failed to compile here), and channels_last with C = 1 takes the contiguous block sizes.
* ``row``: 1xW maps (H = h = 1 constants, W, w odd) with C = 20: sizes and channels_last strides not
  divisible by 16 (so channels_last takes the contiguous configs), the widest register use (fp64: up to 254
  registers on triton 3.9).
* ``column``: Hx1 maps (W = w = 1 constants) with C = 3 and a 2x2 context.

The full cross product is affordable, so nothing is sampled: about 0.6 s of CPU a compile with triton 3.9 and a
fresh cache (measured with 704 of these compiles: 7.2 min of CPU, 8.8 min wall on a 2-core machine loaded by
other jobs); the 832 take about 8.5 min of CPU, about 4.3 min on two idle cores with the two archs side by side.
1472 of them took 9.9 min wall with an empty Triton cache (``TRITON_CACHE_DIR`` fresh, 2-core machine,
2026-11-28): about half of CI's first lane there, whose whole run took 20.6 min with a cold cache. Triton's cache
key includes each function's first line number, so an edit that moves the kernels' lines recompiles them all.
The report needs triton >= 3.3.

The deterministic backward's kernels (GATHER_KERNELS) are held to the same rule: no spills, no stack. The window
gathers they replaced kept 8-32 B stacks in a few edge shapes (an expected failure until 2026-11-28); the binned
ones compile clean everywhere.
"""

import json
import os
import subprocess
import sys

import pytest

from alignseg.kernels.report import MIN_TRITON, SHAPES, SPILLED, KernelReport, warps_follow_the_layout
from alignseg.ops.backend import triton_available

KERNELS = {"align_fa_forward", "align_fa_backward", "align_fa_forward_one_step", "align_fa_backward_one_step",
           "align_fa_backward_offsets", "align_fa_backward_offsets_one_step", "align_cm_forward", "align_cm_backward",
           "align_fa_fixed_point_scatter", "align_fa_fixed_point_scatter_one_step", "fixed_point_finalize",
           "relayout", "relayout_cast", "align_fa_forward_high_larger", "align_fa_backward_high_larger",
           "align_fa_fixed_point_scatter_high_larger"}
# The deterministic backward's kernels (alignseg/kernels/align_fa_gather.py, the context reduction of align_cm).
GATHER_KERNELS = {"align_cm_reduce_context", "binned_warp", "binned_upsample_warp", "binned_one_step",
                  "binned_upsample", "binned_upsample_warp_larger", "pixel_bins", "pixel_bins_upsample",
                  "align_fa_gather_backward", "align_fa_gather_backward_one_step",
                  "align_fa_gather_backward_high_larger"}
DTYPES = ("float32", "float16", "bfloat16", "float64")
LAYOUTS = ("channels_last", "contiguous")
ARCHS = (80, 90)


def _triton_version() -> tuple[int, ...]:
    from alignseg.kernels.launch import triton_version  # imports triton: only where it is installed

    return triton_version()


pytestmark = [
    pytest.mark.skipif(not triton_available(), reason="needs triton"),
    pytest.mark.skipif(triton_available() and _triton_version() < MIN_TRITON,
                       reason="the kernel report needs triton >= 3.3"),
    pytest.mark.slow,
]


def start_report(arch: int) -> subprocess.Popen:
    env = dict(os.environ, TRITON_INTERPRET="0")
    command = [sys.executable, "-m", "alignseg.kernels.report", "--json", "--keep-going", "--arch", str(arch),
               "--dtype", *DTYPES, "--layout", *LAYOUTS, "--shape", *SHAPES]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def compiled_rows() -> list[dict]:
    """The report's rows for every kernel at both archs (one subprocess per arch, side by side)."""
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
    expected = {(k, s, a, d, lay) for k in KERNELS | GATHER_KERNELS for s in SHAPES for a in ARCHS for d in DTYPES
                for lay in LAYOUTS}
    assert compiled == expected
    return rows


def spills(rows: list[dict], kernels: set[str]) -> list[dict]:
    return [r for r in rows if r["kernel"] in kernels and (r["local_bytes"] or r["stack_bytes"])]


def test_every_kernel_dtype_layout_and_edge_shape_compiles_for_sm80_and_sm90_without_spills(compiled_rows):
    every = KERNELS | GATHER_KERNELS
    assert not spills(compiled_rows, every), f"register spills: {spills(compiled_rows, every)}"
    assert all(0 < r["registers"] <= 255 for r in compiled_rows)


def test_warps_run_along_the_adjacent_addresses_of_each_layout(compiled_rows):
    # Neighbouring pixels for contiguous maps, a pixel's channels for channels_last ones (the report reads what a
    # warp instruction covers from each kernel's layouts; launch.pixels_last orients the tiles for the installed
    # Triton).
    example = [KernelReport(**r) for r in compiled_rows if r["shape"] == "example"]
    wrong = [(r.kernel, r.dtype, r.layout, r.arch, r.pixel_span, r.channel_span)
             for r in example if not warps_follow_the_layout(r)]
    assert not wrong, f"(kernel, dtype, layout, sm, pixel span, channel span) off the adjacent addresses: {wrong}"
    assert any(r.layout == "contiguous" and r.pixel_span >= 16 for r in example)



def test_atomic_ops_reads_the_forms_of_atomic_instructions():
    from alignseg.kernels.report import atomic_ops

    ptx = """
	@%p12 red.global.gpu.relaxed.add.v4.f32 [ %rd1 + 0 ], { %r1, %r2, %r3, %r4 };
	@!%p3 atom.global.gpu.acq_rel.add.u64 %rd5, [%rd2], %rd3;
	red.global.gpu.relaxed.or.b32 [%rd4], %r9;
	red.global.gpu.relaxed.add.v4.f32 [ %rd1 + 16 ], { %r1, %r2, %r3, %r4 };
	// red.global.add.f32 in a comment is not an instruction
	ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd7 + 0 ];
"""
    assert atomic_ops(ptx) == "add.v4.f32 x2, add.u64 x1, or.b32 x1"
    assert atomic_ops("ld.global.b32 %r1, [%rd1];") == ""


def test_merged_coarse_cells_issue_fewer_atomics_and_channels_last_atomics_are_vectors(compiled_rows):
    # The exact form's backward at the example shape (a coarse map half the fine one: merged 3x3 cells) against the
    # same kernels with a coarse map larger than the fine one (16 taps a pixel): 13 atomic sites a pixel against 20.
    def sites(kernel, dtype, layout, arch=90):
        row = next(r for r in compiled_rows if (r["kernel"], r["shape"], r["arch"], r["dtype"], r["layout"])
                   == (kernel, "example", arch, dtype, layout))
        return row["atomics"], sum(int(part.rsplit("x", 1)[1]) for part in row["atomics"].split(", ") if part)

    for kernel in ("align_fa_backward", "align_fa_fixed_point_scatter"):
        for dtype in ("float32", "bfloat16"):
            merged, taps = sites(kernel, dtype, "channels_last"), sites(f"{kernel}_high_larger", dtype, "channels_last")
            assert merged[1] * 20 == taps[1] * 13, (kernel, dtype, merged, taps)
    # channels_last float atomics add four channels an instruction (red.global.add.v4.f32 at sm_90).
    forms, _ = sites("align_fa_backward", "float32", "channels_last")
    assert forms.startswith("add.v4.f32"), forms
