"""The device check: everything a first GPU must show, in one command under one hard deadline.

``bash bench/device_check.sh OUTDIR [--deadline SECONDS] [--smoke]`` (or ``python -m bench.device_check``
with ``PYTHONPATH`` set to the checkout) runs, in this order, each phase in a child process killed at
its limit:

1. the device and versions (GPU, torch, triton, CUDA, Python, commit, ``nvidia-smi``);
2. the agreement check: both ops on the Triton backend against the eager reference evaluated in
   float64, forward and every gradient, at the AlignSeg-R101 shapes, fp32 and bf16, channels_last and
   contiguous (the most important shape of every configuration first);
3. the GPU-marked tests (``pytest -m gpu``);
4. the deterministic backward timed against its bytes model, and two runs compared bitwise
   (``python -m bench.deterministic_backward``; its table goes to device_check.log);
5. the benchmark suite (``python -m bench``: its ops and end-to-end suites, each a child of its own).

Everything goes into OUTDIR (at most eight files): ``summary.md`` (rewritten after every phase, so a
run killed from outside still leaves the last one), ``device_check.log`` (all output),
``agreement.jsonl``, ``gpu_tests.txt``, ``ops.csv``/``ops.jsonl``, ``e2e.csv``/``e2e.jsonl``; every
row is appended and flushed as soon as it is measured. Exit status: 0 when every agreement check
ran and passed, 1 when an agreement check (here or in the benchmark) failed, 2 when they passed but
something else did not (the GPU tests, a phase that crashed, agreement checks the deadline cut).

``--smoke`` hides any GPU (``CUDA_VISIBLE_DEVICES=``) and runs the same phases on the CPU: tiny
shapes, Triton under the interpreter; it shows that the machinery works, not that the kernels do.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

from bench import common  # first: sets TRITON_INTERPRET=1 without a GPU
from bench.common import HAS_GPU, log

DEFAULT_DEADLINE_S = 520.0  # under 9 minutes, with room for the process start and the copy-back
SMOKE_DEADLINE_S = 600.0
AGREEMENT_LIMIT_S = 120.0  # on a GPU: the phase's own hard limit, within the deadline
TESTS_LIMIT_S = 180.0
DETERMINISTIC_LIMIT_S = 120.0  # bench.deterministic_backward: 28 s on an H200 (run 3, compiles cached); more rows since
SUMMARY_RESERVE_S = 10.0  # kept back at the end for reading the rows and writing the summary
OPS_SHARE = 0.6  # of the benchmark's time, for the op suite; the end-to-end suite gets the rest
FILES = (
    "summary.md", "device_check.log", "agreement.jsonl", "gpu_tests.txt", "ops.csv", "ops.jsonl", "e2e.csv", "e2e.jsonl"
)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/device_check.sh", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output folder (created; must be empty if it exists)")
    parser.add_argument("--deadline", type=float, default=None,
                        help=f"hard limit in seconds for the whole run (default {DEFAULT_DEADLINE_S:.0f}; "
                        f"smoke {SMOKE_DEADLINE_S:.0f})")
    parser.add_argument("--smoke", action="store_true", help="CPU only: tiny shapes, Triton under the interpreter")
    parser.add_argument("--phase", choices=("agreement",), help=argparse.SUPPRESS)  # internal: one phase's child
    parser.add_argument("--until", type=float, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# Phase 1: device and versions.


def environment() -> dict[str, str]:
    import torch

    env = dict(common.run_info())
    env["python"] = platform.python_version()
    env["platform"] = platform.platform()
    env["smoke"] = "yes" if not HAS_GPU else "no"
    if HAS_GPU:
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = (
            f"{props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.1f} GiB, "
            f"sm_{props.major}{props.minor}"
        )
        env["cudnn"] = str(torch.backends.cudnn.version())
    try:  # how this Triton's kernels tile a contiguous map (alignseg.kernels.launch.pixels_last)
        from alignseg.kernels.launch import FIRST_AXIS_WINS_TIES

        env["contiguous_map_tiles"] = "[pixels, channels]" if FIRST_AXIS_WINS_TIES else "[channels, pixels]"
    except ImportError:
        env["contiguous_map_tiles"] = "triton not installed"
    try:
        smi = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
        env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        env["nvidia_smi"] = f"not available ({type(error).__name__})"
    return env


# ----------------------------------------------------------------------------------------------
# Phase 2: the agreement check (runs in its own process: ``--phase agreement``).


def agreement_plan():
    """(case, dtype, layout), breadth-first: every configuration's most important shape first."""
    from bench.run import GPU_CONFIGS, breadth_first
    from bench.shapes import OpCase, model_cases, smoke_cases

    if HAS_GPU:
        cases = model_cases()
    else:  # tiny shapes, one with fractional scales and sizes off every block multiple
        cases = smoke_cases() + [OpCase("align_fa", "smoke", "fa odd", 1, 5, (11, 17), (6, 7))]
    return breadth_first(cases, GPU_CONFIGS)


