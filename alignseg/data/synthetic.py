"""A deterministic synthetic street-scene dataset written in the Cityscapes layout.

Each image is a procedurally drawn street: sky with a gradient, buildings with window grids, trees with
leafy texture, a road in perspective with lane marks, tiled sidewalks, thin poles, cars and people, an
occasional ego-vehicle strip (void, so ignored), global lighting changes and pixel noise. Labels are real
Cityscapes label ids of 8 classes (road, sidewalk, building, pole, vegetation, sky, person, car), written as
``*_gtFine_labelIds.png`` so training goes through the same loader and id mapping as real Cityscapes.
Classes differ in colour *and* texture, and colours overlap (grey poles against grey buildings, cars of
any colour), so the task is learnable but not trivial.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .cityscapes import IMAGE_SUFFIX, LABEL_ID_SUFFIX
from .metainfo import CITYSCAPES_ID_TO_TRAIN_ID, CITYSCAPES_NAME_TO_ID

log = logging.getLogger(__name__)

# Cityscapes label ids used by the generator.
ROAD, SIDEWALK, BUILDING, POLE, VEGETATION, SKY, PERSON, CAR, EGO_VEHICLE = (
    CITYSCAPES_NAME_TO_ID[name]
    for name in ("road", "sidewalk", "building", "pole", "vegetation", "sky", "person", "car", "ego vehicle")
)
SYNTHETIC_LABEL_IDS = (ROAD, SIDEWALK, BUILDING, POLE, VEGETATION, SKY, PERSON, CAR)
SYNTHETIC_TRAIN_IDS = tuple(sorted(CITYSCAPES_ID_TO_TRAIN_ID[i] for i in SYNTHETIC_LABEL_IDS))

CITY = "synthetic"
_MARKER = ".alignseg_synthetic.json"
_VERSION = 1


def _draw_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (uint8 image [H, W, 3], uint8 Cityscapes label ids [H, W])."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), np.float32)
    label = np.full((height, width), SKY, np.uint8)
    grain = rng.standard_normal((height, width, 1), np.float32)  # shared pixel-noise field
    leaves = rng.standard_normal((height, width, 1), np.float32) * 28

    # Objects are drawn inside their bounding box only: the whole image is touched a few times, not per object.
    def box(top, bottom, left, right):
        y0, y1 = max(int(np.floor(top)), 0), min(int(np.ceil(bottom)), height)
        x0, x1 = max(int(np.floor(left)), 0), min(int(np.ceil(right)), width)
        return (slice(y0, max(y0, y1)), slice(x0, max(x0, x1)))

    def paint(where, mask, label_id, colour) -> None:
        label[where][mask] = label_id
        image[where][mask] = np.broadcast_to(colour, mask.shape + (3,))[mask]

    horizon = rng.uniform(0.38, 0.52) * height
    # Sky: vertical blue gradient with a per-image tint.
    sky_top = np.array([60, 110, 190]) + rng.uniform(-20, 20, 3)
    sky_bottom = np.array([170, 200, 230]) + rng.uniform(-20, 20, 3)
    t = (rows / max(horizon, 1.0))[..., None]
    image[:] = sky_top * (1 - t) + sky_bottom * t

    # Buildings: rectangles standing on the horizon, with a grid of dark windows.
    x = rng.uniform(-0.1, 0.1) * width
    while x < width:
        w = rng.uniform(0.12, 0.3) * width
        top = rng.uniform(0.05, 0.8) * horizon
        where = box(top, horizon + 2, x, x + w)
        r, c = rows[where], cols[where]
        base = rng.uniform(90, 170) + rng.uniform(-25, 25, 3)
        period_y, period_x = rng.integers(5, 9), rng.integers(5, 9)
        window = ((r - top) % period_y < period_y / 2) & ((c - x) % period_x < period_x / 2) & (r > top + 2)
        if rng.random() < 0.85:
            paint(where, np.ones_like(r, bool), BUILDING, base - 55 * window[..., None] + 6 * grain[where])
        x += w + rng.uniform(0.0, 0.12) * width

    # Ground: a road in perspective, sidewalks on both sides with a tile pattern.
    where = box(horizon, height, 0, width)
    r, c = rows[where], cols[where]
    depth = (r - horizon) / max(height - horizon, 1.0)  # 0 at the horizon, 1 at the bottom
    centre = width * rng.uniform(0.35, 0.65)  # the road's centre line
    road = np.abs(c - centre) < width * (0.04 + rng.uniform(0.35, 0.5) * depth)
    tile = ((r * (1 + 3 * depth)).astype(int) % 6 == 0) | ((c / (1 + 0.5 * (1 - depth))).astype(int) % 9 == 0)
    sidewalk_colour = np.array([170, 140, 150]) + rng.uniform(-20, 20, 3)
    paint(where, ~road, SIDEWALK, sidewalk_colour - 35 * tile[..., None] + 5 * grain[where])
    marks = road & (np.abs(c - centre) < 0.6 + 1.5 * depth) & ((r * 0.5).astype(int) % 4 < 2)
    road_colour = rng.uniform(60, 100) + rng.uniform(-6, 6, 3)
    paint(where, road, ROAD, road_colour + 4 * grain[where] + 150 * marks[..., None])

    # Trees: round crowns of leafy noise, mostly near the horizon.
    for _ in range(rng.integers(1, 5)):
        cy, cx = horizon * rng.uniform(0.55, 1.05), rng.uniform(0, width)
        ry, rx = height * rng.uniform(0.06, 0.16), width * rng.uniform(0.03, 0.09)
        where = box(cy - ry, cy + ry + 1, cx - rx, cx + rx + 1)
        crown = ((rows[where] - cy) / ry) ** 2 + ((cols[where] - cx) / rx) ** 2 <= 1
        paint(where, crown, VEGETATION, leaves[where] + np.array([50, 120, 35]) + rng.uniform(-15, 15, 3))

    # Cars on the road: boxes, larger when nearer, with dark wheels and windows.
    for _ in range(rng.integers(0, 4)):
        d = rng.uniform(0.15, 0.9)
        y_bottom = horizon + d * (height - horizon)
        car_h, car_w = (0.05 + 0.2 * d) * height, (0.07 + 0.25 * d) * width
        cx = centre + rng.uniform(-0.8, 0.8) * width * (0.04 + 0.4 * d)
        where = box(y_bottom - car_h, y_bottom, cx - car_w / 2, cx + car_w / 2)
        r, c = rows[where], cols[where]
        colour = rng.choice(
            [[200, 30, 30], [30, 50, 180], [230, 230, 230], [25, 25, 25], [120, 120, 130], [200, 180, 40]]
        )
        colour = np.asarray(colour, np.float32) + rng.uniform(-20, 20, 3)
        windows = (r < y_bottom - 0.6 * car_h) & (np.abs(c - cx) < 0.35 * car_w)
        wheels = (r > y_bottom - 0.2 * car_h) & (np.abs(np.abs(c - cx) - 0.3 * car_w) < 0.1 * car_w)
        paint(
            where, np.ones_like(r, bool), CAR, colour - 0.7 * colour * (windows | wheels)[..., None] + 5 * grain[where]
        )

    # People on the sidewalks: narrow figures with a head and clothing of a random colour.
    for _ in range(rng.integers(0, 5)):
        d = rng.uniform(0.1, 0.9)
        y_feet = horizon + d * (height - horizon)
        p_h, p_w = (0.08 + 0.25 * d) * height, (0.015 + 0.04 * d) * width
        cx = centre + rng.choice([-1, 1]) * (width * (0.04 + 0.45 * d) + rng.uniform(0.02, 0.15) * width)
        where = box(y_feet - p_h, y_feet, cx - p_w / 2, cx + p_w / 2)
        r, c = rows[where], cols[where]
        body = (r >= y_feet - 0.82 * p_h) & (np.abs(c - cx) < p_w / 2)
        head = ((r - (y_feet - 0.9 * p_h)) / (0.1 * p_h)) ** 2 + ((c - cx) / (0.35 * p_w)) ** 2 <= 1
        paint(where, body, PERSON, rng.uniform(20, 230, 3) + 8 * grain[where])
        paint(where, head, PERSON, np.array([225, 180, 150]) + rng.uniform(-30, 20, 3))

    # Poles: thin vertical lines (1-2 px) from the sidewalk up above the horizon, grey like buildings.
    for _ in range(rng.integers(1, 4)):
        d = rng.uniform(0.05, 0.7)
        y_base = horizon + d * (height - horizon)
        x = centre + rng.choice([-1, 1]) * width * (0.06 + 0.45 * d + rng.uniform(0.0, 0.08))
        where = box(y_base - (0.35 + 0.5 * d) * height, y_base + 1, x, x + 1 + int(d > 0.35))
        pole = np.ones(label[where].shape, bool)
        paint(where, pole, POLE, rng.uniform(100, 160) + rng.uniform(-8, 8, 3) + 3 * grain[where])

    # Sometimes the ego vehicle's bonnet at the bottom: void (mapped to ignore).
    if rng.random() < 0.3:
        where = box(height * 0.8, height, 0, width)
        bonnet = rows[where] >= height * (1 - rng.uniform(0.04, 0.1)) - 6 * np.sin(np.pi * cols[where] / width)
        paint(where, bonnet, EGO_VEHICLE, np.array([30, 30, 35]) + 3 * grain[where])

    image = image * rng.uniform(0.7, 1.2) + rng.uniform(-20, 20) + 7 * rng.standard_normal(image.shape, np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), label


def make_synthetic_cityscapes(
    root: str | Path,
    num_train: int = 160,
    num_val: int = 40,
    size: tuple[int, int] = (128, 256),
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write the synthetic dataset under ``root`` in the Cityscapes layout and return ``root``.

    The images depend only on ``(seed, split, index, size)``. Idempotent: when ``root`` already holds a
    complete dataset made with the same arguments, nothing is written. Read it back with
    ``CityscapesDataset(root, "train")`` / ``"val"``: 19 train ids, of which 8 occur
    (:data:`SYNTHETIC_TRAIN_IDS`).
    """
    height, width = size
    if height < 16 or width < 16:
        raise ValueError(f"size must be (height, width) with both >= 16, got {size!r}")
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train} and {num_val}")
    root = Path(root)
    settings = {"version": _VERSION, "num_train": num_train, "num_val": num_val, "size": [height, width], "seed": seed}
    marker = root / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        log.info("synthetic dataset already complete in %s, not rewriting it", root)
        return root
    marker.unlink(missing_ok=True)
    log.info("writing the synthetic Cityscapes-layout dataset (%d train + %d val images of %dx%d) to %s",
             num_train, num_val, width, height, root)  # fmt: skip
    jobs = [("train", i) for i in range(num_train)] + [("val", i) for i in range(num_val)]
    for split in ("train", "val"):
        for kind in ("leftImg8bit", "gtFine"):
            folder = root / kind / split / CITY
            shutil.rmtree(folder, ignore_errors=True)  # files of an earlier run with other settings
            folder.mkdir(parents=True)
    for split, index in tqdm(jobs, desc="synthetic dataset", unit="img", disable=not progress):
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, index])
        image, label = _draw_scene(rng, height, width)
        stem = f"{CITY}_{index:06d}_000019"
        Image.fromarray(image).save(root / "leftImg8bit" / split / CITY / (stem + IMAGE_SUFFIX), compress_level=1)
        Image.fromarray(label).save(root / "gtFine" / split / CITY / (stem + LABEL_ID_SUFFIX), compress_level=1)
    marker.write_text(json.dumps(settings))  # last, so an interrupted run is redone
    return root
