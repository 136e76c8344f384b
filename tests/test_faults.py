"""The fault suite: kill -9 and resume, corrupt images, masks, YAML and checkpoints, hyperparameters that
would break a run, and a failed or refused start. Every error must name its file or key, nothing the user
owns may change, and a resumed run must read as if it had never stopped."""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import alignseg
from alignseg.checkpoint import CheckpointError, load_checkpoint
from alignseg.cli import main
from alignseg.config import ConfigError, load_config
from alignseg.data import (
    DataFileError,
    FolderDataset,
    make_synthetic_cityscapes,
    read_rgb_image,
)
from alignseg.training.logs import MetricsLog, read_metrics
from alignseg.training.trainer import NonFiniteWeightsError, Trainer

pytestmark = pytest.mark.usefixtures("reference_ops")

TINY = [
    "data.synthetic_train=4",
    "data.synthetic_val=1",
    "data.synthetic_size=[64,96]",
    "data.crop_size=[64,64]",
    "data.batch_size=2",
    "data.workers=0",
    "optim.warmup_iters=0",
    "train.log_every=1",
    "train.eval_every=0",
    "train.progress=false",
    "train.tensorboard=false",
]


def tiny_args(tmp_path, run="run", *extra):
    return [f"data.root={tmp_path / 'data'}", *TINY, f"train.run_dir={tmp_path / run}", *extra]


def _said(capsys, caplog) -> str:
    """Everything the command told the user (its log lines go through tqdm to stdout)."""
    captured = capsys.readouterr()
    return caplog.text + captured.out + captured.err


def _without_timing(records):
    return [{k: v for k, v in r.items() if k not in ("time", "images_per_s")} for r in records]


