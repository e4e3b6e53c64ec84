"""What the semantic protocols share: resizing probability maps and targets to a paper's
evaluation size, per-lesion targets as one class map, and the evaluator around an accumulator.

Every semantic protocol reads what :class:`~retina_d2.evaluation.LesionSemanticEvaluator` reads
(the ``"sem_seg"`` output, (C, H, W) lesion probabilities at the image's original size, and the
record's per-lesion PNGs: 0 / 1, 255 = ignore) and differs only in what it computes from them.
"""
import logging
import math
import os
from collections import OrderedDict
from typing import Dict, List, Optional

import cv2
import numpy as np
from tabulate import tabulate

from ..coco_io import write_metrics_json
from ..semantic_eval import LesionSemanticEvaluator, gather_accumulators
from ...schema import IGNORE_VALUE, protocol_metrics_file

__all__ = [
    "SemanticProtocolEvaluator",
    "class_labels",
    "mean_defined",
    "resize_probabilities",
    "resize_targets",
]


def resize_probabilities(probs: np.ndarray, size: int) -> np.ndarray:
    """(C, H, W) probabilities -> (C, size, size), as the paper's model would have seen the image:
    area averaging when shrinking (a one-pixel lesion keeps its share of the pixel it falls in),
    bilinear when enlarging. ``size`` 0 leaves the maps as they are."""
    if not size or probs.shape[1:] == (size, size):
        return probs
    shrink = probs.shape[1] >= size and probs.shape[2] >= size
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    channels = [
        cv2.resize(p.astype(np.float32), (size, size), interpolation=interpolation)
        for p in probs
    ]
    return np.clip(np.stack(channels), 0.0, 1.0)


def resize_targets(targets: np.ndarray, size: int) -> np.ndarray:
    """(C, H, W) uint8 targets (0 / 1 / 255) -> (C, size, size) by nearest neighbour, as the
    papers resize their masks (labels stay labels). ``size`` 0 leaves them as they are."""
    if not size or targets.shape[1:] == (size, size):
        return targets
    return np.stack(
        [cv2.resize(t, (size, size), interpolation=cv2.INTER_NEAREST) for t in targets]
    )


def class_labels(targets: np.ndarray) -> np.ndarray:
    """(C, H, W) per-lesion targets -> (H, W) class map: ``1 + k`` for the first lesion channel k
    that is 1 at the pixel, 0 (background) where every channel is 0, and 255 where none is
    positive and one is ignore (the pixel might hold that lesion). The rule ResUNet's training
    targets follow (its report gives overlapping lesions to the first in its order)."""
    positive = targets == 1
    first = np.argmax(positive, axis=0) + 1
    labels = np.where((targets == IGNORE_VALUE).any(axis=0), IGNORE_VALUE, 0)
    return np.where(positive.any(axis=0), first, labels).astype(np.int64)


def mean_defined(values: List[float]) -> float:
    """Mean of the values that are not NaN; NaN when none is."""
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else float("nan")


class SemanticProtocolEvaluator(LesionSemanticEvaluator):
    """A :class:`LesionSemanticEvaluator` whose accumulator is a protocol's.

    Subclasses set ``protocol`` (the results' task name and the stem of
    ``<protocol>_metrics.json``) and build their accumulator in ``_build_metrics``. The
    accumulator has ``reset``, ``update(probs, targets)``, ``merge(other)``, ``num_images``, and
    ``compute()`` returning the reported values (rates in percent).
    """

    protocol = ""

    def __init__(self, dataset_name: str, output_dir: Optional[str] = None, *, distributed=True,
                 **options):
        super().__init__(dataset_name, output_dir, distributed=distributed)
        self._metrics = self._build_metrics(**options)

    def _build_metrics(self, **options):
        raise NotImplementedError

    def evaluate(self) -> Dict[str, "OrderedDict[str, float]"]:
        metrics = gather_accumulators(self._metrics, self._distributed)
        if metrics is None:
            return {}
        if metrics.num_images == 0:
            self._log().warning("[%s] received no semantic predictions to score", self.protocol)
        results = metrics.compute()
        self._log().info(
            f"{self.protocol} of {self._dataset_name} ({metrics.num_images} images):\n"
            + format_flat(results)
        )
        if self._output_dir:
            path = os.path.join(self._output_dir, protocol_metrics_file(self.protocol))
            os.makedirs(self._output_dir, exist_ok=True)
            write_metrics_json({self.protocol: results}, path)
        return {self.protocol: results}

    def _log(self):
        return logging.getLogger(type(self).__module__)


def format_flat(results: Dict[str, float]) -> str:
    """One pipe-table row per metric name."""
    rows = [[k, None if isinstance(v, float) and math.isnan(v) else v] for k, v in results.items()]
    return tabulate(rows, headers=["metric", "value"], tablefmt="pipe", floatfmt=".4f")
