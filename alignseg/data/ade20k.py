"""ADE20K scene parsing (Zhou et al., CVPR 2017) in the ``ADEChallengeData2016`` release, 150 classes.

Layout: ``{root}/images/{training,validation}/*.jpg`` and ``{root}/annotations/{training,validation}/*.png``
where ``root`` is the ``ADEChallengeData2016`` folder (or its parent). Annotation value 0 is "other"
and becomes 255 (ignore); values 1..150 shift down to train ids 0..149, as in the benchmark.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import PairTransform, SegmentationDataset, report_bad_values
from .metainfo import ADE20K_META, ade20k_to_train_ids

_SPLIT_DIRS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class ADE20KDataset(SegmentationDataset):
    """ADE20K (SceneParsing150): ``split`` is ``"train"`` or ``"val"`` (or the folder names themselves).

    Items are ``(image Tensor[3, H, W] float32, label Tensor[H, W] int64)``, labels in 0..149 or 255.
    """

    meta = ADE20K_META
    num_classes = meta.num_classes
    class_names = meta.classes

    def __init__(self, root: str | Path, split: str = "train", transform: PairTransform | None = None):
        if split not in _SPLIT_DIRS:
            raise ValueError(f"split must be one of {sorted(_SPLIT_DIRS)}, got {split!r}")
        root = Path(root)
        if (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        self.root, self.split = root, split
        image_dir = root / "images" / _SPLIT_DIRS[split]
        label_dir = root / "annotations" / _SPLIT_DIRS[split]
        if not image_dir.is_dir():
            raise FileNotFoundError(
                f"ADE20K images not found: {image_dir} is not a directory "
                f"(expected {{root}}/ADEChallengeData2016/images/{_SPLIT_DIRS[split]}/*.jpg)"
            )
        files, missing = [], []
        for image_path in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES):
            label_path = label_dir / (image_path.stem + ".png")
            (files if label_path.is_file() else missing).append((image_path, label_path))
        if missing:
            raise FileNotFoundError(f"{len(missing)} ADE20K images have no annotation, e.g. {missing[0][1]}")
        super().__init__(files, transform, where=f"{image_dir} (*.jpg)")

    def map_label(self, raw: np.ndarray, label_path: Path) -> np.ndarray:
        raw = raw.astype(np.int64)
        report_bad_values(
            label_path, raw, (raw < 0) | (raw > self.num_classes), f"the ADE20K values 0..{self.num_classes}"
        )
        return ade20k_to_train_ids(raw)