def _cli(*args, env_extra=None):
    """``python -m alignseg --backend reference ARGS`` in a child process (one thread: bit-reproducible)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(alignseg.__file__).parents[1]), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "alignseg", "--backend", "reference", *map(str, args)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# ----------------------------------------------------------------------------------------------
# kill -9 and resume


def test_sigkill_at_a_random_iteration_then_resume_continues_exactly(tmp_path):
    seed = random.randrange(10**6)
    kill_after = random.Random(seed).randint(3, 5)  # train records seen; checkpoint 2 exists by record 3
    settings = [
        *TINY, f"data.root={tmp_path / 'data'}", "train.iterations=6", "train.checkpoint_every=2", "train.keep_last=5"
    ]
    make_synthetic_cityscapes(tmp_path / "data", num_train=4, num_val=1, size=(64, 96), progress=False)
    reference = _cli("train", *settings, f"train.run_dir={tmp_path / 'reference'}")
    killed = _cli("train", *settings, f"train.run_dir={tmp_path / 'run'}")
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while killed.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().count('"kind": "train"') >= kill_after:
            killed.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, f"seed {seed}: the run ended before the kill:\n{killed.stdout.read()}"

    resumed = _cli("train", "--resume", tmp_path / "run")
    resumed_out = resumed.communicate(timeout=300)[0]
    reference_out = reference.communicate(timeout=300)[0]
    assert resumed.returncode == 0, resumed_out
    assert reference.returncode == 0, reference_out

    # The log reads as if the run had never stopped: each iteration once, the same losses and rates.
    records, expected = read_metrics(tmp_path / "run"), read_metrics(tmp_path / "reference")
    assert [r["iteration"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6], f"seed {seed}"
    assert _without_timing(records) == _without_timing(expected), f"seed {seed}: killed after {kill_after} records"
    # Exact continuation, and every checkpoint left intact (each load checks the digest).
    final, reference_final = load_checkpoint(tmp_path / "run"), load_checkpoint(tmp_path / "reference")
    assert final["iteration"] == reference_final["iteration"] == 6
    for key, value in reference_final["model"].items():
        assert torch.equal(final["model"][key], value), f"seed {seed}: {key} differs from the uninterrupted run"
    for path in (tmp_path / "run").glob("*.pt"):
        load_checkpoint(path)
    assert not list((tmp_path / "run").glob(".*.tmp")), "a cut-short checkpoint write was left behind"


def test_resume_logs_the_same_averages_and_drops_records_after_the_checkpoint(tmp_path):
    # log_every=2 with a checkpoint at 3: the resumed run must finish the half-full averaging window.
    full = load_config(
        "synthetic", tiny_args(tmp_path, "full", "train.iterations=4", "train.log_every=2", "train.checkpoint_every=3")
    )
    Trainer(full).fit()
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    (cut / "checkpoint_0000004.pt").unlink()
    with (cut / "metrics.jsonl").open("a") as handle:  # what a kill after iteration 4 could leave: a torn line
        handle.write('{"kind": "train", "iteration": 5, "lo')
    cfg = load_config(
        "synthetic", tiny_args(tmp_path, "cut", "train.iterations=4", "train.log_every=2", "train.checkpoint_every=3")
    )
    Trainer(cfg, resume=cut / "checkpoint_0000003.pt").fit()
    assert _without_timing(read_metrics(cut)) == _without_timing(read_metrics(tmp_path / "full"))


# ----------------------------------------------------------------------------------------------
# hyperparameters and starts that must be refused before anything is written


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=.inf", "optim.lr must be a finite number"),
        ("optim.lr=.nan", "optim.lr must be a finite number"),
        ("optim.lr=-0.1", "optim.lr must be a positive number"),
        ("optim.momentum=-1", "optim.momentum must be in [0, 1)"),
        ("optim.weight_decay=-1", "optim.weight_decay must be 0 or more"),
        ("optim.weight_decay=.nan", "optim.weight_decay must be a finite number"),
        ("loss.aux_weight=-0.5", "loss.aux_weight must be 0 or more"),
        ("data.scale_range=[0.5,.inf]", "data.scale_range must be a finite number"),
        ("eval.scales=[1.0,.nan]", "eval.scales must be a finite number"),
    ],
)
def test_broken_hyperparameters_are_refused_before_anything_is_written(tmp_path, override, message, capsys, caplog):
    assert main(["train", *tiny_args(tmp_path), override]) == 2
    assert message in _said(capsys, caplog)
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_a_failed_start_creates_no_run_folder(tmp_path, capsys, caplog):
    assert main(["train", *tiny_args(tmp_path), "data.dataset=cityscapes", f"data.root={tmp_path / 'nowhere'}"]) == 2
    assert "nowhere" in _said(capsys, caplog) and not (tmp_path / "run").exists()


def test_alignseg_data_naming_a_file_is_a_clear_error(tmp_path, monkeypatch, capsys, caplog):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("ALIGNSEG_DATA", str(tmp_path / "file"))
    assert main(["train", *TINY, f"train.run_dir={tmp_path / 'run'}"]) == 2
    assert f"ALIGNSEG_DATA={tmp_path / 'file'} is a file" in _said(capsys, caplog) and not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def _trained_once(tmp_path_factory):
    """A run folder after one iteration, trained once for the tests below; each works on a copy."""
    from alignseg.ops import use_backend

    root = tmp_path_factory.mktemp("trained")
    with use_backend("reference"):
        assert main(["train", *tiny_args(root), "train.iterations=1"]) == 0
    return root


@pytest.fixture
def trained_run(_trained_once, tmp_path) -> Path:
    """A copy of a one-iteration run folder in ``tmp_path / "run"`` (its data stays where it was made)."""
    return Path(shutil.copytree(_trained_once / "run", tmp_path / "run"))


def test_a_moved_run_folder_resumes_where_it_is_now(tmp_path, trained_run, _trained_once):
    assert main(["train", "--resume", str(trained_run), "train.iterations=2"]) == 0
    assert load_checkpoint(trained_run)["iteration"] == 2
    assert not (_trained_once / "run" / "checkpoint_0000002.pt").exists()


def test_a_refused_resume_leaves_the_run_folder_as_it_was(tmp_path, trained_run, capsys, caplog):
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert main(["train", "--resume", str(tmp_path / "run"), "optim.name=adamw"]) == 2
    assert "optimiser state does not fit this config (optim.name=adamw)" in _said(capsys, caplog)
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert after == before  # config.yaml above all


def test_a_new_run_never_writes_into_another_runs_folder(tmp_path, trained_run, capsys, caplog):
    config = (tmp_path / "run" / "config.yaml").read_bytes()
    assert main(["train", *tiny_args(tmp_path), "train.iterations=2"]) == 2
    said = _said(capsys, caplog)
    assert "already holds a run" in said and "--resume" in said
    assert (tmp_path / "run" / "config.yaml").read_bytes() == config


def test_non_finite_weights_are_never_saved_as_best(tmp_path):
    trainer = Trainer(load_config("synthetic", tiny_args(tmp_path, "run", "train.iterations=1")))
    step = trainer._step

    def step_then_break(images, labels):  # a finite loss, then an update that breaks the weights (lr huge)
        loss = step(images, labels)
        with torch.no_grad():
            next(trainer.model.parameters()).fill_(math.inf)
        return loss

    trainer._step = step_then_break
    with pytest.raises(NonFiniteWeightsError, match="weight tensors hold NaN or infinite values"):
        trainer.fit()
    assert not list((tmp_path / "run").glob("*.pt"))


def test_metrics_file_is_strict_json(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    log.write("train", 1, {"loss": math.nan, "lr": math.inf, "iou": {"road": math.nan, "car": 0.5}})

    def refuse(token):
        raise AssertionError(f"{token} is not JSON")

    record = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert record["loss"] is None and record["lr"] is None and record["iou"] == {"road": None, "car": 0.5}


# ----------------------------------------------------------------------------------------------
# corrupt files: each error names the file


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture
def synthetic(tmp_path):
    root = make_synthetic_cityscapes(tmp_path / "data", num_train=4, num_val=1, size=(64, 96), progress=False)
    images = sorted((root / "leftImg8bit" / "train").rglob("*.png"))
    labels = sorted((root / "gtFine" / "train").rglob("*_labelIds.png"))
    return root, images, labels


def test_a_truncated_training_image_stops_the_run_with_its_name(tmp_path, synthetic):
    _, images, _ = synthetic
    _truncate(images[1])
    trainer = Trainer(load_config("synthetic", tiny_args(tmp_path, "run", "train.iterations=2")))
    with pytest.raises(DataFileError, match=f"cannot read image file {images[1]}"):
        trainer.fit()


def test_a_corrupt_mask_read_by_a_loader_worker_is_named_in_one_line(tmp_path, synthetic, capsys, caplog):
    _, _, labels = synthetic
    _truncate(labels[0])
    assert main(["train", *tiny_args(tmp_path), "train.iterations=2", "data.workers=1", "data.batch_size=4"]) == 2
    said = _said(capsys, caplog)
    assert f"error: cannot read label file {labels[0]}" in said and "Original Traceback" not in said


def test_skip_policy_trains_past_a_corrupt_sample_and_names_it(tmp_path, synthetic, capsys, caplog):
    _, _, labels = synthetic
    labels[2].write_bytes(b"not a png at all")
    cfg = load_config("synthetic", tiny_args(tmp_path, "run", "train.iterations=2", "data.on_corrupt=skip"))
    Trainer(cfg).fit()
    assert (
        f"skipping a corrupt sample (1 so far; data.on_corrupt=skip): cannot read label file {labels[2]}"
        in _said(capsys, caplog)
    )
    assert load_checkpoint(tmp_path / "run")["iteration"] == 2


def test_check_data_reports_every_bad_file(tmp_path, synthetic, capsys, caplog):
    root, images, labels = synthetic
    data = [f"data.root={root}", *TINY]
    assert main(["check-data", "--quiet", *data]) == 0
    assert "train: 4 image/label pairs, 0 with problems" in capsys.readouterr().out
    _truncate(images[0])
    from PIL import Image

    Image.fromarray(np.full((64, 96), 77, np.uint8)).save(labels[3])  # not a Cityscapes label id
    assert main(["check-data", "--quiet", "--split", "train", *data]) == 1
    out = capsys.readouterr().out
    assert "4 image/label pairs, 2 with problems" in out
    assert f"cannot read image file {images[0]}" in out and f"label file {labels[3]} holds values outside" in out


def test_broken_yaml_names_the_file(tmp_path, capsys, caplog):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  name: alignseg_tiny\n data: [oops\n")
    assert main(["train", "--config", str(path)]) == 2
    assert f"config file {path} is not valid YAML" in _said(capsys, caplog)


def test_flipped_bytes_in_a_checkpoint_are_caught(trained_run):
    path = trained_run / "checkpoint_0000001.pt"
    state = load_checkpoint(path)
    weight = max(state["model"].values(), key=lambda t: t.numel())
    stored = torch.empty(0, dtype=torch.uint8).set_(weight.untyped_storage()).numpy().tobytes()  # as laid out on disk
    data = bytearray(path.read_bytes())
    start = data.find(stored[:256])
    assert start > 0
    data[start + 128 : start + 192] = bytes(b ^ 0xFF for b in data[start + 128 : start + 192])
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is damaged: its contents do not match the SHA-256"):
        load_checkpoint(path)


def test_folder_dataset_without_pairs_names_the_suffix_option(tmp_path):
    for folder in ("images", "masks"):
        (tmp_path / folder).mkdir()
    (tmp_path / "images" / "a.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"\(images \*\.jpg; set data.options.image_suffix"):
        FolderDataset(tmp_path / "images", tmp_path / "masks")


def test_sixteen_bit_and_odd_image_modes(tmp_path):
    from PIL import Image

    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    rgb = np.asarray(read_rgb_image(tmp_path / "deep.png"))
    np.testing.assert_array_equal(rgb[..., 0], np.round(ramp / 257).astype(np.uint8))  # not clipped to 255
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(DataFileError, match=f"image file {tmp_path / 'float.tif'} has pixel mode 'F'"):
        read_rgb_image(tmp_path / "float.tif")
    (tmp_path / "fake.png").write_text("hello")
    with pytest.raises(DataFileError, match=f"cannot read image file {tmp_path / 'fake.png'}"):
        read_rgb_image(tmp_path / "fake.png")


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="eval.stride=.* needs eval.tile"):
        load_config("synthetic", ["eval.stride=[8,8]"])


# ----------------------------------------------------------------------------------------------
# prediction never destroys or mixes up files


class _CountingModel(torch.nn.Module):
    """Class 13 where the red channel is bright; counts its forward passes."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(()))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        logits = torch.zeros(x.shape[0], 19, *x.shape[-2:])
        logits[:, 13] = x[:, 0] + self.bias
        return logits


