"""What every benchmark shares: the device set-up, timing, copy bandwidth, peak memory, result files.

Importing this module before :mod:`alignseg` matters: without a GPU it sets ``TRITON_INTERPRET=1``
(which must happen before any ``@triton.jit`` function is defined), so the Triton kernels run on CPU
tensors through the interpreter. Timings taken that way are smoke-test figures, not GPU figures.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"

SMOKE_BANNER = (
    "SMOKE MODE (no CUDA device): tiny shapes, Triton kernels under the CPU interpreter. "
    "These timings are NOT GPU figures and say nothing about kernel speed."
)

QUANTILES = (0.5, 0.2, 0.8)  # median, then the 20th and 80th percentiles


def device() -> torch.device:
    return torch.device("cuda") if HAS_GPU else torch.device("cpu")


def log(message: str) -> None:
    """Progress lines on stdout, flushed at once so long runs show where they are."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------------------------
# Where the numbers come from.


def git_commit() -> str:
    """The commit of the working tree, with ``+dirty`` when it has uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        # A copy of the tree without .git (e.g. on a machine it was copied to): the caller may say.
        return os.environ.get("ALIGNSEG_COMMIT", "unknown")


def run_info() -> dict[str, str]:
    """The tags every result row carries: device, versions, commit, time."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    if HAS_GPU:
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"CPU {platform.processor() or platform.machine()} (smoke mode, Triton interpreter)"
    return {
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def device_slug(info: dict[str, str]) -> str:
    """A file-name-safe tag of the device: ``nvidia-h100-80gb-hbm3`` or ``cpu-smoke``."""
    if not HAS_GPU:
        return "cpu-smoke"
    return re.sub(r"[^a-z0-9]+", "-", info["device"].lower()).strip("-")


# ----------------------------------------------------------------------------------------------
# Timing.


def _clear_grads(tensors: Sequence[torch.Tensor] | None) -> None:
    for t in tensors or ():
        t.grad = None


def measure(
    fn: Callable[[], object],
    grad_to_none: Sequence[torch.Tensor] | None = None,
    *,
    warmup_ms: float = 25,
    rep_ms: float = 100,
) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) of ``fn``'s time in milliseconds.

    On a GPU this is ``triton.testing.do_bench``, which flushes the L2 cache before every call and
    resets ``.grad`` of ``grad_to_none`` so gradient accumulation is not timed. On the CPU (smoke mode)
    a plain wall-clock loop of a few calls stands in; those figures only show that the code runs.
    """
    if HAS_GPU:
        import triton.testing

        median, p20, p80 = triton.testing.do_bench(
            fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES), grad_to_none=grad_to_none
        )
        return float(median), float(p20), float(p80)
    if warmup_ms > 0:
        _clear_grads(grad_to_none)
        fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < 2 or (len(times) < 20 and time.perf_counter() < deadline):
        _clear_grads(grad_to_none)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    pick = lambda q: times[min(len(times) - 1, round(q * (len(times) - 1)))]  # noqa: E731
    return statistics.median(times), pick(0.2), pick(0.8)


def peak_memory_mib(fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] | None = None) -> float | None:
    """Memory one call of ``fn`` allocates on top of what was allocated before it (MiB); None on CPU."""
    if not HAS_GPU:
        return None
    _clear_grads(grad_to_none)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    _clear_grads(grad_to_none)
    return peak / 2**20


def measure_cudagraph(
    fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] | None = None, *, rep_ms: float = 5
) -> float | None:
    """Median time (ms) of one ``fn`` replayed from a CUDA graph: the kernels' time without Python.

    ``triton.testing.do_bench_cudagraph`` captures as many unrolled calls as its eager estimate fits
    in ``rep_ms``, so a small ``rep_ms`` keeps the capture short for host-bound calls. None on the
    CPU, and None (with a log line) where ``fn`` cannot be captured (a host synchronisation, say).
    """
    if not HAS_GPU:
        return None
    import triton.testing

    try:
        median = triton.testing.do_bench_cudagraph(fn, rep=rep_ms, grad_to_none=grad_to_none, quantiles=[0.5])
    except Exception as error:  # noqa: BLE001  (a capture failure must not end the benchmark)
        torch.cuda.synchronize()
        log(f"  CUDA graph capture failed, no graph time: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
        return None
    return float(median[0] if isinstance(median, (list, tuple)) else median)


def copy_bandwidth_gbs(nbytes: int | None = None) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written, per second), measured now.

    This is the ceiling a memory-bound op can reach in practice; effective bandwidths of the ops are
    quoted as a fraction of it. 1 GiB per buffer on a GPU (far beyond L2), 64 MiB on the CPU.
    """
    nbytes = nbytes or (2**30 if HAS_GPU else 2**26)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device())
    src.random_(0, 255)
    dst = torch.empty_like(src)
    median, _, _ = measure(lambda: dst.copy_(src))
    return 2 * nbytes / (median * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------
# Results: CSV + JSON under bench/results/, and the printed table.


def result_path(kind: str, info: dict[str, str], suffix: str, directory: Path = RESULTS_DIR) -> Path:
    """``<directory>/<kind>_<device>_<time><suffix>``, the directory created if needed."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = info["timestamp"].replace(":", "").replace("-", "")
    return directory / f"{kind}_{device_slug(info)}_{stamp}{suffix}"


def write_results(kind: str, rows: list[dict], info: dict[str, str], directory: Path = RESULTS_DIR) -> list[Path]:
    """Write ``rows`` (each tagged with ``info``) as ``<kind>_<device>_<time>.csv`` and ``.json``."""
    tagged = [{**row, **info} for row in rows]
    columns: list[str] = []
    for row in tagged:
        columns += [key for key in row if key not in columns]
    csv_path, json_path = result_path(kind, info, ".csv", directory), result_path(kind, info, ".json", directory)
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(tagged)
    json_path.write_text(json.dumps({"info": info, "rows": rows}, indent=1, default=str) + "\n")
    return [csv_path, json_path]


def with_suffix(prefix: Path, suffix: str) -> Path:
    """``prefix`` + ``suffix`` (``Path.with_suffix`` would replace anything after a dot in the name)."""
    return prefix.with_name(prefix.name + suffix)


class RowWriter:
    """Appends result rows to ``<prefix>.jsonl`` and ``<prefix>.csv`` as they are measured.

    Each row is written and flushed at once, so a run killed at any moment keeps every row measured
    before it (the CSV header is written with the first row; keys it lacks go to the JSONL only).
    Refuses to append to files that already exist: results are never overwritten or mixed.
    """

    def __init__(self, prefix: Path, info: dict[str, str], csv: bool = True):
        self.jsonl_path = with_suffix(prefix, ".jsonl")
        self.csv_path = with_suffix(prefix, ".csv") if csv else None
        for path in (self.jsonl_path, self.csv_path):
            if path is not None and path.exists():
                raise FileExistsError(f"{path} already exists: choose another output folder")
        prefix.parent.mkdir(parents=True, exist_ok=True)
        self.info = info
        self.columns: list[str] | None = None
        self.count = 0

    def write(self, row: dict, to_csv: bool = True) -> None:
        """Append ``row`` tagged with the run's info; ``to_csv=False``: the JSONL only (an error record)."""
        tagged = {**row, **self.info}
        with self.jsonl_path.open("a") as f:
            f.write(json.dumps(tagged, default=str) + "\n")
            f.flush()
        if self.csv_path is not None and to_csv:
            with self.csv_path.open("a", newline="") as f:
                if self.columns is None:
                    self.columns = list(tagged)
                    csv.DictWriter(f, fieldnames=self.columns).writeheader()
                csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerow(tagged)
                f.flush()
        self.count += 1


def read_rows(jsonl_path: Path) -> list[dict]:
    """The rows of a JSONL results file; a last line cut short by a kill is dropped; [] if absent."""
    if not jsonl_path.exists():
        return []
    rows = []
    for line in jsonl_path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # only the line being written when the process was killed can be incomplete
    return rows


# Exec'd in front of every child of ``run_until`` on Linux: the kernel then sends the child SIGKILL
# when its parent dies (PR_SET_PDEATHSIG survives exec), so a killed driver leaves no orphan running.
# Set here, after the fork, and not in a ``preexec_fn``: that is unsafe in a parent with threads
# (CUDA's), where it can deadlock the child before its exec.
_ORPHAN_GUARD = (
    "import ctypes, os, signal, sys; ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL); "
    "sys.exit(1) if os.getppid() != int(sys.argv[1]) else os.execvp(sys.argv[2], sys.argv[2:])"
)


def run_until(command: Sequence[str], until: float | None, *, log_file=None, env: dict | None = None,
              grace_s: float = 5.0) -> tuple[int | None, bool]:
    """Run ``command`` in its own process group until the wall-clock time ``until`` (``time.time()``).

    At ``until`` the whole group (compile workers included) gets SIGTERM, then SIGKILL after
    ``grace_s``: a hard deadline, whatever the child is doing. Output goes to ``log_file`` (a file
    object) or is inherited. Returns (exit status, or None when killed; whether it was killed).
    """
    import signal

    command = list(command)
    if platform.system() == "Linux":
        command = [sys.executable, "-c", _ORPHAN_GUARD, str(os.getpid()), *command]
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT if log_file else None,
                               env=env, cwd=REPO_ROOT, start_new_session=True)
    timeout = None if until is None else max(0.0, until - time.time())
    try:
        return process.wait(timeout=timeout), False
    except subprocess.TimeoutExpired:
        pass
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    return None, True


def format_table(rows: Iterable[dict], columns: Sequence[tuple[str, str, str]], markdown: bool = False) -> str:
    """A plain-text (or Markdown) table; ``columns`` are (header, row key, format spec); missing values print as '-'."""

    def cell(row: dict, key: str, spec: str) -> str:
        value = row.get(key)
        if value is None or value == "":
            return "-"
        return format(value, spec) if spec else str(value)

    body = [[cell(row, key, spec) for _, key, spec in columns] for row in rows]
    headers = [header for header, _, _ in columns]
    if markdown:
        rule = ["---" if not spec else "--:" for _, _, spec in columns]
        return "\n".join("| " + " | ".join(cells) + " |" for cells in [headers, rule, *body])
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in body)])


def as_dict(obj: object) -> dict:
    return dataclasses.asdict(obj)  # type: ignore[arg-type]
