"""Compile every kernel ahead of time for NVIDIA GPUs (no GPU needed) and report registers and spills.

    TRITON_INTERPRET=0 python -m alignseg.kernels.report [--arch 80 90] [--dtype float32 bfloat16]
        [--shape example] [--json]

Each kernel is compiled as the launchers launch it on a GPU: the launch plans of alignseg/kernels/align_fa.py
and alignseg/kernels/align_cm.py (block sizes from ``GPU_CONFIGS``) over realistic arguments (N=2, C=256,
a 128x256 output from a 64x128 coarse map, a 3x3 context; meta tensors, so nothing is allocated),
with the signature and specialisation Triton's JIT would derive from them (16-byte-aligned pointers,
strides of 1 as constants). ``cuobjdump`` (shipped with triton) reads registers and local memory
(spills) from the cubin Triton built.
The kernels must be imported without ``TRITON_INTERPRET=1`` (interpreted functions do not compile).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

EXAMPLE_SHAPE = dict(n=2, c=256, out_h=128, out_w=256, coarse_h=64, coarse_w=128, context=3)
# Edge shapes: Triton's JIT turns every integer argument equal to 1 into a constant and marks one divisible
# by 16, so each shape below compiles different code (see tests/test_kernels_compile.py for the choice).
SHAPES = {
    "example": EXAMPLE_SHAPE,  # sizes and strides divisible by 16
    "ones": dict(n=1, c=1, out_h=1, out_w=1, coarse_h=1, coarse_w=1, context=1),  # every size and stride 1
    "row": dict(n=2, c=20, out_h=1, out_w=37, coarse_h=1, coarse_w=19, context=3),  # 1xW maps, C % 16 != 0
    "column": dict(n=3, c=3, out_h=29, out_w=1, coarse_h=15, coarse_w=1, context=2),  # Hx1 maps, odd C
}
MIN_TRITON = (3, 3)  # triton.compiler.ASTSource(fn, signature, constexprs, attrs)
SPILLED = 3  # exit status when a kernel spills (1 is Python's own for an uncaught error)
WRONG_LANES = 4  # exit status of --check-lanes when a kernel's lanes miss the map's adjacent addresses
LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


@dataclasses.dataclass
class KernelReport:
    kernel: str
    shape: str
    arch: int
    dtype: str
    layout: str
    block_p: int
    block_c: int
    num_warps: int
    registers: int
    local_bytes: int  # per thread; spilled registers live here, so non-zero means spills
    stack_bytes: int
    shared_bytes: int  # Triton's shared memory (the context reduction's tl.dot, layout conversions)
    # Elements one warp instruction covers along the tile's pixel and channel axes (lanes times elements per
    # lane), the fewest over the loads, stores and atomics of pixels x channels tiles (0, 0 for kernels without
    # such tiles): a contiguous map wants a long pixel span, a channels_last map a long channel span.
    pixel_span: int
    channel_span: int
    # Atomic instructions in the PTX by form, e.g. "add.v4.f32 x13" (a vector atomic adds 4 elements in one
    # instruction; the fixed-point path's add.u64 is scalar): static counts, not executions.
    atomics: str = ""


def example_plans(dtype: torch.dtype, layout: torch.memory_format, shape: dict[str, int] = EXAMPLE_SHAPE):
    """(name, KernelLaunch) for every kernel, planned over meta tensors of ``shape`` (keys of EXAMPLE_SHAPE)."""
    from . import align_fa_gather as gather
    from .align_cm import plan_align_cm_backward, plan_align_cm_forward, plan_reduce_context_partials
    from .align_fa import plan_align_fa_backward, plan_align_fa_fixed_point_scatter, plan_align_fa_forward
    from .fixed_point import fixed_point_buffers, plan_fixed_point_finalize
    from .launch import accumulation_dtype
    from .relayout import plan_relayout

    s = shape
    other_layout = torch.contiguous_format if layout == torch.channels_last else torch.channels_last

    def feature(h: int, w: int, channels: int = s["c"], dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.empty(s["n"], channels, h, w, dtype=dt, device="meta", memory_format=layout)

    low, high = feature(s["out_h"], s["out_w"]), feature(s["coarse_h"], s["coarse_w"])
    larger = feature(s["out_h"] + 1, s["out_w"] + 1)  # a "coarse" map larger than low: the exact form's 16 taps
    context = feature(s["context"], s["context"])
    grad = feature(s["out_h"], s["out_w"])
    fa_offsets = feature(s["out_h"], s["out_w"], 4, torch.float32)
    cm_offsets = feature(s["out_h"], s["out_w"], 2, torch.float32)
    int32 = torch.empty(0, dtype=torch.int32, device="meta")

    def bins_of(source: torch.Tensor):
        return gather.PixelBins(order=int32.new_empty(grad[:, 0].numel()),
                                starts=int32.new_empty(source[:, 0].numel() + 1))

    grad_low, grad_high = feature(s["out_h"], s["out_w"]), feature(s["coarse_h"], s["coarse_w"])
    partial = plan_align_cm_backward(grad, context, cm_offsets)[1][0]
    return [
        ("align_fa_forward", plan_align_fa_forward(low, high, fa_offsets)[0]),
        ("align_fa_backward", plan_align_fa_backward(grad, low, high, fa_offsets)[0]),
        ("align_fa_forward_one_step", plan_align_fa_forward(low, high, fa_offsets, upsample_first=False)[0]),
        ("align_fa_backward_one_step", plan_align_fa_backward(grad, low, high, fa_offsets, upsample_first=False)[0]),
        # The gather path's per-pixel backward: the offsets' gradient only (no scatter).
        ("align_fa_backward_offsets", plan_align_fa_backward(grad, low, high, fa_offsets, scatter_sources=False)[0]),
        ("align_fa_backward_offsets_one_step",
         plan_align_fa_backward(grad, low, high, fa_offsets, upsample_first=False, scatter_sources=False)[0]),
        # The deterministic fixed-point scatter of the sources (fixed_point.py), and its final pass.
        ("align_fa_fixed_point_scatter", plan_align_fa_fixed_point_scatter(grad, low, high, fa_offsets)[0]),
        ("align_fa_fixed_point_scatter_one_step",
         plan_align_fa_fixed_point_scatter(grad, low, high, fa_offsets, upsample_first=False)[0]),
        ("fixed_point_finalize", plan_fixed_point_finalize(grad_low, *fixed_point_buffers(grad_low),
                                                           int32.new_empty((), dtype=accumulation_dtype(dtype)[0]))),
        # The exact form where high is larger than low: each pixel's 16 coarse taps unmerged (align_fa.merged_cells).
        ("align_fa_forward_high_larger", plan_align_fa_forward(low, larger, fa_offsets)[0]),
        ("align_fa_backward_high_larger", plan_align_fa_backward(grad, low, larger, fa_offsets)[0]),
        ("align_fa_fixed_point_scatter_high_larger",
         plan_align_fa_fixed_point_scatter(grad, low, larger, fa_offsets)[0]),
        ("align_cm_forward", plan_align_cm_forward(context, cm_offsets, low)[0]),
        ("align_cm_backward", plan_align_cm_backward(grad, context, cm_offsets)[0]),
        ("align_cm_reduce_context", plan_reduce_context_partials(partial, context)[0]),
        # The binned gathers (the source gradients of the deterministic gather path, AlignCM's large contexts, the
        # upsample transpose), and the pixel bins they read.
        ("binned_warp", gather.plan_binned_transpose(grad, fa_offsets[:, 2:4], grad_low, bins_of(grad_low),
                                                     gather.DIRECT)),
        ("binned_upsample_warp", gather.plan_binned_transpose(grad, fa_offsets[:, 0:2], grad_high,
                                                              bins_of(grad_high), gather.COMPOSITE)),
        ("binned_one_step", gather.plan_binned_transpose(grad, fa_offsets[:, 0:2], grad_high, bins_of(grad_high),
                                                         gather.DIRECT)),
        ("binned_upsample", gather.plan_binned_transpose(grad, None, grad_high, bins_of(grad_high), gather.DIRECT)),
        # a coarse map larger than the output: wider bin spans (bin_span)
        ("binned_upsample_warp_larger", gather.plan_binned_transpose(grad, fa_offsets[:, 0:2], larger,
                                                                     bins_of(larger), gather.COMPOSITE)),
        # The deterministic gather backward: the offsets' gradient and both source gradients in one launch.
        ("align_fa_gather_backward", gather.plan_align_fa_gather_backward(
            grad, low, high, fa_offsets, (grad_low, grad_high, fa_offsets), bins_of(grad_low), bins_of(grad_high))),
        ("align_fa_gather_backward_one_step", gather.plan_align_fa_gather_backward(
            grad, low, high, fa_offsets, (grad_low, grad_high, fa_offsets), bins_of(grad_low), bins_of(grad_high),
            upsample_first=False)),
        ("align_fa_gather_backward_high_larger", gather.plan_align_fa_gather_backward(
            grad, low, larger, fa_offsets, (grad_low, larger, fa_offsets), bins_of(grad_low), bins_of(larger))),
        ("pixel_bins", gather.plan_pixel_bins(fa_offsets[:, 0:2], int32.new_empty(grad[:, 0].numel()),
                                              grad.shape[-2:], high.shape[-2:], gather.COMPOSITE)),
        ("pixel_bins_upsample", gather.plan_pixel_bins(None, int32.new_empty(grad[:, 0].numel()), grad.shape[-2:],
                                                       high.shape[-2:], gather.DIRECT)),
        # The staging copy into the other layout (launch.stage_channels_last), and back with the cast of a buffer.
        ("relayout", plan_relayout(grad, torch.empty_like(grad, memory_format=other_layout))),
        ("relayout_cast", plan_relayout(torch.empty_like(grad, dtype=accumulation_dtype(dtype)[0]),
                                        torch.empty_like(grad, memory_format=other_layout))),
    ]


def block_pixels(constexprs: dict) -> int:
    """Pixels per program: BLOCK_P, a gather's TILE_H x TILE_W, or 1 (the context reduction: one cell)."""
    if "BLOCK_P" in constexprs:
        return constexprs["BLOCK_P"]
    return constexprs.get("TILE_H", 1) * constexprs.get("TILE_W", 1)


