"""Device check of the deterministic backward (issue 12): bandwidth on minimum bytes, and bitwise reproducibility.

    python -m bench.deterministic_backward [--dtypes bf16 fp32] [--layouts channels_last contiguous]

On a GPU, at the issue's shapes (align_fa: N=8, C=256, 219x219 <- 110x110; align_cm: the stride-4 stress
shape of the Cityscapes crop, N=4, 219x219 <- 3x3), it times in one run: the copy bandwidth; today's
atomic align_fa backward kernel, and beside it the kernel and the fixed-point scatter with the exact form's
16 coarse taps a pixel instead of the merged 3x3 cells; the deterministic backward by the gathers (all three
gradients in one launch) and the source gradients by the fixed-point scatter (both AlignFA forms); the authors'
eager chain's backward (interpolate + two grid_sample); the custom op per backward path (contiguous maps staged
through channels_last, the staging copy itself timed beside PyTorch's); the AlignCM backward; and, for the first
dtype and layout, the gathers again at smaller offsets (the window scan they replaced slowed with the largest
offset; the bins' steps follow the fullest bin of a tile, which barely moves). It prints each time against
the bytes model of bench/README.md ("Backward: bytes moved"), issue 12's targets, and what the merged cells
gained; and it checks that two runs of every deterministic path are bitwise equal. Without a GPU: tiny shapes
under the interpreter, a smoke run whose timings mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

from alignseg.ops import use_backward
from bench.baselines import align_fa_authors
from bench.common import HAS_GPU, SMOKE_BANNER, copy_bandwidth_gbs, device, measure  # sets TRITON_INTERPRET

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
# align_fa at issue 12's shape (N, C, H, W, h, w); tiny under the interpreter.
FA_SHAPE = (8, 256, 219, 219, 110, 110) if HAS_GPU else (1, 4, 13, 11, 7, 6)


def fa_inputs(dtype: torch.dtype, fmt: torch.memory_format) -> tuple[torch.Tensor, ...]:
    """(low, high, offsets, grad) of align_fa at :data:`FA_SHAPE`: random features, offsets of 1.5·N(0, 1) px."""
    n, c, H, W, h, w = FA_SHAPE
    dev = device()
    low = torch.randn(n, c, H, W, device=dev, dtype=dtype).contiguous(memory_format=fmt)
    high = torch.randn(n, c, h, w, device=dev, dtype=dtype).contiguous(memory_format=fmt)
    offsets = (torch.randn(n, 4, H, W, device=dev) * 1.5).contiguous(memory_format=fmt)
    grad = torch.randn(n, c, H, W, device=dev, dtype=dtype).contiguous(memory_format=fmt)
    return low, high, offsets, grad


OFFSET_SCALES = (0.5, 0.2)  # offset scales (px) of the offset-sensitivity rows; the main rows use 1.5


def fa_bytes(e: int, n: int, c: int, H: int, W: int, h: int, w: int) -> dict[str, float]:
    """The bytes model of bench/README.md for align_fa's backward."""
    M, m, P = n * c * H * W, n * c * h * w, n * H * W
    today = (22 * M + 20 * m if e == 2 else 20 * M + 16 * m) + 32 * P
    # The fixed-point scatter of the sources: reads grad (eM) and two offset channels (8P); int64 sums and int32
    # flags zero-filled (12), read-modified-written (16) and read by the final pass (12), which writes e a cell;
    # the scale's pass over grad (abs, nan_to_num_, amax: 4e an element).
    fixed = e * M + 8 * P + (40 + e) * (M + m) + 4 * e * M
    # The gather path (align_fa_gather_backward_kernel): per map, the bins (the key pass reads two offset channels
    # and writes an int32 key, 12P; torch.sort of int32 keys with int64 indices, four radix passes over 12 bytes
    # read and written, about 104P with the index fill; the remainder and int32 cast of the order, 20P), then one
    # launch whose programs for a tile (the offsets' gradient, and low's and high's gather per channel block) are
    # adjacent, so they run together and read the same rows of grad and offsets: from memory once, the re-reads
    # from L2 (an assumption a GPU's dram counters check; without it grad is read 3 times, +2eM). The launch reads
    # grad, low, high, the offsets and each map's order (4P), and writes the three gradients once.
    gathers = e * (3 * M + 2 * m) + 32 * P + 2 * (12 + 104 + 20 + 4) * P
    return dict(minimum=e * (3 * M + 2 * m) + 32 * P, today=today, per_pixel=e * (2 * M + m) + 32 * P,
                gathers=gathers, fixed_point=fixed)


@contextlib.contextmanager
def sixteen_coarse_taps():
    """Plan the exact form's kernels with each pixel's 16 coarse taps, not the merged 3x3 cells
    (``alignseg.kernels.align_fa.merged_cells``): the kernels of runs 1-4, timed beside today's in one run."""
    from alignseg.kernels import align_fa

    merged_cells = align_fa.merged_cells
    align_fa.merged_cells = lambda low, high, upsample_first: False
    try:
        yield
    finally:
        align_fa.merged_cells = merged_cells


