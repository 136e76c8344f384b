"""Which implementation the alignment ops run on: the Triton kernels or one of two eager formulations.

The choice comes from the environment variable ``ALIGNSEG_BACKEND``, or from
:func:`set_backend` / :func:`use_backend` in code (these win over the variable):

* ``auto`` (default): Triton for CUDA tensors; for CPU tensors Triton only when
  ``TRITON_INTERPRET=1`` is set (the Triton interpreter), else ``grid_sample``.
  Where Triton is not installed, always ``grid_sample``.
* ``triton``: always the kernels; a clear ``RuntimeError`` if they cannot run.
* ``grid_sample``: the fast eager formulation, one ``F.grid_sample`` per sampled map
  (:func:`alignseg.ops.sample_grid_sample`); same values, gradients and NaN rule as the reference.
* ``reference``: the eager gather reference (:func:`alignseg.ops.sample_reference`), the test
  oracle: independent of ``grid_sample``, 5-10x slower on the CPU.

The Triton backward of ``align_fa`` has three paths, chosen by ``ALIGNSEG_BACKWARD`` or
:func:`set_backward` / :func:`use_backward`: ``atomic`` scatters the source gradients with float atomic
adds (the fastest measured: bench/results/h200-2026-11-27; not bit-reproducible on a GPU), ``gather``
computes all three gradients by one deterministic launch over pixel bins (:mod:`alignseg.kernels.align_fa_gather`:
fixed order of addition, no atomics, exact to the dtype's rounding), ``fixed_point`` scatters the source
gradients as 64-bit fixed-point integers (:mod:`alignseg.kernels.fixed_point`: integer addition does not depend
on the order; 3.6x the time of ``atomic`` on an H200, bf16). ``auto`` (default) takes ``atomic``, and under
``torch.use_deterministic_algorithms(True)`` ``gather`` (:func:`resolve_backward` says why).
``align_cm``'s backward is deterministic on its own (no switch). Only a forced ``atomic`` path under
``torch.use_deterministic_algorithms(True)`` warns or raises, like PyTorch's own nondeterministic ops
(:func:`alert_nondeterministic`).

The decision is plain Python on values that do not change inside a compiled region, so
``torch.compile`` specialises on it without a graph break.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Iterator

import torch


class _Setting:
    """A choice read from an environment variable, which :meth:`set` / :meth:`use` override for the process."""

    def __init__(self, what: str, variable: str, choices: tuple[str, ...]):
        self.what, self.variable, self.choices = what, variable, choices
        self.override: str | None = None

    def check(self, name: str) -> str:
        name = name.strip().lower()
        if name not in self.choices:
            raise ValueError(f"{self.what} must be one of {self.choices}, got {name!r}")
        return name

    def get(self) -> str:
        if self.override is not None:
            return self.override
        return self.check(os.environ.get(self.variable, "auto"))

    def set(self, name: str | None) -> None:
        self.override = None if name is None else self.check(name)

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[None]:
        previous = self.override
        self.set(name)
        try:
            yield
        finally:
            self.override = previous


BACKENDS = ("auto", "triton", "grid_sample", "reference")
EAGER_BACKENDS = ("grid_sample", "reference")  # the formulations selectable besides the kernels
_BACKEND = _Setting("backend", "ALIGNSEG_BACKEND", BACKENDS)


def get_backend() -> str:
    """The requested backend name: the :func:`set_backend` override, else ``ALIGNSEG_BACKEND``."""
    return _BACKEND.get()


def set_backend(name: str | None) -> None:
    """Override ``ALIGNSEG_BACKEND`` for this process; ``None`` returns to the variable."""
    _BACKEND.set(name)


def use_backend(name: str) -> contextlib.AbstractContextManager[None]:
    """Run a block on one backend: ``with use_backend("reference"): ...``."""
    return _BACKEND.use(name)


# The align_fa backward's paths: "auto" (see resolve_backward), "atomic" (the per-pixel kernel scatters the source
# gradients with float atomics), "gather" (one deterministic launch over pixel bins for all three gradients) or
# "fixed_point" (a scatter-only kernel with int64 fixed-point atomics: deterministic).
BACKWARD_PATHS = ("auto", "atomic", "fixed_point", "gather")
_BACKWARD = _Setting("backward path", "ALIGNSEG_BACKWARD", BACKWARD_PATHS)


def get_backward() -> str:
    """The requested align_fa backward path: the :func:`set_backward` override, else ``ALIGNSEG_BACKWARD``
    (default "auto")."""
    return _BACKWARD.get()


def resolve_backward() -> str:
    """The path the align_fa backward takes now: "auto" becomes "atomic", or in deterministic mode "gather".

    Why "gather" and not "fixed_point" there: on an H200 (bench/results/h200-2026-11-27/
    run4_deterministic_backward.txt; bf16, the issue-12 shape, channels_last) the op took 11.0 ms on
    the fixed-point path against 3.06 ms on the atomic path, and 36.3 ms on the gathers of then (a window scan,
    since replaced). Today's gather path is one launch over pixel bins, about 1.15x the minimum bytes by
    bench/README.md's model where the fixed-point path moves 9.4x, and a step count 15x below the window scan's
    (bench/gather_steps.py): an estimate, not a measurement, which the device check's rows settle. It also rounds
    nothing beyond the dtype's own arithmetic, where the fixed point rounds every contribution to 64-bit integers."""
    requested = get_backward()
    if requested != "auto":
        return requested
    return "gather" if torch.are_deterministic_algorithms_enabled() else "atomic"


