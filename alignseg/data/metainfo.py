"""The facts of each dataset, in one place: class names, palette, ignore index, label mapping.

Every other module (the loaders, the evaluation table, the palettes of ``visualize``, the benchmark-server
writers of :mod:`alignseg.data.formats`) reads them from here, as MMSegmentation datasets read their
``METAINFO``. A :class:`DatasetMeta` per dataset; :func:`get_metainfo` by name.

* Cityscapes (Cordts et al., CVPR 2016): the full label table of the official ``cityscapesscripts``
  (``cityscapesscripts/helpers/labels.py``, release 2.3.0), written here as data: 34 label ids, of which
  19 are evaluated and carry train ids 0..18; the others are void (255) in training and ignored by the
  official evaluator. Label files and benchmark submissions use label ids, the network train ids.
* ADE20K (SceneParsing150, Zhou et al., CVPR 2017): 150 classes; annotation value ``i + 1`` is class ``i``
  and 0 is "other" (ignored), in the label files and in benchmark submissions alike.
* synthetic: written in the Cityscapes layout with Cityscapes label ids, so it is Cityscapes.
* folder: ``num_classes`` and the names are the user's; the palette is :func:`generic_palette`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = 255  # the train id of pixels that are not scored (void, "other", padding)


def generic_palette(num_classes: int = 256) -> np.ndarray:
    """``uint8 [num_classes, 3]``: class ``i`` gets the PASCAL VOC bit-interleaved colour of ``i + 1`` (never black)."""
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for i in range(num_classes):
        code, colour = i + 1, [0, 0, 0]
        for bit in range(7, -1, -1):
            for channel in range(3):
                colour[channel] |= ((code >> channel) & 1) << bit
            code >>= 3
        palette[i] = colour
    return palette


@dataclass(frozen=True)
class CityscapesLabel:
    """One row of the official Cityscapes label table."""

    name: str
    id: int  # the value in ``*_gtFine_labelIds.png`` and in benchmark submissions
    train_id: int  # 0..18, or IGNORE_INDEX for classes that are not evaluated
    category: str
    has_instances: bool
    ignore_in_eval: bool
    color: tuple[int, int, int]


def _cityscapes_table() -> tuple[CityscapesLabel, ...]:
    # Transcribed from cityscapesscripts/helpers/labels.py (cityscapesscripts 2.3.0): name, id, trainId,
    # category, hasInstances, ignoreInEval, color. 'license plate' (id -1) is left out: it never occurs in
    # label files. tests/test_data_metainfo.py compares this table with the installed package when present.
    V = IGNORE_INDEX
    rows = [
        ("unlabeled", 0, V, "void", False, True, (0, 0, 0)),
        ("ego vehicle", 1, V, "void", False, True, (0, 0, 0)),
        ("rectification border", 2, V, "void", False, True, (0, 0, 0)),
        ("out of roi", 3, V, "void", False, True, (0, 0, 0)),
        ("static", 4, V, "void", False, True, (0, 0, 0)),
        ("dynamic", 5, V, "void", False, True, (111, 74, 0)),
        ("ground", 6, V, "void", False, True, (81, 0, 81)),
        ("road", 7, 0, "flat", False, False, (128, 64, 128)),
        ("sidewalk", 8, 1, "flat", False, False, (244, 35, 232)),
        ("parking", 9, V, "flat", False, True, (250, 170, 160)),
        ("rail track", 10, V, "flat", False, True, (230, 150, 140)),
        ("building", 11, 2, "construction", False, False, (70, 70, 70)),
        ("wall", 12, 3, "construction", False, False, (102, 102, 156)),
        ("fence", 13, 4, "construction", False, False, (190, 153, 153)),
        ("guard rail", 14, V, "construction", False, True, (180, 165, 180)),
        ("bridge", 15, V, "construction", False, True, (150, 100, 100)),
        ("tunnel", 16, V, "construction", False, True, (150, 120, 90)),
        ("pole", 17, 5, "object", False, False, (153, 153, 153)),
        ("polegroup", 18, V, "object", False, True, (153, 153, 153)),
        ("traffic light", 19, 6, "object", False, False, (250, 170, 30)),
        ("traffic sign", 20, 7, "object", False, False, (220, 220, 0)),
        ("vegetation", 21, 8, "nature", False, False, (107, 142, 35)),
        ("terrain", 22, 9, "nature", False, False, (152, 251, 152)),
        ("sky", 23, 10, "sky", False, False, (70, 130, 180)),
        ("person", 24, 11, "human", True, False, (220, 20, 60)),
        ("rider", 25, 12, "human", True, False, (255, 0, 0)),
        ("car", 26, 13, "vehicle", True, False, (0, 0, 142)),
        ("truck", 27, 14, "vehicle", True, False, (0, 0, 70)),
        ("bus", 28, 15, "vehicle", True, False, (0, 60, 100)),
        ("caravan", 29, V, "vehicle", True, True, (0, 0, 90)),
        ("trailer", 30, V, "vehicle", True, True, (0, 0, 110)),
        ("train", 31, 16, "vehicle", True, False, (0, 80, 100)),
        ("motorcycle", 32, 17, "vehicle", True, False, (0, 0, 230)),
        ("bicycle", 33, 18, "vehicle", True, False, (119, 11, 32)),
    ]
    return tuple(CityscapesLabel(*row) for row in rows)


CITYSCAPES_LABELS = _cityscapes_table()
_EVALUATED = sorted(
    (label for label in CITYSCAPES_LABELS if label.train_id != IGNORE_INDEX), key=lambda label: label.train_id
)
CITYSCAPES_CLASSES = tuple(label.name for label in _EVALUATED)  # train id -> name
# Label id -> train id for the 19 evaluated ids; every other id 0..33 is void (IGNORE_INDEX).
CITYSCAPES_ID_TO_TRAIN_ID = {label.id: label.train_id for label in _EVALUATED}
CITYSCAPES_TRAIN_ID_TO_ID = tuple(label.id for label in _EVALUATED)  # train id -> label id, for submissions
CITYSCAPES_NAME_TO_ID = {label.name: label.id for label in CITYSCAPES_LABELS}
CITYSCAPES_PALETTE = np.array([label.color for label in _EVALUATED], dtype=np.uint8)  # [19, 3]

# ADE20K: the benchmark's 150 class names (objectInfo150), shortened to their first synonym.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)  # fmt: skip
ADE20K_OTHER = 0  # annotation value of "other" (not scored); class i is stored as i + 1
# Not the colour table of the ADE20K toolkit: the generic palette, distinct colours for 150 classes.
ADE20K_PALETTE = generic_palette(len(ADE20K_CLASSES))


@dataclass(frozen=True, eq=False)
class DatasetMeta:
    """The facts of one dataset: ``classes[i]`` and ``palette[i]`` (``uint8 [K, 3]``) belong to train id ``i``.

    ``label_format`` says how label files (and benchmark submissions) store classes, in words.
    """

    name: str
    classes: tuple[str, ...]
    palette: np.ndarray
    label_format: str
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self):
        if self.palette.shape != (len(self.classes), 3) or self.palette.dtype != np.uint8:
            raise ValueError(
                f"{self.name}: palette must be uint8 [{len(self.classes)}, 3], "
                f"got {self.palette.dtype} {self.palette.shape}"
            )
        self.palette.setflags(write=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


CITYSCAPES_META = DatasetMeta(
    "cityscapes", CITYSCAPES_CLASSES, CITYSCAPES_PALETTE,
    "Cityscapes label ids 0..33 (*_gtFine_labelIds.png), 19 of them evaluated; or train ids (*_labelTrainIds.png)",
)  # fmt: skip
ADE20K_META = DatasetMeta("ade20k", ADE20K_CLASSES, ADE20K_PALETTE, "class index + 1, 0 = other (ignored)")
SYNTHETIC_META = DatasetMeta("synthetic", CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, CITYSCAPES_META.label_format)

METAINFO: dict[str, DatasetMeta] = {meta.name: meta for meta in (CITYSCAPES_META, ADE20K_META, SYNTHETIC_META)}


def folder_meta(num_classes: int, class_names: Sequence[str] | None = None) -> DatasetMeta:
    """The facts of a folder dataset: the user's class names (default ``class_0, ...``), the generic palette."""
    if not isinstance(num_classes, int) or not 1 <= num_classes < IGNORE_INDEX:
        raise ValueError(f"num_classes must be an integer in [1, {IGNORE_INDEX}), got {num_classes!r}")
    names = tuple(class_names) if class_names is not None else tuple(f"class_{i}" for i in range(num_classes))
    if len(names) != num_classes:
        raise ValueError(f"class_names must have num_classes={num_classes} entries, got {len(names)}")
    return DatasetMeta("folder", names, generic_palette(num_classes), f"train ids 0..{num_classes - 1}, 255 = ignore")


