"""COCO ground truth and results as the evaluators, ``tools/evaluate.py`` and the report read
them, checked, and metrics files as the evaluators write them.

The checks name the file and the record: a GT or results file that pycocotools would crash on
or silently misread (an annotation of an image the file does not list, a NaN score, a mask of
another resolution) raises :class:`InstanceEvalError` instead of scoring wrongly.
"""
import copy
import contextlib
import io
import json
import logging
import math
import numbers
import os
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from pycocotools.coco import COCO

from detectron2.utils.file_io import PathManager

__all__ = [
    "GroundTruth",
    "InstanceEvalError",
    "Results",
    "annotated_types",
    "check_results",
    "keep_annotated",
    "load_coco_gt",
    "load_coco_results",
    "write_metrics_json",
]

logger = logging.getLogger(__name__)

GroundTruth = Union[str, os.PathLike, dict, COCO]
Results = Union[str, os.PathLike, List[dict]]


class InstanceEvalError(ValueError):
    """A GT or results file that cannot be evaluated; the message names the file."""


def _read_json(path: Path, what: str):
    if not path.is_file():
        raise InstanceEvalError(f"{what} file not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InstanceEvalError(f"{what} file {path} is not valid JSON: {e}") from e


def load_coco_gt(gt: GroundTruth) -> Tuple[COCO, str]:
    """A COCO GT file, dict or ``pycocotools.coco.COCO`` -> (COCO, its name for messages).

    Raises:
        InstanceEvalError: a missing or malformed file, one without COCO's three lists, or a
            record with a value of the wrong type (a non-positive or string image size, a bbox
            or area that is not finite numbers, iscrowd not 0/1) or an annotation of an image or
            category the file does not list; the message names the record.
    """
    if isinstance(gt, COCO):
        return gt, "<COCO object>"
    if isinstance(gt, dict):
        # COCOeval writes "ignore" into the GT annotations: leave the caller's dict as it was.
        dataset, source = copy.deepcopy(gt), "<GT dict>"
    else:
        source = str(gt)
        dataset = _read_json(Path(gt), "GT")
    if not isinstance(dataset, dict):
        raise InstanceEvalError(f"GT file {source} is not a COCO instances file (not an object)")
    missing = [k for k in ("images", "annotations", "categories") if k not in dataset]
    if missing:
        raise InstanceEvalError(
            f"GT file {source} is not a COCO instances file (missing {', '.join(missing)})"
        )
    problem = _gt_problem(dataset)
    if problem:
        raise InstanceEvalError(f"GT file {source}: {problem}")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress
        coco.createIndex()
    return coco, source


def _gt_problem(dataset: dict) -> Optional[str]:
    """The first value of a COCO GT that pycocotools would crash on or silently misread (an
    annotation of an image or category the file does not list is dropped from the scores), as
    "<where> has <what>"; None when there is none."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset[key], list) or not all(isinstance(x, dict) for x in dataset[key]):
            return f"{key} is not a list of objects"
    for i, category in enumerate(dataset["categories"]):
        if not _is_id(category.get("id")) or not isinstance(category.get("name"), str):
            return f"category {i} has no integer id and name: {str(category)[:100]}"
    for i, image in enumerate(dataset["images"]):
        if not _is_id(image.get("id")):
            return f"image {i} has id {image.get('id')!r}: not an integer or string"
        for side in ("height", "width"):
            value = image.get(side)
            if not (_is_id(value) and not isinstance(value, str) and value > 0):
                return f"image {i} (id {image['id']}) has {side} {value!r}: not a positive integer"
    images = {image["id"] for image in dataset["images"]}
    categories = {category["id"] for category in dataset["categories"]}
    for i, ann in enumerate(dataset["annotations"]):
        problem = _annotation_problem(ann, images, categories)
        if problem:
            return f"annotation {i} (id {ann.get('id')!r}) {problem}"
    return None


def _annotation_problem(ann: dict, images: set, categories: set) -> Optional[str]:
    if not _is_id(ann.get("id")):
        return "has no integer id"
    for key, listed, known in (
        ("image_id", "images", images),
        ("category_id", "categories", categories),
    ):
        value = ann.get(key)
        if not _is_id(value) or value not in known:
            return f"has {key} {value!r}, which the file's {listed} do not list"
    box = ann.get("bbox", [0, 0, 0, 0])
    if not _is_box(box):
        return f"has bbox {str(box)[:100]}: not 4 finite numbers, width and height >= 0"
    area = ann.get("area", 0)
    if not (_is_number(area) and math.isfinite(area) and area >= 0):
        return f"has area {area!r}: not a finite number >= 0"
    if ann.get("iscrowd", 0) not in (0, 1):  # True / False compare equal to 1 / 0: accepted
        return f"has iscrowd {ann['iscrowd']!r}: not 0 or 1"
    segmentation = ann.get("segmentation", [])
    if not (isinstance(segmentation, list) or _is_rle(segmentation)):
        return f"has segmentation {str(segmentation)[:100]}: not polygons or RLE"
    return None


def _is_box(box) -> bool:
    """4 finite numbers [x, y, width, height] with width, height >= 0."""
    return (
        isinstance(box, (list, tuple))
        and len(box) == 4
        and all(_is_number(v) and math.isfinite(v) for v in box)
        and box[2] >= 0
        and box[3] >= 0
    )


def load_coco_results(results: Results) -> Tuple[List[dict], str]:
    """A COCO results file or list -> (list of result dicts, its name for messages).

    Raises:
        InstanceEvalError: a missing or malformed file, or JSON that is not a list.
    """
    if isinstance(results, list):
        return results, "<results list>"
    source = str(results)
    loaded = _read_json(Path(results), "results")
    if not isinstance(loaded, list):
        raise InstanceEvalError(
            f"results file {source} must hold a JSON list of detections, "
            f"got {type(loaded).__name__}"
        )
    return loaded, source


def check_results(
    results: List[dict], coco_gt: COCO, source: str, gt_source: str, tasks: Sequence[str]
) -> Tuple[str, ...]:
    """Raise on results COCOeval would crash on or misread; return the tasks that can be run.

    A results file without any ``segmentation`` (a box detector's) is evaluated for bbox only,
    with a warning; one where only some entries have a mask is malformed and raises.
    """
    for i, r in enumerate(results):
        if (
            not isinstance(r, dict)
            or any(k not in r for k in ("image_id", "category_id", "score"))
            or ("bbox" not in r and "segmentation" not in r)
        ):
            raise InstanceEvalError(
                f"results file {source}: entry {i} is not a COCO detection (needs image_id, "
                f"category_id, score and bbox or segmentation): {str(r)[:200]}"
            )
        problem = _detection_problem(r, coco_gt.imgs)
        if problem:
            raise InstanceEvalError(f"results file {source}: entry {i} {problem}")
    gt_images = set(coco_gt.getImgIds())
    foreign = sorted({r["image_id"] for r in results} - gt_images, key=str)
    if foreign:
        raise InstanceEvalError(
            f"results file {source} has image_ids that are not in GT {gt_source} "
            f"({len(foreign)} ids, e.g. {foreign[:5]}): a results file for another GT?"
        )
    tasks = tuple(tasks)
    for key, task in (("segmentation", "segm"), ("bbox", "bbox")):
        have = sum(key in r for r in results)
        if 0 < have < len(results):
            raise InstanceEvalError(
                f"results file {source}: {len(results) - have} of {len(results)} entries have no "
                f"{key!r}; a results file gives it for every detection or for none"
            )
        if key == "segmentation" and have:
            bad = next((r for r in results if not _is_rle(r["segmentation"])), None)
            if bad is not None:
                raise InstanceEvalError(
                    f"results file {source}: segmentation must be RLE ({{'size', 'counts'}}), got "
                    f"{str(bad['segmentation'])[:100]}"
                )
    if "segm" in tasks and results and "segmentation" not in results[0]:
        logger.warning(
            "results file %s has no segmentation: evaluating bbox only (segm skipped)", source
        )
        tasks = tuple(t for t in tasks if t != "segm")
    known = set(coco_gt.getCatIds())
    stray = sorted({r["category_id"] for r in results} - known, key=str)
    if stray:
        logger.warning(
            "results file %s: category ids %s are not in GT %s and are ignored (contiguous ids "
            "not mapped back to dataset ids?)",
            source,
            stray,
            gt_source,
        )
    return tasks


def _is_rle(segmentation) -> bool:
    return isinstance(segmentation, dict) and "size" in segmentation and "counts" in segmentation


def _is_number(value) -> bool:
    # bool is an int to Python, but a score of `true` is a broken file, not a 1.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_id(value) -> bool:
    """A COCO id: an integer (1.0 as JSON may write it) or a string; lists, null, booleans and
    fractions are not (they would crash or silently match nothing)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Real):
        return float(value).is_integer()
    return isinstance(value, str)


def _detection_problem(r: dict, gt_images: Mapping[object, dict]) -> Optional[str]:
    """What is wrong with one detection's values (None: nothing), as the rest of the sentence
    "entry <i> ...". COCOeval would otherwise crash on a string, or rank a NaN or infinite score
    anywhere (all-NaN scores gave AP 100), or match a mask of another resolution against nothing.
    """
    image_id = r["image_id"]
    if not _is_id(image_id):
        return f"has image_id {image_id!r}: not an integer or string"
    where = f"(image_id {image_id})"
    if not _is_id(r["category_id"]):
        return f"{where} has category_id {r['category_id']!r}: not an integer or string"
    score = r["score"]
    if not _is_number(score):
        return f"{where} has score {score!r}: not a number"
    if not math.isfinite(score):
        return f"{where} has score {score}: scores must be finite numbers"
    if "bbox" in r:
        box = r["bbox"]
        if (
            not isinstance(box, (list, tuple))
            or len(box) != 4
            or not all(_is_number(v) and math.isfinite(v) for v in box)
        ):
            return f"{where} has bbox {str(box)[:100]}: not 4 finite numbers [x, y, width, height]"
        if box[2] < 0 or box[3] < 0:
            return f"{where} has bbox {box}: negative width or height"
    if "segmentation" in r and _is_rle(r["segmentation"]):
        return _mask_problem(r["segmentation"], gt_images.get(image_id), where)
    return None


def _mask_problem(rle: dict, image: Optional[dict], where: str) -> Optional[str]:
    """A predicted RLE's problem: a malformed size or counts, or a size other than its GT
    image's (pycocotools would score such a mask as overlapping nothing, silently)."""
    size, counts = rle["size"], rle["counts"]
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(_is_id(v) and not isinstance(v, str) for v in size)
    ):
        return f"{where} has mask size {str(size)[:50]}: not [height, width]"
    if not isinstance(counts, (str, bytes, list)):
        return f"{where} has mask counts {str(counts)[:50]}: not an RLE string or list"
    if image is None or "height" not in image or "width" not in image:
        return None  # an image_id not in the GT: reported as such by the caller
    if [int(v) for v in size] != [image["height"], image["width"]]:
        return (
            f"{where} has a {int(size[0])}x{int(size[1])} mask (height x width) but GT image "
            f"{image['id']} ({image.get('file_name', 'no file_name')}) is "
            f"{image['height']}x{image['width']}: predictions made at another resolution?"
        )
    return None


