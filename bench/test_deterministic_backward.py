"""bench.deterministic_backward runs end to end (tiny shapes under the interpreter without a GPU), so a device
session does not spend its minutes on a broken script: every row the target lines read, and the bitwise check."""

import pytest

from alignseg.ops.backend import triton_available
from bench import deterministic_backward

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")


def test_every_row_and_target_line_runs(capsys):
    assert deterministic_backward.main(["--dtypes", "bf16", "--layouts", "channels_last"]) == 0
    out = capsys.readouterr().out
    for row in (deterministic_backward.ATOMIC_ROW, deterministic_backward.AUTHORS_ROW,
                deterministic_backward.CM_OP_ROW, "gathers, all three gradients (upsample-first)",
                "gathers, all three gradients (one-step)", "fixed point grad_low+grad_high (upsample-first)",
                *(deterministic_backward.op_row(path) for path in ("atomic", "fixed_point", "gather"))):
        assert f" {row} " in out, row
    targets = [line for line in out.splitlines() if line.startswith("target bf16")]
    assert any("deterministic mode (the gathers), x the atomic path" in line for line in targets), targets
    assert len(targets) == 5, targets
    assert "bitwise reproducible: all" in out
