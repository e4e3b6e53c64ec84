"""``LesionSemanticEvaluator``: per-lesion pixel metrics of a semantic model's probability maps.

The model's ``"sem_seg"`` output, (C, height, width) probabilities in the dataset's
``thing_classes`` order, is scored against the record's ``sem_seg_files`` PNGs at each image's
original size (0 = background, 1 = lesion, 255 = ignore, left out of every metric); a lesion
without a PNG on an image (not annotated there) is ignored on it. The metrics and their
definitions are those of :class:`retina_d2.evaluation.semantic_metrics.SemanticLesionMetrics`:
AUC-PR (= AP) over the pooled pixels of the test set, F1 / Dice / IoU at the threshold, and
image-level F1, per lesion and as means over lesions.
"""
import copy
import json
import logging
import math
import os
from collections import OrderedDict
from typing import Dict, List, Optional

import numpy as np
from tabulate import tabulate

import detectron2.utils.comm as comm
from detectron2.config import configurable
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils.file_io import PathManager

from .coco_io import write_metrics_json
from ..schema import IGNORE_VALUE, SEMANTIC_METRICS_FILE, SEMANTIC_PR_CURVES_FILE
from .semantic_metrics import SemanticLesionMetrics

__all__ = ["LesionSemanticEvaluator", "format_semantic_metrics"]

logger = logging.getLogger(__name__)

# SemanticLesionMetrics' AUC-PR names -> the reported ones: "sem_seg/mAUCPR" reads better, as a
# BEST_METRIC and on a command line, than a name with a second hyphen.
_RENAMED = (("mAUC-PR", "mAUCPR"), ("AUC-PR-", "AUCPR-"))


def gather_accumulators(metrics, distributed: bool):
    """All ranks' metric accumulators merged on the main process (``merge(other)``); None on the
    other ranks, which have nothing to report. Single-process: ``metrics`` itself."""
    if not distributed:
        return metrics
    comm.synchronize()
    gathered = comm.gather(metrics, dst=0)
    if not comm.is_main_process():
        return None
    merged = copy.deepcopy(gathered[0])
    for other in gathered[1:]:
        merged.merge(other)
    return merged


def _report_name(name: str) -> str:
    for old, new in _RENAMED:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


