"""e-ophtha (EX: hard exudates, MA: microaneurysms) -> COCO instances, all.json or given splits.

Layout as published; ``root`` may hold either subset or both, or be one of the two folders::

    e_optha_EX/EX/<patient>/<image>.jpg               47 images with exudates
    e_optha_EX/Annotation_EX/<patient>/<image>_EX.png
    e_optha_EX/healthy/<patient>/<image>.jpg          35 without
    e_optha_MA/MA/<patient>/<image>.jpg               148 with microaneurysms
    e_optha_MA/Annotation_MA/<patient>/<image>.png
    e_optha_MA/healthy/<patient>/<image>.jpg          233 without

Image extensions vary in case (.jpg/.JPG); an annotation is matched by image stem with or without
the lesion suffix (``_EX``/``_MA``), ignoring case. Each image is graded for one lesion type only,
so its record lists only that type in ``annotated_category_ids`` and it gets no semantic target
for the other: an evaluator must not count its unannotated type as false positives.

Microaneurysms are dilated by the Mask R-CNN paper's preset (``EOPHTHA_MA_DILATION``) unless
``--no-ma-dilation`` is given or ``--dilate`` names microaneurysm; semantic targets keep the
undilated masks.

The dataset defines no splits: the converter writes ``all.json``, or with ``--split-file`` one
file per split of a JSON file ``{"train": [NAME, ...], "val": [NAME, ...]}``
(``configs/maskrcnn_eophtha.yaml`` trains on ``eophtha_seg_train`` and tests on
``eophtha_seg_val``, so it needs "train" and "val"). A NAME is an image path without extension,
in one of three forms, each accepted when it names exactly one image of the chosen subsets:

* the path inside the subset folder, ``EX/E0000404/C0001885`` or ``healthy/E0000100/C0002000``;
* the same prefixed by the subset folder, ``e_optha_EX/healthy/E0000100/C0002000``, which is
  always unique (needed when both subsets hold the same ``healthy/<patient>/<image>``);
* the bare stem, ``C0001885``.

A NAME that matches several images is an error listing them.

``--paper-split`` reproduces the Mask R-CNN paper's data: its 195 lesion images (47 EX + 148 MA;
healthy images left out) split 155 / 20 / 20 into train / val / test. The paper lists no file
names and DATASETS.md does not either, so no split file can be committed; the split is a
deterministic rule instead (:func:`paper_split_samples`): within each subset the lesion images are
ordered by the SHA-256 of their full name (``e_optha_MA/MA/<patient>/<image>``, the same on every
machine and file system), and each subset gives test and val its share of 20 (EX 5 + MA 15),
the rest train (EX 37 + MA 118). Like the paper's, it splits images, not patients.

``--ma-dilation-scale 1024`` dilates microaneurysms as the paper did: on the image resized so its
field of view is 1024 px, before the mask is split into instances (so neighbours closer than the
dilation merge, as they did for the paper). That is done here at the native resolution with the
5x5-twice square scaled by (FOV diameter / 1024), on the mask as a whole; the semantic targets
then hold the dilated mask too. The default (``native``) dilates each instance at the photograph's
resolution without merging instances, and leaves semantic targets undilated.
"""
import hashlib
import argparse
import dataclasses
import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

from ..image_io import read_image
from ..instances import EOPHTHA_MA_DILATION
from ..preprocess import field_of_view_diameter
from .base import (
    ConversionError,
    ConvertOptions,
    Sample,
    convert_samples,
    list_images,
    read_mask,
    require_dir,
    split_samples,
)

__all__ = [
    "DATASET",
    "CATEGORIES",
    "SUBSETS",
    "EophthaSubset",
    "add_arguments",
    "convert",
    "find_subset_root",
    "find_annotation",
    "paper_split_samples",
    "sample_names",
]

logger = logging.getLogger(__name__)

DATASET = "eophtha"
CATEGORIES = ("hard exudate", "microaneurysm")