def get_metainfo(name: str, num_classes: int | None = None) -> DatasetMeta:
    """The :class:`DatasetMeta` of dataset ``name`` (``cityscapes``, ``ade20k``, ``synthetic``, ``folder``).

    ``folder`` needs ``num_classes``; for the others ``num_classes``, when given, must match.
    """
    key = name.strip().lower()
    if key == "folder":
        if num_classes is None:
            raise ValueError("the folder dataset's metainfo needs num_classes")
        return folder_meta(num_classes)
    if key not in METAINFO:
        raise ValueError(f"dataset name must be one of {sorted([*METAINFO, 'folder'])}, got {name!r}")
    meta = METAINFO[key]
    if num_classes is not None and num_classes != meta.num_classes:
        raise ValueError(f"{key} has {meta.num_classes} classes, got num_classes={num_classes}")
    return meta


# --- label mappings -------------------------------------------------------------------------------------


def lookup_table(mapping: dict[int, int], invalid: int = -1) -> np.ndarray:
    """A 256-entry table from raw 8-bit label values to train ids; unlisted values map to ``invalid``."""
    table = np.full(256, invalid, dtype=np.int64)
    for raw, train_id in mapping.items():
        table[raw] = train_id
    return table


# 256 entries: label id -> train id; ids 0..33 not evaluated and 255 -> IGNORE_INDEX, 34..254 -> -1 (invalid).
_ID_TO_TRAIN = lookup_table(
    {**{i: IGNORE_INDEX for i in range(34)}, **CITYSCAPES_ID_TO_TRAIN_ID, IGNORE_INDEX: IGNORE_INDEX}
)
_TRAIN_TO_ID = np.array(CITYSCAPES_TRAIN_ID_TO_ID, dtype=np.uint8)


