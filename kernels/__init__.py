"""Triton kernels of AlignSeg, installed as ``alignseg.kernels`` (see pyproject.toml)."""
