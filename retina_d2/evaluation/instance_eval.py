"""Instance AP / AR of lesion detections and masks, as pycocotools' COCOeval computes them.

COCO's headline numbers (AP over IoU 0.50:0.95, 100 detections per image) are the wrong lens for
lesions of a few pixels, where a one-pixel shift moves IoU by tens of percent, and for images that
hold hundreds of exudates. The lesion papers report AP at IoU 0.35 / 0.5 / 0.75 with the detection
limit raised, so this module runs COCOeval twice per task:

- with ``params.iouThrs = iou_thresholds`` and ``params.maxDets = [1, 10, max_dets]``, which gives
  ``AP35``, ``AP50``, ``AP75`` (name: ``"AP" + str(round(t * 100))``), the same by size
  (``AP35s``, ``AP50m``, ...), by category (``AP35-<name>``, ...) and recall (``AR35``, ...);
- with COCO's default thresholds (0.50:0.95) and the same maxDets, which gives ``AP``, ``APs``,
  ``APm``, ``APl``, ``AR`` and ``AP-<name>``.

Every number is read from ``COCOeval.eval["precision"]`` / ``["recall"]`` (the mean of the
entries > -1, x100), never from ``stats``, whose thresholds and maxDets are hard-coded. A
category or size range without ground truth gives NaN, as Detectron2's COCOEvaluator reports it,
and means over categories skip it. COCO's area ranges (32^2, 96^2) are kept: nearly every lesion
is "small", so the size split at IoU 0.5 (``AP50s``) says more than ``APs`` at 0.50:0.95.

:func:`evaluate_coco_results` works on a COCO GT file and a COCO results file alone (no Detectron2
catalog); :class:`LesionInstanceEvaluator` is its Detectron2 ``DatasetEvaluator`` and
``tools/evaluate.py`` its command line.
"""
import contextlib
import copy
import io
import itertools
import json
import logging
import math
import numbers
import os
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tabulate import tabulate

import detectron2.utils.comm as comm
from detectron2.data import MetadataCatalog
from detectron2.data.datasets.coco import convert_to_coco_json
from detectron2.evaluation import DatasetEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.utils.file_io import PathManager

from .scored_model import scored_model

__all__ = [
    "LesionInstanceEvaluator",
    "LesionPredictionCollector",
    "InstanceEvalError",
    "evaluate_coco_results",
    "format_instance_metrics",
    "precision_recall_curves",
    "load_coco_gt",
    "load_coco_results",
    "iou_name",
    "write_metrics_json",
    "TASKS",
    "BACKENDS",
]

logger = logging.getLogger(__name__)

TASKS = ("bbox", "segm")
# "pycocotools" is the reference; "faster_coco_eval" (compiled) gives identical arrays, tested in
# tests/evaluation/test_instance_eval.py, and pays off on large test sets.
BACKENDS = ("pycocotools", "faster_coco_eval")
# COCOeval's area-range order: all, small, medium, large.
_SIZES = (("s", 1), ("m", 2), ("l", 3))

GroundTruth = Union[str, os.PathLike, dict, COCO]
Results = Union[str, os.PathLike, List[dict]]


class InstanceEvalError(ValueError):
    """A GT or results file that cannot be evaluated; the message names the file."""


def iou_name(threshold: float) -> str:
    """0.35 -> "35": the suffix of the metric names at that IoU threshold."""
    return str(round(threshold * 100))


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


