"""Resumable, rank-sharded training data order with per-sample augmentation seeds.

The order of training images and the random augmentation of each are functions of
``(seed, epoch, position)`` only, not of how many workers load them or where a run was stopped:

* :class:`ResumableDistributedSampler` is a DistributedSampler (shuffled per epoch with ``set_epoch``,
  one shard per rank) that can start part-way into an epoch and hands out ``(index, sample_seed)``;
* :class:`SeededSamples` wraps a dataset so item ``(index, sample_seed)`` runs the dataset's transform
  under that seed, without touching the process's own torch RNG (which dropout uses).

So resuming at iteration ``k`` replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed for the sample at ``position`` of ``epoch``'s global (pre-shard) order."""
    state = np.random.SeedSequence([seed, epoch, position]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1] >> 1)


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that starts ``start`` samples into the epoch and yields ``(index, sample_seed)``."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int = 0, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` samples of this rank's share of the current epoch."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start must be in [0, {self.num_samples}], got {start}")
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())
        for i in range(self.start, len(indices)):
            position = self.rank + i * self.num_replicas  # where this sample sits in the unsharded order
            yield indices[i], sample_seed(self.seed, self.epoch, position)

    def __len__(self) -> int:
        return self.num_samples - self.start


class SeededSamples(Dataset):
    """``dataset[(index, seed)]``: item ``index`` with the torch RNG seeded by ``seed`` while it is made."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]
