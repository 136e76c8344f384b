"""Experiment configuration: dataclasses, YAML presets and ``key.sub=value`` overrides.

A config is built in three layers, each overriding the one before:

1. the dataclass defaults below (the paper's optimisation recipe, Cityscapes classes);
2. a YAML file: a preset shipped in ``alignseg/configs/`` (``synthetic``, ``cityscapes``, ``ade20k``)
   or a path; a YAML file may name a ``preset:`` to start from;
3. command-line overrides such as ``train.iterations=500 data.crop_size=[128,128]`` (values are
   parsed as YAML, so ``null``, ``true``, lists and numbers work).

Unknown keys and values of the wrong type are errors that name the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .data import DatasetName
from .data.convention import IMAGENET_MEAN, IMAGENET_STD, InputConvention
from .data.metainfo import IGNORE_INDEX
from .evaluation.inference import DEFAULT_SCALES, EvalMode

PRESET_DIR = Path(__file__).parent / "configs"
DEFAULT_PRESET = "synthetic"


class ConfigError(ValueError):
    """A config file, preset name or override that cannot be used; the message says why."""


@dataclass
class ModelConfig:
    """The network: a preset of :func:`alignseg.models.build` plus keyword overrides."""

    name: str = "alignseg_r101"
    # Backbone weights (torchvision-layout ResNet state_dict) loaded before training; no download.
    pretrained: str | None = None
    # Weights of the whole network to start training from: an alignseg checkpoint (e.g. one written by
    # `alignseg convert` from the authors' release); the run takes its input convention. Replaces pretrained.
    init: str | None = None
    # Extra keyword arguments for alignseg.models.build (e.g. {upsample_high_first: true}).
    options: dict[str, Any] = field(default_factory=dict)
    # The input convention the weights expect, {channel_order: RGB|BGR, scale, mean: [3], std: [3]}
    # (alignseg.data.InputConvention). null: the checkpoint's (a resumed, evaluated or converted model) or the
    # preset's (a new run: RGB, 1/255, ImageNet mean/std). Set, it must agree with the checkpoint's.
    input: dict[str, Any] | None = None


@dataclass
class DataConfig:
    """Datasets, augmentation and loading. ``batch_size`` is the total over all processes."""

    # synthetic: generated on first use in the Cityscapes layout at `root`, then read by the Cityscapes
    # loader (the built-in demo)
    dataset: DatasetName = "cityscapes"
    # Dataset folder. For the synthetic set, null means the user cache (see default_synthetic_root).
    root: str | None = None
    synthetic_train: int = 160
    synthetic_val: int = 40
    synthetic_size: tuple[int, int] = (128, 256)
    synthetic_seed: int = 0
    num_classes: int = 19
    train_split: str = "train"
    val_split: str = "val"
    crop_size: tuple[int, int] = (769, 769)
    scale_range: tuple[float, float] = (0.5, 2.0)
    scale_step: float = 0.0  # 0: any scale in scale_range; > 0: only low, low + step, ..., high
    flip: bool = True
    jitter: float = 0.25  # photometric jitter strength (0 = off)
    batch_size: int = 8
    workers: int = 4
    # What a training sample whose image or label file cannot be read does: stop (the run stops with
    # the file's name) | skip (a warning naming the file, the next readable sample takes its place).
    # Evaluation always stops: a metric over part of the set is not the set's metric.
    on_corrupt: Literal["stop", "skip"] = "stop"
    # Extra keyword arguments for alignseg.data.build_dataset (folder datasets: image_dir, mask_dir, ...).
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule: poly decay per iteration after an optional linear warmup."""

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)  # adamw only
    weight_decay: float = 5e-4
    poly_power: float = 0.9
    warmup_iters: int = 0
    warmup_start_factor: float = 0.1  # lr multiplier at iteration 0 of the warmup


