"""Palettes, colour PNGs, overlays, the flow colour coding; the API's predict_folder and render_offsets."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from alignseg.api import predict_folder, render_offsets
from alignseg.visualize import (
    ADE20K_PALETTE,
    CITYSCAPES_PALETTE,
    colorize,
    flow_legend,
    flow_to_color,
    generic_palette,
    overlay,
)

pytestmark = pytest.mark.usefixtures("reference_ops")


def test_colorize_uses_official_cityscapes_colours_and_keeps_ids(tmp_path):
    label = np.array([[0, 13, 255], [10, 18, 5]])
    image = colorize(torch.from_numpy(label))
    rgb = np.asarray(image.convert("RGB"))
    assert tuple(rgb[0, 0]) == (128, 64, 128)  # road
    assert tuple(rgb[0, 1]) == (0, 0, 142)  # car
    assert tuple(rgb[0, 2]) == (0, 0, 0)  # ignore
    assert tuple(rgb[1, 0]) == (70, 130, 180)  # sky
    image.save(tmp_path / "label.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "label.png")), label)
    with pytest.raises(ValueError, match="outside the palette's 19 colours.*19"):
        colorize(np.array([[19]]))
    with pytest.raises(ValueError, match="palette must be one of"):
        colorize(label, "pascal")


def test_generic_palettes_are_distinct_and_never_black():
    palette = generic_palette(255)
    assert len({tuple(c) for c in palette}) == 255
    assert not (palette == 0).all(1).any()
    assert len({tuple(c) for c in ADE20K_PALETTE}) == 150 and len(CITYSCAPES_PALETTE) == 19
    np.testing.assert_array_equal(palette[:3], [[128, 0, 0], [0, 128, 0], [128, 128, 0]])


def test_overlay_blends_and_leaves_ignored_pixels():
    photo = np.full((2, 2, 3), 100, np.uint8)
    label = np.array([[0, 255], [1, 0]])
    out = np.asarray(overlay(photo, label, alpha=0.25, palette=[[200, 0, 40], [0, 0, 0]]))
    np.testing.assert_array_equal(out[0, 0], [125, 75, 85])  # 0.75 * 100 + 0.25 * colour
    np.testing.assert_array_equal(out[0, 1], [100, 100, 100])
    np.testing.assert_array_equal(out[1, 0], [75, 75, 75])
    with pytest.raises(ValueError, match="does not match"):
        overlay(photo, np.zeros((3, 2), int))


@pytest.mark.parametrize(
    "dx, dy, max_magnitude, colour",
    [
        (0, 0, 1, (255, 255, 255)),  # no shift: white
        (1, 0, 1, (255, 0, 0)),  # right: red
        (0, 1, 1, (255, 230, 0)),  # down: between wheel entries 13 and 14 (orange-yellow)
        (-1, 0, 1, (0, 209, 255)),  # left: cyan-blue
        (0.5, 0, 1, (255, 128, 128)),  # half length: half-way to white
        (2, 0, 1, (191, 0, 0)),  # longer than the scale: darkened
    ],
)
def test_flow_colours_follow_the_middlebury_wheel(dx, dy, max_magnitude, colour):
    field = np.array([dx, dy], np.float64).reshape(2, 1, 1)
    assert tuple(np.asarray(flow_to_color(field, max_magnitude))[0, 0]) == colour


def test_flow_default_scale_is_the_longest_offset_and_legend_is_a_wheel():
    field = torch.zeros(2, 3, 4)
    field[0, 0, 0] = 3.0  # the longest: full saturation
    field[1, 2, 3] = -1.5
    picture = np.asarray(flow_to_color(field))
    assert (
        picture.shape == (3, 4, 3) and tuple(picture[0, 0]) == (255, 0, 0) and tuple(picture[1, 1]) == (255, 255, 255)
    )
    legend = np.asarray(flow_legend(33))
    assert tuple(legend[16, 16]) == (255, 255, 255) and tuple(legend[16, 32]) == (255, 0, 0)
    with pytest.raises(ValueError, match=r"\[2, H, W\]"):
        flow_to_color(torch.zeros(3, 2, 2))


class RedIsCar(nn.Module):
    """Class 13 (car) where the photo's red channel is high, else class 0 (road)."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 19, *x.shape[-2:])
        logits[:, 13] = x[:, 0] + self.bias
        return logits

    def forward_offsets(self, x):
        n, _, h, w = x.shape
        fa = torch.zeros(n, 4, h // 4, w // 4)
        fa[:, 0] = 2.0  # the coarse map shifted right, the fine map not at all
        cm = torch.zeros(n, 2, 3, 3)
        cm[:, 0] = -1.0  # the context sampled to the left
        return {"decoder.align_fa1": fa, "align_cm": cm}


def test_predict_folder_writes_label_pngs_and_overlays(tmp_path):
    photo = np.zeros((6, 8, 3), np.uint8)
    photo[:, 4:, 0] = 255
    (tmp_path / "in" / "sub").mkdir(parents=True)
    Image.fromarray(photo).save(tmp_path / "in" / "a.png")
    Image.fromarray(photo[:, ::-1]).save(tmp_path / "in" / "sub" / "b.jpg", quality=100)
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    run = predict_folder(RedIsCar(), tmp_path / "in", tmp_path / "out", progress=False)
    assert not run.failed
    assert [p.relative_to(tmp_path / "out").as_posix() for pair in run.written for p in pair] == [
        "a.png", "a_overlay.jpg", "sub/b.png", "sub/b_overlay.jpg"
    ]  # fmt: skip
    expected = np.where(photo[..., 0] > 127, 13, 0)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "a.png")), expected)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "sub" / "b.png")), expected[:, ::-1])
    assert Image.open(tmp_path / "out" / "a_overlay.jpg").size == (8, 6)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        predict_folder(RedIsCar(), tmp_path / "empty", tmp_path / "o2", progress=False)


def test_render_offsets_draws_one_picture_per_module(tmp_path):
    photo = Image.fromarray(np.full((16, 24, 3), 90, np.uint8))
    written = render_offsets(RedIsCar(), photo, tmp_path)
    assert set(written) == {"decoder.align_fa1", "align_cm"}
    fa = np.asarray(Image.open(written["decoder.align_fa1"]))
    assert fa.shape == (16, 2 * 24 + 8, 3)  # coarse | gap | fine, each at the image size
    assert (fa[:, :24] == (255, 0, 0)).all() and (fa[:, 32:] == 255).all()
    cm = np.asarray(Image.open(written["align_cm"]))
    assert cm.shape == (16, 24, 3) and (cm == (0, 209, 255)).all()
    assert (tmp_path / "offsets_legend.png").is_file() and (tmp_path / "input.png").is_file()
    with pytest.raises(TypeError, match="forward_offsets"):
        render_offsets(nn.Conv2d(3, 2, 1), photo, tmp_path)


def test_render_offsets_of_the_real_network(tmp_path):
    from alignseg.models import build

    model = build("alignseg_tiny", 19)
    with torch.no_grad():  # non-zero offsets, so the pictures are not blank
        for name, p in model.named_parameters():
            if "offset" in name and name.endswith("predict.weight"):
                p.normal_(0, 0.1)
    photo = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    written = render_offsets(model, photo, tmp_path, max_magnitude=1.0)
    assert set(written) == {"align_fa1", "align_fa2", "align_fa3", "align_fa4", "align_cm"}
    assert Image.open(written["align_fa1"]).size == (2 * 64 + 8, 64)
    assert Image.open(written["align_cm"]).size == (64, 64)
    assert np.asarray(Image.open(written["align_fa4"])).min() < 200  # coloured, not blank
