"""The AlignSeg network: output shapes per preset, gradients, offsets, registry, input checks."""

import pytest
import torch
from torch import nn

from alignseg.models import OFFSET_NAMES, AlignSeg, build, convert_sync_batchnorm, list_models

pytestmark = pytest.mark.usefixtures("reference_ops")

NUM_CLASSES = 5
# An odd image size shared by most tests (one set of convolution shapes to set up); at stride 4
# (stem conv of stride 2, then max-pool with padding 1 and ceil mode) it is 12x16, at stride 32 2x2.
SIZE = (45, 61)


def assert_close_to_scale(actual, expected, rel=1e-4):
    """Whole-network comparisons: fp32 rounding grows with depth, so bound the error by the output scale."""
    error = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= rel * scale, f"max abs error {error:.3g} exceeds {rel:g} x output scale {scale:.3g}"


def randomise_offset_predictors(model, std=0.01):
    for name, p in model.named_parameters():
        if name.endswith("predict.weight"):
            with torch.no_grad():
                p.normal_(0, std)


def test_list_models_names_the_presets():
    assert list_models() == ["alignseg_r101", "alignseg_r18", "alignseg_r50", "alignseg_tiny"]


@pytest.mark.parametrize("size", [(97, 131), (33, 50)])
def test_tiny_preset_output_shapes(size):
    model = build("alignseg_tiny", NUM_CLASSES)
    images = torch.randn(2, 3, *size)
    stride4 = tuple((s + 1) // 2 // 2 + 1 for s in size)  # stem conv (stride 2), then max-pool (padding 1, ceil mode)
    main, aux = model(images)
    assert main.shape == aux.shape == (2, NUM_CLASSES, *stride4)
    model.eval()
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (2, NUM_CLASSES, *size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["alignseg_r101", "alignseg_r50", "alignseg_r18"])
def test_large_preset_output_shapes_on_the_meta_device(name):
    with torch.device("meta"):
        model = build(name, NUM_CLASSES)
        images = torch.empty(2, 3, 97, 131)
        main, aux = model(images)
        assert main.shape == aux.shape == (2, NUM_CLASSES, 25, 34)
        model.eval()
        assert model(images).shape == (2, NUM_CLASSES, 97, 131)
    assert model.backbone.depth == int(name.removeprefix("alignseg_r"))
    assert model.lateral1.unify.out_channels == 256


def test_eval_output_at_stride_4_when_asked():
    model = build("alignseg_tiny", NUM_CLASSES, upsample_eval_output=False).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, *SIZE)).shape == (2, NUM_CLASSES, 12, 16)


def test_eval_logits_are_the_upsampled_stride_4_logits():
    upsampled = build("alignseg_tiny", NUM_CLASSES).eval()
    raw = build("alignseg_tiny", NUM_CLASSES, upsample_eval_output=False).eval()
    raw.load_state_dict(upsampled.state_dict())
    images = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        expected = nn.functional.interpolate(raw(images), size=SIZE, mode="bilinear", align_corners=True)
        torch.testing.assert_close(upsampled(images), expected)


