"""Retinal-Lesions (fundus-dr1593, 8 lesion types, 896x896) -> COCO instances with ignore regions.

Layout as published; ``root`` is ``retinal-lesions-v20191227`` or its parent::

    retinal-lesions-v20191227/images_896x896/<id>.jpg
    retinal-lesions-v20191227/lesion_segs_896x896/<id>/<lesion>.png
    retinal-lesions-v20191227/dr_grades.csv, train.txt, val.txt, test.txt   (each may be absent)

Mask pixels are 255 for a lesion and 127 for an annotation the authors excluded from scoring
(it does not follow the AAO grading guideline). 127 regions become ``iscrowd=1`` annotations, so
COCOeval neither rewards nor punishes detections on them, and 255 (ignore) in the semantic
targets. A missing lesion file, or a missing ``<id>/`` folder, means the lesion is absent.

Splits come from ``train.txt``/``val.txt``/``test.txt`` (one id per line) when present, else
everything goes to ``all.json``. ``dr_grades.csv``, when present, adds ``dr_grade`` to each
image record.
"""
import argparse
import csv
import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .base import (
    IGNORE_VALUE,
    IMAGE_EXTENSIONS,
    ConversionError,
    ConvertOptions,
    Sample,
    convert_samples,
    list_images,
    require_dir,
)

__all__ = [
    "DATASET",
    "CATEGORIES",
    "LESION_FILES",
    "SPLITS",
    "add_arguments",
    "convert",
    "find_dataset_root",
    "read_dr_grades",
    "read_splits",
]

logger = logging.getLogger(__name__)

DATASET = "retinal_lesions"
FOLDER = "retinal-lesions-v20191227"
IMAGE_DIR = "images_896x896"
LESION_DIR = "lesion_segs_896x896"
GRADES_FILE = "dr_grades.csv"
SPLITS = ("train", "val", "test")  # each read from <split>.txt