@dataclasses.dataclass(frozen=True)
class EophthaSubset:
    """One of the two e-ophtha databases.

    Attributes:
        key: "EX" or "MA": the ``--subset`` choice, the lesion image folder and the suffix of
            annotation folder and file names.
        folder: the subset's top folder as published (``e_optha_EX``).
        lesion: the vocabulary name of the one lesion type its images are graded for.
    """

    key: str
    folder: str
    lesion: str

    @property
    def annotation_folder(self) -> str:
        return f"Annotation_{self.key}"


SUBSETS = {
    "EX": EophthaSubset("EX", "e_optha_EX", "hard exudate"),
    "MA": EophthaSubset("MA", "e_optha_MA", "microaneurysm"),
}


# The Mask R-CNN paper's split of its 195 lesion images, and each subset's share of val / test.
PAPER_SPLIT_SIZES = {"train": 155, "val": 20, "test": 20}
PAPER_SPLIT_SHARES = {"EX": {"val": 5, "test": 5}, "MA": {"val": 15, "test": 15}}
# The width the paper resized every cropped, circled eye to before dilating its masks.
PAPER_DILATION_WIDTH = 1024
_FOV_THRESHOLD = 20  # as RETINA.PREPROCESS.FOV_THRESHOLD


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--subset``, ``--ma-dilation/--no-ma-dilation``, ``--ma-dilation-scale``,
    ``--split-file`` and ``--paper-split`` (dests ``subset``, ``ma_dilation``,
    ``ma_dilation_scale``, ``split_file``, ``paper_split``)."""
    parser.add_argument(
        "--subset",
        choices=("EX", "MA", "both"),
        default="both",
        help="convert e_optha_EX, e_optha_MA, or both into one all.json (default: both)",
    )
    parser.add_argument(
        "--ma-dilation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"dilate microaneurysm instances {EOPHTHA_MA_DILATION.kernel}x"
        f"{EOPHTHA_MA_DILATION.kernel}, {EOPHTHA_MA_DILATION.iterations} times, as the Mask "
        "R-CNN paper did (default: on; --dilate microaneurysm=... overrides it)",
    )
    parser.add_argument(
        "--ma-dilation-scale",
        choices=("native", "1024"),
        default="native",
        help="where microaneurysms are dilated: 'native' (each instance at the photograph's "
        "resolution, neighbours never merged; semantic targets undilated) or '1024' (as the "
        "paper: the mask as a whole at a 1024 px field of view, before instance splitting)",
    )
    parser.add_argument(
        "--paper-split",
        action="store_true",
        help="the Mask R-CNN paper's data: its 195 lesion images only, split 155/20/20 into "
        "train/val/test by a fixed rule (SHA-256 order within each subset; see the module "
        "docstring); not with --split-file",
    )
    parser.add_argument(
        "--split-file",
        type=Path,
        default=None,
        help='JSON {"train": [NAME, ...], "val": [...]}; writes one COCO file per split instead '
        "of all.json (configs/maskrcnn_eophtha.yaml expects train and val). NAME: the image path "
        "inside its e_optha_* folder without extension (EX/E0000404/C0001885, "
        "healthy/E0000100/C0002000), optionally prefixed by that folder, or the bare stem "
        "(C0001885); any form must name exactly one image",
    )


def find_subset_root(root: Path, subset: EophthaSubset) -> Optional[Path]:
    """The folder of one subset: ``root/e_optha_EX``, or ``root`` itself when it is that folder
    (by name, or because it holds ``EX/`` and ``Annotation_EX/``); None when neither."""
    if (root / subset.folder).is_dir():
        return root / subset.folder
    if root.name == subset.folder or (
        (root / subset.key).is_dir() and (root / subset.annotation_folder).is_dir()
    ):
        return root
    return None


def _chosen_subsets(root: Path, subset: str) -> List[Tuple[EophthaSubset, Path]]:
    """The subsets to convert and their folders.

    "both" takes whichever of the two is found, warning about the other; a ConversionError
    naming the expected folders is raised only when none of the requested subsets is found.
    """
    if subset not in ("EX", "MA", "both"):
        raise ValueError(f"subset must be 'EX', 'MA' or 'both', got {subset!r}")
    keys = ("EX", "MA") if subset == "both" else (subset,)
    chosen, missing = [], []
    for key in keys:
        folder = find_subset_root(root, SUBSETS[key])
        if folder is None:
            missing.append(SUBSETS[key])
        else:
            chosen.append((SUBSETS[key], folder))
    expected = " or ".join(
        f"{root / s.folder} (or {root} itself holding {s.key}/ and {s.annotation_folder}/)"
        for s in missing
    )
    if not chosen:
        raise ConversionError(f"expected the e-ophtha folder {expected}, but found none")
    for s in missing:
        # "both" converts whatever was downloaded; say so, since a misspelt folder looks the same.
        logger.warning(
            "no e-ophtha %s subset at %s: converting %s only",
            s.key,
            root / s.folder,
            chosen[0][0].key,
        )
    return chosen


def _patient_images(folder: Path) -> List[Path]:
    """Images of every ``<patient>/`` folder under ``folder`` (EX/, MA/ or healthy/)."""
    images = []
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            images.extend(list_images(entry))
        else:
            logger.warning("skipping %s: e-ophtha images sit in <patient>/ folders", entry)
    return images


def _stem(path: Path) -> str:
    return path.name[: -len(path.suffix)] if path.suffix else path.name


def _index_annotations(annotation_dir: Path) -> Dict[str, Dict[str, Path]]:
    """patient -> lower-case file name -> annotation file, so matching ignores case."""
    return {
        patient.name: {path.name.lower(): path for path in list_images(patient)}
        for patient in sorted(annotation_dir.iterdir())
        if patient.is_dir()
    }


def annotation_candidates(image: Path, annotation_dir: Path, subset: EophthaSubset) -> List[Path]:
    """Where the annotation of ``image`` may be: ``<stem>_<KEY>.png`` or ``<stem>.png`` in the
    image's patient folder under ``annotation_dir``; both forms occur in both subsets."""
    patient_dir = annotation_dir / image.parent.name
    stem = _stem(image)
    return [patient_dir / f"{stem}_{subset.key}.png", patient_dir / f"{stem}.png"]


