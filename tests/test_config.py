"""Configs: presets load, overrides parse and coerce, bad keys and values fail with the key named."""

import pytest

from alignseg.config import Config, ConfigError, apply_overrides, config_from_dict, list_presets, load_config


def test_presets_load_and_hold_the_documented_recipes():
    assert {"synthetic", "cityscapes", "ade20k"} <= set(list_presets())
    city = load_config("cityscapes")
    assert (city.model.name, city.data.crop_size, city.data.batch_size) == ("alignseg_r101", (872, 872), 8)
    assert (city.optim.name, city.optim.lr, city.optim.poly_power, city.optim.weight_decay) == ("sgd", 0.01, 0.9, 5e-4)
    assert (city.train.iterations, city.loss.aux_weight, city.loss.name) == (120000, 0.1, "ce_lovasz")
    ade = load_config("ade20k")
    assert (ade.data.num_classes, ade.data.crop_size, ade.data.batch_size, ade.train.iterations) == (150, (512, 512), 16, 160000)
    demo = load_config()
    assert demo.name == "synthetic" and demo.model.name == "alignseg_tiny" and demo.data.dataset == "synthetic"


def test_overrides_are_parsed_as_yaml_and_coerced_to_the_field_types():
    cfg = load_config(
        "synthetic",
        ["train.iterations=12", "data.crop_size=[64, 96]", "optim.lr=1", "model.pretrained=null", "loss.options={min_kept: 5}"],
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
