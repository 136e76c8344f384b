"""Parameter and multiply-accumulate (MAC) counts of the networks, and a printable summary per preset.

MACs are counted for one image: every convolution and matrix product (torch's ``FlopCounterMode``,
which counts 2 FLOPs per MAC) plus the bilinear taps of the alignment ops (4 per sampled map and
output element: two maps for AlignFA, one for AlignCM). Normalisation, activations, pooling and
the final logit upsampling are not counted, as is usual. AlignSeg models are counted on the meta
device, so no memory is allocated and no arithmetic is done, whatever the input size.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .modules import AlignCM, AlignFA
from .network import AlignSeg
from .registry import PRESETS, build, list_models

_TAPS = 4  # bilinear sampling reads four neighbours


def complexity(model: nn.Module, input_size: tuple[int, int] = (512, 1024)) -> tuple[int, int]:
    """``(num_params, macs)`` of ``model`` for one ``input_size`` = (H, W) image, in eval mode.

    Example:
        >>> params, macs = complexity(build("alignseg_r101", 19), (512, 1024))
    """
    if len(input_size) != 2 or not all(isinstance(s, int) and s > 0 for s in input_size):
        raise ValueError(f"input_size must be (H, W) with positive ints, got {input_size!r}")
    num_params = sum(p.numel() for p in model.parameters())
    if isinstance(model, AlignSeg):
        # The same network on the meta device: shapes only, so even ResNet-101 at 1024x2048 is instant.
        with torch.device("meta"):
            counted = AlignSeg(**model.config)
        in_channels = model.in_channels
    else:
        counted = model
        in_channels = getattr(model, "in_channels", 3)
    device = next(counted.parameters(), torch.empty(0)).device
    images = torch.zeros(1, in_channels, *input_size, device=device)

    sampling_macs = 0

    def count_taps(module: nn.Module, inputs, output) -> None:
        nonlocal sampling_macs
        maps = 2 if isinstance(module, AlignFA) else 1
        sampling_macs += _TAPS * maps * output.numel()

    hooks = [m.register_forward_hook(count_taps) for m in counted.modules() if isinstance(m, (AlignFA, AlignCM))]
    was_training = counted.training
    counted.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            counted(images)
    finally:
        for hook in hooks:
            hook.remove()
        counted.train(was_training)
    return num_params, counter.get_total_flops() // 2 + sampling_macs


def format_model_summary(
    names: Iterable[str] | None = None,
    num_classes: int = 19,
    input_size: tuple[int, int] = (512, 1024),
    **overrides: Any,
) -> str:
    """A table of parameters and GMACs for the presets ``names`` (all presets by default), built with
    ``overrides`` as :func:`~alignseg.models.build` takes them.

    Example output line::

        alignseg_r101      66.85 M    209.70  the paper's network: deep-stem ResNet-101, 256-wide decoder
    """
    names = list_models() if names is None else list(names)
    header = f"{'model':<15} {'params':>10} {'GMACs':>9}  at {input_size[0]}x{input_size[1]}, {num_classes} classes"
    lines = [header, "-" * len(header)]
    for name in names:
        with torch.device("meta"):
            model = build(name, num_classes, **overrides)
        params, macs = complexity(model, input_size)
        lines.append(f"{name:<15} {params / 1e6:>8.2f} M {macs / 1e9:>9.2f}  {PRESETS[name].description}")
    return "\n".join(lines)
