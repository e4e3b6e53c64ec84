"""``per_image_map``: the e-ophtha Mask R-CNN paper's mAP, Matterport's definition.

The paper scored its masks with the Matterport Mask R-CNN utilities: an AP per image, then the
mean over images ("mAP35 / mAP50 / mAP75", Table I). That is not COCOeval's AP, which pools the
detections of all images into one precision-recall curve per category. Per image:

- ground truth: the image's non-crowd annotations (crowd / ignore regions are dropped: Matterport
  has no ignore regions); predictions: the image's detections, at most ``max_dets`` of the highest
  scores (the model's own score threshold already applied);
- matching, in descending score order (ties keep the results file's order): a prediction takes
  the unmatched ground-truth lesion *of its category* with the highest mask IoU, if that IoU is
  >= the threshold (IoU ties: the first lesion in the GT file's order). A prediction left without
  one -- including a second prediction of an already matched lesion (a duplicate) -- is a false
  positive;
- AP: precision and recall after each prediction in score order, padded with (recall 0,
  precision 0) in front and (recall 1, precision 0) behind; precision made monotone decreasing
  from the right (each value replaced by the largest at or after it); AP = the sum over the
  points where recall grows of (recall step) x (that precision). An image with lesions and no
  prediction scores 0.

``mAP<t>`` is the mean of the per-image APs over the images that have ground truth. An image
without ground truth has no recall and no AP (Matterport divides by zero there), so it is
**excluded from the mean**; its detections are all false alarms, reported separately as
``false_alarms_per_healthy_image`` (detections on images without ground truth / number of such
images) beside ``healthy_images``. ``mAP<t>-<category>`` repeats the computation per category
(only that category's lesions and predictions, over the images that have lesions of it), which
Matterport does not report but which separates e-ophtha's exudates from its microaneurysms.

With ``annotated_only`` (the e-ophtha paper's filter, as in
:func:`~retina_d2.evaluation.evaluate_coco_results`) predictions of lesion types an image is not
annotated for are dropped first. Numbers are in percent.
"""
import logging
import os
from collections import OrderedDict, defaultdict
from typing import Iterable, List, Mapping, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util
from tabulate import tabulate

from detectron2.config import configurable

from ..coco_io import (
    GroundTruth,
    InstanceEvalError,
    Results,
    check_results,
    keep_annotated,
    load_coco_gt,
    load_coco_results,
    write_metrics_json,
)
from ..instance_eval import LesionPredictionCollector, iou_name
from ...schema import IOU_THRESHOLDS, protocol_metrics_file

__all__ = [
    "PER_IMAGE_MAP",
    "PerImageMAPEvaluator",
    "format_per_image_map",
    "image_average_precision",
    "match_by_score",
    "per_image_map",
]

logger = logging.getLogger(__name__)

PER_IMAGE_MAP = "per_image_map"


def match_by_score(
    overlaps: np.ndarray,
    prediction_classes: Sequence[int],
    lesion_classes: Sequence[int],
    iou_threshold: float,
) -> np.ndarray:
    """Match predictions, given in descending score order, to lesions (the module's rule).

    Args:
        overlaps: (P, G) mask IoU of each prediction with each ground-truth lesion.
        prediction_classes, lesion_classes: category of each prediction / lesion.
        iou_threshold: the least IoU of a match.

    Returns:
        bool (P,): whether each prediction matched a lesion.
    """
    overlaps = np.asarray(overlaps, dtype=np.float64).reshape(
        len(prediction_classes), len(lesion_classes)
    )
    lesion_classes = np.asarray(lesion_classes)
    taken = np.zeros(len(lesion_classes), dtype=bool)
    matched = np.zeros(len(prediction_classes), dtype=bool)
    for i, category in enumerate(prediction_classes):
        candidates = (~taken) & (lesion_classes == category) & (overlaps[i] >= iou_threshold)
        if candidates.any():
            # The first maximum among the candidates: highest IoU, then the GT file's order.
            best = np.flatnonzero(candidates)[np.argmax(overlaps[i, candidates])]
            taken[best] = True
            matched[i] = True
    return matched


