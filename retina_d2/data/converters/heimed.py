"""
HEI-MED (Hamilton Eye Institute Macular Edema Dataset) -> COCO instances.

The dataset is one flat folder; per image ``NAME`` (names hold parentheses and dots, e.g.
``0907440_(625).dcm``) it holds ``NAME.jpg``, ``NAME.map.gz`` (blob label map), ``NAME.GND``
(one label per blob), ``NAME.meta`` (``~Key~Value`` lines) and ``NAME_vess.png`` (a machine-made
vessel map, not ground truth). The file formats and their readers are in :mod:`.heimed_io`.

Unlike the binary-mask datasets, HEI-MED says which pixels form one lesion: every blob of the
label map becomes exactly one instance, with the category of its ``.GND`` label. Blobs are never
re-split into connected components nor merged with touching blobs, so ``--connectivity`` and
``--min-area`` do not apply here (dilation does).

Rules taken from the dataset:

* a missing ``.map.gz`` together with a missing ``.GND`` means an image without annotated blobs;
  only one of the two missing is an error naming the missing file;
* a map value above the ``.GND`` blob count (a blob without a label, so without a category) is an
  error: in skip mode the image is skipped rather than guessed at;
* a ``.GND`` blob id that the map does not draw gives no instance, with a warning;
* every label the full dataset uses has a category (:func:`.heimed_io.blob_category`), except
  ``Artifact`` and ``Fluid without CSME``, which name no lesion: their blobs are ignore regions
  (``iscrowd=1`` in every category, 255 in the semantic targets), neither lesion nor background;
* an unknown ``.GND`` label is warned about (naming the file, the blob and the label) and its
  blob becomes an ignore region too; with ``unknown_labels="stop"`` (``--on-error stop`` on the
  command line) it is an error instead.

The dataset has no splits: the converter writes ``all.json``, or with ``--split-file`` one file
per split named in a JSON file ``{"train": [NAME, ...], "val": [NAME, ...]}``. The project's dev
split of the 40-image sample is ``configs/splits/heimed_dev.json`` (see :func:`dev_split`).
"""
import functools
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from .base import (
    ConversionError,
    ConvertOptions,
    Sample,
    convert_samples,
    read_split_file,
    require_dir,
    split_samples,
)
from .heimed_io import (
    HEIMED_CATEGORIES,
    UNKNOWN_LABEL_POLICIES,
    HeimedFormatError,
    optic_nerve_center,
    read_blob_categories,
    read_label_map,
    read_meta,
)

__all__ = [
    "DATASET",
    "CATEGORIES",
    "add_arguments",
    "convert",
    "build_samples",
    "dev_split",
    "image_name",
    "list_heimed_images",
    "load_blobs",
    "read_split_file",
]

logger = logging.getLogger(__name__)

DATASET = "heimed"
CATEGORIES: Tuple[str, ...] = HEIMED_CATEGORIES

_IMAGE_SUFFIX = ".jpg"
# Files that belong beside a NAME.jpg (compared lower-case): passed over quietly, unlike unknown
# files. ".map" covers the stray, truncated uncompressed map the dataset ships beside one .map.gz.
_COMPANION_SUFFIXES = (".map.gz", ".map", ".gnd", ".meta", "_vess.png")


def image_name(image: Path) -> str:
    """
    The HEI-MED name of an image: its file name without ``.jpg``.

    ``Path.stem`` would cut ``0907440_(625).dcm.jpg`` to ``0907440_(625).dcm`` correctly but
    ``NAME.map.gz`` wrongly, so names are always built by stripping the known suffix.

    Args:
        image: a ``NAME.jpg`` path.

    Returns:
        str: ``NAME``.
    """
    return Path(image).name[: -len(_IMAGE_SUFFIX)]