# Mask file name (without .png) -> vocabulary name.
LESION_FILES = {
    "microaneurysm": "microaneurysm",
    "retinal_hemorrhage": "haemorrhage",
    "hard_exudate": "hard exudate",
    "cotton_wool_spots": "soft exudate",
    "vitreous_hemorrhage": "vitreous haemorrhage",
    "preretinal_hemorrhage": "preretinal haemorrhage",
    "neovascularization": "neovascularization",
    "fibrous_proliferation": "fibrous proliferation",
}
CATEGORIES = tuple(LESION_FILES.values())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Retinal-Lesions has no flags of its own."""


def find_dataset_root(root: Path) -> Path:
    """``root`` if it holds ``images_896x896/``, else its ``retinal-lesions-*`` child that does.

    Raises:
        ConversionError: naming both places looked at.
    """
    root = require_dir(Path(root), f"the Retinal-Lesions root ({FOLDER}/ or its parent)")
    if (root / IMAGE_DIR).is_dir():
        return root
    # The published folder carries its release date; accept another release's date too.
    releases = sorted(p for p in root.glob("retinal-lesions*") if p.name != FOLDER)
    for child in [root / FOLDER] + releases:
        if (child / IMAGE_DIR).is_dir():
            return child
    raise ConversionError(
        f"expected {IMAGE_DIR}/ in {root} or in {root / FOLDER}, but neither holds it"
    )


def _image_id(name: str) -> str:
    """An image id from a split-file or CSV entry: the file name without an image extension."""
    name = Path(name.strip()).name
    suffix = Path(name).suffix
    return name[: -len(suffix)] if suffix.lower() in IMAGE_EXTENSIONS else name


def read_splits(dataset_root: Path) -> Dict[str, List[str]]:
    """Image ids of every split file present (``train.txt``, ``val.txt``, ``test.txt``).

    Returns:
        split name -> ids in file order (duplicates dropped); empty when no split file exists.

    Raises:
        ConversionError: when an id is listed in two split files.
    """
    splits: Dict[str, List[str]] = {}
    owner: Dict[str, Path] = {}
    for split in SPLITS:
        path = dataset_root / f"{split}.txt"
        if not path.is_file():
            continue
        ids = []
        for line in path.read_text(encoding="utf-8-sig").splitlines():
            if not line.strip():
                continue
            image_id = _image_id(line)
            if image_id in owner and owner[image_id] != path:
                raise ConversionError(f"{path}: {image_id} is also listed in {owner[image_id]}")
            if image_id not in owner:
                owner[image_id] = path
                ids.append(image_id)
        splits[split] = ids
    return splits


def _grade_columns(header: List[str], path: Path) -> Tuple[int, int]:
    """Indices of the image-id and the grade column of ``dr_grades.csv``, by name.

    The grade column's name contains "grade" ("dr" decides between several); the id column's
    name contains "image", or else "id".
    """
    lowered = [h.strip().lower() for h in header]
    grade = [i for i, h in enumerate(lowered) if "grade" in h]
    if len(grade) > 1:
        grade = [i for i in grade if "dr" in lowered[i]]
    others = [i for i in range(len(lowered)) if i not in grade]
    image_id = [i for i in others if "image" in lowered[i]] or [
        i for i in others if "id" in lowered[i]
    ]
    if len(grade) != 1 or len(image_id) != 1:
        raise ConversionError(
            f"{path}: expected a header with one image-id column (name containing 'image' or "
            f"'id') and one grade column (name containing 'grade'), got {header}"
        )
    return image_id[0], grade[0]


def read_dr_grades(path: Path) -> Dict[str, int]:
    """DR grades from ``dr_grades.csv``: a header naming an image-id and a grade column (found
    case-insensitively, see :func:`_grade_columns`), then one row per image.

    Returns:
        image id -> integer grade.

    Raises:
        ConversionError: naming the file, and the line of a bad row.
    """
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    if not rows:
        raise ConversionError(f"{path}: empty; expected a header with image id and grade columns")
    id_col, grade_col = _grade_columns(rows[0], path)
    grades = {}
    for line_no, row in enumerate(rows[1:], start=2):
        try:
            grade = float(row[grade_col])
            if grade != int(grade):
                raise ValueError(grade)
            grades[_image_id(row[id_col])] = int(grade)
        except (IndexError, ValueError, OverflowError):
            raise ConversionError(
                f"{path}, line {line_no}: expected an image id and an integer grade, got {row}"
            ) from None
    return grades


def _lesion_masks(image_id: str, lesion_root: Path) -> Dict[str, Optional[Path]]:
    """Lesion name -> mask file of one image; None for a lesion whose file (or folder) is
    missing, which the dataset uses to say the lesion is absent."""
    folder = lesion_root / image_id
    files = {}
    if folder.is_dir():
        files = {path.name.lower(): path for path in list_images(folder)}
    masks = {}
    for file_stem, name in LESION_FILES.items():
        masks[name] = files.pop(f"{file_stem}.png", None)
    for path in files.values():
        logger.warning("ignoring %s: not one of the %d lesion masks", path, len(LESION_FILES))
    return masks


def _split_samples(
    samples: Dict[str, Sample], splits: Dict[str, List[str]], dataset_root: Path
) -> Dict[str, List[Sample]]:
    """Samples per split file; ids without an image and images in no split are warned about."""
    if not splits:
        return {"all": list(samples.values())}
    by_split = {}
    for split, ids in splits.items():
        missing = [i for i in ids if i not in samples]
        if missing:
            logger.warning(
                "%s lists %d id(s) without an image in %s, e.g. %s",
                dataset_root / f"{split}.txt",
                len(missing),
                dataset_root / IMAGE_DIR,
                ", ".join(missing[:5]),
            )
        by_split[split] = [samples[i] for i in ids if i in samples]
    listed = {i for ids in splits.values() for i in ids}
    unlisted = [i for i in samples if i not in listed]
    if unlisted:
        logger.warning(
            "%d image(s) are in no split file and are left out, e.g. %s",
            len(unlisted),
            ", ".join(unlisted[:5]),
        )
    return by_split


def convert(root: Path, out_dir: Path, options: ConvertOptions) -> dict:
    """Convert Retinal-Lesions into one COCO file per split file (or ``all.json``).

    Args:
        root: ``retinal-lesions-v20191227`` or its parent.
        out_dir: output folder.
        options: common converter options.

    Returns:
        the summary dict of :func:`convert_samples`.
    """
    dataset_root = find_dataset_root(Path(root))
    image_dir = dataset_root / IMAGE_DIR
    lesion_root = require_dir(
        dataset_root / LESION_DIR, f"the Retinal-Lesions masks ({LESION_DIR}/<id>/<lesion>.png)"
    )
    grades_file = dataset_root / GRADES_FILE
    grades = read_dr_grades(grades_file) if grades_file.is_file() else {}

    samples: Dict[str, Sample] = {}
    for image in list_images(image_dir):
        image_id = _image_id(image.name)
        fields = {"dr_grade": grades[image_id]} if image_id in grades else {}
        samples[image_id] = Sample(image, masks=_lesion_masks(image_id, lesion_root), fields=fields)
    for folder in sorted(p for p in lesion_root.iterdir() if p.is_dir()):
        if folder.name not in samples:
            logger.warning("ignoring %s: no image %s/%s.*", folder, image_dir, folder.name)
    if grades:
        ungraded = [i for i in samples if i not in grades]
        if ungraded:
            logger.warning(
                "%s has no grade for %d image(s), e.g. %s",
                grades_file,
                len(ungraded),
                ", ".join(ungraded[:5]),
            )

    tasks = {"seg": _split_samples(samples, read_splits(dataset_root), dataset_root)}
    return convert_samples(
        DATASET, tasks, dataset_root, out_dir, CATEGORIES, options, ignore_value=IGNORE_VALUE
    )
