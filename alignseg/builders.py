"""Factories shared by the trainer, the API and the CLI: a config's model, datasets, input convention and evaluation.

The layers: ``cli -> api -> builders -> models / data / evaluation``, with ``training`` beside ``api`` (both use
this module; nothing here imports from either).

The input convention of a model (:class:`~alignseg.data.InputConvention`: channel order, scale, mean, std) is
part of its record: every checkpoint stores it (``"input"``), and :func:`resolve_input_convention` picks it:
the checkpoint's; for an older checkpoint without one, today's (RGB, 1/255, ImageNet mean/std), said in the log;
for a new model, its preset's. ``model.input`` in the config overrides only where there is nothing to disagree
with: set on a model whose checkpoint records another convention, it is an error that names both.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from . import data as data_lib
from . import evaluation, models
from .checkpoint import CheckpointError, load_model_state
from .config import Config, ConfigError, default_synthetic_root, eval_setting, input_override
from .data.convention import IMAGENET_CONVENTION, InputConvention
from .distributed import DistributedContext, barrier, shard_indices

log = logging.getLogger(__name__)


def dataset_root(cfg: Config) -> Path:
    """``data.root``; for the synthetic set without one, the cache folder it is generated in."""
    if cfg.data.root is not None:
        return Path(cfg.data.root).expanduser()
    if cfg.data.dataset == "synthetic":
        return default_synthetic_root()
    name = cfg.data.dataset
    raise ConfigError(f"data.root is not set: give the {name} folder, e.g. data.root=/data/{name}")


def same_convention(a: InputConvention, b: InputConvention) -> bool:
    """Equal up to float rounding (``1/255`` typed as ``0.00392156862745098`` in a YAML file is the same)."""
    close = lambda x, y: math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9)  # noqa: E731
    return (
        a.channel_order == b.channel_order
        and close(a.scale, b.scale)
        and all(map(close, a.mean + a.std, b.mean + b.std))
    )


def resolve_input_convention(cfg: Config, state: dict[str, Any] | None = None) -> InputConvention:
    """The input convention of the model of ``cfg``, optionally with weights from checkpoint ``state``.

    ``state`` (from :func:`alignseg.checkpoint.load_checkpoint`): its ``"input"`` entry; none there (an older
    file): ``model.input`` or today's convention, logged. No ``state``: ``model.input`` or the preset's.
    ``model.input`` disagreeing with the checkpoint's convention is a :class:`ConfigError` naming both.
    """
    override = input_override(cfg)
    if state is None:
        return override or models.get_preset(cfg.model.name).input
    source = state.get("path", "the checkpoint")
    stored = state.get("input")
    if stored is None:
        convention = override or IMAGENET_CONVENTION
        log.info("checkpoint %s records no input convention (an older file): using %s", source, convention)
        return convention
    try:
        convention = InputConvention.from_dict(stored)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {source}: its input convention is unreadable: {err}") from None
    if override is not None and not same_convention(override, convention):
        raise ConfigError(
            f"model.input ({override}) disagrees with the input convention of checkpoint {source} ({convention}); "
            f"the weights expect the checkpoint's: remove the model.input override"
        )
    return convention


def build_datasets(
    cfg: Config,
    ctx: DistributedContext | None = None,
    splits: tuple[str, ...] = ("train", "val"),
    convention: InputConvention | None = None,
) -> dict[str, Dataset]:
    """The training (augmented) and validation datasets of ``cfg``, normalised with ``convention``
    (default: :func:`resolve_input_convention` of a new model); rank 0 generates the synthetic set."""
    ctx = ctx or DistributedContext()
    convention = convention or resolve_input_convention(cfg)
    root = dataset_root(cfg)
    name, options = cfg.data.dataset, dict(cfg.data.options)
    if name == "synthetic":
        if ctx.is_main:
            data_lib.make_synthetic_cityscapes(
                root,
                num_train=cfg.data.synthetic_train,
                num_val=cfg.data.synthetic_val,
                size=tuple(cfg.data.synthetic_size),
                seed=cfg.data.synthetic_seed,
            )
        barrier()
        name = "cityscapes"
    if name == "folder":
        options.setdefault("num_classes", cfg.data.num_classes)
    d = cfg.data
    transforms = {
        "train": data_lib.build_train_transform(
            tuple(d.crop_size), tuple(d.scale_range), convention, d.flip, d.jitter, scale_step=d.scale_step
        ),
        "val": data_lib.build_eval_transform(convention),
    }
    split_names = {"train": d.train_split, "val": d.val_split}
    out = {}
    for split in splits:
        dataset = data_lib.build_dataset(name, root, split_names[split], transforms[split], **options)
        if dataset.num_classes != d.num_classes:
            raise ConfigError(
                f"data.num_classes={d.num_classes} but the {d.dataset} dataset at {root} has "
                f"{dataset.num_classes} classes; set data.num_classes={dataset.num_classes}"
            )
        out[split] = dataset
    return out


def build_model(cfg: Config, load_pretrained: bool = True) -> nn.Module:
    """The network of ``cfg`` (BatchNorm; converted to SyncBatchNorm by the trainer under DDP).

    ``load_pretrained=False`` skips ``model.pretrained``: for a model about to get every weight from
    a checkpoint (the backbone file need not exist where a run is resumed or evaluated).
    """
    model = models.build(cfg.model.name, cfg.data.num_classes, **cfg.model.options)
    if load_pretrained and cfg.model.pretrained:
        models.load_backbone_weights(model, Path(cfg.model.pretrained).expanduser())
    return model


def model_from_checkpoint(cfg: Config, state: dict[str, Any]) -> tuple[nn.Module, InputConvention]:
    """The network of ``cfg`` with the weights of checkpoint ``state``, and the input convention they expect."""
    convention = resolve_input_convention(cfg, state)
    model = build_model(cfg, load_pretrained=False)
    load_model_state(model, state)
    return model, convention


def evaluate_sharded(
    model: nn.Module, dataset: Dataset, cfg: Config, ctx: DistributedContext | None = None, progress: bool = True
) -> evaluation.SegmentationMetrics:
    """Evaluate ``model`` on ``dataset`` with ``cfg.eval``; each rank takes items ``rank::world``.

    No item is padded or repeated, and the ranks' confusion matrices are summed before the metrics
    are computed, so the numbers equal a single-process evaluation. ``alignseg eval`` and the trainer's
    validation both run this.
    """
    ctx = ctx or DistributedContext()
    indices = shard_indices(len(dataset), ctx.rank, ctx.world_size)
    shard = dataset if ctx.world_size == 1 else Subset(dataset, list(indices))
    loader = data_lib.build_loader(
        shard, cfg.eval.batch_size, train=False, workers=min(cfg.data.workers, 2), generator=torch.Generator()
    )
    return evaluation.evaluate(
        model,
        loader,
        cfg.data.num_classes,
        **eval_setting(cfg),
        progress=progress and ctx.is_main,
        class_names=getattr(dataset, "class_names", None),
        distributed=ctx.is_distributed,
    )