def list_heimed_images(root: Path) -> List[Path]:
    """
    The ``NAME.jpg`` files directly in the HEI-MED folder, sorted by name.

    :func:`.base.list_images` is not used: it would list every ``NAME_vess.png`` as an image and
    warn about each of the ~160 companion files. Here companion files are logged at debug level
    and only files that are neither images nor companions (``Thumbs.db``, ...) get a warning.

    Args:
        root: the HEI-MED folder.

    Returns:
        list[Path]: the images; annotation files without an image are warned about.
    """
    images, annotation_names = [], set()
    for path in sorted(Path(root).iterdir()):
        if path.is_dir():
            continue
        lower = path.name.lower()
        if lower.endswith(_IMAGE_SUFFIX):
            images.append(path)
        elif lower.endswith(_COMPANION_SUFFIXES) or lower.startswith("readme"):
            logger.debug("skipping %s: not an image", path)
            for suffix in (".map.gz", ".GND"):
                if path.name.endswith(suffix):
                    annotation_names.add(path.name[: -len(suffix)])
        else:
            logger.warning("skipping %s: not a HEI-MED image or annotation file", path)
    orphans = sorted(annotation_names - {image_name(p) for p in images})
    if orphans:
        logger.warning(
            "%d annotation file name(s) in %s have no %s image, e.g. %s",
            len(orphans), root, _IMAGE_SUFFIX, orphans[:5],
        )
    return images


def dev_split(names: Sequence[str]) -> Dict[str, List[str]]:
    """
    The project's dev split of a list of HEI-MED names: sorted, every 4th name (1-based positions
    4, 8, ...) is validation, the rest training. On the 40-image sample: 30 train, 10 val.

    Args:
        names: image names (``NAME``, without ``.jpg``).

    Returns:
        dict: ``{"train": [...], "val": [...]}``, each sorted.
    """
    ordered = sorted(names)
    return {
        "train": [n for i, n in enumerate(ordered, start=1) if i % 4 != 0],
        "val": [n for i, n in enumerate(ordered, start=1) if i % 4 == 0],
    }


def _jpeg_size(image: Path) -> Tuple[int, int]:
    """(height, width) from the image header only; base.py decodes the full image separately."""
    try:
        with Image.open(image) as img:
            return img.height, img.width
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise ConversionError(f"{image}: unreadable image ({e})") from e


def load_blobs(
    image: Path, unknown_labels: str = "ignore"
) -> Tuple[np.ndarray, Dict[int, Optional[str]]]:
    """
    Read the blob label map of one image and the lesion name of each blob.

    Args:
        image: the ``NAME.jpg`` path; ``NAME.map.gz`` and ``NAME.GND`` are looked up beside it.
        unknown_labels: "ignore" (an unknown label warns and its blob is an ignore region) or
            "stop" (it is an error).

    Returns:
        tuple: (int32 label map of the image's size, 0 = background, k = blob k;
            {blob id: lesion name of :data:`CATEGORIES`, or None for an ignore region}). Both
            files missing gives an all-zero map and no blobs.

    Raises:
        ConversionError: one of the two files missing, any format error of
            :mod:`.heimed_io` (an unknown label with "stop", a map value without a label, ...),
            or a map whose size differs from the image's; the message names the file.
    """
    folder, name = image.parent, image_name(image)
    map_path, gnd_path = folder / f"{name}.map.gz", folder / f"{name}.GND"
    height, width = _jpeg_size(image)
    has_map, has_gnd = map_path.is_file(), gnd_path.is_file()
    if not has_map and not has_gnd:
        # The dataset's own rule: no map and no GND means no annotated blob.
        return np.zeros((height, width), np.int32), {}
    if not has_map or not has_gnd:
        missing, present = (map_path, gnd_path) if not has_map else (gnd_path, map_path)
        raise ConversionError(
            f"{missing}: missing, but {present.name} exists; an image needs both files "
            "(or neither, for no annotated blobs)"
        )
    try:
        categories = read_blob_categories(gnd_path, unknown=unknown_labels)
        labels = read_label_map(map_path, num_blobs=len(categories))
    except HeimedFormatError as e:
        raise ConversionError(str(e)) from e
    except OSError as e:
        raise ConversionError(f"{e.filename or map_path}: unreadable ({e})") from e
    if labels.shape != (height, width):
        raise ConversionError(
            f"{map_path}: label map is {labels.shape[1]}x{labels.shape[0]} (WxH) but its image "
            f"{image.name} is {width}x{height}"
        )
    if categories:
        drawn = np.bincount(labels.ravel(), minlength=len(categories) + 1)[1:] > 0
        if not drawn.all():
            undrawn = (np.flatnonzero(~drawn) + 1).tolist()
            logger.warning(
                "%s lists %d blob(s) that %s does not draw (ids %s): they give no instance",
                gnd_path, len(undrawn), map_path.name, undrawn[:10],
            )
    return labels, {blob_id: c for blob_id, c in enumerate(categories, start=1)}


