"""The Python front door (alignseg.api) and the input convention each model carries (issues 11 and 14).

References: the class maps are compared with the model run directly on tensors normalised in the test (the
ImageNet formula written out for our checkpoints; for the authors' checkpoints their pipeline, emulated from
their dataset/datasets.py and evaluate.py with the port in tests/authors_reference.py).
"""

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from authors_reference import AuthorsAlignSeg, authors_evaluate_whole, calibrate_offsets_, randomize_
from PIL import Image

import alignseg
from alignseg import api
from alignseg.builders import build_model, resolve_input_convention
from alignseg.checkpoint import load_checkpoint, save_checkpoint
from alignseg.cli import main
from alignseg.config import ConfigError, config_from_dict, load_config
from alignseg.data.convention import AUTHORS_CONVENTION, IMAGENET_CONVENTION, IMAGENET_MEAN, IMAGENET_STD
from alignseg.evaluation import build_inference_mode

pytestmark = pytest.mark.usefixtures("reference_ops")

TINY = ["data.synthetic_train=2", "data.synthetic_val=1", "data.synthetic_size=[40,56]", "data.crop_size=[40,40]",
        "data.batch_size=2", "data.workers=0", "train.log_every=1", "train.progress=false", "train.device=cpu"]
IMAGENET_OVERRIDE = ("model.input={channel_order: RGB, scale: 0.00392156862745098, mean: [0.485, 0.456, 0.406], "
                     "std: [0.229, 0.224, 0.225]}")
AUTHORS_MEAN_BGR = np.array((104.00698793, 116.66876762, 122.67891434), np.float32)  # their IMG_MEAN


def _photo(seed: int, size=(37, 53)) -> np.ndarray:
    """Smooth random colours (blobs, not noise), uint8 [H, W, 3]: class maps with regions, like a photo's."""
    coarse = torch.rand(1, 3, 5, 7, generator=torch.Generator().manual_seed(seed))
    return (F.interpolate(coarse, size=size, mode="bilinear") * 255).round().byte()[0].permute(1, 2, 0).numpy()


def _imagenet_class_map(model, photo: np.ndarray) -> torch.Tensor:
    """The pre-convention path, written out: x / 255, minus the ImageNet mean, over the std; argmax of the logits."""
    x = torch.from_numpy(photo).permute(2, 0, 1).float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        logits = model.eval()(x[None])
    logits = F.interpolate(logits, size=photo.shape[:2], mode="bilinear", align_corners=True)
    return logits.argmax(1)[0]


@pytest.fixture(scope="module")
def own_checkpoint(tmp_path_factory):
    """A tiny checkpoint of ours, saved as the trainer saves one (with its input convention)."""
    folder = tmp_path_factory.mktemp("own")
    cfg = load_config("synthetic", [f"data.root={folder / 'data'}", *TINY])
    torch.manual_seed(1)
    model = build_model(cfg)
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so normalisation matters
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    state = {"iteration": 0, "model": model.state_dict(), "config": cfg.to_dict()}
    return save_checkpoint(folder / "own.pt", {**state, "input": IMAGENET_CONVENTION.to_dict()})


def test_segment_takes_every_kind_of_image_and_matches_the_old_path(own_checkpoint, tmp_path, caplog):
    model = api.load_model(own_checkpoint, device="cpu")
    assert model.info.input == IMAGENET_CONVENTION and model.info.num_classes == 19 and not model.training
    assert model.info.dataset.name == "synthetic" and model.info.dataset.palette.shape == (19, 3)
    photo = _photo(0)
    expected = _imagenet_class_map(model, photo)
    assert len(expected.unique()) > 1  # a map with regions, so a wrong normalisation would show
    Image.fromarray(photo).save(tmp_path / "photo.png")

    for image in (tmp_path / "photo.png", str(tmp_path / "photo.png"), Image.fromarray(photo), photo,
                  torch.from_numpy(photo).permute(2, 0, 1)):
        label = alignseg.segment(model, image)
        assert label.dtype == torch.int64 and label.shape == photo.shape[:2]
        torch.testing.assert_close(label, expected, rtol=0, atol=0)
    batch = alignseg.segment(model, torch.from_numpy(np.stack([photo, photo[::-1].copy()])).permute(0, 3, 1, 2))
    assert batch.shape == (2, *photo.shape[:2])
    torch.testing.assert_close(batch[0], expected, rtol=0, atol=0)
    torch.testing.assert_close(batch[1], _imagenet_class_map(model, photo[::-1].copy()), rtol=0, atol=0)
    listed = alignseg.segment(model, [photo, photo[:20, :30].copy()])
    assert [tuple(m.shape) for m in listed] == [photo.shape[:2], (20, 30)]

    # grey and RGBA are converted, and the log says so
    grey = photo.mean(2).astype(np.uint8)
    with caplog.at_level(logging.INFO, logger="alignseg"):
        from_grey = alignseg.segment(model, Image.fromarray(grey))
        from_rgba = alignseg.segment(model, np.dstack([photo, np.full(photo.shape[:2], 7, np.uint8)]))
    assert "pixel mode L read as RGB" in caplog.text and "alpha dropped" in caplog.text
    torch.testing.assert_close(from_grey, _imagenet_class_map(model, np.repeat(grey[..., None], 3, 2)), rtol=0, atol=0)
    torch.testing.assert_close(from_rgba, expected, rtol=0, atol=0)
    # slide and multiscale run too (the tile comes from the checkpoint's config)
    assert alignseg.segment(model, photo, "slide").shape == photo.shape[:2]
    assert alignseg.segment(model, photo, "multiscale", scales=(0.5, 1.0), flip=True).shape == photo.shape[:2]

    with pytest.raises(TypeError, match="uint8"):
        alignseg.segment(model, photo.astype(np.float32))
    with pytest.raises(ValueError, match=r"C = 1, 3 or 4"):
        alignseg.segment(model, np.zeros((4, 5, 2), np.uint8))
    with pytest.raises(ValueError, match="neither a checkpoint file nor a model preset"):
        alignseg.load_model("alignseg_huge")
    with pytest.raises(ValueError, match="num_classes=7, but checkpoint"):
        alignseg.load_model(own_checkpoint, num_classes=7)


