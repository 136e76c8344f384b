"""The synthetic dataset: Cityscapes layout, deterministic, idempotent, read back by the real loader."""

import hashlib

import numpy as np
import pytest
import torch

from alignseg.data import SYNTHETIC_TRAIN_IDS, CityscapesDataset, build_dataset, make_synthetic_cityscapes

pytestmark = pytest.mark.usefixtures("reference_ops")


def _digest(root):
    files = sorted(p for p in root.rglob("*.png"))
    return [(p.relative_to(root).as_posix(), hashlib.sha1(p.read_bytes()).hexdigest()) for p in files]


def test_written_in_the_cityscapes_layout_and_read_by_the_cityscapes_loader(tmp_path):
    root = make_synthetic_cityscapes(tmp_path / "a", num_train=6, num_val=2, size=(32, 64), progress=False)
    assert len(list((root / "leftImg8bit" / "train").glob("*/*_leftImg8bit.png"))) == 6
    assert len(list((root / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))) == 2
    train = CityscapesDataset(root, "train")
    assert len(train) == 6 and len(CityscapesDataset(root, "val")) == 2
    present = set()
    for i in range(len(train)):
        image, label = train[i]
        assert image.shape == (3, 32, 64) and label.shape == (32, 64)
        present |= set(label.unique().tolist())
    # Only the 8 generated classes (and ignore, from the ego-vehicle strip) appear, most of them in 6 images.
    assert present - {255} <= set(SYNTHETIC_TRAIN_IDS)
    assert len(present - {255}) >= 6
    assert SYNTHETIC_TRAIN_IDS == (0, 1, 2, 5, 8, 10, 11, 13)


def test_deterministic_and_idempotent(tmp_path):
    a = make_synthetic_cityscapes(tmp_path / "a", num_train=3, num_val=1, size=(24, 48), seed=3, progress=False)
    b = make_synthetic_cityscapes(tmp_path / "b", num_train=3, num_val=1, size=(24, 48), seed=3, progress=False)
    assert _digest(a) == _digest(b)
    c = make_synthetic_cityscapes(tmp_path / "c", num_train=3, num_val=1, size=(24, 48), seed=4, progress=False)
    assert [h for _, h in _digest(a)] != [h for _, h in _digest(c)]

    first = {p: p.stat().st_mtime_ns for p in a.rglob("*.png")}
    make_synthetic_cityscapes(a, num_train=3, num_val=1, size=(24, 48), seed=3, progress=False)
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*.png")} == first  # nothing rewritten

    # Other settings replace the earlier files instead of mixing with them.
    make_synthetic_cityscapes(a, num_train=2, num_val=1, size=(24, 48), seed=3, progress=False)
    assert len(CityscapesDataset(a, "train")) == 2


def test_images_are_not_trivially_separable_by_colour(tmp_path):
    """Learnable but not trivial: a per-colour lookup table fitted on one image mislabels many pixels of another."""
    root = make_synthetic_cityscapes(tmp_path, num_train=2, num_val=1, size=(64, 128), progress=False)
    ds = build_dataset("synthetic", root, "train", num_train=2, num_val=1, size=(64, 128), progress=False)
    (x0, y0), (x1, y1) = ds[0], ds[1]
    quantise = lambda x: tuple((x.round().clamp(-4, 4) + 4).long())  # noqa: E731  coarse colour bins
    table = {}
    for key, lab in zip(zip(*[c.flatten().tolist() for c in quantise(x0)]), y0.flatten().tolist()):
        table.setdefault(key, []).append(lab)
    majority = {k: max(set(v), key=v.count) for k, v in table.items()}
    keys = list(zip(*[c.flatten().tolist() for c in quantise(x1)]))
    guesses = torch.tensor([majority.get(k, -1) for k in keys])
    valid = y1.flatten() != 255
    accuracy = (guesses[valid] == y1.flatten()[valid]).float().mean()
    assert 0.3 < accuracy < 0.9  # measured 0.62 when written


def test_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="size"):
        make_synthetic_cityscapes(tmp_path, size=(8, 8))
    with pytest.raises(ValueError, match="num_train"):
        make_synthetic_cityscapes(tmp_path, num_train=0)
    assert not np.any([p.is_file() for p in tmp_path.rglob("*")])