def _photos(folder: Path, names=("a.png", "scene.jpg", "scene.png")) -> dict[Path, bytes]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        photo = np.zeros((6, 8, 3), np.uint8)
        photo[:, i + 2 :, 0] = 255
        Image.fromarray(photo).save(folder / name, quality=100)
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _unchanged(files: dict[Path, bytes]) -> bool:
    return all(path.read_bytes() == data for path, data in files.items())


def test_predict_refuses_the_input_folder_as_output_and_writes_nothing(tmp_path):
    from alignseg.api import predict_folder

    inputs = _photos(tmp_path / "photos")
    model = _CountingModel()
    with pytest.raises(ValueError, match="is the input folder"):
        predict_folder(model, tmp_path / "photos", tmp_path / "photos", progress=False)
    with pytest.raises(
        ValueError, match=f"refusing to write {tmp_path / 'photos' / 'a.png'}: it is one of the input images"
    ):
        predict_folder(model, tmp_path / "photos" / "a.png", tmp_path / "photos", progress=False)
    assert model.calls == 0 and _unchanged(inputs) and len(list((tmp_path / "photos").iterdir())) == 3


def test_predict_gives_colliding_names_their_own_outputs_and_skips_its_output_folder(tmp_path):
    from PIL import Image

    from alignseg.api import predict_folder

    inputs = _photos(tmp_path / "photos")
    out = tmp_path / "photos" / "predictions"  # inside the input folder
    run = predict_folder(_CountingModel(), tmp_path / "photos", out, progress=False)
    names = sorted(p.name for pair in run.written for p in pair)
    assert names == [
        "a.png", "a_overlay.jpg", "scene_jpg.png", "scene_jpg_overlay.jpg", "scene_png.png", "scene_png_overlay.jpg"
    ]
    assert (
        np.asarray(Image.open(out / "scene_jpg.png"))[0].tolist()
        != np.asarray(Image.open(out / "scene_png.png"))[0].tolist()
    )
    # a second run reads only the three photos, not the predictions, and replaces only with --overwrite
    with pytest.raises(ValueError, match="6 output files exist already.*--overwrite"):
        predict_folder(_CountingModel(), tmp_path / "photos", out, progress=False)
    model = _CountingModel()
    again = predict_folder(model, tmp_path / "photos", out, progress=False, overwrite=True)
    assert len(again.written) == 3 and model.calls == 3 and _unchanged(inputs)


