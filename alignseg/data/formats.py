"""Prediction files in the formats the benchmark servers accept, from train-id maps.

* Cityscapes: one single-channel PNG per image holding Cityscapes *label ids* (not train ids), named
  ``{city}_{seq}_{frame}_labelIds.png`` in a folder per city. The official evaluator
  (``cityscapesscripts/evaluation/evalPixelLevelSemanticLabeling.py``, also run by the test server) finds
  the prediction of ground truth ``{city}_{seq}_{frame}_gtFine_labelIds.png`` by searching the results
  folder recursively for exactly one ``{city}_{seq}_{frame}*.png``, so the results folder must hold these
  files only.
* ADE20K (SceneParsing150): one single-channel PNG per image holding ``class index + 1`` (0 = other, never
  predicted), named after the image (``ADE_val_00000001.jpg`` -> ``ADE_val_00000001.png``).

The writers take an ``[H, W]`` integer array or tensor of train ids at the image's full size, refuse values
outside the dataset's classes, and never overwrite an existing file unless told to.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from .metainfo import train_ids_to_ade20k, train_ids_to_cityscapes_ids

FORMATS = ("cityscapes", "ade20k")
CITYSCAPES_RESULT_SUFFIX = "_labelIds.png"
# {city}_{seq}_{frame}[_{type}]: how cityscapesscripts' getCsFileInfo splits a file name (on "_").
_CITYSCAPES_NAME = re.compile(r"^(?P<city>[^_]+)_(?P<seq>\d+)_(?P<frame>\d+)(?:_[^_]+)?$")


def cityscapes_result_path(image_path: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """``{output_dir}/{city}/{city}_{seq}_{frame}_labelIds.png`` for ``.../{city}_{seq}_{frame}_leftImg8bit.png``.

    Raises ``ValueError`` naming the file when its name is not a Cityscapes image name.
    """
    stem = Path(image_path).name.split(".")[0]
    match = _CITYSCAPES_NAME.match(stem)
    if match is None:
        raise ValueError(
            f"image {os.fspath(image_path)!r} is not named like a Cityscapes image "
            f"({{city}}_{{seq}}_{{frame}}_leftImg8bit.png, e.g. berlin_000000_000019_leftImg8bit.png), "
            f"so the evaluator could not match a prediction to it"
        )
    city, seq, frame = match["city"], match["seq"], match["frame"]
    return Path(output_dir) / city / f"{city}_{seq}_{frame}{CITYSCAPES_RESULT_SUFFIX}"


def ade20k_result_path(image_path: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """``{output_dir}/{image stem}.png``."""
    return Path(output_dir) / f"{Path(image_path).stem}.png"


def write_cityscapes_result(
    train_ids: np.ndarray | Tensor,
    image_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
) -> Path:
    """Write the ``[H, W]`` train-id map (0..18) of ``image_path`` as a label-id PNG; returns its path."""
    return _write(
        train_ids_to_cityscapes_ids(_array(train_ids)), cityscapes_result_path(image_path, output_dir), overwrite
    )


def write_ade20k_result(
    train_ids: np.ndarray | Tensor,
    image_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
) -> Path:
    """Write the ``[H, W]`` train-id map (0..149) of ``image_path`` as an ADE20K PNG (index + 1); returns its path."""
    return _write(train_ids_to_ade20k(_array(train_ids)), ade20k_result_path(image_path, output_dir), overwrite)


def _array(train_ids: np.ndarray | Tensor) -> np.ndarray:
    array = train_ids.detach().cpu().numpy() if isinstance(train_ids, Tensor) else np.asarray(train_ids)
    if array.ndim != 2:
        raise ValueError(f"train_ids must be an [H, W] map of one image, got shape {array.shape}")
    return array


def _write(values: np.ndarray, path: Path, overwrite: bool) -> Path:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; not overwriting it (pass overwrite=True, or choose another folder)")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")  # a killed run leaves no truncated PNG under the real name
    Image.fromarray(values.astype(np.uint8)).save(partial, format="PNG")  # 2-D uint8: mode "L"
    os.replace(partial, path)
    return path
