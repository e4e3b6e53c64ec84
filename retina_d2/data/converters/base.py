"""What every dataset converter shares: reading images and masks safely, turning masks into COCO
instances, semantic targets, atomic outputs, and the run that ties them together.

A dataset module only knows its layout: it lists :class:`Sample` s per task and split and passes
them to :func:`convert_samples`. Output layout of one conversion (``OUT_DIR``)::

    retina_d2.json                 manifest: dataset, image root, tasks -> splits -> JSON files
    <split>.json                   COCO instances of the segmentation task (train/test/valid/all)
    <task>/<split>.json            other tasks (e.g. IDRiD's grading/localization images)
    semantic/<split>/<image>/<LESION>.png  semantic targets: 0 background, 1 lesion, 255 ignore;
                                   <image> is the image's file_name without extension
    summary.json                   per task and split: images, instances per category, sizes

``file_name`` in the COCO files is relative to the raw dataset root, recorded as ``image_root``
in the manifest, so nothing is copied.

Nothing is written outside ``OUT_DIR``: task and split names must be plain names and every
image must lie below the root. A run writes into ``OUT_DIR/.retina_d2-staging.<hex>/`` and
moves the files in only when every image converted; ``--overwrite`` first sets the old manifest
aside (``.retina_d2.json.replaced``) and removes the files it lists (COCO files, their semantic
targets, summary.json), nothing else. Staging folders and ``.<name>.<8 chars>.tmp`` files of
interrupted runs are removed by the next run.
"""
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..image_io import mask_to_8bit
from ..instances import Dilation, coco_annotation, dilate_small_lesions, instance_rles, label_components
from ..lesions import coco_categories, lesion
# What ignore regions (and lesions not annotated) become in the semantic PNGs.
from ...schema import IGNORE_VALUE as SEMANTIC_IGNORE

