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
import os
from collections import OrderedDict
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tabulate import tabulate

import detectron2.utils.comm as comm
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data.datasets.coco import convert_to_coco_json
from detectron2.evaluation import DatasetEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.utils.file_io import PathManager

from .coco_io import (
    GroundTruth,
    InstanceEvalError,
    Results,
    check_results,
    keep_annotated,
    load_coco_gt,
    load_coco_results,
    write_metrics_json,
)
from ..schema import COCO_RESULTS_FILE, EVAL_INFO_FILE, INSTANCE_METRICS_FILE, IOU_THRESHOLDS
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



def iou_name(threshold: float) -> str:
    """0.35 -> "35": the suffix of the metric names at that IoU threshold."""
    return str(round(threshold * 100))


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
    iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
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
    tasks = check_results(results, coco_gt, source, gt_source, tasks)
    if annotated_only:
        results = keep_annotated(results, coco_gt, annotated_category_ids)
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
    iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
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
    if not check_results(results, coco_gt, source, gt_source, (task,)):
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
    iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
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


class LesionPredictionCollector(DatasetEvaluator):
    """Collects a lesion model's instance predictions as COCO results for the dataset's COCO GT.

    The shared part of :class:`LesionInstanceEvaluator` and
    :class:`~retina_d2.evaluation.LesionFROCEvaluator`: the GT file (``metadata.json_file``),
    ``reset`` / ``process``, and the gathering of predictions with the GT's category ids.
    Subclasses check their own arguments before calling ``__init__`` and implement ``evaluate``
    with :meth:`_gather_results`.
    """

    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        *,
        distributed: bool = True,
        scored_model: Optional[dict] = None,
    ):
        """
        Args:
            dataset_name: a registered dataset whose metadata has ``json_file`` (else one is
                written to output_dir from the catalog, as COCOEvaluator does) and
                ``thing_dataset_id_to_contiguous_id``.
            output_dir: where the subclass saves its outputs (None: not saved).
            distributed: gather predictions from all ranks and evaluate on the main one.
            scored_model: the weights and iteration scored (scored_model.py), written into
                eval_info.json; from_config gives them, a build without a config claims none.
        """
        # The subclass's module: its log lines keep the logger they had as separate classes.
        self._logger = logging.getLogger(type(self).__module__)
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._distributed = distributed
        self._cpu_device = torch.device("cpu")
        self.scored_model: dict = dict(scored_model or {})

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
        with PathManager.open(os.path.join(self._output_dir, EVAL_INFO_FILE), "w") as f:
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

    @configurable
    def __init__(
        self,
        dataset_name: str,
        tasks: Sequence[str] = TASKS,
        output_dir: Optional[str] = None,
        iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
        max_dets: int = 256,
        annotated_only: bool = False,
        *,
        distributed: bool = True,
        backend: str = "pycocotools",
        scored_model: Optional[dict] = None,
    ):
        """
        Args:
            dataset_name: a registered dataset whose metadata has ``json_file`` (else one is
                written to output_dir from the catalog, as COCOEvaluator does) and
                ``thing_dataset_id_to_contiguous_id``.
            tasks: "bbox" and/or "segm".
            output_dir: where predictions and metrics are saved (None: not saved).
            iou_thresholds, max_dets, annotated_only, backend: see :func:`evaluate_coco_results`.
            distributed, scored_model: see :class:`LesionPredictionCollector`.
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
        super().__init__(
            dataset_name, output_dir, distributed=distributed, scored_model=scored_model
        )

    @classmethod
    def from_config(cls, cfg, dataset_name: str, output_dir: Optional[str] = None):
        """The arguments of an evaluator with ``cfg.RETINA.EVAL``'s thresholds, maxDets and
        annotated_only; segm only when ``MODEL.MASK_ON``."""
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
        return {
            "dataset_name": dataset_name,
            "tasks": tasks,
            "output_dir": output_dir,
            "iou_thresholds": tuple(cfg.RETINA.EVAL.IOU_THRESHOLDS),
            "max_dets": max_dets,
            "annotated_only": cfg.RETINA.EVAL.ANNOTATED_ONLY,
            "scored_model": scored_model(cfg),
        }

    def evaluate(self):
        gathered = self._gather_results()
        if gathered is None:
            return {}
        results, annotated = gathered
        if self._output_dir:
            self._write_eval_info()
            path = os.path.join(self._output_dir, COCO_RESULTS_FILE)
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
            write_metrics_json(metrics, os.path.join(self._output_dir, INSTANCE_METRICS_FILE))
        return copy.deepcopy(metrics)
