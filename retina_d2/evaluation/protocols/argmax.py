"""``argmax_dice``: the ResUNet report's protocol -- argmax class maps at 256 px, Dice / IoU per
lesion class, their means without background, and pixel accuracy.

The report (``papers/resunet-grading-localization-idrid.txt``, "Evaluation Metrics" and
"Data Preprocessing") resizes images and masks to 256x256 (masks by nearest neighbour), takes the
argmax of a 6-class softmax (background, MA, HE, EX, SE, OD), and defines per class c
``Dice_c = 2TP_c / (2TP_c + FP_c + FN_c)`` and ``IoU_c = TP_c / (TP_c + FP_c + FN_c)``, "averaged
across the five lesion/OD classes" (background excluded), and pixel accuracy = correctly
classified pixels / all pixels (background included: eq. 5 counts every pixel). It says the
metrics were computed "per batch and epoch" (batch size 4), i.e. per batch and then averaged, and
gives no rule for a class absent from a batch.

Here, both maps are resized to ``size`` x ``size`` (``size`` 0: native size): the probabilities
by area averaging, the per-lesion targets by nearest neighbour, then merged into one class map
(the first positive lesion in the dataset's order, as ResUNet trains). The predicted class is the
argmax over (background = 1 - sum of the lesion probabilities, lesion 1, ..., lesion C), which
for a softmax head (whose background channel the model drops) is its own background probability.
Ignore pixels (255) take no part. Two reductions:

- ``"pooled"`` (the default): TP / FP / FN per class and the pixel accuracy counted over all the
  pixels of the split pooled together; this is eq. 3-5 applied to the split, and equals
  scikit-learn's ``f1_score`` / ``jaccard_score`` (per class) and ``accuracy_score`` on the
  concatenated pixels;
- ``"per_batch"`` (the report's wording): the same per batch of ``batch_size`` consecutive images
  in evaluation order (the last batch may be smaller), then the mean over batches of each
  per-class value (a class with TP + FP + FN = 0 in a batch is left out of that batch) and of
  the pixel accuracy; a batch's mean Dice / IoU is over its defined lesion classes.

``mDice`` / ``mIoU`` are the means over lesion classes whose value is defined (background never
counts). Reported in percent: ``Dice-<lesion>``, ``IoU-<lesion>``, ``mDice``, ``mIoU``,
``pixel_accuracy``.
"""
from collections import OrderedDict
from typing import List, Optional, Sequence

import numpy as np

from detectron2.config import configurable

from .semantic import (
    SemanticProtocolEvaluator,
    class_labels,
    mean_defined,
    resize_probabilities,
    resize_targets,
)
from ...schema import IGNORE_VALUE

__all__ = ["ARGMAX_DICE", "REDUCTIONS", "ArgmaxDiceEvaluator", "ArgmaxSegmentationMetrics"]

ARGMAX_DICE = "argmax_dice"
REDUCTIONS = ("pooled", "per_batch")


def argmax_classes(probs: np.ndarray) -> np.ndarray:
    """(C, H, W) lesion probabilities -> (H, W) classes 0..C, background = 1 - their sum."""
    background = 1.0 - probs.sum(axis=0, keepdims=True)
    return np.argmax(np.concatenate([background, probs]), axis=0)


