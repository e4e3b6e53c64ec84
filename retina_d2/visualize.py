"""Pictures a person checks a lesion model with, readable at fundus scale.

A fundus photograph is 2000-4000 pixels across and its lesions 1-50: filled masks hide the
small ones, and a text label per lesion is bigger than the lesion and covers its neighbours.
So every picture here

- outlines lesions, never fills them; a lesion smaller than a ring (a microaneurysm) also gets a
  ring around it, so it is visible once the picture is shrunk to a screen;
- gives each lesion type one colour, that of the lesion vocabulary
  (:mod:`retina_d2.data.lesions`), and a legend listing the types present in a band below the
  photograph (nothing covers the retina), instead of a label per lesion; ignore regions of the
  ground truth are grey;
- shows a lesion's score only on request (``show_scores``);
- puts ground truth and prediction side by side under titles (:func:`side_by_side`), with a
  full-resolution crop of the region where lesions are densest (:func:`densest_region`).

Line widths, rings and text grow with the photograph (:func:`line_width`), so they read the same
on a 1024-pixel and a 4288-pixel image.
"""
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from detectron2.structures import BoxMode, Instances
from scipy import ndimage

from .data.instances import decode_segmentation_region
from .data.lesions import LESIONS

__all__ = [
    "IGNORE_COLOUR",
    "Mark",
    "crop_marks",
    "densest_region",
    "draw_ground_truth_overlay",
    "draw_marks",
    "draw_prediction_overlay",
    "ground_truth_marks",
    "legend_entries",
    "lesion_colour",
    "line_width",
    "overlay_names",
    "prediction_marks",
    "ring_radius",
    "side_by_side",
]

IGNORE_COLOUR = (160, 160, 160)  # ground-truth ignore regions (iscrowd)
IGNORE_NAME = "ignore region"
_TEXT = (255, 255, 255)
_PANEL = (32, 32, 32)  # legend boxes and title bands
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_VOCABULARY = {les.name: les.color for les in LESIONS}
# Names outside the vocabulary (a user's own dataset) without metadata colours.
_FALLBACK = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
             (145, 30, 180), (70, 240, 240), (240, 50, 230)]


@dataclass
class Mark:
    """One lesion to outline: its type's name and colour, its box ``(x0, y0, x1, y1)`` in pixels
    (end exclusive), the mask inside the box (None: the box itself is the outline) and, for a
    prediction, its score. Masks are kept cropped to their box: hundreds of full-frame masks of
    a 4288x2848 photograph would take gigabytes."""

    name: str
    colour: Tuple[int, int, int]
    box: Tuple[int, int, int, int]
    mask: Optional[np.ndarray] = None
    score: Optional[float] = None


def lesion_colour(name: str, metadata=None, index: Optional[int] = None) -> Tuple[int, int, int]:
    """RGB of a lesion type: the vocabulary's colour for a vocabulary name, else
    ``metadata.thing_colors[index]``, else a fixed palette entry."""
    if name in _VOCABULARY:
        return tuple(_VOCABULARY[name])
    colours = getattr(metadata, "thing_colors", None) if metadata is not None else None
    if colours and index is not None and index < len(colours):
        return tuple(int(c) for c in colours[index])
    return _FALLBACK[(index or 0) % len(_FALLBACK)]


def line_width(height: int, width: int) -> int:
    """Outline width in pixels: one per 1000 pixels across (a 2196-pixel photograph gets 2, a
    4288-pixel one 4, at least 1), so a picture shrunk to a screen keeps visible lines and a
    small one is not buried under them."""
    return max(1, round(max(height, width) / 1000))


def ring_radius(height: int, width: int) -> int:
    """Radius of the ring drawn around a lesion smaller than it: about 5 pixels once the picture
    is shrunk to 1000 pixels across (11 for a 2196-pixel photograph), never under 3 lines."""
    return max(3 * line_width(height, width), round(max(height, width) / 200))


def _font_scale(height: int, width: int) -> float:
    return max(0.45, max(height, width) / 1800)


def _class_names(metadata) -> List[str]:
    return list(metadata.get("thing_classes", []) if metadata is not None else [])


