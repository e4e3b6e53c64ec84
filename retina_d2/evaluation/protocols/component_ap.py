"""``component_ap``: CBAM-DeepLab's protocol -- per-lesion "AP", its mean "mAP", and IoU / mIoU
of sigmoid lesion maps at 512x512 on DDR's test split, with pixel AUC-PR beside them.

What the paper states (``papers/cbam-deeplab-ddr.txt``, III.F): "Precision ... is the proportion
of predicted lesions that are correct. Average Precision (AP) is mean of Precision at various IoU
from 0.50 to 0.95 ... It gives a single score that summarizes performance across all confidence
thresholds. Mean Average Precision (mAP) calculates the average precision across multiple
classes" (eq. 8: mAP = the mean of the per-lesion APs); IoU is eq. 7, ``(|P n T| + eps) /
(|P u T| + eps)``; images are resized to 512x512 for evaluation. The AP it describes is COCO's
AP@[.50:.95] (its reference [16]) of *predicted lesions*, while the model outputs pixel maps and
the paper does not say how lesions are cut out of them; its DeepLabV3+ baseline's MA figure
(0.0205) is quoted from the DDR benchmark, which ranks by pixel AUC-PR. So both are computed:

- ``AP-<lesion>`` / ``mAP`` (the stated definition, made concrete): each lesion map at
  ``size`` x ``size`` is thresholded at ``threshold`` (0.5); every 8-connected component is one
  predicted lesion, scored by its highest probability; every 8-connected component of the
  (nearest-neighbour resized) target is one ground-truth lesion; COCO's mask AP averaged over IoU
  0.50, 0.55, ..., 0.95 (pycocotools' COCOeval through
  :func:`~retina_d2.evaluation.evaluate_coco_results`, at most ``max_components`` predictions per
  image and lesion), per lesion; ``mAP`` = the mean over lesions with ground truth;
- ``AUCPR-<lesion>`` / ``mAUCPR``: pixel AUC-PR at ``size`` (see ``SemanticLesionMetrics``),
  the reading under which the baseline's figure was published;
- ``IoU-<lesion>`` / ``mIoU``: pixel IoU at ``threshold``, over the split's pixels pooled at
  ``size`` (eq. 7 with the test set as P and T; its eps is negligible there).

Ignore pixels (255) are neither lesion nor background: no predicted component covers them and
no target component is made of them; a lesion not annotated on an image (all 255) is scored on
the images that annotate it only. Everything is in percent.
"""
from collections import OrderedDict
from typing import List, Optional, Sequence

import cv2
import numpy as np
import pycocotools.mask as mask_util

from detectron2.config import configurable

from ..instance_eval import evaluate_coco_results
from ...schema import IGNORE_VALUE
from ..semantic_metrics import SemanticLesionMetrics
from .semantic import SemanticProtocolEvaluator, mean_defined, resize_probabilities, resize_targets

__all__ = ["COMPONENT_AP", "ComponentAPEvaluator", "ComponentAPMetrics", "components"]

COMPONENT_AP = "component_ap"


def components(mask: np.ndarray) -> List[np.ndarray]:
    """The 8-connected components of a binary (H, W) mask, as bool masks."""
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return [labels == k for k in range(1, count)]


def _rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