def run(dtype_names, layout_names) -> int:
    dev = device()
    cm_shape = (4, 256, 219, 219) if HAS_GPU else (1, 4, 13, 11)
    if not HAS_GPU:
        print(SMOKE_BANNER)
    bandwidth = copy_bandwidth_gbs()
    print(f"copy bandwidth: {bandwidth:.0f} GB/s on {torch.cuda.get_device_name() if HAS_GPU else 'CPU'}")
    from alignseg.kernels.align_cm import align_cm_backward
    from alignseg.kernels.align_fa import align_fa_backward, align_fa_sources_fixed_point
    from alignseg.kernels.align_fa_gather import align_fa_backward_deterministic

    failures = 0
    times: dict[tuple[str, str, str], float] = {}  # (dtype, layout, row) -> median ms
    minimum_bytes: dict[tuple[str, str], float] = {}  # (dtype, "align_fa" | "align_cm") -> bytes
    for dname in dtype_names:
        dtype = DTYPES[dname]
        e = torch.finfo(dtype).bits // 8
        for lname in layout_names:
            fmt = LAYOUTS[lname]
            n, c, H, W, h, w = FA_SHAPE
            low, high, offsets, grad = fa_inputs(dtype, fmt)
            model = fa_bytes(e, n, c, H, W, h, w)

            minimum_bytes[dname, "align_fa"] = model["minimum"]

            def report(name, fn, nbytes, minimum):
                median, p20, p80 = measure(fn)
                times[dname, lname, name] = median
                gbs = nbytes / (median * 1e-3) / 1e9
                print(f"{dname:5} {lname:13} {name:56} {median * 1e3:9.1f} us  [{p20 * 1e3:.1f}, {p80 * 1e3:.1f}]"
                      f"  model {nbytes / 1e6:8.1f} MB -> {gbs:7.0f} GB/s = {100 * gbs / bandwidth:5.1f} % copy"
                      f"  (on minimum bytes {100 * minimum / (median * 1e-3) / 1e9 / bandwidth:5.1f} %)")

            report(ATOMIC_ROW, lambda: align_fa_backward(grad, low, high, offsets), model["today"], model["minimum"])
            # The exact form's coarse taps merged into 3x3 cells (the default) against the 16 taps runs 1-4 measured.
            with sixteen_coarse_taps():
                report(ATOMIC_16_TAPS_ROW, lambda: align_fa_backward(grad, low, high, offsets), model["today"],
                       model["minimum"])
                report(FIXED_POINT_16_TAPS_ROW, lambda: align_fa_sources_fixed_point(grad, low, high, offsets),
                       model["fixed_point"], model["minimum"] - model["per_pixel"])
            # The two deterministic paths: the gathers write all three gradients in one launch; the fixed point the
            # source gradients (the per-pixel kernel adds the offsets' in the op).
            deterministic = (("gathers, all three gradients", align_fa_backward_deterministic, model["gathers"],
                              model["minimum"]),
                             ("fixed point grad_low+grad_high", align_fa_sources_fixed_point, model["fixed_point"],
                              model["minimum"] - model["per_pixel"]))
            for first in (True, False):
                for label, sources, nbytes, minimum in deterministic:
                    def fn(first=first, sources=sources):
                        return sources(grad, low, high, offsets, upsample_first=first)

                    report(f"{label} ({'upsample-first' if first else 'one-step'})", fn, nbytes, minimum)
                    a, b = fn(), fn()
                    if not all(torch.equal(x, y) for x, y in zip(a, b)):
                        print(f"  NOT BITWISE REPRODUCIBLE: {label}, upsample_first={first}")
                        failures += 1
            if dname == dtype_names[0] and lname == layout_names[0]:
                # The gathers' steps follow the fullest bin of a tile, not the largest offset (the window scan
                # before them took (2R + 2)^2 steps): the same pass at smaller offsets (the bytes do not change).
                for scale in OFFSET_SCALES:
                    small = offsets * (scale / 1.5)
                    report(f"gathers (upsample-first), offsets {scale}·N(0,1)",
                           lambda small=small: align_fa_backward_deterministic(grad, low, high, small),
                           model["gathers"], model["minimum"])
            if lname == "contiguous":
                # The staging of contiguous maps (launch.stage_channels_last): one map's copy into channels_last, by
                # the tiled kernel the ops use and by PyTorch's permuting copy, on the bytes it must move.
                from alignseg.kernels.relayout import to_channels_last

                report("staging copy of grad, tiled (relayout)", lambda: to_channels_last(grad), 2 * e * grad.numel(),
                       2 * e * grad.numel())
                report("staging copy of grad, PyTorch", lambda: grad.contiguous(memory_format=torch.channels_last),
                       2 * e * grad.numel(), 2 * e * grad.numel())
            # What the custom op runs per path, all three gradients: a contiguous map's kernels then run on
            # channels_last copies (launch.stage_channels_last), the copies included in the time.
            for path in ("atomic", "fixed_point", "gather"):
                def op(path=path):
                    with use_backward(path):
                        return torch.ops.alignseg.align_fa_backward(grad, low, high, offsets, True)

                report(op_row(path), op, model["minimum"], model["minimum"])
                if path != "atomic" and not all(torch.equal(x, y) for x, y in zip(op(), op())):
                    print(f"  NOT BITWISE REPRODUCIBLE: the op's {path} path")
                    failures += 1
            leaves = [t.detach().clone().requires_grad_(True) for t in (low, high, offsets)]
            out = align_fa_authors(leaves[0], leaves[1], leaves[2].to(dtype))
            report(AUTHORS_ROW, lambda: out.backward(grad, retain_graph=True),
                   model["today"], model["minimum"])

            n, c, H, W = cm_shape
            context = torch.randn(n, c, 3, 3, device=dev, dtype=dtype).contiguous(memory_format=fmt)
            cm_offsets = (torch.randn(n, 2, H, W, device=dev) * 1.5).contiguous(memory_format=fmt)
            cm_grad = torch.randn(n, c, H, W, device=dev, dtype=dtype).contiguous(memory_format=fmt)
            cm_min = e * (n * c * H * W + 2 * n * c * 9) + 16 * n * H * W
            minimum_bytes[dname, "align_cm"] = cm_min
            report("align_cm backward (deterministic)", lambda: align_cm_backward(cm_grad, context, cm_offsets),
                   cm_min, cm_min)
            report(CM_OP_ROW,
                   lambda: torch.ops.alignseg.align_cm_backward(cm_grad, context, cm_offsets), cm_min, cm_min)
            a, b = align_cm_backward(cm_grad, context, cm_offsets), align_cm_backward(cm_grad, context, cm_offsets)
            if not all(torch.equal(x, y) for x, y in zip(a, b)):
                print("  NOT BITWISE REPRODUCIBLE: align_cm backward")
                failures += 1
    print_targets(times, minimum_bytes, bandwidth)
    print("bitwise reproducible: all" if not failures else f"{failures} paths not reproducible")
    return 1 if failures else 0


