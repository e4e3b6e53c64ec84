"""The report's gallery: the images a detector did worst and best on, with its hits, misses and
false alarms drawn in distinct colours over the photograph.

Each image is scored by its lesion-level F1 at the report's score threshold, every lesion type
pooled, with the matching rules of the FROC evaluator (:func:`~retina_d2.evaluation.match_lesions`),
so the pictures show exactly what the FROC table counts.
"""
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

from ..evaluation.froc import FALSE_POSITIVE, HIT, match_lesions

__all__ = ["ImageOutcome", "COLOURS", "score_images", "pick_worst_and_best", "draw_outcome"]

# RGB. Chosen apart for red-green colour blindness too: blue / orange / magenta.
COLOURS = {
    "hit": (0, 114, 255),  # a prediction that found a lesion
    "miss": (255, 140, 0),  # a lesion nothing found
    "false alarm": (255, 0, 200),  # a prediction on healthy retina
    "ignored": (160, 160, 160),  # an ignore region of the ground truth
}


@dataclass
class ImageOutcome:
    image_id: int
    file_name: str
    height: int
    width: int
    hits: List[dict]  # predictions
    misses: List[dict]  # GT annotations
    false_alarms: List[dict]  # predictions
    ignored: List[dict]  # GT ignore regions

    @property
    def f1(self) -> float:
        """Lesion F1 of the image; 1 for a healthy image with no false alarm."""
        tp, fp, fn = len(self.hits), len(self.false_alarms), len(self.misses)
        return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def score_images(
    coco_gt,
    results: Sequence[dict],
    *,
    score_threshold: float,
    match: str = "iou",
    iou_threshold: float = 0.2,
) -> List[ImageOutcome]:
    """Match every image's predictions (scoring >= score_threshold) to its lesions, per category.

    Args:
        coco_gt: a ``pycocotools.coco.COCO`` of the ground truth.
        results: COCO results with RLE segmentations, the GT's image and category ids.
    """
    by_key = defaultdict(list)
    for r in results:
        if r["score"] >= score_threshold:
            by_key[r["image_id"], r["category_id"]].append(r)
    outcomes = []
    for image in coco_gt.dataset["images"]:
        image_id = image["id"]
        size = (image["height"], image["width"])
        outcome = ImageOutcome(image_id, image["file_name"], *size, [], [], [], [])
        anns = coco_gt.imgToAnns.get(image_id, [])
        predicted = {c for i, c in by_key if i == image_id}
        for category_id in sorted({a["category_id"] for a in anns} | predicted):
            preds = sorted(by_key.get((image_id, category_id), []), key=lambda p: -p["score"])
            cat_anns = [a for a in anns if a["category_id"] == category_id]
            lesions = [a for a in cat_anns if not a.get("iscrowd", 0)]
            ignore = [a for a in cat_anns if a.get("iscrowd", 0)]
            found, hit = match_lesions(
                preds,
                [coco_gt.annToRLE(a) for a in lesions],
                [coco_gt.annToRLE(a) for a in ignore],
                match,
                iou_threshold,
                True,
                size,
            )
            outcome.hits += [p for p, o in zip(preds, found) if o == HIT]
            outcome.false_alarms += [p for p, o in zip(preds, found) if o == FALSE_POSITIVE]
            outcome.misses += [a for a, h in zip(lesions, hit) if not h]
            outcome.ignored += ignore
        outcomes.append(outcome)
    return outcomes


def pick_worst_and_best(outcomes: Sequence[ImageOutcome], count: int):
    """(worst, best): up to ``count`` images each, no image in both.

    Worst: lowest F1, then most errors; best: highest F1, then most lesions found.
    """
    worst_order = sorted(
        outcomes, key=lambda o: (o.f1, -(len(o.misses) + len(o.false_alarms)), o.image_id)
    )
    worst = worst_order[: min(count, math.ceil(len(outcomes) / 2))]
    taken = {o.image_id for o in worst}
    best_order = sorted(outcomes, key=lambda o: (-o.f1, -len(o.hits), o.image_id))
    best = [o for o in best_order if o.image_id not in taken][:count]
    return worst, best


def _contours(canvas: np.ndarray, rle: dict, colour, thickness: int) -> None:
    mask = mask_util.decode(rle).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(canvas, contours, -1, colour, thickness)


def draw_outcome(
    image: np.ndarray, outcome: ImageOutcome, coco_gt, out_path: Path, width: int = 900
) -> Path:
    """Save the photograph with the outcome's lesions outlined, at ``width`` pixels.

    Outlines are drawn at full resolution, as thick as two output pixels, before the picture is
    shrunk: a 3-pixel microaneurysm would vanish if it were shrunk first.
    """
    if image.shape[:2] != (outcome.height, outcome.width):
        raise ValueError(
            f"{outcome.file_name} is {image.shape[1]}x{image.shape[0]} but its ground truth "
            f"says {outcome.width}x{outcome.height}"
        )
    canvas = np.ascontiguousarray(image[..., :3]).copy()
    scale = min(1.0, width / outcome.width)
    thickness = max(1, round(2 / scale))
    for ann in outcome.ignored:
        _contours(canvas, coco_gt.annToRLE(ann), COLOURS["ignored"], thickness)
    for ann in outcome.misses:
        _contours(canvas, coco_gt.annToRLE(ann), COLOURS["miss"], thickness)
    for pred in outcome.hits:
        _contours(canvas, pred["segmentation"], COLOURS["hit"], thickness)
    for pred in outcome.false_alarms:
        _contours(canvas, pred["segmentation"], COLOURS["false alarm"], thickness)
    if scale < 1:
        size = (round(outcome.width * scale), round(outcome.height * scale))
        canvas = cv2.resize(canvas, size, interpolation=cv2.INTER_AREA)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(out_path)
    return out_path