def specialization(value) -> tuple[str, object]:
    """(type, attribute) of one runtime argument, as Triton's JIT specialises it at launch.

    Triton's own rule where this version exposes it; otherwise the same rule written out: tensors
    are 16-byte-aligned pointers (``"D"``), an integer 1 becomes a constant, an integer divisible by
    16 carries ``"D"``.
    """
    try:
        from triton.backends.nvidia.compiler import CUDABackend
        from triton.runtime.jit import native_specialize_impl
    except ImportError:
        if isinstance(value, torch.Tensor):
            return "*" + {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                          torch.float64: "fp64"}[value.dtype], "D"
        if isinstance(value, float):
            return "fp32", ""
        if value == 1:
            return "constexpr", 1
        return ("i32" if -(2**31) <= value < 2**31 else "i64"), ("D" if value % 16 == 0 else "")
    return native_specialize_impl(CUDABackend, value, False, True, True)


def compile_launch(launch, arch: int):
    """triton.compile the planned launch for sm_<arch>, specialised like the JIT would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    from .launch import triton_version

    if triton_version() < MIN_TRITON:
        raise RuntimeError(f"the kernel report needs triton >= {'.'.join(map(str, MIN_TRITON))} (ASTSource API), "
                           f"found {triton.__version__}")
    kernel = launch.kernel
    if not isinstance(kernel, JITFunction):
        raise RuntimeError("the kernels were imported with TRITON_INTERPRET=1; run with TRITON_INTERPRET=0")
    signature, constexprs, attrs = {}, {}, {}
    for index, (name, value) in enumerate(zip(kernel.arg_names, launch.args)):
        kind, attr = specialization(value)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = attr
        elif attr == "D":
            attrs[(index,)] = [["tt.divisibility", 16]]
    for name, value in launch.constexprs.items():
        signature[name] = "constexpr"
        constexprs[name] = value
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": launch.num_warps})


def cuobjdump_path() -> str:
    """The cuobjdump shipped with triton (beside its ptxas)."""
    try:
        from triton import knobs

        ptxas = knobs.nvidia.ptxas.path
    except (ImportError, AttributeError):  # triton before knobs
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas()
    ptxas = ptxas[0] if isinstance(ptxas, tuple) else ptxas
    return os.path.join(os.path.dirname(ptxas), "cuobjdump")


def warp_spans(ttgir: str, constexprs: dict) -> tuple[int, int]:
    """(pixel span, channel span) of a compiled kernel, read from its TTGIR: for every memory op on a tile shaped
    pixels x channels (oriented by ``PIXELS_LAST``), the elements a warp covers along each axis of its blocked
    layout (threadsPerWarp x sizePerThread); the fewest over the ops, per axis; (0, 0) without such ops."""
    pixels, channels = block_pixels(constexprs), constexprs.get("BLOCK_C", 0)
    pixel_axis = 1 if constexprs.get("PIXELS_LAST") else 0
    shape = (channels, pixels) if pixel_axis else (pixels, channels)
    if min(shape) < 2:
        return 0, 0
    spans = [(span[pixel_axis], span[1 - pixel_axis]) for _, span in memory_op_spans(ttgir, shape)]
    if not spans:
        return 0, 0
    return min(p for p, _ in spans), min(c for _, c in spans)


def memory_op_spans(ttgir: str, shape: tuple[int, int]) -> list[tuple[str, tuple[int, int]]]:
    """(op, (span along axis 0, span along axis 1)) of every load, store and atomic on a 2-D tile of ``shape`` in a
    TTGIR: the elements one warp instruction covers along each axis of the op's blocked layout."""
    layouts = dict(re.findall(r"^(#\w+) = #ttg\.blocked<\{([^}]*)\}>", ttgir, re.MULTILINE))
    memory_ops = re.findall(r"tt\.(load|store|atomic_rmw)\b[^\n]*?tensor<(\d+)x(\d+)x!tt\.ptr<\w+>, (#\w+)>", ttgir)
    spans = []
    for op, rows, cols, layout in memory_ops:
        if (int(rows), int(cols)) != tuple(shape) or layout not in layouts:
            continue
        per_lane, lanes_per_axis = ([int(v) for v in re.search(rf"{key} = \[(\d+), (\d+)\]", layouts[layout]).groups()]
                                    for key in ("sizePerThread", "threadsPerWarp"))
        spans.append((op, (per_lane[0] * lanes_per_axis[0], per_lane[1] * lanes_per_axis[1])))
    return spans