def test_render_draws_the_palette_picture_and_the_overlay(own_checkpoint, tmp_path):
    model = alignseg.load_model(own_checkpoint, device="cpu")
    photo = _photo(1)
    label = alignseg.segment(model, photo)
    alignseg.render(label, palette=model).save(tmp_path / "label.png")
    with Image.open(tmp_path / "label.png") as png:
        assert png.mode == "P"
        np.testing.assert_array_equal(np.asarray(png), label.numpy())  # pixel values are the class ids
        colours = np.asarray(png.convert("RGB"))
    np.testing.assert_array_equal(colours, model.info.dataset.palette[label.numpy()])
    blended = np.asarray(alignseg.render(label, photo, palette=model, alpha=1.0))
    np.testing.assert_array_equal(blended, colours)
    np.testing.assert_array_equal(np.asarray(alignseg.render(label, Image.fromarray(photo), alpha=0.0)), photo)


def test_a_preset_name_gives_an_untrained_model_with_its_convention():
    model = alignseg.load_model("alignseg_tiny", device="cpu", num_classes=150)
    assert model.info.input == IMAGENET_CONVENTION and model.info.dataset.name == "ade20k"
    assert alignseg.segment(model, _photo(2, (33, 33))).max() < 150


def test_predict_writes_what_segment_returns_for_our_checkpoint(own_checkpoint, tmp_path):
    photo = _photo(3)
    Image.fromarray(photo).save(tmp_path / "in.png")
    assert main(["predict", "--checkpoint", str(own_checkpoint), "--input", str(tmp_path / "in.png"),
                 "--output", str(tmp_path / "out")]) == 0
    model = alignseg.load_model(own_checkpoint, device="cpu")
    written = np.asarray(Image.open(tmp_path / "out" / "in.png"))
    np.testing.assert_array_equal(written, _imagenet_class_map(model, photo))


# --- the input convention of a checkpoint -------------------------------------------------------------------


