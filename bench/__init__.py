"""Benchmarks of AlignSeg: the alignment ops against eager PyTorch and torch.compile, and the training step.

Run everything with ``python -m bench`` from the repository root (see bench/README.md).
"""
