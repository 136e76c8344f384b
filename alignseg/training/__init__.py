"""Training: the loop (:class:`Trainer`) and the poly schedule.

Checkpoints and the distributed set-up live in :mod:`alignseg.checkpoint` and :mod:`alignseg.distributed`.
"""

from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint, unwrap_model
from .schedule import build_optimizer, build_scheduler, poly_lr
from .trainer import NonFiniteLossError, Trainer, train

__all__ = [
    "CheckpointError",
    "NonFiniteLossError",
    "Trainer",
    "build_optimizer",
    "build_scheduler",
    "load_checkpoint",
    "poly_lr",
    "save_checkpoint",
    "train",
    "unwrap_model",
]