def test_an_older_checkpoint_gets_todays_convention_and_the_log_says_so(own_checkpoint, tmp_path, caplog):
    state = load_checkpoint(own_checkpoint)
    del state["input"]
    old = state["config"]
    old["data"].update(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))  # the keys older configs had
    older = save_checkpoint(tmp_path / "older.pt", state)
    with caplog.at_level(logging.INFO, logger="alignseg"):
        model = alignseg.load_model(older, device="cpu")
    assert model.info.input == IMAGENET_CONVENTION
    assert "records no input convention (an older file)" in caplog.text
    photo = _photo(4)
    torch.testing.assert_close(alignseg.segment(model, photo), _imagenet_class_map(model, photo), rtol=0, atol=0)

    # an older config with its own mean/std keeps them, as model.input
    old["data"].update(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    cfg = config_from_dict(old)
    assert cfg.model.input == {"channel_order": "RGB", "scale": 1 / 255, "mean": [0.5] * 3, "std": [0.25] * 3}
    assert resolve_input_convention(cfg, {"path": "older.pt"}).mean == (0.5, 0.5, 0.5)
    with pytest.raises(ConfigError, match="data.mean is now part of model.input"):
        load_config("synthetic", ["data.mean=[0.5,0.5,0.5]"])


def test_an_override_that_disagrees_with_the_checkpoint_is_an_error_naming_both(own_checkpoint, caplog):
    bgr = "model.input={channel_order: BGR, scale: 1.0, mean: [104.0, 116.7, 122.7], std: [1, 1, 1]}"
    with pytest.raises(ConfigError, match=re.escape("model.input (BGR x1, mean (104, 116.7, 122.7), std (1, 1, 1)) "
                                                    "disagrees with the input convention of checkpoint")):
        alignseg.load_model(own_checkpoint, device="cpu", overrides=[bgr])
    assert main(["predict", "--checkpoint", str(own_checkpoint), "--input", "x.png", "--output", "o", bgr]) == 2
    assert "RGB x1/255, mean (0.485, 0.456, 0.406)" in caplog.text  # the checkpoint's, in the same message
    same = IMAGENET_OVERRIDE
    assert alignseg.load_model(own_checkpoint, device="cpu", overrides=[same]).info.input == IMAGENET_CONVENTION


def _authors_net(seed: int) -> AuthorsAlignSeg:
    """The port of their network, tiny ResNet-50 layout, random weights with offsets calibrated on their inputs."""
    generator = torch.Generator().manual_seed(seed)
    net = randomize_(AuthorsAlignSeg(19, layers=(3, 4, 6, 3), width=4, decoder=8), generator).eval()
    calibration = torch.rand(2, 3, 41, 57, generator=generator) * 255 - torch.from_numpy(AUTHORS_MEAN_BGR).view(3, 1, 1)
    calibrate_offsets_(net, calibration)
    return net


def _authors_pipeline(net: AuthorsAlignSeg, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Their evaluation of one image file: cv2.imread order (BGR; here PIL reversed), float32 0..255 minus IMG_MEAN
    (dataset/datasets.py L175, L182-183), [C, H, W], their network, bilinear upsampling with align_corners=True
    (evaluate.py predict_whole), argmax. Returns (class map, top-1 minus top-2 logit per pixel)."""
    bgr = np.asarray(Image.open(path).convert("RGB"))[..., ::-1].astype(np.float32) - AUTHORS_MEAN_BGR
    with torch.no_grad():
        logits = authors_evaluate_whole(net, torch.from_numpy(bgr.transpose(2, 0, 1).copy())[None])[0]
    top2 = logits.topk(2, dim=0).values
    return logits.argmax(0), top2[0] - top2[1]


def test_a_converted_authors_checkpoint_predicts_as_their_pipeline(tmp_path, caplog):
    net = _authors_net(seed=5)
    src, dst = tmp_path / "CS_scenes_120000.pth", tmp_path / "authors.pt"
    torch.save(net.state_dict(), src)
    assert main(["convert", str(src), str(dst)]) == 0
    assert load_checkpoint(dst)["input"] == AUTHORS_CONVENTION.to_dict()
    photo = _photo(6, (41, 57))
    Image.fromarray(photo).save(tmp_path / "street.png")
    theirs, margin = _authors_pipeline(net, tmp_path / "street.png")
    assert len(theirs.unique()) > 2

    assert main(["--backend", "reference", "predict", "--checkpoint", str(dst), "--input", str(tmp_path / "street.png"),
                 "--output", str(tmp_path / "out"), "--mode", "whole"]) == 0
    predicted = torch.from_numpy(np.asarray(Image.open(tmp_path / "out" / "street.png")).astype(np.int64))
    model = alignseg.load_model(dst, device="cpu")
    assert model.info.input == AUTHORS_CONVENTION
    segmented = alignseg.segment(model, tmp_path / "street.png")
    # float32 on both sides: the maps agree wherever the top two classes are not a near tie
    clear = margin > 1e-4 * margin.abs().max()
    assert clear.float().mean() > 0.99
    for ours in (predicted, segmented):
        assert torch.equal(ours[clear], theirs[clear])
    # the test can fail: the same weights fed this project's own normalisation give another map
    wrong = api.class_map(model, torch.from_numpy(photo).permute(2, 0, 1), build_inference_mode("whole"),
                          IMAGENET_CONVENTION)
    assert (wrong != theirs).float().mean() > 0.2


def test_training_from_a_converted_checkpoint_takes_its_convention(tmp_path):
    from alignseg.training.trainer import Trainer

    net = _authors_net(seed=7)
    src, dst = tmp_path / "authors.pth", tmp_path / "authors.pt"
    torch.save(net.state_dict(), src)
    assert main(["convert", str(src), str(dst)]) == 0
    stored = load_checkpoint(dst)["config"]
    cfg = load_config("synthetic", [f"data.root={tmp_path / 'data'}", *TINY, "train.iterations=1",
                                    f"train.run_dir={tmp_path / 'run'}", f"model.init={dst}",
                                    f"model.name={stored['model']['name']}"])
    cfg.model.options = stored["model"]["options"]
    trainer = Trainer(cfg)
    assert trainer.convention == AUTHORS_CONVENTION
    assert trainer.train_set.transform.convention == AUTHORS_CONVENTION
    assert trainer.val_set.transform.convention == AUTHORS_CONVENTION
    trainer.fit()
    assert load_checkpoint(tmp_path / "run" / "best.pt")["input"] == AUTHORS_CONVENTION.to_dict()
    cfg2 = load_config("synthetic", [f"data.root={tmp_path / 'data'}", *TINY, f"train.run_dir={tmp_path / 'run2'}",
                                     f"model.init={dst}", IMAGENET_OVERRIDE])
    with pytest.raises(ConfigError, match="disagrees with the input convention of checkpoint .*BGR x1, mean"):
        Trainer(cfg2)
    assert not (tmp_path / "run2").exists()
