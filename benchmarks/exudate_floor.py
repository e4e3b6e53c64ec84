"""The training-free floor for bright lesions (exudates): what a learned model must beat.

DESIGN.md's floor: green-channel background subtraction, the optic disc suppressed, connected
components as instances. Exudates are the brightest small structures of the green channel once
the slow illumination is divided out; the optic disc is brighter and larger, so it is found
(:func:`~benchmarks.heimed_localization.brightest_region_center`) and blanked.

:func:`bright_lesion_candidates` gives one photograph's lesions (mask, box, score);
:func:`floor_coco_results` runs it over a COCO ground truth's images and returns COCO results that
the instance and FROC evaluators score exactly as they score a model's. The benchmarks run it on
the same images in the same run as the models they report, so the ratio to it is never a number
typed in from another run.
"""
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from scipy import ndimage

from retina_d2.data.preprocess import _wide_gaussian_blur, field_of_view_box

__all__ = ["FloorParams", "bright_lesion_candidates", "floor_coco_results"]


class FloorParams:
    """The floor's settings, every length a fraction of the field of view's diameter so that a
    photograph at any resolution is treated alike.

    Attributes:
        background_sigma: Gaussian of the background estimate (retina without lesions).
        min_contrast: relative brightness over the background from which a pixel is a candidate.
        score_scale: contrast at which a lesion scores 1 - 1/e (scores grow with contrast).
        disc_radius: radius of the blanked optic disc (its diameter is ~0.14 of the FOV's).
        rim: band inside the FOV's edge left out (the rim's vignetting and glare).
        min_area: fewest pixels of a candidate at a 2000 px FOV (scaled with the FOV's area).
        fov_threshold: channel maximum above which a pixel is inside the FOV.
    """

    def __init__(
        self,
        background_sigma: float = 0.02,
        min_contrast: float = 0.12,
        score_scale: float = 0.25,
        disc_radius: float = 0.1,
        rim: float = 0.03,
        min_area: float = 6.0,
        fov_threshold: int = 20,
    ):
        self.background_sigma = background_sigma
        self.min_contrast = min_contrast
        self.score_scale = score_scale
        self.disc_radius = disc_radius
        self.rim = rim
        self.min_area = min_area
        self.fov_threshold = fov_threshold


def _fov_mask(image: np.ndarray, params: FloorParams) -> Tuple[np.ndarray, float]:
    """The field of view's pixels (eroded by the rim band) and its diameter in pixels."""
    box = field_of_view_box(image, params.fov_threshold)
    height, width = image.shape[:2]
    x0, y0, x1, y1 = box if box is not None else (0, 0, width, height)
    diameter = float(max(x1 - x0, y1 - y0))
    inside = image.max(axis=2) > params.fov_threshold
    rim = max(1, int(round(params.rim * diameter)))
    inside = cv2.erode(inside.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=rim) > 0
    return inside, diameter


def bright_lesion_candidates(
    image: np.ndarray, params: Optional[FloorParams] = None
) -> Tuple[np.ndarray, List[Tuple[int, List[int], float]]]:
    """Bright lesions of one fundus photograph, without training.

    Args:
        image: HxWx3 uint8 RGB.
        params: the settings (default :class:`FloorParams`).

    Returns:
        ``(labels, lesions)``: an int32 label map of the image's size (0: no lesion) and
        ``(label, [x0, y0, x1, y1], score)`` per lesion, a connected component of the candidate
        pixels (one label each; a full-size mask per lesion would cost gigabytes on an eye with
        hundreds), the score in (0, 1) growing with its peak contrast; sorted by score, highest
        first.
    """
    from .heimed_localization import brightest_region_center

    params = params or FloorParams()
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"the floor needs an HxWx3 RGB image, got shape {image.shape}")
    inside, diameter = _fov_mask(image, params)
    green = image[..., 1].astype(np.float32)
    weight = inside.astype(np.float32)
    sigma = params.background_sigma * diameter
    # A blur of the FOV alone, normalised by the blurred FOV mask: the black border would darken
    # the background near the rim and turn the whole rim into candidates.
    background = _wide_gaussian_blur(green * weight, sigma) / np.maximum(
        _wide_gaussian_blur(weight, sigma), 1e-3
    )
    contrast = (green - background) / np.maximum(background, 1.0)
    contrast[~inside] = 0.0
    disc_x, disc_y = brightest_region_center(image, params.fov_threshold)
    yy, xx = np.ogrid[: image.shape[0], : image.shape[1]]
    radius = params.disc_radius * diameter
    contrast[(xx + 0.5 - disc_x) ** 2 + (yy + 0.5 - disc_y) ** 2 <= radius**2] = 0.0

    labels, count = ndimage.label(contrast > params.min_contrast, np.ones((3, 3), bool))
    if count == 0:
        return labels, []
    min_area = params.min_area * (diameter / 2000.0) ** 2
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    peaks = ndimage.maximum(contrast, labels, np.arange(1, count + 1))
    candidates = []
    for index, window in enumerate(ndimage.find_objects(labels), start=1):
        if window is None or areas[index] < min_area:
            continue
        rows, cols = window
        score = float(1.0 - np.exp(-peaks[index - 1] / params.score_scale))
        candidates.append((index, [cols.start, rows.start, cols.stop, rows.stop], score))
    candidates.sort(key=lambda c: -c[2])
    return labels, candidates


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
