"""The training-free floor for bright lesions (exudates): what a learned model must beat.

DESIGN.md's floor: green-channel background subtraction, the optic disc suppressed, connected
components as instances, scored by their peak contrast
(:func:`retina_d2.modeling.bright_lesions.bright_lesion_candidates`, whose candidates
BrightCandidateNet learns to rescore).

:func:`floor_coco_results` runs it over a COCO ground truth's images and returns COCO results that
the instance and FROC evaluators score exactly as they score a model's. The benchmarks run it on
the same images in the same run as the models they report, so the ratio to it is never a number
typed in from another run.
"""
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np

from retina_d2.modeling.bright_lesions import BrightLesionParams, bright_lesion_candidates

__all__ = ["FloorParams", "bright_lesion_candidates", "floor_coco_results"]

# The floor's settings are the candidates' defaults.
FloorParams = BrightLesionParams


def floor_coco_results(
    images: Sequence[Dict], image_root: Path, category_id: int,
    params: Optional[FloorParams] = None, max_dets: int = 256,
) -> List[Dict]:
    """The floor's lesions on every image of a COCO ground truth, as COCO results.

    Args:
        images: the GT's ``images`` entries (``id``, ``file_name`` under ``image_root``).
        image_root: folder of the photographs.
        category_id: the GT's id of the lesion the floor predicts (hard exudate).
        params: the floor's settings.
        max_dets: most lesions per image, best first (the evaluator's limit).

    Returns:
        COCO results: ``image_id``, ``category_id``, ``bbox`` (XYWH), RLE ``segmentation``,
        ``score``.
    """
    from pycocotools import mask as mask_util

    results = []
    for entry in images:
        path = Path(image_root) / entry["file_name"]
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise OSError(f"{path}: cannot read the image")
        labels, lesions = bright_lesion_candidates(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), params)
        for label, (x0, y0, x1, y1), score in lesions[:max_dets]:
            mask = np.zeros(labels.shape, np.uint8, order="F")
            mask[y0:y1, x0:x1] = labels[y0:y1, x0:x1] == label
            rle = mask_util.encode(mask)
            rle["counts"] = rle["counts"].decode("ascii")
            results.append({
                "image_id": entry["id"],
                "category_id": category_id,
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "segmentation": rle,
                "score": score,
            })
    return results


FLOOR_NAME = "training-free floor (computed in this run)"


def floor_row(gt_file: Path, image_root: Path, lesion: str = "hard exudate",
              params: Optional[FloorParams] = None) -> Dict:
    """The floor scored on every image of a COCO ground truth: a benchmark row with ``segm
    AP35`` / ``AP50`` / ``AP75`` / ``AP`` and ``bbox`` alike for ``lesion`` (percent), and the
    seconds it took.

    Raises:
        ValueError: the ground truth has no category called ``lesion``.
    """
    import json
    import time

    from retina_d2.evaluation.instance_eval import evaluate_coco_results

    gt = json.loads(Path(gt_file).read_text())
    ids = [c["id"] for c in gt["categories"] if c["name"] == lesion]
    if not ids:
        raise ValueError(f"{gt_file}: no category {lesion!r} for the floor to predict")
    start = time.perf_counter()
    results = floor_coco_results(gt["images"], image_root, ids[0], params)
    seconds = time.perf_counter() - start
    metrics = evaluate_coco_results(gt, results)
    row = {"name": FLOOR_NAME}
    for task in ("segm", "bbox"):
        for iou in ("AP35", "AP50", "AP75", "AP"):
            row[f"{task} {iou}"] = metrics[task].get(f"{iou}-{lesion}")
    row["seconds"] = seconds
    row["num_images"] = len(gt["images"])
    return row


def add_floor_ratios(rows: List[Dict], floor: Dict, keys: Sequence[str]) -> None:
    """Add ``"<key> x floor"`` = row value / floor value to every row (in place), for each key
    both have with a non-zero floor."""
    for row in rows:
        for key in keys:
            value, base = row.get(key), floor.get(key)
            if value is not None and base:
                row[f"{key} x floor"] = value / base