def find_annotation(
    image: Path,
    annotation_dir: Path,
    subset: EophthaSubset,
    index: Optional[Dict[str, Dict[str, Path]]] = None,
) -> Path:
    """The annotation mask of a lesion image, matched by stem and ignoring case.

    Args:
        image: an image in ``EX/<patient>/`` or ``MA/<patient>/``.
        annotation_dir: ``Annotation_EX`` or ``Annotation_MA``.
        subset: the image's subset.
        index: :func:`_index_annotations` of ``annotation_dir``, to list each folder once.

    Returns:
        the annotation file.

    Raises:
        ConversionError: naming the image and the paths tried when none or two files match.
    """
    if index is None:
        index = _index_annotations(annotation_dir)
    files = index.get(image.parent.name, {})
    candidates = annotation_candidates(image, annotation_dir, subset)
    found = [files[c.name.lower()] for c in candidates if c.name.lower() in files]
    if not found:
        tried = ", ".join(str(c) for c in candidates)
        raise ConversionError(f"{image}: no {subset.key} annotation; tried {tried} (any case)")
    if len(found) > 1:
        raise ConversionError(
            f"{image}: two annotations match, {found[0]} and {found[1]}; keep only one"
        )
    return found[0]


def _subset_samples(subset_root: Path, subset: EophthaSubset) -> List[Sample]:
    """Samples of one subset: its lesion images with their annotation, then its healthy images.

    A lesion image whose annotation is missing or ambiguous gets that problem as its
    ``Sample.error``: the conversion stops at it, or skips it, per ``on_error``.
    """
    lesion_dir = require_dir(
        subset_root / subset.key, f"the e-ophtha {subset.key} images ({subset.key}/<patient>/)"
    )
    annotation_dir = require_dir(
        subset_root / subset.annotation_folder,
        f"the e-ophtha {subset.key} annotations ({subset.annotation_folder}/<patient>/)",
    )
    index = _index_annotations(annotation_dir)
    used = set()
    samples = []
    for image in _patient_images(lesion_dir):
        sample = Sample(image, annotated=[subset.lesion])
        try:
            mask = find_annotation(image, annotation_dir, subset, index)
        except ConversionError as e:
            sample.error = str(e)
        else:
            used.add(mask)
            sample.masks = {subset.lesion: mask}
        samples.append(sample)
    for files in index.values():
        for path in sorted(set(files.values()) - used):
            logger.warning("ignoring %s: no image in %s matches it", path, lesion_dir)

    healthy_dir = subset_root / "healthy"
    if healthy_dir.is_dir():
        for image in _patient_images(healthy_dir):
            # Graded and free of the lesion: an all-background target, not an unannotated image.
            samples.append(Sample(image, masks={subset.lesion: None}, annotated=[subset.lesion]))
    else:
        logger.warning(
            "no %s: converting e-ophtha %s without healthy images", healthy_dir, subset.key
        )
    return samples


