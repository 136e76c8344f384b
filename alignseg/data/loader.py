"""DataLoader construction with reproducible worker seeding.

PyTorch gives every worker process its own torch seed (``base_seed + worker_id``, the base drawn from the
main process's torch RNG), and the transforms draw only from the torch RNG, so seeding torch in the main
process makes augmentation reproducible for any number of workers. :func:`seed_worker` also seeds
``random`` and NumPy from that seed, for user transforms that use them.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed Python's ``random`` and NumPy from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    workers: int = 0,
    sampler: Sampler | None = None,
    generator: torch.Generator | None = None,
    drop_last: bool | None = None,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A DataLoader for training (shuffled, last incomplete batch dropped) or evaluation (in order).

    Args:
        sampler: e.g. a ``DistributedSampler``; when given, it decides the order and ``shuffle`` is off.
        generator: the RNG of the shuffling and of the workers' base seed; default the global torch RNG.
        drop_last: default ``train`` (a batch of one breaks BatchNorm in training).
        pin_memory: default: when CUDA is available.

    Workers are persistent when ``workers > 0`` (no re-spawn every epoch).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int >= 0, got {workers!r}")
    if train and len(dataset) < batch_size and (drop_last is None or drop_last):
        raise ValueError(
            f"the training set has {len(dataset)} images, fewer than batch_size={batch_size}: "
            "every batch would be dropped"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=train if drop_last is None else drop_last,
        persistent_workers=workers > 0,
        worker_init_fn=seed_worker,
        generator=generator,
    )
