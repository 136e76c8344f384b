"""The front door: load a model, segment images, render the results (as MMSegmentation's ``init_model`` and
``inference_model``). ``alignseg eval|predict|offsets`` run these functions too.

    import alignseg
    model = alignseg.load_model("runs/demo/best.pt")        # a checkpoint, or a preset name (untrained)
    label = alignseg.segment(model, "street.png")           # Tensor[H, W] of class ids (train ids)
    alignseg.render(label, palette=model).save("street_label.png")
    alignseg.render(label, "street.png", palette=model).save("street_overlay.jpg")

:func:`load_model` returns the network (an ``nn.Module`` in eval mode) with one extra attribute, ``info``
(:class:`ModelInfo`): its input convention, number of classes, dataset facts (class names, palette) and
the config it was trained with. :func:`segment` reads ``info`` to turn images into the tensors the weights
expect; a model without ``info`` (built by hand) gets this project's convention (RGB, 1/255, ImageNet).

Images may be file paths, PIL images, ``uint8`` arrays ``[H, W]``, ``[H, W, 3]`` or ``[H, W, 4]``, or ``uint8``
tensors ``[3, H, W]`` (``[N, 3, H, W]`` for a batch), of any size; grey and RGBA are converted to RGB, and
the log says so. File output (:func:`predict_folder`, :func:`offsets_for_images`) never writes over an input
image, never gives two inputs one output name, leaves its own output folder out of the images it reads,
checks the output folder before any inference, and reports an unreadable image by name and goes on.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Union, get_args

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import models
from .builders import model_from_checkpoint
from .checkpoint import load_checkpoint
from .config import Config, apply_overrides, config_from_dict
from .data.convention import IMAGENET_CONVENTION, InputConvention
from .data.formats import ade20k_result_path, cityscapes_result_path, write_ade20k_result, write_cityscapes_result
from .data.images import DataFileError, find_images, read_rgb_image, to_rgb
from .data.metainfo import DatasetMeta, folder_meta, get_metainfo
from .evaluation.evaluate import model_device
from .evaluation.inference import EvalMode, InferenceMode, build_inference_mode, infer
from .visualize import colorize, draw_offsets, flow_legend, get_palette, overlay

log = logging.getLogger(__name__)

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, Tensor]
# What predict writes per image: a palette PNG + overlay, or the files a benchmark server takes.
OutputFormat = Literal["palette", "cityscapes", "ade20k"]
OUTPUT_FORMATS: tuple[str, ...] = get_args(OutputFormat)


@dataclass(frozen=True, eq=False)
class ModelInfo:
    """What :func:`segment` and :func:`render` need to know about a model, attached as ``model.info``."""

    name: str  # the preset (alignseg_r101, ...)
    num_classes: int
    input: InputConvention  # how an RGB photo becomes the tensor the weights expect
    dataset: DatasetMeta  # class names and palette of its classes
    config: Config | None = None  # the config it was trained with (checkpoints)
    checkpoint: str | None = None
    iteration: int | None = None


def load_model(
    checkpoint_or_preset: str | os.PathLike,
    device: torch.device | str | None = None,
    num_classes: int | None = None,
    overrides: Sequence[str] = (),
) -> nn.Module:
    """A model in eval mode with ``model.info`` (:class:`ModelInfo`).

    Args:
        checkpoint_or_preset: an alignseg checkpoint file (``.pt``; a run folder takes its latest), or a preset
            name (:func:`alignseg.models.list_models`), which gives an untrained network.
        device: where to put it; default CUDA when available, else the CPU.
        num_classes: for a preset, its number of outputs (default 19, the Cityscapes classes); for a
            checkpoint, a check: a different number is an error.
        overrides: ``key.sub=value`` changes to a checkpoint's stored config (e.g. ``eval.mode=slide``).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    text = os.fspath(checkpoint_or_preset)
    if text in models.list_models() and not Path(text).exists():
        classes = num_classes or 19
        model = models.build(text, classes)
        convention = models.get_preset(text).input
        log.warning("%s: a new network with random weights (no checkpoint given), %d classes", text, classes)
        info = ModelInfo(text, classes, convention, _dataset_for(None, classes))
    else:
        if not Path(text).exists() and not Path(text).suffix and os.sep not in text:
            presets = ", ".join(models.list_models())
            raise ValueError(
                f"checkpoint_or_preset {text!r} is neither a checkpoint file nor a model preset ({presets})"
            )
        state = load_checkpoint(text)  # names the file when it is missing or unreadable
        cfg = config_from_dict(state["config"], origin=f"checkpoint {state['path']}")
        cfg = apply_overrides(cfg, overrides)
        if num_classes is not None and num_classes != cfg.data.num_classes:
            raise ValueError(
                f"num_classes={num_classes}, but checkpoint {state['path']} has {cfg.data.num_classes} classes"
            )
        model, convention = model_from_checkpoint(cfg, state)
        info = ModelInfo(
            cfg.model.name,
            cfg.data.num_classes,
            convention,
            _dataset_for(cfg.data.dataset, cfg.data.num_classes),
            cfg,
            state["path"],
            int(state["iteration"]),
        )
        log.info("loaded %s (%s, iteration %d; input %s)", state["path"], cfg.model.name, info.iteration, convention)
    model.info = info
    return model.to(device).eval()