def paper_split_samples(
    samples: List[Tuple[EophthaSubset, Path, Sample]]
) -> Dict[str, List[Sample]]:
    """The paper's 155 / 20 / 20 split of the lesion images of ``samples`` (healthy ones are
    left out); see the module docstring for the rule.

    Raises:
        ConversionError: the lesion images are not the published 47 EX + 148 MA.
    """
    splits: Dict[str, List[Sample]] = {"train": [], "val": [], "test": []}
    found = {}
    for key, shares in PAPER_SPLIT_SHARES.items():
        named = sorted(
            (_full_name(subset, folder, sample), sample)
            for subset, folder, sample in samples
            if subset.key == key and sample.image.relative_to(folder).parts[0] == subset.key
        )
        found[key] = len(named)
        ordered = [
            sample
            for _, sample in sorted(
                named, key=lambda item: hashlib.sha256(item[0].encode()).hexdigest()
            )
        ]
        splits["test"] += ordered[: shares["test"]]
        splits["val"] += ordered[shares["test"] : shares["test"] + shares["val"]]
        splits["train"] += ordered[shares["test"] + shares["val"] :]
    if found != {"EX": 47, "MA": 148}:
        raise ConversionError(
            f"--paper-split needs the published e-ophtha lesion images (EX 47, MA 148: both "
            f"subsets), found {found}"
        )
    assert {k: len(v) for k, v in splits.items()} == PAPER_SPLIT_SIZES
    return splits


def _full_name(subset: EophthaSubset, folder: Path, sample: Sample) -> str:
    return f"{subset.folder}/{sample.image.relative_to(folder).with_suffix('').as_posix()}"


def dilate_at_fov_scale(mask: np.ndarray, fov_diameter: float) -> np.ndarray:
    """``mask`` (bool) dilated as the paper's 5x5, 2 passes on the eye resized to a 1024 px
    field of view: one square of radius ``2 * 2 * fov_diameter / 1024`` (at least 0) at this
    resolution."""
    reach = EOPHTHA_MA_DILATION.iterations * (EOPHTHA_MA_DILATION.kernel - 1) // 2
    radius = int(round(reach * fov_diameter / PAPER_DILATION_WIDTH))
    if radius <= 0:
        return mask.copy()
    kernel = np.ones((2 * radius + 1,) * 2, np.uint8)
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def _with_dilation_at_fov_scale(sample: Sample, lesion: str) -> Sample:
    """``sample`` whose ``lesion`` mask is read, dilated at the paper's scale, then split into
    instances by the conversion (a ``mask_arrays`` loader)."""
    path = sample.masks[lesion]

    def load():
        image = read_image(str(sample.image), format="RGB")
        h, w = image.shape[:2]
        arr = read_mask(path, (h, w), sample.image)
        diameter = field_of_view_diameter(image, _FOV_THRESHOLD) or float(max(h, w))
        return {lesion: (dilate_at_fov_scale(arr > 0, diameter), None)}

    return dataclasses.replace(sample, masks={}, mask_arrays=load)


def _with_ma_dilation(options: ConvertOptions) -> ConvertOptions:
    """``options`` plus the paper's microaneurysm dilation, unless the user chose one."""
    if "microaneurysm" in options.dilation:
        return options
    dilation = dict(options.dilation, microaneurysm=EOPHTHA_MA_DILATION)
    return dataclasses.replace(options, dilation=dilation)