MIN_SPAN = 16  # elements a warp instruction should cover along a map's adjacent addresses (64 B in fp32)
# Kernels whose load and store run along different axes by design (a copy into the other layout): each side is checked
# along its own map's adjacent addresses in tests/test_kernels_relayout.py instead.
TWO_LAYOUT_KERNELS = ("relayout", "relayout_cast")


def warps_follow_the_layout(row: KernelReport) -> bool:
    """Whether a warp instruction covers at least :data:`MIN_SPAN` adjacent addresses of the map in ``row``'s tiles
    (or the whole block): neighbouring pixels of a contiguous map, a pixel's channels of a channels_last one;
    kernels without pixels x channels tiles pass, and float64, whose tiles are sized for registers (it serves
    gradcheck, not speed). Meaningful at the example shape (the edge shapes have 1-pixel maps or 1 channel)."""
    if row.pixel_span == row.channel_span == 0 or row.dtype == "float64" or row.kernel in TWO_LAYOUT_KERNELS:
        return True
    if row.layout == "contiguous":
        return row.pixel_span >= min(row.block_p, MIN_SPAN)
    return row.channel_span >= min(row.block_c, MIN_SPAN)


def first_axis_wins_ties(arch: int = 90) -> bool:
    """Read from the installed Triton: does it lay a gathered 2-D tile's first axis fastest across lanes (else the
    last)? :data:`alignseg.kernels.launch.FIRST_AXIS_WINS_TIES` must agree (tests/test_kernels_launch.py)."""
    from .launch import KernelLaunch
    from .layout_probe import gathered_tile_kernel

    values = torch.empty(64, device="meta")
    probe = KernelLaunch(gathered_tile_kernel, grid=(1,), args=(values, values, values.int(), 33),
                         constexprs=dict(ROWS=32, COLS=32), num_warps=4)
    ttgir = compile_launch(probe, arch).asm["ttgir"]
    rows_span, cols_span = warp_spans(ttgir, dict(BLOCK_P=32, BLOCK_C=32))  # rows play the pixels here
    if {rows_span, cols_span} != {1, 32}:
        raise RuntimeError(f"unexpected probe layout: a warp covers {rows_span} x {cols_span} elements")
    return rows_span == 32


