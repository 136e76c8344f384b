"""ConfusionMatrix against a NumPy per-class reference, merging, distributed sum, table and errors."""

import json
import math
import multiprocessing

import numpy as np
import pytest
import torch
import torch.distributed as dist

from alignseg.evaluation import ConfusionMatrix

pytestmark = pytest.mark.usefixtures("reference_ops")


def np_metrics(pred, target, num_classes, ignore=255):
    """IoU per class from set counts, written independently of the confusion matrix."""
    valid = target != ignore
    iou, present = [], []
    for c in range(num_classes):
        tp = np.sum((pred == c) & (target == c) & valid)
        fp = np.sum((pred == c) & (target != c) & valid)
        fn = np.sum((pred != c) & (target == c) & valid)
        present.append(bool(tp + fp + fn > 0))
        iou.append(tp / (tp + fp + fn) if present[-1] else math.nan)
    miou = np.mean([v for v, p in zip(iou, present) if p])
    accuracy = np.sum((pred == target) & valid) / np.sum(valid)
    per_class_acc = [
        np.sum((pred == c) & (target == c)) / np.sum(target == c) for c in range(num_classes) if np.any(target == c)
    ]
    return miou, iou, present, accuracy, np.mean(per_class_acc)


def _random_batch(seed, shape=(3, 17, 23), num_classes=7, absent=(5,)):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, num_classes, shape)
    pred = np.where(rng.random(shape) < 0.6, target, rng.integers(0, num_classes, shape))
    for c in absent:  # neither in the ground truth nor predicted
        target[target == c] = 0
        pred[pred == c] = 1
    target[rng.random(shape) < 0.15] = 255
    return pred, target


def test_matches_numpy_reference_over_several_updates():
    batches = [_random_batch(s) for s in range(3)]
    matrix = ConfusionMatrix(7)
    for pred, target in batches:
        matrix.update(torch.from_numpy(pred), torch.from_numpy(target))
    all_pred = np.concatenate([p for p, _ in batches])
    all_target = np.concatenate([t for _, t in batches])
    miou, iou, present, accuracy, mean_acc = np_metrics(all_pred, all_target, 7)
    result = matrix.compute("whole")
    assert result.present == present and present[5] is False
    np.testing.assert_allclose(result.iou, iou, rtol=1e-12)  # NaN where absent, on both sides
    assert result.miou == pytest.approx(miou, rel=1e-12)
    assert result.pixel_accuracy == pytest.approx(accuracy, rel=1e-12)
    assert result.mean_accuracy == pytest.approx(mean_acc, rel=1e-12)
    assert result.num_pixels == int(np.sum(all_target != 255))
    assert result.num_present == 6


def test_class_only_predicted_counts_as_zero_iou():
    matrix = ConfusionMatrix(3)
    matrix.update(torch.tensor([[0, 0, 2, 2]]), torch.tensor([[0, 0, 0, 255]]))
    result = matrix.compute()
    assert result.iou[0] == pytest.approx(2 / 3) and result.iou[2] == 0.0 and math.isnan(result.iou[1])
    assert result.miou == pytest.approx(1 / 3)


def test_merge_equals_one_matrix_and_table_reports_mode_and_absent_classes():
    (p1, t1), (p2, t2) = _random_batch(10), _random_batch(11)
    a, b, both = ConfusionMatrix(7), ConfusionMatrix(7), ConfusionMatrix(7)
    a.update(torch.from_numpy(p1), torch.from_numpy(t1))
    b.update(torch.from_numpy(p2), torch.from_numpy(t2))
    for p, t in ((p1, t1), (p2, t2)):
        both.update(torch.from_numpy(p), torch.from_numpy(t))
    assert torch.equal(a.merge(b).matrix, both.matrix)

    names = [f"thing{i}" for i in range(7)]
    result = both.compute("slide(tile 8x8, stride 4x4)", names)
    table = result.format_table()
    assert "[mode: slide(tile 8x8, stride 4x4)]" in table.splitlines()[0]
    assert "thing5" in table and "absent" in table.split("thing5")[1].splitlines()[0]
    assert f"mIoU {100 * result.miou:.2f}% over 6/7 classes" in table
    assert "excluded from the mean" in table
    plain = json.loads(json.dumps(dict(result)))
    assert plain["iou"]["thing5"] is None and plain["miou"] == pytest.approx(result.miou)
    assert result["pixel_accuracy"] == result.pixel_accuracy and plain["mode"] == result.mode


def test_empty_matrix_and_bad_input():
    result = ConfusionMatrix(2).compute()
    assert math.isnan(result.miou) and result.num_pixels == 0
    matrix = ConfusionMatrix(4)
    with pytest.raises(ValueError, match="one shape"):
        matrix.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="argmax the logits"):
        matrix.update(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"pred holds class ids outside \[0, 4\)"):
        matrix.update(torch.tensor([4]), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"target holds values outside \[0, 4\).*\[9\]"):
        matrix.update(torch.tensor([1, 1]), torch.tensor([9, 255]))
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(0)
    with pytest.raises(ValueError, match="cannot merge"):
        matrix.merge(ConfusionMatrix(3))


def _all_reduce_worker(rank, init_file, queue):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        pred, target = _random_batch(20 + rank)
        matrix = ConfusionMatrix(7)
        matrix.update(torch.from_numpy(pred), torch.from_numpy(target))
        queue.put((rank, matrix.all_reduce().matrix.numpy()))
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_over_two_gloo_processes(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_all_reduce_worker, args=(r, tmp_path / "init", queue)) for r in range(2)]
    for w in workers:
        w.start()
    try:
        results = dict(queue.get(timeout=60) for _ in workers)
        for w in workers:
            w.join(timeout=30)
            assert w.exitcode == 0
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
    expected = ConfusionMatrix(7)
    for rank in range(2):
        pred, target = _random_batch(20 + rank)
        expected.update(torch.from_numpy(pred), torch.from_numpy(target))
    np.testing.assert_array_equal(results[0], expected.matrix.numpy())
    np.testing.assert_array_equal(results[1], expected.matrix.numpy())
    # Outside a process group it changes nothing.
    assert torch.equal(expected.all_reduce().matrix, expected.matrix)
