"""A generic segmentation dataset: a folder of images and a folder of single-channel masks of class ids.

Masks hold train ids directly (0..num_classes-1, 255 = ignore). Image ``a/b/x{image_suffix}`` pairs with
mask ``a/b/x{mask_suffix}`` at the same relative path under ``mask_dir``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .base import PairTransform, SegmentationDataset
from .metainfo import folder_meta


class FolderDataset(SegmentationDataset):
    """Images under ``image_dir`` ending in ``image_suffix``, masks under ``mask_dir`` ending in ``mask_suffix``.

    Subfolders are searched. ``class_names`` defaults to ``class_0, class_1, ...``.
    """

    def __init__(
        self,
        image_dir: str | Path,
        mask_dir: str | Path,
        image_suffix: str = ".jpg",
        mask_suffix: str = ".png",
        num_classes: int = 2,
        transform: PairTransform | None = None,
        class_names: Sequence[str] | None = None,
    ):
        self.meta = folder_meta(num_classes, class_names)  # checks num_classes and class_names
        self.image_dir, self.mask_dir = Path(image_dir), Path(mask_dir)
        for name, folder in (("image_dir", self.image_dir), ("mask_dir", self.mask_dir)):
            if not folder.is_dir():
                raise FileNotFoundError(f"{name} {folder} is not a directory")
        self.num_classes = self.meta.num_classes
        self.class_names = self.meta.classes
        files, missing = [], []
        for image_path in sorted(self.image_dir.rglob(f"*{image_suffix}")):
            relative = image_path.relative_to(self.image_dir)
            mask_path = self.mask_dir / relative.parent / (relative.name[: -len(image_suffix)] + mask_suffix)
            (files if mask_path.is_file() else missing).append((image_path, mask_path))
        if missing:
            raise FileNotFoundError(f"{len(missing)} images under {self.image_dir} have no mask, e.g. {missing[0][1]}")
        where = (
            f"{self.image_dir} (images *{image_suffix}; "
            "set data.options.image_suffix for another ending, e.g. .png)"
        )
        super().__init__(files, transform, where=where)
