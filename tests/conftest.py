"""Test set-up: Triton runs through its CPU interpreter when no GPU is present.

TRITON_INTERPRET must be set before any module holding ``@triton.jit`` functions is imported,
so it is set here, before the test modules import alignseg.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:  # fix Triton's interpreter mode now: torch imports triton lazily (e.g. on the first custom-op call)
    import triton  # noqa: F401
except ImportError:
    pass


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def reference_ops():
    """Run the alignment ops on the eager reference (model and training tests need no kernels)."""
    from alignseg.ops import use_backend

    with use_backend("reference"):
        yield
