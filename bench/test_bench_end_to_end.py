"""The end-to-end benchmark in its smoke configuration: the tiny preset trains on both op backends."""

import dataclasses
import math

import pytest

from bench.end_to_end import SMOKE_CONFIG, SMOKE_VARIANTS, run_suite

# Smaller than the suite's smoke size: the Triton interpreter's cost grows with the pixel count.
TEST_CONFIG = dataclasses.replace(SMOKE_CONFIG, train_size=(32, 32))


@pytest.mark.slow
def test_training_step_runs_and_both_op_backends_give_the_same_first_loss():
    rows, skipped = run_suite(TEST_CONFIG, tasks=("train",), variants=SMOKE_VARIANTS)
    assert not skipped and [(r["execution"], r["ops"]) for r in rows] == list(SMOKE_VARIANTS)
    for row in rows:
        assert row["images_per_s"] > 0 and math.isfinite(row["last_value"])
    reference, triton = (r["first_value"] for r in rows)
    # Same weights, same batch, same dropout masks: only the op backend differs.
    assert abs(reference - triton) <= 1e-4 * abs(reference), (reference, triton)