def test_gradients_reach_every_parameter():
    model = build("alignseg_tiny", NUM_CLASSES)
    # Offsets away from zero, so that the offset heads' first layers receive gradient as well.
    randomise_offset_predictors(model)
    images = torch.randn(2, 3, *SIZE)
    main, aux = model(images)
    (main.square().mean() + aux.square().mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_forward_offsets_names_and_shapes():
    model = build("alignseg_tiny", NUM_CLASSES).eval()
    images = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        offsets = model.forward_offsets(images)
        assert list(offsets) == list(OFFSET_NAMES)
        for name in OFFSET_NAMES[:4]:
            assert offsets[name].shape == (2, 4, 12, 16)
        assert offsets["align_cm"].shape == (2, 2, 2, 2)
        # Zero-initialised offset convolutions predict zero offsets at construction.
        assert all(torch.count_nonzero(o) == 0 for o in offsets.values())

        randomise_offset_predictors(model)
        offsets = model.forward_offsets(images)
        assert all(o.abs().mean() > 0 for o in offsets.values())
        # The offsets are those the forward pass uses: the module's own output with return_offsets.
        c1, c2, _, _ = model.backbone(images)
        _, first = model.align_fa1(model.lateral1(c1), model.lateral2(c2), return_offsets=True)
        torch.testing.assert_close(offsets["align_fa1"], first)


def test_the_default_network_is_the_authors_code_with_the_same_weights():
    """Default (fused exact AlignFA, split offset heads) = the authors' code run literally
    (upsample_high_first=True: upsample, concatenate, warp at full size), at non-zero offsets;
    the one-step variant loads the same checkpoint and differs."""
    default = build("alignseg_tiny", NUM_CLASSES)
    authors = build("alignseg_tiny", NUM_CLASSES, upsample_high_first=True)
    one_step = build("alignseg_tiny", NUM_CLASSES, align_fa_form="one_step")
    randomise_offset_predictors(default, std=0.5)
    authors.load_state_dict(default.state_dict())  # strict: the same keys and shapes
    one_step.load_state_dict(default.state_dict())
    default.eval(), authors.eval(), one_step.eval()
    images = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        assert all(o.abs().mean() > 0.3 for o in default.forward_offsets(images).values())
        expected = authors(images)
        assert_close_to_scale(default(images), expected)
        assert (one_step(images) - expected).abs().max() > 1e-3 * expected.abs().max()


def test_align_fa_form_is_checked():
    with pytest.raises(ValueError, match="align_fa_form must be one of"):
        build("alignseg_tiny", NUM_CLASSES, align_fa_form="fused")
    with pytest.raises(ValueError, match="cannot be combined with align_fa_form='one_step'"):
        build("alignseg_tiny", NUM_CLASSES, upsample_high_first=True, align_fa_form="one_step")


def test_channels_last_gives_the_same_output():
    model = build("alignseg_tiny", NUM_CLASSES).eval()
    randomise_offset_predictors(model)
    images = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        expected = model(images)
        model = model.to(memory_format=torch.channels_last)
        out = model(images.contiguous(memory_format=torch.channels_last))
    assert_close_to_scale(out, expected)


def test_convert_sync_batchnorm_replaces_every_batchnorm():
    model = build("alignseg_tiny", NUM_CLASSES)
    count = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model = convert_sync_batchnorm(model)
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) == count
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())


def test_build_overrides_and_config():
    model = build("alignseg_tiny", 3, decoder_channels=16, context_pool_size=2, act="relu")
    assert model.head[-1].out_channels == 3
    assert model.refine4.unify.out_channels == 16
    assert model.align_cm.pool_size == 2
    assert isinstance(model.refine1.act, nn.ReLU)
    assert model.config["decoder_channels"] == 16


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: build("alignseg_r1000", 5), ValueError, "model name must be one of"),
        (lambda: build("alignseg_tiny", 5, decoder_width=8), TypeError, r"unknown override\(s\) \['decoder_width'\]"),
        (lambda: build("alignseg_tiny", 0), ValueError, "num_classes must be a positive int"),
        (lambda: build("alignseg_tiny", 5, act="gelu"), ValueError, "act must be one of"),
        (lambda: build("alignseg_tiny", 5, dropout=1.5), ValueError, "dropout must be in"),
    ],
)
def test_build_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize(
    "images, error, message",
    [
        (torch.randn(3, 32, 32), ValueError, r"images must have shape \[N, 3, H, W\], got \[3, 32, 32\]"),
        (torch.randn(1, 4, 32, 32), ValueError, r"images must have shape \[N, 3, H, W\]"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, "images must be a floating-point tensor"),
        ([[1.0]], TypeError, "images must be a torch.Tensor"),
    ],
)
def test_bad_images_are_rejected(images, error, message):
    model = AlignSeg(NUM_CLASSES, depth=18, backbone_width=8, decoder_channels=8)
    with pytest.raises(error, match=message):
        model(images)
    with pytest.raises(error, match=message):
        model.forward_offsets(images)