def agreement_phase(out: Path) -> int:
    """Check the Triton ops against the float64 eager reference; one row per (case, dtype, layout)."""
    from bench.ops_bench import (
        _PUBLIC,
        _REFERENCE,
        DTYPES,
        LAYOUTS,
        TOLERANCE,
        OpInputs,
        _on_triton,
        _relative_error,
        forward_backward,
        make_inputs,
    )

    writer = common.RowWriter(out / "agreement", common.run_info(), csv=False)
    failed = 0
    plan = agreement_plan()
    for i, (case, dtype_name, layout_name) in enumerate(plan, 1):
        started = time.perf_counter()
        row = {"op": case.op, "case": case.label, "shape": case.shape_text, "dtype": dtype_name, "layout": layout_name}
        try:
            dtype = DTYPES[dtype_name]
            inputs = make_inputs(case, dtype, LAYOUTS[layout_name], common.device(), seed=i)
            exact = OpInputs(
                [a.detach().double().requires_grad_() for a in inputs.args], inputs.grad_out.double(), inputs.names
            )
            names = ["out"] + [f"grad_{n}" for n in inputs.names]
            oracle = dict(zip(names, (lambda o, g: [o, *g])(*forward_backward(_REFERENCE[case.op], exact))))

            def errors(fn) -> dict[str, float]:
                out_, grads = forward_backward(fn, inputs)
                return {n: _relative_error(x, oracle[n]) for n, x in zip(names, [out_, *grads])}

            reference = errors(_REFERENCE[case.op])
            triton = errors(_on_triton(_PUBLIC[case.op]))
            allowed = max(TOLERANCE[dtype], 3 * max(reference.values()))
            ok = all(math.isfinite(e) and e <= allowed for e in triton.values())
            row.update(ok=ok, allowed=allowed, triton_errors=triton, reference_errors=reference,
                       worst=max(triton, key=triton.get))
        except Exception as error:  # noqa: BLE001  (a crash is a failed check, and the others still run)
            row.update(ok=False, error=f"{type(error).__name__}: {error}"[:2000])
            log(traceback.format_exc())
            if HAS_GPU:
                import torch

                torch.cuda.empty_cache()
        row["seconds"] = time.perf_counter() - started
        writer.write(row)
        failed += not row["ok"]
        worst = (
            f"worst {row['worst']} {row['triton_errors'][row['worst']]:.1e} <= {row['allowed']:.1e}"
            if "worst" in row
            else row.get("error", "")
        )
        log(f"agreement {i}/{len(plan)} {'ok  ' if row['ok'] else 'FAIL'} {case.op} {case.label} {dtype_name} "
            f"{layout_name}: {worst} ({row['seconds']:.1f} s)")
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------
# The driver.


