"""A plain-PyTorch port of the authors' network (repository ``speedinghzl/AlignSeg``, ``networks/alignseg.py``), the
test oracle for :mod:`alignseg.models.authors`.

Written here from their source, not imported: module and attribute names are theirs, so ``state_dict()`` has
the key layout of their checkpoints (``conv1``/``bn1``.., ``layer1``..``layer4``, ``CAM``, ``CAB2``..``CAB5``,
``RRB1a``.., ``head``, ``dsn``). Depth and widths are parameters (theirs: Bottleneck ``[3, 4, 23, 3]``, stem
64-64-128, decoder 256, alignseg.py L218-257, L343-344) so that tests can run a tiny copy.

* ``InPlaceABNSync`` is emulated in eval mode as inplace_abn computes it (``src/inplace_abn_cpu.cpp`` L121-127
  at mapillary/inplace_abn HEAD, the same at v1.0.12 L103): ``act((x - mean) * (|weight| + eps) / sqrt(var +
  eps) + bias)``, eps 1e-5, leaky ReLU 0.01 by default; the backbone's ``BatchNorm2d`` is the same module with
  ``activation='identity'`` (alignseg.py L18). No ``num_batches_tracked`` (inplace_abn v1.0.x had none).
* The warp is their ``bilinear_interpolate_torch_gridsample`` as released before the issue #7 fix (commit
  118fb81 changed ``norm = [[[[h/s, w/s]]]]`` to ``[w/s, h/s]``), with ``F.grid_sample(..., align_corners=True)``:
  their call passes no ``align_corners`` and PyTorch 1.2 (their issue #3) behaved as ``True``.
* ``forward`` returns ``[out, dsn]`` at stride 4, as theirs (L322-328); :func:`authors_evaluate_whole` is their
  ``predict_whole`` upsampling (evaluate.py L145-153: bilinear, ``align_corners=True``) without numpy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class InPlaceABNSync(nn.Module):
    """inplace_abn's InPlaceABN(Sync) in eval mode: BatchNorm with scale ``|weight| + eps``, then an activation."""

    def __init__(self, num_features: int, eps: float = 1e-5, activation: str = "leaky_relu", slope: float = 0.01):
        super().__init__()
        self.eps, self.activation, self.slope = eps, activation, slope
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            raise NotImplementedError("the oracle emulates InPlaceABN in eval mode only")
        scale = (self.weight.abs() + self.eps) / torch.sqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        x = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        if self.activation == "leaky_relu":
            return F.leaky_relu(x, self.slope)
        if self.activation == "identity":
            return x
        raise ValueError(self.activation)


def BatchNorm2d(num_features: int) -> InPlaceABNSync:
    return InPlaceABNSync(num_features, activation="identity")


