"""Training/evaluation transforms and the loader: geometry, padding, flip, rescale, jitter, seeding."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from alignseg.data import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform, build_loader, build_train_transform

pytestmark = pytest.mark.usefixtures("reference_ops")

MEAN = np.array(IMAGENET_MEAN, np.float32)
STD = np.array(IMAGENET_STD, np.float32)
# Colour-coded labels: the image colour of each pixel tells its class, so geometry can be checked exactly.
COLOURS = np.array([[10, 200, 30], [250, 0, 120], [0, 90, 255], [180, 180, 20], [60, 60, 60]], np.uint8)


def coded_pair(h, w, seed=0):
    label = np.random.default_rng(seed).integers(0, len(COLOURS), (h, w)).astype(np.uint8)
    return Image.fromarray(COLOURS[label]), Image.fromarray(label), label


def denormalise(image: torch.Tensor) -> np.ndarray:
    """Tensor[3, H, W] normalised -> uint8-valued float array [H, W, 3]."""
    return np.round((image.permute(1, 2, 0).numpy() * STD + MEAN) * 255)


def test_eval_transform_normalises_exactly():
    image, label_img, label = coded_pair(5, 7)
    out_image, out_label = build_eval_transform()(image, label_img)
    expected = (np.asarray(image, np.float32) / 255 - MEAN) / STD
    np.testing.assert_allclose(out_image.permute(1, 2, 0).numpy(), expected, rtol=1e-6, atol=1e-6)
    assert out_label.dtype == torch.int64
    np.testing.assert_array_equal(out_label.numpy(), label)


def test_random_crop_with_padding_is_a_window_of_the_padded_image():
    image, label_img, label = coded_pair(9, 20, seed=1)
    transform = build_train_transform((12, 8), scale_range=(1.0, 1.0), flip=False, jitter=0)
    padded = np.full((12, 20), 255)
    padded[:9] = label
    for seed in range(6):
        torch.manual_seed(seed)
        out_image, out_label = transform(image, label_img)
        assert out_image.shape == (3, 12, 8) and out_label.shape == (12, 8)
        windows = [padded[:, x : x + 8] for x in range(20 - 8 + 1)]
        assert any((out_label.numpy() == w).all() for w in windows)
        pad = out_label.numpy() == 255
        assert pad[9:].all() and not pad[:9].any()
        np.testing.assert_array_equal(out_image.permute(1, 2, 0).numpy()[pad], 0)  # 0 after normalising
        np.testing.assert_array_equal(denormalise(out_image)[~pad], COLOURS[out_label.numpy()[~pad]])


def test_flip_moves_image_and_label_together():
    image, label_img, label = coded_pair(6, 10, seed=2)
    transform = build_train_transform((6, 10), scale_range=(1.0, 1.0), flip=True, jitter=0)
    seen = set()
    for seed in range(16):
        torch.manual_seed(seed)
        out_image, out_label = transform(image, label_img)
        flipped = bool((out_label.numpy() == label[:, ::-1]).all())
        assert flipped or (out_label.numpy() == label).all()
        seen.add(flipped)
        np.testing.assert_array_equal(denormalise(out_image), COLOURS[out_label.numpy()])
    assert seen == {True, False}


def test_rescale_uses_nearest_labels():
    image, label_img, label = coded_pair(5, 6, seed=3)
    transform = build_train_transform((10, 12), scale_range=(2.0, 2.0), flip=False, jitter=0)
    _, out_label = transform(image, label_img)
    np.testing.assert_array_equal(out_label.numpy(), np.kron(label, np.ones((2, 2), np.uint8)))
    torch.manual_seed(0)
    sizes = set()
    varied = build_train_transform((40, 40), scale_range=(0.5, 3.0), flip=False, jitter=0)
    for _ in range(5):
        _, lab = varied(image, label_img)
        assert set(np.unique(lab.numpy())) <= set(range(len(COLOURS))) | {255}
        sizes.add(int((lab != 255).sum()))
    assert len(sizes) > 1  # the scale really is random


def test_jitter_changes_colours_only_within_range():
    image, label_img, label = coded_pair(8, 8, seed=4)
    plain = build_train_transform(8, scale_range=(1.0, 1.0), flip=False, jitter=0)
    jittered = build_train_transform(8, scale_range=(1.0, 1.0), flip=False, jitter=0.4)
    torch.manual_seed(0)
    a_image, a_label = plain(image, label_img)
    torch.manual_seed(0)
    b_image, b_label = jittered(image, label_img)
    assert torch.equal(a_label, b_label)
    assert (a_image - b_image).abs().max() > 0.05
    raw = denormalise(b_image) / 255
    assert raw.min() >= 0 and raw.max() <= 1


def test_train_transform_is_reproducible_from_the_torch_seed():
    image, label_img, _ = coded_pair(30, 40, seed=5)
    transform = build_train_transform((16, 16))
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append([transform(image, label_img) for _ in range(3)])
    for (i7, l7), (j7, m7) in zip(runs[0], runs[1]):
        assert torch.equal(i7, j7) and torch.equal(l7, m7)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(runs[0], runs[2]))


def test_transform_arguments_are_checked():
    with pytest.raises(ValueError, match="crop_size"):
        build_train_transform((0, 5))
    with pytest.raises(ValueError, match="scale_range"):
        build_train_transform(8, scale_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="jitter"):
        build_train_transform(8, jitter=-1)
    image, _, _ = coded_pair(4, 4)
    with pytest.raises(ValueError, match="does not match"):
        build_train_transform(8)(image, Image.fromarray(np.zeros((4, 5), np.uint8)))


class _Augmented(Dataset):
    def __init__(self):
        self.image, self.label_img, _ = coded_pair(20, 20, seed=6)
        self.transform = build_train_transform(12)

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return self.transform(self.image, self.label_img)


def _epoch(workers):
    torch.manual_seed(123)
    loader = build_loader(_Augmented(), batch_size=2, train=True, workers=workers)
    assert loader.persistent_workers == (workers > 0) and loader.drop_last
    return [torch.cat([x.flatten(), y.flatten().float()]) for x, y in loader]


def test_loader_with_workers_is_reproducible():
    first, second = _epoch(2), _epoch(2)
    assert len(first) == 4
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert len({tuple(b[:50].tolist()) for b in first}) == 4  # workers draw different augmentations


def test_loader_arguments_are_checked():
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(_Augmented(), batch_size=0, train=True)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        build_loader(_Augmented(), batch_size=9, train=True)
    assert len(build_loader(_Augmented(), batch_size=3, train=False)) == 3  # evaluation keeps the last batch
