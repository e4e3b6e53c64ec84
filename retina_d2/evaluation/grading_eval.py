"""``LesionGradingEvaluator``: image-level outputs of MultiTaskLesionNet against the records.

* DR / macular-oedema grades (``"dr_grade"`` / ``"dme_grade"`` outputs: probabilities over the
  grades; the predicted grade is the most probable): quadratic weighted kappa, accuracy, the
  number of graded images, and the confusion matrix (written to ``grading_confusion.json``, from
  which the report draws it). Images without that grade in their record are left out.
* lesion classification (``"lesion_presence"``: one probability per lesion, predicted present at
  ``threshold``): precision, recall and F1 per lesion and their mean, over the images whose record
  says whether the lesion is there. A lesion is present when the record has a non-crowd
  annotation of it, absent when it is annotated on the image (``annotated_category_ids``) without
  one; a lesion with only ignore regions, or not annotated on the image, is left out.

``evaluate()`` returns ``{"dr_grade": {"kappa", "accuracy", "images"}, "dme_grade": {...},
"lesion_presence": {"F1-<lesion>", "precision-<lesion>", "recall-<lesion>", "mF1"}}`` (rates in
percent; kappa is a coefficient in [-1, 1]; NaN where undefined) and writes it to
``grading_metrics.json`` in the output folder.
"""
import copy
import json
import logging
import math
import os
import warnings
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
from sklearn import metrics as sklearn_metrics
from tabulate import tabulate

import detectron2.utils.comm as comm
from detectron2.config import configurable
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils.file_io import PathManager

from ..schema import GRADE_COUNTS, GRADING_CONFUSION_FILE, GRADING_METRICS_FILE
from .coco_io import write_metrics_json

__all__ = [
    "GRADE_COUNTS",
    "LesionGradingEvaluator",
    "confusion_matrix",
    "format_grading_metrics",
    "lesion_presence_metrics",
    "quadratic_weighted_kappa",
    "write_confusion_json",
]

logger = logging.getLogger(__name__)

PRESENCE_TASK = "lesion_presence"


def confusion_matrix(
    truth: Sequence[int], predicted: Sequence[int], num_grades: int
) -> np.ndarray:
    """(num_grades, num_grades) counts: row = true grade, column = predicted grade (every grade of
    the scale has its row and column, given or not)."""
    return sklearn_metrics.confusion_matrix(
        np.asarray(truth, int), np.asarray(predicted, int), labels=list(range(num_grades))
    ).astype(np.int64)


def quadratic_weighted_kappa(
    truth: Sequence[int], predicted: Sequence[int], num_grades: int
) -> float:
    """Cohen's kappa with quadratic weights over the grades 0 .. num_grades - 1 (scikit-learn's
    ``cohen_kappa_score``).

    The grade scale is fixed (``labels=range(num_grades)``), so a grade nobody gave still counts
    in the distances.

    Returns:
        kappa, NaN without images or when chance agreement is already perfect (one grade only),
        where scikit-learn would divide by zero.
    """
    truth, predicted = np.asarray(truth, int), np.asarray(predicted, int)
    if truth.size == 0 or (np.unique(truth).size == 1 and np.array_equal(truth, predicted)):
        return math.nan
    with warnings.catch_warnings():
        # One grade on one side only: expected disagreement is still defined, no warning needed.
        warnings.simplefilter("ignore", RuntimeWarning)
        kappa = sklearn_metrics.cohen_kappa_score(
            truth, predicted, labels=list(range(num_grades)), weights="quadratic"
        )
    return float(kappa)