def prediction_marks(instances: Instances, metadata, score_threshold: float = 0.0) -> List[Mark]:
    """The predicted lesions scoring at least ``score_threshold`` as marks: mask outlines where
    the instances have masks (an empty mask is left out), else their boxes."""
    instances = instances.to("cpu")
    if instances.has("scores"):
        instances = instances[instances.scores >= score_threshold]
    names = _class_names(metadata)
    height, width = instances.image_size
    classes = instances.pred_classes.tolist() if instances.has("pred_classes") else []
    scores = instances.scores.tolist() if instances.has("scores") else [None] * len(classes)
    boxes = instances.pred_boxes.tensor.numpy() if instances.has("pred_boxes") else None
    masks = instances.pred_masks if instances.has("pred_masks") else None
    marks = []
    for i, (k, score) in enumerate(zip(classes, scores)):
        name = names[k] if k < len(names) else str(k)
        mark = Mark(name, lesion_colour(name, metadata, k), (0, 0, 0, 0), None, score)
        region = _mask_region(masks[i].numpy()) if masks is not None else None
        if region is not None:
            mark.box, mark.mask = region
        elif masks is not None:
            continue  # a mask with no pixel: nothing of the lesion to outline (none in segm AP)
        elif boxes is not None:
            x0, y0, x1, y1 = boxes[i]
            mark.box = _clip_box(
                (int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)), int(np.ceil(y1))),
                height, width,
            )
        else:
            continue
        marks.append(mark)
    return marks


def _mask_region(mask: np.ndarray):
    """(box, mask inside it) of a full-frame mask; None when it is empty."""
    ys, xs = np.nonzero(mask)
    if not ys.size:
        return None
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return box, mask[box[1]:box[3], box[0]:box[2]].astype(bool)


def _clip_box(box, height: int, width: int):
    x0, y0, x1, y1 = box
    x0, y0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
    return x0, y0, min(max(x1, x0 + 1), width), min(max(y1, y0 + 1), height)


def ground_truth_marks(dataset_dict: dict, metadata, height: int, width: int) -> List[Mark]:
    """A dataset dict's annotations as marks; ignore regions (iscrowd) grey, named
    ``ignore region``."""
    names = _class_names(metadata)
    marks = []
    for ann in dataset_dict.get("annotations", []):
        k = ann["category_id"]
        if ann.get("iscrowd", 0):
            name, colour = IGNORE_NAME, IGNORE_COLOUR
        else:
            name = names[k] if k < len(names) else str(k)
            colour = lesion_colour(name, metadata, k)
        region = None
        if "segmentation" in ann:
            region = decode_segmentation_region(ann["segmentation"], height, width)
        if region is not None:
            rows, cols, patch = region
            marks.append(Mark(name, colour, (cols.start, rows.start, cols.stop, rows.stop),
                              patch.astype(bool)))
        elif "bbox" in ann:
            x0, y0, x1, y1 = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
            box = (int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)), int(np.ceil(y1)))
            marks.append(Mark(name, colour, _clip_box(box, height, width)))
    return marks


def legend_entries(marks: Iterable[Mark], class_order: Sequence[str] = ()) -> List[Tuple[str, tuple]]:
    """(name, colour) of each lesion type among ``marks``, once, in ``class_order`` (the
    dataset's classes), others after them by name, the ignore region last."""
    colours: Dict[str, tuple] = {}
    for mark in marks:
        colours.setdefault(mark.name, mark.colour)
    order = {name: i for i, name in enumerate(class_order)}
    return sorted(
        colours.items(),
        key=lambda item: (item[0] == IGNORE_NAME, order.get(item[0], len(order)), item[0]),
    )


def draw_marks(
    image: np.ndarray,
    marks: Sequence[Mark],
    *,
    show_scores: bool = False,
    legend: bool = True,
    class_order: Sequence[str] = (),
    line: Optional[int] = None,
    ring: Optional[int] = None,
    font_scale: Optional[float] = None,
) -> np.ndarray:
    """An RGB copy of ``image`` with every mark outlined in its colour, and a legend band.

    Args:
        show_scores: write each prediction's score beside it (off: no text but the legend).
        legend: a band below the photograph listing the lesion types drawn ("no lesion" when
            there is none); the photograph keeps its rows, so pixel (x, y) of the picture is
            pixel (x, y) of the image.
        class_order: the order of the legend's entries.
        line, ring, font_scale: outline width, radius of the ring around a lesion smaller than
            the ring, text size (default: grown with the image, :func:`line_width`).
    """
    canvas = np.ascontiguousarray(image[..., :3], dtype=np.uint8).copy()
    height, width = canvas.shape[:2]
    line = line or line_width(height, width)
    ring = ring or ring_radius(height, width)
    font_scale = font_scale or _font_scale(height, width)
    for mark in marks:
        _outline(canvas, mark, line, ring)
    if show_scores:
        for mark in marks:
            if mark.score is not None:
                _score_text(canvas, mark, font_scale, line)
    if legend:
        band = _legend_band(width, legend_entries(marks, class_order), font_scale)
        canvas = np.concatenate([canvas, band], axis=0)
    return canvas


