"""Dataset facts (alignseg.data.metainfo), the input convention, and the model-preset records."""

import numpy as np
import pytest
import torch

from alignseg.data import (
    IMAGENET_CONVENTION,
    ADE20KDataset,
    CityscapesDataset,
    FolderDataset,
    InputConvention,
    build_eval_transform,
    get_metainfo,
)
from alignseg.data import metainfo as mi
from alignseg.models import PRESETS, build, get_preset, list_models

# Known answers for a few classes (label id, train id, colour), typed here from cityscapesScripts' labels.py,
# independently of metainfo.py; the whole table is compared with the installed package when present.
CITYSCAPES_KNOWN = {"road": (7, 0, (128, 64, 128)), "sky": (23, 10, (70, 130, 180)), "bicycle": (33, 18, (119, 11, 32))}


def test_cityscapes_table_matches_the_official_cityscapesscripts_labels():
    labels = pytest.importorskip("cityscapesscripts.helpers.labels")
    official = [lab for lab in labels.labels if lab.id >= 0]
    ours = [
        (lab.name, lab.id, lab.train_id, lab.category, lab.has_instances, lab.ignore_in_eval, lab.color)
        for lab in mi.CITYSCAPES_LABELS
    ]
    theirs = [
        (lab.name, lab.id, lab.trainId, lab.category, lab.hasInstances, lab.ignoreInEval, lab.color) for lab in official
    ]
    assert ours == theirs


def test_cityscapes_facts_and_both_mappings():
    for name, (label_id, train_id, colour) in CITYSCAPES_KNOWN.items():
        assert mi.CITYSCAPES_CLASSES[train_id] == name and mi.CITYSCAPES_TRAIN_ID_TO_ID[train_id] == label_id
        assert tuple(mi.CITYSCAPES_PALETTE[train_id]) == colour
    assert len(mi.CITYSCAPES_CLASSES) == 19 and mi.CITYSCAPES_PALETTE.shape == (19, 3)
    train_ids = np.arange(19).reshape(1, 19)
    label_ids = mi.train_ids_to_cityscapes_ids(train_ids)
    assert label_ids.dtype == np.uint8 and label_ids.min() == 7 and label_ids.max() == 33
    np.testing.assert_array_equal(mi.cityscapes_ids_to_train_ids(label_ids), train_ids)  # round trip
    # every label id not evaluated is ignored; values that are no label id are -1 (reported by the loader)
    void = np.array([i for i in range(34) if i not in mi.CITYSCAPES_ID_TO_TRAIN_ID] + [255], np.uint8)
    assert len(void) == 16 and (mi.cityscapes_ids_to_train_ids(void) == 255).all()
    assert (mi.cityscapes_ids_to_train_ids(np.array([34, 254, 1000, -3])) == -1).all()
    for bad in (np.array([19]), np.array([255]), np.array([-1])):
        with pytest.raises(ValueError, match="train ids"):
            mi.train_ids_to_cityscapes_ids(bad)
    with pytest.raises(TypeError, match="integer"):
        mi.train_ids_to_cityscapes_ids(np.zeros(2, np.float32))


def test_ade20k_convention_round_trip():
    raw = np.array([[0, 1, 150], [2, 0, 75]], np.uint8)
    train = mi.ade20k_to_train_ids(raw)
    np.testing.assert_array_equal(train, [[255, 0, 149], [1, 255, 74]])
    np.testing.assert_array_equal(mi.train_ids_to_ade20k(np.array([[0, 149], [1, 74]])), [[1, 150], [2, 75]])
    with pytest.raises(ValueError, match=r"\[0, 150\)"):
        mi.train_ids_to_ade20k(np.array([150]))
    assert len(set(mi.ADE20K_CLASSES)) == 150 and len({tuple(c) for c in mi.ADE20K_PALETTE}) == 150