def sample_names(
    samples: List[Tuple[EophthaSubset, Path, Sample]]
) -> Tuple[Dict[str, Sample], Dict[str, List[str]]]:
    """The names a split file may give each image (see the module docstring).

    Args:
        samples: (subset, subset folder, sample) of every image to convert.

    Returns:
        tuple: (name -> sample, for names that match one image; name -> the full names of the
        images it matches, for names that match several).
    """
    matches: Dict[str, List[Tuple[str, Sample]]] = {}
    for subset, folder, sample in samples:
        inner = sample.image.relative_to(folder).with_suffix("").as_posix()
        full = f"{subset.folder}/{inner}"
        for name in dict.fromkeys((full, inner, _stem(sample.image))):
            matches.setdefault(name, []).append((full, sample))
    unique = {name: found[0][1] for name, found in matches.items() if len(found) == 1}
    ambiguous = {
        name: [full for full, _ in found] for name, found in matches.items() if len(found) > 1
    }
    return unique, ambiguous


def convert(
    root: Path,
    out_dir: Path,
    options: ConvertOptions,
    subset: str = "both",
    ma_dilation: bool = True,
    split_file: Optional[Path] = None,
    ma_dilation_scale: str = "native",
    paper_split: bool = False,
) -> dict:
    """Convert e-ophtha into ``out_dir/all.json``, or one file per split of ``split_file``.

    Args:
        root: folder holding ``e_optha_EX/`` and/or ``e_optha_MA/``, or one of them.
        out_dir: output folder.
        options: common converter options.
        subset: "EX", "MA", or "both" (every subset found under ``root``).
        ma_dilation: dilate microaneurysms by ``EOPHTHA_MA_DILATION`` unless
            ``options.dilation`` already names microaneurysm.
        split_file: optional JSON split file of image names (see the module docstring); without
            it every image goes to ``all.json``.
        ma_dilation_scale: "native" or "1024" (the paper's: see the module docstring).
        paper_split: the paper's 195 lesion images split 155 / 20 / 20
            (:func:`paper_split_samples`).

    Returns:
        the summary dict of :func:`convert_samples`; in skip mode, images with a missing or
        ambiguous annotation are in its ``skipped`` list.

    Raises:
        ConversionError: missing folders, a bad split file or names in it that match no image
            or several, or (with ``on_error="stop"``) the first bad image or annotation.
    """
    root = require_dir(Path(root), "the e-ophtha root (holding e_optha_EX/ and/or e_optha_MA/)")
    chosen = _chosen_subsets(root, subset)
    categories = tuple(name for name in CATEGORIES if name in {s.lesion for s, _ in chosen})
    if paper_split and split_file is not None:
        raise ConversionError("--paper-split and --split-file are two splits: give one")
    if ma_dilation_scale not in ("native", "1024"):
        raise ConversionError(
            f"--ma-dilation-scale must be native or 1024, got {ma_dilation_scale!r}"
        )
    at_fov_scale = ma_dilation and ma_dilation_scale != "native"
    if at_fov_scale and "microaneurysm" in options.dilation:
        raise ConversionError(
            "--ma-dilation-scale 1024 is the paper's dilation; --dilate microaneurysm=... is "
            "another: give one"
        )
    if ma_dilation and not at_fov_scale and "microaneurysm" in categories:
        options = _with_ma_dilation(options)
    listed = [
        (each, folder, sample)
        for each, folder in chosen
        for sample in _subset_samples(folder, each)
    ]
    if at_fov_scale:
        listed = [
            (each, folder, _with_dilation_at_fov_scale(sample, each.lesion))
            if each.key == "MA" and sample.masks.get(each.lesion) is not None
            else (each, folder, sample)
            for each, folder, sample in listed
        ]
    if paper_split:
        splits = paper_split_samples(listed)
    elif split_file is None:
        splits = {"all": [sample for _, _, sample in listed]}
    else:
        by_name, ambiguous = sample_names(listed)
        splits = split_samples(by_name, Path(split_file), "e-ophtha", ambiguous=ambiguous)
    return convert_samples(DATASET, {"seg": splits}, root, out_dir, categories, options)
