"""Process-group set-up for ``torchrun`` (env:// rendezvous), and the collective helpers training and evaluation use.

One process per device: ``torchrun --nproc_per_node=N -m alignseg train ...``. NCCL on CUDA, gloo on
CPU. With a single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) nothing is initialised and every
helper here is a no-op, so the same code path serves both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes checkpoints, logs and the metrics file."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when present else CPU; ``cuda`` without a GPU is an error."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but PyTorch sees no CUDA device; use train.device=cpu or auto")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto") -> DistributedContext:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...).

    Returns a single-process context when ``WORLD_SIZE`` is unset or 1. Reuses an existing group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    target = resolve_device(device, local_rank)
    if world_size > 1:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise RuntimeError(
                    f"WORLD_SIZE={world_size} but {name} is not set: launch with torchrun, e.g. "
                    "torchrun --nproc_per_node=2 -m alignseg train ..."
                )
        if target.type == "cuda":
            torch.cuda.set_device(target)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if target.type == "cuda" else "gloo", init_method="env://")
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=target)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce over ranks (sum, min or max); a no-op in a single process."""
    if active():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return tensor


def shard_indices(length: int, rank: int, world_size: int) -> range:
    """This rank's share of ``length`` evaluation items: ``rank, rank + world, ...``.

    Unlike DistributedSampler, no index is padded or repeated, so metrics summed over ranks count
    every image exactly once.
    """
    return range(rank, length, world_size)