def image_average_precision(matched: Sequence[bool], num_lesions: int) -> float:
    """Matterport's AP of one image: area under the monotone precision envelope.

    Args:
        matched: whether each prediction, in descending score order, matched a lesion.
        num_lesions: the image's ground-truth lesions (> 0).
    """
    if num_lesions <= 0:
        raise ValueError("an image without ground truth has no AP")
    matched = np.asarray(matched, dtype=bool)
    hits = np.cumsum(matched)
    precision = np.r_[0.0, hits / np.arange(1, matched.size + 1), 0.0]
    recall = np.r_[0.0, hits / num_lesions, 1.0]
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[steps] - recall[steps - 1]) * envelope[steps]))


def _image_case(predictions: List[dict], lesions: List[dict], coco_gt):
    """(P, G) mask IoU, prediction classes and lesion classes of one image, predictions already
    in descending score order."""
    if predictions and lesions:
        rles = [coco_gt.annToRLE(a) for a in lesions]
        overlaps = np.asarray(
            mask_util.iou([p["segmentation"] for p in predictions], rles, [0] * len(rles))
        ).reshape(len(predictions), len(lesions))
    else:
        overlaps = np.zeros((len(predictions), len(lesions)))
    return (
        overlaps,
        [p["category_id"] for p in predictions],
        [a["category_id"] for a in lesions],
    )


def _mean(values: List[float]) -> float:
    return float(np.mean(values)) * 100 if values else float("nan")


