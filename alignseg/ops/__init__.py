"""Feature-alignment ops of AlignSeg: Triton kernels with eager PyTorch references."""

from .align_cm import align_cm, align_cm_grid_sample, align_cm_reference
from .align_fa import align_fa, align_fa_grid_sample, align_fa_reference
from .backend import get_backend, get_backward, set_backend, set_backward, use_backend, use_backward
from .sampling import sample_grid_sample, sample_reference

__all__ = [
    "align_cm",
    "align_cm_grid_sample",
    "align_cm_reference",
    "align_fa",
    "align_fa_grid_sample",
    "align_fa_reference",
    "get_backend",
    "get_backward",
    "sample_grid_sample",
    "sample_reference",
    "set_backend",
    "set_backward",
    "use_backend",
    "use_backward",
]
