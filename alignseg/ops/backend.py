"""Which implementation the alignment ops run on: the Triton kernels or the eager reference.

The choice comes from the environment variable ``ALIGNSEG_BACKEND``, or from
:func:`set_backend` / :func:`use_backend` in code (these win over the variable):

* ``auto`` (default): Triton for CUDA tensors; for CPU tensors Triton only when
  ``TRITON_INTERPRET=1`` is set (the Triton interpreter), else the eager reference.
  Where Triton is not installed, always the reference.
* ``triton``: always the kernels; a clear ``RuntimeError`` if they cannot run.
* ``reference``: always the eager PyTorch reference.

The decision is plain Python on values that do not change inside a compiled region, so
``torch.compile`` specialises on it without a graph break.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "reference")

_override: str | None = None


def _check_name(name: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def get_backend() -> str:
    """The requested backend name: the :func:`set_backend` override, else ``ALIGNSEG_BACKEND``."""
    if _override is not None:
        return _override
    return _check_name(os.environ.get("ALIGNSEG_BACKEND", "auto"))


def set_backend(name: str | None) -> None:
    """Override ``ALIGNSEG_BACKEND`` for this process; ``None`` returns to the variable."""
    global _override
    _override = None if name is None else _check_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block on one backend: ``with use_backend("reference"): ...``."""
    global _override
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        _override = previous


# Looked up once, without importing triton (slow, and optional): a plain module constant is also
# what lets torch.compile evaluate the backend choice without tracing into a cache wrapper.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when the ``triton`` package is installed (it is optional)."""
    return _TRITON_INSTALLED


def interpreter_enabled() -> bool:
    """True when Triton kernels run on the CPU through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on tensors of ``device`` (None when they can)."""
    if not triton_available():
        return "the triton package is not installed (pip install 'alignseg[triton]')"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if interpreter_enabled():
            return None
        return "tensors are on the CPU and TRITON_INTERPRET=1 was not set before alignseg was imported"
    return f"Triton does not run on device type {device.type!r}"


def use_triton(device: torch.device) -> bool:
    """Whether an op on tensors of ``device`` runs the Triton kernels.

    Raises ``RuntimeError`` when ``triton`` was asked for and cannot run there.
    """
    backend = get_backend()
    if backend == "reference":
        return False
    why_not = triton_unavailable_reason(device)
    if backend == "triton" and why_not is not None:
        raise RuntimeError(f"ALIGNSEG_BACKEND=triton but the Triton kernels cannot run: {why_not}")
    return why_not is None


def require_triton(device: torch.device) -> None:
    """Raise ``RuntimeError`` when the kernels cannot run on ``device`` (called by the custom ops)."""
    why_not = triton_unavailable_reason(device)
    if why_not is not None:
        raise RuntimeError(f"the alignseg Triton kernels cannot run: {why_not}")
