"""IDRiD (Indian Diabetic Retinopathy Image Dataset; Porwal et al., Data 3(3):25, 2018) -> COCO.

The dataset is published in three parts; a root may hold any of them::

    A. Segmentation/1. Original Images/{a. Training Set,b. Testing Set}/IDRiD_01.jpg
    A. Segmentation/2. All Segmentation Groundtruths/{a. Training Set,b. Testing Set}/
        1. Microaneurysms/IDRiD_01_MA.tif  2. Haemorrhages/IDRiD_01_HE.tif
        3. Hard Exudates/IDRiD_01_EX.tif   4. Soft Exudates/IDRiD_01_SE.tif
        5. Optic Disc/IDRiD_01_OD.tif
    B. Disease Grading/1. Original Images/{a. Training Set,b. Testing Set}/IDRiD_001.jpg
    B. Disease Grading/2. Groundtruths/a. IDRiD_Disease Grading_Training Labels.csv
                                       b. IDRiD_Disease Grading_Testing Labels.csv
    C. Localization/1. Original Images/{a. Training Set,b. Testing Set}/IDRiD_001.jpg
    C. Localization/2. Groundtruths/1. Optic Disc Center Location/
                                        a. IDRiD_OD_Center_Training Set_Markups.csv, b. ...
                                    2. Fovea Center Location/
                                        a. IDRiD_Fovea_Center_Training Set_Markups.csv, b. ...

Part A becomes the "seg" task (``train.json``, ``val.json``, ``test.json``). A lesion type absent from an image
has no mask file at all, so a missing file means the lesion is absent. Masks are TIFFs with the
lesion in the red channel; :func:`~.base.read_mask` takes the channel maximum, so they read as
255 and not as the 76 a grey conversion gives.

Parts B and C become the "grading" task (``grading/{train,val,test}.json``): B's images
(C's when only C is present), each with the fields its CSV rows give: ``dr_grade`` (0-4),
``dme_grade`` (0-2), ``optic_disc_center`` and ``fovea_center`` ([x, y] in pixels). An image
without a row for a field lacks that field; it is never filled with 0.

IDRiD publishes only a training and a test set. So that no checkpoint is ever selected on the
test set, ``val`` is carved from the training set by the committed split file
``retina_d2/data/splits/idrid_val.json`` (``--val-split`` names another; ``--val-split none``
keeps the official two splits). Validation names missing from a partial copy of IDRiD are named in
a warning; a task left without any validation image gets no ``val`` file.

Small-lesion dilation is off unless ``options.dilation`` asks for it: IDRiD's masks are drawn at
full resolution, and the e-ophtha paper's microaneurysm dilation is no part of this dataset.
"""
import csv
import json
import logging
import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..lesions import lesion
from .base import (
    IMAGE_EXTENSIONS,
    ConversionError,
    ConvertOptions,
    Sample,
    convert_samples,
    list_images,
    masks_by_stem,
    require_dir,
)

__all__ = [
    "DATASET",
    "CATEGORIES",
    "DEFAULT_VAL_SPLIT",
    "add_arguments",
    "carve_validation",
    "convert",
    "read_grades",
    "read_landmarks",
    "read_val_split",
]

logger = logging.getLogger(__name__)

DATASET = "idrid"
CATEGORIES: Tuple[str, ...] = (
    "microaneurysm",
    "haemorrhage",
    "hard exudate",
    "soft exudate",
    "optic disc",
)

SEGMENTATION_PART = "A. Segmentation"
GRADING_PART = "B. Disease Grading"
LOCALIZATION_PART = "C. Localization"
PARTS = (SEGMENTATION_PART, GRADING_PART, LOCALIZATION_PART)

IMAGES_FOLDER = "1. Original Images"
SEGMENTATION_TRUTH_FOLDER = "2. All Segmentation Groundtruths"
TRUTH_FOLDER = "2. Groundtruths"
# Every part names its splits the same way.
SPLIT_FOLDERS = {"train": "a. Training Set", "test": "b. Testing Set"}
# Mask files are named <image stem>_<lesion abbreviation>.tif inside these folders.
LESION_FOLDERS = {
    "microaneurysm": "1. Microaneurysms",
    "haemorrhage": "2. Haemorrhages",
    "hard exudate": "3. Hard Exudates",
    "soft exudate": "4. Soft Exudates",
    "optic disc": "5. Optic Disc",
}

