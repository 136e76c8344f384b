"""Datasets read tiny fake trees written in the real Cityscapes / ADE20K / folder layouts."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alignseg.data import (
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    ADE20KDataset,
    CityscapesDataset,
    FolderDataset,
    build_dataset,
    build_eval_transform,
    cityscapes_ids_to_train_ids,
)

pytestmark = pytest.mark.usefixtures("reference_ops")

# Independent known answer: the Cityscapes label table (name, id, trainId) for the ids that are evaluated.
CITYSCAPES_TABLE = {
    "road": (7, 0), "sidewalk": (8, 1), "building": (11, 2), "wall": (12, 3), "fence": (13, 4), "pole": (17, 5),
    "traffic light": (19, 6), "traffic sign": (20, 7), "vegetation": (21, 8), "terrain": (22, 9), "sky": (23, 10),
    "person": (24, 11), "rider": (25, 12), "car": (26, 13), "truck": (27, 14), "bus": (28, 15), "train": (31, 16),
    "motorcycle": (32, 17), "bicycle": (33, 18),
}  # fmt: skip
# unlabeled ... parking, rail track, polegroup, caravan, trailer
VOID_IDS = (0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30)


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _photo(rng, h, w) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_cityscapes(
    root: Path, split: str, labels: dict[str, np.ndarray], train_ids: dict[str, np.ndarray] | None = None
):
    """labels: {"city/stem": labelIds array}; train_ids: optional labelTrainIds files."""
    rng = np.random.default_rng(0)
    for key, ids in labels.items():
        city, stem = key.split("/")
        _save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", _photo(rng, *ids.shape))
        _save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", ids.astype(np.uint8))
        if train_ids and key in train_ids:
            _save(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png", train_ids[key].astype(np.uint8))


def test_cityscapes_id_table_matches_the_official_labels():
    ids = np.array([i for i, _ in CITYSCAPES_TABLE.values()] + list(VOID_IDS), dtype=np.uint8)
    expected = np.array([t for _, t in CITYSCAPES_TABLE.values()] + [255] * len(VOID_IDS))
    np.testing.assert_array_equal(cityscapes_ids_to_train_ids(ids), expected)
    assert list(CITYSCAPES_CLASSES) == list(CITYSCAPES_TABLE)


def test_cityscapes_maps_label_ids_and_prefers_train_id_files(tmp_path):
    rng = np.random.default_rng(1)
    all_ids = np.array([i for i, _ in CITYSCAPES_TABLE.values()] + list(VOID_IDS))
    a = rng.choice(all_ids, (6, 10)).astype(np.uint8)
    b = rng.choice(all_ids, (6, 10)).astype(np.uint8)
    b_train = np.full((6, 10), 3, np.uint8)  # deliberately unlike b's mapping: proves this file is read
    write_cityscapes(tmp_path, "val", {"aachen/aachen_000000_000019": a, "bonn/bonn_000001_000019": b},
                     {"bonn/bonn_000001_000019": b_train})  # fmt: skip
    ds = CityscapesDataset(tmp_path, "val")
    assert len(ds) == 2 and ds.num_classes == 19 and len(ds.class_names) == 19
    assert ds.files[0][1].name.endswith("_gtFine_labelIds.png")
    assert ds.files[1][1].name.endswith("_gtFine_labelTrainIds.png")

    lut = {i: t for i, t in CITYSCAPES_TABLE.values()}
    expected_a = np.vectorize(lambda v: lut.get(int(v), 255))(a)
    image, label = ds[0]
    assert image.shape == (3, 6, 10) and image.dtype == torch.float32
    assert label.dtype == torch.int64
    np.testing.assert_array_equal(label.numpy(), expected_a)
    np.testing.assert_array_equal(ds[1][1].numpy(), b_train)
    # The default transform is the eval transform (normalised, not resized).
    photo = np.asarray(Image.open(ds.files[0][0]))
    torch.testing.assert_close(image, build_eval_transform()(Image.fromarray(photo), Image.fromarray(a))[0])


@pytest.mark.parametrize("bad", [34, 200])
def test_cityscapes_reports_unknown_label_ids_with_the_file(tmp_path, bad):
    ids = np.full((4, 5), 7, np.uint8)
    ids[1, 2] = bad
    write_cityscapes(tmp_path, "train", {"c/c_0_0": ids})
    ds = CityscapesDataset(tmp_path, "train")
    with pytest.raises(ValueError, match=rf"c_0_0_gtFine_labelIds\.png.*\b{bad}\b"):
        ds[0]


def test_cityscapes_reports_bad_train_ids_with_the_file(tmp_path):
    ids = np.full((4, 5), 7, np.uint8)
    write_cityscapes(tmp_path, "train", {"c/c_0_0": ids}, {"c/c_0_0": np.array([[0, 19, 255, 40, 1]] * 4)})
    with pytest.raises(ValueError, match=r"labelTrainIds\.png.*\[0, 19\).*19, 40"):
        CityscapesDataset(tmp_path, "train")[0]


def test_cityscapes_layout_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="leftImg8bit"):
        CityscapesDataset(tmp_path, "train")
    _save(tmp_path / "leftImg8bit" / "train" / "c" / "c_0_0_leftImg8bit.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="c_0_0_gtFine_labelIds.png"):
        CityscapesDataset(tmp_path, "train")
    (tmp_path / "leftImg8bit" / "val").mkdir()
    with pytest.raises(FileNotFoundError, match="no image/label pairs"):
        CityscapesDataset(tmp_path, "val")


def write_ade20k(root: Path, split_dir: str, annotations: dict[str, np.ndarray]):
    rng = np.random.default_rng(0)
    for stem, ann in annotations.items():
        _save(root / "ADEChallengeData2016" / "images" / split_dir / f"{stem}.jpg", _photo(rng, *ann.shape))
        _save(root / "ADEChallengeData2016" / "annotations" / split_dir / f"{stem}.png", ann.astype(np.uint8))


def test_ade20k_ignores_zero_and_shifts_classes_down(tmp_path):
    ann = np.array([[0, 1, 2, 150], [75, 0, 150, 1]])
    write_ade20k(tmp_path, "validation", {"ADE_val_00000001": ann})
    for root in (tmp_path, tmp_path / "ADEChallengeData2016"):
        ds = ADE20KDataset(root, "val")
        assert len(ds) == 1 and ds.num_classes == 150 and len(set(ADE20K_CLASSES)) == 150
        np.testing.assert_array_equal(ds[0][1].numpy(), [[255, 0, 1, 149], [74, 255, 149, 0]])


def test_ade20k_reports_values_above_150(tmp_path):
    write_ade20k(tmp_path, "training", {"ADE_train_00000001": np.array([[1, 151], [200, 3]])})
    with pytest.raises(ValueError, match=r"ADE_train_00000001\.png.*151, 200"):
        build_dataset("ade20k", tmp_path, "train")[0]
    with pytest.raises(ValueError, match="split must be one of"):
        ADE20KDataset(tmp_path, "test")


def test_folder_dataset_pairs_by_relative_path_and_checks_values(tmp_path):
    rng = np.random.default_rng(0)
    for rel, mask in {"a/x": [[0, 1], [2, 255]], "y": [[2, 2], [0, 1]]}.items():
        _save(tmp_path / "images" / "train" / f"{rel}.jpg", _photo(rng, 2, 2))
        _save(tmp_path / "masks" / "train" / f"{rel}_mask.png", np.array(mask, np.uint8))
    ds = build_dataset("folder", tmp_path, "train", num_classes=3, mask_suffix="_mask.png")
    assert [p.relative_to(tmp_path).as_posix() for p, _ in ds.files] == ["images/train/a/x.jpg", "images/train/y.jpg"]
    np.testing.assert_array_equal(ds[0][1].numpy(), [[0, 1], [2, 255]])
    assert ds.class_names == ("class_0", "class_1", "class_2")
    too_few = FolderDataset(
        tmp_path / "images" / "train", tmp_path / "masks" / "train", ".jpg", "_mask.png", num_classes=2
    )
    with pytest.raises(ValueError, match=r"x_mask\.png.*\[0, 2\).*: 2 "):
        too_few[0]
    with pytest.raises(FileNotFoundError, match="have no mask"):
        FolderDataset(tmp_path / "images" / "train", tmp_path / "masks" / "train", ".jpg", ".png", num_classes=3)


def test_build_dataset_rejects_unknown_names_and_options(tmp_path):
    with pytest.raises(ValueError, match="dataset name must be one of"):
        build_dataset("pascal", tmp_path, "train")
    with pytest.raises(TypeError, match="takes no extra arguments"):
        build_dataset("cityscapes", tmp_path, "train", num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        build_dataset("folder", tmp_path, "train")
