"""Lesion-level FROC and F1: how microaneurysm and exudate detection is judged in its literature.

The ROC challenge and e-ophtha score microaneurysm detectors by FROC: the sensitivity (found
lesions / all lesions) at 1/8, 1/4, 1/2, 1, 2, 4 and 8 false positives per image, and their mean,
the FROC score. Exudate papers often give the lesion-level precision / recall / F1 at one score
threshold instead. Both count lesions, not pixels or COCOeval's recall points:

- a prediction *hits* a ground-truth lesion of its category when their mask IoU >= iou_threshold
  (``match="iou"``), or when its centre lies inside the lesion (``match="center"``; the centre is
  the predicted mask's centroid, or the box centre with ``use_masks=False`` or an empty mask);
  with ``use_masks=False`` boxes stand in for masks throughout;
- each ground-truth lesion is found once: predictions are taken in descending score order, and
  one that overlaps only lesions that are hit already is a *duplicate*, neither a hit nor a false
  positive (the ROC-challenge convention; COCOeval would count it a FP). A prediction that
  overlaps several lesions not yet hit takes the one it overlaps most;
- a prediction that is neither a hit nor a duplicate but lies on a crowd / ignore region
  (``iscrowd=1``; overlap = intersection over the prediction's area, COCO's rule) is neither;
- everything else is a false positive. FPs per image divide by every image of the GT, healthy
  images (no lesion) included, as the FROC protocol counts them.

The score threshold is swept over the distinct prediction scores (predictions scoring >= the
threshold are kept; tied scores enter together), which gives the curve's operating points. The
sensitivity at an FP rate is that of the operating point with the lowest threshold whose FPs per
image <= the rate, i.e. the highest sensitivity reachable within that FP budget (a step
function, no interpolation between points); 0 when even the first point exceeds the budget.

:func:`froc_curve` works on a COCO GT file and a COCO results file alone (no Detectron2 catalog);
:class:`LesionFROCEvaluator` is its Detectron2 ``DatasetEvaluator``, and ``tools/evaluate.py
--froc`` its command line.
"""
import itertools
import json
import logging
import math
import os
import re
from collections import OrderedDict, defaultdict
from fractions import Fraction
from typing import Iterable, List, Mapping, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util
from tabulate import tabulate

from detectron2.config import configurable
from detectron2.utils.file_io import PathManager

from .coco_io import (
    GroundTruth,
    InstanceEvalError,
    Results,
    annotated_types,
    check_results,
    keep_annotated,
    load_coco_gt,
    load_coco_results,
)
from .instance_eval import LesionPredictionCollector
from ..schema import FROC_FILE, FROC_IOU, FROC_MATCH, FROC_SCORE_THRESHOLD
from .scored_model import scored_model

__all__ = [
    "FP_RATES",
    "MATCHES",
    "HIT",
    "FALSE_POSITIVE",
    "NEITHER",
    "match_lesions",
    "LesionFROCEvaluator",
    "froc_curve",
    "froc_metrics",
    "format_froc",
    "rate_name",
    "write_froc_json",
]

logger = logging.getLogger(__name__)

# The ROC challenge's FP rates (false positives per image).
FP_RATES = (1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8)
MATCHES = ("iou", "center")

# A prediction's outcome.
# The outcome of a prediction: it found a lesion, it is a false positive, or it counts as neither.
HIT, FALSE_POSITIVE, NEITHER = 1, 0, -1


def rate_name(rate: float) -> str:
    """0.125 -> "1/8", 2.0 -> "2": the FP rate as the FROC literature writes it."""
    fraction = Fraction(rate).limit_denominator(1000)
    return str(fraction.numerator) if fraction.denominator == 1 else str(fraction)


# --- matching one image and category ---------------------------------------------------------


def _centres(predictions: Sequence[dict], use_masks: bool) -> np.ndarray:
    """(N, 2) x, y of each prediction's centre, continuous pixel coordinates (pixel i spans
    [i, i + 1)): the mask's centroid, or the box's centre without masks or for an empty mask."""
    centres = np.zeros((len(predictions), 2))
    for i, p in enumerate(predictions):
        if use_masks:
            ys, xs = np.nonzero(mask_util.decode(p["segmentation"]))
            if ys.size:
                centres[i] = xs.mean() + 0.5, ys.mean() + 0.5
                continue
        x, y, w, h = _box(p)
        centres[i] = x + w / 2, y + h / 2
    return centres