def _check_results(
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


def _annotated_types(
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


def _keep_annotated(
    results: List[dict],
    coco_gt: COCO,
    annotated_category_ids: Optional[Mapping[int, Iterable[int]]],
) -> List[dict]:
    """Drop predictions of lesion types their image is not annotated for (e-ophtha protocol).

    Each image's types come from ``annotated_category_ids`` when given, else from the GT image
    record's field of that name; an image with neither keeps all its predictions.
    """
    annotated = _annotated_types(coco_gt, annotated_category_ids)
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


def _backend(name: str):
    if name == "pycocotools":
        return COCO, COCOeval
    if name == "faster_coco_eval":
        from faster_coco_eval import COCO as FasterCOCO
        from faster_coco_eval import COCOeval_faster

        def make_eval(gt, dt, iou_type):
            return COCOeval_faster(gt, dt, iou_type, print_function=lambda *args: None)

        return FasterCOCO, make_eval
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def _run_cocoeval(
    coco_gt: COCO,
    results: List[dict],
    task: str,
    iou_thresholds: Optional[Sequence[float]],
    max_dets: int,
    backend: str,
) -> dict:
    """One COCOeval evaluate() + accumulate(); returns its ``eval`` dict (precision, recall)."""
    coco_cls, eval_cls = _backend(backend)
    gt = coco_gt
    if not isinstance(coco_gt, coco_cls):
        gt = coco_cls()
        gt.dataset = coco_gt.dataset
        with contextlib.redirect_stdout(io.StringIO()):
            gt.createIndex()
    results = copy.deepcopy(results)  # loadRes writes area/id/iscrowd into the dicts
    if task == "segm":
        # As Detectron2 does: with a bbox present, loadRes takes the box area as the instance's,
        # which would put masks in the wrong size range.
        for r in results:
            r.pop("bbox", None)
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            dt = gt.loadRes(results)
        else:
            # pycocotools' loadRes cannot take an empty list; no detections = all GT missed.
            dt = coco_cls()
            dt.dataset = {
                "images": list(gt.dataset["images"]),
                "categories": copy.deepcopy(gt.dataset["categories"]),
                "annotations": [],
            }
            dt.createIndex()
        coco_eval = eval_cls(gt, dt, task)
        if iou_thresholds is not None:
            coco_eval.params.iouThrs = np.asarray(iou_thresholds, dtype=np.float64)
        coco_eval.params.maxDets = _max_dets_list(max_dets)
        coco_eval.evaluate()
        coco_eval.accumulate()
    return coco_eval.eval


def _max_dets_list(max_dets: int) -> List[int]:
    """COCO's [1, 10, 100] with 100 -> max_dets. Limits above max_dets are dropped: COCOeval
    sorts maxDets and scores the last, which would otherwise be 10."""
    return [d for d in (1, 10) if d < max_dets] + [int(max_dets)]


def _mean_percent(values: np.ndarray) -> float:
    """Mean of the entries > -1 (COCOeval's "not applicable"), x100; NaN when there are none."""
    valid = values[values > -1]
    return float(np.mean(valid) * 100) if valid.size else float("nan")


def _summarize(
    at_thresholds: dict, coco_range: dict, iou_thresholds: Sequence[float], names: Sequence[str]
) -> "OrderedDict[str, float]":
    """Metric name -> percent, from the accumulated arrays of the two COCOeval runs.

    ``precision`` is [T, R, K, A, M] and ``recall`` [T, K, A, M] (IoU, recall point, category,
    area range, maxDets); M = -1 is max_dets.
    """
    p, r = at_thresholds["precision"], at_thresholds["recall"]
    p_range, r_range = coco_range["precision"], coco_range["recall"]
    keys = [iou_name(t) for t in iou_thresholds]
    m = OrderedDict()
    for i, k in enumerate(keys):
        m[f"AP{k}"] = _mean_percent(p[i, :, :, 0, -1])
    m["AP"] = _mean_percent(p_range[:, :, :, 0, -1])
    for size, a in _SIZES:
        m[f"AP{size}"] = _mean_percent(p_range[:, :, :, a, -1])
    for size, a in _SIZES:
        for i, k in enumerate(keys):
            m[f"AP{k}{size}"] = _mean_percent(p[i, :, :, a, -1])
    for i, k in enumerate(keys):
        m[f"AR{k}"] = _mean_percent(r[i, :, 0, -1])
    m["AR"] = _mean_percent(r_range[:, :, 0, -1])
    for c, name in enumerate(names):
        for i, k in enumerate(keys):
            m[f"AP{k}-{name}"] = _mean_percent(p[i, :, c, 0, -1])
        m[f"AP-{name}"] = _mean_percent(p_range[:, :, c, 0, -1])
    return m


def evaluate_coco_results(
    gt: GroundTruth,
    results: Results,
    iou_thresholds: Sequence[float] = (0.35, 0.5, 0.75),
    max_dets: int = 256,
    annotated_only: bool = False,
    tasks: Sequence[str] = TASKS,
    *,
    annotated_category_ids: Optional[Mapping[int, Iterable[int]]] = None,
    backend: str = "pycocotools",
) -> "OrderedDict[str, OrderedDict[str, float]]":
    """Instance AP / AR of COCO results against a COCO GT, as pycocotools' COCOeval gives them.

    Args:
        gt: a COCO instances JSON path, its loaded dict, or a ``pycocotools.coco.COCO``.
        results: a COCO results JSON path or list (image_id, category_id, score, bbox and/or
            RLE segmentation); category ids are the GT's.
        iou_thresholds: the IoU thresholds of ``AP<t>``, ``AR<t>`` and their breakdowns.
        max_dets: detections per image (per category, as COCOeval counts) that are scored;
            COCOeval's maxDets becomes [1, 10, max_dets] (without the limits above max_dets).
        annotated_only: keep only predictions of the lesion types each image is annotated for
            (the image record's ``annotated_category_ids``; e-ophtha grades one type per image).
        tasks: "bbox" and/or "segm". segm is dropped, with a warning, when no result has a mask.
        annotated_category_ids: image id -> annotated category ids, overriding the GT records'
            (the evaluator passes the dataset dicts'); used only with annotated_only.
        backend: "pycocotools" (the reference) or "faster_coco_eval" (same numbers, faster).

    Returns:
        task -> metric name -> percent (NaN where no GT applies): ``AP<t>`` per threshold, ``AP``
        (0.50:0.95), ``APs/APm/APl`` (0.50:0.95), ``AP<t>s/m/l``, ``AR<t>``, ``AR`` (0.50:0.95,
        at max_dets), and per category ``AP<t>-<name>`` and ``AP-<name>``.

    Raises:
        InstanceEvalError: missing or malformed files, results whose image ids are not in the GT,
            results where only some detections have a mask or a box, a detection with a NaN,
            infinite or non-numeric score, a malformed bbox or id, or a mask whose size is not its
            GT image's (the message names the entry's index and image_id).
    """
    unknown = set(tasks) - set(TASKS)
    if unknown or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {tuple(tasks)}")
    if not iou_thresholds or any(not 0 < t < 1 for t in iou_thresholds):
        raise ValueError(f"iou_thresholds must lie in (0, 1), got {tuple(iou_thresholds)}")
    if len({iou_name(t) for t in iou_thresholds}) != len(iou_thresholds):
        raise ValueError(f"iou_thresholds must differ in percent, got {tuple(iou_thresholds)}")
    if max_dets < 1:
        raise ValueError(f"max_dets must be >= 1, got {max_dets}")
    _backend(backend)  # fail on a bad name before any work

    coco_gt, gt_source = load_coco_gt(gt)
    results, source = load_coco_results(results)
    tasks = _check_results(results, coco_gt, source, gt_source, tasks)
    if annotated_only:
        results = _keep_annotated(results, coco_gt, annotated_category_ids)
    if not results:
        logger.warning("no predictions to evaluate: every AP is 0 (NaN where there is no GT)")

    # COCOeval orders categories by sorted id.
    names = [coco_gt.cats[c]["name"] for c in sorted(coco_gt.getCatIds())]
    metrics = OrderedDict()
    for task in tasks:
        at_thresholds = _run_cocoeval(coco_gt, results, task, iou_thresholds, max_dets, backend)
        coco_range = _run_cocoeval(coco_gt, results, task, None, max_dets, backend)
        metrics[task] = _summarize(at_thresholds, coco_range, iou_thresholds, names)
    return metrics


def precision_recall_curves(
    gt: GroundTruth,
    results: Results,
    task: str = "segm",
    iou_thresholds: Sequence[float] = (0.35, 0.5, 0.75),
    max_dets: int = 256,
) -> "OrderedDict[str, OrderedDict[float, Tuple[np.ndarray, np.ndarray]]]":
    """COCOeval's interpolated precision at its 101 recall points, per category and IoU threshold.

    Returns:
        category name -> IoU threshold -> (recall, precision), the points where COCOeval defines
        precision (recall levels the detector never reaches are left out); categories without
        ground truth are left out. Empty for segm when the results have no masks.
    """
    coco_gt, gt_source = load_coco_gt(gt)
    results, source = load_coco_results(results)
    if not _check_results(results, coco_gt, source, gt_source, (task,)):
        return OrderedDict()  # segm asked of box-only results (warned about)
    evaluated = _run_cocoeval(coco_gt, results, task, iou_thresholds, max_dets, "pycocotools")
    precision = evaluated["precision"]  # [IoU, recall, category, area, maxDets]
    recall_points = evaluated["params"].recThrs
    curves = OrderedDict()
    for k, category_id in enumerate(sorted(coco_gt.getCatIds())):
        per_iou = OrderedDict()
        for t, threshold in enumerate(iou_thresholds):
            values = precision[t, :, k, 0, -1]
            defined = values > -1  # -1: no ground truth of this category
            if defined.any():
                per_iou[float(threshold)] = (recall_points[defined], values[defined])
        if per_iou:
            curves[coco_gt.cats[category_id]["name"]] = per_iou
    return curves


def format_instance_metrics(
    metrics: Mapping[str, Mapping[str, float]],
    iou_thresholds: Sequence[float] = (0.35, 0.5, 0.75),
    max_dets: int = 256,
    annotated_only: bool = False,
) -> str:
    """The metrics of :func:`evaluate_coco_results` as three pipe tables (summary, by size, by
    category), headed by the protocol: thresholds, maxDets and whether annotated_only applied."""
    keys = [iou_name(t) for t in iou_thresholds]
    ap_cols = [f"AP{k}" for k in keys] + ["AP"]
    protocol = (
        f"Instance metrics (COCOeval, %), IoU {'/'.join(str(t) for t in iou_thresholds)}, "
        f"maxDets {max_dets}; AP = IoU 0.50:0.95; NaN = no ground truth.\n"
    )
    if annotated_only:
        protocol += (
            "annotated_only applied: predictions of lesion types an image is not annotated for "
            "were dropped (e-ophtha protocol).\n"
        )
    else:
        protocol += "annotated_only not applied: every prediction is scored.\n"
    lines = [protocol]
    summary_cols = ap_cols + [f"AR{k}" for k in keys] + ["AR"]
    rows = [[task] + [m.get(c) for c in summary_cols] for task, m in metrics.items()]
    lines.append(_table(rows, ["task"] + summary_cols))
    rows = [
        [task, size] + [m.get(c + size) for c in ap_cols]
        for task, m in metrics.items()
        for size in ("s", "m", "l")
    ]
    lines.append("\nBy size (COCO area ranges: s < 32^2 <= m < 96^2 <= l):\n")
    lines.append(_table(rows, ["task", "size"] + ap_cols))
    rows = [
        [task, name[3:]] + [m.get(c + name[2:]) for c in ap_cols]
        for task, m in metrics.items()
        for name in m
        if name.startswith("AP-")
    ]
    if rows:
        lines.append("\nBy category:\n")
        lines.append(_table(rows, ["task", "category"] + ap_cols))
    return "".join(lines)


def _table(rows, headers) -> str:
    return tabulate(rows, headers=headers, tablefmt="pipe", floatfmt=".3f", numalign="left")


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


class LesionPredictionCollector(DatasetEvaluator):
    """Collects a lesion model's instance predictions as COCO results for the dataset's COCO GT.

    The shared part of :class:`LesionInstanceEvaluator` and
    :class:`~retina_d2.evaluation.LesionFROCEvaluator`: the GT file (``metadata.json_file``),
    ``reset`` / ``process``, and the gathering of predictions with the GT's category ids.
    Subclasses check their own arguments before calling ``__init__`` and implement ``evaluate``
    with :meth:`_gather_results`.
    """

    def __init__(
        self, dataset_name: str, output_dir: Optional[str] = None, *, distributed: bool = True
    ):
        """
        Args:
            dataset_name: a registered dataset whose metadata has ``json_file`` (else one is
                written to output_dir from the catalog, as COCOEvaluator does) and
                ``thing_dataset_id_to_contiguous_id``.
            output_dir: where the subclass saves its outputs (None: not saved).
            distributed: gather predictions from all ranks and evaluate on the main one.
        """
        # The subclass's module: its log lines keep the logger they had as separate classes.
        self._logger = logging.getLogger(type(self).__module__)
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._distributed = distributed
        self._cpu_device = torch.device("cpu")
        # The weights and iteration scored (scored_model.py), for eval_info.json; from_config
        # sets them.
        self.scored_model: dict = {}

        self._metadata = MetadataCatalog.get(dataset_name)
        if not hasattr(self._metadata, "json_file"):
            if output_dir is None:
                raise ValueError(
                    f"dataset {dataset_name!r} has no metadata.json_file; give an output_dir to "
                    "write one from the catalog"
                )
            cache_path = os.path.join(output_dir, f"{dataset_name}_coco_format.json")
            self._metadata.json_file = cache_path
            convert_to_coco_json(dataset_name, cache_path)
        self._coco_gt, _ = load_coco_gt(PathManager.get_local_path(self._metadata.json_file))
        self.reset()

    def reset(self):
        self._predictions = []

    def process(self, inputs, outputs):
        """
        Args:
            inputs: the model's inputs (dicts with "image_id", and "annotated_category_ids" when
                the dataset has it).
            outputs: dicts with "instances" (pred_boxes, scores, pred_classes, pred_masks).
        """
        for inp, out in zip(inputs, outputs):
            prediction = {"image_id": inp["image_id"], "instances": []}
            if "instances" in out:
                instances = out["instances"].to(self._cpu_device)
                prediction["instances"] = instances_to_coco_json(instances, inp["image_id"])
            if "annotated_category_ids" in inp:
                prediction["annotated_category_ids"] = list(inp["annotated_category_ids"])
            self._predictions.append(prediction)

    def _gather_results(self) -> Optional[Tuple[List[dict], Dict[int, List[int]]]]:
        """The predictions of all ranks (with distributed) as COCO results.

        Returns:
            (COCO results with the GT's category ids, image id -> annotated category ids of the
            images whose inputs gave them); None off the main process, which evaluates nothing.
        """
        if self._distributed:
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(self._predictions, dst=0)))
            if not comm.is_main_process():
                return None
        else:
            predictions = self._predictions
        if not predictions:
            self._logger.warning(f"[{type(self).__name__}] received no images to score")

        results = self._to_dataset_ids(itertools.chain(*(p["instances"] for p in predictions)))
        annotated = {
            p["image_id"]: p["annotated_category_ids"]
            for p in predictions
            if "annotated_category_ids" in p
        }
        return results, annotated

    def _write_eval_info(self) -> None:
        """``eval_info.json``: the GT file and image folder the report's gallery reads."""
        if not self._output_dir:
            return
        info = {
            "dataset": self._dataset_name,
            "gt_json": os.path.abspath(PathManager.get_local_path(self._metadata.json_file)),
            "image_root": getattr(self._metadata, "image_root", None),
            **({"model": self.scored_model} if self.scored_model else {}),
        }
        PathManager.mkdirs(self._output_dir)
        with PathManager.open(os.path.join(self._output_dir, "eval_info.json"), "w") as f:
            json.dump(info, f, indent=2)

    def _to_dataset_ids(self, coco_results: Iterable[dict]) -> List[dict]:
        """Contiguous class ids (the model's) -> the GT's category ids."""
        coco_results = list(coco_results)
        if not hasattr(self._metadata, "thing_dataset_id_to_contiguous_id"):
            return coco_results
        to_dataset_id = {v: k for k, v in self._metadata.thing_dataset_id_to_contiguous_id.items()}
        for r in coco_results:
            if r["category_id"] not in to_dataset_id:
                raise ValueError(
                    f"a prediction has class {r['category_id']}, but {self._dataset_name} has "
                    f"classes 0..{len(to_dataset_id) - 1}"
                )
            r["category_id"] = to_dataset_id[r["category_id"]]
        return coco_results