@dataclass
class LossConfig:
    """Training loss, see :func:`alignseg.losses.build_criterion`."""

    # ce_lovasz: CE + 0.8 Lovasz, the authors' "ohem" setting
    name: Literal["ce", "ohem", "lovasz", "ce_lovasz"] = "ohem"
    aux_weight: float = 0.1
    ignore_index: int = IGNORE_INDEX
    # Extra keyword arguments for build_criterion (e.g. {thresh: 0.7, min_kept: 100000}).
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """The training loop: length, precision, compilation, logging and checkpoints."""

    iterations: int = 40000
    seed: int = 0
    # torch.use_deterministic_algorithms(True, warn_only=True): bit-reproducible on CPU on the same machine. On a
    # GPU the alignment ops' Triton backward then takes its deterministic path (the gathers: slower, see the
    # README); PyTorch ops without a deterministic CUDA kernel (the decoder's bilinear upsample backward) warn.
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when present
    amp: Literal["none", "bf16", "fp16"] = "none"  # fp16 uses a GradScaler
    channels_last: bool = True
    # torch.compile of the model: auto = on for CUDA, off on CPU. Measured on 2 CPU cores (tiny
    # preset, batch 8, 128x128): the first compiled step took 264 s, longer than the whole demo, and
    # later steps were no faster than eager (0.40 vs 0.38 s). on/off force it either way.
    compile: Literal["auto", "on", "off"] = "auto"
    log_every: int = 20
    eval_every: int = 4000  # 0: only at the end
    checkpoint_every: int = 4000  # 0: only at the end
    keep_last: int = 3  # periodic checkpoints kept; best.pt is kept apart
    # Steps with a non-finite loss are skipped; training stops once this many were skipped.
    max_nonfinite_steps: int = 20
    # Run folder; null: runs/<config name>-<date-time>.
    run_dir: str | None = None
    tensorboard: bool = True  # when the tensorboard package is installed
    progress: bool = True  # the tqdm bar


@dataclass
class EvalConfig:
    """Validation: whole image, sliding window, or multi-scale with flip."""

    mode: EvalMode = "whole"
    # Sliding window. slide: null = the training crop (data.crop_size), so the tile follows the data.
    # multiscale: null = each scale run whole; a tile slides it at each scale.
    tile: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None  # null = two thirds of the tile
    scales: tuple[float, ...] = DEFAULT_SCALES
    flip: bool = False  # also average the horizontally flipped image (any mode)
    batch_size: int = 1


@dataclass
class Config:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of builtin types (lists for tuples): YAML- and checkpoint-safe."""
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def list_presets() -> list[str]:
    """Names of the YAML presets shipped with the package."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def default_synthetic_root() -> Path:
    """Where the built-in synthetic dataset is generated: ``$ALIGNSEG_DATA`` or the user cache."""
    if os.environ.get("ALIGNSEG_DATA"):
        folder = Path(os.environ["ALIGNSEG_DATA"]).expanduser()
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"ALIGNSEG_DATA={folder} is a file; it must name a folder to keep datasets in")
        return folder / "synthetic_cityscapes"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return cache / "alignseg" / "synthetic_cityscapes"


