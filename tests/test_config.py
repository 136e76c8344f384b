"""Configs: presets load, overrides parse and coerce, bad keys and values fail with the key named."""

import numpy as np
import pytest

from alignseg.config import Config, ConfigError, apply_overrides, config_from_dict, list_presets, load_config


def test_presets_load_and_hold_the_documented_recipes():
    assert {"synthetic", "cityscapes", "ade20k"} <= set(list_presets())
    city = load_config("cityscapes")
    assert (city.model.name, city.data.crop_size, city.data.batch_size) == ("alignseg_r101", (872, 872), 8)
    assert (city.optim.name, city.optim.lr, city.optim.poly_power, city.optim.weight_decay) == ("sgd", 0.01, 0.9, 5e-4)
    assert (city.train.iterations, city.loss.aux_weight, city.loss.name) == (120000, 0.1, "ce_lovasz")
    ade = load_config("ade20k")
    assert (ade.data.num_classes, ade.data.crop_size, ade.data.batch_size, ade.train.iterations) == (
        150, (512, 512), 16, 160000
    )
    demo = load_config()
    assert demo.name == "synthetic" and demo.model.name == "alignseg_tiny" and demo.data.dataset == "synthetic"


def test_overrides_are_parsed_as_yaml_and_coerced_to_the_field_types():
    cfg = load_config(
        "synthetic",
        [
            "train.iterations=12",
            "data.crop_size=[64, 96]",
            "optim.lr=1",
            "model.pretrained=null",
            "loss.options={min_kept: 5}",
        ],
    )
    assert cfg.train.iterations == 12
    assert cfg.data.crop_size == (64, 96)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.model.pretrained is None
    assert cfg.loss.options == {"min_kept": 5}
    # the preset itself is not modified by overriding a copy
    assert load_config("synthetic").train.iterations != 12


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.iters=3", "did you mean 'train.iterations'"),
        ("train.iterations=ten", "train.iterations must be a whole number"),
        ("train.iterations=0", "train.iterations must be at least 1"),
        ("train.amp=fp8", "train.amp must be one of"),
        ("data.crop_size=[64]", "data.crop_size must be a list of 2 values"),
        ("data.flip=maybe", "data.flip must be true or false"),
        ("iterations", "must look like key.sub=value"),
        ("data.scale_range=[2, 1]", "data.scale_range must be [low, high]"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config("synthetic", [override])


def test_yaml_file_can_start_from_a_preset_and_round_trips(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("preset: cityscapes\ntrain:\n  iterations: 120000\ndata:\n  root: /data/cs\n")
    cfg = load_config(path)
    assert cfg.name == "mine" and cfg.train.iterations == 120000 and cfg.data.root == "/data/cs"
    assert cfg.model.name == "alignseg_r101"  # from the preset
    again = config_from_dict(cfg.to_dict())
    assert again == cfg


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown config 'nope'"):
        load_config("nope")
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml is not valid YAML"):
        load_config(broken)
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        config_from_dict({"trian": {}})


def test_apply_overrides_leaves_the_input_untouched():
    cfg = Config()
    apply_overrides(cfg, ["train.iterations=5"])
    assert cfg.train.iterations == Config().train.iterations


def test_choices_and_defaults_have_one_home():
    import typing

    from alignseg.api import OUTPUT_FORMATS
    from alignseg.cli import _build_parser
    from alignseg.config import Config, choices, describe_keys
    from alignseg.data import DATASETS
    from alignseg.evaluation import DEFAULT_SCALES, MODES, build_inference_mode

    cfg = Config()
    assert cfg.eval.scales == DEFAULT_SCALES == build_inference_mode("multiscale").scales
    hints = typing.get_type_hints(type(cfg.eval))
    assert choices(hints["mode"]) == MODES and choices(typing.get_type_hints(type(cfg.data))["dataset"]) == DATASETS
    lines = describe_keys(cfg)
    assert "eval.mode  str  = 'whole'  (one of whole, slide, multiscale)" in lines
    assert any(line.startswith("train.amp  str  = 'none'  (one of none, bf16, fp16)") for line in lines)
    for key, bad in (("eval.mode", "sliding"), ("train.amp", "fp8"), ("loss.name", "dice"), ("data.dataset", "voc")):
        with pytest.raises(ConfigError, match=f"{key} must be one of .*got '{bad}'"):
            load_config(None, [f"{key}={bad}"])

    commands = {action.dest: action for action in _build_parser()._subparsers._group_actions}["command"].choices
    for name in ("eval", "predict"):
        mode = next(a for a in commands[name]._actions if a.dest == "mode")
        assert tuple(mode.choices) == MODES
    predict = commands["predict"]
    assert tuple(next(a for a in predict._actions if a.dest == "format").choices) == OUTPUT_FORMATS
    assert "<name>.png" in predict.description and "_label.png" not in predict.format_help()


def test_dataset_facts_come_from_metainfo():
    from alignseg.api import _dataset_for
    from alignseg.data.metainfo import CITYSCAPES_PALETTE, generic_palette

    assert _dataset_for("synthetic", 19).palette is not None
    np.testing.assert_array_equal(_dataset_for("synthetic", 19).palette, CITYSCAPES_PALETTE)
    assert _dataset_for("ade20k", 150).name == "ade20k"
    folder = _dataset_for("folder", 5)
    assert folder.name == "folder" and len(folder.classes) == 5
    np.testing.assert_array_equal(folder.palette, generic_palette(5))
