"""AlignSeg: Feature-Aligned Segmentation Networks (Huang et al., TPAMI 2021), on Triton.

The Python front door (:mod:`alignseg.api`): ``load_model``, ``segment``, ``render``.
"""

__version__ = "0.1.0"

_API = ("load_model", "segment", "render")
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    # Imported on first use: `import alignseg` stays cheap for the kernels and ops.
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'alignseg' has no attribute {name!r}")
