"""Triton kernels of AlignSeg (``alignseg.kernels``: a plain subpackage, so a source checkout works with PYTHONPATH
alone).

* ``bilinear``: the sampling rule S as shared ``@triton.jit`` helpers (coordinates, taps, tiles).
* ``align_fa`` / ``align_cm``: forward and backward kernels with their launchers.
* ``launch``: block sizes and warps of every launch (``GPU_CONFIGS``), the one place to tune them.
* ``report``: ``python -m alignseg.kernels.report`` compiles every kernel for sm_80/sm_90 without a
  GPU and prints registers and spills.

Nothing here registers ops or does autograd: that is :mod:`alignseg.ops`. Import these modules only
when a kernel is about to run, so that ``TRITON_INTERPRET`` is read then.
"""