GRADE_CSVS = {
    "train": "a. IDRiD_Disease Grading_Training Labels.csv",
    "test": "b. IDRiD_Disease Grading_Testing Labels.csv",
}
# Image-record field -> (CSV column, valid grades).
GRADE_COLUMNS = {
    "dr_grade": ("Retinopathy grade", range(0, 5)),
    "dme_grade": ("Risk of macular edema", range(0, 3)),
}
GRADE_IMAGE_COLUMN = "Image name"

# Image-record field -> (groundtruth folder of part C, split -> CSV name).
LANDMARK_CSVS = {
    "optic_disc_center": (
        "1. Optic Disc Center Location",
        {
            "train": "a. IDRiD_OD_Center_Training Set_Markups.csv",
            "test": "b. IDRiD_OD_Center_Testing Set_Markups.csv",
        },
    ),
    "fovea_center": (
        "2. Fovea Center Location",
        {
            "train": "a. IDRiD_Fovea_Center_Training Set_Markups.csv",
            "test": "b. IDRiD_Fovea_Center_Testing Set_Markups.csv",
        },
    ),
}
LANDMARK_IMAGE_COLUMN = "Image No"
LANDMARK_X_COLUMN = "X- Coordinate"
LANDMARK_Y_COLUMN = "Y - Coordinate"


# The validation images carved from the training sets (see the module docstring).
DEFAULT_VAL_SPLIT = Path(__file__).resolve().parents[1] / "splits" / "idrid_val.json"


def _val_split_arg(text: str) -> Optional[Path]:
    return None if text.lower() == "none" else Path(text)


def add_arguments(parser) -> None:
    """IDRiD's own flag: ``--val-split`` (every part found under the root is converted)."""
    parser.add_argument(
        "--val-split",
        type=_val_split_arg,
        default=DEFAULT_VAL_SPLIT,
        metavar="FILE|none",
        help='JSON {"seg": [NAME, ...], "grading": [...]} of training images that form the '
        "validation split (default: the committed retina_d2/data/splits/idrid_val.json); "
        "'none' keeps only the official train/test",
    )


def read_val_split(path: Path) -> Dict[str, List[str]]:
    """Read a validation split file: task ("seg", "grading") -> image stems.

    Raises:
        ConversionError: unreadable JSON, an unknown task, or a value that is not a list of names.
    """
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: cannot read the IDRiD validation split: {e}") from e
    if not isinstance(doc, dict):
        raise ConversionError(f"{path}: expected a JSON object task -> list of image names")
    for task, names in doc.items():
        if task not in ("seg", "grading"):
            raise ConversionError(f"{path}: unknown task {task!r} (expected 'seg' or 'grading')")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConversionError(f"{path}: {task!r} must be a list of image names")
    return doc


def carve_validation(
    splits: Dict[str, List[Sample]], val_names: Sequence[str], task: str, source: Path
) -> Dict[str, List[Sample]]:
    """Move the training images named in ``val_names`` into a ``val`` split.

    Names absent from the training set are named in a warning (a partial copy of IDRiD); with no
    name present, the splits are returned unchanged and a warning says so.
    """
    wanted = set(val_names)
    train = [s for s in splits["train"] if s.image.stem not in wanted]
    val = [s for s in splits["train"] if s.image.stem in wanted]
    absent = sorted(wanted - {s.image.stem for s in val})
    if absent:
        logger.warning(
            "%s: %d %s validation image(s) are not in this copy's training set: %s%s",
            source, len(absent), task, ", ".join(absent[:10]), " ..." if len(absent) > 10 else "",
        )
    if not val:
        logger.warning("IDRiD %s: no validation image present: no val split written", task)
        return splits
    return {"train": train, "val": val, **{k: v for k, v in splits.items() if k != "train"}}