def lesion_presence_metrics(
    probs: np.ndarray, truth: np.ndarray, lesions: Sequence[str], threshold: float = 0.5
) -> Dict[str, float]:
    """Per-lesion precision / recall / F1 of image-level lesion presence, in percent.

    Args:
        probs: (N, C) probabilities.
        truth: (N, C) 1 present, 0 absent, -1 unknown (left out).
        lesions: the C names.
        threshold: probability from which a lesion is predicted present.

    Returns:
        {"F1-<lesion>", "precision-<lesion>", "recall-<lesion>" ..., "mF1"}; NaN where a ratio
        has no denominator (mF1 is the mean over the defined F1s).
    """
    probs = np.asarray(probs, dtype=np.float64).reshape(-1, len(lesions))
    truth = np.asarray(truth).reshape(-1, len(lesions))
    results: Dict[str, float] = OrderedDict()
    f1s = []
    for c, lesion in enumerate(lesions):
        known = truth[:, c] >= 0
        positive = truth[known, c] == 1
        predicted = probs[known, c] >= threshold
        tp = float(np.sum(positive & predicted))
        fp = float(np.sum(~positive & predicted))
        fn = float(np.sum(positive & ~predicted))
        precision = tp / (tp + fp) if tp + fp else math.nan
        recall = tp / (tp + fn) if tp + fn else math.nan
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
        results[f"F1-{lesion}"] = f1 * 100
        results[f"precision-{lesion}"] = precision * 100
        results[f"recall-{lesion}"] = recall * 100
        f1s.append(f1)
    defined = [f for f in f1s if not math.isnan(f)]
    results["mF1"] = float(np.mean(defined)) * 100 if defined else math.nan
    return results


def write_confusion_json(matrices: Dict[str, np.ndarray], path: str) -> None:
    """``{task: {"matrix": [[count]], "images": n}}``, row = true grade, column = predicted
    grade: the numbers the report draws each task's confusion matrix from."""
    content = OrderedDict(
        (task, OrderedDict(matrix=matrix.tolist(), images=int(matrix.sum())))
        for task, matrix in matrices.items()
    )
    with PathManager.open(path, "w") as f:
        json.dump(content, f, indent=2)


