"""Moved to :mod:`alignseg.checkpoint` (checkpoint files are read by the API and the conversion too); re-exported."""

from ..checkpoint import (  # noqa: F401
    FORMAT,
    VERSION,
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    load_model_state,
    restore_rng_state,
    save_checkpoint,
    state_digest,
    unwrap_model,
    write_atomic,
    write_text_atomic,
)
