"""Datasets (Cityscapes, ADE20K, generic folders, synthetic), transforms and loaders.

Every dataset yields ``(image Tensor[3, H, W] float32 normalised, label Tensor[H, W] int64)`` with
255 = ignore, and has ``files`` (``(image_path, label_path)`` pairs), ``num_classes``, ``class_names`` and
``meta`` (its :class:`DatasetMeta`: the facts of :mod:`alignseg.data.metainfo`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from .ade20k import ADE20KDataset
from .base import SegmentationDataset, check_label_values
from .check import DatasetReport, SkipCorrupt, check_dataset
from .cityscapes import CityscapesDataset
from .convention import AUTHORS_CONVENTION, IMAGENET_CONVENTION, InputConvention
from .folder import FolderDataset
from .images import DataFileError, read_rgb_image
from .loader import build_loader, seed_worker
from .metainfo import (
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    IGNORE_INDEX,
    METAINFO,
    DatasetMeta,
    cityscapes_ids_to_train_ids,
    get_metainfo,
)
from .synthetic import SYNTHETIC_TRAIN_IDS, make_synthetic_cityscapes
from .transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform, build_train_transform

# The one list of dataset names: the config's data.dataset type and build_dataset's check.
DatasetName = Literal["cityscapes", "ade20k", "folder", "synthetic"]
DATASETS: tuple[str, ...] = get_args(DatasetName)


def build_dataset(name: str, root: str | Path, split: str, transform=None, **kw) -> SegmentationDataset:
    """A dataset by name.

    * ``"cityscapes"``: :class:`CityscapesDataset` (``root`` holds ``leftImg8bit/`` and ``gtFine/``).
    * ``"ade20k"``: :class:`ADE20KDataset` (``root`` is or holds ``ADEChallengeData2016/``).
    * ``"folder"``: :class:`FolderDataset`; ``image_dir`` and ``mask_dir`` default to
      ``{root}/images/{split}`` and ``{root}/masks/{split}``; ``num_classes`` is required; other keywords
      (``image_suffix``, ``mask_suffix``, ``class_names``) are passed on.
    * ``"synthetic"``: the synthetic street scenes, generated under ``root`` first if not already there
      (keywords ``num_train``, ``num_val``, ``size``, ``seed`` go to :func:`make_synthetic_cityscapes`),
      then read as Cityscapes.
    """
    key = name.strip().lower()
    if key == "cityscapes":
        _no_extra(name, kw)
        return CityscapesDataset(root, split, transform)
    if key == "ade20k":
        _no_extra(name, kw)
        return ADE20KDataset(root, split, transform)
    if key == "folder":
        if "num_classes" not in kw:
            raise ValueError("the folder dataset needs num_classes=...")
        image_dir = kw.pop("image_dir", Path(root) / "images" / split)
        mask_dir = kw.pop("mask_dir", Path(root) / "masks" / split)
        return FolderDataset(image_dir, mask_dir, transform=transform, **kw)
    if key == "synthetic":
        make_synthetic_cityscapes(root, **kw)
        return CityscapesDataset(root, split, transform)
    raise ValueError(f"dataset name must be one of {DATASETS}, got {name!r}")


def _no_extra(name: str, kw: dict) -> None:
    if kw:
        raise TypeError(f"dataset {name!r} takes no extra arguments, got {sorted(kw)}")


__all__ = [
    "ADE20K_CLASSES",
    "ADE20KDataset",
    "CITYSCAPES_CLASSES",
    "CityscapesDataset",
    "DATASETS",
    "METAINFO",
    "DataFileError",
    "DatasetMeta",
    "DatasetReport",
    "FolderDataset",
    "InputConvention",
    "IGNORE_INDEX",
    "AUTHORS_CONVENTION",
    "IMAGENET_CONVENTION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SYNTHETIC_TRAIN_IDS",
    "SegmentationDataset",
    "SkipCorrupt",
    "build_dataset",
    "build_eval_transform",
    "build_loader",
    "build_train_transform",
    "check_dataset",
    "check_label_values",
    "cityscapes_ids_to_train_ids",
    "get_metainfo",
    "make_synthetic_cityscapes",
    "read_rgb_image",
    "seed_worker",
]
