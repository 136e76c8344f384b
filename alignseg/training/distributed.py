"""Moved to :mod:`alignseg.distributed` (evaluation and prediction use it too); re-exported."""

from ..distributed import (  # noqa: F401
    DistributedContext,
    active,
    all_reduce_,
    barrier,
    cleanup_distributed,
    init_distributed,
    resolve_device,
    shard_indices,
)
