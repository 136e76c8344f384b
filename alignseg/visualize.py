"""Pictures of predictions and of the learned offset fields.

* Label maps as palette PNGs (:func:`colorize`: the pixel values stay the class ids, the palette gives the
  colours; 255 = ignore is black) and blended over the photo (:func:`overlay`).
* Offset fields in the optical-flow colour coding of the Middlebury benchmark (Baker et al., IJCV 2011):
  hue gives the direction, saturation the length; white = no shift (:func:`flow_to_color`).
* :func:`predict_folder` and :func:`offsets_for_images` (one :func:`render_offsets` per image), the work
  behind ``alignseg predict`` and ``alignseg offsets``. They never write over an input image, never give
  two inputs one output name, leave their own output folder out of the images they read, check the
  output folder before any inference, and report an unreadable image by name and go on with the rest
  (:func:`find_images`, :func:`output_stems`, :func:`prepare_output_dir`, :func:`read_rgb_image`).

Palettes are facts of the datasets and live in :mod:`alignseg.data.metainfo` (Cityscapes: the official
colours of its 19 classes; ADE20K and folders: the generic PASCAL VOC bit-interleaving scheme shifted by
one, so class 0 is not black); they are re-exported here.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from .data.images import DataFileError, read_rgb_image
from .data.metainfo import ADE20K_PALETTE, CITYSCAPES_PALETTE, IGNORE_INDEX, METAINFO, generic_palette  # noqa: F401
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalize
from .evaluation.evaluate import model_device
from .evaluation.inference import build_inference_mode, infer

log = logging.getLogger(__name__)

IGNORE_COLOUR = (0, 0, 0)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

# Palette names: the datasets' (cityscapes, ade20k, synthetic) and "generic" (255 distinct colours).
PALETTES = {**{name: meta.palette for name, meta in METAINFO.items()}, "generic": generic_palette(255)}


def get_palette(palette: str | np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
    """A palette by name (``cityscapes``, ``ade20k``, ``synthetic``, ``generic``) or an ``[K, 3]`` array of RGB values."""
    if isinstance(palette, str):
        if palette not in PALETTES:
            raise ValueError(f"palette must be one of {sorted(PALETTES)} or a [K, 3] array, got {palette!r}")
        return PALETTES[palette]
    array = np.asarray(palette)
    if array.ndim != 2 or array.shape[1] != 3 or array.shape[0] < 1 or array.min() < 0 or array.max() > 255:
        raise ValueError(f"palette must be a [K, 3] array of RGB values in 0..255, got shape {array.shape}")
    return array.astype(np.uint8)


def _label_array(label: Tensor | np.ndarray, palette: np.ndarray) -> np.ndarray:
    array = label.detach().cpu().numpy() if isinstance(label, Tensor) else np.asarray(label)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"label must be an integer [H, W] map of class ids, got {array.dtype} shape {array.shape}")
    bad = ((array < 0) | (array >= len(palette))) & (array != IGNORE_INDEX)
    if bad.any():
        raise ValueError(f"label holds ids outside the palette's {len(palette)} colours: {np.unique(array[bad])[:10].tolist()}")
    return array


def colorize(label: Tensor | np.ndarray, palette: str | np.ndarray = "cityscapes") -> Image.Image:
    """A palette image (mode ``P``) of an ``[H, W]`` class-id map; saved as PNG it keeps the ids."""
    colours = get_palette(palette)
    array = _label_array(label, colours)
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: min(len(colours), 256)] = colours[:256]
    table[IGNORE_INDEX] = IGNORE_COLOUR
    image = Image.fromarray(array.astype(np.uint8))  # 2-D uint8: mode "L", made "P" below
    image = image.convert("P") if image.mode != "P" else image
    image.putpalette(table.flatten().tolist())
    return image


def _rgb_array(image: Image.Image | np.ndarray | Tensor) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"image must be a PIL image or a uint8 [H, W, 3] array, got {array.dtype} shape {array.shape}")
    return array


def overlay(
    image: Image.Image | np.ndarray, label: Tensor | np.ndarray, alpha: float = 0.5, palette: str | np.ndarray = "cityscapes"
) -> Image.Image:
    """The label colours blended over the photo: ``(1 - alpha) * image + alpha * colour``; ignored pixels keep the photo."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colours = get_palette(palette)
    photo = _rgb_array(image).astype(np.float32)
    array = _label_array(label, colours)
    if array.shape != photo.shape[:2]:
        raise ValueError(f"label size {array.shape} does not match image size {photo.shape[:2]}")
    labelled = array != IGNORE_INDEX
    coloured = colours[np.where(labelled, array, 0)].astype(np.float32)
    blend = np.where(labelled[..., None], (1 - alpha) * photo + alpha * coloured, photo)
    return Image.fromarray(np.round(blend).astype(np.uint8))