def convert(
    root, out_dir, options: Optional[ConvertOptions] = None, val_split: Optional[Path] = DEFAULT_VAL_SPLIT
) -> dict:
    """Convert every IDRiD part found under ``root``.

    Args:
        root: the folder holding "A. Segmentation", "B. Disease Grading" and/or "C. Localization".
        out_dir: output folder (see :mod:`.base` for its layout).
        options: common converter options; defaults to ``ConvertOptions()``.
        val_split: the validation split file (see :func:`read_val_split`); None keeps the
            official train/test only.

    Returns:
        the conversion summary (also written to ``summary.json``).
    """
    options = options if options is not None else ConvertOptions()
    root = Path(root)
    parts = find_parts(root)
    val_names = read_val_split(Path(val_split)) if val_split is not None else {}
    tasks = {}
    if SEGMENTATION_PART in parts:
        tasks["seg"] = {
            split: segmentation_samples(root / SEGMENTATION_PART, split) for split in SPLIT_FOLDERS
        }
    if GRADING_PART in parts or LOCALIZATION_PART in parts:
        tasks["grading"] = {split: grading_samples(root, parts, split) for split in SPLIT_FOLDERS}
    for task in tasks:
        if task in val_names:
            tasks[task] = carve_validation(tasks[task], val_names[task], task, Path(val_split))
    return convert_samples(DATASET, tasks, root, out_dir, CATEGORIES, options)


def find_parts(root: Path) -> List[str]:
    """The IDRiD parts present under ``root``; raises a ConversionError if there is none."""
    require_dir(root, "the IDRiD root folder")
    parts = [part for part in PARTS if (root / part).is_dir()]
    if not parts:
        expected = ", ".join(repr(part) for part in PARTS)
        raise ConversionError(
            f"{root} holds no IDRiD part: expected at least one of the folders {expected} in it"
        )
    return parts


def segmentation_samples(part: Path, split: str) -> List[Sample]:
    """The images of one split of part A, each with its five mask files (None where absent).

    Args:
        part: the "A. Segmentation" folder.
        split: "train" or "test".

    Returns:
        one sample per image, its ``masks`` mapping every category to a file or None.
    """
    split_folder = SPLIT_FOLDERS[split]
    image_dir = require_dir(part / IMAGES_FOLDER / split_folder, f"the IDRiD {split} images")
    truth_dir = require_dir(
        part / SEGMENTATION_TRUTH_FOLDER / split_folder, f"the IDRiD {split} segmentation masks"
    )
    masks_by_lesion = {
        name: masks_by_stem(
            require_dir(truth_dir / LESION_FOLDERS[name], f"the IDRiD {split} {name} masks")
        )
        for name in CATEGORIES
    }
    samples = []
    for image in list_images(image_dir):
        masks = {
            name: masks_by_lesion[name].pop(f"{image.stem}_{lesion(name).abbrev}", None)
            for name in CATEGORIES
        }
        samples.append(Sample(image=image, masks=masks))
    for left in masks_by_lesion.values():
        for path in left.values():
            logger.warning("ignoring %s: no image in %s has this mask's name", path, image_dir)
    return samples


def grading_samples(root: Path, parts: Sequence[str], split: str) -> List[Sample]:
    """The grading task's images of one split, with grades and landmarks from the CSVs.

    Args:
        root: the IDRiD root.
        parts: the parts present (from :func:`find_parts`); must include B or C.
        split: "train" or "test".

    Returns:
        one sample per image of B (of C when B is absent), with the ``fields`` its rows give.
    """
    image_part = GRADING_PART if GRADING_PART in parts else LOCALIZATION_PART
    image_dir = require_dir(
        root / image_part / IMAGES_FOLDER / SPLIT_FOLDERS[split], f"the IDRiD {split} images"
    )
    images = list_images(image_dir)
    fields: Dict[str, dict] = {image.stem: {} for image in images}
    tables: List[Tuple[Path, Dict[str, dict]]] = []
    if GRADING_PART in parts:
        path = _require_csv(root / GRADING_PART / TRUTH_FOLDER / GRADE_CSVS[split], "grades")
        tables.append((path, read_grades(path)))
    if LOCALIZATION_PART in parts:
        for field_name, (folder, names) in LANDMARK_CSVS.items():
            path = _require_csv(
                root / LOCALIZATION_PART / TRUTH_FOLDER / folder / names[split], field_name
            )
            landmarks = read_landmarks(path)
            tables.append((path, {stem: {field_name: xy} for stem, xy in landmarks.items()}))
    for path, table in tables:
        for stem, values in table.items():
            if stem not in fields:
                # A stray row must not cost the whole split its labels.
                logger.warning(
                    "%s: ignoring the row of %s, which is not an image in %s", path, stem, image_dir
                )
                continue
            fields[stem].update(values)
    return [Sample(image=image, fields=fields[image.stem]) for image in images]


