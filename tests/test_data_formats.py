"""Benchmark-server prediction files (alignseg.data.formats), and the official Cityscapes evaluator on them."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alignseg.data.formats import (
    ade20k_result_path,
    cityscapes_result_path,
    write_ade20k_result,
    write_cityscapes_result,
)
from alignseg.data.metainfo import CITYSCAPES_LABELS, IGNORE_INDEX, cityscapes_ids_to_train_ids
from alignseg.evaluation.metrics import ConfusionMatrix

# Known answers typed from cityscapesScripts' labels.py: train id -> label id.
KNOWN_TRAIN_TO_LABEL = {0: 7, 1: 8, 2: 11, 5: 17, 10: 23, 11: 24, 13: 26, 16: 31, 18: 33}


def test_cityscapes_result_names_and_folders(tmp_path):
    image = Path("/data/leftImg8bit/test/berlin/berlin_000123_000019_leftImg8bit.png")
    assert cityscapes_result_path(image, tmp_path) == tmp_path / "berlin" / "berlin_000123_000019_labelIds.png"
    assert cityscapes_result_path("bonn_000001_000002.jpg", "out") == Path("out/bonn/bonn_000001_000002_labelIds.png")
    for bad in ("photo.png", "berlin_000123_leftImg8bit.png", "new_york_000001_000002_leftImg8bit.png"):
        with pytest.raises(ValueError, match="not named like a Cityscapes image"):
            cityscapes_result_path(bad, tmp_path)


def test_cityscapes_result_holds_label_ids_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    train_ids = rng.integers(0, 19, (7, 11))
    train_ids[0, : len(KNOWN_TRAIN_TO_LABEL)] = list(KNOWN_TRAIN_TO_LABEL)
    path = write_cityscapes_result(torch.from_numpy(train_ids), "aachen_000000_000019_leftImg8bit.png", tmp_path)
    with Image.open(path) as png:
        assert png.mode == "L" and png.size == (11, 7)
        written = np.asarray(png)
    assert written[0, : len(KNOWN_TRAIN_TO_LABEL)].tolist() == list(KNOWN_TRAIN_TO_LABEL.values())
    np.testing.assert_array_equal(cityscapes_ids_to_train_ids(written), train_ids)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["aachen", path.name]  # no partial file left
    with pytest.raises(FileExistsError, match="not overwriting"):
        write_cityscapes_result(train_ids, "aachen_000000_000019_leftImg8bit.png", tmp_path)
    write_cityscapes_result(
        np.zeros((7, 11), np.int64), "aachen_000000_000019_leftImg8bit.png", tmp_path, overwrite=True
    )
    assert (np.asarray(Image.open(path)) == 7).all()
    with pytest.raises(ValueError, match=r"outside the train ids \[0, 19\)"):
        write_cityscapes_result(np.full((2, 2), IGNORE_INDEX), "aachen_000000_000020_leftImg8bit.png", tmp_path)
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        write_cityscapes_result(np.zeros((1, 2, 2), np.int64), "aachen_000000_000021_leftImg8bit.png", tmp_path)


def test_ade20k_result_is_index_plus_one_named_after_the_image(tmp_path):
    train_ids = np.array([[0, 1, 149], [74, 0, 148]])
    path = write_ade20k_result(train_ids, "images/validation/ADE_val_00000001.jpg", tmp_path)
    assert path == ade20k_result_path("ADE_val_00000001.jpg", tmp_path) == tmp_path / "ADE_val_00000001.png"
    with Image.open(path) as png:
        assert png.mode == "L"
        np.testing.assert_array_equal(np.asarray(png), [[1, 2, 150], [75, 1, 149]])
    with pytest.raises(ValueError, match=r"\[0, 150\)"):
        write_ade20k_result(np.array([[150]]), "ADE_val_00000002.jpg", tmp_path)


# --- the official evaluator ------------------------------------------------------------------------------


def _scene(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Cityscapes label ids (every id 0..33, void included) in rectangles, like a coarse street scene."""
    ids = np.array([label.id for label in CITYSCAPES_LABELS], np.uint8)
    scene = np.full((height, width), rng.choice(ids), np.uint8)
    for _ in range(12):
        top, left = rng.integers(0, height), rng.integers(0, width)
        scene[top : top + rng.integers(2, 10), left : left + rng.integers(2, 14)] = rng.choice(ids)
    return scene


def _instance_ids(label_ids: np.ndarray) -> np.ndarray:
    """``*_gtFine_instanceIds.png``: label id, or ``id * 1000 + k`` on classes with instances (one per class here)."""
    with_instances = np.array([label.id for label in CITYSCAPES_LABELS if label.has_instances])
    return np.where(np.isin(label_ids, with_instances), label_ids.astype(np.uint16) * 1000, label_ids).astype(np.uint16)