def _colour_wheel() -> np.ndarray:
    """The 55 hues of the Middlebury flow colour wheel, float [55, 3] in [0, 1]."""
    # Red->yellow->green->cyan->blue->magenta->red in 15, 6, 4, 11, 13, 6 steps: one channel full,
    # another ramping up or down.
    segments = [(15, 0, 1, True), (6, 1, 0, False), (4, 1, 2, True), (11, 2, 1, False), (13, 2, 0, True), (6, 0, 2, False)]
    wheel = []
    for steps, full_channel, ramp_channel, rising in segments:
        for i in range(steps):
            colour = np.zeros(3)
            colour[full_channel] = 255
            ramp = np.floor(255 * i / steps)
            colour[ramp_channel] = ramp if rising else 255 - ramp
            wheel.append(colour)
    return np.array(wheel) / 255


_WHEEL = _colour_wheel()


def flow_to_color(offsets: Tensor | np.ndarray, max_magnitude: float | None = None) -> Image.Image:
    """Colour-code an offset field ``[2, H, W]`` (dx, dy) with the Middlebury flow wheel.

    Direction sets the hue (right = red, down = yellow-orange, left = cyan-blue, up = blue-magenta) and
    length over ``max_magnitude`` the saturation (default: the field's longest offset); 0 is white,
    offsets longer than ``max_magnitude`` are drawn darker.
    """
    field = offsets.detach().float().cpu().numpy() if isinstance(offsets, Tensor) else np.asarray(offsets, dtype=np.float64)
    if field.ndim != 3 or field.shape[0] != 2:
        raise ValueError(f"offsets must be [2, H, W] (dx, dy), got shape {field.shape}")
    dx, dy = np.nan_to_num(field[0]), np.nan_to_num(field[1])
    radius = np.hypot(dx, dy)
    if max_magnitude is None:
        max_magnitude = float(radius.max())
    if max_magnitude < 0:
        raise ValueError(f"max_magnitude must be >= 0, got {max_magnitude}")
    scale = max_magnitude if max_magnitude > 0 else 1.0
    radius = radius / scale
    n = len(_WHEEL)
    position = (np.arctan2(-dy, -dx) / np.pi + 1) / 2 * (n - 1)  # 0..n-1 around the wheel
    k0 = np.floor(position).astype(int) % n
    k1 = (k0 + 1) % n
    frac = (position - np.floor(position))[..., None]
    hue = (1 - frac) * _WHEEL[k0] + frac * _WHEEL[k1]
    inside = (radius <= 1)[..., None]
    colour = np.where(inside, 1 - radius[..., None] * (1 - hue), hue * 0.75)
    return Image.fromarray(np.round(255 * colour).astype(np.uint8))


def flow_legend(size: int = 65) -> Image.Image:
    """The colour wheel itself: the colour of each offset direction and length, centre = no shift."""
    centre = (size - 1) / 2
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    field = np.stack([xs - centre, ys - centre])
    picture = np.asarray(flow_to_color(field, max_magnitude=centre)).copy()
    picture[np.hypot(*field) > centre] = 255
    return Image.fromarray(picture)


