"""Load the AlignSeg authors' released checkpoints (``speedinghzl/AlignSeg``) into :class:`AlignSeg`.

Their checkpoints are ``torch.save(seg_model.state_dict(), ...)`` of ``networks/alignseg.py`` (train.py L246),
a plain state_dict; their loader also accepts one under ``'model'`` (utils/pyt_utils.py L52-53). What the
conversion does, key by key (their name -> ours):

* ``conv1``/``bn1``..``conv3``/``bn3``, ``layer1``..``layer4`` -> ``backbone.*`` (same names);
* ``RRB{k}a`` -> ``lateral{k}``, ``RRB{k}b`` -> ``refine{k-1}``; inside, ``residual.0/1/2`` ->
  ``residual.0.0/0.1/1``;
* ``CAM.pool.1-4`` -> ``align_cm.context.{0.0, 0.1, 1.0, 1.1}``, ``CAM.adapt.0-3`` -> ``align_cm.local.*``,
  ``CAM.delta_gen.0/1/2`` -> ``align_cm.offset.reduce/norm/predict``;
* ``CAB{k}.delta_gen1/2`` -> ``align_fa{k-1}.offset_high/offset_low``;
* ``head.0/1/3``, ``dsn.0/1/3`` -> ``head.0.0/0.1/2``, ``aux_head.0.0/0.1/2``.

Every norm of theirs is inplace_abn's ``InPlaceABNSync`` (alignseg.py L17-18; the backbone's with
``activation='identity'``), which scales by ``|weight| + eps``, not ``weight`` (inplace_abn
``src/inplace_abn_cpu.cpp`` L121-127, CUDA ``src/inplace_abn_kernels.cuh`` L143 at v1.0.12), so our
BatchNorm gets ``weight = |weight| + eps``. Their head and dsn 3x3 convs have a bias (alignseg.py L260, L267),
ours none: it is folded into the next norm, ``running_mean -= bias`` (exact). Checkpoints without
``num_batches_tracked`` (inplace_abn before 2020-09) get zeros.

Their offsets are in the normalised units of their warp (before the issue #7 fix, with PyTorch 1.2's
``grid_sample``), which depend on the runtime size: the model is built with ``offset_convention="authors"``
(see :class:`~alignseg.models.modules.AlignFA`); the default AlignFA form (``"exact"``) is already theirs.

Their images are BGR (``cv2.imread``, dataset/datasets.py L175), float 0-255 minus a per-channel mean (L182-183;
``IMG_MEAN``, evaluate.py L27, train.py L30), not divided by a std: :data:`AUTHORS_INPUT`
(:data:`alignseg.data.convention.AUTHORS_CONVENTION`) records it, and :func:`convert_checkpoint` stores it as the
checkpoint's ``input``, which every path that feeds the model reads.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data.convention import AUTHORS_CONVENTION, InputConvention
from .network import AlignSeg
from .resnet import RESNET_LAYOUTS, BasicBlock, Bottleneck

# The input convention their weights expect (BGR, 0..255 minus IMG_MEAN, no std); stored in converted checkpoints.
AUTHORS_INPUT: InputConvention = AUTHORS_CONVENTION

# Constructor arguments that make AlignSeg compute what their networks/alignseg.py computes.
AUTHORS_MODEL_OPTIONS: dict[str, Any] = {"offset_convention": "authors"}

_WRAPPER_KEYS = ("state_dict", "model")
_BACKBONE = re.compile(r"^(conv[123]|bn[123]|layer[1-4])\.")
_RRB_INNER = {"unify": "unify", "residual.0": "residual.0.0", "residual.1": "residual.0.1",
              "residual.2": "residual.1", "norm": "norm"}
_OFFSET_INNER = {"0": "reduce", "1": "norm", "2": "predict"}
_CAM_BRANCH = {"pool": ("context", {"1": "0.0", "2": "0.1", "3": "1.0", "4": "1.1"}),
               "adapt": ("local", {"0": "0.0", "1": "0.1", "2": "1.0", "3": "1.1"})}
_HEAD_INNER = {"0": "0.0", "1": "0.1", "3": "2"}
_FOLDED_BIASES = ("head.0.bias", "dsn.0.bias")


class AuthorsCheckpointError(ValueError):
    """A file or state_dict that is not a checkpoint of the authors' network; the message names the key."""