def test_datasets_read_their_facts_from_metainfo(tmp_path):
    assert (
        CityscapesDataset.meta is get_metainfo("cityscapes") and CityscapesDataset.class_names == mi.CITYSCAPES_CLASSES
    )
    assert ADE20KDataset.meta is get_metainfo("ade20k") and ADE20KDataset.num_classes == 150
    assert get_metainfo("synthetic").classes == mi.CITYSCAPES_CLASSES
    assert get_metainfo("Cityscapes", num_classes=19).ignore_index == 255
    (tmp_path / "img").mkdir(), (tmp_path / "mask").mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "img" / "a.jpg")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "mask" / "a.png")
    folder = FolderDataset(tmp_path / "img", tmp_path / "mask", num_classes=3, class_names=["x", "y", "z"])
    assert folder.meta.classes == ("x", "y", "z") and folder.meta.palette.shape == (3, 3)
    with pytest.raises(ValueError, match="num_classes"):
        get_metainfo("folder")
    with pytest.raises(ValueError, match="cityscapes has 19 classes"):
        get_metainfo("cityscapes", num_classes=20)
    with pytest.raises(ValueError, match="dataset name must be one of"):
        get_metainfo("kitti")
    with pytest.raises(ValueError):  # the palettes are read-only facts
        mi.CITYSCAPES_META.palette[0, 0] = 1


def test_input_convention_normalizes_like_the_eval_transform():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, (3, 5, 7), dtype=np.uint8))
    expected = (
        image.double() / 255 - torch.tensor(IMAGENET_CONVENTION.mean, dtype=torch.float64).view(3, 1, 1)
    ) / torch.tensor(IMAGENET_CONVENTION.std, dtype=torch.float64).view(3, 1, 1)
    out = IMAGENET_CONVENTION.normalize(image)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, build_eval_transform().normalize(image))  # the loaders' normalisation
    batch = IMAGENET_CONVENTION.normalize(image[None].expand(2, -1, -1, -1))
    torch.testing.assert_close(batch[1], out)
    bgr = InputConvention("BGR", 1.0, (1.0, 2.0, 3.0), (1.0, 1.0, 2.0)).normalize(image)
    torch.testing.assert_close(bgr[0], image[2].float() - 1.0)  # blue first, its own mean
    torch.testing.assert_close(bgr[2], (image[0].float() - 3.0) / 2.0)


def test_input_convention_round_trips_and_checks():
    convention = InputConvention("BGR", 1.0, (103.5, 116.3, 123.7), (57.4, 57.1, 58.4))
    assert InputConvention.from_dict(convention.to_dict()) == convention
    assert InputConvention.from_dict(IMAGENET_CONVENTION.to_dict()) == IMAGENET_CONVENTION
    buffer = __import__("io").BytesIO()
    torch.save({"input": IMAGENET_CONVENTION.to_dict()}, buffer)
    buffer.seek(0)
    assert InputConvention.from_dict(torch.load(buffer, weights_only=True)["input"]) == IMAGENET_CONVENTION
    with pytest.raises(ValueError, match=r"missing \['std'\], unknown \['sdt'\]"):
        InputConvention.from_dict({"channel_order": "RGB", "scale": 1.0, "mean": [0, 0, 0], "sdt": [1, 1, 1]})
    with pytest.raises(ValueError, match="channel_order"):
        InputConvention("RGBA")
    with pytest.raises(ValueError, match="std must be positive"):
        InputConvention(std=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="mean must be 3 numbers"):
        InputConvention(mean=(0.5, 0.5))
    with pytest.raises(TypeError, match="uint8"):
        IMAGENET_CONVENTION.normalize(torch.zeros(3, 2, 2))
    with pytest.raises(ValueError, match=r"\[\.\.\., 3, H, W\]"):
        IMAGENET_CONVENTION.normalize(torch.zeros(2, 2, 3, dtype=torch.uint8))


def test_model_presets_are_single_records():
    assert list_models() == sorted(PRESETS) == ["alignseg_r101", "alignseg_r18", "alignseg_r50", "alignseg_tiny"]
    for name, preset in PRESETS.items():
        assert preset.name == name and preset.description and preset.weights
        assert preset.input == IMAGENET_CONVENTION and preset.input.channel_order == "RGB"
    assert dict(get_preset("alignseg_r101").architecture) == {
        "depth": 101,
        "backbone_width": 64,
        "decoder_channels": 256,
    }
    model = build("alignseg_tiny", 3, decoder_channels=8)
    assert model.config["decoder_channels"] == 8 and model.config["backbone_width"] == 16
    with pytest.raises(TypeError):  # the record is read-only
        get_preset("alignseg_tiny").architecture["depth"] = 50
    with pytest.raises(ValueError, match="model name must be one of"):
        get_preset("alignseg_r152")