def set_backward(name: str | None) -> None:
    """Override ``ALIGNSEG_BACKWARD`` for this process (one of :data:`BACKWARD_PATHS`); ``None`` returns to the
    variable."""
    _BACKWARD.set(name)


def use_backward(name: str) -> contextlib.AbstractContextManager[None]:
    """Run a block with one align_fa backward path: ``with use_backward("atomic"): ...``."""
    return _BACKWARD.use(name)


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


def select_backend(device: torch.device) -> str:
    """What an op on tensors of ``device`` runs: ``"triton"`` or one of :data:`EAGER_BACKENDS`.

    Raises ``RuntimeError`` when ``triton`` was asked for and cannot run there.
    """
    backend = get_backend()
    if backend in EAGER_BACKENDS:
        return backend
    why_not = triton_unavailable_reason(device)
    if backend == "triton" and why_not is not None:
        raise RuntimeError(f"ALIGNSEG_BACKEND=triton but the Triton kernels cannot run: {why_not}")
    return "triton" if why_not is None else "grid_sample"


def use_triton(device: torch.device) -> bool:
    """Whether an op on tensors of ``device`` runs the Triton kernels (see :func:`select_backend`)."""
    return select_backend(device) == "triton"


# Device types whose Triton backward accumulates with atomics in a nondeterministic order (the
# interpreter runs programs one after another, so CPU results repeat).
NONDETERMINISTIC_DEVICE_TYPES = ("cuda",)


def alert_nondeterministic(op: str, device: torch.device) -> None:
    """Raise, or warn under ``warn_only``, when deterministic algorithms are requested and ``op`` is not.

    Follows ``torch.use_deterministic_algorithms(True, warn_only=...)`` like PyTorch's own ops. Called by a
    backward custom op only when it is about to run an atomic path (``align_fa``'s with
    ``ALIGNSEG_BACKWARD=atomic``), which accumulates gradients with fp32/fp64 atomics on a GPU.
    """
    if device.type not in NONDETERMINISTIC_DEVICE_TYPES or not torch.are_deterministic_algorithms_enabled():
        return
    message = (
        f"{op} does not have a deterministic implementation on {device.type} with the atomic backward path "
        "(ALIGNSEG_BACKWARD=atomic or alignseg.ops.set_backward('atomic'): its Triton kernel accumulates "
        "gradients with atomic adds), but you set 'torch.use_deterministic_algorithms(True)'. Use the "
        "'auto' (default), 'fixed_point' or 'gather' path, or 'torch.use_deterministic_algorithms(True, "
        "warn_only=True)' to only warn."
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, UserWarning, stacklevel=2)
    else:
        raise RuntimeError(message)


def require_triton(device: torch.device) -> None:
    """Raise ``RuntimeError`` when the kernels cannot run on ``device`` (called by the custom ops)."""
    why_not = triton_unavailable_reason(device)
    if why_not is not None:
        raise RuntimeError(f"the alignseg Triton kernels cannot run: {why_not}")