def authors_warp(source: Tensor, size: tuple[int, int], delta: Tensor) -> Tensor:
    """Their released ``bilinear_interpolate_torch_gridsample`` (pre-#7 ``norm = [h, w]``, PyTorch 1.2 grid_sample)."""
    out_h, out_w = size
    n, _, h, w = source.shape
    like = {"dtype": source.dtype, "device": source.device}
    norm = torch.tensor([[[[h / 1.0, w / 1.0]]]], **like)
    ys = torch.linspace(-1.0, 1.0, out_h, **like).view(-1, 1).repeat(1, out_w)
    xs = torch.linspace(-1.0, 1.0, out_w, **like).repeat(out_h, 1)
    grid = torch.cat((xs.unsqueeze(2), ys.unsqueeze(2)), 2).repeat(n, 1, 1, 1)
    grid = grid + delta.permute(0, 2, 3, 1) / norm
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class RRB(nn.Module):
    def __init__(self, features: int, out_features: int):
        super().__init__()
        self.unify = nn.Conv2d(features, out_features, 1, bias=False)
        self.residual = nn.Sequential(
            nn.Conv2d(out_features, out_features // 4, 3, padding=1, bias=False),
            InPlaceABNSync(out_features // 4),
            nn.Conv2d(out_features // 4, out_features, 3, padding=1, bias=False),
        )
        self.norm = InPlaceABNSync(out_features)

    def forward(self, feats: Tensor) -> Tensor:
        feats = self.unify(feats)
        return self.norm(feats + self.residual(feats))


def _delta_gen(features: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(features * 2, features, 1, bias=False),
        InPlaceABNSync(features),
        nn.Conv2d(features, 2, 3, padding=1, bias=False),
    )


class CAM(nn.Module):
    def __init__(self, features: int, in_features: int):
        super().__init__()
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d((3, 3)),
            nn.Conv2d(features, features, 1, bias=False),
            InPlaceABNSync(features),
            nn.Conv2d(features, in_features, 3, padding=1, bias=False),
            InPlaceABNSync(in_features),
        )
        self.adapt = nn.Sequential(
            nn.Conv2d(features, features, 1, bias=False),
            InPlaceABNSync(features),
            nn.Conv2d(features, in_features, 3, padding=1, bias=False),
            InPlaceABNSync(in_features),
        )
        self.delta_gen = _delta_gen(in_features)

    def forward(self, low_stage: Tensor) -> Tensor:
        h, w = low_stage.shape[-2:]
        high_stage = self.pool(low_stage)
        low_stage = self.adapt(low_stage)
        high_up = F.interpolate(high_stage, size=(h, w), mode="bilinear", align_corners=True)
        delta = self.delta_gen(torch.cat((low_stage, high_up), 1))
        return authors_warp(high_stage, (h, w), delta) + low_stage


class CAB(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.delta_gen1 = _delta_gen(features)
        self.delta_gen2 = _delta_gen(features)

    def forward(self, low_stage: Tensor, high_stage: Tensor) -> Tensor:
        h, w = low_stage.shape[-2:]
        high_stage = F.interpolate(high_stage, size=(h, w), mode="bilinear", align_corners=True)
        concat = torch.cat((low_stage, high_stage), 1)
        delta1, delta2 = self.delta_gen1(concat), self.delta_gen2(concat)
        return authors_warp(high_stage, (h, w), delta1) + authors_warp(low_stage, (h, w), delta2)


def _seg_head(features: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(features, features, 3, padding=1),  # with bias, as theirs
        InPlaceABNSync(features),
        nn.Dropout2d(0.1),
        nn.Conv2d(features, num_classes, 1, bias=True),
    )


class AuthorsAlignSeg(nn.Module):
    """Their ``ResNet`` (the whole AlignSeg) with ``layers`` Bottleneck blocks, stem ``width``-``width``-``2 width``."""

    def __init__(self, num_classes: int, layers=(3, 4, 23, 3), width: int = 64, decoder: int = 256):
        super().__init__()
        self.inplanes = 2 * width
        self.conv1 = nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False)
        self.bn1 = BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn3 = BatchNorm2d(2 * width)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=True)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(8 * width, layers[3], stride=2)
        c4 = 32 * width
        self.CAM = CAM(c4, decoder)
        self.RRB5a, self.CAB5, self.RRB5b = RRB(decoder, decoder), CAB(decoder), RRB(decoder, decoder)
        self.RRB4a, self.CAB4, self.RRB4b = RRB(c4, decoder), CAB(decoder), RRB(decoder, decoder)
        self.RRB3a, self.CAB3, self.RRB3b = RRB(c4 // 2, decoder), CAB(decoder), RRB(decoder, decoder)
        self.RRB2a, self.CAB2, self.RRB2b = RRB(c4 // 4, decoder), CAB(decoder), RRB(decoder, decoder)
        self.RRB1a = RRB(c4 // 8, decoder)
        self.dsn = _seg_head(decoder, num_classes)
        self.head = _seg_head(decoder, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False), BatchNorm2d(planes * 4)
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * 4
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = self.maxpool(x)
        x1 = self.layer1(x)
        d1 = self.RRB1a(x1)
        x2 = self.layer2(x1)
        d2 = self.RRB2b(self.CAB2(d1, self.RRB2a(x2)))
        x3 = self.layer3(x2)
        d3 = self.RRB3b(self.CAB3(d2, self.RRB3a(x3)))
        dsn = self.dsn(d3)
        x4 = self.layer4(x3)
        d4 = self.RRB4b(self.CAB4(d3, self.RRB4a(x4)))
        d5 = self.RRB5b(self.CAB5(d4, self.RRB5a(self.CAM(x4))))
        return [self.head(d5), dsn]


def authors_evaluate_whole(net: nn.Module, image: Tensor) -> Tensor:
    """Their ``predict_whole``: the main output upsampled to the image size, bilinear, ``align_corners=True``."""
    prediction = net(image)
    if isinstance(prediction, list):
        prediction = prediction[0]
    return F.interpolate(prediction, size=image.shape[-2:], mode="bilinear", align_corners=True)


OFFSET_HEADS = ("CAM.delta_gen", "CAB2.delta_gen1", "CAB2.delta_gen2", "CAB3.delta_gen1", "CAB3.delta_gen2",
                "CAB4.delta_gen1", "CAB4.delta_gen2", "CAB5.delta_gen1", "CAB5.delta_gen2")  # in forward order


def randomize_(net: nn.Module, generator: torch.Generator) -> nn.Module:
    """Random weights that exercise every conversion rule: He-scaled convs (biases too), norms with about half of
    the weights negative, random running statistics, and non-zero offset heads (their zero init replaced; see
    :func:`calibrate_offsets_` for their size).
    """
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                std = (2.0 / fan_in) ** 0.5
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                if module.bias is not None:
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
            elif isinstance(module, InPlaceABNSync):
                n = module.weight.numel()
                module.weight.copy_(torch.randn(n, generator=generator))
                module.bias.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
    return net


def calibrate_offsets_(net: nn.Module, images: Tensor, pixels: float = 1.5) -> dict[str, float]:
    """Scale each offset head's last conv, in forward order, so that its offsets on ``images`` have an RMS of
    about ``pixels`` pixels of the map they move (a normalised unit d moves x by d (W - 1) / (2 h)): large enough
    to cross pixels and leave the map at the border, small enough to keep most samples inside. Returns the RMS
    of each head's raw output (normalised units) after scaling.
    """
    rms: dict[str, float] = {}
    for name in OFFSET_HEADS:
        head = net.get_submodule(name)
        seen: dict[str, Tensor] = {}
        handle = head.register_forward_hook(lambda _m, _inputs, out, seen=seen: seen.update(out=out))
        with torch.no_grad():
            net(images)
        handle.remove()
        h, w = seen["out"].shape[-2:]
        sampled_hw = (3, 3) if name.startswith("CAM") else (h, w)
        # Pixels per normalised unit, x and y, in the output grid (the AlignFA/AlignCM docstrings derive these).
        per_unit = torch.tensor([(w - 1) / (2 * sampled_hw[0]), (h - 1) / (2 * sampled_hw[1])], dtype=seen["out"].dtype)
        moved = seen["out"] * per_unit.view(1, 2, 1, 1)
        factor = pixels / moved.pow(2).mean().sqrt().item()
        with torch.no_grad():
            head[2].weight.mul_(factor)
        rms[name] = seen["out"].pow(2).mean().sqrt().item() * factor
    return rms
