"""The shared part of every segmentation dataset: read an (image, label) pair, map and check the label.

A dataset subclass finds its files and says how raw label values map to train ids; this base reads the
pair with Pillow, applies the mapping, rejects labels outside ``[0, num_classes)`` other than the ignore
value 255 with the file name and the bad values (so a wrong mapping never reaches the loss as a cryptic
device assert), and hands ``(PIL image, PIL label)`` to the transform.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .images import DataFileError, read_label_array, read_rgb_image
from .metainfo import IGNORE_INDEX, DatasetMeta

PairTransform = Callable[[Image.Image, Image.Image], tuple[Tensor, Tensor]]


def report_bad_values(path: str | Path, raw: np.ndarray, bad: np.ndarray, expected: str) -> None:
    """Raise :class:`DataFileError` (a ``ValueError``) naming ``path`` and the distinct values of ``raw`` where
    ``bad`` is set."""
    if not bad.any():
        return
    values = np.unique(raw[bad])
    shown = ", ".join(str(v) for v in values[:20]) + (", ..." if len(values) > 20 else "")
    raise DataFileError(
        f"label file {path} holds values outside {expected}: {shown} ({int(bad.sum())} pixels); "
        f"check the dataset layout and its label mapping"
    )


def check_label_values(label: np.ndarray, num_classes: int, path: str | Path) -> None:
    """Raise ``ValueError`` naming ``path`` when ``label`` holds values outside ``[0, num_classes)`` other than 255."""
    bad = ((label < 0) | (label >= num_classes)) & (label != IGNORE_INDEX)
    report_bad_values(path, label, bad, f"[0, {num_classes}) other than the ignore value {IGNORE_INDEX}")


class SegmentationDataset(Dataset):
    """Base class: ``files`` is a list of ``(image_path, label_path)``; items are ``(image, label)`` tensors.

    Subclasses set ``meta`` (their :class:`~alignseg.data.metainfo.DatasetMeta`), ``num_classes``,
    ``class_names``, ``files`` and override :meth:`map_label` (raw label array -> train ids, 255 = ignore).
    ``transform`` takes ``(PIL image, PIL label)`` and returns
    ``(Tensor[3, H, W] float32, Tensor[H, W] int64)``; ``None`` means :func:`build_eval_transform` with
    the ImageNet mean and std.
    """

    meta: DatasetMeta
    num_classes: int
    class_names: Sequence[str]

    def __init__(self, files: list[tuple[Path, Path]], transform: PairTransform | None, where: str):
        if not files:
            raise FileNotFoundError(f"no image/label pairs found in {where}")
        if transform is None:
            from .transforms import build_eval_transform

            transform = build_eval_transform()
        self.files = files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def map_label(self, raw: np.ndarray, label_path: Path) -> np.ndarray:
        """Raw label array -> train ids (int64, 255 = ignore). The default keeps values as they are."""
        return raw.astype(np.int64)

    def load_label(self, index: int) -> np.ndarray:
        """The train-id label of item ``index`` as an int64 array, checked against ``num_classes``."""
        label_path = self.files[index][1]
        raw_array = read_label_array(label_path)
        label = self.map_label(raw_array, label_path)
        check_label_values(label, self.num_classes, label_path)
        return label

    def load_pair(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """(RGB image, train-id label array) of item ``index``, decoded and checked; errors name the file."""
        image_path, label_path = self.files[index]
        image = read_rgb_image(image_path)
        label = self.load_label(index)
        if label.shape != (image.height, image.width):
            raise DataFileError(
                f"label {label_path} has size {label.shape[1]}x{label.shape[0]} but image {image_path} has "
                f"{image.width}x{image.height}"
            )
        return image, label

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, label = self.load_pair(index)
        return self.transform(image, Image.fromarray(label.astype(np.uint8)))  # 2-D uint8: mode "L"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {self.num_classes} classes)"
