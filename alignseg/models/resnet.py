"""ResNet backbone with the deep stem, as in the AlignSeg authors' released code.

The stem is three 3x3 convolutions (in -> w -> w -> 2w, stride 2 on the first) and a 3x3 max-pool
of stride 2 with ``ceil_mode=True``; the four stages follow without dilation, so the output stride
is 32 and the stages return maps at strides 4, 8, 16 and 32. Bottleneck blocks put the stride on the
3x3 convolution ("ResNet v1.5"). Attribute names follow the common deep-stem ImageNet checkpoints
(``conv1``/``bn1``/``conv2``/``bn2``/``conv3``/``bn3``, ``layer1``..``layer4``, ``downsample.0/1``), so
such a checkpoint loads key for key (see :mod:`alignseg.models.weights`).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

NormLayer = Callable[[int], nn.Module]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4, with a residual connection (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


# depth -> (block type, blocks per stage)
RESNET_LAYOUTS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


class ResNetBackbone(nn.Module):
    """Deep-stem ResNet returning the four stage outputs at strides 4, 8, 16 and 32.

    Args:
        depth: 18, 34, 50, 101 or 152.
        width: channels of the first stage's blocks (64 in the standard ResNets); the stages use
            ``width * (1, 2, 4, 8)`` and the stem ``(width, width, 2 * width)``.
        in_channels: image channels.
        norm_layer: called with a channel count, returns the normalisation module.

    ``stage_channels`` lists the output channels of the four stages (e.g. 256, 512, 1024, 2048 for
    ResNet-101).
    """

    def __init__(self, depth: int = 101, width: int = 64, in_channels: int = 3, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        if depth not in RESNET_LAYOUTS:
            raise ValueError(f"depth must be one of {sorted(RESNET_LAYOUTS)}, got {depth!r}")
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        block, blocks_per_stage = RESNET_LAYOUTS[depth]
        self.depth = depth
        self.width = width
        stem_out = 2 * width
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False)
        self.bn1 = norm_layer(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = norm_layer(width)
        self.conv3 = nn.Conv2d(width, stem_out, 3, padding=1, bias=False)
        self.bn3 = norm_layer(stem_out)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=True)

        channels = stem_out
        stages = []
        for index, num_blocks in enumerate(blocks_per_stage):
            planes = width * 2**index
            stride = 1 if index == 0 else 2
            stage, channels = _make_stage(block, channels, planes, num_blocks, stride, norm_layer)
            stages.append(stage)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.stage_channels = tuple(width * 2**i * block.expansion for i in range(4))
        init_weights(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        x = self.maxpool(x)
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return c1, c2, c3, c4

    def extra_repr(self) -> str:
        return f"depth={self.depth}, width={self.width}, deep_stem=True, output_stride=32"


def _make_stage(block, in_channels: int, planes: int, num_blocks: int, stride: int,
                norm_layer: NormLayer) -> tuple[nn.Sequential, int]:
    out_channels = planes * block.expansion
    downsample = None
    # The deep stem ends at 2 * width channels, so even the first stage of ResNet-18 needs a projection.
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
            norm_layer(out_channels),
        )
    blocks = [block(in_channels, planes, stride, downsample, norm_layer)]
    blocks += [block(out_channels, planes, norm_layer=norm_layer) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks), out_channels


def init_weights(module: nn.Module) -> None:
    """He-normal convolutions (fan-out, as torchvision's ResNets), unit-scale zero-shift norms."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._NormBase) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