def _load_normalised(image: str | Path | Image.Image | Tensor, mean, std) -> tuple[Tensor, Image.Image | None]:
    """(normalised Tensor[1, 3, H, W], the PIL photo if one was given or read)."""
    if isinstance(image, Tensor):
        batch = image.unsqueeze(0) if image.dim() == 3 else image
        if batch.dim() != 4 or batch.shape[:2] != (1, 3):
            raise ValueError(f"image tensor must be a normalised Tensor[3, H, W] or Tensor[1, 3, H, W], got {tuple(image.shape)}")
        return batch.float(), None
    photo = read_rgb_image(image) if not isinstance(image, Image.Image) else image.convert("RGB")
    pixels = torch.from_numpy(np.array(photo, dtype=np.uint8)).permute(2, 0, 1)
    return Normalize(mean, std)(pixels).unsqueeze(0), photo


def list_images(image_dir: str | Path, exclude: str | Path | None = None) -> list[Path]:
    """Image files under ``image_dir`` (subfolders included, but nothing under ``exclude``), sorted."""
    folder = Path(image_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"image_dir {folder} is not a directory")
    skip = Path(exclude).resolve() if exclude is not None else None
    found = []
    for path in folder.rglob("*"):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        if skip is not None and path.resolve().is_relative_to(skip):
            continue
        found.append(path)
    return sorted(found)


def find_images(source: str | Path, exclude: str | Path | None = None) -> tuple[Path, list[Path]]:
    """(root, images): one image file (root = its folder), or every image under a folder but ``exclude``."""
    source = Path(source)
    if source.is_file():
        return source.parent, [source]
    if not source.exists():
        raise FileNotFoundError(f"--input {source} does not exist")
    if exclude is not None and Path(exclude).resolve() == source.resolve():
        exclude = None  # the output is the input folder itself: refused later, with that reason
    images = list_images(source, exclude)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {source}")
    return source, images


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


