"""DDR (Li et al., Information Sciences 501:511-522, 2019), lesion segmentation part -> COCO.

Layout as published (757 images)::

    DDR-dataset/lesion_segmentation/train/image/007-1774-100.jpg
    DDR-dataset/lesion_segmentation/train/label/{EX,HE,MA,SE}/007-1774-100.tif
    DDR-dataset/lesion_segmentation/valid/image/...
    DDR-dataset/lesion_segmentation/valid/segmentation label/{EX,HE,MA,SE}/...
    DDR-dataset/lesion_segmentation/test/image/...,  test/label/{EX,HE,MA,SE}/...

The root may be the folder holding ``DDR-dataset``, ``DDR-dataset`` itself or
``lesion_segmentation``. Each split becomes a "seg" file (``train.json``, ``valid.json``,
``test.json``). The valid split names its label folder "segmentation label"; either spelling is
accepted in every split.

DDR publishes all four masks for every image, all-zero where the lesion is absent, so a missing
mask file is an error, not an absent lesion: the run stops naming the expected file, or with
``on_error="skip"`` that image is skipped. A lesion folder that holds none of its split's masks is
a layout error naming the folder.
"""
import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..lesions import lesion
from .base import (
    ConversionError,
    ConvertOptions,
    Sample,
    convert_samples,
    list_images,
    masks_by_stem,
    require_dir,
)

__all__ = ["DATASET", "CATEGORIES", "add_arguments", "convert", "find_lesion_segmentation"]

logger = logging.getLogger(__name__)

DATASET = "ddr"
CATEGORIES: Tuple[str, ...] = ("microaneurysm", "haemorrhage", "hard exudate", "soft exudate")

DATASET_FOLDER = "DDR-dataset"
LESION_SEGMENTATION_FOLDER = "lesion_segmentation"
SPLITS = ("train", "valid", "test")
IMAGE_FOLDER = "image"
# DDR's valid split spells its label folder "segmentation label", the others "label".
LABEL_FOLDERS = ("label", "segmentation label")
# Where a missing mask is reported: DDR's masks are TIFFs named after their image.
MASK_SUFFIX = ".tif"


def add_arguments(parser) -> None:
    """DDR has no flags of its own: all three splits are converted."""


def convert(root, out_dir, options: Optional[ConvertOptions] = None) -> dict:
    """Convert DDR's lesion segmentation part.

    Args:
        root: the folder holding ``DDR-dataset``, ``DDR-dataset`` itself, or
            ``lesion_segmentation``.
        out_dir: output folder (see :mod:`.base` for its layout).
        options: common converter options; defaults to ``ConvertOptions()``.

    Returns:
        the conversion summary (also written to ``summary.json``).
    """
    options = options if options is not None else ConvertOptions()
    lesion_segmentation = find_lesion_segmentation(Path(root))
    splits = {}
    missing: List[Tuple[Path, Path]] = []
    for split in SPLITS:
        split_dir = require_dir(lesion_segmentation / split, f"the DDR {split} split")
        splits[split], split_missing = split_samples(split_dir, split)
        missing.extend(split_missing)
    _check_missing_masks(missing, options)
    # file_name is relative to lesion_segmentation, whichever root the user gave.
    return convert_samples(
        DATASET, {"seg": splits}, lesion_segmentation, out_dir, CATEGORIES, options
    )


def find_lesion_segmentation(root: Path) -> Path:
    """The ``lesion_segmentation`` folder of a DDR root given at any of its three levels."""
    require_dir(root, "the DDR root folder")
    candidates = (
        root,
        root / LESION_SEGMENTATION_FOLDER,
        root / DATASET_FOLDER / LESION_SEGMENTATION_FOLDER,
    )
    for candidate in candidates:
        if any((candidate / split).is_dir() for split in SPLITS):
            return candidate
    raise ConversionError(
        f"{root} is not a DDR root: expected the split folders {', '.join(SPLITS)} in "
        f"{candidates[2]} (or in {candidates[1]}, or in {root} itself)"
    )


def split_samples(split_dir: Path, split: str) -> Tuple[List[Sample], List[Tuple[Path, Path]]]:
    """The images of one split, each with its four mask files.

    Args:
        split_dir: the split's folder (``.../lesion_segmentation/train``).
        split: the split name, for messages.

    Returns:
        the samples, and (image, expected mask path) for every mask file that does not exist.
        Those samples keep the expected path, so a skipping run reports the image as unreadable.
    """
    images = list_images(require_dir(split_dir / IMAGE_FOLDER, f"the DDR {split} images"))
    label_dir = _label_folder(split_dir, split)
    masks_by_lesion = {}
    for name in CATEGORIES:
        folder = require_dir(label_dir / lesion(name).abbrev, f"the DDR {split} {name} masks")
        masks_by_lesion[name] = masks_by_stem(folder)
        matched = sum(image.stem in masks_by_lesion[name] for image in images)
        if images and not matched:
            raise ConversionError(
                f"{folder} holds none of the {len(images)} {split} images' masks; DDR publishes "
                f"a {lesion(name).abbrev} mask for every image"
            )
    samples, missing = [], []
    for image in images:
        masks = {}
        for name in CATEGORIES:
            path = masks_by_lesion[name].pop(image.stem, None)
            if path is None:
                path = label_dir / lesion(name).abbrev / f"{image.stem}{MASK_SUFFIX}"
                missing.append((image, path))
            masks[name] = path
        samples.append(Sample(image=image, masks=masks))
    for left in masks_by_lesion.values():
        for path in left.values():
            logger.warning("ignoring %s: no image in %s has this mask's name", path, split_dir)
    return samples, missing


def _label_folder(split_dir: Path, split: str) -> Path:
    found = [split_dir / name for name in LABEL_FOLDERS if (split_dir / name).is_dir()]
    if not found:
        raise ConversionError(
            f"expected the DDR {split} masks at {split_dir / LABEL_FOLDERS[0]} (or "
            f"{split_dir / LABEL_FOLDERS[1]}), but neither folder exists"
        )
    if len(found) > 1:
        raise ConversionError(
            f"{found[0]} and {found[1]} both exist; keep only the one that holds the {split} masks"
        )
    return found[0]


def _check_missing_masks(missing: List[Tuple[Path, Path]], options: ConvertOptions) -> None:
    """Stop before converting anything if a mask file is missing, unless skipping bad images."""
    if not missing:
        return
    if options.on_error == "stop":
        image, path = missing[0]
        more = f" ({len(missing) - 1} more mask files are missing)" if len(missing) > 1 else ""
        raise ConversionError(
            f"{path}: missing mask of {image}; DDR publishes all four lesion masks for every "
            f"image, all-zero where the lesion is absent{more}"
        )
    for image, path in missing:
        # The sample keeps the expected path, so convert_samples fails to read it and records
        # the image in summary["skipped"].
        logger.warning("%s: missing mask of %s; the image will be skipped", path, image)