def per_image_map(
    gt: GroundTruth,
    results: Results,
    iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
    *,
    max_dets: int = 256,
    annotated_only: bool = False,
    annotated_category_ids: Optional[Mapping[int, Iterable[int]]] = None,
) -> "OrderedDict[str, float]":
    """Matterport's per-image mAP of COCO mask results against a COCO GT (see the module).

    Args:
        gt: a COCO instances JSON path, its loaded dict, or a ``pycocotools.coco.COCO``.
        results: a COCO results JSON path or list with RLE ``segmentation`` (GT category ids).
        iou_thresholds: the IoU of a match, one ``mAP<t>`` each (0.35 -> ``mAP35``).
        max_dets: the highest-scoring detections per image that are scored.
        annotated_only: drop predictions of lesion types their image is not annotated for.
        annotated_category_ids: image id -> annotated category ids, overriding the GT records'.

    Returns:
        ``mAP<t>`` per threshold, ``mAP<t>-<category>`` per threshold and category (NaN for a
        category without lesions), ``images`` (images with ground truth, the mean's
        denominator), ``healthy_images`` and ``false_alarms_per_healthy_image`` (NaN without
        healthy images). AP values in percent.

    Raises:
        InstanceEvalError: missing or malformed files, results for another GT, results without
            masks.
        ValueError: bad thresholds or max_dets.
    """
    if not iou_thresholds or any(not 0 < t <= 1 for t in iou_thresholds):
        raise ValueError(f"iou_thresholds must lie in (0, 1], got {tuple(iou_thresholds)}")
    if max_dets < 1:
        raise ValueError(f"max_dets must be >= 1, got {max_dets}")
    coco_gt, gt_source = load_coco_gt(gt)
    results, source = load_coco_results(results)
    check_results(results, coco_gt, source, gt_source, ("segm",))
    if results and "segmentation" not in results[0]:
        raise InstanceEvalError(f"results file {source} has no masks: per_image_map scores masks")
    if annotated_only:
        results = keep_annotated(results, coco_gt, annotated_category_ids)

    predictions_of = defaultdict(list)
    for r in results:
        if r["category_id"] in coco_gt.cats:
            predictions_of[r["image_id"]].append(r)
    categories = sorted(coco_gt.getCatIds())
    per_threshold = {t: [] for t in iou_thresholds}
    per_category = {(t, c): [] for t in iou_thresholds for c in categories}
    healthy, false_alarms = 0, 0
    for image_id in sorted(coco_gt.getImgIds()):
        # Stable sort: tied scores keep the results file's order.
        predictions = sorted(predictions_of[image_id], key=lambda p: -p["score"])[:max_dets]
        lesions = [a for a in coco_gt.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        if not lesions:
            healthy += 1
            false_alarms += len(predictions)
            continue
        overlaps, prediction_classes, lesion_classes = _image_case(predictions, lesions, coco_gt)
        for t in iou_thresholds:
            matched = match_by_score(overlaps, prediction_classes, lesion_classes, t)
            per_threshold[t].append(image_average_precision(matched, len(lesions)))
            for c in categories:
                num_lesions = lesion_classes.count(c)
                if num_lesions:
                    mine = np.asarray(prediction_classes, dtype=np.int64) == c
                    per_category[t, c].append(image_average_precision(matched[mine], num_lesions))

    metrics = OrderedDict()
    for t in iou_thresholds:
        metrics[f"mAP{iou_name(t)}"] = _mean(per_threshold[t])
    for c in categories:
        for t in iou_thresholds:
            metrics[f"mAP{iou_name(t)}-{coco_gt.cats[c]['name']}"] = _mean(per_category[t, c])
    metrics["images"] = len(per_threshold[iou_thresholds[0]])
    metrics["healthy_images"] = healthy
    metrics["false_alarms_per_healthy_image"] = (
        false_alarms / healthy if healthy else float("nan")
    )
    return metrics


def format_per_image_map(
    metrics: Mapping[str, float], names: Optional[Sequence[str]] = None
) -> str:
    """The mAP columns as a pipe table, one row for all lesions and one per category (default:
    the categories the metrics name)."""
    columns = [k for k in metrics if k.startswith("mAP") and "-" not in k]
    if names is None:
        prefix = f"{columns[0]}-"
        names = [k[len(prefix) :] for k in metrics if k.startswith(prefix)]
    rows = [["all"] + [metrics[k] for k in columns]]
    rows += [[n] + [metrics.get(f"{k}-{n}") for k in columns] for n in names]
    note = (
        f"\n{metrics['images']} images with lesions (the mean's images); "
        f"{metrics['healthy_images']} without, with "
        f"{metrics['false_alarms_per_healthy_image']:.2f} false alarms each on average."
    )
    table = tabulate(rows, headers=["lesions"] + columns, tablefmt="pipe", floatfmt=".2f")
    return table + note


class PerImageMAPEvaluator(LesionPredictionCollector):
    """``per_image_map`` of a lesion detector's outputs (see the module docstring).

    ``evaluate()`` returns ``{"per_image_map": per_image_map(...)}`` and with an output_dir
    writes ``per_image_map_metrics.json`` there (the report shows it).
    """

    @configurable
    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        *,
        iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
        max_dets: int = 256,
        annotated_only: bool = False,
        distributed: bool = True,
    ):
        """
        Args:
            dataset_name: a registered dataset whose metadata has ``json_file`` (else one is
                written to output_dir) and ``thing_dataset_id_to_contiguous_id``.
            output_dir: where the metrics are written (None: not written).
            iou_thresholds, max_dets, annotated_only: see :func:`per_image_map`.
            distributed: gather predictions from all ranks and evaluate on the main one.
        """
        self._iou_thresholds = tuple(float(t) for t in iou_thresholds)
        self._max_dets = int(max_dets)
        self._annotated_only = bool(annotated_only)
        super().__init__(dataset_name, output_dir, distributed=distributed)

    @classmethod
    def from_config(cls, cfg, dataset_name: str, output_dir: Optional[str] = None):
        """With ``RETINA.EVAL.IOU_THRESHOLDS``, ``MAX_DETS`` and ``ANNOTATED_ONLY``."""
        return {
            "dataset_name": dataset_name,
            "output_dir": output_dir,
            "iou_thresholds": tuple(cfg.RETINA.EVAL.IOU_THRESHOLDS),
            "max_dets": cfg.RETINA.EVAL.MAX_DETS,
            "annotated_only": cfg.RETINA.EVAL.ANNOTATED_ONLY,
        }

    def evaluate(self):
        gathered = self._gather_results()
        if gathered is None:
            return {}
        results, annotated = gathered
        metrics = per_image_map(
            self._coco_gt,
            results,
            self._iou_thresholds,
            max_dets=self._max_dets,
            annotated_only=self._annotated_only,
            annotated_category_ids=annotated,
        )
        self._logger.info(
            f"Per-image mAP (Matterport) of {self._dataset_name}, %:\n"
            + format_per_image_map(metrics)
        )
        if self._output_dir:
            os.makedirs(self._output_dir, exist_ok=True)
            path = os.path.join(self._output_dir, protocol_metrics_file(PER_IMAGE_MAP))
            write_metrics_json({PER_IMAGE_MAP: metrics}, path)
        return {PER_IMAGE_MAP: metrics}
