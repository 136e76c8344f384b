"""The decoder blocks: zero-initialised offsets, the two AlignFA forms, AlignCM, the backbone layout."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alignseg.models import AlignCM, AlignFA, ResNetBackbone
from alignseg.models.modules import activation_layer

pytestmark = pytest.mark.usefixtures("reference_ops")

ACT = activation_layer("leaky_relu")


def upsample(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def shifted(src, d, size):
    """Independent oracle: sample ``src`` at output pixel (j + dx, i + dy) with grid_sample (align_corners=True)."""
    h, w = size
    rows = torch.arange(h, dtype=src.dtype).view(1, h, 1)
    cols = torch.arange(w, dtype=src.dtype).view(1, 1, w)
    gx = (cols + d[:, 0]) * 2 / (w - 1) - 1
    gy = (rows + d[:, 1]) * 2 / (h - 1) - 1
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def randomise_offset_predictors(module, std=0.5):
    for name, p in module.named_parameters():
        if name.endswith("predict.weight"):
            with torch.no_grad():
                p.normal_(0, std)


FA_FORMS = [dict(form="exact"), dict(form="one_step"), dict(upsample_high_first=True)]


@pytest.mark.parametrize("kwargs", FA_FORMS, ids=["exact", "one_step", "upsample_high_first"])
def test_align_fa_at_construction_is_bilinear_upsample_plus_sum(kwargs):
    module = AlignFA(8, nn.BatchNorm2d, ACT, **kwargs)
    low, high = torch.randn(2, 8, 13, 17), torch.randn(2, 8, 5, 7)
    out, offsets = module(low, high, return_offsets=True)
    assert offsets.shape == (2, 4, 13, 17)
    assert torch.count_nonzero(offsets) == 0
    torch.testing.assert_close(out, upsample(high, (13, 17)) + low)


def test_align_cm_at_construction_is_upsampled_context_plus_local():
    module = AlignCM(16, 8, nn.BatchNorm2d, ACT, pool_size=3).eval()
    x = torch.randn(2, 16, 7, 9)
    out, offsets = module(x, return_offsets=True)
    assert offsets.shape == (2, 2, 7, 9)
    assert torch.count_nonzero(offsets) == 0
    context = module.context(F.adaptive_avg_pool2d(x, 3))
    torch.testing.assert_close(out, upsample(context, (7, 9)) + module.local(x))


def test_align_fa_forms_with_the_same_weights():
    exact = AlignFA(8, nn.BatchNorm2d, ACT, hidden=6)
    one_step = AlignFA(8, nn.BatchNorm2d, ACT, hidden=6, form="one_step")
    literal = AlignFA(8, nn.BatchNorm2d, ACT, hidden=6, upsample_high_first=True)
    assert exact.form == "exact" and not exact.upsample_high_first  # the default: fused, split offset heads
    randomise_offset_predictors(exact)
    for p in exact.parameters():  # non-trivial norm parameters too
        if p.dim() == 1:
            with torch.no_grad():
                p.uniform_(0.5, 1.5)
    one_step.load_state_dict(exact.state_dict())  # one checkpoint serves every form
    literal.load_state_dict(exact.state_dict())
    low, high = torch.randn(2, 8, 13, 17), torch.randn(2, 8, 5, 7)

    out_exact, off_exact = exact(low, high, return_offsets=True)
    out_one_step, off_one_step = one_step(low, high, return_offsets=True)
    out_literal, off_literal = literal(low, high, return_offsets=True)
    assert off_exact.abs().mean() > 0.05  # the test is about non-zero offsets
    torch.testing.assert_close(off_exact, off_literal, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(off_exact, off_one_step)

    # The exact (default) form and the literal authors' code warp the upsampled map; the variant warps
    # the coarse map directly, which is a different function.
    d = off_exact.detach()
    authors = shifted(upsample(high, (13, 17)), d[:, 0:2], (13, 17)) + shifted(low, d[:, 2:4], (13, 17))
    torch.testing.assert_close(out_exact, authors, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_literal, authors, atol=1e-5, rtol=1e-5)
    one_step_expected = shifted(high, d[:, 0:2], (13, 17)) + shifted(low, d[:, 2:4], (13, 17))
    torch.testing.assert_close(out_one_step, one_step_expected, atol=1e-5, rtol=1e-5)
    assert (out_one_step - authors).abs().max() > 1e-2


def test_align_fa_form_errors():
    with pytest.raises(ValueError, match="form must be one of"):
        AlignFA(8, nn.BatchNorm2d, ACT, form="authors")
    with pytest.raises(ValueError, match="cannot use form='one_step'"):
        AlignFA(8, nn.BatchNorm2d, ACT, form="one_step", upsample_high_first=True)


def test_align_cm_split_and_concat_offset_heads_agree():
    split = AlignCM(16, 8, nn.BatchNorm2d, ACT, concat=False)
    concat = AlignCM(16, 8, nn.BatchNorm2d, ACT, concat=True)
    randomise_offset_predictors(split)
    concat.load_state_dict(split.state_dict())
    x = torch.randn(2, 16, 7, 9)
    out_split, off_split = split(x, return_offsets=True)
    out_concat, off_concat = concat(x, return_offsets=True)
    assert off_split.abs().mean() > 0.05
    torch.testing.assert_close(off_split, off_concat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_split, out_concat, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pool_size", [1, 2, 5])
def test_align_cm_samples_the_pooled_context_at_learned_positions(pool_size):
    module = AlignCM(16, 8, nn.BatchNorm2d, ACT, pool_size=pool_size).eval()
    randomise_offset_predictors(module)
    x = torch.randn(2, 16, 7, 9)
    out, offsets = module(x, return_offsets=True)
    context = module.context(F.adaptive_avg_pool2d(x, pool_size))
    assert context.shape[-2:] == (pool_size, pool_size)
    expected = shifted(context, offsets.detach(), (7, 9)) + module.local(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_align_cm_rejects_a_bad_pool_size():
    with pytest.raises(ValueError, match="pool_size must be a positive int"):
        AlignCM(16, 8, nn.BatchNorm2d, ACT, pool_size=0)


# Published parameter counts of torchvision's ResNets (ImageNet classifier included).
TORCHVISION_PARAMS = {18: 11_689_512, 50: 25_557_032, 101: 44_549_160}


@pytest.mark.parametrize("depth", [18, 50, 101])
def test_backbone_is_torchvision_resnet_with_the_deep_stem(depth):
    with torch.device("meta"):
        backbone = ResNetBackbone(depth)
    expansion = 1 if depth < 50 else 4
    fc = 512 * expansion * 1000 + 1000
    stem_7x7 = 64 * 3 * 7 * 7 + 2 * 64
    deep_stem = 64 * 3 * 9 + 64 * 64 * 9 + 128 * 64 * 9 + 2 * (64 + 64 + 128)
    # The deep stem ends at 128 channels: layer1's first block reads 64 more channels, and ResNet-18's
    # first block needs a 1x1 projection (with its norm) that torchvision's does not have.
    if depth < 50:
        layer1_extra = 64 * 64 * 9 + (128 * 64 + 2 * 64)
    else:
        layer1_extra = 64 * 64 + 64 * 256
    expected = TORCHVISION_PARAMS[depth] - fc - stem_7x7 + deep_stem + layer1_extra
    assert sum(p.numel() for p in backbone.parameters()) == expected
    assert backbone.stage_channels == tuple(c * expansion for c in (64, 128, 256, 512))


def test_backbone_stage_sizes_at_an_odd_input():
    backbone = ResNetBackbone(18, width=8).eval()
    with torch.no_grad():
        stages = backbone(torch.randn(1, 3, 97, 131))
    # 97 -> 49 (stem conv, stride 2) -> 25 (max-pool, ceil mode) -> 13 -> 7 -> 4; 131 -> 66 -> 34 -> 17 -> 9 -> 5
    assert [tuple(s.shape[1:]) for s in stages] == [(8, 25, 34), (16, 13, 17), (32, 7, 9), (64, 4, 5)]


def test_backbone_rejects_an_unknown_depth():
    with pytest.raises(ValueError, match="depth must be one of"):
        ResNetBackbone(42)


@pytest.mark.parametrize("upsample_high_first", [False, True])
def test_align_fa_runs_under_autocast_whose_upsample_returns_fp32(monkeypatch, upsample_high_first):
    # CUDA autocast runs upsample_bilinear2d in fp32 (CPU autocast does not): emulate it on the CPU, so
    # with upsample_high_first the upsampled high reaches the op as fp32 beside a bf16 low.
    import alignseg.models.modules as modules

    real_upsample = modules.upsample
    monkeypatch.setattr(modules, "upsample", lambda x, size: real_upsample(x.float(), size))
    module = AlignFA(8, nn.BatchNorm2d, ACT, upsample_high_first=upsample_high_first)
    randomise_offset_predictors(module)
    low, high = torch.randn(2, 8, 9, 11), torch.randn(2, 8, 5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(low.bfloat16(), high.bfloat16())
    assert out.dtype == torch.bfloat16 and out.shape == low.shape
    with torch.no_grad():
        expected = module(low, high)  # fp32, no autocast
    torch.testing.assert_close(out.float(), expected, atol=0.15, rtol=0.05)


class ToFloat32(nn.Module):
    def forward(self, x):
        return x.float()


def test_align_cm_runs_when_the_context_reaches_it_in_fp32_under_autocast():
    module = AlignCM(8, 8, nn.BatchNorm2d, ACT, pool_size=3).eval()
    module.context = nn.Sequential(module.context, ToFloat32())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(torch.randn(2, 8, 7, 9))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 8, 7, 9)
