"""Evaluators: instance AP / AR at the lesion papers' IoU thresholds (``instance_eval``),
lesion-level FROC and F1 (``froc``), pixel AUC-PR / F1 / Dice / IoU of semantic heads
(``semantic_eval``) and overlay pictures of predictions beside ground truth
(``overlays``)."""
from .froc import (
    FP_RATES,
    MATCHES,
    LesionFROCEvaluator,
    format_froc,
    froc_curve,
    froc_metrics,
    rate_name,
    save_froc_plots,
    write_froc_json,
)
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
    precision_recall_curves,
    write_metrics_json,
)
from .overlays import OverlayEvaluator
from .semantic_eval import LesionSemanticEvaluator

__all__ = [
    "BACKENDS",
    "FP_RATES",
    "MATCHES",
    "TASKS",
    "InstanceEvalError",
    "LesionFROCEvaluator",
    "LesionInstanceEvaluator",
    "LesionSemanticEvaluator",
    "OverlayEvaluator",
    "evaluate_coco_results",
    "format_froc",
    "format_instance_metrics",
    "froc_curve",
    "froc_metrics",
    "iou_name",
    "precision_recall_curves",
    "load_coco_gt",
    "load_coco_results",
    "rate_name",
    "save_froc_plots",
    "write_froc_json",
    "write_metrics_json",
]