AUTHORS_ROW = "authors' chain backward (grid_sample)"
ATOMIC_ROW = "align_fa backward, today (atomic)"
ATOMIC_16_TAPS_ROW = "align_fa backward, 16 taps (atomic)"
FIXED_POINT_ROW = "fixed point grad_low+grad_high (upsample-first)"
FIXED_POINT_16_TAPS_ROW = "fixed point grad_low+grad_high (16 taps)"
CM_OP_ROW = "align_cm op backward (deterministic)"


def op_row(path: str) -> str:
    return f"op backward, {path} path (upsample-first)"


def print_targets(times: dict, minimum_bytes: dict, bandwidth: float) -> None:
    """Issue 12's targets, read off the rows above for each dtype measured (a target whose rows were not run is
    left out): what the op gives a user, channels_last unless it says otherwise."""
    def percent_of_copy(nbytes, ms):
        return 100 * nbytes / (ms * 1e-3) / 1e9 / bandwidth

    for dname in dict.fromkeys(d for d, _, _ in times):
        atomic, fixed = times.get((dname, "channels_last", op_row("atomic"))), times.get(
            (dname, "channels_last", op_row("fixed_point")))
        authors, cm = times.get((dname, "channels_last", AUTHORS_ROW)), times.get((dname, "channels_last", CM_OP_ROW))
        contiguous = times.get((dname, "contiguous", op_row("atomic")))
        rows = []
        if atomic:
            rows.append(("align_fa backward on minimum bytes, % of copy", percent_of_copy(
                minimum_bytes[dname, "align_fa"], atomic), ">= 60"))
        if atomic and authors:
            rows.append(("align_fa backward, x the authors' chain", authors / atomic, ">= 3"))
        gather = times.get((dname, "channels_last", op_row("gather")))
        if atomic and gather:
            rows.append(("deterministic mode (the gathers), x the atomic path", gather / atomic, "<= 1.15"))
        if atomic and fixed:
            rows.append(("the fixed-point path, x the atomic path", fixed / atomic, "<= 1.15"))
        if cm:
            rows.append(("align_cm backward on minimum bytes, % of copy", percent_of_copy(
                minimum_bytes[dname, "align_cm"], cm), ">= 50"))
        if atomic and contiguous:
            rows.append(("contiguous maps, x channels_last (atomic path)", contiguous / atomic, "<= 1.5"))
        for what, value, target in rows:
            print(f"target {dname:5} {what:54} {value:7.2f}  (issue 12: {target})")
        for layout in LAYOUTS:  # not a target: what merging the exact form's coarse taps gained
            for merged, taps in ((ATOMIC_ROW, ATOMIC_16_TAPS_ROW), (FIXED_POINT_ROW, FIXED_POINT_16_TAPS_ROW)):
                if times.get((dname, layout, merged)) and times.get((dname, layout, taps)):
                    ratio = times[dname, layout, taps] / times[dname, layout, merged]
                    print(f"merged {dname:5} {layout:13} {merged:40} {ratio:5.2f}x faster than the 16 taps")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    parser.add_argument("--layouts", nargs="+", default=["channels_last", "contiguous"], choices=sorted(LAYOUTS))
    args = parser.parse_args(argv)
    return run(args.dtypes, args.layouts)


if __name__ == "__main__":
    raise SystemExit(main())
