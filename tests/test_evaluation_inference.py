"""Inference modes (whole, sliding window, multi-scale, flip) and evaluate() with stand-in models."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from alignseg.evaluation import build_inference_mode, evaluate, infer

pytestmark = pytest.mark.usefixtures("reference_ops")


class PerPixel(nn.Module):
    """A 1x1 convolution: every output pixel depends on its own input pixel only."""

    def __init__(self, classes=4):
        super().__init__()
        self.conv = nn.Conv2d(3, classes, 1)

    def forward(self, x):
        return self.conv(x)


class WindowMean(nn.Module):
    """Output depends on the whole window: class 0 scores the window's mean, class 1 scores 0."""

    def forward(self, x):
        mean = x[:, :1].mean((2, 3), keepdim=True).expand(-1, 1, *x.shape[-2:])
        return torch.cat([mean, torch.zeros_like(mean)], 1)


class LeftRight(nn.Module):
    """Not mirror-symmetric: adds a left-to-right ramp; returns a (logits, aux) tuple at half size."""

    def forward(self, x):
        ramp = torch.linspace(-1, 1, x.shape[-1]).expand_as(x[:, :1])
        logits = torch.cat([x[:, :1] + ramp, x[:, 1:2] - ramp], 1)
        return F.avg_pool2d(logits, 2, ceil_mode=True), None


def _images(n=2, h=23, w=31, seed=0):
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tile, stride", [(8, 5), ((7, 11), (7, 3)), (16, 16), (40, 40)])
def test_slide_equals_whole_for_a_per_pixel_model(tile, stride):
    model, x = PerPixel(), _images()
    whole = infer(model, x, "whole")
    slide = infer(model, x, "slide", tile=tile, stride=stride)
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole.sum(1), torch.ones(2, 23, 31))  # probabilities


def test_slide_averages_overlapping_windows():
    x = _images(1, 10, 13)
    tile, stride = (6, 6), (4, 5)
    # Windows by the documented rule: every stride, the last one flush with the border.
    tops, lefts = [0, 4], [0, 5, 7]
    total, count = np.zeros((10, 13)), np.zeros((10, 13))
    for top in tops:
        for left in lefts:
            total[top : top + 6, left : left + 6] += x[0, 0, top : top + 6, left : left + 6].mean().item()
            count[top : top + 6, left : left + 6] += 1
    score = total / count
    expected = 1 / (1 + np.exp(-score))  # softmax of (score, 0), class 0
    prob = infer(WindowMean(), x, "slide", tile=tile, stride=stride)
    np.testing.assert_allclose(prob[0, 0].numpy(), expected, rtol=1e-5)


def test_slide_pads_images_smaller_than_the_tile():
    x = _images(1, 5, 6)
    prob = infer(WindowMean(), x, "slide", tile=(8, 9))
    padded_mean = x[0, 0].sum() / (8 * 9)  # the padding is 0 (the mean colour after normalising)
    torch.testing.assert_close(prob[0, 0], torch.sigmoid(padded_mean).expand(5, 6))


def test_flip_and_multiscale_average_probabilities():
    model, x = LeftRight(), _images(1, 12, 16)

    def plain(img):
        logits = model(img)[0]
        return F.interpolate(logits, size=img.shape[-2:], mode="bilinear", align_corners=True)

    def at_scale(s):
        img = F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=True) if s != 1 else x
        logits = [plain(img), plain(img.flip(-1)).flip(-1)]
        return [F.interpolate(z, size=(12, 16), mode="bilinear", align_corners=True).softmax(1) for z in logits]

    torch.testing.assert_close(infer(model, x, "whole", flip=True), sum(at_scale(1.0)) / 2)
    expected = sum(at_scale(0.5) + at_scale(1.0)) / 4
    torch.testing.assert_close(infer(model, x, "multiscale", scales=(0.5, 1.0), flip=True), expected)
    assert not torch.allclose(infer(model, x, "whole"), infer(model, x, "whole", flip=True))


