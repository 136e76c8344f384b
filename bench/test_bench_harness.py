"""The benchmark's own machinery: shapes, byte counts, the agreement check, timing, result files, README."""

import csv
import json
import time

import pytest
import torch

from alignseg.ops import align_fa_reference
from bench import common
from bench.baselines import align_fa_authors, authors_formulation_is_exact
from bench.ops_bench import KNOT_MARGIN, check_agreement, make_inputs
from bench.roofline import README, roofline_markdown
from bench.shapes import SETTINGS, OpCase, feature_sizes, min_bytes, smoke_cases

pytestmark = pytest.mark.usefixtures("_reference_backend")


@pytest.fixture
def _reference_backend():
    from alignseg.ops import use_backend

    with use_backend("reference"):
        yield


@pytest.fixture(scope="module")
def r101_on_meta():
    """AlignSeg-R101 without storage: shapes only, built once."""
    from alignseg.models import build

    with torch.device("meta"):
        return build("alignseg_r101", num_classes=19)


@pytest.mark.parametrize("setting,height,width,batch", SETTINGS)
def test_feature_sizes_match_the_r101_backbone(r101_on_meta, setting, height, width, batch):
    maps = r101_on_meta.backbone(torch.empty(1, 3, height, width, device="meta"))
    expected = feature_sizes(height, width)
    assert [tuple(m.shape[-2:]) for m in maps] == [expected[s] for s in (4, 8, 16, 32)]


def test_feature_sizes_match_the_offset_fields_of_the_network():
    from alignseg.models import build

    model = build("alignseg_tiny", num_classes=5).eval()
    with torch.no_grad():
        offsets = model.forward_offsets(torch.randn(1, 3, 45, 67))
    sizes = feature_sizes(45, 67)
    assert tuple(offsets["align_fa1"].shape[-2:]) == sizes[4]
    assert tuple(offsets["align_cm"].shape[-2:]) == sizes[32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", smoke_cases(), ids=lambda c: c.op)
def test_min_bytes_counts_the_tensors_each_pass_touches(case, dtype):
    inputs = make_inputs(case, dtype, torch.contiguous_format, torch.device("cpu"))
    from bench.ops_bench import _REFERENCE, forward_backward

    out, grads = forward_backward(_REFERENCE[case.op], inputs)
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    forward = nbytes(inputs.args) + nbytes([out])
    if case.op == "align_fa":  # backward reads grad_out and all inputs, writes all three gradients
        backward = nbytes([inputs.grad_out, *inputs.args, *grads])
    else:  # align_cm: local is not read and its gradient is grad_out itself
        context, offsets, _ = inputs.args
        backward = nbytes([inputs.grad_out, context, offsets, grads[0], grads[1]])
    element = torch.finfo(dtype).bits // 8
    assert min_bytes(case, "fwd", element) == forward
    assert min_bytes(case, "bwd", element) == backward
    assert min_bytes(case, "full", element) == forward + backward


def test_authors_formulation_is_the_exact_form_and_the_one_step_form_only_on_whole_scales():
    # 13 -> 5 columns: (13 - 1) / (5 - 1) = 3 exactly; 13 -> 6: 12 / 5 is fractional.
    exact = OpCase("align_fa", "t", "t", 2, 3, (9, 13), (5, 5))
    fractional = OpCase("align_fa", "t", "t", 2, 3, (9, 13), (5, 6))
    assert authors_formulation_is_exact(exact.out_hw, exact.src_hw)
    assert not authors_formulation_is_exact(fractional.out_hw, fractional.src_hw)
    for case, close in ((exact, True), (fractional, False)):
        low, high, offsets = (
            a.detach() for a in make_inputs(case, torch.float32, torch.contiguous_format, torch.device("cpu")).args
        )
        authors = align_fa_authors(low, high, offsets)
        assert (authors - align_fa_reference(low, high, offsets)).abs().max().item() < 1e-5  # the default form
        error = (authors - align_fa_reference(low, high, offsets, upsample_first=False)).abs().max().item()
        assert (error < 1e-5) == close, error


@pytest.mark.parametrize(
    "case",
    [
        *smoke_cases(),
        OpCase("align_fa", "t", "t", 2, 3, (37, 53), (19, 14)),
        OpCase("align_cm", "t", "t", 1, 2, (28, 28), (3, 3)),
    ],
    ids=lambda c: f"{c.op}-{c.out_hw}-{c.src_hw}",
)
def test_offsets_keep_positions_inside_the_maps_and_off_whole_pixels(case):
    inputs = make_inputs(case, torch.float32, torch.channels_last, torch.device("cpu"))
    offsets = inputs.args[inputs.names.index("offsets")].detach()
    (oh, ow), (sh, sw) = case.out_hw, case.src_hw
    maps = [(sh, sw), (oh, ow)] if case.op == "align_fa" else [(sh, sw)]
    grids = (torch.arange(ow).view(1, 1, ow), torch.arange(oh).view(1, oh, 1))
    for pair, src_sizes in enumerate(maps):
        for axis, (index, out_size, src_size) in enumerate(zip(grids, (ow, oh), src_sizes[::-1])):
            position = (index + offsets[:, 2 * pair + axis]) * (src_size - 1) / (out_size - 1)
            fraction = position - position.floor()
            assert position.min() > 0 and position.max() < src_size - 1
            assert fraction.min() > KNOT_MARGIN / 2 and fraction.max() < 1 - KNOT_MARGIN / 2
            on_output = index + offsets[:, 2 * pair + axis]  # where the exact form's warp samples
            fraction = on_output - on_output.floor()
            assert fraction.min() > KNOT_MARGIN / 2 and fraction.max() < 1 - KNOT_MARGIN / 2
            assert offsets[:, 2 * pair + axis].abs().max() > 0.5  # the offsets do move the samples


def test_agreement_check_catches_a_wrong_provider():
    case = smoke_cases()[0]
    inputs = make_inputs(case, torch.float32, torch.contiguous_format, torch.device("cpu"))
    swapped = lambda low, high, off: align_fa_reference(low, high, off[:, [2, 3, 0, 1]])  # noqa: E731
    report = check_agreement(case, inputs, {"reference": align_fa_reference, "swapped": swapped}, torch.float32)
    assert report["reference"]["ok"] is True
    assert report["swapped"]["ok"] is False and report["swapped"]["max_rel_err"] > 1e-2


def test_measure_reports_ordered_percentiles_of_real_time():
    median, p20, p80 = common.measure(lambda: time.sleep(0.003), rep_ms=30)
    assert p20 <= median <= p80
    assert median >= 3.0


def test_results_are_written_as_tagged_csv_and_json(tmp_path):
    info = common.run_info()
    rows = [{"op": "align_fa", "ms": 1.5}, {"op": "align_cm", "ms": 0.25, "gbs": 10.0}]
    csv_path, json_path = common.write_results("ops", rows, info, directory=tmp_path)
    with csv_path.open() as f:
        read = list(csv.DictReader(f))
    assert [r["op"] for r in read] == ["align_fa", "align_cm"]
    assert all(r["commit"] == info["commit"] and r["torch"] == torch.__version__ for r in read)
    assert read[0]["gbs"] == "" and float(read[1]["gbs"]) == 10.0
    assert json.loads(json_path.read_text()) == {"info": info, "rows": rows}


def test_readme_roofline_table_is_the_generated_one():
    assert roofline_markdown() in README.read_text(), "regenerate it: python -m bench.roofline --write"