def _image_fields(image: Path, options: ConvertOptions) -> Dict[str, object]:
    """
    ``optic_disc_center`` ([x, y] pixels) and ``quality`` (the dataset's ELVD score) from
    ``NAME.meta``, where present. A missing ``.meta`` only loses these fields; a malformed one
    stops the run, or in skip mode loses the fields with a warning: the lesion annotations, which
    are what skip mode protects, are not in it.
    """
    meta_path = image.parent / f"{image_name(image)}.meta"
    if not meta_path.is_file():
        logger.warning("%s: missing; no optic_disc_center or quality for %s", meta_path, image.name)
        return {}
    try:
        meta = read_meta(meta_path)
    except HeimedFormatError as e:
        if options.on_error == "stop":
            raise ConversionError(str(e)) from e
        logger.warning("ignoring %s: %s", meta_path, e)
        return {}
    fields: Dict[str, object] = {}
    center = optic_nerve_center(meta)
    if center is not None:
        fields["optic_disc_center"] = [center[0], center[1]]
    try:
        quality = float(meta["QualityValue"])
    except (KeyError, ValueError):
        quality = None
    if quality is not None and np.isfinite(quality):
        fields["quality"] = quality
    return fields


def build_samples(
    root: Path, options: ConvertOptions, unknown_labels: str = "ignore"
) -> Dict[str, Sample]:
    """
    One :class:`Sample` per ``NAME.jpg`` of the HEI-MED folder.

    Args:
        root: the HEI-MED folder.
        options: common converter options (``on_error`` decides about malformed ``.meta``).
        unknown_labels: see :func:`load_blobs`.

    Returns:
        dict[str, Sample]: by image name, sorted. Label maps are read lazily, at conversion.
    """
    return {
        image_name(image): Sample(
            image=image,
            label_map=functools.partial(load_blobs, image, unknown_labels=unknown_labels),
            fields=_image_fields(image, options),
        )
        for image in list_heimed_images(root)
    }


def add_arguments(parser) -> None:
    """HEI-MED's own flag: ``--split-file``."""
    parser.add_argument(
        "--split-file",
        type=Path,
        default=None,
        help='JSON {"train": [NAME, ...], "val": [...]} of image names without .jpg; writes one '
        "COCO file per split instead of all.json (e.g. configs/splits/heimed_dev.json)",
    )


def convert(
    root: Path,
    out_dir: Path,
    options: Optional[ConvertOptions] = None,
    split_file: Optional[Path] = None,
    unknown_labels: str = "ignore",
) -> dict:
    """
    Convert a HEI-MED folder.

    Args:
        root: the folder holding ``NAME.jpg``, ``NAME.map.gz``, ``NAME.GND``, ``NAME.meta``.
        out_dir: output folder (see :mod:`.base`).
        options: common converter options; default :class:`ConvertOptions`.
        split_file: optional split file of image names (see :func:`.base.read_split_file`);
            without it every image goes to ``all.json``.
        unknown_labels: a ``.GND`` label :func:`.heimed_io.blob_category` does not know warns
            and becomes an ignore region ("ignore", the default), or stops the run ("stop";
            skips the image with ``options.on_error="skip"``).

    Returns:
        dict: the summary written to ``summary.json``.

    Raises:
        ConversionError: missing folder, no images, a bad split file or unknown names in it, or
            (with ``on_error="stop"``) the first bad image or annotation file.
    """
    options = options if options is not None else ConvertOptions()
    if unknown_labels not in UNKNOWN_LABEL_POLICIES:
        raise ValueError(
            f"unknown_labels must be one of {UNKNOWN_LABEL_POLICIES}, got {unknown_labels!r}"
        )
    root = require_dir(Path(root), "the HEI-MED folder (NAME.jpg, NAME.map.gz, NAME.GND, ...)")
    samples = build_samples(root, options, unknown_labels)
    if split_file is None:
        splits = {"all": list(samples.values())}
    else:
        splits = split_samples(samples, Path(split_file), "HEI-MED")
    return convert_samples(DATASET, {"seg": splits}, root, out_dir, CATEGORIES, options)
