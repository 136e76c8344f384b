"""Cityscapes (Cordts et al., CVPR 2016) in its released layout, with the 19 evaluation classes.

Layout under ``root``::

    leftImg8bit/{split}/{city}/{name}_leftImg8bit.png
    gtFine/{split}/{city}/{name}_gtFine_labelIds.png        (34 label ids, mapped here to 19 train ids)
    gtFine/{split}/{city}/{name}_gtFine_labelTrainIds.png   (optional: used as-is when present)

The id -> train-id table (:mod:`alignseg.data.metainfo`) is the one of the official ``cityscapesscripts``
label definition; ids that do not take part in the evaluation (void, parking, rail track, ...) become 255
(ignore).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import PairTransform, SegmentationDataset, report_bad_values
from .metainfo import CITYSCAPES_META, cityscapes_ids_to_train_ids

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_ID_SUFFIX = "_gtFine_labelIds.png"
TRAIN_ID_SUFFIX = "_gtFine_labelTrainIds.png"


class CityscapesDataset(SegmentationDataset):
    """Cityscapes fine annotations: ``split`` is ``"train"``, ``"val"`` or ``"test"``.

    Items are ``(image Tensor[3, H, W] float32, label Tensor[H, W] int64)``, labels in 0..18 or 255.
    ``files`` lists ``(image_path, label_path)``; the label path is the ``labelTrainIds`` file where one
    exists, else the ``labelIds`` file (mapped on loading).
    """

    meta = CITYSCAPES_META
    num_classes = meta.num_classes
    class_names = meta.classes

    def __init__(self, root: str | Path, split: str = "train", transform: PairTransform | None = None):
        self.root = Path(root)
        self.split = split
        image_dir = self.root / "leftImg8bit" / split
        label_dir = self.root / "gtFine" / split
        if not image_dir.is_dir():
            raise FileNotFoundError(
                f"Cityscapes images not found: {image_dir} is not a directory "
                f"(expected {{root}}/leftImg8bit/{{split}}/{{city}}/*{IMAGE_SUFFIX})"
            )
        files, missing = [], []
        for image_path in sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}")):
            stem = image_path.name[: -len(IMAGE_SUFFIX)]
            city_labels = label_dir / image_path.parent.name
            train_ids, label_ids = city_labels / (stem + TRAIN_ID_SUFFIX), city_labels / (stem + LABEL_ID_SUFFIX)
            if train_ids.is_file():
                files.append((image_path, train_ids))
            elif label_ids.is_file():
                files.append((image_path, label_ids))
            else:
                missing.append(str(label_ids))
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} Cityscapes images have no gtFine label, e.g. {missing[0]} "
                f"(nor its {TRAIN_ID_SUFFIX} variant)"
            )
        super().__init__(files, transform, where=f"{image_dir} (*/*{IMAGE_SUFFIX})")

    def map_label(self, raw: np.ndarray, label_path: Path) -> np.ndarray:
        if label_path.name.endswith(TRAIN_ID_SUFFIX):
            return raw.astype(np.int64)
        train_ids = cityscapes_ids_to_train_ids(raw)
        report_bad_values(label_path, raw, train_ids < 0, "the Cityscapes label ids 0..33 (and 255)")
        return train_ids
