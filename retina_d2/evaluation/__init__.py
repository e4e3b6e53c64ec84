"""Evaluators: instance AP / AR at the lesion papers' IoU thresholds (``instance_eval``),
lesion-level FROC and F1 (``froc``), pixel AUC-PR / F1 / Dice / IoU of semantic heads
(``semantic_eval``), overlay pictures of predictions beside ground truth (``overlays``), DR /
macular-oedema grading and lesion classification (``grading_eval``), optic disc / fovea
localization (``localization_eval``), each paper's own protocol (``protocols``) and the papers'
published figures beside ours (``published``)."""
from .froc import (
    FP_RATES,
    MATCHES,
    LesionFROCEvaluator,
    format_froc,
    froc_curve,
    froc_metrics,
    rate_name,
    write_froc_json,
)
from .grading_eval import LesionGradingEvaluator, quadratic_weighted_kappa
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
from .localization_eval import LandmarkLocalizationEvaluator
from .overlays import OverlayEvaluator
from .protocols import PROTOCOLS, build_protocol_evaluators, per_image_map
from .published import (
    PublishedFiguresError,
    format_paper_vs_ours,
    load_published_figures,
    paper_vs_ours,
    published_system,
)
from .semantic_eval import LesionSemanticEvaluator

__all__ = [
    "BACKENDS",
    "FP_RATES",
    "MATCHES",
    "TASKS",
    "InstanceEvalError",
    "LandmarkLocalizationEvaluator",
    "LesionFROCEvaluator",
    "LesionGradingEvaluator",
    "LesionInstanceEvaluator",
    "LesionSemanticEvaluator",
    "OverlayEvaluator",
    "PROTOCOLS",
    "PublishedFiguresError",
    "build_protocol_evaluators",
    "format_paper_vs_ours",
    "load_published_figures",
    "paper_vs_ours",
    "per_image_map",
    "published_system",
    "evaluate_coco_results",
    "format_froc",
    "format_instance_metrics",
    "froc_curve",
    "froc_metrics",
    "iou_name",
    "precision_recall_curves",
    "quadratic_weighted_kappa",
    "load_coco_gt",
    "load_coco_results",
    "rate_name",
    "write_froc_json",
    "write_metrics_json",
]