def model_info(model: nn.Module) -> ModelInfo:
    """``model.info``; for a model without one (built by hand), this project's input convention and the classes
    of its ``num_classes`` attribute (Cityscapes' 19 when it has none)."""
    info = getattr(model, "info", None)
    if isinstance(info, ModelInfo):
        return info
    classes = getattr(model, "num_classes", None)
    dataset = _dataset_for(None, classes) if isinstance(classes, int) else get_metainfo("cityscapes")
    return ModelInfo(type(model).__name__, dataset.num_classes, IMAGENET_CONVENTION, dataset)


def _dataset_for(name: str | None, num_classes: int) -> DatasetMeta:
    """The dataset facts (classes, palette) of ``name``; a folder's generic ones when the name or count do not fit."""
    for candidate in ([name] if name else []) + ["cityscapes", "ade20k"]:
        try:
            return get_metainfo(candidate, num_classes)
        except ValueError:
            continue
    return folder_meta(num_classes)


# ----------------------------------------------------------------------------------------------
# images in


def read_image(image: ImageLike) -> tuple[Tensor, Image.Image]:
    """One image as (``uint8 Tensor[3, H, W]`` RGB, the same as a PIL image); grey and RGBA are converted (logged)."""
    if isinstance(image, (str, os.PathLike)):
        photo = read_rgb_image(image, say=True)
    elif isinstance(image, Image.Image):
        photo = to_rgb(image, "<PIL image>", say=True)
    elif isinstance(image, (np.ndarray, Tensor)):
        photo = Image.fromarray(_rgb_array(image))
    else:
        raise TypeError(f"an image must be a path, PIL image, uint8 array or uint8 tensor, got {type(image).__name__}")
    return torch.from_numpy(np.array(photo, dtype=np.uint8)).permute(2, 0, 1), photo


def _rgb_array(image: np.ndarray | Tensor) -> np.ndarray:
    """``uint8 [H, W, 3]`` from an array ``[H, W]``/``[H, W, 1|3|4]`` or a tensor ``[H, W]``/``[1|3|4, H, W]``."""
    is_tensor = isinstance(image, Tensor)
    array = image.detach().cpu().numpy() if is_tensor else np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"an image array or tensor must hold uint8 values 0..255, got {array.dtype}")
    if array.ndim == 3 and is_tensor:
        array = array.transpose(1, 2, 0)  # tensors are channels-first
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or 0 in array.shape:
        layout = "[C, H, W]" if is_tensor else "[H, W, C]"
        raise ValueError(f"an image must be {layout} with C = 1, 3 or 4 (or [H, W]), got shape {tuple(image.shape)}")
    if array.shape[2] != 3:
        what = "grey" if array.shape[2] == 1 else "alpha dropped"
        log.info("image with %d channels read as RGB (%s)", array.shape[2], what)
    return np.ascontiguousarray(np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[..., :3])


# ----------------------------------------------------------------------------------------------
# segmentation


