"""Evaluate a segmentation model over a data loader: confusion matrix -> mIoU, per-class IoU, pixel accuracy."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.metainfo import IGNORE_INDEX
from .inference import build_inference_mode, infer
from .metrics import ConfusionMatrix, SegmentationMetrics

log = logging.getLogger(__name__)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    return next(iter(model.parameters()), torch.empty(0)).device


def evaluate(
    model: nn.Module,
    loader: Iterable,
    num_classes: int,
    mode: str = "whole",
    tile: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    scales: Sequence[float] | None = None,
    flip: bool = False,
    progress: bool = True,
    ignore_index: int = IGNORE_INDEX,
    class_names: Sequence[str] | None = None,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    distributed: bool | None = None,
) -> SegmentationMetrics:
    """mIoU, per-class IoU and pixel accuracy of ``model`` on the ``(images, labels)`` batches of ``loader``.

    Args:
        model: in eval mode it maps ``Tensor[N, 3, H, W]`` to logits ``Tensor[N, C, H, W]``; it is put in
            eval mode for the run and restored afterwards.
        mode, tile, stride, scales, flip: the inference setting (see :mod:`alignseg.evaluation.inference`).
        class_names: for the table; default ``loader.dataset.class_names`` (looking through ``Subset``).
        device: where to run; default the model's device.
        amp_dtype: run the model under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``).
        distributed: sum the confusion matrix over the ranks of the process group at the end (each rank
            evaluates its own shard); default: when a process group is initialised.

    Returns:
        :class:`SegmentationMetrics`, whose ``mode`` names the inference setting; ``format_table()`` gives
        the per-class table. Classes absent from both ground truth and prediction are left out of the mIoU.
    """
    setting = build_inference_mode(mode, tile=tile, stride=stride, scales=scales, flip=flip)
    device = torch.device(device) if device is not None else model_device(model)
    dataset = getattr(loader, "dataset", None)
    while class_names is None and dataset is not None:  # through Subset wrappers (sharded evaluation)
        class_names = getattr(dataset, "class_names", None)
        dataset = getattr(dataset, "dataset", None)
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    show = progress and (not distributed or dist.get_rank() == 0)
    matrix = ConfusionMatrix(num_classes, ignore_index)
    was_training = model.training
    model.eval()
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    log.info("evaluating %s batches, mode: %s", len(loader) if hasattr(loader, "__len__") else "all", setting)
    try:
        bar = tqdm(loader, desc=f"eval [{setting}]", unit="batch", disable=not show)
        for step, (images, labels) in enumerate(bar):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast:
                prob = infer(model, images, setting)
            if prob.shape[1] != num_classes:
                raise ValueError(f"the model predicts {prob.shape[1]} classes but num_classes={num_classes}")
            if prob.shape[-2:] != labels.shape[-2:]:
                prob = F.interpolate(prob, size=labels.shape[-2:], mode="bilinear", align_corners=True)
            matrix.update(prob.argmax(1), labels)
            if show and step % 10 == 0:
                bar.set_postfix_str(f"mIoU so far {100 * matrix.compute().miou:.1f}%")
    finally:
        model.train(was_training)
    if distributed:
        matrix.all_reduce(device)
    return matrix.compute(str(setting), class_names)