class LesionSemanticEvaluator(DatasetEvaluator):
    """Per-lesion AUC-PR, AP, F1, Dice, IoU and image F1 of ``"sem_seg"`` outputs, in percent.

    ``evaluate()`` returns ``{"sem_seg": {"AUCPR-<lesion>", "AP-<lesion>", "F1-<lesion>",
    "Dice-<lesion>", "IoU-<lesion>", "imageF1-<lesion>", ..., "mAUCPR", "mAP", "mF1", "mDice",
    "mIoU", "mImageF1"}}`` (NaN where undefined, e.g. AUC-PR of a lesion without positive pixels),
    and with an output_dir writes ``semantic_metrics.json`` (NaN as null) and
    ``semantic_pr_curves.json`` there: each lesion's PR curve at 101 recall levels, which the
    report (:mod:`retina_d2.report`) draws.
    """

    @configurable
    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        *,
        threshold: float = 0.5,
        num_bins: int = 10000,
        exact: bool = False,
        distributed: bool = True,
    ):
        """
        Args:
            dataset_name: a registered dataset whose records have ``sem_seg_files`` and whose
                metadata has ``thing_classes`` (the order of the model's channels).
            output_dir: where the metrics and PR curves are written (None: not written).
            threshold: probability at which a pixel (and, by its map's maximum, an image) is
                predicted positive, for F1 / Dice / IoU / image F1.
            num_bins: score bins of the AUC-PR histograms (see ``SemanticLesionMetrics``).
            exact: keep every pixel for an exact AUC-PR (small test sets only).
            distributed: gather the statistics of all ranks and evaluate on the main one.
        """
        metadata = MetadataCatalog.get(dataset_name)
        lesions = metadata.get("thing_classes", None)
        if not lesions:
            raise ValueError(f"dataset {dataset_name!r} has no thing_classes to name the channels")
        self._dataset_name = dataset_name
        self._lesions = list(lesions)
        self._output_dir = output_dir
        self._distributed = distributed
        self._metrics = SemanticLesionMetrics(
            self._lesions, threshold=threshold, num_bins=num_bins, exact=exact
        )
        self._records: Optional[Dict[str, dict]] = None

    @classmethod
    def from_config(cls, cfg, dataset_name: str, output_dir: Optional[str] = None):
        """The arguments of an evaluator of ``dataset_name`` with the defaults (threshold 0.5,
        10,000 bins)."""
        return {"dataset_name": dataset_name, "output_dir": output_dir}

    def reset(self):
        self._metrics.reset()

    def _sem_seg_files(self, inputs: dict) -> Dict[str, str]:
        """The input's lesion -> PNG paths, from the input or else from the dataset's record."""
        if "sem_seg_files" in inputs:
            return inputs["sem_seg_files"]
        if self._records is None:
            self._records = {r["file_name"]: r for r in DatasetCatalog.get(self._dataset_name)}
        record = self._records.get(inputs["file_name"], {})
        if "sem_seg_files" not in record:
            raise ValueError(
                f"{inputs['file_name']}: no sem_seg_files in {self._dataset_name}; convert the "
                "dataset with its semantic targets (without --no-semantic)"
            )
        return record["sem_seg_files"]

    def _targets(self, inputs: dict, shape) -> np.ndarray:
        """uint8 (C, H, W) targets at the original size; lesions without a PNG all 255."""
        files = self._sem_seg_files(inputs)
        targets = np.full((len(self._lesions),) + tuple(shape), IGNORE_VALUE, np.uint8)
        for index, lesion in enumerate(self._lesions):
            if lesion not in files:
                continue
            target = utils.read_image(files[lesion])
            if target.ndim == 3:  # an RGB-saved PNG holds its labels in every channel
                target = target[..., 0]
            if target.shape != tuple(shape):
                raise ValueError(
                    f"semantic target {files[lesion]} is {target.shape[1]}x{target.shape[0]} (WxH)"
                    f" but the prediction for {inputs['file_name']} is {shape[1]}x{shape[0]}"
                )
            targets[index] = target
        return targets

    def process(self, inputs: List[dict], outputs: List[dict]):
        """
        Args:
            inputs: the model's inputs ("file_name", "height", "width", and "sem_seg_files"
                when the mapper kept the record's fields).
            outputs: dicts with "sem_seg": (C, height, width) probabilities.
        """
        for inp, out in zip(inputs, outputs):
            if "sem_seg" not in out:
                continue
            probs = out["sem_seg"].detach().float().cpu().numpy()
            if probs.shape[0] != len(self._lesions):
                raise ValueError(
                    f"the model predicts {probs.shape[0]} semantic channels but "
                    f"{self._dataset_name} has {len(self._lesions)} lesions {self._lesions}"
                )
            expected = (inp.get("height", probs.shape[1]), inp.get("width", probs.shape[2]))
            if probs.shape[1:] != expected:
                raise ValueError(
                    f"{inp['file_name']}: sem_seg is {probs.shape[2]}x{probs.shape[1]} (WxH), "
                    f"not the image's {expected[1]}x{expected[0]}"
                )
            self._metrics.update(probs, self._targets(inp, probs.shape[1:]))

    def evaluate(self):
        metrics = gather_accumulators(self._metrics, self._distributed)
        if metrics is None:
            return {}
        if metrics.num_images == 0:
            logger.warning("[LesionSemanticEvaluator] received no semantic predictions to score")
        results = OrderedDict((_report_name(k), v * 100) for k, v in metrics.compute().items())
        logger.info(
            f"Semantic metrics of {self._dataset_name} ({metrics.num_images} images, %, threshold "
            f"{metrics.threshold}):\n" + format_semantic_metrics(results, self._lesions)
        )
        if self._output_dir:
            os.makedirs(self._output_dir, exist_ok=True)
            write_metrics_json(
                {"sem_seg": results}, os.path.join(self._output_dir, SEMANTIC_METRICS_FILE)
            )
            with PathManager.open(
                os.path.join(self._output_dir, SEMANTIC_PR_CURVES_FILE), "w"
            ) as f:
                json.dump(metrics.pr_curves(), f, indent=2)
        return {"sem_seg": results}


def format_semantic_metrics(results: Dict[str, float], lesions: List[str]) -> str:
    """One pipe-table row per lesion, then the means."""
    columns = ["AUCPR", "F1", "IoU", "imageF1"]
    means = ["mAUCPR", "mF1", "mIoU", "mImageF1"]
    rows = [[lesion] + [results.get(f"{c}-{lesion}") for c in columns] for lesion in lesions]
    rows.append(["mean"] + [results.get(m) for m in means])
    rows = [[r[0]] + [None if v is not None and math.isnan(v) else v for v in r[1:]] for r in rows]
    return tabulate(
        rows, headers=["lesion"] + columns, tablefmt="pipe", floatfmt=".2f", numalign="left"
    )
