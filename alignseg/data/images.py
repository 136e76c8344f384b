"""Reading image files into 8-bit RGB, the one way every part of alignseg does it.

Pillow's ``convert("RGB")`` clips 16-bit pixels to 255 (a 16-bit photo turns white), so 16-bit modes
are rescaled here (``v / 257``: 65535 -> 255); modes with no faithful RGB meaning are refused by name.
Every failure is a :class:`DataFileError` naming the file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Modes Pillow converts to RGB without loss of meaning (alpha is dropped; palettes are looked up).
CONVERTIBLE_MODES = ("1", "L", "P", "RGB", "RGBA", "RGBX", "LA", "PA", "La", "RGBa", "CMYK", "YCbCr")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

log = logging.getLogger(__name__)


class DataFileError(ValueError):
    """An image or label file that cannot be read or used; the message names the file and says why."""


def read_rgb_image(path: str | Path, say: bool = False) -> Image.Image:
    """The image at ``path`` as an 8-bit RGB PIL image, fully decoded (a truncated file fails here).

    Grey 16-bit images (modes ``I;16*``, and ``I`` with values up to 65535) are rescaled to 8 bits.
    ``say``: log a conversion from another mode (grey, RGBA, palette, ...).
    """
    path = Path(path)
    try:
        with Image.open(path) as raw:
            raw.load()
            return to_rgb(raw, path, say)
    except DataFileError:
        raise
    except FileNotFoundError:
        raise DataFileError(f"image file {path} does not exist") from None
    except UnidentifiedImageError:
        raise DataFileError(f"cannot read image file {path}: not an image format Pillow knows") from None
    except (OSError, ValueError, SyntaxError) as err:  # truncated or damaged data
        raise DataFileError(f"cannot read image file {path}: {err}") from None


def to_rgb(image: Image.Image, path: str | Path = "<image>", say: bool = False) -> Image.Image:
    """``image`` as 8-bit RGB; 16-bit grey rescaled, unsupported modes refused naming ``path``.

    ``say``: log a conversion from another mode."""
    if say and image.mode != "RGB" and image.mode in CONVERTIBLE_MODES + SIXTEEN_BIT_MODES:
        what = "alpha dropped" if "A" in image.mode or image.mode in ("RGBa", "La", "PA") else "converted"
        log.info("%s: pixel mode %s read as RGB (%s)", path, image.mode, what)
    if image.mode in CONVERTIBLE_MODES:
        return image.convert("RGB")
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DataFileError(
                f"image file {path}: mode {image.mode} with values outside 0..65535 is not a picture alignseg reads"
            )
        grey = np.round(values / 257).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    raise DataFileError(
        f"image file {path} has pixel mode {image.mode!r}, which alignseg does not convert to RGB; save it as 8-bit "
        f"RGB or greyscale (supported modes: {', '.join(CONVERTIBLE_MODES + SIXTEEN_BIT_MODES)})"
    )


def read_label_array(path: str | Path) -> np.ndarray:
    """The raw values of a single-channel label file, fully decoded; a :class:`DataFileError` names the file."""
    path = Path(path)
    try:
        with Image.open(path) as raw:
            raw.load()
            array = np.asarray(raw)
    except FileNotFoundError:
        raise DataFileError(f"label file {path} does not exist") from None
    except UnidentifiedImageError:
        raise DataFileError(f"cannot read label file {path}: not an image format Pillow knows") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise DataFileError(f"cannot read label file {path}: {err}") from None
    if array.ndim != 2:
        raise DataFileError(
            f"label file {path} must be a single-channel image of class ids, got shape {array.shape} "
            f"(a colour-coded mask needs converting to ids first)"
        )
    return array


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