def test_predict_checks_the_output_before_any_inference(tmp_path):
    from alignseg.api import predict_folder

    _photos(tmp_path / "photos")
    (tmp_path / "taken").write_text("a file")
    model = _CountingModel()
    with pytest.raises(ValueError, match=f"--output {tmp_path / 'taken'} is a file"):
        predict_folder(model, tmp_path / "photos", tmp_path / "taken", progress=False)
    assert model.calls == 0


def test_predict_reports_bad_images_by_name_and_goes_on(tmp_path, capsys, caplog):
    inputs = _photos(tmp_path / "photos", names=("a.png", "b.jpg", "c.png"))
    (tmp_path / "photos" / "fake.png").write_text("not an image")
    _truncate(tmp_path / "photos" / "b.jpg", keep=0.6)
    checkpoint = _untrained_checkpoint(tmp_path)
    code = main(
        ["--backend", "reference", "predict", "--checkpoint", str(checkpoint),
         "--input", str(tmp_path / "photos"), "--output", str(tmp_path / "out")]
    )
    said = _said(capsys, caplog)
    assert code == 1
    assert "2 images done, 2 failed" in said
    assert f"{tmp_path / 'photos' / 'fake.png'}" in said and f"{tmp_path / 'photos' / 'b.jpg'}" in said
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "a_overlay.jpg", "c.png", "c_overlay.jpg"]
    assert all(path.read_bytes() == data for path, data in inputs.items() if path.name != "b.jpg")