def _box(obj: dict) -> List[float]:
    if "bbox" in obj:
        return [float(v) for v in obj["bbox"]]
    return [float(v) for v in mask_util.toBbox(obj["segmentation"])]


def _overlaps(
    predictions: Sequence[dict],
    regions: Sequence,
    region_is_crowd: bool,
    match: str,
    use_masks: bool,
    image_size: Sequence[int],
) -> np.ndarray:
    """(predictions, regions) overlap in [0, 1]; a pair matches when it is >= the threshold.

    ``regions`` are GT RLEs (``use_masks``) or XYWH boxes. "iou": IoU, or for crowd regions the
    fraction of the prediction inside them; "center": 1 when the prediction's centre is inside.
    """
    if not predictions or not regions:
        return np.zeros((len(predictions), len(regions)))
    if match == "iou":
        geometry = [p["segmentation"] if use_masks else _box(p) for p in predictions]
        regions = list(regions) if use_masks else [list(r) for r in regions]
        return np.asarray(mask_util.iou(geometry, regions, [int(region_is_crowd)] * len(regions)))
    centres = _centres(predictions, use_masks)
    if use_masks:
        # The centre's pixel as a 1x1 box RLE: its overlap with a GT RLE, as the fraction of the
        # point inside (iscrowd=1), is 1 or 0 -- run-length work only, no decoded GT masks.
        height, width = image_size
        cols = np.clip(np.floor(centres[:, 0]), 0, width - 1)
        rows = np.clip(np.floor(centres[:, 1]), 0, height - 1)
        pixels = np.stack([cols, rows, np.ones_like(cols), np.ones_like(cols)], axis=1)
        points = mask_util.frPyObjects(pixels, height, width)
        return np.asarray(mask_util.iou(points, list(regions), [1] * len(regions)))
    boxes = np.asarray(regions, dtype=np.float64).reshape(-1, 4)
    cx, cy = centres[:, :1], centres[:, 1:]
    inside = (
        (boxes[:, 0] <= cx)
        & (cx < boxes[:, 0] + boxes[:, 2])
        & (boxes[:, 1] <= cy)
        & (cy < boxes[:, 1] + boxes[:, 3])
    )
    return inside.astype(np.float64)


def match_lesions(
    predictions: Sequence[dict],
    lesions: Sequence,
    ignore_regions: Sequence,
    match: str,
    threshold: float,
    use_masks: bool,
    image_size: Sequence[int],
) -> np.ndarray:
    """Match one image's predictions of one category, given in descending score order, to its
    lesions of that category (the rules are in the module docstring).

    Returns:
        (outcome of each prediction: HIT, FALSE_POSITIVE or NEITHER; bool per lesion: found)
    """
    # "center" overlaps are 0 / 1: any threshold in (0, 1] reads them the same.
    threshold = threshold if match == "iou" else 0.5
    overlap = _overlaps(predictions, lesions, False, match, use_masks, image_size)
    on_ignore = _overlaps(predictions, ignore_regions, True, match, use_masks, image_size)
    on_ignore = (on_ignore >= threshold).any(axis=1)
    hit = np.zeros(len(lesions), bool)
    outcomes = np.full(len(predictions), FALSE_POSITIVE, np.int8)
    for i in range(len(predictions)):
        candidates = np.flatnonzero(overlap[i] >= threshold)
        free = candidates[~hit[candidates]]
        if free.size:
            hit[free[np.argmax(overlap[i, free])]] = True
            outcomes[i] = HIT
        elif candidates.size or on_ignore[i]:
            outcomes[i] = NEITHER  # a duplicate of a found lesion, or on an ignore region
    return outcomes, hit


# --- the curve ---------------------------------------------------------------------------------


