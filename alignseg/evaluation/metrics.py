"""Confusion-matrix segmentation metrics: mIoU, per-class IoU, pixel accuracy.

Rows of the matrix are ground-truth classes, columns predicted classes; pixels labelled ``ignore_index``
are not counted. ``IoU_c = TP / (TP + FP + FN)``. A class absent from both the ground truth and the
prediction has no IoU (0/0); it is reported as absent and left out of the mean, and the number of classes
averaged is always shown next to the mIoU.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from ..data.metainfo import IGNORE_INDEX


@dataclass(eq=False)
class SegmentationMetrics(Mapping):
    """The numbers :meth:`ConfusionMatrix.compute` returns (fractions in [0, 1]; NaN IoU = class absent).

    Read as attributes (``m.miou``) or as a read-only mapping of plain, JSON-safe values
    (``m["miou"]``, ``dict(m)``; see :meth:`as_dict`).
    """

    miou: float
    iou: list[float]
    present: list[bool]
    pixel_accuracy: float
    mean_accuracy: float
    num_pixels: int
    mode: str = ""
    class_names: Sequence[str] = field(default_factory=tuple)
    # Pixel counts, rows = ground truth, columns = prediction (kept out of as_dict: logs stay short).
    confusion: list[list[int]] = field(default_factory=list)

    @property
    def num_present(self) -> int:
        return sum(self.present)

    def summary(self) -> str:
        """One line: mIoU, pixel accuracy, how many classes are averaged, and the inference mode."""
        mode = f" [mode: {self.mode}]" if self.mode else ""
        return (
            f"mIoU {100 * self.miou:.2f}% over {self.num_present}/{len(self.iou)} classes, "
            f"pixel accuracy {100 * self.pixel_accuracy:.2f}%{mode}"
        )

    def format_table(self, class_names: Sequence[str] | None = None) -> str:
        """A per-class IoU table followed by the summary line; absent classes are marked and explained."""
        names = list(class_names or self.class_names or [f"class_{i}" for i in range(len(self.iou))])
        if len(names) != len(self.iou):
            raise ValueError(f"class_names must have {len(self.iou)} entries, got {len(names)}")
        width = max(12, *(len(n) for n in names))
        title = f"Evaluation [mode: {self.mode}]" if self.mode else "Evaluation"
        lines = [title, f"{'class':<{width}}  {'IoU %':>7}", "-" * (width + 9)]
        for name, iou, present in zip(names, self.iou, self.present):
            lines.append(f"{name:<{width}}  {100 * iou:7.2f}" if present else f"{name:<{width}}  {'absent':>7}")
        lines.append("-" * (width + 9))
        lines.append(self.summary())
        absent = len(self.iou) - self.num_present
        if absent:
            lines.append(f"(absent from both ground truth and prediction, so excluded from the mean: {absent} classes)")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        """Plain numbers for logs (JSON-safe: absent classes give None)."""
        names = list(self.class_names or [f"class_{i}" for i in range(len(self.iou))])
        return {
            "mode": self.mode,
            "miou": self.miou,
            "pixel_accuracy": self.pixel_accuracy,
            "mean_accuracy": self.mean_accuracy,
            "classes_averaged": self.num_present,
            "num_classes": len(self.iou),
            "num_pixels": self.num_pixels,
            "iou": {n: (v if p else None) for n, v, p in zip(names, self.iou, self.present)},
        }

    def __getitem__(self, key: str):
        return self.as_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.as_dict())

    def __len__(self) -> int:
        return len(self.as_dict())

    def __str__(self) -> str:
        return self.summary()


class ConfusionMatrix:
    """Accumulates a ``num_classes x num_classes`` confusion matrix (int64, on the device of the first update)."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix: Tensor | None = None

    def reset(self) -> None:
        self.matrix = None

    def _zeros(self, device: torch.device | str = "cpu") -> Tensor:
        return torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch: ``pred`` and ``target`` are integer class ids of one shape (e.g. ``Tensor[N, H, W]``).

        ``target`` may hold ``ignore_index``; any other value outside ``[0, num_classes)`` in either raises.
        """
        if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
            raise TypeError(f"pred and target must be tensors, got {type(pred).__name__} and {type(target).__name__}")
        if pred.shape != target.shape:
            raise ValueError(
                f"pred and target must have one shape, got pred {tuple(pred.shape)} and target {tuple(target.shape)}"
            )
        if pred.is_floating_point() or target.is_floating_point():
            raise TypeError(
                f"pred and target must hold integer class ids, got {pred.dtype} and {target.dtype} "
                "(argmax the logits first)"
            )
        pred, target = pred.reshape(-1).long(), target.reshape(-1).long().to(pred.device)
        valid = target != self.ignore_index
        pred, target = pred[valid], target[valid]
        c = self.num_classes
        if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= c):
            raise ValueError(f"pred holds class ids outside [0, {c}): min {int(pred.min())}, max {int(pred.max())}")
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= c):
            bad = target[(target < 0) | (target >= c)].unique()[:10].tolist()
            raise ValueError(f"target holds values outside [0, {c}) other than ignore_index={self.ignore_index}: {bad}")
        index = target * c + pred
        if index.is_cuda and torch.are_deterministic_algorithms_enabled():
            # bincount has no deterministic CUDA kernel; accumulating index_put_ does.
            counts = torch.zeros(c * c, dtype=torch.int64, device=index.device)
            counts.index_put_((index,), torch.ones_like(index), accumulate=True)
        else:
            counts = torch.bincount(index, minlength=c * c)
        counts = counts.reshape(c, c)
        self.matrix = counts if self.matrix is None else self.matrix + counts.to(self.matrix.device)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts into this one (e.g. from another process); returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge a {other.num_classes}-class matrix into a {self.num_classes}-class one")
        if other.matrix is not None:
            self.matrix = (
                other.matrix.clone() if self.matrix is None else self.matrix + other.matrix.to(self.matrix.device)
            )
        return self

    def all_reduce(self, device: torch.device | str | None = None) -> ConfusionMatrix:
        """Sum the matrix over all ranks of the default process group (no-op when not distributed); returns self.

        Every rank must call it. ``device`` is where the reduction happens (default: the matrix's device,
        or CUDA for the NCCL backend).
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        if device is None:
            device = (
                self.matrix.device if self.matrix is not None else ("cuda" if dist.get_backend() == "nccl" else "cpu")
            )
        matrix = self._zeros(device) if self.matrix is None else self.matrix.to(device)
        dist.all_reduce(matrix, op=dist.ReduceOp.SUM)
        self.matrix = matrix
        return self

    def compute(self, mode: str = "", class_names: Sequence[str] | None = None) -> SegmentationMetrics:
        """mIoU over the classes present, per-class IoU (NaN when absent), pixel and mean class accuracy."""
        m = (self._zeros() if self.matrix is None else self.matrix).double().cpu()
        tp = m.diag()
        gt_total, pred_total = m.sum(1), m.sum(0)
        union = gt_total + pred_total - tp
        present = union > 0
        iou = torch.where(present, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        in_gt = gt_total > 0
        total = m.sum()
        return SegmentationMetrics(
            miou=float(iou[present].mean()) if present.any() else float("nan"),
            iou=iou.tolist(),
            present=present.tolist(),
            pixel_accuracy=float(tp.sum() / total) if total > 0 else float("nan"),
            mean_accuracy=float((tp[in_gt] / gt_total[in_gt]).mean()) if in_gt.any() else float("nan"),
            num_pixels=int(total),
            mode=mode,
            class_names=tuple(class_names or ()),
            confusion=m.long().tolist(),
        )

    def format_table(self, class_names: Sequence[str] | None = None, mode: str = "") -> str:
        return self.compute(mode, class_names).format_table(class_names)
