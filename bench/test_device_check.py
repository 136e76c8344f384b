"""The device check and the benchmark's hard deadline, on the CPU: the smoke run end to end, a run
killed halfway, the deadline of a child process, and the breadth-first order of the suite."""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bench import common
from bench.device_check import FILES, agreement_plan
from bench.run import GPU_CONFIGS, breadth_first
from bench.shapes import model_cases

SCRIPT = common.REPO_ROOT / "bench" / "device_check.sh"


def _start(out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.Popen(["bash", str(SCRIPT), str(out), "--smoke", *extra], env=env, cwd=common.REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _csv_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_smoke_device_check_runs_end_to_end_and_writes_its_folder(tmp_path):
    out = tmp_path / "check"
    process = _start(out)
    output, _ = process.communicate(timeout=900)
    assert process.returncode == 0, output[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)

    agreement = [json.loads(line) for line in (out / "agreement.jsonl").read_text().splitlines()]
    assert len(agreement) == len(agreement_plan()) and all(r["ok"] for r in agreement)
    for row in agreement:  # forward and every gradient were compared, each within the tolerance
        op_inputs = 3
        assert len(row["triton_errors"]) == 1 + op_inputs and "out" in row["triton_errors"]
        assert max(row["triton_errors"].values()) <= row["allowed"]
    assert {(r["dtype"], r["layout"]) for r in agreement} == set(GPU_CONFIGS)

    ops_jsonl = [json.loads(line) for line in (out / "ops.jsonl").read_text().splitlines()]
    ops_csv = _csv_rows(out / "ops.csv")
    assert len(ops_csv) == len(ops_jsonl) > 0
    assert all(r["agrees"] in ("True", "") for r in ops_csv)  # "" where not comparable (authors in bf16)
    assert all(r["ms_cudagraph"] == "" and float(r["ms"]) > 0 for r in ops_csv)  # no CUDA graphs on the CPU
    assert len(_csv_rows(out / "e2e.csv")) == 4
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# Device check: complete") and "Exit status: 0" in summary
    assert "SMOKE MODE" in summary and "skipped" in (out / "gpu_tests.txt").read_text()


@pytest.mark.slow
def test_device_check_killed_halfway_keeps_every_row_it_wrote(tmp_path):
    out = tmp_path / "check"
    process = _start(out)
    rows_file = out / "ops.jsonl"
    give_up = time.time() + 600
    while not (rows_file.exists() and len(rows_file.read_text().splitlines()) >= 3):
        assert process.poll() is None, "the check ended before it wrote three op rows"
        assert time.time() < give_up, "no op rows after 10 minutes"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the driver; its children die with it (PR_SET_PDEATHSIG)
    process.wait(timeout=30)
    time.sleep(2)
    size = rows_file.stat().st_size
    time.sleep(3)
    assert rows_file.stat().st_size == size, "a child outlived the killed driver and still writes"

    jsonl = common.read_rows(rows_file)  # drops at most a last line cut by the kill
    assert len(jsonl) >= 3 and all(r["op"] and float(r["ms"]) > 0 for r in jsonl)
    ops_csv = _csv_rows(out / "ops.csv")
    assert len(ops_csv) >= len(jsonl) - 1
    assert all(r["op"] and float(r["ms"]) > 0 for r in ops_csv[: len(jsonl) - 1])
    agreement = common.read_rows(out / "agreement.jsonl")
    assert len(agreement) == len(agreement_plan()) and all(r["ok"] for r in agreement)
    # The summary of the last finished phase is there, whole, and says the run did not finish.
    assert (out / "summary.md").read_text().startswith("# Device check: running (benchmarks)")


def test_a_child_is_killed_at_its_deadline_with_its_own_children_and_its_rows_survive(tmp_path):
    script = textwrap.dedent(f"""
        import subprocess, sys, time
        from pathlib import Path
        sys.path.insert(0, {str(common.REPO_ROOT)!r})
        from bench.common import RowWriter
        grandchild = subprocess.Popen(["sleep", "120"])
        Path({str(tmp_path / "grandchild.pid")!r}).write_text(str(grandchild.pid))
        writer = RowWriter(Path({str(tmp_path / "rows")!r}), {{"device": "test"}})
        for i in range(3):
            writer.write({{"i": i, "value": i / 3}})
        time.sleep(120)  # stands for a compile that would overrun the deadline
    """)
    started = time.time()
    status, killed = common.run_until([sys.executable, "-c", script], started + 8)
    assert killed and status is None and time.time() - started < 30
    grandchild = int((tmp_path / "grandchild.pid").read_text())
    time.sleep(0.5)
    assert not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]
    rows = common.read_rows(tmp_path / "rows.jsonl")
    assert [r["i"] for r in rows] == [0, 1, 2] and all(r["device"] == "test" for r in rows)
    assert [r["value"] for r in _csv_rows(tmp_path / "rows.csv")] == ["0.0", str(1 / 3), str(2 / 3)]
    with pytest.raises(FileExistsError, match="rows.jsonl already exists"):
        common.RowWriter(tmp_path / "rows", {})


def test_read_rows_drops_only_a_line_cut_by_a_kill(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b"')
    assert common.read_rows(path) == [{"a": 1}, {"a": 2}]
    assert common.read_rows(tmp_path / "absent.jsonl") == []


def test_the_suite_runs_every_configuration_of_a_shape_before_the_next_shape():
    cases = model_cases()
    plan = breadth_first(cases, GPU_CONFIGS)
    assert len(plan) == len(cases) * len(GPU_CONFIGS)
    # fp32 channels_last is the second point measured, not the sixteenth.
    assert [(c.label, d, lay) for c, d, lay in plan[:4]] == [(cases[0].label, d, lay) for d, lay in GPU_CONFIGS]
    assert plan[1][1:] == ("fp32", "channels_last")
    assert [c for c, _, _ in plan[4:8]] == [cases[1]] * 4
