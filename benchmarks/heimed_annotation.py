"""How closely can any bright-lesion outline match HEI-MED's exudate annotations?

HEI-MED's annotators outlined large exudates but marked most small ones with a filled square of
fixed size (8 x 8 px on the 2196 x 1958 photographs), placed by hand near the exudate. A model
is scored by COCOeval against those squares, so part of its AP at IoU 0.5 is decided by where a
square was clicked, not by the exudate. This benchmark measures, on the dev photographs:

* the annotations: exudates, how many are filled squares (by side), area percentiles;
* the **IoU ceiling** of the bright-lesion candidates
  (:func:`~retina_d2.modeling.bright_lesions.bright_lesion_candidates`, what the floor and
  BrightCandidateNet output): the share of exudates that some candidate outline matches at IoU
  >= 0.2 / 0.35 / 0.5 / 0.75, for the floor's contrast threshold alone and for any of a ladder
  of thresholds, squares and outlined exudates apart. A prediction matches one exudate at most,
  so this share bounds the recall, hence the AP, at that IoU of every model whose lesions are
  those outlines, however well it ranks them;
* the squares' placement: each square's centre against the brightest contrast pixel near it
  (within one side), and the IoU a square of the same side centred on that pixel would reach.

Computed at the photographs' native resolution; a model working at another scale (the CPU recipe
resizes the field of view to 1400 px and maps its outlines back) can only lose outline detail.
"""
import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Sequence

import cv2
import numpy as np

from . import HEIMED_ROOT, REPO_ROOT, machine_info

__all__ = [
    "IOUS",
    "LEVELS",
    "add_arguments",
    "best_iou_per_instance",
    "filled_square_side",
    "run",
    "square_iou",
    "square_offsets",
]

logger = logging.getLogger(__name__)

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "heimed_annotation.json"
DEFAULT_WORK = REPO_ROOT / "output" / "benchmarks" / "heimed_annotation"
EXUDATE = "hard exudate"
IOUS = (0.2, 0.35, 0.5, 0.75)
# Contrast thresholds of the candidates' ladder, around the floor's 0.12 (0.06: about where the
# candidates of a healthy retina's texture merge; 0.24: where most drusen and exudates vanish).
LEVELS = (0.06, 0.08, 0.10, 0.12, 0.15, 0.19, 0.24)


def add_arguments(parser) -> None:
    parser.add_argument("--root", type=Path, default=HEIMED_ROOT, help="HEI-MED folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON file")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="conversion folder")
    parser.add_argument("--limit", type=int, help="only the first N photographs (a quick run)")


def filled_square_side(mask: np.ndarray) -> int:
    """The side of ``mask`` (bool, cropped to its box) when it fills a square box, else 0."""
    height, width = mask.shape
    return int(height) if height == width and bool(mask.all()) else 0


def best_iou_per_instance(candidates: np.ndarray, instances: np.ndarray, count: int) -> np.ndarray:
    """The highest IoU any candidate reaches with each instance.

    Args:
        candidates: int label map of candidate outlines (0: none).
        instances: int label map of the annotated instances 1..count (0: none).
        count: number of instances.

    Returns:
        float (count,): entry i - 1 is instance i's best IoU (0 when no candidate touches it).
    """
    from retina_d2.modeling.bright_lesions import label_overlap_ious

    best = np.zeros(count + 1)
    _, instance, iou = label_overlap_ious(candidates, instances)
    np.maximum.at(best, instance, iou)
    return best[1:]


def square_iou(side: int, dx: int, dy: int) -> float:
    """IoU of two ``side`` x ``side`` squares offset by (dx, dy) whole pixels."""
    overlap = max(0, side - abs(dx)) * max(0, side - abs(dy))
    return overlap / (2 * side * side - overlap)