def annotated_types(
    coco_gt: COCO, annotated_category_ids: Optional[Mapping[int, Iterable[int]]] = None
) -> Dict[int, set]:
    """Image id -> the category ids the image is annotated for: the GT image records'
    ``annotated_category_ids``, overridden per image by ``annotated_category_ids`` when given.
    Images that list none are absent (annotated for every type)."""
    annotated = {
        img["id"]: set(img["annotated_category_ids"])
        for img in coco_gt.dataset["images"]
        if "annotated_category_ids" in img
    }
    if annotated_category_ids:
        annotated.update({k: set(v) for k, v in annotated_category_ids.items()})
    return annotated


def keep_annotated(
    results: List[dict],
    coco_gt: COCO,
    annotated_category_ids: Optional[Mapping[int, Iterable[int]]],
) -> List[dict]:
    """Drop predictions of lesion types their image is not annotated for (e-ophtha protocol).

    Each image's types come from ``annotated_category_ids`` when given, else from the GT image
    record's field of that name; an image with neither keeps all its predictions.
    """
    annotated = annotated_types(coco_gt, annotated_category_ids)
    if not annotated:
        logger.warning("annotated_only: no image lists annotated_category_ids; nothing dropped")
        return results
    kept = [
        r
        for r in results
        if r["image_id"] not in annotated or r["category_id"] in annotated[r["image_id"]]
    ]
    logger.info(
        "annotated_only: dropped %d of %d predictions of non-annotated lesion types",
        len(results) - len(kept),
        len(results),
    )
    return kept


def _json_safe(metrics):
    """NaN -> None, so the file is strict JSON (jq, JavaScript) rather than Python's NaN."""
    return {
        task: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}
        for task, m in metrics.items()
    }


def write_metrics_json(metrics: Mapping[str, Mapping[str, float]], path: Union[str, Path]):
    """Write {"bbox": {...}, "segm": {...}} in percent, NaN written as null."""
    with PathManager.open(str(path), "w") as f:
        json.dump(_json_safe(metrics), f, indent=2)
