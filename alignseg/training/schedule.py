"""Optimisers and the learning-rate schedule: poly decay per iteration after an optional linear warmup."""

from __future__ import annotations

import torch
from torch import nn

from ..config import OptimConfig


def poly_lr(
    iteration: int, total: int, power: float = 0.9, warmup_iters: int = 0, warmup_start_factor: float = 0.1
) -> float:
    """The learning-rate multiplier at ``iteration`` (0-based) of ``total``.

    Poly decay ``(1 - iteration / total) ** power`` (the schedule of DeepLab and AlignSeg), times a
    linear ramp from ``warmup_start_factor`` to 1 over the first ``warmup_iters`` iterations.

    Example:
        >>> poly_lr(0, 100), round(poly_lr(50, 100), 4), poly_lr(100, 100)
        (1.0, 0.5359, 0.0)
    """
    if total < 1:
        raise ValueError(f"total must be at least 1, got {total}")
    factor = max(0.0, 1.0 - iteration / total) ** power
    if iteration < warmup_iters:
        factor *= warmup_start_factor + (1.0 - warmup_start_factor) * iteration / warmup_iters
    return factor


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over the trainable parameters, weight decay on all of them (as the authors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name must be 'sgd' or 'adamw', got {cfg.name!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_iters: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration :func:`poly_lr` schedule (call ``scheduler.step()`` after every optimiser step)."""

    def factor(iteration: int) -> float:
        return poly_lr(iteration, total_iters, cfg.poly_power, cfg.warmup_iters, cfg.warmup_start_factor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