def square_offsets(contrast: np.ndarray, boxes: Sequence[tuple], min_contrast: float) -> List[tuple]:
    """``(dx, dy, side)`` for each square ``(x0, y0, side)`` with a pixel of at least
    ``min_contrast`` within one side of it: how far a square of that side centred on the
    brightest such pixel lies from the annotated one (squares with nothing bright near them are
    left out: nothing to centre on)."""
    height, width = contrast.shape
    offsets = []
    for x0, y0, side in boxes:
        ys, xs = slice(max(0, y0 - side), min(height, y0 + 2 * side)), slice(
            max(0, x0 - side), min(width, x0 + 2 * side))
        window = contrast[ys, xs]
        if window.size == 0 or window.max() < min_contrast:
            continue
        py, px = np.unravel_index(int(np.argmax(window)), window.shape)
        # The square centred on pixel p has its top-left at p - side // 2.
        offsets.append((xs.start + px - side // 2 - x0, ys.start + py - side // 2 - y0, side))
    return offsets


def _instances(annotations: List[dict], entry: dict, exudate_id: int):
    """Label map of the image's exudates (ignore regions left out), their areas, and per exudate
    ``(x0, y0, side)``: its box's corner and its side when it is a filled square, else 0."""
    from retina_d2.data.instances import decode_segmentation

    height, width = entry["height"], entry["width"]
    labels = np.zeros((height, width), np.int32)
    areas, boxes = [], []
    for ann in annotations:
        if ann["category_id"] != exudate_id or ann.get("iscrowd"):
            continue
        mask = decode_segmentation(ann["segmentation"], height, width)
        if not mask.any():
            continue
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        labels[mask] = len(areas) + 1
        areas.append(int(mask.sum()))
        boxes.append((int(x0), int(y0), filled_square_side(mask[y0:y1, x0:x1])))
    return labels, areas, boxes


def _shares(best: np.ndarray) -> Dict[str, float]:
    return {f"IoU>={t}": float(100.0 * np.mean(best >= t)) if best.size else None for t in IOUS}


def run(args) -> dict:
    from retina_d2.data.converters.base import require_dir, write_json_atomic
    from retina_d2.modeling.bright_lesions import (
        BrightLesionParams,
        bright_lesion_candidates,
        bright_lesion_maps,
    )

    from . import run_tool

    root = require_dir(args.root.resolve(), "the HEI-MED folder")
    work = args.work.resolve()
    names = sorted(p.name[: -len(".jpg")] for p in root.glob("*.jpg"))
    if not names:
        raise ValueError(f"{root}: no .jpg photographs")
    names = names[: args.limit] if args.limit else names
    work.mkdir(parents=True, exist_ok=True)
    split = work / "split.json"
    split.write_text(json.dumps({"val": names}, indent=2))
    run_tool("convert_dataset.py", "heimed", "--root", str(root), "--out", str(work / "heimed"),
             "--split-file", str(split), "--no-semantic", "--overwrite")
    gt = json.loads((work / "heimed" / "val.json").read_text())
    exudate_id = next(c["id"] for c in gt["categories"] if c["name"] == EXUDATE)
    floor_params = BrightLesionParams()
    start = time.perf_counter()
    by_image: Dict[int, List[dict]] = {}
    for ann in gt["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    floor_best, ladder_best, areas, sides, offsets = [], [], [], [], []
    for n, entry in enumerate(gt["images"], 1):
        instances, image_areas, boxes = _instances(by_image.get(entry["id"], []), entry,
                                                   exudate_id)
        count = len(image_areas)
        logger.info("%d/%d %s: %d exudates", n, len(gt["images"]), entry["file_name"], count)
        if not count:
            continue
        path = root / Path(entry["file_name"]).name
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise OSError(f"{path}: cannot read the image")
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        maps = bright_lesion_maps(rgb, floor_params, channels=(1,))
        ladder = np.zeros(count)
        for level in LEVELS:
            params = BrightLesionParams(min_contrast=level)
            labels, _ = bright_lesion_candidates(rgb, params, maps)
            best = best_iou_per_instance(labels, instances, count)
            ladder = np.maximum(ladder, best)
            if level == floor_params.min_contrast:
                floor_best.append(best)
        ladder_best.append(ladder)
        areas += image_areas
        sides += [side for _, _, side in boxes]
        # A square of each annotated square's side centred on the brightest pixel near it.
        offsets += square_offsets(maps.lesion_contrast, [b for b in boxes if b[2]],
                                  floor_params.min_contrast)
    seconds = time.perf_counter() - start
    results = _assemble(names, np.concatenate(floor_best) if floor_best else np.zeros(0),
                        np.concatenate(ladder_best) if ladder_best else np.zeros(0),
                        np.array(areas), np.array(sides), offsets, floor_params.min_contrast)
    results["seconds"] = seconds
    results["machine"] = machine_info()
    write_json_atomic(args.out, results, indent=2)
    _print(results)
    return results


def _assemble(names, floor_best, ladder_best, areas, sides, offsets, floor_level) -> dict:
    square = sides > 0
    side_counts = {str(int(s)): int(np.sum(sides == s)) for s in np.unique(sides[square])}
    peak_iou = np.array([square_iou(side, dx, dy) for dx, dy, side in offsets])
    dxy = np.array([(dx, dy) for dx, dy, _ in offsets], np.float64).reshape(-1, 2)
    return {
        "images": len(names),
        "exudates": int(areas.size),
        "filled_squares": side_counts,
        "filled_square_share": float(100.0 * square.mean()) if areas.size else None,
        "area_percentiles": {str(p): float(np.percentile(areas, p)) for p in (10, 25, 50, 75, 90)}
        if areas.size else {},
        "levels": list(LEVELS),
        "floor_level": floor_level,
        # Share (%) of exudates some candidate outline matches at each IoU: a ceiling on recall
        # and AP at that IoU for models that output these outlines.
        "ceiling": {
            "floor threshold": {"all": _shares(floor_best), "squares": _shares(floor_best[square]),
                                "outlined": _shares(floor_best[~square])},
            "any ladder threshold": {"all": _shares(ladder_best),
                                     "squares": _shares(ladder_best[square]),
                                     "outlined": _shares(ladder_best[~square])},
        },
        "square_placement": {
            "squares_with_a_bright_peak": int(len(offsets)),
            "median_abs_offset_px": [float(v) for v in np.median(np.abs(dxy), 0)]
            if len(dxy) else None,
            "mean_offset_px": [float(v) for v in np.mean(dxy, 0)] if len(dxy) else None,
            # IoU of a square of the annotation's side centred on the brightest pixel near it.
            "peak_centred_square": _shares(peak_iou),
        },
    }


def _print(results: dict) -> None:
    print(f"{results['exudates']} exudates on {results['images']} photographs; filled squares "
          f"{results['filled_squares']} ({results['filled_square_share']:.1f}%)")
    for name, groups in results["ceiling"].items():
        for group, shares in groups.items():
            cells = "  ".join(f"{k} {v:5.1f}" if v is not None else f"{k} -"
                              for k, v in shares.items())
            print(f"ceiling, {name:22s} {group:9s} {cells}")
    placement = results["square_placement"]
    print(f"squares: median |offset| of the brightest pixel {placement['median_abs_offset_px']} px;"
          f" a square centred there: {placement['peak_centred_square']}")
