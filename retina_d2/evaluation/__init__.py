"""Evaluators: instance AP / AR at the lesion papers' IoU thresholds (``instance_eval``) and
overlay pictures of predictions beside ground truth (``overlays``)."""
from .instance_eval import (
    BACKENDS,
    TASKS,
    InstanceEvalError,
    LesionInstanceEvaluator,
    evaluate_coco_results,
    format_instance_metrics,
    iou_name,
    load_coco_gt,
    load_coco_results,
    write_metrics_json,
)
from .overlays import OverlayEvaluator

__all__ = [
    "BACKENDS",
    "TASKS",
    "InstanceEvalError",
    "LesionInstanceEvaluator",
    "OverlayEvaluator",
    "evaluate_coco_results",
    "format_instance_metrics",
    "iou_name",
    "load_coco_gt",
    "load_coco_results",
    "write_metrics_json",
]
