"""Checkpoints: atomic writes, keep-last-k and best, exact RNG capture, safe and clearly failing loads.

A checkpoint is a plain dict (loadable with ``torch.load(..., weights_only=True)``)::

    format, version, iteration, model (unwrapped state_dict), optimizer, scheduler, scaler,
    rng (torch, cuda, numpy, python), config (a plain dict), best_miou, nonfinite_steps, data, metrics,
    digest (SHA-256 of everything else, checked on load: flipped bytes in tensor data are caught)

Files in a run folder: ``checkpoint_<iteration>.pt`` (the last ``keep_last`` kept) and ``best.pt``.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import nn

FORMAT = "alignseg-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "iteration", "model", "config")
PERIODIC_PATTERN = re.compile(r"^checkpoint_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message names the file and says why."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model under DistributedDataParallel (``.module``) and torch.compile (``._orig_mod``)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def capture_rng_state() -> dict[str, Any]:
    """Every random generator a training step draws from, in weights_only-loadable types."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`. CUDA states are restored only when the device count matches."""
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    np_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": np_state["bit_generator"],
            "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
            "has_gauss": np_state["has_gauss"],
            "gauss": np_state["gauss"],
        }
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def state_digest(state: dict[str, Any]) -> str:
    """SHA-256 over every entry of ``state`` except ``digest`` and ``path``: keys, tensor dtypes, shapes and bytes.

    Lists and tuples hash alike (a checkpoint round trip may turn one into the other).
    """
    sha = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            data = value.detach().cpu().contiguous().reshape(-1)
            sha.update(f"T{data.dtype}{tuple(value.shape)}".encode())
            sha.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        elif isinstance(value, dict):
            sha.update(b"{")
            for key in sorted(value, key=str):
                sha.update(f"{type(key).__name__}:{key}=".encode())
                feed(value[key])
            sha.update(b"}")
        elif isinstance(value, (list, tuple)):
            sha.update(b"[")
            for item in value:
                feed(item)
            sha.update(b"]")
        else:
            sha.update(f"{type(value).__name__}:{value!r};".encode())

    feed({k: v for k, v in state.items() if k not in ("digest", "path")})
    return sha.hexdigest()


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, then ``os.replace``.

    A crash mid-write leaves the previous file intact (never a truncated checkpoint).
    """
    state = {"format": FORMAT, "version": VERSION, **{k: v for k, v in state.items() if k not in ("digest", "path")}}
    state["digest"] = state_digest(state)
    return write_atomic(path, lambda handle: torch.save(state, handle))


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(binary file)`` on a temporary file beside ``path``, sync it, then ``os.replace`` it onto ``path``.

    Readers see the old file or the new one, never a half-written one, even after ``kill -9``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """:func:`write_atomic` for text (UTF-8)."""
    return write_atomic(path, lambda handle: handle.write(text.encode()))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; :class:`CheckpointError` naming the file otherwise."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no checkpoint_<iteration>.pt file in the folder {path}")
        path = found
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is not a PyTorch checkpoint file (damaged or truncated?)"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        detail = next((line.strip() for line in str(err).splitlines() if "Unsupported global" in line), "")
        raise CheckpointError(
            f"refusing to load checkpoint {path}: it holds Python objects other than tensors and plain data, "
            f"and alignseg loads checkpoints with weights_only=True "
            f"({detail.split('. Please')[0] or 'unpickling failed'})"
        ) from err
    except Exception as err:  # zipfile, EOF and runtime errors all mean "unreadable"
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is damaged or truncated ({type(err).__name__})"
        ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an alignseg checkpoint (no 'format: {FORMAT}' entry)")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: it lacks {missing}")
    if state["version"] > VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {state['version']}, newer than this alignseg reads ({VERSION})"
        )
    if "digest" in state and state_digest(state) != state["digest"]:
        raise CheckpointError(
            f"checkpoint {path} is damaged: its contents do not match the SHA-256 digest stored when it was saved "
            f"(bytes changed on disk or in a copy); use another checkpoint of the run"
        )
    state["path"] = str(path)
    return state


def load_model_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Load ``state['model']`` into (the unwrapped) ``model``; a mismatch names the file and the keys."""
    target = unwrap_model(model)
    weights = state["model"]
    own = target.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    wrong_shape = [
        f"{k}: checkpoint {list(weights[k].shape)} vs model {list(own[k].shape)}"
        for k in own
        if k in weights and weights[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong_shape:
        config = state.get("config") or {}
        made_for = (config.get("model") or {}).get("name", "?"), (config.get("data") or {}).get("num_classes", "?")
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
                problems.append(f"{label}: {', '.join(keys[:5])}{more}")
        raise CheckpointError(
            f"checkpoint {state.get('path', '?')} does not match the model (it was saved for model "
            f"{made_for[0]} with {made_for[1]} classes): " + "; ".join(problems)
        )
    target.load_state_dict(weights)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The periodic checkpoint with the highest iteration in ``run_dir``, or None."""
    found = sorted(_periodic(Path(run_dir)))
    return found[-1][1] if found else None


class CheckpointManager:
    """Writes periodic checkpoints (keeping the last ``keep_last``) and ``best.pt`` into ``run_dir``."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last

    def remove_partial_writes(self) -> list[Path]:
        """Delete temporary files of checkpoint writes cut short (``kill -9`` mid-save); returns them."""
        if not self.run_dir.is_dir():
            return []
        partial = [p for p in self.run_dir.glob(".*.pt.*.tmp") if p.is_file()]
        for path in partial:
            path.unlink(missing_ok=True)
        return partial

    def save(self, state: dict[str, Any]) -> Path:
        path = save_checkpoint(self.run_dir / f"checkpoint_{state['iteration']:07d}.pt", state)
        for _, old in sorted(_periodic(self.run_dir))[: -self.keep_last]:
            old.unlink(missing_ok=True)
        return path

    def save_best(self, state: dict[str, Any]) -> Path:
        return save_checkpoint(self.run_dir / "best.pt", state)


def _periodic(run_dir: Path) -> list[tuple[int, Path]]:
    if not run_dir.is_dir():
        return []
    return [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := PERIODIC_PATTERN.match(p.name))]