class LesionGradingEvaluator(DatasetEvaluator):
    """Grading kappa / accuracy / confusion matrices and lesion-classification F1; see the module
    docstring."""

    @configurable
    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        *,
        tasks: Sequence[str] = ("dr_grade",),
        presence_threshold: float = 0.5,
        distributed: bool = True,
    ):
        """
        Args:
            dataset_name: a registered dataset; its records give the grades and, where it has
                ``thing_classes``, the lesions (the order of ``"lesion_presence"``).
            output_dir: where ``grading_metrics.json`` and ``grading_confusion.json`` go (None:
                nowhere).
            tasks: the graded fields scored (those of :data:`GRADE_COUNTS`).
            presence_threshold: probability from which a lesion is predicted present.
            distributed: gather all ranks' results and evaluate on the main one.
        """
        unknown = [t for t in tasks if t not in GRADE_COUNTS]
        if unknown:
            raise ValueError(f"cannot score {unknown}: graded fields are {sorted(GRADE_COUNTS)}")
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._tasks = list(tasks)
        self._threshold = presence_threshold
        self._distributed = distributed
        metadata = MetadataCatalog.get(dataset_name)
        self._lesions = list(metadata.get("thing_classes", None) or [])
        self._dataset_to_contiguous = dict(
            metadata.get("thing_dataset_id_to_contiguous_id", None) or {}
        )
        self._records: Optional[Dict[str, dict]] = None
        self.reset()

    @classmethod
    def from_config(cls, cfg, dataset_name: str, output_dir: Optional[str] = None):
        """The arguments that score ``MODEL.GRADING.TASKS`` at
        ``RETINA.EVAL.PRESENCE_THRESHOLD``."""
        return {
            "dataset_name": dataset_name,
            "output_dir": output_dir,
            "tasks": list(cfg.MODEL.GRADING.TASKS),
            "presence_threshold": cfg.RETINA.EVAL.PRESENCE_THRESHOLD,
        }

    def reset(self):
        self._grades: Dict[str, List[tuple]] = {task: [] for task in self._tasks}
        self._presence: List[tuple] = []  # (probs (C,), truth (C,))

    def _record(self, inputs: dict) -> dict:
        if self._records is None:
            self._records = {r["file_name"]: r for r in DatasetCatalog.get(self._dataset_name)}
        return self._records.get(inputs["file_name"], {})

    def presence_truth(self, record: dict) -> np.ndarray:
        """(C,) 1 / 0 / -1 (present / absent / unknown) for each lesion of the dataset."""
        truth = np.full(len(self._lesions), -1, dtype=np.int64)
        annotated = record.get("annotated_category_ids")
        if annotated is None:
            return truth  # not a lesion-annotated image (a grading-only record)
        for dataset_id in annotated:
            index = self._dataset_to_contiguous.get(dataset_id)
            if index is not None:
                truth[index] = 0
        ignored = set()
        for anno in record.get("annotations", []):
            c = anno["category_id"]
            if truth[c] < 0:
                continue
            if anno.get("iscrowd", 0):
                ignored.add(c)
            else:
                truth[c] = 1
        for c in ignored:
            if truth[c] == 0:
                truth[c] = -1  # only an ignore region: the graders left it unscored
        return truth

    def process(self, inputs: List[dict], outputs: List[dict]):
        """
        Args:
            inputs: the model's inputs (the record's fields: "file_name", "dr_grade", ...).
            outputs: dicts with "dr_grade" / "dme_grade" probabilities and "lesion_presence".
        """
        for inp, out in zip(inputs, outputs):
            for task in self._tasks:
                truth = inp.get(task)
                if task in out and truth is not None:
                    predicted = int(out[task].detach().cpu().argmax())
                    self._grades[task].append((int(truth), predicted))
            if "lesion_presence" in out and self._lesions:
                probs = out["lesion_presence"].detach().float().cpu().numpy()
                if probs.shape[0] != len(self._lesions):
                    raise ValueError(
                        f"the model predicts {probs.shape[0]} lesions but {self._dataset_name} "
                        f"has {len(self._lesions)} {self._lesions}"
                    )
                # The test mapper drops the annotations; the dataset's record has them.
                record = inp if "annotations" in inp else self._record(inp)
                self._presence.append((probs, self.presence_truth(record)))

    def evaluate(self):
        grades, presence = self._grades, self._presence
        if self._distributed:
            comm.synchronize()
            gathered = comm.gather((self._grades, self._presence), dst=0)
            if not comm.is_main_process():
                return {}
            grades = {task: [p for g, _ in gathered for p in g[task]] for task in self._tasks}
            presence = [p for _, pr in gathered for p in pr]
        results: Dict[str, Dict[str, float]] = OrderedDict()
        confusions: Dict[str, np.ndarray] = OrderedDict()
        for task in self._tasks:
            pairs = grades[task]
            if not pairs:
                logger.warning("[LesionGradingEvaluator] no image of %s has a %s and a prediction",
                               self._dataset_name, task)
                continue
            truth, predicted = (np.array(v) for v in zip(*pairs))
            num = GRADE_COUNTS[task]
            results[task] = OrderedDict(
                kappa=quadratic_weighted_kappa(truth, predicted, num),
                accuracy=float(np.mean(truth == predicted)) * 100,
                images=float(len(pairs)),
            )
            confusions[task] = confusion_matrix(truth, predicted, num)
        if presence and (np.stack([t for _, t in presence]) >= 0).any():
            probs = np.stack([p for p, _ in presence])
            truth = np.stack([t for _, t in presence])
            results[PRESENCE_TASK] = lesion_presence_metrics(
                probs, truth, self._lesions, self._threshold
            )
        if not results:
            return {}
        logger.info(
            f"Grading and lesion classification of {self._dataset_name}:\n"
            + format_grading_metrics(results)
        )
        if self._output_dir:
            os.makedirs(self._output_dir, exist_ok=True)
            write_metrics_json(results, os.path.join(self._output_dir, GRADING_METRICS_FILE))
            if confusions:
                write_confusion_json(
                    confusions, os.path.join(self._output_dir, GRADING_CONFUSION_FILE)
                )
        return copy.deepcopy(results)


def format_grading_metrics(results: Dict[str, Dict[str, float]]) -> str:
    """One pipe-table row per metric: task, metric, value."""
    rows = [
        [task, name, None if isinstance(v, float) and math.isnan(v) else v]
        for task, metrics in results.items()
        for name, v in metrics.items()
    ]
    return tabulate(rows, headers=["task", "metric", "value"], tablefmt="pipe", floatfmt=".3f")