def prepare_output_dir(out_dir: str | Path, root: Path, images: Sequence[Path], targets: Sequence[Path], overwrite: bool) -> Path:
    """Check (before any inference) that ``out_dir`` can take ``targets``, then create it.

    Refused with ``ValueError``: ``out_dir`` is a file or not writable; it is the input folder itself;
    a target is one of the input ``images``; a target exists and ``overwrite`` is off.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--output {out_dir} is a file; give a folder to write into")
    if len(images) > 1 and out_dir.resolve() == root.resolve():
        raise ValueError(f"--output {out_dir} is the input folder; give a separate folder (it may be inside the input folder)")
    inputs = {p.resolve() for p in images}
    for target in targets:
        if target.resolve() in inputs:
            raise ValueError(f"refusing to write {target}: it is one of the input images")
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


@dataclass
class PredictionRun:
    """What :func:`predict_folder` / :func:`offsets_for_images` did: files written per image, images that failed."""

    written: list[tuple[Path, ...]] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{len(self.written)} images done, {len(self.failed)} failed"
        return text + "".join(f"\n  {path}: {why}" for path, why in self.failed)


def predict_folder(
    model: nn.Module,
    image_dir: str | Path,
    out_dir: str | Path,
    palette: str | np.ndarray = "cityscapes",
    mode: str = "whole",
    tile: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    scales: Sequence[float] | None = None,
    flip: bool = False,
    alpha: float = 0.5,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    device: torch.device | str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> PredictionRun:
    """Segment one image file or every image under a folder; write ``{name}.png`` (palette PNG of class ids)
    and ``{name}_overlay.jpg`` under ``out_dir``, keeping subfolders (names: :func:`output_stems`).

    ``out_dir`` is left out of the scan and checked before any inference (:func:`prepare_output_dir`).
    An image that cannot be read is logged with its path and listed in ``failed``; the rest go on.
    The inference setting is as in :func:`alignseg.evaluation.evaluate`.
    """
    setting = build_inference_mode(mode, tile=tile, stride=stride, scales=scales, flip=flip)
    colours = get_palette(palette)
    out_dir = Path(out_dir)
    root, images = find_images(image_dir, exclude=out_dir)
    stems = output_stems(images, root)
    targets = {path: (out_dir / f"{stem}.png", out_dir / f"{stem}_overlay.jpg") for path, stem in stems.items()}
    prepare_output_dir(out_dir, root, images, [t for pair in targets.values() for t in pair], overwrite)
    device = torch.device(device) if device is not None else model_device(model)
    log.info("predicting %d images from %s into %s, mode: %s", len(images), image_dir, out_dir, setting)
    run = PredictionRun()
    was_training = model.training
    model.eval()
    try:
        for path in tqdm(images, desc=f"predict [{setting}]", unit="img", disable=not progress):
            try:
                batch, photo = _load_normalised(path, mean, std)
            except DataFileError as err:
                log.error("skipped: %s", err)
                run.failed.append((path, str(err)))
                continue
            prediction = infer(model, batch.to(device), setting).argmax(1)[0].cpu()
            if int(prediction.max()) >= len(colours):
                raise ValueError(f"the model predicts class {int(prediction.max())} but the palette has {len(colours)} colours")
            label_path, overlay_path = targets[path]
            label_path.parent.mkdir(parents=True, exist_ok=True)
            colorize(prediction, colours).save(label_path)
            overlay(photo, prediction, alpha, colours).save(overlay_path, quality=90)
            run.written.append((label_path, overlay_path))
    finally:
        model.train(was_training)
    return run


def offsets_for_images(
    model: nn.Module,
    source: str | Path,
    out_dir: str | Path,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
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
            written = render_offsets(model, path, folders[path], mean, std, device)
        except DataFileError as err:
            log.error("skipped: %s", err)
            run.failed.append((path, str(err)))
            continue
        run.written.append(tuple(written.values()))
    return run


def _file_name(module_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", module_name) or "offsets"


def render_offsets(
    model: nn.Module,
    image: str | Path | Image.Image | Tensor,
    out_dir: str | Path,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    device: torch.device | str | None = None,
    max_magnitude: float | None = None,
) -> dict[str, Path]:
    """Write one flow-colour picture per alignment module of ``model`` for one image; returns name -> path.

    ``model.forward_offsets(images)`` must return ``{module name: Tensor[1, 4 or 2, h, w]}``. An AlignFA
    field (4 channels) is drawn as two panels side by side, the shift of the coarse map (channels 0-1)
    then of the fine map (2-3), on one colour scale; an AlignCM field (2 channels) as one panel. Panels
    are enlarged to the image size (nearest neighbour). The colour scale is the module's longest offset
    unless ``max_magnitude`` is given. ``offsets_legend.png`` (the colour wheel) and ``input.png`` (when
    the image is a file or PIL image) are written too.
    """
    if not callable(getattr(model, "forward_offsets", None)):
        raise TypeError(f"{type(model).__name__} has no forward_offsets(images) method returning the offset fields")
    device = torch.device(device) if device is not None else model_device(model)
    batch, photo = _load_normalised(image, mean, std)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            fields = model.forward_offsets(batch.to(device))
    finally:
        model.train(was_training)
    if not isinstance(fields, Mapping) or not fields:
        raise ValueError(f"forward_offsets must return a non-empty dict of offset tensors, got {type(fields).__name__}")
    height, width = batch.shape[-2:]
    written = {}
    for name, offsets in fields.items():
        if not isinstance(offsets, Tensor) or offsets.dim() != 4 or offsets.shape[1] not in (2, 4):
            got = tuple(offsets.shape) if isinstance(offsets, Tensor) else type(offsets).__name__
            raise ValueError(f"offsets of {name!r} must be Tensor[N, 4 or 2, h, w], got {got}")
        field = offsets[0].float().cpu()
        panels = [field[0:2], field[2:4]] if field.shape[0] == 4 else [field]
        scale = max_magnitude
        if scale is None:  # one scale for both panels of a module, so their colours compare
            scale = max(float(torch.linalg.vector_norm(p, dim=0).max()) for p in panels)
        pictures = [flow_to_color(p, scale).resize((width, height), Image.NEAREST) for p in panels]
        gap = 8
        canvas = Image.new("RGB", (len(pictures) * width + (len(pictures) - 1) * gap, height), (255, 255, 255))
        for i, picture in enumerate(pictures):
            canvas.paste(picture, (i * (width + gap), 0))
        path = out_dir / f"{_file_name(name)}.png"
        canvas.save(path)
        written[name] = path
        log.info("%s: offsets drawn to %s (colour scale: %.2f px at full saturation)", name, path, scale)
    flow_legend().save(out_dir / "offsets_legend.png")
    if photo is not None:
        photo.save(out_dir / "input.png")
    return written