def test_mode_descriptions_and_checks():
    assert str(build_inference_mode("whole", tile=8, scales=(1, 2), flip=True)) == "whole+flip"
    assert str(build_inference_mode("slide", tile=(8, 12))) == "slide(tile 8x12, stride 6x8)"
    assert str(build_inference_mode("multiscale", scales=(0.5, 1))) == "multiscale(scales 0.5,1; whole)"
    assert str(build_inference_mode("multiscale", scales=(1,), tile=4, stride=2, flip=True)) == (
        "multiscale(scales 1; tile 4x4, stride 2x2)+flip"
    )
    with pytest.raises(ValueError, match="mode must be one of"):
        build_inference_mode("sliding")
    with pytest.raises(ValueError, match="needs tile"):
        build_inference_mode("slide")
    with pytest.raises(ValueError, match="must not exceed tile"):
        build_inference_mode("slide", tile=4, stride=5)
    with pytest.raises(ValueError, match="scales"):
        build_inference_mode("multiscale", scales=(0.5, -1))
    with pytest.raises(ValueError, match=r"images must be Tensor\[N, 3, H, W\]"):
        infer(PerPixel(), torch.zeros(1, 1, 4, 4))


class CodedLabels(Dataset):
    """Images whose channel 0 encodes the label (value / 10), so an oracle model can read it back."""

    class_names = ("a", "b", "c", "d")

    def __init__(self, n=5):
        g = torch.Generator().manual_seed(1)
        self.labels = [torch.randint(0, 3, (9, 14), generator=g) for _ in range(n)]  # class "d" never occurs
        for label in self.labels:
            label[0, :3] = 255

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = torch.zeros(3, 9, 14)
        image[0] = self.labels[i].clamp(max=3).float() / 10
        return image, self.labels[i]


class Oracle(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(50.0))

    def forward(self, x):
        label = (x[:, 0] * 10).round().long().clamp(0, 3)
        return F.one_hot(label, 4).permute(0, 3, 1, 2).float() * self.scale


class Constant(nn.Module):
    def forward(self, x):
        logits = torch.zeros(x.shape[0], 4, *x.shape[-2:])
        logits[:, 1] = 1
        return logits


def test_evaluate_oracle_scores_one_and_restores_training_mode():
    model, loader = Oracle().train(), DataLoader(Subset(CodedLabels(), [0, 2, 3, 4]), batch_size=2)
    result = evaluate(model, loader, 4, mode="slide", tile=(5, 8), progress=False)
    assert model.training
    assert result.miou == 1.0 and result.pixel_accuracy == 1.0 and result.num_present == 3
    assert result.mode == "slide(tile 5x8, stride 4x6)"
    table = result.format_table()  # class names found through the Subset
    assert "[mode: slide(tile 5x8, stride 4x6)]" in table.splitlines()[0]
    assert [line.split()[0] for line in table.splitlines()[3:7]] == ["a", "b", "c", "d"]


def test_evaluate_constant_prediction_known_answer():
    dataset = CodedLabels()
    labels = torch.stack(dataset.labels)
    valid = labels != 255
    counts = [int(((labels == c) & valid).sum()) for c in range(3)]
    result = evaluate(
        Constant(), DataLoader(dataset, batch_size=1), 4, mode="multiscale", scales=(1.0, 0.5), progress=False
    )
    # Predicting class 1 everywhere: IoU_1 = |gt 1| / |valid|, classes 0 and 2 get 0, class 3 is absent.
    assert result.iou[1] == pytest.approx(counts[1] / sum(counts))
    assert result.iou[0] == 0 and result.iou[2] == 0 and not result.present[3]
    assert result.miou == pytest.approx(counts[1] / sum(counts) / 3)
    assert result["mode"] == "multiscale(scales 1,0.5; whole)"


def test_evaluate_checks_the_class_count():
    with pytest.raises(ValueError, match="predicts 4 classes but num_classes=5"):
        evaluate(Constant(), DataLoader(CodedLabels(2)), 5, progress=False)


def test_evaluate_runs_the_real_network_on_synthetic_data(tmp_path):
    from alignseg.data import build_dataset
    from alignseg.models import build

    dataset = build_dataset("synthetic", tmp_path, "val", num_train=1, num_val=2, size=(32, 64), progress=False)
    model = build("alignseg_tiny", dataset.num_classes)
    result = evaluate(
        model, DataLoader(dataset, batch_size=2), dataset.num_classes, mode="whole", flip=True, progress=False
    )
    assert 0 <= result.miou <= 1 and result.num_pixels == sum(int((dataset[i][1] != 255).sum()) for i in range(2))
