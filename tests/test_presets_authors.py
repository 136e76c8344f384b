"""The `cityscapes` preset follows the authors' released scripts; discrete random scales as theirs."""

import pytest
import torch
from PIL import Image

from alignseg.config import ConfigError, load_config
from alignseg.data import build_train_transform


def test_cityscapes_preset_is_the_released_recipe():
    """Values from speedinghzl/AlignSeg run_local.sh, train.py, dataset/datasets.py, evaluate.py (cited in the YAML)."""
    cfg = load_config("cityscapes")
    assert cfg.data.crop_size == (872, 872) and cfg.data.batch_size == 8
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.01, 0.9, 5e-4)
    assert (cfg.optim.poly_power, cfg.optim.warmup_iters, cfg.train.iterations) == (0.9, 0, 120000)
    assert (cfg.data.scale_range, cfg.data.scale_step, cfg.data.flip, cfg.data.jitter) == ((0.7, 2.1), 0.1, True, 0.0)
    assert (cfg.loss.name, cfg.loss.aux_weight, cfg.train.amp) == ("ce_lovasz", 0.1, "none")
    assert (cfg.eval.mode, cfg.eval.tile, cfg.eval.stride, cfg.eval.scales, cfg.eval.flip) == (
        "slide", (872, 872), (582, 582), (1.0,), False)
    fast = load_config("cityscapes_fast")
    assert (fast.data.crop_size, fast.train.iterations, fast.train.amp, fast.eval.tile) == (
        (769, 769), 40000, "bf16", (769, 769)
    )
    assert fast.loss.name == "ce_lovasz" and fast.data.scale_step == 0.1


def test_scale_step_draws_only_the_listed_scales():
    authors = build_train_transform(40, scale_range=(0.7, 2.1), scale_step=0.1, flip=False, jitter=0)
    assert authors.scales == pytest.approx([0.7 + i / 10 for i in range(15)])
    coarse = build_train_transform(40, scale_range=(1.0, 2.0), scale_step=0.5, flip=False, jitter=0)
    image, label = Image.new("RGB", (10, 10), (90, 90, 90)), Image.new("L", (10, 10), 3)
    torch.manual_seed(0)
    widths = set()
    for _ in range(40):
        _, out = coarse(image, label)
        widths.add(int((out[0] == 3).sum()))  # the scaled image's width along the first row
    assert widths == {10, 15, 20}
    with pytest.raises(ValueError, match="scale_step"):
        build_train_transform(40, scale_step=-0.1)
    with pytest.raises(ConfigError, match="data.scale_step"):
        load_config("cityscapes", ["data.scale_step=fine"])
