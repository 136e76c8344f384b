"""The whole benchmark suite in one command: ``python -m bench``.

With a CUDA device: the copy bandwidth, the op microbenchmarks at the AlignSeg-R101 shapes (fp32 and
bf16, channels_last and contiguous), and the end-to-end training and inference throughput of
AlignSeg-R101, under one hard deadline (default 9 minutes). Without one: the smoke mode (tiny shapes,
Triton under the CPU interpreter) that checks every provider computes the same numbers.

How the deadline holds: each suite (ops, then end to end) runs in a child process of its own, in its
own process group, killed at its deadline with everything it started (Inductor's compile workers
too). A cold Inductor compile can take minutes and cannot be interrupted from inside Python, so only
a process boundary makes the deadline hard. Each row is appended to ``<suite>.csv`` and
``<suite>.jsonl`` (flushed) as soon as it is measured, so a killed suite keeps every row it measured,
and this process writes the summary from those files afterwards. Inside the ops suite, the
``compiled`` provider is also left out of a configuration when the time left is below 1.5 times the
longest configuration that compiled so far (90 s before the first is measured): a compile that
could not finish would only waste the time of the Triton rows.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from pathlib import Path

from bench import (
    common,  # first: sets TRITON_INTERPRET=1 without a GPU
    end_to_end,
    ops_bench,
)
from bench.common import HAS_GPU, SMOKE_BANNER, format_table, log
from bench.shapes import MODES, SETTINGS, OpCase, model_cases, smoke_cases

# The order of the (dtype, layout) configurations within each shape: channels_last is the layout
# the model trains in, bf16 its precision.
GPU_CONFIGS = (("bf16", "channels_last"), ("fp32", "channels_last"), ("bf16", "contiguous"), ("fp32", "contiguous"))
# Each dtype and each layout once: every extra configuration costs seconds in the interpreter.
SMOKE_CONFIGS = (("fp32", "contiguous"), ("bf16", "channels_last"))
# End to end: the eager variants first (seconds each), then the compiled ones (a cold Inductor
# compile of R101 takes minutes): a deadline then cuts a compile, never the cheap comparisons.
E2E_PLAN = tuple(
    (task, variant)
    for group in (("eager",), ("compiled",))
    for task in ("train", "infer")
    for variant in (("eager", "reference"), ("eager", "triton"), ("compiled", "reference"), ("compiled", "triton"))
    if variant[0] in group
)
GPU_DEADLINE_S = 540.0
FIRST_COMPILE_ESTIMATE_S = 90.0 if HAS_GPU else 30.0
# The summary table: the ops table with the CUDA-graph time beside the eager-call time.
TABLE_COLUMNS = tuple(
    col for c in ops_bench.TABLE_COLUMNS for col in ((c, ("graph ms", "ms_cudagraph", ".4f")) if c[1] == "ms" else (c,))
)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="write ops.csv/.jsonl, e2e.csv/.jsonl and summary.md into this folder "
                        "(default: time-stamped files under bench/results/); existing files are never overwritten")
    parser.add_argument("--deadline", type=float, default=GPU_DEADLINE_S if HAS_GPU else 0.0,
                        help="hard limit in seconds for the whole run: a suite still running then is killed and "
                        f"keeps the rows it wrote (GPU default {GPU_DEADLINE_S:.0f}; 0: no limit)")
    parser.add_argument("--skip-ops", action="store_true", help="do not run the op microbenchmarks")
    parser.add_argument("--skip-e2e", action="store_true", help="do not run the end-to-end benchmarks")
    parser.add_argument("--skip-cpu-paths", action="store_true",
                        help="smoke mode: do not time the ops' two eager CPU paths (bench.cpu_paths, ~30 s)")
    parser.add_argument(
        "--settings", nargs="+", choices=[s[0] for s in SETTINGS], help="GPU: only these image settings"
    )
    parser.add_argument("--dtypes", nargs="+", choices=list(ops_bench.DTYPES), help="only these dtypes")
    parser.add_argument("--layouts", nargs="+", choices=list(ops_bench.LAYOUTS), help="only these memory layouts")
    parser.add_argument("--providers", nargs="+", choices=ops_bench.PROVIDERS, default=list(ops_bench.PROVIDERS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--compile-backend", default=None,
        help="torch.compile backend of the 'compiled' provider and variants (default: inductor on a GPU, "
        "aot_eager in smoke mode: Inductor's C++ compile takes ~30 s per shape on a small CPU)",
    )
    parser.add_argument("--e2e-compile", action="store_true",
                        help="smoke mode: also the compiled end-to-end variants (minutes on a CPU)")
    parser.add_argument("--ops-budget", type=float, default=300.0 if HAS_GPU else None,
                        help="hard limit in seconds for the op suite, within the deadline "
                        "(GPU default 300; 0: no limit)")
    parser.add_argument("--e2e-budget", type=float, default=None,
                        help="hard limit in seconds for the end-to-end suite, within the deadline (default: the rest)")
    parser.add_argument("--rep-ms", type=float, default=50.0 if HAS_GPU else 0.0,
                        help="timed repetitions per point, in ms of run time (do_bench's rep; GPU default 50)")
    parser.add_argument("--no-write", action="store_true", help="print only: the rows go to a temporary folder")
    # Internal: how this command runs each suite in a child process.
    parser.add_argument("--worker", choices=("ops", "e2e"), help=argparse.SUPPRESS)
    parser.add_argument("--prefix", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--until", type=float, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _limit(seconds: float | None) -> float:
    return math.inf if seconds is None or seconds <= 0 else seconds


# ----------------------------------------------------------------------------------------------
# What runs, in which order.


def ops_plan(args: argparse.Namespace) -> list[tuple[OpCase, str, str]]:
    """Breadth-first: the first (most important) shape in every (dtype, layout), then the next shape.

    So a deadline cuts the least important shapes of every configuration, never a whole configuration
    (fp32 channels_last used to come after fifteen bf16 points).
    """
    cases = model_cases() if HAS_GPU else smoke_cases()
    if args.settings:
        cases = [c for c in cases if c.setting in args.settings]
    configs = [
        (d, lay) for d, lay in (GPU_CONFIGS if HAS_GPU else SMOKE_CONFIGS)
        if (not args.dtypes or d in args.dtypes) and (not args.layouts or lay in args.layouts)
    ]
    return breadth_first(cases, configs)


def breadth_first(cases: list[OpCase], configs: list[tuple[str, str]]) -> list[tuple[OpCase, str, str]]:
    """Every configuration of the first case, then of the next: the outer loop is the shape."""
    return [(case, d, lay) for case in cases for d, lay in configs]


def e2e_plan(args: argparse.Namespace) -> list[tuple[str, tuple[str, str]]]:
    if HAS_GPU or args.e2e_compile:
        return list(E2E_PLAN)
    return [(task, variant) for task, variant in E2E_PLAN if variant in end_to_end.SMOKE_VARIANTS]


def _config_key(op: str, label: str, dtype: str, layout: str) -> str:
    return f"{op} {label} {dtype} {layout}"


# ----------------------------------------------------------------------------------------------
# The suites, each in its own process (``--worker``).


def _ops_worker(args: argparse.Namespace, compile_backend: str) -> int:
    info = common.run_info()
    copy_gbs = common.copy_bandwidth_gbs()
    log(f"device-to-device copy bandwidth, measured now: {copy_gbs:.0f} GB/s (bytes read + written)")
    info["copy_gbs"] = f"{copy_gbs:.1f}"
    writer = common.RowWriter(args.prefix, info)
    until = args.until if args.until is not None else math.inf
    compile_estimate = FIRST_COMPILE_ESTIMATE_S
    plan = ops_plan(args)
    failures = 0
    for i, (case, dtype_name, layout_name) in enumerate(plan, 1):
        providers = list(args.providers)
        left = until - time.time()
        if "compiled" in providers and left < compile_estimate:
            providers.remove("compiled")
            log(f"  {left:.0f} s left < {compile_estimate:.0f} s estimated for a compile: no 'compiled' provider")
        log(f"ops {i}/{len(plan)}: {case.op} {case.label} [{case.shape_text}] {dtype_name} {layout_name}")
        started = time.perf_counter()
        try:
            rows = ops_bench.bench_config(
                case, dtype_name, layout_name, providers=providers, modes=args.modes, compile_backend=compile_backend,
                copy_gbs=copy_gbs, rep_ms=args.rep_ms, on_row=writer.write,
            )
        except Exception as error:  # noqa: BLE001  (one failing configuration must not hide the others)
            failures += 1
            log(f"  ERROR: {type(error).__name__}: {error}\n{traceback.format_exc()}")
            writer.write({"op": case.op, "case": case.label, "shape": case.shape_text, "dtype": dtype_name,
                          "layout": layout_name, "error": f"{type(error).__name__}: {error}"[:2000]}, to_csv=False)
            if HAS_GPU:
                import torch

                torch.cuda.empty_cache()
            continue
        if "compiled" in providers:
            compile_estimate = max(compile_estimate if i > 1 else 0.0, 1.5 * (time.perf_counter() - started))
        for row in rows:
            if row["agrees"] is False:
                log(
                    f"  DISAGREES: {row['provider']} {row['mode']}: {row['check_note']} "
                    f"(max rel err {row['max_rel_err']:.2e})"
                )
    return 1 if failures else 0


def _e2e_worker(args: argparse.Namespace, compile_backend: str) -> int:
    import torch

    from alignseg.models import build

    writer = common.RowWriter(args.prefix, common.run_info())
    config = end_to_end.GPU_CONFIG if HAS_GPU else end_to_end.SMOKE_CONFIG
    torch.manual_seed(0)  # as end_to_end.run_suite: the same initial weights in every variant
    model = build(config.preset, config.num_classes)
    failures = 0
    for task, (execution, ops_backend) in e2e_plan(args):
        log(f"end-to-end: {task} {config.preset} {execution} + {ops_backend} ops"
            f" (warm-up{' and compile' if execution == 'compiled' else ''} first)")
        try:
            row = end_to_end.run_variant(model, config, task, execution, ops_backend, compile_backend)
        except Exception as error:  # noqa: BLE001
            failures += 1
            log(f"  ERROR: {type(error).__name__}: {error}\n{traceback.format_exc()}")
            writer.write({"task": task, "execution": execution, "ops": ops_backend,
                          "error": f"{type(error).__name__}: {error}"[:2000]}, to_csv=False)
            continue
        log(f"  {row['images_per_s']:.2f} images/s, warm-up {row['warmup_s']:.1f} s")
        writer.write(row)
    return 1 if failures else 0


# ----------------------------------------------------------------------------------------------
# The command: run the suites as children under the deadline, then summarise their files.


def output_paths(out: Path | None, info: dict[str, str]) -> dict[str, Path]:
    """Where the rows (prefixes, without suffix) and the summary go."""
    if out is not None:
        return {"ops": out / "ops", "e2e": out / "e2e", "summary": out / "summary.md"}
    return {
        "ops": common.result_path("ops", info, ""),
        "e2e": common.result_path("e2e", info, ""),
        "summary": common.result_path("summary", info, ".md"),
    }


def run_suites(args: argparse.Namespace, argv: list[str], paths: dict[str, Path], until: float,
               log_file=None) -> dict[str, str]:
    """Run the ops and end-to-end suites as child processes, each killed at its hard deadline.

    Returns each suite's outcome: "done", "failed (exit N)", or "cut at the deadline".
    """
    outcome = {}
    budgets = {"ops": _limit(args.ops_budget), "e2e": _limit(args.e2e_budget)}
    for suite in ("ops", "e2e"):
        if getattr(args, f"skip_{suite}"):
            continue
        suite_until = min(until, time.time() + budgets[suite])
        if suite_until - time.time() < 5:
            outcome[suite] = "not started (no time left)"
            continue
        command = [sys.executable, "-m", "bench", *argv, "--worker", suite, "--prefix", str(paths[suite])]
        if math.isfinite(suite_until):
            command += ["--until", f"{suite_until:.3f}"]
        log(f"{suite}: child process, hard limit "
            + (f"{suite_until - time.time():.0f} s" if math.isfinite(suite_until) else "none"))
        status, killed = common.run_until(
            command, suite_until if math.isfinite(suite_until) else None, log_file=log_file
        )
        outcome[suite] = "cut at the deadline" if killed else ("done" if status == 0 else f"failed (exit {status})")
        log(f"{suite}: {outcome[suite]}")
    return outcome


def summarize(args: argparse.Namespace, paths: dict[str, Path], info: dict[str, str], outcome: dict[str, str]) -> dict:
    """Read back the suites' rows; the summary tables, what was not run, and what failed."""
    op_rows = [r for r in common.read_rows(common.with_suffix(paths["ops"], ".jsonl")) if "error" not in r]
    op_errors = [r for r in common.read_rows(common.with_suffix(paths["ops"], ".jsonl")) if "error" in r]
    e2e_rows = [r for r in common.read_rows(common.with_suffix(paths["e2e"], ".jsonl")) if "error" not in r]
    e2e_errors = [r for r in common.read_rows(common.with_suffix(paths["e2e"], ".jsonl")) if "error" in r]
    groups: dict[str, list[dict]] = {}
    for row in op_rows:
        groups.setdefault(_config_key(row["op"], row["case"], row["dtype"], row["layout"]), []).append(row)
    for rows in groups.values():
        ops_bench._add_speedups(rows)
    baseline = {r["task"]: r for r in e2e_rows if r["execution"] == "eager" and r["ops"] == "reference"}
    for row in e2e_rows:
        base = baseline.get(row["task"])
        row["x_vs_eager_reference"] = row["images_per_s"] / base["images_per_s"] if base else None
    not_run = []
    if not args.skip_ops:
        for case, d, lay in ops_plan(args):
            key = _config_key(case.op, case.label, d, lay)
            measured = {r["provider"].split("(")[0] for r in groups.get(key, [])}
            if not measured and not any(
                _config_key(e["op"], e["case"], e["dtype"], e["layout"]) == key for e in op_errors
            ):
                not_run.append(key)
            elif measured and "compiled" in args.providers and "compiled" not in measured:
                not_run.append(f"{key}: compiled provider")
    if not args.skip_e2e:
        done = {(r["task"], r["execution"].split("(")[0], r["ops"]) for r in e2e_rows + e2e_errors}
        not_run += [f"{t} {ex} + {ops} ops" for t, (ex, ops) in e2e_plan(args) if (t, ex, ops) not in done]
    copy_gbs = next((r.get("copy_gbs") for r in op_rows), None)
    return {
        "op_table": ops_bench.summary_rows(op_rows),
        "e2e_rows": e2e_rows,
        "errors": [f"{r.get('op') or r.get('task')} {r.get('case') or r.get('execution')} "
                   f"{r.get('dtype') or r.get('ops')} {r.get('layout', '')}: {r['error'].splitlines()[0]}"
                   for r in op_errors + e2e_errors],
        "not_run": not_run,
        "disagreements": [r for r in op_rows if r["agrees"] is False],
        "copy_gbs": copy_gbs,
        "outcome": outcome,
        "info": info,
    }