def _outline(canvas: np.ndarray, mark: Mark, line: int, ring: int) -> None:
    x0, y0, x1, y1 = mark.box
    colour = tuple(int(c) for c in mark.colour)
    if mark.mask is not None:
        contours, _ = cv2.findContours(
            mark.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE, offset=(x0, y0)
        )
        cv2.drawContours(canvas, contours, -1, colour, line)
    else:
        cv2.rectangle(canvas, (x0, y0), (x1 - 1, y1 - 1), colour, line)
    if max(x1 - x0, y1 - y0) < 2 * ring:  # too small to see once shrunk: ring it
        centre = ((x0 + x1 - 1) // 2, (y0 + y1 - 1) // 2)
        # LINE_8, not anti-aliased: every drawn pixel has exactly the lesion type's colour.
        cv2.circle(canvas, centre, ring, colour, line, lineType=cv2.LINE_8)


def _score_text(canvas: np.ndarray, mark: Mark, font_scale: float, line: int) -> None:
    text = f"{mark.score:.2f}"
    x0, y0, x1, _ = mark.box
    (_, text_height), _ = cv2.getTextSize(text, _FONT, font_scale * 0.7, 1)
    origin = (x1 + line + 2, max(y0 + text_height, text_height + 1))
    thickness = max(1, round(font_scale))
    # A dark edge under the coloured text: readable on a bright exudate and on the black rim.
    cv2.putText(canvas, text, origin, _FONT, font_scale * 0.7, (0, 0, 0), thickness + 2, cv2.LINE_AA)
    cv2.putText(canvas, text, origin, _FONT, font_scale * 0.7, tuple(int(c) for c in mark.colour),
                thickness, cv2.LINE_AA)


def _legend_band(width: int, entries: Sequence[Tuple[str, tuple]], font_scale: float) -> np.ndarray:
    """A dark band ``width`` pixels wide: a swatch and a name per entry, left to right, wrapped
    onto more rows where they do not fit; "no lesion" when there is none."""
    thickness = max(1, round(font_scale * 1.5))
    items = list(entries) or [("no lesion", None)]
    sizes = [cv2.getTextSize(name, _FONT, font_scale, thickness)[0] for name, _ in items]
    text_height = max(h for _, h in sizes)
    swatch, pad = text_height, max(4, text_height // 2)
    row = text_height + pad
    places, x, y = [], pad, pad
    for text_width, _ in sizes:
        item_width = (swatch + pad if items[0][1] is not None else 0) + text_width + 2 * pad
        if x > pad and x + item_width > width:
            x, y = pad, y + row
        places.append((x, y))
        x += item_width
    band = np.empty((y + row + pad, width, 3), np.uint8)
    band[:] = _PANEL
    for (name, colour), (x, y) in zip(items, places):
        if colour is not None:
            cv2.rectangle(band, (x, y), (x + swatch - 1, y + swatch - 1),
                          tuple(int(c) for c in colour), -1)
            x += swatch + pad
        cv2.putText(band, name, (x, y + text_height), _FONT, font_scale, _TEXT, thickness,
                    cv2.LINE_AA)
    return band


def draw_prediction_overlay(
    image: np.ndarray,
    instances: Instances,
    metadata,
    score_threshold: float = 0.0,
    *,
    show_scores: bool = False,
    legend: bool = True,
) -> np.ndarray:
    """RGB image with the predictions scoring at least ``score_threshold`` outlined, one colour
    per lesion type, a legend of the types found, scores only with ``show_scores``."""
    marks = prediction_marks(instances, metadata, score_threshold)
    return draw_marks(image, marks, show_scores=show_scores, legend=legend,
                      class_order=_class_names(metadata))


def draw_ground_truth_overlay(
    image: np.ndarray, dataset_dict: dict, metadata, *, legend: bool = True
) -> np.ndarray:
    """RGB image with the dataset dict's lesions outlined (ignore regions in grey) and a legend
    of the types present."""
    marks = ground_truth_marks(dataset_dict, metadata, *image.shape[:2])
    return draw_marks(image, marks, legend=legend, class_order=_class_names(metadata))


def side_by_side(
    left: np.ndarray, right: np.ndarray, gap: int = 8, titles: Optional[Sequence[str]] = None
) -> np.ndarray:
    """Two RGB images next to each other with a black gap; with ``titles``, each under a title
    band (white text on dark grey) as wide as the image."""
    if titles is not None:
        height = max(left.shape[0], right.shape[0])
        scale = _font_scale(height, max(left.shape[1], right.shape[1]))
        left, right = (_titled(p, t, scale) for p, t in zip((left, right), titles))
    height = max(left.shape[0], right.shape[0])
    canvas = np.zeros((height, left.shape[1] + gap + right.shape[1], 3), dtype=np.uint8)
    canvas[: left.shape[0], : left.shape[1]] = left
    canvas[: right.shape[0], left.shape[1] + gap :] = right
    return canvas


def _titled(panel: np.ndarray, title: str, font_scale: float) -> np.ndarray:
    thickness = max(1, round(font_scale * 1.5))
    (_, text_height), baseline = cv2.getTextSize(title, _FONT, font_scale, thickness)
    band = np.empty((text_height + baseline + 2 * max(4, text_height // 2), panel.shape[1], 3),
                    np.uint8)
    band[:] = _PANEL
    cv2.putText(band, title, (max(4, text_height // 2), max(4, text_height // 2) + text_height),
                _FONT, font_scale, _TEXT, thickness, cv2.LINE_AA)
    return np.concatenate([band, panel[..., :3]], axis=0)


def densest_region(
    mark_lists: Iterable[Sequence[Mark]], height: int, width: int, size: int = 512
) -> Tuple[int, int, int, int]:
    """The ``size`` x ``size`` window (clipped to the image) holding the most lesion centres of
    all the lists (ground truth and prediction alike), as ``(x0, y0, x1, y1)``, placed so the
    lesions it holds sit mid-window; the image's centre when there is no lesion."""
    win_h, win_w = min(size, height), min(size, width)
    counts = np.zeros((height, width), np.int32)
    for marks in mark_lists:
        for mark in marks:
            x0, y0, x1, y1 = mark.box
            counts[min((y0 + y1 - 1) // 2, height - 1), min((x0 + x1 - 1) // 2, width - 1)] += 1
    if not counts.any():
        y, x = (height - win_h) // 2, (width - win_w) // 2
        return x, y, x + win_w, y + win_h
    integral = np.zeros((height + 1, width + 1), np.int64)
    integral[1:, 1:] = counts.cumsum(0).cumsum(1)
    sums = (integral[win_h:, win_w:] - integral[:-win_h, win_w:] - integral[win_h:, :-win_w]
            + integral[:-win_h, :-win_w])
    # Every window position holding the most centres; of the first group of such positions,
    # its middle one: the lesions centred in the crop, not pressed against its edge.
    best = sums == sums.max()
    groups, _ = ndimage.label(best)
    first = groups == groups.flat[int(np.argmax(best))]
    ys, xs = np.nonzero(first)
    pick = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
    y, x = int(ys[pick]), int(xs[pick])
    return x, y, x + win_w, y + win_h


def crop_marks(marks: Sequence[Mark], box: Tuple[int, int, int, int]) -> List[Mark]:
    """The marks that overlap ``box``, in the crop's coordinates, cut at its edges."""
    bx0, by0, bx1, by1 = box
    cropped = []
    for mark in marks:
        x0, y0, x1, y1 = mark.box
        cx0, cy0, cx1, cy1 = max(x0, bx0), max(y0, by0), min(x1, bx1), min(y1, by1)
        if cx0 >= cx1 or cy0 >= cy1:
            continue
        mask = None
        if mark.mask is not None:
            mask = mark.mask[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
            if not mask.any():
                continue
        cropped.append(Mark(mark.name, mark.colour, (cx0 - bx0, cy0 - by0, cx1 - bx0, cy1 - by0),
                            mask, mark.score))
    return cropped


def overlay_names(images: Sequence) -> Dict[object, str]:
    """image path -> its overlay's file name: ``<stem>.png``, or ``<name>.png`` for images
    sharing a stem (``eye.jpg`` and ``eye.png``; compared ignoring case, as some disks do),
    numbered where even that is taken. Keys are the given paths (str or Path)."""
    stems = Counter(Path(p).stem.lower() for p in images)
    names, used = {}, set()
    for path in images:
        p = Path(path)
        name = f"{p.stem}.png" if stems[p.stem.lower()] == 1 else f"{p.name}.png"
        base, number = name[: -len(".png")], 1
        while name.lower() in used:
            number += 1
            name = f"{base}-{number}.png"
        used.add(name.lower())
        names[path] = name
    return names