def load_config(source: str | os.PathLike | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Build a :class:`Config` from a preset name or YAML path (default: the synthetic demo) and overrides.

    Example:
        >>> cfg = load_config("synthetic", ["train.iterations=10", "data.crop_size=[64,64]"])
        >>> cfg.train.iterations, cfg.data.crop_size
        (10, (64, 64))
    """
    values, name = _read_source(DEFAULT_PRESET if source is None else source, seen=())
    values.setdefault("name", name)
    cfg = config_from_dict(values, origin=str(source or DEFAULT_PRESET))
    return apply_overrides(cfg, overrides)


def config_from_dict(values: dict[str, Any], origin: str = "config") -> Config:
    """A :class:`Config` from a nested dict (e.g. one stored in a checkpoint); unknown keys are errors."""
    cfg = Config()
    _merge_into(cfg, _migrate(values), prefix="", origin=origin)
    validate(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: typing.Sequence[str]) -> Config:
    """Apply ``key.sub=value`` strings to a copy of ``cfg``; values are parsed as YAML."""
    cfg = dataclasses.replace(cfg)  # shallow: the sections are replaced below when touched
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if dataclasses.is_dataclass(value):
            setattr(cfg, section.name, dataclasses.replace(value))
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.sub=value, e.g. train.iterations=500")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({err})") from None
        nested: dict[str, Any] = {}
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        _merge_into(cfg, nested, prefix="", origin=f"override {item!r}")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check ranges (choices are checked as values are set: their ``Literal`` types); raises :class:`ConfigError`."""
    input_override(cfg)
    if cfg.model.init and cfg.model.pretrained:
        raise ConfigError(
            f"model.init={cfg.model.init} gives every weight, model.pretrained={cfg.model.pretrained} the "
            f"backbone's: set one"
        )
    positive = {
        "data.num_classes": cfg.data.num_classes,
        "data.batch_size": cfg.data.batch_size,
        "train.iterations": cfg.train.iterations,
        "train.log_every": cfg.train.log_every,
        "train.keep_last": cfg.train.keep_last,
        "train.max_nonfinite_steps": cfg.train.max_nonfinite_steps,
        "eval.batch_size": cfg.eval.batch_size,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    for key, value in {
        "data.workers": cfg.data.workers,
        "train.eval_every": cfg.train.eval_every,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "optim.warmup_iters": cfg.optim.warmup_iters,
    }.items():
        if value < 0:
            raise ConfigError(f"{key} must be 0 or more, got {value}")
    if cfg.eval.tile is None and cfg.eval.stride is not None:
        raise ConfigError(f"eval.stride={list(cfg.eval.stride)} needs eval.tile (eval.tile=null runs whole images)")
    for key, size in {
        "data.crop_size": cfg.data.crop_size,
        "data.synthetic_size": cfg.data.synthetic_size,
        "eval.tile": cfg.eval.tile or (1, 1),
        "eval.stride": cfg.eval.stride or (1, 1),
    }.items():
        if min(size) < 1:
            raise ConfigError(f"{key} must be two positive sizes [height, width], got {list(size)}")
    _check_numbers(cfg)
    if not 0 < cfg.data.scale_range[0] <= cfg.data.scale_range[1]:
        raise ConfigError(
            f"data.scale_range must be [low, high] with 0 < low <= high, got {list(cfg.data.scale_range)}"
        )
    if not cfg.eval.scales or min(cfg.eval.scales) <= 0:
        raise ConfigError(f"eval.scales must be a non-empty list of positive numbers, got {list(cfg.eval.scales)}")


def _check_numbers(cfg: Config) -> None:
    """Every float setting finite, and in its range: a NaN passes ``x <= 0`` checks, so test ranges positively."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(values):
            continue
        for item in dataclasses.fields(values):
            value = getattr(values, item.name)
            numbers = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                raise ConfigError(f"{section.name}.{item.name} must be a finite number, got {value!r}")
    o = cfg.optim
    ranges = {
        "optim.lr": (o.lr, "a positive number", o.lr > 0),
        "optim.momentum": (o.momentum, "in [0, 1)", 0 <= o.momentum < 1),
        "optim.weight_decay": (o.weight_decay, "0 or more", o.weight_decay >= 0),
        "optim.poly_power": (o.poly_power, "0 or more", o.poly_power >= 0),
        "optim.warmup_start_factor": (o.warmup_start_factor, "in (0, 1]", 0 < o.warmup_start_factor <= 1),
        "optim.betas": (list(o.betas), "two numbers in [0, 1)", all(0 <= b < 1 for b in o.betas)),
        "loss.aux_weight": (cfg.loss.aux_weight, "0 or more", cfg.loss.aux_weight >= 0),
        "data.jitter": (cfg.data.jitter, "0 or more", cfg.data.jitter >= 0),
    }
    for key, (value, expected, ok) in ranges.items():
        if not ok:
            raise ConfigError(f"{key} must be {expected}, got {value}")


def eval_setting(cfg: Config) -> dict[str, Any]:
    """The keyword arguments of :func:`alignseg.evaluation.build_inference_mode` for ``cfg.eval``.

    ``slide`` without a tile slides the training crop (``data.crop_size``): the tile follows the data.
    """
    e = cfg.eval
    tile = e.tile if e.tile is not None or e.mode != "slide" else cfg.data.crop_size
    return {
        "mode": e.mode,
        "tile": tuple(tile) if tile is not None else None,
        "stride": tuple(e.stride) if e.stride is not None else None,
        "scales": tuple(e.scales),
        "flip": e.flip,
    }


def input_override(cfg: Config) -> InputConvention | None:
    """``model.input`` as an :class:`InputConvention` (``None`` when not set); :class:`ConfigError` when invalid."""
    if cfg.model.input is None:
        return None
    try:
        return InputConvention.from_dict(cfg.model.input)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.input: {err}") from None


def describe_keys(cfg: Config | None = None) -> list[str]:
    """One line per override key: ``section.key  type  = value`` (and the choices), for ``alignseg config``."""
    cfg = cfg or Config()
    lines = []
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(values):
            lines.append(f"{section.name}  str  = {values!r}")
            continue
        hints = typing.get_type_hints(type(values))
        for item in dataclasses.fields(values):
            key = f"{section.name}.{item.name}"
            kind = str(hints[item.name]).replace("typing.", "")
            kind = {
                "<class 'int'>": "int", "<class 'float'>": "float", "<class 'str'>": "str", "<class 'bool'>": "bool"
            }.get(kind, kind)
            allowed = choices(hints[item.name])
            choices_text = f"  (one of {', '.join(allowed)})" if allowed else ""
            if allowed:
                kind = "str"
            lines.append(f"{key}  {kind}  = {_plain(getattr(values, item.name))!r}{choices_text}")
    return lines


def choices(hint: Any) -> tuple[Any, ...]:
    """The allowed values of a ``Literal[...]`` annotation (``()`` for any other): what the CLI offers too."""
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


# ----------------------------------------------------------------------------------------------
# internals

# Keys of older configs (checkpoints, YAML files) and what became of them.
_MOVED_KEYS = {"data.mean": "model.input", "data.std": "model.input"}


def _migrate(values: dict[str, Any]) -> dict[str, Any]:
    """A stored config of an older version, in today's keys: ``data.mean``/``data.std`` become ``model.input``
    (left unset when they were the ImageNet defaults, so the checkpoint's own convention decides)."""
    data = values.get("data")
    if not isinstance(data, dict) or not ({"mean", "std"} & set(data)):
        return values
    values = {**values, "data": dict(data)}
    mean = tuple(values["data"].pop("mean", IMAGENET_MEAN))
    std = tuple(values["data"].pop("std", IMAGENET_STD))
    model = dict(values.get("model") or {})
    if (mean, std) != (IMAGENET_MEAN, IMAGENET_STD) and model.get("input") is None:
        model["input"] = {"channel_order": "RGB", "scale": 1 / 255, "mean": list(mean), "std": list(std)}
        values["model"] = model
    return values


def _read_source(source: str | os.PathLike, seen: tuple[Path, ...]) -> tuple[dict[str, Any], str]:
    """The merged dict of a YAML file and the presets it names, and the config's name."""
    text = str(source)
    path = Path(text).expanduser()
    if not (text.endswith((".yaml", ".yml")) or os.sep in text or path.exists()):
        if text not in list_presets():
            raise ConfigError(
                f"unknown config {text!r}: give a YAML file path or one of the presets {list_presets()}"
            )
        path = PRESET_DIR / f"{text}.yaml"
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} names itself as its preset (directly or through others)")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(values).__name__}")
    base = values.pop("preset", None)
    if base is None:
        return values, path.stem
    merged, _ = _read_source(str(base), seen + (path.resolve(),))
    _deep_update(merged, values)
    merged["name"] = values.get("name", path.stem)
    return merged, path.stem


def _deep_update(into: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_update(into[key], value)
        else:
            into[key] = value


def _merge_into(obj: Any, values: dict[str, Any], prefix: str, origin: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{origin}: {prefix.rstrip('.') or 'the config'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        full = prefix + str(key)
        if key not in names and full in _MOVED_KEYS:
            raise ConfigError(
                f"{origin}: {full} is now part of {_MOVED_KEYS[full]}, the model's input convention, e.g. "
                f"model.input={{channel_order: RGB, scale: {1 / 255!r}, mean: {list(IMAGENET_MEAN)}, "
                f"std: {list(IMAGENET_STD)}}}"
            )
        if key not in names:
            known = [prefix + n for n in names]
            close = difflib.get_close_matches(full, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {known}"
            raise ConfigError(f"{origin}: unknown config key {full!r}{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge_into(current, value, full + ".", origin)
        else:
            setattr(obj, key, _coerce(value, hints[key], full, origin))


def _coerce(value: Any, hint: Any, key: str, origin: str) -> Any:
    """Check ``value`` against the annotation ``hint``; converts lists to tuples and ints to floats."""
    origin_type = typing.get_origin(hint)
    args = typing.get_args(hint)

    def fail(expected: str) -> typing.NoReturn:
        raise ConfigError(f"{origin}: {key} must be {expected}, got {value!r}")

    if origin_type in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key, origin)
    if hint is Any:
        return value
    if origin_type is Literal:
        if value not in args:
            fail(f"one of {list(args)}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("a whole number")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    if origin_type is tuple:
        if not isinstance(value, (list, tuple)):
            fail(f"a list, e.g. {key}=[1,2]")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key, origin) for v in value)
        if len(value) != len(args):
            fail(f"a list of {len(args)} values")
        return tuple(_coerce(v, a, key, origin) for v, a in zip(value, args))
    if origin_type is dict:
        if not isinstance(value, dict):
            fail("a mapping, e.g. {name: value}")
        return dict(value)
    raise TypeError(f"config field {key} has an unsupported annotation {hint!r}")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
