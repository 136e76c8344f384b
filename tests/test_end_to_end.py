"""The whole user path through the CLI entry point: train, eval, predict, offsets, resume."""

import json

import numpy as np
import pytest
from PIL import Image

from alignseg.checkpoint import load_checkpoint
from alignseg.cli import main
from alignseg.training.logs import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("reference_ops")]


def test_train_eval_predict_offsets_resume(tmp_path, capsys):
    run = tmp_path / "run"
    common = [
        f"data.root={tmp_path / 'data'}",
        "data.synthetic_train=4",
        "data.synthetic_val=2",
        "data.synthetic_size=[64,96]",
        "data.crop_size=[64,64]",
        "data.batch_size=2",
        "data.workers=0",
        "optim.warmup_iters=0",
        "train.log_every=1",
        "train.progress=false",
    ]
    assert main(["train", *common, "train.iterations=2", f"train.run_dir={run}"]) == 0
    assert "final val mIoU" in capsys.readouterr().out
    checkpoint = run / "checkpoint_0000002.pt"
    assert checkpoint.is_file() and (run / "best.pt").is_file()

    assert main(
        ["eval", "--checkpoint", str(checkpoint), "--mode", "slide", "eval.tile=[48,48]", "eval.stride=[32,32]"]
    ) == 0
    table = capsys.readouterr().out
    assert "mode: slide" in table and "mIoU" in table and "road" in table

    images = tmp_path / "data" / "leftImg8bit" / "val"
    out = tmp_path / "predictions"
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(images), "--output", str(out)]) == 0
    sources = sorted(images.rglob("*.png"))
    labels = sorted(p for p in out.rglob("*.png"))
    assert len(sources) == 2 and len(labels) == 2 and len(list(out.rglob("*_overlay.jpg"))) == 2
    with Image.open(labels[0]) as label, Image.open(sources[0]) as source:
        assert label.size == source.size and label.mode == "P"
        assert np.asarray(label).max() < 19

    offsets = tmp_path / "offsets"
    assert main(["offsets", "--checkpoint", str(checkpoint), "--input", str(sources[0]), "--output", str(offsets)]) == 0
    written = {p.stem for p in offsets.glob("*.png")}
    assert {"align_fa1", "align_fa2", "align_fa3", "align_fa4", "align_cm"} <= written

    # resume from the folder (its latest checkpoint) and train further, in the same run folder
    assert main(["train", "--resume", str(run), "train.iterations=3"]) == 0
    assert load_checkpoint(run / "checkpoint_0000003.pt")["iteration"] == 3
    records = read_metrics(run)
    assert [r["iteration"] for r in records if r["kind"] == "train"] == [1, 2, 3]
    assert json.loads(json.dumps(records[-1]))["kind"] == "val"
