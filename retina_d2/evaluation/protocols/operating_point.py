"""``pr_operating_point``: Red-Seg's protocol -- per lesion type, pixel precision and recall at
one operating point beside the pixel AUC-PR.

Reading of the paper (``papers/red-seg-idrid.txt``; its Chinese text came through OCR garbled,
the tables and formulas did not): Table 2 gives, per lesion type (microaneurysms, haemorrhages)
and training scheme, three columns -- precision, recall and AUC_PR -- with
``P = TP / (TP + FP)`` and ``R = TP / (TP + FN)`` defined just above it; the abstract says the
two-stage training raised "both recall and precision" of haemorrhages "by at least 2.8%", which
Table 2's rows bear out (0.5987 -> 0.6269, 0.5955 -> 0.6251). Red-Seg is a pixel segmenter scored
with the IDRiD challenge's pixel AUC-PR, so TP / FP / FN are read as pixel counts over the test
set pooled. The sentence that says which threshold gives P and R is unreadable; in every row of
Tables 2 and 5 precision and recall agree to within 0.006 (0.4875 / 0.4926, 0.5009 / 0.4993,
0.6269 / 0.6251, ...), which a fixed threshold would not give across six models, so the
operating point is read as the PR curve's **break-even point**, where precision equals recall.

Here, per lesion, over the valid pixels of the split pooled (255 = ignore):

- ``AUCPR-<lesion>``: the pixel AUC-PR of :class:`~retina_d2.evaluation.semantic_metrics.
  SemanticLesionMetrics` (the IDRiD challenge's);
- ``precision-<lesion>``, ``recall-<lesion>`` at the operating point, and ``threshold-<lesion>``
  (a probability, not a percent): with ``threshold=None`` the break-even point, the point of the
  pixel PR curve (one per distinct score: the score bins of 1e-4 unless ``exact``) where
  ``|precision - recall|`` is smallest, the higher threshold on a tie; with a number, pixels
  scoring >= it (counted exactly) -- a threshold chosen on validation data, for a protocol that
  does not look at the test curve to pick its point;
- ``mAUCPR``, ``mPrecision``, ``mRecall``: means over the scored lesions with a defined value.

``lesions`` restricts the scored lesions (Red-Seg predicts microaneurysms and haemorrhages
only; its other channels are constants). Rates in percent.
"""
from collections import OrderedDict
from typing import Optional, Sequence

import numpy as np

from detectron2.config import configurable

from ..semantic_metrics import SemanticLesionMetrics
from .semantic import SemanticProtocolEvaluator, mean_defined

__all__ = ["PR_OPERATING_POINT", "OperatingPointEvaluator", "OperatingPointMetrics", "break_even"]

PR_OPERATING_POINT = "pr_operating_point"


def break_even(precision: np.ndarray, recall: np.ndarray, thresholds: np.ndarray):
    """(precision, recall, threshold) of the curve point where precision and recall are
    closest; the first such point in the given (descending-threshold) order on a tie. NaNs when
    the curve is empty."""
    if len(thresholds) == 0:
        return float("nan"), float("nan"), float("nan")
    best = int(np.argmin(np.abs(np.asarray(precision) - np.asarray(recall))))
    return float(precision[best]), float(recall[best]), float(thresholds[best])


