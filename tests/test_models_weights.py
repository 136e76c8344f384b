"""Loading backbone weights from local files, and the parameter / MAC counts."""

import pytest
import torch
from torch import nn

from alignseg.models import (
    AlignFA,
    ResNetBackbone,
    build,
    complexity,
    format_model_summary,
    list_models,
    load_backbone_weights,
)

pytestmark = pytest.mark.usefixtures("reference_ops")


def torchvision_resnet18_state_dict() -> dict[str, torch.Tensor]:
    """Random tensors under the key names and shapes of torchvision's resnet18 (written out by hand:
    torchvision is not a dependency)."""
    state: dict[str, torch.Tensor] = {}

    def conv(key, out_ch, in_ch, k):
        state[f"{key}.weight"] = torch.randn(out_ch, in_ch, k, k)

    def norm(key, ch):
        state[f"{key}.weight"] = torch.rand(ch) + 0.5
        state[f"{key}.bias"] = torch.randn(ch)
        state[f"{key}.running_mean"] = torch.randn(ch)
        state[f"{key}.running_var"] = torch.rand(ch) + 0.5
        state[f"{key}.num_batches_tracked"] = torch.tensor(1000)

    conv("conv1", 64, 3, 7)
    norm("bn1", 64)
    in_ch = 64
    for stage, planes in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            prefix = f"layer{stage}.{block}"
            stride = 2 if stage > 1 and block == 0 else 1
            conv(f"{prefix}.conv1", planes, in_ch, 3)
            norm(f"{prefix}.bn1", planes)
            conv(f"{prefix}.conv2", planes, planes, 3)
            norm(f"{prefix}.bn2", planes)
            if stride != 1 or in_ch != planes:
                conv(f"{prefix}.downsample.0", planes, in_ch, 1)
                norm(f"{prefix}.downsample.1", planes)
            in_ch = planes
    state["fc.weight"] = torch.randn(1000, 512)
    state["fc.bias"] = torch.randn(1000)
    return state


def test_loading_a_torchvision_state_dict_reports_what_it_loaded(tmp_path):
    state = torchvision_resnet18_state_dict()
    path = tmp_path / "resnet18-torchvision.pth"
    torch.save(state, path)
    model = build("alignseg_r18", 5)
    stem_before = model.backbone.conv1.weight.clone()

    report = load_backbone_weights(model, path)

    stem_keys = {k for k in state if k.startswith(("conv1.", "bn1."))}
    # The deep stem ends at 128 channels, so layer1's first block reads 128, not 64, channels.
    shape_keys = {"layer1.0.conv1.weight"}
    assert set(report.skipped) == stem_keys | shape_keys | {"fc.weight", "fc.bias"}
    assert all("7x7 stem is not the deep stem" in report.skipped[k] for k in stem_keys)
    assert (
        "shape [64, 64, 3, 3] does not match the backbone's [64, 128, 3, 3]" in report.skipped["layer1.0.conv1.weight"]
    )
    assert "classifier" in report.skipped["fc.weight"]
    assert set(report.loaded) == set(state) - set(report.skipped)
    backbone_state = model.backbone.state_dict()
    for key in report.loaded:
        torch.testing.assert_close(backbone_state[key], state[key], msg=key)
    torch.testing.assert_close(model.backbone.conv1.weight, stem_before)
    # What kept its initial values: the deep stem, and layer1's first conv and projection (absent in torchvision's).
    assert "conv3.weight" in report.missing and "layer1.0.downsample.0.weight" in report.missing
    assert "layer1.0.conv1.weight" in report.missing and "layer2.0.conv1.weight" not in report.missing
    text = str(report)
    assert f"loaded {len(report.loaded)} tensors" in text and "torchvision layout" in text and "fc.weight" in text


def test_loading_a_deep_stem_checkpoint_loads_every_tensor(tmp_path):
    source = ResNetBackbone(18, width=8)
    with torch.no_grad():
        for p in source.parameters():
            p.uniform_(-1, 1)
    # As a training script might write it: wrapped, and with DataParallel's and the model's prefixes.
    wrapped = {"state_dict": {f"module.backbone.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}
    path = tmp_path / "deep-stem.pth"
    torch.save(wrapped, path)
    model = build("alignseg_tiny", 5, backbone_width=8)

    report = load_backbone_weights(model, path)

    assert report.skipped == {} and report.missing == []
    assert report.layout == "deep-stem layout"
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[key], value, msg=key)


def test_load_backbone_weights_errors(tmp_path):
    model = build("alignseg_tiny", 5)
    with pytest.raises(FileNotFoundError, match="path must name an existing checkpoint file"):
        load_backbone_weights(model, tmp_path / "absent.pth")
    not_a_state_dict = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_a_state_dict)
    with pytest.raises(ValueError, match="is not a state_dict"):
        load_backbone_weights(model, not_a_state_dict)
    with pytest.raises(TypeError, match="model_or_backbone must be an AlignSeg or a ResNetBackbone"):
        load_backbone_weights(nn.Linear(2, 2), not_a_state_dict)


def test_complexity_of_a_single_convolution_is_the_known_answer():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=True))
    params, macs = complexity(model, (10, 12))
    assert params == 8 * 3 * 9 + 8
    assert macs == 8 * 3 * 9 * 10 * 12