class ComponentAPMetrics:
    """Accumulates the resized images' components and pixel statistics; see the module."""

    def __init__(
        self,
        lesions: Sequence[str],
        *,
        size: int = 512,
        threshold: float = 0.5,
        max_components: int = 1000,
        num_bins: int = 10000,
        exact: bool = False,
    ):
        """
        Args:
            lesions: lesion names, in the order of the maps' first dimension.
            size: side both maps are resized to (0: native size).
            threshold: probability at which a pixel is predicted positive.
            max_components: highest-scoring predicted components per image and lesion scored.
            num_bins, exact: of the pixel AUC-PR (see ``SemanticLesionMetrics``).
        """
        if size < 0 or max_components < 1:
            raise ValueError(f"size must be >= 0 and max_components >= 1, got {size}, "
                             f"{max_components}")
        self.lesions = list(lesions)
        self.size = int(size)
        self.threshold = float(threshold)
        self.max_components = int(max_components)
        self.pixels = SemanticLesionMetrics(
            lesions, threshold=threshold, num_bins=num_bins, exact=exact
        )
        self.reset()

    def reset(self) -> None:
        self.pixels.reset()
        # One entry per image: (height, width, annotated lesion indices, GT components as
        # (lesion index, RLE), predictions as (lesion index, RLE, score)).
        self.images: List[tuple] = []

    @property
    def num_images(self) -> int:
        return len(self.images)

    def update(self, probs: np.ndarray, targets: np.ndarray) -> None:
        """Adds one image: (C, H, W) probabilities and (C, H, W) 0 / 1 / 255 targets."""
        probs = resize_probabilities(np.asarray(probs), self.size)
        targets = resize_targets(np.asarray(targets).astype(np.uint8), self.size)
        self.pixels.update(probs, targets)
        annotated, truths, predictions = [], [], []
        for index in range(len(self.lesions)):
            valid = targets[index] != IGNORE_VALUE
            if not valid.any():
                continue
            annotated.append(index)
            truths += [(index, _rle(c)) for c in components((targets[index] == 1) & valid)]
            predicted = (probs[index] >= self.threshold) & valid
            for component in components(predicted):
                score = float(probs[index][component].max())
                predictions.append((index, _rle(component), score))
        self.images.append((probs.shape[1], probs.shape[2], annotated, truths, predictions))

    def merge(self, other: "ComponentAPMetrics") -> None:
        """Appends another accumulator's images (e.g. another process's)."""
        if (other.lesions, other.size, other.threshold) != (
            self.lesions, self.size, self.threshold
        ):
            raise ValueError("cannot merge accumulators with different lesions or settings")
        self.pixels.merge(other.pixels)
        self.images += other.images

    def coco(self):
        """(COCO GT dict, COCO results) of the components; category id = lesion index + 1, image
        id = position + 1, ``annotated_category_ids`` = the lesions the image annotates."""
        images, annotations, results = [], [], []
        for image_id, (height, width, annotated, truths, predictions) in enumerate(
            self.images, start=1
        ):
            images.append(dict(id=image_id, height=height, width=width,
                               file_name=str(image_id),
                               annotated_category_ids=[i + 1 for i in annotated]))
            for index, rle in truths:
                annotations.append(dict(
                    id=len(annotations) + 1, image_id=image_id, category_id=index + 1,
                    segmentation=rle, area=float(mask_util.area(rle)), iscrowd=0,
                    bbox=[float(v) for v in mask_util.toBbox(rle)],
                ))
            results += [dict(image_id=image_id, category_id=index + 1, segmentation=rle,
                             score=score) for index, rle, score in predictions]
        categories = [{"id": i + 1, "name": name} for i, name in enumerate(self.lesions)]
        return {"images": images, "annotations": annotations, "categories": categories}, results

    def compute(self) -> "OrderedDict[str, float]":
        """``AP-<lesion>``, ``IoU-<lesion>``, ``AUCPR-<lesion>`` and the means ``mAP``,
        ``mIoU``, ``mAUCPR``, in percent (NaN where undefined)."""
        pixels = self.pixels.compute()
        if self.images:
            gt, results = self.coco()
            segm = evaluate_coco_results(
                gt, results, iou_thresholds=(0.5,), max_dets=self.max_components,
                annotated_only=True, tasks=("segm",),
            )["segm"]
        else:
            segm = {}
        out = OrderedDict()
        for name in self.lesions:
            out[f"AP-{name}"] = segm.get(f"AP-{name}", float("nan"))
        out["mAP"] = mean_defined([out[f"AP-{name}"] for name in self.lesions])
        for name in self.lesions:
            out[f"IoU-{name}"] = pixels[f"IoU-{name}"] * 100
        out["mIoU"] = pixels["mIoU"] * 100
        for name in self.lesions:
            out[f"AUCPR-{name}"] = pixels[f"AUC-PR-{name}"] * 100
        out["mAUCPR"] = pixels["mAUC-PR"] * 100
        return out


class ComponentAPEvaluator(SemanticProtocolEvaluator):
    """``component_ap`` of a semantic head's outputs (see the module docstring); writes
    ``component_ap_metrics.json``."""

    protocol = COMPONENT_AP

    @configurable
    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        *,
        size: int = 512,
        threshold: float = 0.5,
        max_components: int = 1000,
        distributed: bool = True,
    ):
        """
        Args:
            dataset_name: a registered dataset with ``thing_classes`` and ``sem_seg_files``.
            output_dir: where the metrics are written (None: not written).
            size, threshold, max_components: see :class:`ComponentAPMetrics`.
            distributed: gather the statistics of all ranks and evaluate on the main one.
        """
        super().__init__(
            dataset_name, output_dir, distributed=distributed, size=size, threshold=threshold,
            max_components=max_components,
        )

    def _build_metrics(self, **options):
        return ComponentAPMetrics(self._lesions, **options)

    @classmethod
    def from_config(cls, cfg, dataset_name: str, output_dir: Optional[str] = None):
        """With ``RETINA.EVAL.COMPONENT_AP_SIZE`` and ``COMPONENT_AP_THRESHOLD``."""
        return {
            "dataset_name": dataset_name,
            "output_dir": output_dir,
            "size": cfg.RETINA.EVAL.COMPONENT_AP_SIZE,
            "threshold": cfg.RETINA.EVAL.COMPONENT_AP_THRESHOLD,
        }