def _rates(confusion: np.ndarray):
    """Per-class Dice and IoU (NaN where TP + FP + FN = 0) and pixel accuracy of a (K, K)
    confusion matrix (rows: true class, columns: predicted)."""
    tp = np.diag(confusion).astype(np.float64)
    fp = confusion.sum(axis=0) - tp
    fn = confusion.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = np.where(tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
    total = confusion.sum()
    accuracy = tp.sum() / total if total else float("nan")
    return dice, iou, float(accuracy)


class ArgmaxSegmentationMetrics:
    """Accumulates one confusion matrix per image; see the module docstring."""

    def __init__(
        self,
        lesions: Sequence[str],
        *,
        size: int = 256,
        reduction: str = "pooled",
        batch_size: int = 4,
    ):
        """
        Args:
            lesions: lesion names, in the order of the maps' first dimension.
            size: side both maps are resized to (0: native size).
            reduction: "pooled" or "per_batch".
            batch_size: images per batch of the "per_batch" reduction.
        """
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if size < 0 or batch_size < 1:
            raise ValueError(f"size must be >= 0 and batch_size >= 1, got {size}, {batch_size}")
        self.lesions = list(lesions)
        self.size = int(size)
        self.reduction = reduction
        self.batch_size = int(batch_size)
        self.reset()

    def reset(self) -> None:
        self.confusions: List[np.ndarray] = []

    @property
    def num_images(self) -> int:
        return len(self.confusions)

    def update(self, probs: np.ndarray, targets: np.ndarray) -> None:
        """Adds one image: (C, H, W) probabilities and (C, H, W) 0 / 1 / 255 targets."""
        probs, targets = np.asarray(probs), np.asarray(targets)
        if probs.shape != targets.shape or probs.shape[0] != len(self.lesions):
            raise ValueError(
                f"expected probabilities and targets (C, H, W) with C = {len(self.lesions)}, "
                f"got {probs.shape} and {targets.shape}"
            )
        truth = class_labels(resize_targets(targets.astype(np.uint8), self.size))
        predicted = argmax_classes(resize_probabilities(probs, self.size))
        valid = truth != IGNORE_VALUE
        classes = len(self.lesions) + 1
        counts = np.bincount(
            truth[valid] * classes + predicted[valid], minlength=classes * classes
        )
        self.confusions.append(counts.reshape(classes, classes))

    def merge(self, other: "ArgmaxSegmentationMetrics") -> None:
        """Appends another accumulator's images (e.g. the next process's shard)."""
        if (other.lesions, other.size) != (self.lesions, self.size):
            raise ValueError("cannot merge accumulators with different lesions or sizes")
        self.confusions += other.confusions

    def _groups(self) -> List[np.ndarray]:
        if self.reduction == "pooled":
            return [sum(self.confusions)] if self.confusions else []
        return [
            sum(self.confusions[i : i + self.batch_size])
            for i in range(0, len(self.confusions), self.batch_size)
        ]

    def compute(self) -> "OrderedDict[str, float]":
        """``Dice-<lesion>``, ``IoU-<lesion>``, ``mDice``, ``mIoU``, ``pixel_accuracy`` in
        percent (NaN where undefined)."""
        per_group = [_rates(c) for c in self._groups()]
        results = OrderedDict()
        for k, lesion in enumerate(self.lesions, start=1):
            results[f"Dice-{lesion}"] = mean_defined([d[k] for d, _, _ in per_group]) * 100
            results[f"IoU-{lesion}"] = mean_defined([i[k] for _, i, _ in per_group]) * 100
        # Per group: the mean over its defined lesion classes; then the mean over groups.
        results["mDice"] = mean_defined([mean_defined(list(d[1:])) for d, _, _ in per_group]) * 100
        results["mIoU"] = mean_defined([mean_defined(list(i[1:])) for _, i, _ in per_group]) * 100
        results["pixel_accuracy"] = mean_defined([a for _, _, a in per_group]) * 100
        return results


class ArgmaxDiceEvaluator(SemanticProtocolEvaluator):
    """``argmax_dice`` of a semantic head's outputs (see the module docstring); writes
    ``argmax_dice_metrics.json``."""

    protocol = ARGMAX_DICE

    @configurable
    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        *,
        size: int = 256,
        reduction: str = "pooled",
        batch_size: int = 4,
        distributed: bool = True,
    ):
        """
        Args:
            dataset_name: a registered dataset with ``thing_classes`` and ``sem_seg_files``.
            output_dir: where the metrics are written (None: not written).
            size, reduction, batch_size: see :class:`ArgmaxSegmentationMetrics`.
            distributed: gather the statistics of all ranks and evaluate on the main one.
        """
        super().__init__(
            dataset_name, output_dir, distributed=distributed, size=size, reduction=reduction,
            batch_size=batch_size,
        )

    def _build_metrics(self, **options):
        return ArgmaxSegmentationMetrics(self._lesions, **options)

    @classmethod
    def from_config(cls, cfg, dataset_name: str, output_dir: Optional[str] = None):
        """With ``RETINA.EVAL.ARGMAX_SIZE``, ``ARGMAX_REDUCTION`` and ``ARGMAX_BATCH_SIZE``."""
        return {
            "dataset_name": dataset_name,
            "output_dir": output_dir,
            "size": cfg.RETINA.EVAL.ARGMAX_SIZE,
            "reduction": cfg.RETINA.EVAL.ARGMAX_REDUCTION,
            "batch_size": cfg.RETINA.EVAL.ARGMAX_BATCH_SIZE,
        }