def from_authors_checkpoint(path_or_state_dict: str | os.PathLike | Mapping[str, Tensor],
                            num_classes: int | None = None) -> AlignSeg:
    """An :class:`AlignSeg` (eval mode) computing what the authors' ``networks/alignseg.py`` computes on these weights.

    Args:
        path_or_state_dict: a file saved by their ``train.py`` (loaded with ``weights_only=True``), or its
            state_dict; a ``module.`` prefix and a ``{'state_dict': ...}`` / ``{'model': ...}`` wrapper are
            accepted, with or without ``num_batches_tracked``.
        num_classes: the expected number of classes; ``None`` takes it from the head.

    The backbone depth, widths and classes are read from the weights. The model has the weights' floating
    dtype (float32 for their files). In eval mode it returns full-size logits: their 1/4-resolution logits
    upsampled bilinearly with ``align_corners=True``, as their evaluate.py does (L133, L152).

    Raises:
        AuthorsCheckpointError: an unknown, missing or mis-shaped key (named), or ``num_classes`` not matching.
    """
    state, _ = read_authors_state_dict(path_or_state_dict)
    options = infer_architecture(state)
    if num_classes is not None and num_classes != options["num_classes"]:
        raise AuthorsCheckpointError(
            f"num_classes={num_classes} does not match the checkpoint's head.3.weight "
            f"({options['num_classes']} classes)"
        )
    model = AlignSeg(**options, **AUTHORS_MODEL_OPTIONS)
    dtype = state["conv1.weight"].dtype
    if dtype.is_floating_point:
        model.to(dtype=dtype)
    model.load_state_dict(convert_authors_state_dict(state, model))
    return model.eval()