def cityscapes_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map an array of Cityscapes label ids (0..33) to train ids (int64: 0..18, 255 = ignore).

    Values that are not Cityscapes label ids (34..254, negative, > 255) map to -1, for the caller to report.
    """
    if label_ids.dtype == np.uint8:
        return _ID_TO_TRAIN[label_ids]
    ids = label_ids.astype(np.int64)  # e.g. a 16-bit PNG
    return np.where((ids >= 0) & (ids <= 255), _ID_TO_TRAIN[np.clip(ids, 0, 255)], -1)


def _check_train_ids(train_ids: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    array = np.asarray(train_ids)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{what} must hold integer train ids, got dtype {array.dtype}")
    bad = (array < 0) | (array >= num_classes)
    if bad.any():
        raise ValueError(
            f"{what} holds values outside the train ids [0, {num_classes}): {np.unique(array[bad])[:10].tolist()}"
        )
    return array


def train_ids_to_cityscapes_ids(train_ids: np.ndarray) -> np.ndarray:
    """Map predicted train ids (0..18) to Cityscapes label ids (uint8), as the benchmark server expects.

    Raises ``ValueError`` on any other value (255 included: a prediction has no ignore pixels).
    """
    return _TRAIN_TO_ID[_check_train_ids(train_ids, len(CITYSCAPES_CLASSES), "train_ids")]


def ade20k_to_train_ids(raw: np.ndarray) -> np.ndarray:
    """ADE20K annotation values (0 = other, ``i + 1`` = class ``i``) -> train ids (int64, other -> 255).

    Values above 150 or below 0 are left as they are, for the caller to report.
    """
    raw = raw.astype(np.int64)
    return np.where(raw == ADE20K_OTHER, IGNORE_INDEX, raw - 1)


def train_ids_to_ade20k(train_ids: np.ndarray) -> np.ndarray:
    """Predicted train ids (0..149) -> ADE20K values ``train_id + 1`` (uint8; 0 = other is never predicted)."""
    return (_check_train_ids(train_ids, len(ADE20K_CLASSES), "train_ids") + 1).astype(np.uint8)
