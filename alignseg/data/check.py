"""Checking a dataset before a long run, and the training-time policy for a sample that cannot be read.

:func:`check_dataset` decodes every image and label of a dataset (sizes, label values), collecting every
problem with its file name instead of stopping at the first: the work behind ``alignseg check-data``.
:class:`SkipCorrupt` is the ``data.on_corrupt=skip`` policy.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .base import SegmentationDataset
from .images import DataFileError

log = logging.getLogger(__name__)


@dataclass
class DatasetReport:
    """What :func:`check_dataset` found: counts, image sizes, pixels per class, and the problems by file."""

    name: str
    num_items: int = 0
    sizes: Counter = field(default_factory=Counter)  # (width, height) -> number of images
    class_pixels: np.ndarray | None = None  # int64 [num_classes + 1], the last entry counts ignored pixels
    problems: list[str] = field(default_factory=list)

    def format(self) -> str:
        sizes = ", ".join(f"{w}x{h} ({n})" for (w, h), n in self.sizes.most_common(5))
        more = f" and {len(self.sizes) - 5} other sizes" if len(self.sizes) > 5 else ""
        lines = [f"{self.name}: {self.num_items} image/label pairs, {len(self.problems)} with problems"]
        if self.sizes:
            lines.append(f"  image sizes: {sizes}{more}")
        if self.class_pixels is not None and self.class_pixels.sum():
            present = int((self.class_pixels[:-1] > 0).sum())
            ignored = self.class_pixels[-1] / self.class_pixels.sum()
            lines.append(
                f"  classes present: {present} of {len(self.class_pixels) - 1}; ignored pixels {100 * ignored:.1f}%"
            )
        lines += [f"  {problem}" for problem in self.problems]
        return "\n".join(lines)


def check_dataset(dataset: SegmentationDataset, name: str = "dataset", progress: bool = True) -> DatasetReport:
    """Decode every ``(image, label)`` pair of ``dataset``; every unreadable file, size mismatch or label value
    outside the classes becomes one line of ``problems`` naming the file."""
    report = DatasetReport(name, num_items=len(dataset), class_pixels=np.zeros(dataset.num_classes + 1, dtype=np.int64))
    for index in tqdm(range(len(dataset)), desc=f"check {name}", unit="img", disable=not progress):
        try:
            image, label = dataset.load_pair(index)
        except DataFileError as err:
            report.problems.append(str(err))
            continue
        report.sizes[image.size] += 1
        values = np.where(label < dataset.num_classes, label, dataset.num_classes)
        report.class_pixels += np.bincount(values.ravel(), minlength=dataset.num_classes + 1)
    return report


class SkipCorrupt(Dataset):
    """``data.on_corrupt=skip``: an item whose files cannot be read is replaced by the next readable one.

    Each skipped file is logged with its name and a running count (per loader process). The replacement
    depends only on the index, so the data order stays reproducible and resumable.
    """

    def __init__(self, dataset: Dataset, max_tries: int = 16):
        self.dataset = dataset
        self.max_tries = max_tries
        self.skipped: set[int] = set()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):  # num_classes, files, class_names of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int):
        for attempt in range(self.max_tries):
            candidate = (index + attempt) % len(self.dataset)
            try:
                return self.dataset[candidate]
            except DataFileError as err:
                if candidate not in self.skipped:
                    self.skipped.add(candidate)
                    log.warning(
                        "skipping a corrupt sample (%d so far; data.on_corrupt=skip): %s", len(self.skipped), err
                    )
        raise DataFileError(
            f"{self.max_tries} samples in a row from index {index} could not be read (data.on_corrupt=skip); "
            f"run `alignseg check-data` on this dataset"
        )
