"""The report's gallery: the images a detector did worst and best on, with its hits, misses and
false alarms outlined in distinct colours over the photograph.

Each image is scored by its lesion-level F1 at the report's score threshold, every lesion type
pooled, with the matching rules of the FROC evaluator (:func:`~retina_d2.evaluation.match_lesions`),
so the pictures show exactly what the FROC table counts. Only images with lesions are ranked: a
healthy eye's F1 is 1 whenever nothing is found, so ranked with the rest the healthy images would
fill the "best" places. Healthy eyes with false alarms are shown apart
(:func:`pick_gallery`).
"""
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import List, NamedTuple, Optional, Sequence

import cv2
import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

from ..evaluation.froc import FALSE_POSITIVE, HIT, match_lesions
from ..schema import FROC_IOU, FROC_MATCH
from ..visualize import Mark, draw_marks, line_width

__all__ = ["ImageOutcome", "COLOURS", "Gallery", "score_images", "pick_gallery", "draw_outcome"]

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
    num_lesions: int = 0  # GT lesions (ignore regions not counted): 0 = a healthy eye

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
    match: str = FROC_MATCH,
    iou_threshold: float = FROC_IOU,
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
            outcome.num_lesions += len(lesions)
        outcomes.append(outcome)
    return outcomes


class Gallery(NamedTuple):
    """The images the report shows: ``worst`` and ``best`` among the images with lesions,
    ``healthy`` the healthy eyes with false alarms (most first), and how many healthy eyes had
    none (``clean_healthy``)."""

    worst: List[ImageOutcome]
    best: List[ImageOutcome]
    healthy: List[ImageOutcome]
    clean_healthy: int


def pick_gallery(outcomes: Sequence[ImageOutcome], count: int) -> Gallery:
    """Up to ``count`` images in each group, no image in two.

    Worst: lowest F1, then most errors; best: highest F1, then most lesions found; both among
    images with at least one lesion, worst taking at most half of them. Healthy: images without
    lesions that hold a false alarm, most false alarms first.
    """
    with_lesions = [o for o in outcomes if o.num_lesions > 0]
    healthy = [o for o in outcomes if o.num_lesions == 0]
    worst_order = sorted(
        with_lesions, key=lambda o: (o.f1, -(len(o.misses) + len(o.false_alarms)), o.image_id)
    )
    worst = worst_order[: min(count, math.ceil(len(with_lesions) / 2))]
    taken = {o.image_id for o in worst}
    best_order = sorted(with_lesions, key=lambda o: (-o.f1, -len(o.hits), o.image_id))
    best = [o for o in best_order if o.image_id not in taken][:count]
    alarmed = sorted(
        (o for o in healthy if o.false_alarms), key=lambda o: (-len(o.false_alarms), o.image_id)
    )
    clean = sum(1 for o in healthy if not o.false_alarms)
    return Gallery(worst, best, alarmed[:count], clean)


def _marks(rles, kind: str) -> List[Mark]:
    """Outcome RLEs as marks named by outcome, in its colour (empty masks left out)."""
    marks = []
    for rle in rles:
        mask = mask_util.decode(rle).astype(bool)
        ys, xs = np.nonzero(mask)
        if not ys.size:
            continue
        box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        marks.append(Mark(kind, COLOURS[kind], box, mask[box[1]:box[3], box[0]:box[2]]))
    return marks


def _outcome_marks(outcome: ImageOutcome, coco_gt) -> List[Mark]:
    return (
        _marks([coco_gt.annToRLE(a) for a in outcome.ignored], "ignored")
        + _marks([coco_gt.annToRLE(a) for a in outcome.misses], "miss")
        + _marks([p["segmentation"] for p in outcome.hits], "hit")
        + _marks([p["segmentation"] for p in outcome.false_alarms], "false alarm")
    )


def draw_outcome(
    image: np.ndarray,
    outcome: ImageOutcome,
    coco_gt,
    out_path: Path,
    width: int = 900,
    full_path: Optional[Path] = None,
) -> Path:
    """Save the photograph with the outcome's lesions outlined, at ``width`` pixels, and with
    ``full_path`` also at full resolution.

    The thumbnail's outlines are drawn at full resolution, as thick as two output pixels, before
    the picture is shrunk (a 3-pixel microaneurysm would vanish if it were shrunk first), with a
    ring of 5 output pixels around any lesion smaller than that. The full-resolution picture
    has the outlines and rings of :func:`~retina_d2.visualize.draw_marks`.
    """
    if image.shape[:2] != (outcome.height, outcome.width):
        raise ValueError(
            f"{outcome.file_name} is {image.shape[1]}x{image.shape[0]} but its ground truth "
            f"says {outcome.width}x{outcome.height}"
        )
    marks = _outcome_marks(outcome, coco_gt)
    scale = min(1.0, width / outcome.width)
    canvas = draw_marks(image, marks, legend=False, line=max(1, round(2 / scale)),
                        ring=max(3, round(5 / scale)))
    if scale < 1:
        size = (round(outcome.width * scale), round(outcome.height * scale))
        canvas = cv2.resize(canvas, size, interpolation=cv2.INTER_AREA)
    _save(canvas, out_path)
    if full_path is not None:
        line = line_width(outcome.height, outcome.width)
        _save(draw_marks(image, marks, legend=False, line=line), full_path)
    return out_path


def _save(picture: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path)
