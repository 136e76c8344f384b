"""pytest-benchmark cases: the smoke configurations of ``python -m bench``.

Each provider is first checked against the library reference run in float64 (output and every
gradient, one shared grad_output), then its forward + backward is timed. Without a GPU the Triton
provider runs under the interpreter and the compiled one uses the aot_eager backend (Inductor's C++
compile takes ~30 s per shape here), so the figures only show that the benchmarks still run.
On a GPU, one more test runs the Cityscapes-crop shapes of AlignSeg-R101 through the suite's checks.
"""

import pytest
import torch

from bench import common
from bench.ops_bench import (
    DTYPES,
    LAYOUTS,
    PROVIDERS,
    bench_config,
    check_agreement,
    make_inputs,
    provider_fn,
    timed_call,
)
from bench.run import SMOKE_CONFIGS
from bench.shapes import model_cases, smoke_cases

COMPILE_BACKEND = "inductor" if common.HAS_GPU else "aot_eager"
CONFIGS = [(case, d, lay) for d, lay in SMOKE_CONFIGS for case in smoke_cases()]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case,dtype_name,layout_name", CONFIGS, ids=[f"{c.op}-{d}-{lay}" for c, d, lay in CONFIGS])
def test_provider_agrees_with_float64_reference_then_time_it(benchmark, case, dtype_name, layout_name, provider):
    torch._dynamo.reset()
    inputs = make_inputs(case, DTYPES[dtype_name], LAYOUTS[layout_name], common.device())
    fn = provider_fn(case.op, provider, COMPILE_BACKEND)
    if fn is None:
        pytest.skip(f"{provider} does not apply to {case.op}")
    report = check_agreement(case, inputs, {provider: fn}, DTYPES[dtype_name])[provider]
    if provider == "authors" and dtype_name == "bf16":
        assert report["ok"] is None  # grid_sample rounds the positions to bf16: not the same math
    else:
        assert report["ok"] is True, (
            f"{provider}: {report['worst']} off by {report['max_rel_err']:.2e} ({report['note']})"
        )

    def clear_grads():
        for a in inputs.args:
            a.grad = None

    benchmark.group = f"{case.op} {dtype_name} {layout_name}"
    benchmark.pedantic(timed_call(fn, inputs, "full"), setup=clear_grads, rounds=1, iterations=1)


@pytest.mark.gpu
@pytest.mark.skipif(not common.HAS_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("case", [c for c in model_cases() if c.setting == "cityscapes-crop"], ids=lambda c: c.stage)
def test_every_provider_agrees_at_the_model_shapes_on_gpu(case):
    rows = bench_config(case, "bf16", "channels_last", modes=("full",), copy_gbs=None, rep_ms=10)
    failed = [f"{r['provider']}: {r['check_note']}" for r in rows if r["agrees"] is False]
    assert not failed, failed
    assert {r["provider"] for r in rows} == set(PROVIDERS) - ({"one_step"} if case.op == "align_cm" else set())