def markdown_report(summary: dict) -> str:
    info = summary["info"]
    lines = [
        f"Device: **{info['device']}**, torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, "
        f"commit {info['commit']}, {info['timestamp']}; measured copy bandwidth {summary['copy_gbs'] or '-'} GB/s.",
        "",
        "Suites: " + (", ".join(f"{k} {v}" for k, v in summary["outcome"].items()) or "none run"),
        "",
    ]
    if not HAS_GPU:
        lines += [f"**{SMOKE_BANNER}**", ""]
    if summary["op_table"]:
        lines += [format_table(summary["op_table"], TABLE_COLUMNS, markdown=True), ""]
    if summary["e2e_rows"]:
        lines += [format_table(summary["e2e_rows"], end_to_end.TABLE_COLUMNS, markdown=True), ""]
    if summary["errors"]:
        lines += ["Errors:", *(f"- {e}" for e in summary["errors"]), ""]
    if summary["not_run"]:
        lines += [f"Not run (deadline): {len(summary['not_run'])}: " + "; ".join(summary["not_run"]), ""]
    return "\n".join(lines)


def print_report(summary: dict) -> None:
    info = summary["info"]
    print()
    if summary["op_table"]:
        print(f"Ops: Triton kernels vs. baselines ('x name' = times faster than it; % copy = of "
              f"{summary['copy_gbs'] or '-'} GB/s measured copy bandwidth; graph ms = replayed from a CUDA graph)")
        print(format_table(summary["op_table"], TABLE_COLUMNS))
        print()
    if summary["e2e_rows"]:
        print("End to end")
        print(format_table(summary["e2e_rows"], end_to_end.TABLE_COLUMNS))
        print()
    for error in summary["errors"]:
        print(f"ERROR: {error}")
    if summary["not_run"]:
        print(f"Not run (deadline): {len(summary['not_run'])}: " + "; ".join(summary["not_run"]))
    print(f"{info['device']} | torch {info['torch']} | triton {info['triton']} | commit {info['commit']}")
    if not HAS_GPU:
        print(SMOKE_BANNER)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    compile_backend = args.compile_backend or ("inductor" if HAS_GPU else "aot_eager")
    if args.worker:
        return (_ops_worker if args.worker == "ops" else _e2e_worker)(args, compile_backend)

    start = time.time()
    until = start + _limit(args.deadline)
    info = common.run_info()
    if not HAS_GPU:
        log(SMOKE_BANNER)
    log(f"device: {info['device']} | torch {info['torch']} | triton {info['triton']} | commit {info['commit']}")
    if args.no_write:
        import tempfile

        args.out = Path(tempfile.mkdtemp(prefix="bench-"))
    paths = output_paths(args.out, info)
    for path in [
        paths["summary"], *(common.with_suffix(paths[s], x) for s in ("ops", "e2e") for x in (".csv", ".jsonl"))
    ]:
        if path.exists():
            raise SystemExit(f"{path} already exists: choose another --out folder (results are never overwritten)")
    outcome = run_suites(args, argv, paths, until)
    summary = summarize(args, paths, info, outcome)
    written = [
        p
        for s in ("ops", "e2e")
        for p in (common.with_suffix(paths[s], ".csv"), common.with_suffix(paths[s], ".jsonl"))
        if p.exists()
    ]
    if not args.no_write:
        paths["summary"].write_text(markdown_report(summary))
        written.append(paths["summary"])
        for path in written:
            log(f"wrote {path}")
    print_report(summary)
    if not HAS_GPU and not args.skip_cpu_paths:
        # Without a GPU `auto` runs an eager path: how much faster it is than the gather oracle, on this CPU.
        import torch

        from bench import cpu_paths

        table = cpu_paths.format_table(cpu_paths.time_cpu_paths(repeats=3))
        print(
            "\nThe ops' CPU paths (what `auto` runs without a GPU), best of 3, "
            f"{torch.get_num_threads()} torch threads:"
        )
        print(table)
        if not args.no_write:
            with paths["summary"].open("a") as f:
                f.write(f"\n## CPU paths (best of 3)\n\n```\n{table}\n```\n")
    print(f"{time.time() - start:.0f} s in all")
    failed = [k for k, v in outcome.items() if v.startswith("failed")]
    if summary["disagreements"]:
        print(
            f"FAILED: {len(summary['disagreements'])} rows where a provider disagrees with the float64 reference "
            "(see 'all agree')"
        )
        return 1
    if failed or summary["errors"]:
        print(f"FAILED: errors in {', '.join(failed) or 'some configurations'} (listed above)")
        return 1
    print("Every compared provider agrees with the float64 reference (forward and gradients).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
