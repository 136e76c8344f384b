"""Evaluation: confusion-matrix metrics and the whole / sliding-window / multi-scale inference modes."""

from .evaluate import evaluate, model_device
from .inference import DEFAULT_SCALES, MODES, InferenceMode, build_inference_mode, forward_logits, infer, slide_logits
from .metrics import ConfusionMatrix, SegmentationMetrics

__all__ = [
    "DEFAULT_SCALES",
    "MODES",
    "ConfusionMatrix",
    "InferenceMode",
    "SegmentationMetrics",
    "build_inference_mode",
    "evaluate",
    "forward_logits",
    "infer",
    "model_device",
    "slide_logits",
]