def read_authors_state_dict(source: str | os.PathLike | Mapping[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """(state_dict with the ``module.`` prefix removed, a description of the source) from a path or a mapping."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"authors' checkpoint {path} does not exist")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling refused, damaged file: say which file and why
            raise AuthorsCheckpointError(
                f"cannot read {path} as a checkpoint of tensors (torch.load weights_only=True): "
                f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
            ) from err
        where = str(path)
    else:
        obj, where = source, "the given state_dict"
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise AuthorsCheckpointError(f"{where} is not a state_dict (a mapping of names to tensors)")
    state: dict[str, Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            raise AuthorsCheckpointError(f"{where}: entry {key!r} is a {type(value).__name__}, not a tensor")
        state[str(key).removeprefix("module.")] = value
    return state, where


def infer_architecture(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """The :class:`AlignSeg` arguments (depth, backbone_width, decoder_channels, num_classes, in_channels) of a
    state_dict in the authors' layout."""
    for key in ("conv1.weight", "RRB1a.unify.weight", "head.3.weight"):
        if key not in state:
            hint = (" (its keys start with 'backbone.': an alignseg checkpoint, which needs no conversion)"
                    if any(k.startswith("backbone.") for k in state) else "")
            raise AuthorsCheckpointError(f"missing key {key!r}: not a checkpoint of the authors' AlignSeg{hint}")
    block = Bottleneck if "layer1.0.conv3.weight" in state else BasicBlock
    counts = []
    for stage in range(1, 5):
        indices = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        counts.append(len(indices))
    depth = next((d for d, (b, layout) in RESNET_LAYOUTS.items() if b is block and tuple(counts) == layout), None)
    if depth is None:
        raise AuthorsCheckpointError(
            f"the backbone has {counts} {block.__name__} blocks per stage, which is no ResNet depth we build "
            f"({ {d: list(layout) for d, (b, layout) in RESNET_LAYOUTS.items() if b is block} })"
        )
    stem = state["conv1.weight"]
    return {
        "depth": depth,
        "backbone_width": int(stem.shape[0]),
        "in_channels": int(stem.shape[1]),
        "decoder_channels": int(state["RRB1a.unify.weight"].shape[0]),
        "num_classes": int(state["head.3.weight"].shape[0]),
    }


def authors_key_to_ours(key: str) -> str | None:
    """Our name for the authors' ``key``; ``None`` for the biases folded away; AuthorsCheckpointError if unknown."""
    if key in _FOLDED_BIASES:
        return None
    if _BACKBONE.match(key):
        return "backbone." + key
    module, _, rest = key.partition(".")
    param = rest.rpartition(".")[2]
    inner = rest.rpartition(".")[0]
    mapped: str | None = None
    if m := re.fullmatch(r"RRB([1-5])([ab])", module):
        stage, kind = int(m.group(1)), m.group(2)
        target = f"lateral{stage}" if kind == "a" else (f"refine{stage - 1}" if stage > 1 else None)
        if target and inner in _RRB_INNER:
            mapped = f"{target}.{_RRB_INNER[inner]}"
    elif m := re.fullmatch(r"CAB([2-5])", module):
        head, _, index = inner.partition(".")
        if head in ("delta_gen1", "delta_gen2") and index in _OFFSET_INNER:
            which = "offset_high" if head == "delta_gen1" else "offset_low"
            mapped = f"align_fa{int(m.group(1)) - 1}.{which}.{_OFFSET_INNER[index]}"
    elif module == "CAM":
        branch, _, index = inner.partition(".")
        if branch in _CAM_BRANCH and index in _CAM_BRANCH[branch][1]:
            name, table = _CAM_BRANCH[branch]
            mapped = f"align_cm.{name}.{table[index]}"
        elif branch == "delta_gen" and index in _OFFSET_INNER:
            mapped = f"align_cm.offset.{_OFFSET_INNER[index]}"
    elif module in ("head", "dsn") and inner in _HEAD_INNER:
        mapped = f"{'head' if module == 'head' else 'aux_head'}.{_HEAD_INNER[inner]}"
    if mapped is None:
        raise AuthorsCheckpointError(f"unknown key {key!r}: not part of the authors' AlignSeg (networks/alignseg.py)")
    return f"{mapped}.{param}"


def convert_authors_state_dict(state: Mapping[str, Tensor], model: AlignSeg) -> dict[str, Tensor]:
    """Our state_dict for ``model`` (built with :func:`infer_architecture`'s arguments) from the authors' ``state``.

    Norm weights become ``|weight| + eps``; the head/dsn conv biases are folded into the next norm's running
    mean. Computed in the checkpoint's precision; every key of ``model`` is filled, every key of ``state`` used.
    """
    own = model.state_dict()
    norms = {name for name, module in model.named_modules() if isinstance(module, nn.modules.batchnorm._NormBase)}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        target = authors_key_to_ours(key)
        if target is None:
            continue
        if target not in own:
            raise AuthorsCheckpointError(f"key {key!r} (our {target!r}) has no counterpart in the model")
        if value.shape != own[target].shape:
            raise AuthorsCheckpointError(
                f"key {key!r} has shape {list(value.shape)}, the model expects {list(own[target].shape)} for {target!r}"
            )
        module_name, _, param = target.rpartition(".")
        if module_name in norms and param == "weight":
            value = value.abs() + model.get_submodule(module_name).eps
        out[target] = value
    for bias_key, norm in (("head.0.bias", "head.0.1"), ("dsn.0.bias", "aux_head.0.1")):
        if bias_key not in state:
            raise AuthorsCheckpointError(f"missing key {bias_key!r}: the authors' head convs have a bias")
        mean_key = f"{norm}.running_mean"
        if mean_key in out:
            if state[bias_key].shape != out[mean_key].shape:
                raise AuthorsCheckpointError(
                    f"key {bias_key!r} has shape {list(state[bias_key].shape)}, expected {list(out[mean_key].shape)}"
                )
            out[mean_key] = out[mean_key] - state[bias_key]
    for target, value in own.items():
        if target not in out and target.endswith("num_batches_tracked"):
            out[target] = torch.zeros_like(value)
    missing = [t for t in own if t not in out]
    if missing:
        raise AuthorsCheckpointError(
            f"missing key(s) in the authors' checkpoint for {len(missing)} of our tensors, e.g. "
            f"{', '.join(ours_to_authors_hint(t) for t in missing[:5])}"
        )
    return out


def ours_to_authors_hint(target: str) -> str:
    """``'<their key> (our <target>)'`` for error messages, found by mapping every plausible authors' key."""
    for key in _candidate_authors_keys(target):
        try:
            if authors_key_to_ours(key) == target:
                return f"{key!r} (our {target!r})"
        except AuthorsCheckpointError:
            continue
    return repr(target)


def _candidate_authors_keys(target: str):
    if target.startswith("backbone."):
        yield target.removeprefix("backbone.")
        return
    param = target.rpartition(".")[2]
    modules = (
        [f"RRB{k}{s}" for k in range(1, 6) for s in "ab"] + [f"CAB{k}" for k in range(2, 6)] + ["CAM", "head", "dsn"]
    )
    inners = (list(_RRB_INNER) + [f"delta_gen{i}.{j}" for i in ("", "1", "2") for j in _OFFSET_INNER]
              + [f"pool.{i}" for i in "1234"] + [f"adapt.{i}" for i in "0123"] + list(_HEAD_INNER))
    for module in modules:
        for inner in inners:
            yield f"{module}.{inner}.{param}"


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, num_classes: int | None = None,
                       config: str = "cityscapes") -> dict[str, Any]:
    """Convert the authors' checkpoint ``src`` into an alignseg checkpoint at ``dst`` (never overwritten).

    ``dst`` loads with ``alignseg eval|predict|offsets --checkpoint dst``: its config is the preset ``config``
    with the model's architecture and :data:`AUTHORS_MODEL_OPTIONS`. Besides the usual entries it holds
    ``input`` (:data:`AUTHORS_INPUT` as :meth:`InputConvention.to_dict`: the image convention the weights
    expect) and ``source`` (file name, size, sha256, the keys converted). Returns a summary dict.
    """
    from alignseg.checkpoint import save_checkpoint
    from alignseg.config import load_config

    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise FileExistsError(f"{dst} exists; choose another destination (alignseg never overwrites a file)")
    state, _ = read_authors_state_dict(src)
    model = from_authors_checkpoint(state, num_classes)
    arch = infer_architecture(state)
    name = f"alignseg_r{arch['depth']}"
    from .registry import PRESETS

    options = {k: arch[k] for k in ("depth", "backbone_width", "decoder_channels", "in_channels")}
    options.update(AUTHORS_MODEL_OPTIONS)
    overrides = [
        f"model.name={name if name in PRESETS else 'alignseg_r101'}",
        f"data.num_classes={arch['num_classes']}",
    ]
    cfg = load_config(config, overrides)
    cfg.model.options = {**cfg.model.options, **options}
    cfg.model.pretrained = None
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    weights = {k: v.detach().to(torch.float32) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_checkpoint(dst, {
        "iteration": 0,
        "model": weights,
        "config": cfg.to_dict(),
        "best_miou": None,
        "input": AUTHORS_INPUT.to_dict(),
        "source": {"file": src.name, "bytes": src.stat().st_size, "sha256": digest,
                   "format": "speedinghzl/AlignSeg networks/alignseg.py state_dict", "keys": len(state)},
    })
    return {"dst": str(dst), "model": cfg.model.name, "num_classes": arch["num_classes"], "keys": len(state),
            "options": options, "sha256": digest}