def atomic_ops(ptx: str) -> str:
    """The atomic and reduction instructions of a PTX listing by form (operation, vector width, type), with their
    static counts: ``"add.v4.f32 x13, or.b32 x2"`` ("" for none). Scope, memory order and state space are dropped."""
    forms: dict[str, int] = {}
    for match in re.finditer(r"^\s*(?:@!?%p\d+\s+)?(?:atom|red)((?:\.\w+)+)", ptx, re.M):
        parts = [p for p in match[1].split(".")[1:] if p not in ATOMIC_QUALIFIERS]
        form = ".".join(parts)
        forms[form] = forms.get(form, 0) + 1
    return ", ".join(f"{form} x{count}" for form, count in forms.items())


ATOMIC_QUALIFIERS = {"global", "shared", "gpu", "cta", "sys", "relaxed", "acquire", "release", "acq_rel", "noftz"}


def cubin_usage(cubin: bytes) -> tuple[int, int, int]:
    """(registers, local memory bytes, stack bytes) per thread of the cubin Triton built.

    Read from the cubin itself rather than by re-running ptxas on the PTX: Triton picks its ptxas and
    options per version (3.9 assembles sm_90 with the Blackwell ptxas), so only the cubin is what runs.
    Local memory is where spilled registers (and stack arrays) live: non-zero means spills.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        log = subprocess.run([cuobjdump_path(), "--dump-resource-usage", path], capture_output=True, text=True,
                             check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", log)
    if usage is None:
        raise RuntimeError(f"could not read the resource usage from cuobjdump:\n{log}")
    return int(usage[1]), int(usage[3]), int(usage[2])


def report(archs=(80, 90), dtypes=("float32", "bfloat16"), layouts=("channels_last",), shapes=("example",),
           keep_going: bool = False) -> tuple[list[KernelReport], list[str]]:
    """Compile every combination; returns the reports and, with ``keep_going``, the compile errors (else raises)."""
    from .launch import planning_for

    rows, errors = [], []
    for shape in shapes:
        for dtype in dtypes:
            for layout in layouts:
                for arch in archs:
                    with planning_for(arch):  # the configs real launches on that GPU take
                        plans = example_plans(getattr(torch, dtype), LAYOUTS[layout], SHAPES[shape])
                    for name, launch in plans:
                        try:
                            compiled = compile_launch(launch, arch)
                        except Exception as error:
                            if not keep_going:
                                raise
                            errors.append(f"{name} {shape} sm_{arch} {dtype} {layout}: {type(error).__name__}: "
                                          f"{str(error).strip()[-600:]}")
                            continue
                        registers, local_bytes, stack_bytes = cubin_usage(compiled.asm["cubin"])
                        rows.append(KernelReport(
                            name, shape, arch, dtype, layout, block_pixels(launch.constexprs),
                            launch.constexprs.get("BLOCK_C", 1),  # the bin keys have no channels
                            launch.num_warps, registers, local_bytes, stack_bytes, compiled.metadata.shared,
                            *warp_spans(compiled.asm["ttgir"], launch.constexprs), atomic_ops(compiled.asm["ptx"]),
                        ))
    return rows, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "float16", "bfloat16", "float64"])
    parser.add_argument("--layout", nargs="+", default=["channels_last"], choices=sorted(LAYOUTS))
    parser.add_argument("--shape", nargs="+", default=["example"], choices=list(SHAPES),
                        help="argument shapes (see SHAPES); edge shapes exercise Triton's specialisation of 1s")
    parser.add_argument("--keep-going", action="store_true",
                        help="report compile errors at the end instead of stopping")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    parser.add_argument("--check-lanes", action="store_true",
                        help=f"exit {WRONG_LANES} if a kernel's warps do not run along the map's adjacent addresses "
                             "at the example shape (see warps_follow_the_layout)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("TRITON_INTERPRET=1 is set: the report compiles real kernels, run it with TRITON_INTERPRET=0",
              file=sys.stderr)
        return 2
    rows, errors = report(args.arch, args.dtype, args.layout, args.shape, keep_going=args.keep_going)
    if args.json:
        print(json.dumps([dataclasses.asdict(r) for r in rows]))
    else:
        header = (f"{'kernel':<26} {'shape':<8} {'sm':>3} {'dtype':<9} {'layout':<13} {'BLOCK_P':>7} {'BLOCK_C':>7} "
                  f"{'warps':>5} {'regs':>5} {'local (B)':>9} {'stack (B)':>9} {'smem (B)':>8} {'warp px x ch':>12}  "
                  "atomics (PTX)")
        print(header)
        for r in rows:
            print(f"{r.kernel:<26} {r.shape:<8} {r.arch:>3} {r.dtype:<9} {r.layout:<13} {r.block_p:>7} {r.block_c:>7} "
                  f"{r.num_warps:>5} {r.registers:>5} {r.local_bytes:>9} {r.stack_bytes:>9} {r.shared_bytes:>8} "
                  f"{f'{r.pixel_span} x {r.channel_span}':>12}  {r.atomics}")
    for error in errors:
        print("compile error:", error, file=sys.stderr)
    if errors:
        return 1
    if args.check_lanes:
        wrong = [r for r in rows if r.shape == "example" and not warps_follow_the_layout(r)]
        for r in wrong:
            print(f"lanes: {r.kernel} {r.dtype} {r.layout} sm_{r.arch}: a warp covers {r.pixel_span} pixels x "
                  f"{r.channel_span} channels", file=sys.stderr)
        if wrong:
            return WRONG_LANES
    # A stack frame at the register limit is spilled registers too (ptxas reports those as stack).
    spilled = [r for r in rows if r.local_bytes or r.stack_bytes]
    return SPILLED if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
