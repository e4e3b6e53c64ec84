"""The values that data, models, evaluation and the report must agree on, stated once.

This module imports nothing from ``retina_d2`` (so any layer may import it without a cycle):
the record fields of grades and landmarks, the ignore value of semantic targets, the names of
the files the evaluators write and the report reads, and the scoring defaults that
``retina_d2/config.py``'s ``RETINA.EVAL`` keys, the evaluators' arguments and the report's
fallbacks share.
"""

__all__ = [
    "COCO_RESULTS_FILE",
    "EVAL_INFO_FILE",
    "FROC_FILE",
    "FROC_IOU",
    "FROC_MATCH",
    "FROC_SCORE_THRESHOLD",
    "GRADE_COUNTS",
    "GRADING_CONFUSION_FILE",
    "GRADING_METRICS_FILE",
    "IGNORE_VALUE",
    "INSTANCE_METRICS_FILE",
    "IOU_THRESHOLDS",
    "LANDMARK_FIELDS",
    "LANDMARK_PREDICTIONS_FILE",
    "LOCALIZATION_METRICS_FILE",
    "METRICS_SUFFIX",
    "OVERLAYS_DIR",
    "PR_CURVE_DIR",
    "SEMANTIC_METRICS_FILE",
    "SEMANTIC_PR_CURVES_FILE",
    "confusion_file",
    "froc_plot_file",
    "protocol_metrics_file",
]

# --- records and targets -----------------------------------------------------------------------

# Value of the ignore pixels of the semantic targets (the converters' per-lesion PNGs: 0 =
# background, 1 = lesion) and of the loss / metrics that read them: left out of losses and
# metrics. Not Retinal-Lesions' 127 (retina_d2/data/converters/base.py): that is a value of one
# dataset's raw masks, which its converter turns into crowd regions and into this value.
IGNORE_VALUE = 255

# Graded image-record field -> number of grades (IDRiD's scales: DR 0-4, macular-oedema risk 0-2).
GRADE_COUNTS = {"dr_grade": 5, "dme_grade": 3}

# Landmark name -> the image-record field holding its [x, y] in the original file's pixels.
LANDMARK_FIELDS = {"optic_disc": "optic_disc_center", "fovea": "fovea_center"}

# --- scoring defaults (RETINA.EVAL's defaults) -----------------------------------------------

# The lesion papers' IoU thresholds of instance AP: AP35, AP50, AP75.
IOU_THRESHOLDS = (0.35, 0.5, 0.75)
# A FROC hit: "iou" (mask or box IoU >= FROC_IOU) or "center" (the prediction's centre inside).
FROC_MATCH = "iou"
# Lenient on purpose: a lesion of a few pixels shifted by one is still found.
FROC_IOU = 0.2
# The score from which a prediction counts for FROC's precision / recall / F1 and the gallery.
FROC_SCORE_THRESHOLD = 0.35

# --- what the evaluators write into their output folder, and the report reads ------------------

# The GT file, image folder, dataset and model scored (LesionPredictionCollector).
EVAL_INFO_FILE = "eval_info.json"
# The instance predictions as COCO results, the GT's category ids (LesionInstanceEvaluator).
COCO_RESULTS_FILE = "coco_instances_results.json"
# Every metrics file is {task: {metric: value}} and ends in METRICS_SUFFIX.
METRICS_SUFFIX = "_metrics.json"
INSTANCE_METRICS_FILE = "instance" + METRICS_SUFFIX
SEMANTIC_METRICS_FILE = "semantic" + METRICS_SUFFIX
GRADING_METRICS_FILE = "grading" + METRICS_SUFFIX
LOCALIZATION_METRICS_FILE = "localization" + METRICS_SUFFIX
# Every image's landmark prediction, truth and distance (LandmarkLocalizationEvaluator).
LANDMARK_PREDICTIONS_FILE = "landmark_predictions.json"
# The whole FROC curve and its parameters (fractions; not a {task: {metric: value}} file); the
# report draws each lesion's FROC curve from its operating points.
FROC_FILE = "froc.json"
# The semantic evaluator's per-lesion pixel PR curves, sampled at fixed recall levels (numbers
# only: the report draws them).
SEMANTIC_PR_CURVES_FILE = "semantic_pr_curves.json"
# The grading evaluator's confusion matrix of each graded task (the report draws them).
GRADING_CONFUSION_FILE = "grading_confusion.json"
# Where evaluations before the report drew the pictures held the semantic PR curve PNGs; the
# report still shows those of such a folder.
PR_CURVE_DIR = "pr_curves"
# OverlayEvaluator's pictures.
OVERLAYS_DIR = "overlays"


def protocol_metrics_file(protocol: str) -> str:
    """The metrics file of a paper's protocol: ``per_image_map_metrics.json``."""
    return protocol + METRICS_SUFFIX


def froc_plot_file(slug: str) -> str:
    """A FROC curve picture of the report, ``froc_<lesion slug>.png``."""
    return f"froc_{slug}.png"


def confusion_file(task: str) -> str:
    """A grading task's confusion matrix picture of the report, ``confusion_dr_grade.png`` (an
    evaluation before the report drew the pictures left it in the evaluation folder)."""
    return f"confusion_{task}.png"