def segment(
    model: nn.Module,
    images: ImageLike | Sequence[ImageLike],
    mode: EvalMode | InferenceMode = "whole",
    *,
    tile: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    scales: Sequence[float] | None = None,
    flip: bool = False,
    device: torch.device | str | None = None,
) -> Tensor | list[Tensor]:
    """Class maps (train ids, ``int64``) of one image (``Tensor[H, W]``), a list of images (a list of those), or a
    ``uint8 Tensor[N, 3, H, W]`` batch (``Tensor[N, H, W]``), each at its image's size.

    ``mode``, ``tile``, ``stride``, ``scales``, ``flip``: the inference setting (see
    :func:`alignseg.evaluation.build_inference_mode`); ``slide`` without a tile takes the model's config's
    (``eval.tile``, else the training crop). Runs without gradients; leaves the model's train/eval mode alone.
    """
    info = model_info(model)
    if mode == "slide" and tile is None and info.config is not None:
        tile = info.config.eval.tile or info.config.data.crop_size
        stride = stride if stride is not None else info.config.eval.stride
    setting = build_inference_mode(mode, tile=tile, stride=stride, scales=scales, flip=flip)
    if isinstance(images, Tensor) and images.dim() == 4:
        return torch.stack([class_map(model, image, setting, info.input, device) for image in images])
    if isinstance(images, (list, tuple)):
        return [class_map(model, read_image(image)[0], setting, info.input, device) for image in images]
    return class_map(model, read_image(images)[0], setting, info.input, device)


def class_map(
    model: nn.Module,
    pixels: Tensor,
    setting: InferenceMode,
    convention: InputConvention,
    device: torch.device | str | None = None,
) -> Tensor:
    """The ``int64 Tensor[H, W]`` class map of one ``uint8 Tensor[3, H, W]`` RGB image."""
    if pixels.dtype != torch.uint8 or pixels.dim() != 3 or pixels.shape[0] != 3:
        got = f"{pixels.dtype} {tuple(pixels.shape)}"
        raise ValueError(f"pixels must be a uint8 Tensor[3, H, W] of RGB values, got {got}")
    device = torch.device(device) if device is not None else model_device(model)
    batch = convention.normalize(pixels.to(device)).unsqueeze(0)
    was_training = model.training
    model.eval()
    try:
        return infer(model, batch, setting).argmax(1)[0].cpu()
    finally:
        model.train(was_training)


def render(
    label: Tensor | np.ndarray,
    image: ImageLike | None = None,
    palette: str | np.ndarray | nn.Module | None = None,
    alpha: float = 0.5,
) -> Image.Image:
    """The picture of a class map: without ``image``, a palette PNG (pixel values = class ids; 255 = ignore is
    black); with it, the colours blended over the photo (``(1 - alpha) * photo + alpha * colour``).

    ``palette``: a name (``cityscapes``, ``ade20k``, ``generic``), a ``[K, 3]`` array, or a model from
    :func:`load_model` (its dataset's colours); default ``cityscapes``.
    """
    if isinstance(palette, nn.Module):
        palette = model_info(palette).dataset.palette
    colours = get_palette("cityscapes" if palette is None else palette)
    if image is None:
        return colorize(label, colours)
    return overlay(read_image(image)[1], label, alpha, colours)


# ----------------------------------------------------------------------------------------------
# folders of images -> files


@dataclass
class PredictionRun:
    """What :func:`predict_folder` / :func:`offsets_for_images` did: files written per image, images that failed."""

    written: list[tuple[Path, ...]] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{len(self.written)} images done, {len(self.failed)} failed"
        return text + "".join(f"\n  {path}: {why}" for path, why in self.failed)


def output_stems(images: Sequence[Path], root: Path) -> dict[Path, Path]:
    """Each image's output path without suffix, relative to the output folder: ``sub/name``.

    Images of one folder that share a name (``scene.jpg``, ``scene.png``) keep their extension in it
    (``scene_jpg``, ``scene_png``); if names still clash, ``ValueError`` names the two images.
    """
    by_stem: dict[tuple[Path, str], list[Path]] = {}
    for path in images:
        relative = path.relative_to(root)
        by_stem.setdefault((relative.parent, relative.stem.lower()), []).append(path)
    stems, owner = {}, {}
    for paths in by_stem.values():
        for path in paths:
            relative = path.relative_to(root)
            name = relative.stem if len(paths) == 1 else f"{relative.stem}_{path.suffix.lstrip('.').lower()}"
            stem = relative.parent / name
            key = stem.as_posix().lower()  # case-insensitive file systems
            if key in owner:
                raise ValueError(f"{owner[key]} and {path} would both be written as {stem}.*; rename one of them")
            owner[key] = path
            stems[path] = stem
    return stems