class Run:
    """The driver's state: the output folder, the log, each phase's outcome, and the summary file."""

    def __init__(self, out: Path, until: float, smoke: bool):
        self.out, self.until, self.smoke = out, until, smoke
        self.start = time.time()
        self.log_file = (out / "device_check.log").open("a", buffering=1)
        self.env: dict[str, str] = {}
        self.phases: list[tuple[str, str, float]] = []  # (phase, outcome, seconds)
        self.bench_summary: dict | None = None

    def say(self, message: str) -> None:
        line = f"[device-check {time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        self.log_file.write(line + "\n")

    def left(self) -> float:
        return self.until - time.time()

    def child(self, name: str, command: list[str], limit_s: float, output=None) -> str:
        """Run one phase's child process until ``limit_s`` from now (or the deadline); its outcome."""
        until = min(self.until - SUMMARY_RESERVE_S, time.time() + limit_s)
        started = time.time()
        if until - started < 5:
            outcome = "not run (deadline)"
        else:
            self.say(f"{name}: hard limit {until - started:.0f} s")
            self.log_file.flush()
            status, killed = common.run_until(command, until, log_file=output or self.log_file)
            outcome = "cut at its limit" if killed else ("passed" if status == 0 else f"failed (exit {status})")
        self.phases.append((name, outcome, time.time() - started))
        self.say(f"{name}: {outcome} ({time.time() - started:.0f} s)")
        return outcome

    def agreement_rows(self) -> list[dict]:
        return common.read_rows(self.out / "agreement.jsonl")

    def exit_status(self) -> int:
        rows = self.agreement_rows()
        failed = [r for r in rows if not r["ok"]]
        if failed or (self.bench_summary and self.bench_summary["disagreements"]):
            return 1
        # A benchmark or a test run cut at its limit is expected on a short lease; a failure is not.
        if len(rows) < len(agreement_plan()) or any(o.startswith("failed") or "errors" in o for _, o, _ in self.phases):
            return 2
        return 0

    def write_summary(self, state: str) -> None:
        """summary.md: rewritten after each phase (``state`` says how far the run got)."""
        from bench import run as bench_run
        from bench.common import format_table

        lines = [
            f"# Device check: {state}",
            "",
            f"{self.env.get('device', '?')} | torch {self.env.get('torch', '?')} | "
            f"triton {self.env.get('triton', '?')} | "
            f"CUDA {self.env.get('cuda', '?')} | Python {self.env.get('python', '?')} | "
            f"commit {self.env.get('commit', '?')} | "
            f"started {self.env.get('timestamp', '?')} | {time.time() - self.start:.0f} s so far",
            "",
        ]
        if self.smoke:
            lines += [f"**{common.SMOKE_BANNER}**", ""]
        lines += ["```", json.dumps(self.env, indent=1), "```", "", "| phase | outcome | seconds |", "|---|---|--:|"]
        lines += [f"| {name} | {outcome} | {seconds:.0f} |" for name, outcome, seconds in self.phases]
        rows = self.agreement_rows()
        planned = len(agreement_plan())
        lines += ["", f"## Agreement with the float64 eager reference ({len(rows)} of {planned} checks ran, "
                  f"{sum(not r['ok'] for r in rows)} failed)", ""]
        table = [{**r, "ok": "yes" if r["ok"] else "NO",
                  "worst_err": r["triton_errors"][r["worst"]] if "worst" in r else None,
                  "ref_err": max(r["reference_errors"].values()) if "reference_errors" in r else None,
                  "worst": r.get("worst") or r.get("error", "")} for r in rows]
        columns = (("op", "op", ""), ("case", "case", ""), ("shape", "shape", ""), ("dtype", "dtype", ""),
                   ("layout", "layout", ""), ("ok", "ok", ""), ("worst tensor", "worst", ""),
                   ("its rel. error", "worst_err", ".1e"), ("allowed", "allowed", ".1e"),
                   ("eager ref. error", "ref_err", ".1e"), ("s", "seconds", ".1f"))
        if table:
            lines += [format_table(table, columns, markdown=True), ""]
        tests = self.out / "gpu_tests.txt"
        if tests.exists():
            tail = [line for line in tests.read_text().splitlines() if line.strip()][-12:]
            lines += [
                "## GPU-marked tests (`pytest -m gpu`; full output in gpu_tests.txt)", "", "```", *tail, "```", ""
            ]
        if self.bench_summary is not None:
            lines += ["## Benchmarks (`python -m bench`; every row in ops.csv / e2e.csv)", "",
                      bench_run.markdown_report(self.bench_summary)]
        lines += ["", f"Exit status: {self.exit_status()} (0 all agreement checks ran and passed; 1 an agreement check "
                  "failed; 2 they passed, but something else failed or was cut)"]
        tmp = self.out / ".summary.md.tmp"
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.out / "summary.md")  # never a half-written summary


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.phase == "agreement":
        return agreement_phase(args.out)
    if args.smoke and HAS_GPU:
        raise SystemExit("--smoke runs on the CPU: start it through bench/device_check.sh, which hides the GPU")
    if not args.smoke and not HAS_GPU:
        raise SystemExit("no CUDA device here: run with --smoke for the CPU check of the machinery")
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} is not empty: give a new or empty output folder (nothing is overwritten)")
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = args.deadline if args.deadline is not None else (SMOKE_DEADLINE_S if args.smoke else DEFAULT_DEADLINE_S)
    run = Run(args.out, time.time() + deadline, args.smoke)
    python = sys.executable

    run.env = environment()
    run.say(f"device check: deadline {deadline:.0f} s, output in {args.out}")
    for key, value in run.env.items():
        run.say(f"  {key}: {value}")
    run.phases.append(("device and versions", "done", time.time() - run.start))
    run.write_summary("running (agreement check)")

    run.child("agreement check", [python, "-m", "bench.device_check", str(args.out), "--phase", "agreement"],
              math.inf if args.smoke else AGREEMENT_LIMIT_S)
    run.write_summary("running (GPU tests)")

    with (args.out / "gpu_tests.txt").open("a") as tests_log:
        run.child("GPU-marked tests", [python, "-m", "pytest", "-m", "gpu", "-v", "-rfEs", "-p", "no:cacheprovider",
                                       "tests", "bench"], math.inf if args.smoke else TESTS_LIMIT_S, output=tests_log)
    run.write_summary("running (deterministic backward)")

    # Its table (times against the bytes model, bitwise reproducibility) goes to device_check.log.
    smoke_subset = ["--dtypes", "bf16", "--layouts", "channels_last"] if args.smoke else []
    run.child("deterministic backward", [python, "-m", "bench.deterministic_backward", *smoke_subset],
              math.inf if args.smoke else DETERMINISTIC_LIMIT_S)
    run.write_summary("running (benchmarks)")

    from bench import run as bench_run

    bench_s = run.left() - SUMMARY_RESERVE_S
    started = time.time()
    if bench_s < 10:
        run.phases.append(("benchmarks", "not run (deadline)", 0.0))
    else:
        bench_argv = ["--out", str(args.out), "--deadline", f"{bench_s:.0f}"]
        if not args.smoke:
            bench_argv += ["--ops-budget", f"{OPS_SHARE * bench_s:.0f}"]
        bench_args = bench_run._parse(bench_argv)
        paths = bench_run.output_paths(args.out, run.env)
        run.say(f"benchmarks: {bench_s:.0f} s")
        outcome = bench_run.run_suites(bench_args, bench_argv, paths, time.time() + bench_s, log_file=run.log_file)
        run.bench_summary = bench_run.summarize(bench_args, paths, run.env, outcome)
        worst = (
            "done" if all(o == "done" for o in outcome.values()) else "; ".join(f"{k} {v}" for k, v in outcome.items())
        )
        run.phases.append(
            ("benchmarks", worst if not run.bench_summary["errors"] else worst + ", with errors", time.time() - started)
        )
        run.say(f"benchmarks: {run.phases[-1][1]} ({time.time() - started:.0f} s)")
    run.write_summary("complete")
    status = run.exit_status()
    print((args.out / "summary.md").read_text())
    run.say(f"device check finished in {time.time() - run.start:.0f} s, exit status {status}; files: "
            + ", ".join(f for f in FILES if (args.out / f).exists()))
    return status


if __name__ == "__main__":
    sys.exit(main())