def test_official_cityscapes_evaluator_agrees_with_our_metrics(tmp_path, monkeypatch):
    evaluator = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    if not hasattr(np, "in1d"):  # cityscapesscripts 2.3 calls np.in1d, which numpy 2.4 removed
        monkeypatch.setattr(np, "in1d", np.isin, raising=False)

    rng = np.random.default_rng(7)
    names = ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000313", "zurich_000104_000019"]
    gt_files, matrix = [], ConfusionMatrix(19)
    for name in names:
        city = name.split("_")[0]
        label_ids = _scene(rng, 24, 40)
        gt_dir = tmp_path / "gtFine" / "val" / city
        gt_dir.mkdir(parents=True, exist_ok=True)
        gt_files.append(gt_dir / f"{name}_gtFine_labelIds.png")
        Image.fromarray(label_ids).save(gt_files[-1])
        Image.fromarray(_instance_ids(label_ids)).save(gt_dir / f"{name}_gtFine_instanceIds.png")
        # A prediction that is right on about 60% of the pixels, with 0..18 everywhere else.
        truth = cityscapes_ids_to_train_ids(label_ids)
        prediction = np.where(rng.random(truth.shape) < 0.6, truth, rng.integers(0, 19, truth.shape))
        prediction = np.where(prediction == IGNORE_INDEX, rng.integers(0, 19, truth.shape), prediction)
        image_path = tmp_path / "leftImg8bit" / "val" / city / f"{name}_leftImg8bit.png"
        write_cityscapes_result(prediction, image_path, tmp_path / "results")
        matrix.update(torch.from_numpy(prediction), torch.from_numpy(truth))
    ours = matrix.compute()

    args = evaluator.args
    for key, value in dict(predictionPath=str(tmp_path / "results"), predictionWalk=None, JSONOutput=False, quiet=True,
                           evalInstLevelScore=True, evalPixelAccuracy=False, colorized=False).items():  # fmt: skip
        monkeypatch.setattr(args, key, value)
    predictions = [evaluator.getPrediction(args, str(gt)) for gt in gt_files]  # the evaluator's own name matching
    assert [Path(p).name for p in predictions] == [f"{n}_labelIds.png" for n in names]
    result = evaluator.evaluateImgLists(predictions, [str(gt) for gt in gt_files], args)

    assert 0.05 < ours.miou < 0.95  # a score that could disagree
    assert result["averageScoreClasses"] == pytest.approx(ours.miou, abs=0.01)
    for train_id, label in enumerate(
        sorted((lab for lab in CITYSCAPES_LABELS if lab.train_id != IGNORE_INDEX), key=lambda lab: lab.train_id)
    ):
        theirs = result["classScores"][label.name]
        assert np.isnan(theirs) if not ours.present[train_id] else theirs == pytest.approx(ours.iou[train_id], abs=1e-9)


@pytest.mark.usefixtures("reference_ops")
def test_predict_format_cityscapes_scores_with_the_official_evaluator_as_alignseg_eval(tmp_path, monkeypatch):
    evaluator = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    if not hasattr(np, "in1d"):  # cityscapesscripts 2.3 calls np.in1d, which numpy 2.4 removed
        monkeypatch.setattr(np, "in1d", np.isin, raising=False)
    import json

    from alignseg.builders import build_model
    from alignseg.checkpoint import save_checkpoint
    from alignseg.cli import main
    from alignseg.config import load_config
    from alignseg.data import make_synthetic_cityscapes

    root = tmp_path / "data"
    make_synthetic_cityscapes(root, num_train=1, num_val=3, size=(48, 80), progress=False)
    cfg = load_config("synthetic", [f"data.root={root}", "data.synthetic_train=1", "data.synthetic_val=3",
                                    "data.synthetic_size=[48,80]", "data.workers=0", "train.device=cpu"])
    torch.manual_seed(3)
    checkpoint = save_checkpoint(tmp_path / "tiny.pt", {"iteration": 0, "model": build_model(cfg).state_dict(),
                                                        "config": cfg.to_dict()})  # an untrained tiny model
    report = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(checkpoint), "--output", str(report)]) == 0
    record = json.loads(report.read_text())
    ours = record["miou"]

    images, results = root / "leftImg8bit" / "val", tmp_path / "results"
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(images), "--output", str(results),
                 "--format", "cityscapes"]) == 0
    gt_files = sorted((root / "gtFine" / "val").rglob("*_gtFine_labelIds.png"))
    written = sorted(results.rglob("*.png"))
    assert len(gt_files) == 3 and [p.name for p in written] == [
        p.name.replace("_gtFine_labelIds", "_labelIds") for p in gt_files
    ]
    assert all(p.parent.name == p.name.split("_")[0] for p in written)  # a folder per city
    args = evaluator.args
    for key, value in dict(predictionPath=str(results), predictionWalk=None, JSONOutput=False, quiet=True,
                           evalInstLevelScore=False, evalPixelAccuracy=False, colorized=False).items():  # fmt: skip
        monkeypatch.setattr(args, key, value)
    predictions = [evaluator.getPrediction(args, str(gt)) for gt in gt_files]
    result = evaluator.evaluateImgLists(predictions, [str(gt) for gt in gt_files], args)
    assert 0 < ours < 1
    assert result["averageScoreClasses"] == pytest.approx(ours, abs=0.01)
    for name, iou in record["iou"].items():  # class by class too (null: absent from truth and prediction)
        theirs = result["classScores"][name]
        assert np.isnan(theirs) if iou is None else theirs == pytest.approx(iou, abs=1e-6)

    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(images), "--output", str(tmp_path / "a"),
                 "--format", "ade20k"]) == 2  # a 19-class model cannot write ADE20K's 150 classes
