"""ADE20K scene parsing (Zhou et al., CVPR 2017) in the ``ADEChallengeData2016`` release, 150 classes.

Layout: ``{root}/images/{training,validation}/*.jpg`` and ``{root}/annotations/{training,validation}/*.png``
where ``root`` is the ``ADEChallengeData2016`` folder (or its parent). Annotation value 0 is "other"
and becomes 255 (ignore); values 1..150 shift down to train ids 0..149, as in the benchmark.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import IGNORE_INDEX, PairTransform, SegmentationDataset, report_bad_values

# The benchmark's 150 class names (objectInfo150), shortened to their first synonym.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)  # fmt: skip

_SPLIT_DIRS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class ADE20KDataset(SegmentationDataset):
    """ADE20K (SceneParsing150): ``split`` is ``"train"`` or ``"val"`` (or the folder names themselves).

    Items are ``(image Tensor[3, H, W] float32, label Tensor[H, W] int64)``, labels in 0..149 or 255.
    """

    num_classes = len(ADE20K_CLASSES)
    class_names = ADE20K_CLASSES

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
        report_bad_values(label_path, raw, (raw < 0) | (raw > self.num_classes), f"the ADE20K values 0..{self.num_classes}")
        return np.where(raw == 0, IGNORE_INDEX, raw - 1)
