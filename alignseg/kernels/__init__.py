"""Triton kernels of AlignSeg (``alignseg.kernels``: a plain subpackage, so a source checkout works with PYTHONPATH
alone).

* ``bilinear``: the sampling rule S as shared ``@triton.jit`` helpers (coordinates, taps, tiles in either
  orientation).
* ``align_fa`` / ``align_cm``: forward and backward kernels with their launchers; ``align_fa_gather``: the
  deterministic gathers; ``fixed_point``: order-free atomics.
* ``launch``: block sizes and warps of every launch (``GPU_CONFIGS``), the one place to tune them, and the
  tiles' orientation for the installed Triton (``pixels_last``).
* ``report``: ``python -m alignseg.kernels.report`` compiles every kernel for sm_80/sm_90 without a
  GPU and prints registers, spills and what a warp instruction covers; ``layout_probe``: the kernel it
  compiles to read the installed Triton's layout rule.

Nothing here registers ops or does autograd: that is :mod:`alignseg.ops`. Import these modules only
when a kernel is about to run, so that ``TRITON_INTERPRET`` is read then.
"""