def prepare_output_dir(
    out_dir: str | Path, root: Path, images: Sequence[Path], targets: Sequence[Path], overwrite: bool
) -> Path:
    """Check (before any inference) that ``out_dir`` can take ``targets``, then create it.

    Refused with ``ValueError``: ``out_dir`` is a file or not writable; it is the input folder itself;
    a target is one of the input ``images``; two images share a target; a target exists and ``overwrite`` is off.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--output {out_dir} is a file; give a folder to write into")
    if len(images) > 1 and out_dir.resolve() == root.resolve():
        raise ValueError(
            f"--output {out_dir} is the input folder; give a separate folder (it may be inside the input folder)"
        )
    inputs = {p.resolve() for p in images}
    seen: set[Path] = set()
    for target in targets:
        if target.resolve() in inputs:
            raise ValueError(f"refusing to write {target}: it is one of the input images")
        if target.resolve() in seen:
            raise ValueError(f"two input images would both be written as {target}; rename one of them")
        seen.add(target.resolve())
    if not overwrite:
        existing = [t for t in targets if t.exists()]
        if existing:
            raise ValueError(
                f"{len(existing)} output files exist already, e.g. {existing[0]}; pass --overwrite to replace them "
                f"or choose another --output"
            )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as err:
        raise ValueError(f"cannot write into --output {out_dir}: {err.strerror or err}") from None
    return out_dir


def _targets(images: list[Path], root: Path, out_dir: Path, output_format: str) -> dict[Path, tuple[Path, ...]]:
    if output_format == "cityscapes":
        return {path: (cityscapes_result_path(path, out_dir),) for path in images}
    if output_format == "ade20k":
        return {path: (ade20k_result_path(path, out_dir),) for path in images}
    stems = output_stems(images, root)
    return {path: (out_dir / f"{stem}.png", out_dir / f"{stem}_overlay.jpg") for path, stem in stems.items()}


def predict_folder(
    model: nn.Module,
    image_dir: str | Path,
    out_dir: str | Path,
    mode: EvalMode = "whole",
    tile: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    scales: Sequence[float] | None = None,
    flip: bool = False,
    alpha: float = 0.5,
    output_format: OutputFormat = "palette",
    palette: str | np.ndarray | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> PredictionRun:
    """Segment one image file or every image under a folder and write, under ``out_dir``:

    * ``output_format="palette"``: ``{name}.png`` (palette PNG of class ids) and ``{name}_overlay.jpg``,
      keeping subfolders (names: :func:`output_stems`); ``palette`` default: the model's dataset's.
    * ``"cityscapes"``: ``{city}/{city}_{seq}_{frame}_labelIds.png`` with Cityscapes label ids, from
      ``*_leftImg8bit`` image names (:func:`alignseg.data.formats.write_cityscapes_result`): the test server's format.
    * ``"ade20k"``: ``{name}.png`` with class index + 1 (:func:`alignseg.data.formats.write_ade20k_result`).

    ``out_dir`` is left out of the scan and checked before any inference (:func:`prepare_output_dir`).
    An image that cannot be read is logged with its path and listed in ``failed``; the rest go on.
    The inference setting is as in :func:`segment`.
    """
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
    info = model_info(model)
    setting = build_inference_mode(mode, tile=tile, stride=stride, scales=scales, flip=flip)
    needed = {"cityscapes": 19, "ade20k": 150}.get(output_format)
    if needed is not None and info.num_classes != needed:
        raise ValueError(
            f"--format {output_format} needs a model of the {needed} {output_format} classes; "
            f"this one has {info.num_classes}"
        )
    colours = get_palette(palette if palette is not None else info.dataset.palette)
    out_dir = Path(out_dir)
    root, images = find_images(image_dir, exclude=out_dir)
    targets = _targets(images, root, out_dir, output_format)
    prepare_output_dir(out_dir, root, images, [t for files in targets.values() for t in files], overwrite)
    log.info("predicting %d images from %s into %s (%s), mode: %s", len(images), image_dir, out_dir, output_format,
             setting)
    run = PredictionRun()
    for path in tqdm(images, desc=f"predict [{setting}]", unit="img", disable=not progress):
        try:
            pixels, photo = read_image(path)
        except DataFileError as err:
            log.error("skipped: %s", err)
            run.failed.append((path, str(err)))
            continue
        prediction = class_map(model, pixels, setting, info.input, device)
        if output_format == "cityscapes":
            written = (write_cityscapes_result(prediction, path, out_dir, overwrite=True),)
        elif output_format == "ade20k":
            written = (write_ade20k_result(prediction, path, out_dir, overwrite=True),)
        else:
            if int(prediction.max()) >= len(colours):
                raise ValueError(
                    f"the model predicts class {int(prediction.max())} but the palette has {len(colours)} colours"
                )
            label_path, overlay_path = targets[path]
            label_path.parent.mkdir(parents=True, exist_ok=True)
            colorize(prediction, colours).save(label_path)
            overlay(photo, prediction, alpha, colours).save(overlay_path, quality=90)
            written = (label_path, overlay_path)
        run.written.append(written)
    return run


def offsets_for_images(
    model: nn.Module,
    source: str | Path,
    out_dir: str | Path,
    device: torch.device | str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> PredictionRun:
    """:func:`render_offsets` for one image file (into ``out_dir``) or each image of a folder (into
    ``out_dir/{name}/``, names by :func:`output_stems`). Each image's folder must be new or empty unless
    ``overwrite``; checked for every image before any inference. Unreadable images are listed in ``failed``."""
    out_dir = Path(out_dir)
    single = Path(source).is_file()
    root, images = find_images(source, exclude=out_dir)
    folders = {path: out_dir if single else out_dir / stem for path, stem in output_stems(images, root).items()}
    input_folders = {p.parent.resolve() for p in images}
    for folder in folders.values():
        if folder.resolve() in input_folders:  # it would take input.png, offsets_legend.png, ... beside the inputs
            raise ValueError(f"--output {folder} holds input images; give a separate folder")
        if not overwrite and folder.is_dir() and any(folder.iterdir()):
            raise ValueError(f"{folder} is not empty; pass --overwrite to write into it or choose another --output")
    prepare_output_dir(out_dir, root, images, [], overwrite=True)
    run = PredictionRun()
    for path in tqdm(images, desc="offsets", unit="img", disable=not progress or single):
        try:
            written = render_offsets(model, path, folders[path], device)
        except DataFileError as err:
            log.error("skipped: %s", err)
            run.failed.append((path, str(err)))
            continue
        run.written.append(tuple(written.values()))
    return run


def render_offsets(
    model: nn.Module,
    image: ImageLike,
    out_dir: str | Path,
    device: torch.device | str | None = None,
    max_magnitude: float | None = None,
) -> dict[str, Path]:
    """Write one flow-colour picture per alignment module of ``model`` for one image; returns name -> path.

    ``model.forward_offsets(images)`` must return ``{module name: Tensor[1, 4 or 2, h, w]}``; the pictures are
    :func:`alignseg.visualize.draw_offsets`'s. ``offsets_legend.png`` (the colour wheel) and ``input.png`` are
    written too.
    """
    if not callable(getattr(model, "forward_offsets", None)):
        raise TypeError(f"{type(model).__name__} has no forward_offsets(images) method returning the offset fields")
    convention = model_info(model).input
    device = torch.device(device) if device is not None else model_device(model)
    pixels, photo = read_image(image)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            fields = model.forward_offsets(convention.normalize(pixels.to(device)).unsqueeze(0))
    finally:
        model.train(was_training)
    written = {}
    for name, (picture, scale) in draw_offsets(fields, tuple(pixels.shape[-2:]), max_magnitude).items():
        path = out_dir / f"{_file_name(name)}.png"
        picture.save(path)
        written[name] = path
        log.info("%s: offsets drawn to %s (colour scale: %.2f px at full saturation)", name, path, scale)
    flow_legend().save(out_dir / "offsets_legend.png")
    photo.save(out_dir / "input.png")
    return written


def _file_name(module_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", module_name) or "offsets"


__all__ = [
    "OUTPUT_FORMATS",
    "ModelInfo",
    "PredictionRun",
    "class_map",
    "load_model",
    "model_info",
    "offsets_for_images",
    "predict_folder",
    "read_image",
    "render",
    "render_offsets",
    "segment",
]