__all__ = [
    "ConversionError",
    "OutputError",
    "ConvertOptions",
    "Sample",
    "IMAGE_EXTENSIONS",
    "list_images",
    "masks_by_stem",
    "read_image_size",
    "read_mask",
    "atomic_write",
    "read_json",
    "write_json_atomic",
    "read_split_file",
    "split_samples",
    "check_outputs_free",
    "convert_samples",
    "MANIFEST_NAME",
    "require_dir",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "retina_d2.json"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
# The value Retinal-Lesions uses for annotations that graders excluded from scoring.
IGNORE_VALUE = 127
# A split name becomes an output file name (<split>.json) and part of a registered dataset name.
_SPLIT_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")


class ConversionError(RuntimeError):
    """Bad raw data or layout; the message names the file and what is wrong."""


class OutputError(ConversionError):
    """The output folder cannot be written (read-only, a file in the way, disk full): it stops
    the run even with ``on_error="skip"``, since every later image would fail alike."""


@dataclass
class ConvertOptions:
    """Options common to every converter (command-line flags of tools/convert_dataset.py)."""

    connectivity: int = 8
    min_area: int = 1
    # lesion name -> dilation applied to its instances after contour splitting.
    dilation: Dict[str, Dilation] = field(default_factory=dict)
    on_error: str = "stop"  # "stop": raise on the first bad file; "skip": warn, record, go on
    overwrite: bool = False
    segmentation_format: str = "rle"  # or "polygon"
    semantic: bool = True  # write semantic target PNGs
    progress: bool = True

    def __post_init__(self):
        if self.on_error not in ("stop", "skip"):
            raise ValueError(f"on_error must be 'stop' or 'skip', got {self.on_error!r}")
        if self.connectivity not in (4, 8):
            raise ValueError(f"connectivity must be 4 or 8, got {self.connectivity}")
        for name in self.dilation:
            lesion(name)  # raises on an unknown lesion name


# A label map with one id per annotated blob, and the lesion name of each blob id (None: an
# ignore region).
LabelMapLoader = Callable[[], Tuple[np.ndarray, Dict[int, Optional[str]]]]
# Lesion name -> (bool lesion mask, bool ignore mask or None), drawn in memory.
MaskArraysLoader = Callable[[], Dict[str, Tuple[np.ndarray, Optional[np.ndarray]]]]


@dataclass
class Sample:
    """One image of a dataset and where its annotations are.

    Attributes:
        image: the image file.
        masks: lesion name -> binary mask file (non-zero = lesion; with ``ignore_value`` set, that
            value marks ignore regions), or None when the dataset says the lesion is absent.
        label_map: for datasets that give instance identities (HEI-MED): a callable returning an
            int label map (one id per blob) and each id's lesion name. Each blob becomes exactly
            one instance; a blob whose name is None is an ignore region of every annotated lesion
            (a label that names no lesion, e.g. HEI-MED's ``Artifact``).
        mask_arrays: for datasets whose masks are drawn from vector markings (DIARETDB1): a
            callable returning, per lesion name, a bool mask of the image's size and a bool
            ignore mask or None. Instances are the mask's components, as for mask files.
        fields: extra image-record fields (dr_grade, dme_grade, optic_disc_center, ...).
        annotated: the lesion names annotated on this image (default: the dataset's categories);
            e-ophtha images are annotated for one lesion type only.
        error: a problem the dataset module found while listing the sample (e.g. its annotation
            file is missing); the conversion stops or skips the sample with it, per on_error.
    """

    image: Path
    masks: Dict[str, Optional[Path]] = field(default_factory=dict)
    label_map: Optional[LabelMapLoader] = None
    mask_arrays: Optional[MaskArraysLoader] = None
    fields: Dict[str, Any] = field(default_factory=dict)
    annotated: Optional[Sequence[str]] = None
    error: Optional[str] = None


def require_dir(path: Path, what: str) -> Path:
    """Return ``path`` if it is a directory, else raise a ConversionError naming what was expected."""
    if not Path(path).is_dir():
        raise ConversionError(f"expected {what} at {path}, but no such folder exists")
    return Path(path)


def list_images(folder: Path) -> List[Path]:
    """Image files directly in ``folder`` (any case of extension), sorted by name.

    Anything else (``Thumbs.db``, ``.DS_Store``, notes) is skipped with a warning.
    """
    images = []
    for path in sorted(Path(folder).iterdir()):
        if path.is_dir():
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(path)
        else:
            logger.warning("skipping %s: not an image", path)
    return images


def masks_by_stem(folder: Path) -> Dict[str, Path]:
    """Mask files of a folder (as :func:`list_images` finds them) by file stem; two files with one
    stem are ambiguous and an error."""
    masks: Dict[str, Path] = {}
    for path in list_images(folder):
        if path.stem in masks:
            raise ConversionError(f"{path} and {masks[path.stem]}: two masks with one name")
        masks[path.stem] = path
    return masks


def read_image_size(path: Path) -> Tuple[int, int]:
    """(height, width) of an image, after decoding it fully so that a truncated file is caught."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.height, img.width
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise ConversionError(f"{path}: unreadable or truncated image ({e})") from e


def read_mask(path: Path, expected_hw: Tuple[int, int], image_path: Path) -> np.ndarray:
    """A mask file as a single-channel uint8 array, checked against its image's size.

    Multi-channel masks (IDRiD's RGB TIFFs draw the lesion in red) collapse to the channel maximum.
    """
    try:
        with Image.open(path) as img:
            img.load()
            arr = np.asarray(img)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise ConversionError(f"{path}: unreadable or truncated mask ({e})") from e
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    try:
        arr = mask_to_8bit(arr)  # a 16-bit mask: nonzero = lesion, not a scaled intensity
    except ValueError as e:
        raise ConversionError(f"{path}: {e}") from e
    if arr.shape != tuple(expected_hw):
        raise ConversionError(
            f"{path}: mask is {arr.shape[1]}x{arr.shape[0]} (WxH) but its image {image_path} is "
            f"{expected_hw[1]}x{expected_hw[0]}"
        )
    return arr


def split_mask_values(arr: np.ndarray, path: Path, ignore_value: Optional[int]) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Lesion and ignore pixels of a mask whose values must be 0, one lesion value, and optionally
    ``ignore_value``; anything else is an error naming the file and the values found."""
    values = np.unique(arr)
    lesion_values = [int(v) for v in values if v != 0 and v != ignore_value]
    if len(lesion_values) > 1:
        expected = "0, 255" + (f" and {ignore_value} (ignore)" if ignore_value is not None else "")
        raise ConversionError(
            f"{path}: unexpected mask values {values.tolist()[:12]}; expected a binary mask "
            f"({expected}, or 0 and one lesion value)"
        )
    positive = arr == lesion_values[0] if lesion_values else np.zeros(arr.shape, bool)
    ignore = (arr == ignore_value) if ignore_value is not None and ignore_value in values else None
    return positive, ignore


# Temp files of atomic_write: ".<target name>.<8 random characters>.tmp" beside the target (the
# 8 characters were mkstemp's before, so orphans of older runs match too).
_TEMP_RE = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp")


def _create_temp(path: Path) -> Tuple[int, str]:
    """An exclusive new file beside ``path`` named by ``_TEMP_RE``, opened for writing.

    Created with mode 0o666 like ``open()`` does, so the process umask gives the final file its
    permissions (``tempfile.mkstemp`` would make every output 0600).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # a name another writer drew: draw again
            continue


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "w"):
    """Write to a temporary file beside ``path`` and rename it into place only on success, so an
    interrupted run never leaves a half-written output. The file gets the permissions a plain
    ``open(path, "w")`` would give it under the process umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> Any:
    """Load a JSON file; a malformed one is a ConversionError naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from e


def write_json_atomic(path: Path, obj: Any, indent: Optional[int] = None) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=indent)


def read_split_file(path: Path) -> Dict[str, List[str]]:
    """
    Read a split file: a JSON object from split name to a list of image names.

    Args:
        path: the JSON file, e.g. ``{"train": ["(00000052)", ...], "val": [...]}``.

    Returns:
        dict[str, list[str]]: the splits in file order.

    Raises:
        ConversionError: unreadable JSON, not an object of string lists, a split name that is
            not a plain file name, or a name listed twice.
    """
    try:
        with open(path, encoding="utf-8") as f:
            splits = json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: cannot read split file: {e}") from e
    if not isinstance(splits, dict) or not splits:
        raise ConversionError(f"{path}: split file must be a non-empty JSON object split -> names")
    seen: Dict[str, str] = {}
    for split, names in splits.items():
        if not _SPLIT_NAME_RE.fullmatch(split):
            raise ConversionError(
                f"{path}: split name {split!r} is not a plain name (letters, digits, _ and -); "
                "it becomes the output file name"
            )
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConversionError(f"{path}: split {split!r} must be a list of image names")
        for name in names:
            if name in seen:
                raise ConversionError(
                    f"{path}: image {name!r} is listed in split {seen[name]!r} and again in "
                    f"{split!r}"
                )
            seen[name] = split
    return splits


def split_samples(
    samples_by_name: Dict[str, Sample],
    split_file: Path,
    dataset: str,
    ambiguous: Optional[Dict[str, Sequence[str]]] = None,
) -> Dict[str, List[Sample]]:
    """
    Assign samples to the splits of a split file (see :func:`read_split_file`).

    Args:
        samples_by_name: image name -> sample. Several names may lead to one sample (e-ophtha
            accepts a stem and a path); naming one image twice through them is an error.
        split_file: the JSON split file.
        dataset: dataset name for messages.
        ambiguous: names that match several images -> those images' full names; listing one
            is an error that names the candidates.

    Returns:
        dict[str, list[Sample]]: split -> samples, in file order. Images in no split are
        not converted (logged).

    Raises:
        ConversionError: a bad split file, names it lists that match no image or several, or
            one image listed twice under different names; the message names the file.
    """
    split_file = Path(split_file)
    splits = read_split_file(split_file)
    ambiguous = ambiguous or {}
    listed = [n for names in splits.values() for n in names]
    unclear = [n for n in listed if n in ambiguous and n not in samples_by_name]
    if unclear:
        raise ConversionError(
            f"{split_file}: {len(unclear)} image name(s) match several {dataset} images; give "
            "a longer name: "
            + "; ".join(f"{n!r} (one of {', '.join(ambiguous[n])})" for n in unclear[:10])
            + (" ..." if len(unclear) > 10 else "")
        )
    missing = [n for n in listed if n not in samples_by_name]
    if missing:
        suffixes = [Path(n).suffix for n in missing if Path(n).suffix.lower() in IMAGE_EXTENSIONS]
        hint = f" (give names without {suffixes[0]})" if suffixes else ""
        raise ConversionError(
            f"{split_file}: {len(missing)} image name(s) not found in the dataset{hint}: "
            + ", ".join(repr(n) for n in missing[:10])
            + (" ..." if len(missing) > 10 else "")
        )
    # By identity: the same image listed under two of its names would be converted twice.
    chosen: Dict[int, Tuple[str, str]] = {}
    for split, names in splits.items():
        for name in names:
            first = chosen.setdefault(id(samples_by_name[name]), (split, name))
            if first != (split, name):
                raise ConversionError(
                    f"{split_file}: {name!r} in split {split!r} and {first[1]!r} in split "
                    f"{first[0]!r} are the same image {samples_by_name[name].image}"
                )
    unused = len({id(s) for s in samples_by_name.values()}) - len(chosen)
    if unused:
        logger.info(
            "%d %s image(s) are in no split of %s: not converted", unused, dataset, split_file
        )
    return {split: [samples_by_name[n] for n in names] for split, names in splits.items()}


def _write_png_atomic(path: Path, arr: np.ndarray) -> None:
    try:
        with atomic_write(path, "wb") as f:
            # Level 1 halves the encode time of a full-size target; the files stay small.
            Image.fromarray(arr).save(f, format="PNG", compress_level=1)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from e


def _write_output_json(path: Path, obj: Any, indent: Optional[int] = None) -> None:
    try:
        write_json_atomic(path, obj, indent=indent)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from e


def check_outputs_free(out_dir: Path, overwrite: bool) -> None:
    """Refuse to touch an output folder that already holds a conversion, unless overwriting."""
    manifest = Path(out_dir) / MANIFEST_NAME
    if manifest.exists() and not overwrite:
        raise ConversionError(
            f"{out_dir} already holds a converted dataset ({manifest}); pass --overwrite to "
            "replace it or choose another --out"
        )
    existing = [p for p in Path(out_dir).glob("*.json")] if Path(out_dir).is_dir() else []
    if existing and not overwrite:
        raise ConversionError(
            f"{existing[0]} exists; pass --overwrite to replace it or choose another --out"
        )


class _CocoBuilder:
    """Accumulates one COCO instances file."""

    def __init__(self, dataset: str, task: str, split: str, categories: Sequence[str]):
        self.categories = list(categories)
        self.images: List[dict] = []
        self.annotations: List[dict] = []
        self.info = {
            "description": f"{dataset} {task} {split}, converted by retina_d2",
            "version": "1",
        }

    def add_image(self, record: dict) -> int:
        image_id = len(self.images) + 1
        self.images.append(dict(record, id=image_id))
        return image_id

    def add_instances(self, image_id: int, name: str, rles, iscrowd: int, fmt: str) -> int:
        category_id = lesion(name).id
        for rle in rles:
            self.annotations.append(
                coco_annotation(
                    rle,
                    annotation_id=len(self.annotations) + 1,
                    image_id=image_id,
                    category_id=category_id,
                    iscrowd=iscrowd,
                    segmentation_format=fmt,
                )
            )
        return len(rles)

    def to_dict(self) -> dict:
        return {
            "info": self.info,
            "licenses": [],
            "images": self.images,
            "annotations": self.annotations,
            "categories": coco_categories(self.categories),
        }


# Instance size bins (pixels at the image's native size), for the summary.
SIZE_BINS = ((0, 10), (10, 100), (100, 1000), (1000, 10000), (10000, None))


def _size_bin(area: int) -> str:
    for lo, hi in SIZE_BINS:
        if hi is None or area < hi:
            return f"{lo}-{hi}" if hi is not None else f">={lo}"
    raise AssertionError


def summarize(coco: dict) -> dict:
    """Images, instances and ignore regions per category, and an instance size histogram."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    per_category = {
        name: {"instances": 0, "ignore_regions": 0, "images": 0, "sizes": {}} for name in names.values()
    }
    images_with = {name: set() for name in names.values()}
    for ann in coco["annotations"]:
        entry = per_category[names[ann["category_id"]]]
        if ann["iscrowd"]:
            entry["ignore_regions"] += 1
            continue
        entry["instances"] += 1
        images_with[names[ann["category_id"]]].add(ann["image_id"])
        size = _size_bin(ann["area"])
        entry["sizes"][size] = entry["sizes"].get(size, 0) + 1
    for name, ids in images_with.items():
        per_category[name]["images"] = len(ids)
    return {"images": len(coco["images"]), "categories": per_category}


def format_summary(summary: dict) -> str:
    """The summary of every task and split as a plain-text table."""
    from tabulate import tabulate

    bins = [(f"{lo}-{hi}" if hi is not None else f">={lo}") for lo, hi in SIZE_BINS]
    rows = []
    for task, splits in summary["tasks"].items():
        for split, s in splits.items():
            if not s["categories"]:
                rows.append([task, split, s["images"], "-", "", "", ""] + [""] * len(bins))
            for name, c in s["categories"].items():
                rows.append(
                    [task, split, s["images"], name, c["images"], c["instances"], c["ignore_regions"]]
                    + [c["sizes"].get(b, 0) for b in bins]
                )
    headers = ["task", "split", "images", "category", "with lesion", "instances", "ignore"] + [
        f"px {b}" for b in bins
    ]
    text = tabulate(rows, headers=headers, tablefmt="github")
    if summary.get("skipped"):
        text += f"\n\nskipped {len(summary['skipped'])} file(s):\n" + "\n".join(
            f"  {s['file']}: {s['reason']}" for s in summary["skipped"]
        )
    return text


def _image_root_for_manifest(root: Path, out_dir: Path) -> str:
    try:
        return root.relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        return str(root)


class _ImageRoot:
    """The raw dataset root, and each image's ``file_name`` below it.

    ``file_name`` is taken from the path as the converter built it (root / folder / file), so
    a folder of the dataset that is a symlink to another disk keeps working; only where that
    fails (a converter that resolved its paths) is the resolved path tried. Either way the
    name has no ``..`` and so never leads out of the root.
    """

    def __init__(self, root: Path):
        self.given = Path(root)
        self.resolved = Path(root).resolve()

    def file_name(self, path: Path) -> str:
        for candidate, root in ((Path(path), self.given), (Path(path).resolve(), self.resolved)):
            try:
                relative = candidate.relative_to(root)
            except ValueError:
                continue
            if relative.parts and ".." not in relative.parts:
                return relative.as_posix()
        raise ConversionError(f"image {path} is not inside the dataset root {self.given}")


def _stem(path: Path) -> str:
    return Path(path).name[: -len(Path(path).suffix)] if Path(path).suffix else Path(path).name


def _convert_sample(
    sample: Sample,
    builder: _CocoBuilder,
    root: "_ImageRoot",
    out_dir: Path,
    split: str,
    categories: Sequence[str],
    options: ConvertOptions,
    ignore_value: Optional[int],
    semantic: bool,
) -> None:
    height, width = read_image_size(sample.image)
    annotated = list(sample.annotated) if sample.annotated is not None else list(categories)
    # Read and check everything first, so a bad mask skips its whole image, not half of it.
    per_lesion: Dict[str, Tuple[np.ndarray, Optional[np.ndarray]]] = {}
    if sample.label_map is not None:
        labels, blob_lesions = sample.label_map()
        if labels.shape != (height, width):
            raise ConversionError(
                f"label map of {sample.image} is {labels.shape[1]}x{labels.shape[0]} (WxH) but "
                f"the image is {width}x{height}"
            )
        ids_by_lesion: Dict[Optional[str], List[int]] = {}
        for blob_id, name in blob_lesions.items():
            ids_by_lesion.setdefault(name, []).append(blob_id)
        # Blobs of no lesion are neither positive nor negative for any lesion type.
        ignore = np.isin(labels, ids_by_lesion[None]) if None in ids_by_lesion else None
        for name in annotated:
            ids = ids_by_lesion.get(name)
            if not ids:
                per_lesion[name] = (np.zeros((height, width), np.int32), ignore)
                continue
            # Blob ids stay as drawn: each annotated blob is exactly one instance.
            lesion_labels = np.where(np.isin(labels, ids), labels, 0).astype(np.int32)
            per_lesion[name] = (lesion_labels, ignore)
    elif sample.mask_arrays is not None:
        arrays = sample.mask_arrays()
        for name in annotated:
            positive, ignore = arrays.get(name, (np.zeros((height, width), bool), None))
            if positive.shape != (height, width):
                raise ConversionError(
                    f"{name} mask of {sample.image} is {positive.shape[1]}x{positive.shape[0]} "
                    f"(WxH) but the image is {width}x{height}"
                )
            lesion_labels = label_components(positive, options.connectivity, options.min_area)
            per_lesion[name] = (lesion_labels, ignore)
    else:
        for name in annotated:
            path = sample.masks.get(name)
            if path is None:
                per_lesion[name] = (np.zeros((height, width), np.int32), None)
                continue
            arr = read_mask(path, (height, width), sample.image)
            positive, ignore = split_mask_values(arr, path, ignore_value)
            lesion_labels = label_components(positive, options.connectivity, options.min_area)
            per_lesion[name] = (lesion_labels, ignore)

    record = {
        "file_name": root.file_name(sample.image),
        "height": height,
        "width": width,
        "annotated_category_ids": sorted(lesion(n).id for n in annotated),
    }
    record.update(sample.fields)
    sem_files = {}
    if semantic:
        # Keyed by the image's path below the root, so equal file names in different folders
        # (e-ophtha patients) never share a target.
        stem = _stem(Path(record["file_name"]))
        stem = (Path(record["file_name"]).parent / stem).as_posix()
        for name, (lesion_labels, ignore) in per_lesion.items():
            target = (lesion_labels > 0).astype(np.uint8)
            if ignore is not None:
                target[ignore & (target == 0)] = SEMANTIC_IGNORE
            rel = Path("semantic") / split / stem / f"{lesion(name).abbrev}.png"
            _write_png_atomic(out_dir / rel, target)
            sem_files[name] = rel.as_posix()
        record["sem_seg_files"] = sem_files
    image_id = builder.add_image(record)
    for name, (lesion_labels, ignore) in per_lesion.items():
        dilation = options.dilation.get(name)
        if dilation is not None:
            lesion_labels = dilate_small_lesions(lesion_labels, dilation)
        rles = [rle for _, rle in instance_rles(lesion_labels)] if lesion_labels.any() else []
        builder.add_instances(image_id, name, rles, 0, options.segmentation_format)
        if ignore is not None and ignore.any():
            # Ignore regions are crowd annotations: COCOeval neither rewards nor punishes
            # detections on them, and Detectron2's training loader drops crowd instances.
            ignore_rles = [rle for _, rle in instance_rles(label_components(ignore, 8, 1))]
            builder.add_instances(image_id, name, ignore_rles, 1, "rle")


# Written inside the output folder while a conversion runs, and named so that only the toolkit's
# own leftovers are ever cleaned: the staging folder of an interrupted run, and the manifest of a
# conversion being replaced (its files are removed before the new ones move in).
_STAGING_RE = re.compile(r"\.retina_d2-staging\.[0-9a-f]{8}")
REPLACED_MANIFEST_NAME = ".retina_d2.json.replaced"
SUMMARY_NAME = "summary.json"


def _check_output_names(tasks: Dict[str, Dict[str, List[Sample]]]) -> None:
    """Task and split names become output paths (``<split>.json``, ``semantic/<split>/``): only
    plain names, so none leads out of the output folder."""
    for task, splits in tasks.items():
        for kind, name in [("task", task)] + [("split", split) for split in splits]:
            if not isinstance(name, str) or not _SPLIT_NAME_RE.fullmatch(name):
                raise ConversionError(
                    f"{kind} name {name!r} is not a plain name (letters, digits, _ and -); it "
                    "becomes an output file name"
                )


def _owned_path(out_dir: Path, rel: Any, top: str, suffix: str) -> Optional[Path]:
    """``out_dir / rel`` when ``rel`` is a relative path below ``top`` ('' for anywhere) ending
    in ``suffix``, else None: a manifest naming anything else is not trusted to own it."""
    if not isinstance(rel, str) or not rel.endswith(suffix) or "\\" in rel:
        return None
    parts = Path(rel).parts
    if Path(rel).is_absolute() or not parts or ".." in parts or (top and parts[0] != top):
        return None
    return out_dir / rel


def _owned_files(out_dir: Path, manifest_path: Path) -> List[Path]:
    """The files an earlier conversion's manifest names as its own: its COCO files, the semantic
    targets their images list, and summary.json."""
    owned = [out_dir / SUMMARY_NAME]
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        tasks = manifest["tasks"]
        coco_files = [rel for splits in tasks.values() for rel in splits.values()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        logger.warning("%s is damaged (%s): only summary.json is removed as its", manifest_path, e)
        return owned
    for rel in coco_files:
        coco_path = _owned_path(out_dir, rel, "", ".json")
        if coco_path is None:
            logger.warning("%s names %r as a COCO file: not removed", manifest_path, rel)
            continue
        owned.append(coco_path)
        if not coco_path.is_file():
            continue
        try:
            images = json.loads(coco_path.read_text(encoding="utf-8")).get("images", [])
            targets = [t for image in images for t in (image.get("sem_seg_files") or {}).values()]
        except (OSError, ValueError, AttributeError) as e:
            logger.warning("%s is unreadable (%s): its semantic targets stay", coco_path, e)
            continue
        owned += [p for p in (_owned_path(out_dir, t, "semantic", ".png") for t in targets) if p]
    return owned


def _remove_conversion(out_dir: Path, manifest_path: Path) -> None:
    """Delete the files ``manifest_path`` owns, the folders that leaves empty, then the manifest."""
    emptied = set()
    for path in _owned_files(out_dir, manifest_path):
        if path.is_file() or path.is_symlink():
            path.unlink()
            emptied.update(p for p in path.parents if out_dir in p.parents)
    for folder in sorted(emptied, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty: something else lives there
            folder.rmdir()
    manifest_path.unlink()


def _clean_leftovers(out_dir: Path, task_folders: Sequence[str]) -> None:
    """Remove what interrupted runs of the toolkit left: staging folders, and atomic_write's
    temp files of JSON and PNG outputs (never anything of another name)."""
    for child in out_dir.iterdir():
        if _STAGING_RE.fullmatch(child.name) and child.is_dir() and not child.is_symlink():
            logger.info("removing %s, left by an interrupted conversion", child)
            shutil.rmtree(child)
    folders = [out_dir] + [out_dir / t for t in task_folders if (out_dir / t).is_dir()]
    semantic = out_dir / "semantic"
    if semantic.is_dir() and not semantic.is_symlink():
        folders += [Path(d) for d, _, _ in os.walk(semantic)]
    for folder in folders:
        remove_interrupted_writes(folder, (".json", ".png"))


def remove_interrupted_writes(folder: Path, suffixes: Sequence[str]) -> List[Path]:
    """Remove the temp files atomic_write leaves in ``folder`` when its process is killed, for
    targets ending in one of ``suffixes`` (a name of any other shape is never touched). Call it
    only while no other process writes there: a live writer's temp file matches too.

    Returns:
        the files removed
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return removed
    for child in folder.iterdir():
        match = _TEMP_RE.fullmatch(child.name)
        if (match and match["target"].endswith(tuple(suffixes)) and child.is_file()
                and not child.is_symlink()):
            logger.info("removing %s, left by an interrupted write", child)
            child.unlink()
            removed.append(child)
    return removed


def _make_staging(out_dir: Path) -> Path:
    while True:
        staging = out_dir / f".retina_d2-staging.{secrets.token_hex(4)}"
        try:
            staging.mkdir()  # mode 0o777 less the umask, like any folder the run makes
            return staging
        except FileExistsError:
            continue


def _commit(out_dir: Path, staging: Path, manifest: dict) -> None:
    """Replace the earlier conversion in ``out_dir`` (if any) by the one staged.

    The old manifest is renamed away first, so from then on the folder is no conversion until
    the new manifest is written last; an interrupted commit leaves the renamed manifest, and
    the next run removes the files it names before its own move in. Files the old conversion
    did not own (a split the new layout lacks is owned; the raw images are not) stay.
    """
    replaced = out_dir / REPLACED_MANIFEST_NAME
    current = out_dir / MANIFEST_NAME
    try:
        if replaced.is_file():
            _remove_conversion(out_dir, replaced)
        if current.is_file():
            os.replace(current, replaced)
            _remove_conversion(out_dir, replaced)
        for folder, _, files in os.walk(staging):
            for name in files:
                source = Path(folder) / name
                target = out_dir / source.relative_to(staging)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)
    except OSError as e:
        raise OutputError(f"cannot replace the conversion in {out_dir}: {e}") from e
    # The manifest goes last: its presence marks a complete conversion.
    _write_output_json(current, manifest, indent=2)


def convert_samples(
    dataset: str,
    tasks: Dict[str, Dict[str, List[Sample]]],
    root: Path,
    out_dir: Path,
    categories: Sequence[str],
    options: ConvertOptions,
    ignore_value: Optional[int] = None,
    notes: Optional[Callable[[], Dict[str, Any]]] = None,
) -> dict:
    """Convert the samples of every task and split and write the outputs of one dataset.

    Everything is written into a staging folder inside ``out_dir`` and moved into place only
    when every image converted: a failed or interrupted run leaves an earlier conversion as it
    was. With ``options.overwrite`` the earlier conversion's own files (those its manifest
    lists) are removed before the new ones move in, so no split of an old layout stays behind.

    Args:
        dataset: dataset name, used in registered names (``<dataset>_<task>_<split>``).
        tasks: task ("seg", "grading", ...) -> split -> samples. Only the "seg" task carries
            instances and semantic targets; other tasks are image lists with their fields.
            Task and split names must be plain names (letters, digits, _ and -).
        root: raw dataset root; ``file_name`` is stored relative to it.
        out_dir: output folder.
        categories: lesion names this dataset annotates.
        options: common converter options.
        ignore_value: mask value marking ignore regions, if the dataset has them.
        notes: called once every sample is converted; what it returns (dataset-specific counts,
            e.g. DIARETDB1's repaired polygons) goes into the summary as ``"notes"``.

    Returns:
        the summary dict (also written to ``summary.json``).

    Raises:
        ConversionError: bad raw data, a task or split name that is not a plain name, or an
            image outside ``root``; :class:`OutputError` when ``out_dir`` cannot be written.
    """
    from tqdm import tqdm

    image_root = _ImageRoot(root)
    out_dir = Path(out_dir)
    check_outputs_free(out_dir, options.overwrite)
    _check_output_names(tasks)
    if not any(samples for splits in tasks.values() for samples in splits.values()):
        raise ConversionError(f"no images found under {image_root.given} for {dataset}")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _clean_leftovers(out_dir, [t for t in tasks if t != "seg"])
        staging = _make_staging(out_dir)
    except OSError as e:
        raise OutputError(f"cannot write to the output folder {out_dir}: {e}") from e

    manifest = {
        "dataset": dataset,
        "format_version": 1,
        # Relative when the raw data sits inside the output (synthetic), so the folder can move.
        "image_root": _image_root_for_manifest(image_root.resolved, out_dir),
        "categories": coco_categories(categories),
        "tasks": {},
        "options": {
            "connectivity": options.connectivity,
            "min_area": options.min_area,
            "dilation": {k: vars(v) for k, v in options.dilation.items()},
            "segmentation_format": options.segmentation_format,
        },
    }
    summary = {"dataset": dataset, "tasks": {}, "skipped": []}
    try:
        for task, splits in tasks.items():
            manifest["tasks"][task] = {}
            summary["tasks"][task] = {}
            for split, samples in splits.items():
                coco = _convert_split(
                    dataset, task, split, samples, image_root, staging, categories, options,
                    ignore_value, summary["skipped"], tqdm,
                )
                rel = f"{split}.json" if task == "seg" else f"{task}/{split}.json"
                _write_output_json(staging / rel, coco)
                manifest["tasks"][task][split] = rel
                summary["tasks"][task][split] = summarize(coco)
        if notes is not None:
            summary["notes"] = notes()
        _write_output_json(staging / SUMMARY_NAME, summary, indent=2)
        _commit(out_dir, staging, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _convert_split(
    dataset, task, split, samples, image_root, staging, categories, options, ignore_value,
    skipped, tqdm,
) -> dict:
    """The COCO dict of one task's split; its semantic targets are written below ``staging``."""
    builder = _CocoBuilder(dataset, task, split, categories if task == "seg" else [])
    for sample in tqdm(samples, desc=f"{dataset} {task}/{split}", disable=not options.progress):
        try:
            if sample.error is not None:
                raise ConversionError(sample.error)
            if task == "seg":
                _convert_sample(
                    sample, builder, image_root, staging, split, categories, options,
                    ignore_value, options.semantic,
                )
            else:
                height, width = read_image_size(sample.image)
                record = {"file_name": image_root.file_name(sample.image), "height": height,
                          "width": width}
                record.update(sample.fields)
                builder.add_image(record)
        except OutputError:
            raise  # every later image would fail alike: skipping would only hide it
        except ConversionError as e:
            if options.on_error == "stop":
                raise
            logger.warning("skipping %s: %s", sample.image, e)
            skipped.append({"file": str(sample.image), "reason": str(e)})
    return builder.to_dict()