class LesionInstanceEvaluator(LesionPredictionCollector):
    """Instance AP at IoU 0.35 / 0.5 / 0.75 (and COCO's 0.50:0.95) of a lesion model's outputs.

    Built like Detectron2's ``COCOEvaluator``; the numbers are those of
    :func:`evaluate_coco_results` on ``metadata.json_file`` and the collected predictions.
    ``evaluate()`` returns ``{"bbox": {...}, "segm": {...}}`` in percent, and with an output_dir
    writes ``coco_instances_results.json`` and ``instance_metrics.json`` there.
    """

    def __init__(
        self,
        dataset_name: str,
        tasks: Sequence[str] = TASKS,
        output_dir: Optional[str] = None,
        iou_thresholds: Sequence[float] = (0.35, 0.5, 0.75),
        max_dets: int = 256,
        annotated_only: bool = False,
        *,
        distributed: bool = True,
        backend: str = "pycocotools",
    ):
        """
        Args:
            dataset_name: a registered dataset whose metadata has ``json_file`` (else one is
                written to output_dir from the catalog, as COCOEvaluator does) and
                ``thing_dataset_id_to_contiguous_id``.
            tasks: "bbox" and/or "segm".
            output_dir: where predictions and metrics are saved (None: not saved).
            iou_thresholds, max_dets, annotated_only, backend: see :func:`evaluate_coco_results`.
            distributed: gather predictions from all ranks and evaluate on the main one.
        """
        unknown = set(tasks) - set(TASKS)
        if unknown or not tasks:
            raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {tuple(tasks)}")
        _backend(backend)
        self._tasks = tuple(tasks)
        self._iou_thresholds = tuple(float(t) for t in iou_thresholds)
        self._max_dets = int(max_dets)
        self._annotated_only = bool(annotated_only)
        self._backend = backend
        super().__init__(dataset_name, output_dir, distributed=distributed)

    @classmethod
    def from_config(cls, cfg, dataset_name: str, output_dir: Optional[str] = None):
        """An evaluator with ``cfg.RETINA.EVAL``'s thresholds, maxDets and annotated_only; segm
        only when ``MODEL.MASK_ON``."""
        tasks = TASKS if cfg.MODEL.MASK_ON else ("bbox",)
        max_dets = cfg.RETINA.EVAL.MAX_DETS
        if cfg.TEST.DETECTIONS_PER_IMAGE > max_dets:
            logger.warning(
                "TEST.DETECTIONS_PER_IMAGE=%d > RETINA.EVAL.MAX_DETS=%d: detections beyond %d per "
                "image and category are not scored",
                cfg.TEST.DETECTIONS_PER_IMAGE,
                max_dets,
                max_dets,
            )
        evaluator = cls(
            dataset_name,
            tasks=tasks,
            output_dir=output_dir,
            iou_thresholds=tuple(cfg.RETINA.EVAL.IOU_THRESHOLDS),
            max_dets=max_dets,
            annotated_only=cfg.RETINA.EVAL.ANNOTATED_ONLY,
        )
        evaluator.scored_model = scored_model(cfg)
        return evaluator

    def evaluate(self):
        gathered = self._gather_results()
        if gathered is None:
            return {}
        results, annotated = gathered
        if self._output_dir:
            self._write_eval_info()
            path = os.path.join(self._output_dir, "coco_instances_results.json")
            self._logger.info("Saving results to %s", path)
            with PathManager.open(path, "w") as f:
                json.dump(results, f)

        metrics = evaluate_coco_results(
            self._coco_gt,
            results,
            self._iou_thresholds,
            self._max_dets,
            self._annotated_only,
            self._tasks,
            annotated_category_ids=annotated,
            backend=self._backend,
        )
        self._logger.info(
            f"Evaluation results of {self._dataset_name}:\n"
            + format_instance_metrics(
                metrics, self._iou_thresholds, self._max_dets, self._annotated_only
            )
        )
        if self._output_dir:
            write_metrics_json(metrics, os.path.join(self._output_dir, "instance_metrics.json"))
        return copy.deepcopy(metrics)