class OperatingPointMetrics:
    """Accumulates the pixels' statistics with :class:`SemanticLesionMetrics`; see the module."""

    def __init__(
        self,
        lesions: Sequence[str],
        *,
        threshold: Optional[float] = None,
        scored_lesions: Sequence[str] = (),
        num_bins: int = 10000,
        exact: bool = False,
    ):
        """
        Args:
            lesions: lesion names, in the order of the maps' first dimension.
            threshold: None for the break-even point, else the score threshold of P and R.
            scored_lesions: the lesions reported (empty: all).
            num_bins, exact: of the AUC-PR and the curve (see ``SemanticLesionMetrics``).
        """
        unknown = sorted(set(scored_lesions) - set(lesions))
        if unknown:
            raise ValueError(
                f"scored lesions {unknown} are not among the dataset's {list(lesions)}"
            )
        if threshold is not None and not 0 <= threshold <= 1:
            raise ValueError(f"threshold must lie in [0, 1] (or None), got {threshold}")
        self.threshold = threshold
        self.scored = [les for les in lesions if not scored_lesions or les in scored_lesions]
        self.pixels = SemanticLesionMetrics(
            lesions, threshold=0.5 if threshold is None else threshold, num_bins=num_bins,
            exact=exact,
        )

    @property
    def num_images(self) -> int:
        return self.pixels.num_images

    def reset(self) -> None:
        self.pixels.reset()

    def update(self, probs: np.ndarray, targets: np.ndarray) -> None:
        self.pixels.update(probs, targets)

    def merge(self, other: "OperatingPointMetrics") -> None:
        self.pixels.merge(other.pixels)

    def _point(self, index: int):
        if self.threshold is None:
            return break_even(*self.pixels.pr_curve(index))
        tp, fp, fn = (int(v) for v in self.pixels.pixel_counts[index])
        precision = tp / (tp + fp) if tp + fp else float("nan")
        recall = tp / (tp + fn) if tp + fn else float("nan")
        return precision, recall, float(self.threshold)

    def compute(self) -> "OrderedDict[str, float]":
        results = OrderedDict()
        means = {"mAUCPR": [], "mPrecision": [], "mRecall": []}
        for lesion in self.scored:
            index = self.pixels.lesions.index(lesion)
            auc_pr = self.pixels.auc_pr(index)
            precision, recall, threshold = self._point(index)
            if np.isnan(auc_pr):  # no positive pixel: no recall, no operating point
                precision = recall = threshold = float("nan")
            results[f"AUCPR-{lesion}"] = auc_pr * 100
            results[f"precision-{lesion}"] = precision * 100
            results[f"recall-{lesion}"] = recall * 100
            results[f"threshold-{lesion}"] = threshold
            for name, value in zip(means, (auc_pr, precision, recall)):
                means[name].append(value * 100)
        for name, values in means.items():
            results[name] = mean_defined(values)
        return results


class OperatingPointEvaluator(SemanticProtocolEvaluator):
    """``pr_operating_point`` of a semantic head's outputs (see the module docstring); writes
    ``pr_operating_point_metrics.json``."""

    protocol = PR_OPERATING_POINT

    @configurable
    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        *,
        threshold: Optional[float] = None,
        scored_lesions: Sequence[str] = (),
        distributed: bool = True,
    ):
        """
        Args:
            dataset_name: a registered dataset with ``thing_classes`` and ``sem_seg_files``.
            output_dir: where the metrics are written (None: not written).
            threshold, scored_lesions: see :class:`OperatingPointMetrics`.
            distributed: gather the statistics of all ranks and evaluate on the main one.
        """
        super().__init__(
            dataset_name, output_dir, distributed=distributed, threshold=threshold,
            scored_lesions=tuple(scored_lesions),
        )

    def _build_metrics(self, **options):
        return OperatingPointMetrics(self._lesions, **options)

    @classmethod
    def from_config(cls, cfg, dataset_name: str, output_dir: Optional[str] = None):
        """``RETINA.EVAL.OPERATING_POINT`` (< 0: break-even); a Red-Seg head's lesions
        (``MODEL.RED_SEG.LESIONS``) are the ones scored, every lesion otherwise."""
        threshold = cfg.RETINA.EVAL.OPERATING_POINT
        red_seg = cfg.MODEL.SEM_SEG_HEAD.NAME == "RedSegHead"
        return {
            "dataset_name": dataset_name,
            "output_dir": output_dir,
            "threshold": None if threshold < 0 else float(threshold),
            "scored_lesions": tuple(cfg.MODEL.RED_SEG.LESIONS) if red_seg else (),
        }
