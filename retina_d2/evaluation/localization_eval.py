"""``LandmarkLocalizationEvaluator``: predicted optic disc / fovea centres against the records'.

The model's ``"landmarks"`` ({name: (x, y)} in the original image's pixels) are compared with the
record's ``optic_disc_center`` / ``fovea_center`` (the converters' fields, original pixels) by
Euclidean distance; images without that landmark in their record are left out. Per landmark:
the mean and median distance (pixels of the original image), the share of images within each of
the stated radii (percent, ``within<r>px``) and the number of images scored.

``evaluate()`` returns ``{"optic_disc": {"distance", "median_distance", "within50px", ...,
"images"}, "fovea": {...}}`` and writes it to ``localization_metrics.json``, and every image's
prediction, truth and distance to ``landmark_predictions.json``, in the output folder.
"""
import copy
import json
import logging
import math
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
from tabulate import tabulate

import detectron2.utils.comm as comm
from detectron2.config import configurable
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils.file_io import PathManager

from ..schema import LANDMARK_FIELDS, LANDMARK_PREDICTIONS_FILE, LOCALIZATION_METRICS_FILE
from .coco_io import write_metrics_json

__all__ = [
    "LANDMARK_FIELDS",
    "LandmarkLocalizationEvaluator",
    "format_localization_metrics",
    "localization_metrics",
    "radius_name",
]

logger = logging.getLogger(__name__)



def radius_name(radius: float) -> str:
    """The metric name of the share within ``radius`` pixels: ``within50px``, ``within37.5px``."""
    return f"within{radius:g}px"


def localization_metrics(distances: Sequence[float], radii: Sequence[float]) -> Dict[str, float]:
    """Mean and median of ``distances`` (pixels), the percentage within each radius (inclusive),
    and the count; NaN statistics without distances."""
    d = np.asarray(distances, dtype=np.float64)
    results: Dict[str, float] = OrderedDict()
    results["distance"] = float(d.mean()) if d.size else math.nan
    results["median_distance"] = float(np.median(d)) if d.size else math.nan
    for radius in radii:
        results[radius_name(radius)] = float(np.mean(d <= radius)) * 100 if d.size else math.nan
    results["images"] = float(d.size)
    return results


class LandmarkLocalizationEvaluator(DatasetEvaluator):
    """Distances of predicted landmarks to the records'; see the module docstring."""

    @configurable
    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        *,
        landmarks: Sequence[str] = ("optic_disc", "fovea"),
        radii: Sequence[float] = (50.0, 100.0),
        distributed: bool = True,
    ):
        """
        Args:
            dataset_name: the dataset evaluated (named in the log).
            output_dir: where the metrics and per-image predictions go (None: nowhere).
            landmarks: the landmarks scored (keys of :data:`LANDMARK_FIELDS`).
            radii: pixels of the original image; the share of images found within each.
            distributed: gather all ranks' results and evaluate on the main one.
        """
        unknown = [name for name in landmarks if name not in LANDMARK_FIELDS]
        if unknown:
            raise ValueError(f"unknown landmarks {unknown}; known: {sorted(LANDMARK_FIELDS)}")
        if any(r <= 0 for r in radii):
            raise ValueError(f"radii must be positive pixels, got {list(radii)}")
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._landmarks = list(landmarks)
        self._radii = [float(r) for r in radii]
        self._distributed = distributed
        self.reset()

    @classmethod
    def from_config(cls, cfg, dataset_name: str, output_dir: Optional[str] = None):
        """The arguments that score ``MODEL.LOCALIZATION.LANDMARKS`` within
        ``RETINA.EVAL.LANDMARK_RADII``."""
        return {
            "dataset_name": dataset_name,
            "output_dir": output_dir,
            "landmarks": list(cfg.MODEL.LOCALIZATION.LANDMARKS),
            "radii": list(cfg.RETINA.EVAL.LANDMARK_RADII),
        }

    def reset(self):
        self._rows: List[dict] = []  # one per (image, landmark) with a truth and a prediction

    def process(self, inputs: List[dict], outputs: List[dict]):
        """
        Args:
            inputs: the model's inputs, with the record's "optic_disc_center" / "fovea_center".
            outputs: dicts with "landmarks" {name: (x, y)} in the original image's pixels.
        """
        for inp, out in zip(inputs, outputs):
            predicted = out.get("landmarks") or {}
            for name in self._landmarks:
                truth = inp.get(LANDMARK_FIELDS[name])
                if truth is None or name not in predicted:
                    continue
                (px, py), (tx, ty) = predicted[name], truth
                self._rows.append({
                    "file_name": inp.get("file_name"),
                    "landmark": name,
                    "predicted": [float(px), float(py)],
                    "truth": [float(tx), float(ty)],
                    "distance": math.hypot(px - tx, py - ty),
                })

    def evaluate(self):
        rows = self._rows
        if self._distributed:
            comm.synchronize()
            gathered = comm.gather(self._rows, dst=0)
            if not comm.is_main_process():
                return {}
            rows = [r for part in gathered for r in part]
        results: Dict[str, Dict[str, float]] = OrderedDict()
        for name in self._landmarks:
            distances = [r["distance"] for r in rows if r["landmark"] == name]
            if not distances:
                logger.warning(
                    "[LandmarkLocalizationEvaluator] no image of %s has a %s centre and a "
                    "prediction", self._dataset_name, name,
                )
                continue
            results[name] = localization_metrics(distances, self._radii)
        if not results:
            return {}
        logger.info(
            f"Landmark localization of {self._dataset_name} (pixels of the original images):\n"
            + format_localization_metrics(results, self._radii)
        )
        if self._output_dir:
            os.makedirs(self._output_dir, exist_ok=True)
            write_metrics_json(results, os.path.join(self._output_dir, LOCALIZATION_METRICS_FILE))
            predictions = os.path.join(self._output_dir, LANDMARK_PREDICTIONS_FILE)
            with PathManager.open(predictions, "w") as f:
                json.dump(rows, f, indent=1)
        return copy.deepcopy(results)


def format_localization_metrics(results: Dict[str, Dict[str, float]], radii) -> str:
    """One pipe-table row per landmark."""
    columns = ["distance", "median_distance"] + [radius_name(r) for r in radii] + ["images"]
    rows = [[name] + [metrics.get(c) for c in columns] for name, metrics in results.items()]
    return tabulate(
        rows, headers=["landmark"] + columns, tablefmt="pipe", floatfmt=".1f", numalign="left"
    )
