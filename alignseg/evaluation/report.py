"""An evaluation a user can keep: the table, per-class IoU, the confusion matrix and the exact inference
setting in one JSON file (``alignseg eval`` writes it beside the checkpoint, or where ``--output`` says)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..checkpoint import write_text_atomic
from .inference import InferenceMode
from .metrics import SegmentationMetrics

FORMAT = "alignseg-evaluation"


def default_report_path(checkpoint: str | Path, setting: InferenceMode) -> Path:
    """``{checkpoint folder}/{checkpoint name}.eval-{mode}[-flip].json``."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.eval-{setting.mode}{'-flip' if setting.flip else ''}.json")


def evaluation_record(metrics: SegmentationMetrics, setting: InferenceMode, **context: Any) -> dict[str, Any]:
    """The JSON-safe record of an evaluation: ``context`` (checkpoint, dataset, ...) and the results."""
    names = list(metrics.class_names or [f"class_{i}" for i in range(len(metrics.iou))])

    def number(value: float) -> float | None:
        return value if math.isfinite(value) else None

    return {
        "format": FORMAT,
        **context,
        "inference": {
            "mode": setting.mode,
            "tile": list(setting.tile) if setting.tile else None,
            "stride": list(setting.stride) if setting.stride else None,
            "scales": list(setting.scales),
            "flip": setting.flip,
            "description": str(setting),
        },
        "miou": number(metrics.miou),
        "pixel_accuracy": number(metrics.pixel_accuracy),
        "mean_accuracy": number(metrics.mean_accuracy),
        "classes_averaged": metrics.num_present,
        "num_pixels": metrics.num_pixels,
        "class_names": names,
        "iou": {n: (number(v) if p else None) for n, v, p in zip(names, metrics.iou, metrics.present)},
        "confusion_matrix": metrics.confusion,
        "confusion_matrix_layout": "rows: ground truth class, columns: predicted class, pixel counts",
        "table": metrics.format_table(),
    }


def write_report(path: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` as JSON to ``path`` atomically (:func:`~alignseg.checkpoint.write_text_atomic`)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--output {path} is a folder; give a file name such as {path / 'eval.json'}")
    return write_text_atomic(path, json.dumps(record, indent=1, allow_nan=False) + "\n")
