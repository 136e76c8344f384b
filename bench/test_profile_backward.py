"""bench.profile_backward runs end to end (tiny shapes under the interpreter without a GPU), so a device session
does not spend its minutes on a broken script: every kernel's row of the sweep, every path's marker."""

import pytest

from alignseg.ops.backend import triton_available
from bench import profile_backward

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")


def test_sweep_times_every_kernel_at_its_table_config(capsys):
    assert profile_backward.main(["sweep", "--layouts", "channels_last"]) == 0
    out = capsys.readouterr().out
    assert " failed: " not in out, out  # a config that does not run prints "failed: <error>"
    rows = [line for line in out.splitlines() if "(table)" in line]
    kernels = {line.split()[2] for line in rows}
    assert kernels == {"align_fa_backward_exact", "align_fa_backward", "align_fa_scatter_exact", "align_fa_scatter",
                       "align_cm_backward/auto", "align_cm_backward/1", "align_cm_backward/4",
                       "gather_backward_exact", "gather_backward"}, rows


def test_paths_marks_each_backward_path(capsys):
    assert profile_backward.main(["paths", "--layouts", "channels_last"]) == 0
    markers = [line for line in capsys.readouterr().out.splitlines() if line.startswith("== ")]
    assert len(markers) == 6  # atomic, fixed point, gathers; both forms