def _nan_to_none(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def _curve(
    scores: np.ndarray,
    outcomes: np.ndarray,
    num_lesions: int,
    num_images: int,
    fp_rates: Sequence[float],
    score_threshold: float,
) -> dict:
    """The FROC operating points and P / R / F1 of predictions already matched; fractions in
    [0, 1], NaN where undefined (sensitivity without lesions, FPs per image without images)."""
    order = np.argsort(-scores, kind="mergesort")
    scores, outcomes = scores[order], outcomes[order]
    hits = np.cumsum(outcomes == HIT)
    fps = np.cumsum(outcomes == FALSE_POSITIVE)
    # One operating point per distinct score: the last prediction of each run of tied scores.
    last = np.flatnonzero(np.r_[scores[1:] != scores[:-1], True]) if scores.size else []
    hits, fps, thresholds = hits[last], fps[last], scores[last]
    sensitivity = hits / num_lesions if num_lesions else np.full(len(last), np.nan)
    fps_per_image = fps / num_images if num_images else np.full(len(last), np.nan)

    sensitivity_at = OrderedDict()
    for rate in fp_rates:
        if not num_lesions or not num_images:
            value = float("nan")
        else:
            # Counts, not FP/image floats, so that 1 FP on 8 images is exactly within 1/8.
            within = np.flatnonzero(fps <= rate * num_images + 1e-9)
            value = float(sensitivity[within[-1]]) if within.size else 0.0
        sensitivity_at[rate_name(rate)] = value

    kept = int(np.count_nonzero(scores >= score_threshold))
    tp = int(_count_at(outcomes, kept, HIT))
    fp = int(_count_at(outcomes, kept, FALSE_POSITIVE))
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / num_lesions if num_lesions else float("nan")
    f1 = 2 * tp / (2 * tp + fp + (num_lesions - tp)) if tp + fp + num_lesions else float("nan")
    return OrderedDict(
        num_lesions=int(num_lesions),
        num_images=int(num_images),
        num_predictions=int(scores.size),
        froc=float(np.mean(list(sensitivity_at.values()))),
        sensitivity_at=sensitivity_at,
        tp=tp,
        fp=fp,
        fn=int(num_lesions - tp),
        precision=precision,
        recall=recall,
        f1=f1,
        thresholds=[float(v) for v in thresholds],
        fps_per_image=[float(v) for v in fps_per_image],
        sensitivity=[float(v) for v in sensitivity],
    )


def _count_at(outcomes: np.ndarray, kept: int, outcome: int) -> int:
    """How many of the first ``kept`` (highest-scoring) predictions have this outcome."""
    return int(np.count_nonzero(outcomes[:kept] == outcome))


def _mean_over_lesion_types(categories: Mapping[str, dict]) -> "OrderedDict[str, object]":
    """Means over the categories with lesions (NaN entries, e.g. precision without predictions,
    are skipped), as instance AP averages over categories with GT."""
    with_lesions = [c for c in categories.values() if c["num_lesions"]]

    def mean(values):
        values = [v for v in values if not math.isnan(v)]
        return float(np.mean(values)) if values else float("nan")

    rates = next(iter(categories.values()))["sensitivity_at"] if categories else {}
    return OrderedDict(
        num_categories=len(with_lesions),
        froc=mean([c["froc"] for c in with_lesions]),
        sensitivity_at=OrderedDict(
            (r, mean([c["sensitivity_at"][r] for c in with_lesions])) for r in rates
        ),
        precision=mean([c["precision"] for c in with_lesions]),
        recall=mean([c["recall"] for c in with_lesions]),
        f1=mean([c["f1"] for c in with_lesions]),
    )


def froc_curve(
    gt: GroundTruth,
    results: Results,
    *,
    match: str = FROC_MATCH,
    iou_threshold: float = FROC_IOU,
    fp_rates: Sequence[float] = FP_RATES,
    use_masks: bool = True,
    annotated_only: bool = False,
    score_threshold: float = FROC_SCORE_THRESHOLD,
    annotated_category_ids: Optional[Mapping[int, Iterable[int]]] = None,
) -> dict:
    """Lesion-level FROC and P / R / F1 of COCO results against a COCO GT, per category.

    Args:
        gt: a COCO instances JSON path, its loaded dict, or a ``pycocotools.coco.COCO``.
        results: a COCO results JSON path or list (image_id, category_id, score, bbox and/or
            RLE segmentation); category ids are the GT's.
        match: "iou" (mask or box IoU >= iou_threshold) or "center" (the prediction's centre
            inside the lesion's mask or box).
        iou_threshold: the IoU of a hit with ``match="iou"``; 0.2 is lenient on purpose, as a
            one-pixel shift of a 3-pixel microaneurysm already halves its IoU.
        fp_rates: FPs per image at which sensitivity is read; the FROC score is their mean.
        use_masks: match masks (GT RLE or polygons, predicted RLE); False: boxes. Results without
            any segmentation are matched by boxes, with a warning.
        annotated_only: drop predictions of lesion types their image is not annotated for, and
            count for a type's FPs per image only the images annotated for it (e-ophtha).
        score_threshold: predictions scoring >= it give precision, recall and F1.
        annotated_category_ids: image id -> annotated category ids, overriding the GT records'
            (the evaluator passes the dataset dicts'); used only with annotated_only.

    Returns:
        A dict, fractions in [0, 1] (NaN where undefined):

        - ``params``: the arguments above;
        - ``num_images``: images of the GT;
        - ``categories``: name -> ``num_lesions``, ``num_images``, ``num_predictions``, ``froc``,
          ``sensitivity_at`` (rate name, e.g. "1/8" -> sensitivity), ``tp``, ``fp``, ``fn``,
          ``precision``, ``recall``, ``f1`` (at score_threshold), and the operating points
          ``thresholds``, ``fps_per_image``, ``sensitivity`` (one per distinct score, descending);
        - ``mean``: ``froc``, ``sensitivity_at``, ``precision``, ``recall``, ``f1`` averaged over
          the categories with lesions (the headline numbers);
        - ``overall``: the same fields as a category's for all categories pooled (each prediction
          matched within its category, one threshold swept over all of them).

    Raises:
        InstanceEvalError: missing or malformed files, results whose image ids are not in the GT,
            results where only some detections have a mask or a box, a GT without masks while
            use_masks, and the bad detection values :func:`evaluate_coco_results` refuses (NaN
            or non-numeric scores, malformed boxes or ids, masks of another size).
        ValueError: bad match, iou_threshold or fp_rates.
    """
    if match not in MATCHES:
        raise ValueError(f"match must be one of {MATCHES}, got {match!r}")
    if not 0 < iou_threshold <= 1:
        raise ValueError(f"iou_threshold must lie in (0, 1], got {iou_threshold}")
    if not fp_rates or any(r <= 0 for r in fp_rates):
        raise ValueError(f"fp_rates must be positive, got {tuple(fp_rates)}")
    if len({rate_name(r) for r in fp_rates}) != len(fp_rates):
        raise ValueError(f"fp_rates must differ, got {tuple(fp_rates)}")

    coco_gt, gt_source = load_coco_gt(gt)
    results, source = load_coco_results(results)
    check_results(results, coco_gt, source, gt_source, ("bbox",))
    if use_masks and results and "segmentation" not in results[0]:
        logger.warning("results file %s has no segmentation: FROC matches boxes", source)
        use_masks = False
    if use_masks:
        unmasked = [a["id"] for a in coco_gt.dataset["annotations"] if "segmentation" not in a]
        if unmasked:
            raise InstanceEvalError(
                f"GT file {gt_source}: {len(unmasked)} annotations have no segmentation (e.g. id "
                f"{unmasked[0]}); match boxes (use_masks=False) instead"
            )
    if annotated_only:
        results = keep_annotated(results, coco_gt, annotated_category_ids)

    category_ids = sorted(coco_gt.getCatIds())
    images = {img["id"]: img for img in coco_gt.dataset["images"]}
    images_of = _images_per_category(
        coco_gt, category_ids, annotated_only, annotated_category_ids or {}
    )
    predictions = defaultdict(list)
    for r in results:
        if r["category_id"] in coco_gt.cats:  # others: warned about by check_results
            predictions[r["image_id"], r["category_id"]].append(r)

    scores, outcomes = defaultdict(list), defaultdict(list)
    for (image_id, category_id), preds in predictions.items():
        preds = sorted(preds, key=lambda p: -p["score"])  # stable: ties keep the file's order
        anns = coco_gt.imgToAnns.get(image_id, [])
        anns = [a for a in anns if a["category_id"] == category_id]
        geometry = [coco_gt.annToRLE(a) if use_masks else a["bbox"] for a in anns]
        lesions = [g for g, a in zip(geometry, anns) if not a.get("iscrowd", 0)]
        ignore = [g for g, a in zip(geometry, anns) if a.get("iscrowd", 0)]
        size = (images[image_id]["height"], images[image_id]["width"])
        scores[category_id] += [p["score"] for p in preds]
        outcomes[category_id].append(
            match_lesions(preds, lesions, ignore, match, iou_threshold, use_masks, size)[0]
        )

    num_lesions = defaultdict(int)
    for a in coco_gt.dataset["annotations"]:
        if not a.get("iscrowd", 0) and a["image_id"] in images_of[a["category_id"]]:
            num_lesions[a["category_id"]] += 1

    categories = OrderedDict()
    for c in category_ids:
        categories[coco_gt.cats[c]["name"]] = _curve(
            np.asarray(scores[c], dtype=np.float64),
            np.concatenate(outcomes[c]) if outcomes[c] else np.zeros(0, np.int8),
            num_lesions[c],
            len(images_of[c]),
            fp_rates,
            score_threshold,
        )
    overall = _curve(
        np.asarray(list(itertools.chain(*(scores[c] for c in category_ids))), dtype=np.float64),
        np.concatenate([o for c in category_ids for o in outcomes[c]] or [np.zeros(0, np.int8)]),
        sum(num_lesions.values()),
        len(images),
        fp_rates,
        score_threshold,
    )
    params = OrderedDict(
        match=match,
        iou_threshold=float(iou_threshold),
        fp_rates=[float(r) for r in fp_rates],
        use_masks=bool(use_masks),
        annotated_only=bool(annotated_only),
        score_threshold=float(score_threshold),
    )
    return OrderedDict(
        params=params,
        num_images=len(images),
        categories=categories,
        mean=_mean_over_lesion_types(categories),
        overall=overall,
    )


def _images_per_category(coco_gt, category_ids, annotated_only, annotated_category_ids):
    """Category id -> the image ids its FPs per image divide by: all images, or with
    annotated_only those annotated for it (an image that lists no types counts for all)."""
    all_images = set(coco_gt.getImgIds())
    if not annotated_only:
        return {c: all_images for c in category_ids}
    annotated = annotated_types(coco_gt, annotated_category_ids)
    return {
        c: {i for i in all_images if i not in annotated or c in annotated[i]} for c in category_ids
    }


# --- reporting ---------------------------------------------------------------------------------


def froc_metrics(froc: Mapping) -> "OrderedDict[str, float]":
    """The flat metric dict of a :func:`froc_curve` result, in percent (NaN where undefined):
    ``FROC``, ``sens@<rate>``, ``P``, ``R``, ``F1`` (means over the categories with lesions),
    then per category ``FROC-<name>``, ``sens@<rate>-<name>``, ``P-<name>``, ``R-<name>``,
    ``F1-<name>``."""
    metrics = OrderedDict()

    def add(curve, suffix):
        metrics["FROC" + suffix] = curve["froc"] * 100
        for rate, value in curve["sensitivity_at"].items():
            metrics[f"sens@{rate}{suffix}"] = value * 100
        for key, name in (("precision", "P"), ("recall", "R"), ("f1", "F1")):
            metrics[name + suffix] = curve[key] * 100

    add(froc["mean"], "")
    for name, curve in froc["categories"].items():
        add(curve, f"-{name}")
    return metrics


def format_froc(froc: Mapping) -> str:
    """A :func:`froc_curve` result as a pipe table (one row per category, their mean and all
    categories pooled), headed by the protocol."""
    p = froc["params"]
    match = (
        f"IoU >= {p['iou_threshold']}" if p["match"] == "iou" else "centre inside the lesion"
    ) + (" (masks)" if p["use_masks"] else " (boxes)")
    lines = [
        f"Lesion-level FROC (%): hit = {match}; sensitivity at "
        f"{', '.join(rate_name(r) for r in p['fp_rates'])} FPs/image over {froc['num_images']} "
        "images.\nEach lesion found once: duplicates and predictions on ignore regions are "
        f"neither hit nor FP. P/R/F1 at score >= {p['score_threshold']}.\n"
        f"annotated_only {'applied' if p['annotated_only'] else 'not applied'}; "
        "mean = over categories with lesions; pooled = all categories, one threshold.\n"
    ]
    rates = [rate_name(r) for r in p["fp_rates"]]
    headers = ["category", "lesions", "images"] + [f"@{r}" for r in rates]
    headers += ["FROC", "P", "R", "F1"]

    def row(name, curve, num_lesions="", num_images=""):
        values = [curve["sensitivity_at"][r] for r in rates] + [
            curve[k] for k in ("froc", "precision", "recall", "f1")
        ]
        return [name, num_lesions, num_images] + [v * 100 for v in values]

    rows = [
        row(name, c, c["num_lesions"], c["num_images"]) for name, c in froc["categories"].items()
    ]
    rows.append(row("mean", froc["mean"]))
    overall = froc["overall"]
    rows.append(row("pooled", overall, overall["num_lesions"], overall["num_images"]))
    lines.append(tabulate(rows, headers=headers, tablefmt="pipe", floatfmt=".2f"))
    return "".join(lines)


def _json_safe(obj):
    """NaN -> None throughout, so the file is strict JSON."""
    if isinstance(obj, Mapping):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return _nan_to_none(obj)


def write_froc_json(froc: Mapping, path: str):
    """Write a :func:`froc_curve` result (fractions, NaN as null)."""
    with PathManager.open(str(path), "w") as f:
        json.dump(_json_safe(froc), f, indent=2)


def file_slug(name: str) -> str:
    """A lesion name as a file-name part: "hard exudate" -> "hard_exudate"."""
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_").lower()


# --- the Detectron2 evaluator --------------------------------------------------------------------


class LesionFROCEvaluator(LesionPredictionCollector):
    """Lesion-level FROC, sensitivity at 1/8..8 FPs per image and F1 of a lesion model's outputs.

    Runs beside :class:`~retina_d2.evaluation.LesionInstanceEvaluator` (same collection of
    predictions, same GT file: ``metadata.json_file``); the numbers are those of
    :func:`froc_curve`. ``evaluate()`` returns ``{"froc": froc_metrics(...)}`` in percent, and with
    an output_dir writes ``froc.json``: the whole curve in fractions, every operating point of
    every category, from which the report (:mod:`retina_d2.report`) draws the FROC curves.
    """

    @configurable
    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        *,
        match: str = FROC_MATCH,
        iou_threshold: float = FROC_IOU,
        fp_rates: Sequence[float] = FP_RATES,
        use_masks: bool = True,
        annotated_only: bool = False,
        score_threshold: float = FROC_SCORE_THRESHOLD,
        distributed: bool = True,
        scored_model: Optional[dict] = None,
    ):
        """
        Args:
            dataset_name: a registered dataset whose metadata has ``json_file`` (else one is
                written to output_dir from the catalog, as COCOEvaluator does) and
                ``thing_dataset_id_to_contiguous_id``.
            output_dir: where froc.json is saved (None: not saved).
            match, iou_threshold, fp_rates, use_masks, annotated_only, score_threshold: see
                :func:`froc_curve`.
            distributed, scored_model: see
                :class:`~retina_d2.evaluation.instance_eval.LesionPredictionCollector`.
        """
        if match not in MATCHES:
            raise ValueError(f"match must be one of {MATCHES}, got {match!r}")
        self._options = dict(
            match=match,
            iou_threshold=float(iou_threshold),
            fp_rates=tuple(float(r) for r in fp_rates),
            use_masks=bool(use_masks),
            annotated_only=bool(annotated_only),
            score_threshold=float(score_threshold),
        )
        super().__init__(
            dataset_name, output_dir, distributed=distributed, scored_model=scored_model
        )

    @classmethod
    def from_config(cls, cfg, dataset_name: str, output_dir: Optional[str] = None):
        """The arguments of an evaluator with ``cfg.RETINA.EVAL.FROC_*`` and ``ANNOTATED_ONLY``;
        masks matched when ``MODEL.MASK_ON``, else boxes."""
        return {
            "dataset_name": dataset_name,
            "output_dir": output_dir,
            "match": cfg.RETINA.EVAL.FROC_MATCH,
            "iou_threshold": cfg.RETINA.EVAL.FROC_IOU,
            "use_masks": cfg.MODEL.MASK_ON,
            "annotated_only": cfg.RETINA.EVAL.ANNOTATED_ONLY,
            "score_threshold": cfg.RETINA.EVAL.FROC_SCORE_THRESHOLD,
            "scored_model": scored_model(cfg),  # written into eval_info.json
        }

    def evaluate(self):
        gathered = self._gather_results()
        if gathered is None:
            return {}
        results, annotated = gathered
        froc = froc_curve(self._coco_gt, results, annotated_category_ids=annotated, **self._options)
        self._logger.info(f"FROC of {self._dataset_name}:\n" + format_froc(froc))
        if self._output_dir:
            self._write_eval_info()
            write_froc_json(froc, os.path.join(self._output_dir, FROC_FILE))
        return {"froc": froc_metrics(froc)}