def test_complexity_counts_every_convolution_and_the_alignment_taps():
    # The authors' form calls every convolution as a module (the default form splits the offset
    # heads' 1x1 convs into two F.conv2d calls), so forward hooks give an independent count.
    model = build("alignseg_tiny", 5, upsample_high_first=True)
    size = (64, 96)
    expected = 0

    def conv_macs(module, inputs, output):
        nonlocal expected
        expected += output.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]

    def sampling_macs(module, inputs, output):
        nonlocal expected
        expected += 4 * (2 if isinstance(module, AlignFA) else 1) * output.numel()

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(conv_macs)
        elif type(m).__name__ in ("AlignFA", "AlignCM"):
            m.register_forward_hook(sampling_macs)
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, *size))

    params, macs = complexity(model, size)
    assert params == sum(p.numel() for p in model.parameters())
    assert macs == expected
    # The default form runs the coarse half of each offset head's 1x1 conv at the coarse size.
    _, split_macs = complexity(build("alignseg_tiny", 5), size)
    assert split_macs < macs


def test_complexity_rejects_a_bad_input_size():
    with pytest.raises(ValueError, match=r"input_size must be \(H, W\)"):
        complexity(nn.Conv2d(3, 3, 1), (0, 5))


def test_format_model_summary_lists_the_presets_with_their_counts():
    names = ["alignseg_tiny", "alignseg_r18"]
    text = format_model_summary(names, num_classes=19, input_size=(64, 64), decoder_channels=16)
    lines = text.splitlines()
    assert "at 64x64, 19 classes" in lines[0] and len(lines) == 2 + len(names)
    gmacs = []
    for name, line in zip(names, lines[2:]):
        with torch.device("meta"):
            params = sum(p.numel() for p in build(name, 19, decoder_channels=16).parameters())
        assert line.startswith(name) and f"{params / 1e6:.2f} M" in line
        gmacs.append(float(line.split()[3]))
    _, tiny_macs = complexity(build("alignseg_tiny", 19, decoder_channels=16), (64, 64))
    assert gmacs[0] == round(tiny_macs / 1e9, 2) and gmacs[1] > gmacs[0]
    assert set(names) <= set(list_models())


def timm_resnet_s_state_dict(width: int, layers=(3, 4, 23, 3)) -> dict[str, torch.Tensor]:
    """Random tensors under the key names and shapes of timm's deep-stem ``resnet101s`` (stem ``width``-``width``-
    ``2 width`` as a Sequential ``conv1.0/1/3/4/6`` plus ``bn1``; written out by hand: timm is not a dependency)."""
    state: dict[str, torch.Tensor] = {}

    def conv(key, out_ch, in_ch, k):
        state[f"{key}.weight"] = torch.randn(out_ch, in_ch, k, k)

    def norm(key, ch):
        state[f"{key}.weight"] = torch.rand(ch) + 0.5
        state[f"{key}.bias"] = torch.randn(ch)
        state[f"{key}.running_mean"] = torch.randn(ch)
        state[f"{key}.running_var"] = torch.rand(ch) + 0.5
        state[f"{key}.num_batches_tracked"] = torch.tensor(1000)

    conv("conv1.0", width, 3, 3)
    norm("conv1.1", width)
    conv("conv1.3", width, width, 3)
    norm("conv1.4", width)
    conv("conv1.6", 2 * width, width, 3)
    norm("bn1", 2 * width)
    in_ch = 2 * width
    for stage, blocks in enumerate(layers, start=1):
        planes = width * 2 ** (stage - 1)
        for block in range(blocks):
            prefix = f"layer{stage}.{block}"
            conv(f"{prefix}.conv1", planes, in_ch, 1)
            norm(f"{prefix}.bn1", planes)
            conv(f"{prefix}.conv2", planes, planes, 3)
            norm(f"{prefix}.bn2", planes)
            conv(f"{prefix}.conv3", 4 * planes, planes, 1)
            norm(f"{prefix}.bn3", 4 * planes)
            if block == 0:
                conv(f"{prefix}.downsample.0", 4 * planes, in_ch, 1)
                norm(f"{prefix}.downsample.1", 4 * planes)
            in_ch = 4 * planes
    state["fc.weight"] = torch.randn(1000, in_ch)
    state["fc.bias"] = torch.randn(1000)
    return state


def test_loading_a_timm_resnet101s_state_dict_loads_every_backbone_tensor(tmp_path):
    state = timm_resnet_s_state_dict(width=8)
    path = tmp_path / "resnet101s-timm.pth"
    torch.save(state, path)
    backbone = ResNetBackbone(depth=101, width=8)

    report = load_backbone_weights(backbone, path)

    assert "timm" in report.layout
    assert set(report.loaded) | set(report.skipped) == set(state)  # every key of the file accounted for
    assert set(report.skipped) == {"fc.weight", "fc.bias"} and report.missing == []
    renamed = {
        "conv1.0": "conv1", "conv1.1": "bn1", "conv1.3": "conv2", "conv1.4": "bn2", "conv1.6": "conv3", "bn1": "bn3"
    }
    own = backbone.state_dict()
    for theirs, ours in renamed.items():
        for suffix in ("weight",) + (("bias", "running_mean", "running_var") if "bn" in ours else ()):
            assert torch.equal(own[f"{ours}.{suffix}"], state[f"{theirs}.{suffix}"]), (theirs, suffix)
    assert torch.equal(own["layer3.22.conv2.weight"], state["layer3.22.conv2.weight"])
    assert torch.equal(own["layer2.0.downsample.1.running_var"], state["layer2.0.downsample.1.running_var"])
    assert f"loaded {len(state) - 2} tensors" in str(report) and "ImageNet classifier" in str(report)