def test_predict_one_file_and_offsets_of_a_folder(tmp_path):
    _photos(tmp_path / "photos", names=("a.png", "b.jpg"))
    checkpoint = _untrained_checkpoint(tmp_path)
    base = ["--backend", "reference"]
    assert main(
        [*base, "predict", "--checkpoint", str(checkpoint),
         "--input", str(tmp_path / "photos" / "a.png"), "--output", str(tmp_path / "one")]
    ) == 0
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["a.png", "a_overlay.jpg"]
    assert main(
        [*base, "offsets", "--checkpoint", str(checkpoint),
         "--input", str(tmp_path / "photos"), "--output", str(tmp_path / "fields")]
    ) == 0
    for name in ("a", "b"):
        assert {"align_cm.png", "input.png", "offsets_legend.png"} <= {
            p.name for p in (tmp_path / "fields" / name).iterdir()
        }
    # offsets beside the input images would write input.png there: refused
    assert main(
        [*base, "offsets", "--checkpoint", str(checkpoint),
         "--input", str(tmp_path / "photos" / "a.png"), "--output", str(tmp_path / "photos")]
    ) == 2


def _untrained_checkpoint(tmp_path) -> Path:
    from alignseg.builders import build_model
    from alignseg.checkpoint import save_checkpoint

    cfg = load_config("synthetic", [f"data.root={tmp_path / 'data'}", *TINY])
    return save_checkpoint(
        tmp_path / "tiny.pt", {"iteration": 0, "model": build_model(cfg).state_dict(), "config": cfg.to_dict()}
    )


# ----------------------------------------------------------------------------------------------
# evaluation a user can wait for and keep


def test_the_slide_tile_follows_the_data_and_multiscale_can_run_whole():
    from alignseg.config import eval_setting
    from alignseg.evaluation import build_inference_mode

    demo = build_inference_mode(**eval_setting(load_config("synthetic", ["eval.mode=slide"])))
    assert demo.tile == (128, 128)  # the demo's crop, not Cityscapes' 872
    whole_scales = build_inference_mode(
        **eval_setting(load_config("synthetic", ["eval.mode=multiscale", "eval.tile=null"]))
    )
    assert whole_scales.tile is None and len(whole_scales.scales) == 5
    cityscapes = build_inference_mode(**eval_setting(load_config("cityscapes", ["eval.mode=slide"])))
    assert cityscapes.tile == (872, 872) and cityscapes.stride == (582, 582)  # the authors' evaluate.py


def test_eval_writes_a_json_report_beside_the_checkpoint(tmp_path, capsys):
    make_synthetic_cityscapes(tmp_path / "data", num_train=4, num_val=1, size=(64, 96), progress=False)
    checkpoint = _untrained_checkpoint(tmp_path)
    argv = [
        "--backend", "reference", "eval", "--checkpoint", str(checkpoint),
        "--mode", "multiscale", "eval.tile=null", "eval.scales=[0.5,1.0]",
    ]
    assert main(argv) == 0
    report = json.loads((tmp_path / "tiny.eval-multiscale.json").read_text())
    assert report["inference"] == {
        "mode": "multiscale", "tile": None, "stride": None, "scales": [0.5, 1.0], "flip": False,
        "description": "multiscale(scales 0.5,1; whole)",
    }  # fmt: skip
    matrix = np.array(report["confusion_matrix"])
    assert matrix.shape == (19, 19) and matrix.sum() == report["num_pixels"] == 64 * 96
    assert report["pixel_accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    assert set(report["iou"]) == set(report["class_names"]) and "mIoU" in report["table"] and report["iteration"] == 0
    assert main([*argv, "--output", str(tmp_path / "elsewhere" / "r.json")]) == 0
    assert json.loads((tmp_path / "elsewhere" / "r.json").read_text())["miou"] == report["miou"]


def test_config_command_prints_the_resolved_config_and_the_keys(capsys):
    assert main(["config", "cityscapes", "train.iterations=7"]) == 0
    out = capsys.readouterr().out
    import yaml

    resolved = yaml.safe_load(out)
    assert resolved["train"]["iterations"] == 7 and resolved["eval"]["tile"] == [872, 872]
    assert "#   optim.lr  float  = 0.01" in out and "#   data.on_corrupt  str  = 'stop'  (one of stop, skip)" in out