def _require_csv(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ConversionError(f"expected the IDRiD {what} CSV at {path}, but no such file exists")
    return path


def read_grades(path: Path) -> Dict[str, Dict[str, int]]:
    """Read a part-B CSV: image stem -> {"dr_grade": int, "dme_grade": int}.

    Raises:
        ConversionError: naming the CSV and row of a grade that is not an integer in its range.
    """
    columns = [GRADE_IMAGE_COLUMN] + [column for column, _ in GRADE_COLUMNS.values()]
    grades: Dict[str, Dict[str, int]] = {}
    for line, row in _read_csv(path, columns):
        values = {
            field_name: _parse_grade(row[column], valid, path, line, column)
            for field_name, (column, valid) in GRADE_COLUMNS.items()
        }
        _add_row(grades, _image_stem(row[GRADE_IMAGE_COLUMN], path, line), values, path, line)
    return grades


def read_landmarks(path: Path) -> Dict[str, List[float]]:
    """Read a part-C CSV: image stem -> [x, y] in pixels.

    Raises:
        ConversionError: naming the CSV and row of a coordinate that is not a finite number.
    """
    columns = [LANDMARK_IMAGE_COLUMN, LANDMARK_X_COLUMN, LANDMARK_Y_COLUMN]
    landmarks: Dict[str, List[float]] = {}
    for line, row in _read_csv(path, columns):
        xy = [
            _parse_coordinate(row[column], path, line, column)
            for column in (LANDMARK_X_COLUMN, LANDMARK_Y_COLUMN)
        ]
        _add_row(landmarks, _image_stem(row[LANDMARK_IMAGE_COLUMN], path, line), xy, path, line)
    return landmarks


def _column_key(name: str) -> str:
    # The published headers carry stray spaces ("Risk of macular edema ", "Y - Coordinate").
    return re.sub(r"\s+", "", name).lower()


def _read_csv(path: Path, columns: Sequence[str]) -> List[Tuple[int, Dict[str, str]]]:
    """The non-empty rows of a CSV as (line number, {column: stripped cell}) for ``columns``.

    Header names match whatever their whitespace and case; trailing empty columns and empty rows,
    which the published CSVs have, are ignored.
    """
    # utf-8-sig: a byte-order mark would otherwise glue itself to the first header name.
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ConversionError(f"{path}: empty CSV, expected the columns {list(columns)}")
        index = {_column_key(name): i for i, name in enumerate(header) if name.strip()}
        missing = [c for c in columns if _column_key(c) not in index]
        if missing:
            found = [name for name in header if name.strip()]
            raise ConversionError(f"{path}: no column {missing[0]!r}; the header has {found}")
        rows = []
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                continue
            cells = cells + [""] * (len(header) - len(cells))
            rows.append(
                (reader.line_num, {c: cells[index[_column_key(c)]].strip() for c in columns})
            )
    return rows


def _image_stem(name: str, path: Path, line: int) -> str:
    if not name:
        raise ConversionError(f"{path}, row {line}: no image name")
    # The published CSVs give bare names (IDRiD_001); tolerate an added extension.
    suffix = Path(name).suffix
    return name[: -len(suffix)] if suffix.lower() in IMAGE_EXTENSIONS else name


def _parse_grade(cell: str, valid: range, path: Path, line: int, column: str) -> int:
    try:
        grade = int(cell)
    except ValueError:
        grade = None
    if grade is None or grade not in valid:
        raise ConversionError(
            f"{path}, row {line}: {column} is {cell!r}; expected an integer "
            f"{valid.start}-{valid.stop - 1}"
        )
    return grade


def _parse_coordinate(cell: str, path: Path, line: int, column: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ConversionError(f"{path}, row {line}: {column} is {cell!r}; expected a number")
    return value


def _add_row(table: dict, stem: str, values, path: Path, line: int) -> None:
    # A repeated identical row is harmless; two different labels for one image are not.
    if stem in table and table[stem] != values:
        raise ConversionError(
            f"{path}, row {line}: {stem} appears again with {values}, earlier with {table[stem]}"
        )
    table[stem] = values
