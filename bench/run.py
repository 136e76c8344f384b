"""The whole benchmark suite in one command: ``python -m bench``.

With a CUDA device: the copy bandwidth, the op microbenchmarks at the AlignSeg-R101 shapes (fp32 and
bf16, channels_last and contiguous), and the end-to-end training and inference throughput of
AlignSeg-R101, within a time budget that keeps the run under 10 minutes. Without one: the smoke mode
(tiny shapes, Triton under the CPU interpreter) that checks every provider computes the same numbers.
Results go to bench/results/ as CSV, JSON and a Markdown table; the summary table is printed last.
"""

from __future__ import annotations

import argparse
import sys
import time

from bench import common  # first: sets TRITON_INTERPRET=1 without a GPU
from bench import end_to_end, ops_bench
from bench.common import HAS_GPU, SMOKE_BANNER, format_table, log
from bench.shapes import MODES, SETTINGS, model_cases, smoke_cases

# Most important first, so a spent time budget drops the least important: channels_last is the
# layout the model trains in, bf16 the precision.
GPU_CONFIGS = (("bf16", "channels_last"), ("fp32", "channels_last"), ("bf16", "contiguous"), ("fp32", "contiguous"))
# Each dtype and each layout once: every extra configuration costs seconds in the interpreter.
SMOKE_CONFIGS = (("fp32", "contiguous"), ("bf16", "channels_last"))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--skip-ops", action="store_true", help="do not run the op microbenchmarks")
    parser.add_argument("--skip-e2e", action="store_true", help="do not run the end-to-end benchmarks")
    parser.add_argument("--settings", nargs="+", choices=[s[0] for s in SETTINGS], help="GPU: only these image settings")
    parser.add_argument("--dtypes", nargs="+", choices=list(ops_bench.DTYPES), help="only these dtypes")
    parser.add_argument("--layouts", nargs="+", choices=list(ops_bench.LAYOUTS), help="only these memory layouts")
    parser.add_argument("--providers", nargs="+", choices=ops_bench.PROVIDERS, default=list(ops_bench.PROVIDERS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--compile-backend", default=None,
        help="torch.compile backend of the 'compiled' provider and variants (default: inductor on a GPU, "
        "aot_eager in smoke mode: Inductor's C++ compile takes ~30 s per shape on a small CPU)",
    )
    parser.add_argument("--e2e-compile", action="store_true", help="smoke mode: also the compiled end-to-end variants (minutes on a CPU)")
    parser.add_argument("--ops-budget", type=float, default=270.0 if HAS_GPU else None,
                        help="seconds after which no new op configuration starts (GPU default 270; 0: no limit)")
    parser.add_argument("--e2e-budget", type=float, default=180.0 if HAS_GPU else None,
                        help="seconds after which no new end-to-end variant starts (GPU default 180; 0: no limit)")
    parser.add_argument("--rep-ms", type=float, default=50.0 if HAS_GPU else 0.0,
                        help="timed repetitions per point, in ms of run time (do_bench's rep; GPU default 50)")
    parser.add_argument("--no-write", action="store_true", help="print only; write nothing under bench/results/")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    no_limit = lambda budget: None if budget is None or budget <= 0 else budget  # noqa: E731
    start = time.perf_counter()
    info = common.run_info()
    compile_backend = args.compile_backend or ("inductor" if HAS_GPU else "aot_eager")
    if not HAS_GPU:
        log(SMOKE_BANNER)
    log(f"device: {info['device']} | torch {info['torch']} | triton {info['triton']} | commit {info['commit']}")

    copy_gbs = common.copy_bandwidth_gbs()
    log(f"device-to-device copy bandwidth, measured now: {copy_gbs:.0f} GB/s (bytes read + written)")
    info["copy_gbs"] = f"{copy_gbs:.1f}"

    op_rows, e2e_rows, skipped = [], [], []
    if not args.skip_ops:
        cases = model_cases() if HAS_GPU else smoke_cases()
        if args.settings:
            cases = [c for c in cases if c.setting in args.settings]
        configs = [
            (d, lay) for d, lay in (GPU_CONFIGS if HAS_GPU else SMOKE_CONFIGS)
            if (not args.dtypes or d in args.dtypes) and (not args.layouts or lay in args.layouts)
        ]
        op_rows, op_skipped = ops_bench.run_suite(
            cases, configs, providers=args.providers, modes=args.modes, compile_backend=compile_backend,
            copy_gbs=copy_gbs, budget_s=no_limit(args.ops_budget), rep_ms=args.rep_ms,
        )
        skipped += op_skipped
    if not args.skip_e2e:
        config = end_to_end.GPU_CONFIG if HAS_GPU else end_to_end.SMOKE_CONFIG
        variants = end_to_end.VARIANTS if HAS_GPU or args.e2e_compile else end_to_end.SMOKE_VARIANTS
        e2e_rows, e2e_skipped = end_to_end.run_suite(
            config, variants=variants, compile_backend=compile_backend, budget_s=no_limit(args.e2e_budget)
        )
        skipped += e2e_skipped

    op_table = ops_bench.summary_rows(op_rows)
    if not args.no_write:
        written = []
        if op_rows:
            written += common.write_results("ops", op_rows, info)
        if e2e_rows:
            written += common.write_results("e2e", e2e_rows, info)
        if written:
            summary = common.result_path("summary", info, ".md")
            summary.write_text(_markdown_report(info, op_table, e2e_rows, skipped))
            written.append(summary)
        for path in written:
            log(f"wrote {path.relative_to(common.REPO_ROOT)}")

    disagreements = [r for r in op_rows if r["agrees"] is False]
    print()
    if op_table:
        print(f"Ops: Triton kernels vs. baselines ('x name' = times faster than it; % copy = of {copy_gbs:.0f} GB/s measured copy bandwidth)")
        print(format_table(op_table, ops_bench.TABLE_COLUMNS))
        print()
    if e2e_rows:
        print("End to end")
        print(format_table(e2e_rows, end_to_end.TABLE_COLUMNS))
        print()
    if skipped:
        print(f"Not run (time budget spent): {len(skipped)}: " + "; ".join(skipped))
    print(f"{info['device']} | torch {info['torch']} | triton {info['triton']} | commit {info['commit']} | "
          f"{time.perf_counter() - start:.0f} s in all")
    if not HAS_GPU:
        print(SMOKE_BANNER)
    if disagreements:
        print(f"FAILED: {len(disagreements)} rows where a provider disagrees with the float64 reference (see 'all agree')")
        return 1
    print("Every compared provider agrees with the float64 reference (forward and gradients).")
    return 0


def _markdown_report(info: dict, op_table: list[dict], e2e_rows: list[dict], skipped: list[str]) -> str:
    lines = [
        f"Device: **{info['device']}**, torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, "
        f"commit {info['commit']}, {info['timestamp']}; measured copy bandwidth {info['copy_gbs']} GB/s.",
        "",
    ]
    if not HAS_GPU:
        lines += [f"**{SMOKE_BANNER}**", ""]
    if op_table:
        lines += [format_table(op_table, ops_bench.TABLE_COLUMNS, markdown=True), ""]
    if e2e_rows:
        lines += [format_table(e2e_rows, end_to_end.TABLE_COLUMNS, markdown=True), ""]
    if skipped:
        lines += ["Not run (time budget spent): " + "; ".join(skipped), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
