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
"""
import contextlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..instances import Dilation, coco_annotation, dilate_small_lesions, instance_rles, label_components
from ..lesions import coco_categories, lesion

__all__ = [
    "ConversionError",
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
SEMANTIC_IGNORE = 255
# A split name becomes an output file name (<split>.json) and part of a registered dataset name.
_SPLIT_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")


class ConversionError(RuntimeError):
    """Bad raw data or layout; the message names the file and what is wrong."""


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


# A label map with one id per annotated blob, and the lesion name of each blob id.
LabelMapLoader = Callable[[], Tuple[np.ndarray, Dict[int, str]]]


@dataclass
class Sample:
    """One image of a dataset and where its annotations are.

    Attributes:
        image: the image file.
        masks: lesion name -> binary mask file (non-zero = lesion; with ``ignore_value`` set, that
            value marks ignore regions), or None when the dataset says the lesion is absent.
        label_map: for datasets that give instance identities (HEI-MED): a callable returning an
            int label map (one id per blob) and each id's lesion name. Each blob becomes exactly
            one instance.
        fields: extra image-record fields (dr_grade, dme_grade, optic_disc_center, ...).
        annotated: the lesion names annotated on this image (default: the dataset's categories);
            e-ophtha images are annotated for one lesion type only.
        error: a problem the dataset module found while listing the sample (e.g. its annotation
            file is missing); the conversion stops or skips the sample with it, per on_error.
    """

    image: Path
    masks: Dict[str, Optional[Path]] = field(default_factory=dict)
    label_map: Optional[LabelMapLoader] = None
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
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 255:
            raise ConversionError(f"{path}: mask values outside 0-255 ({arr.min()}..{arr.max()})")
        arr = arr.astype(np.uint8)
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


@contextlib.contextmanager
def atomic_write(path: Path, mode: str = "w"):
    """Write to a temporary file beside ``path`` and rename it into place only on success, so an
    interrupted run never leaves a half-written output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
    with atomic_write(path, "wb") as f:
        # Level 1 halves the encode time of a full-size target; the files stay small (mostly 0).
        Image.fromarray(arr).save(f, format="PNG", compress_level=1)


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


def _relative(path: Path, root: Path) -> str:
    return Path(path).resolve().relative_to(root).as_posix()


def _stem(path: Path) -> str:
    return Path(path).name[: -len(Path(path).suffix)] if Path(path).suffix else Path(path).name


def _convert_sample(
    sample: Sample,
    builder: _CocoBuilder,
    root: Path,
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
        ids_by_lesion: Dict[str, List[int]] = {}
        for blob_id, name in blob_lesions.items():
            ids_by_lesion.setdefault(name, []).append(blob_id)
        for name in annotated:
            ids = ids_by_lesion.get(name)
            if not ids:
                per_lesion[name] = (np.zeros((height, width), np.int32), None)
                continue
            # Blob ids stay as drawn: each annotated blob is exactly one instance.
            lesion_labels = np.where(np.isin(labels, ids), labels, 0).astype(np.int32)
            per_lesion[name] = (lesion_labels, None)
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
        "file_name": _relative(sample.image, root),
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


def convert_samples(
    dataset: str,
    tasks: Dict[str, Dict[str, List[Sample]]],
    root: Path,
    out_dir: Path,
    categories: Sequence[str],
    options: ConvertOptions,
    ignore_value: Optional[int] = None,
) -> dict:
    """Convert the samples of every task and split and write the outputs of one dataset.

    Args:
        dataset: dataset name, used in registered names (``<dataset>_<task>_<split>``).
        tasks: task ("seg", "grading", ...) -> split -> samples. Only the "seg" task carries
            instances and semantic targets; other tasks are image lists with their fields.
        root: raw dataset root; ``file_name`` is stored relative to it.
        out_dir: output folder.
        categories: lesion names this dataset annotates.
        options: common converter options.
        ignore_value: mask value marking ignore regions, if the dataset has them.

    Returns:
        the summary dict (also written to ``summary.json``).
    """
    from tqdm import tqdm

    root = Path(root).resolve()
    out_dir = Path(out_dir)
    check_outputs_free(out_dir, options.overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not any(samples for splits in tasks.values() for samples in splits.values()):
        raise ConversionError(f"no images found under {root} for {dataset}")

    manifest = {
        "dataset": dataset,
        "format_version": 1,
        # Relative when the raw data sits inside the output (synthetic), so the folder can move.
        "image_root": _image_root_for_manifest(root, out_dir),
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
    outputs: Dict[str, dict] = {}
    for task, splits in tasks.items():
        manifest["tasks"][task] = {}
        summary["tasks"][task] = {}
        for split, samples in splits.items():
            task_categories = categories if task == "seg" else []
            builder = _CocoBuilder(dataset, task, split, task_categories)
            for sample in tqdm(samples, desc=f"{dataset} {task}/{split}", disable=not options.progress):
                try:
                    if sample.error is not None:
                        raise ConversionError(sample.error)
                    if task == "seg":
                        _convert_sample(
                            sample, builder, root, out_dir, split, categories, options,
                            ignore_value, options.semantic,
                        )
                    else:
                        height, width = read_image_size(sample.image)
                        record = {"file_name": _relative(sample.image, root), "height": height,
                                  "width": width}
                        record.update(sample.fields)
                        builder.add_image(record)
                except ConversionError as e:
                    if options.on_error == "stop":
                        raise
                    logger.warning("skipping %s: %s", sample.image, e)
                    summary["skipped"].append({"file": str(sample.image), "reason": str(e)})
            coco = builder.to_dict()
            rel = f"{split}.json" if task == "seg" else f"{task}/{split}.json"
            outputs[rel] = coco
            manifest["tasks"][task][split] = rel
            summary["tasks"][task][split] = summarize(coco)
    # Nothing is written before every split converted, so a stopped run leaves no JSON behind
    # that would block (or be mistaken for) a complete conversion.
    for rel, coco in outputs.items():
        write_json_atomic(out_dir / rel, coco)
    write_json_atomic(out_dir / "summary.json", summary, indent=2)
    # The manifest goes last: its presence marks a complete conversion.
    write_json_atomic(out_dir / MANIFEST_NAME, manifest, indent=2)
    return summary
