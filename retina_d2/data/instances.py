"""Binary lesion masks -> per-instance COCO annotations.

Every lesion pixel is kept: instances are stored as RLE, so a 1-pixel microaneurysm survives
conversion (a polygon traced by ``cv2.findContours`` around it has fewer than three points and is
commonly dropped). Polygons are an optional extra.
"""
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util
from scipy import ndimage

__all__ = [
    "Dilation",
    "label_components",
    "dilate_small_lesions",
    "instance_rles",
    "instance_rles_from_mask",
    "encode_rle",
    "decode_rle",
    "decode_segmentation",
    "decode_segmentation_region",
    "mask_to_polygons",
    "coco_annotation",
]


@dataclass(frozen=True)
class Dilation:
    """Small-lesion dilation: a square ``kernel`` x ``kernel`` structuring element, ``iterations``
    times. The e-ophtha Mask R-CNN paper dilates microaneurysm masks with 5x5, 2 iterations."""

    kernel: int = 5
    iterations: int = 2

    def __post_init__(self):
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"dilation kernel must be an odd size >= 1, got {self.kernel}")
        if self.iterations < 0:
            raise ValueError(f"dilation iterations must be >= 0, got {self.iterations}")


# The paper's preset for e-ophtha microaneurysms.
EOPHTHA_MA_DILATION = Dilation(kernel=5, iterations=2)


def label_components(mask: np.ndarray, connectivity: int = 8, min_area: int = 1) -> np.ndarray:
    """Label the connected components of a binary mask.

    Args:
        mask: HxW, non-zero = lesion.
        connectivity: 4 or 8.
        min_area: components with fewer pixels are dropped (set to 0 in the result).

    Returns:
        int32 HxW label map, 0 = background, 1..N = components in raster order of first pixel.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    num, labels, stats, _ = cv2.connectedComponentsWithStats(
        (mask != 0).astype(np.uint8), connectivity=connectivity, ltype=cv2.CV_32S
    )
    if min_area > 1 and num > 1:
        small = np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] < min_area) + 1
        if len(small):
            keep = np.ones(num, dtype=bool)
            keep[small] = False
            # Renumber the survivors 1..M so ids stay dense.
            new_ids = np.cumsum(keep).astype(np.int32) - 1
            new_ids[~keep] = 0
            labels = new_ids[labels]
    return labels


def dilate_small_lesions(labels: np.ndarray, dilation: Dilation) -> np.ndarray:
    """Grow every labelled instance by ``dilation`` without ever fusing two of them.

    ``iterations`` passes of a ``kernel`` x ``kernel`` square reach every pixel within Chebyshev
    distance ``R = iterations * (kernel - 1) / 2`` of an instance, so the growth runs as ``R``
    one-pixel rings. A ring gives a background pixel to an instance only when

    * that instance is strictly nearer to the pixel (Chebyshev distance, the square kernel's
      metric) than every other instance: a pixel equally near two stays background and keeps
      them apart;
    * it is the only instance in the pixel's 3x3 neighbourhood;
    * the pixel shares an edge with the instance, directly or through a pixel of the same ring.

    Hence:

    * every dilated instance is one piece, 4-connected where its source is and 8-connected where
      its source is 8-connected, and contains its whole source;
    * no pixel changes owner and the instance count is unchanged (instances may come to touch);
    * an instance with no other within ``2 R`` grows exactly as ``cv2.dilate`` grows it alone.

    Instances far enough apart not to compete are grown on their own, in windows around them, so
    the cost follows the lesions rather than the image.

    Args:
        labels: int32 HxW label map (0 = background).
        dilation: kernel size and iterations.

    Returns:
        a new int32 label map.
    """
    out = labels.astype(np.int32, copy=True)
    radius = dilation.iterations * (dilation.kernel - 1) // 2
    if radius == 0 or not out.any():
        return out
    # Pixels within R of some lesion, split into groups that no pixel joins: lesions of different
    # groups are more than 2 R apart, so no pixel is within reach of both.
    reach = cv2.dilate((out > 0).astype(np.uint8), np.ones((2 * radius + 1,) * 2, np.uint8))
    _, groups = cv2.connectedComponents(reach, connectivity=8, ltype=cv2.CV_32S)
    for index, box in enumerate(ndimage.find_objects(groups), start=1):
        if box is None:
            continue
        inside = groups[box] == index
        window = np.where(inside, out[box], 0)
        ids = np.unique(window[window > 0])
        if len(ids) == 1:
            # A lone lesion: its group is exactly its dilation.
            out[box][inside] = ids[0]
            continue
        nearest = window.copy()
        for _ in range(radius):
            _nearest_ring(nearest)
            if not _grow_one_ring(window, nearest):
                break
        out[box][inside] = window[inside]
    return out


_SQUARE = np.ones((3, 3), np.uint8)
_CROSS = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
# Above every label id (float32 holds them exactly up to 2**24, far above any lesion count).
_NO_LABEL = float(2**24)
_EDGE_NEIGHBOURS = ((-1, 0), (1, 0), (0, -1), (0, 1))
# In the nearest-instance map: a pixel equally near two instances.
_TIE = -1


def _only_neighbour(labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The highest positive label in each pixel's 3x3 neighbourhood (0: none), and whether it is
    the only positive label there."""
    ids = labels.astype(np.float32)
    highest = cv2.dilate(np.maximum(ids, 0), _SQUARE)
    lowest = cv2.erode(np.where(labels > 0, ids, _NO_LABEL), _SQUARE)
    return highest, (highest > 0) & (highest == lowest)


def _nearest_ring(nearest: np.ndarray) -> None:
    """Extend the map of each pixel's strictly nearest instance by one Chebyshev ring, in place.

    A pixel at distance t from the nearest instance has its distance-(t-1) neighbours in its 3x3
    neighbourhood; it is strictly nearest to one instance when they all are, else a tie.
    """
    highest, only = _only_neighbour(nearest)
    near_tie = cv2.dilate((nearest == _TIE).astype(np.uint8), _SQUARE) > 0
    ring = (nearest == 0) & ((highest > 0) | near_tie)
    owned = ring & only & ~near_tie
    nearest[owned] = highest[owned]
    nearest[ring & ~owned] = _TIE


def _grow_one_ring(labels: np.ndarray, nearest: np.ndarray) -> bool:
    """One ring of :func:`dilate_small_lesions`, in place; False when nothing grew.

    ``nearest``: each pixel's strictly nearest instance (:func:`_nearest_ring`), up to this ring.
    """
    highest, only = _only_neighbour(labels)
    ids = labels.astype(np.float32)
    reached = (labels == 0) & only & (nearest == highest)
    if not reached.any():
        return False
    # An edge neighbour that belongs to an instance belongs to the only one around.
    edge_joined = reached & (cv2.dilate(ids, _CROSS) > 0)
    labels[edge_joined] = highest[edge_joined]
    # The rest touch their instance by a corner only: they join through an edge neighbour taken
    # in this ring, or wait (a corner alone would split a 4-connected instance).
    rows, cols = np.nonzero(reached & ~edge_joined)
    if len(rows):
        own = highest[rows, cols].astype(np.int32)
        joined = np.zeros(len(rows), bool)
        height, width = labels.shape
        for dr, dc in _EDGE_NEIGHBOURS:
            r, c = rows + dr, cols + dc
            valid = (r >= 0) & (r < height) & (c >= 0) & (c < width)
            joined[valid] |= labels[r[valid], c[valid]] == own[valid]
        labels[rows[joined], cols[joined]] = own[joined]
    return True


def instance_rles(labels: np.ndarray) -> Iterator[Tuple[int, dict]]:
    """Encode every labelled instance of a label map as COCO compressed RLE, one at a time.

    COCO RLE runs over the image in column-major order, so the columns left and right of an
    instance only add zeros to the first and last run: each instance is encoded from the strip of
    columns it spans, never from a full-size mask. A 4288x2848 image with hundreds of
    microaneurysms therefore costs time and memory in proportion to the lesions.

    Yields:
        (label id, RLE dict with ``counts`` as str), in increasing label order.
    """
    height, width = labels.shape
    for index, found in enumerate(ndimage.find_objects(labels)):
        if found is None:
            continue
        label_id = index + 1
        col0, col1 = found[1].start, found[1].stop
        flat = (labels[:, col0:col1] == label_id).ravel(order="F")
        # Run lengths of the strip; COCO counts alternate zeros/ones and start with zeros.
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        counts = np.diff(np.concatenate(([0], change, [flat.size]))).tolist()
        if flat[0]:
            counts.insert(0, 0)
        counts[0] += col0 * height
        trailing = (width - col1) * height
        if trailing:
            if flat[-1]:
                counts.append(trailing)
            else:
                counts[-1] += trailing
        rle = mask_util.frPyObjects({"counts": counts, "size": [height, width]}, height, width)
        rle["counts"] = rle["counts"].decode("ascii")
        yield label_id, rle


def instance_rles_from_mask(
    mask: np.ndarray,
    connectivity: int = 8,
    min_area: int = 1,
    dilation: Optional[Dilation] = None,
) -> List[dict]:
    """Binary mask -> one RLE per lesion instance (connected component, optionally dilated).

    Args:
        mask: HxW, non-zero = lesion.
        connectivity: 4 or 8, for splitting the mask into connected components.
        min_area: components smaller than this (before dilation) are dropped.
        dilation: optional small-lesion dilation applied per instance after splitting.

    Returns:
        list of compressed RLE dicts, one per instance.
    """
    labels = label_components(mask, connectivity=connectivity, min_area=min_area)
    if dilation is not None:
        labels = dilate_small_lesions(labels, dilation)
    return [rle for _, rle in instance_rles(labels)]


def encode_rle(mask: np.ndarray) -> dict:
    """COCO compressed RLE of a boolean HxW mask, with ``counts`` as str so it is JSON-ready."""
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def decode_rle(rle: dict) -> np.ndarray:
    """HxW bool mask of a COCO RLE (compressed, with str or bytes counts)."""
    counts = rle["counts"]
    if isinstance(counts, str):
        counts = counts.encode("ascii")
    return mask_util.decode({"size": rle["size"], "counts": counts}).astype(bool)


def decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    """HxW bool mask of any COCO ``segmentation``: polygons, uncompressed or compressed RLE."""
    if isinstance(segmentation, list):  # polygons
        segmentation = mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):  # uncompressed RLE
        segmentation = mask_util.frPyObjects(segmentation, height, width)
    return decode_rle(segmentation)


def _rle_string_counts(counts: bytes) -> np.ndarray:
    """The run lengths of COCO's compressed RLE string (the inverse of pycocotools' rleToString).

    Each count is a little-endian base-32 number, 5 bits per character offset by 48, 0x20 meaning
    another character follows and 0x10 in the last one the sign; from the third count on, the
    number is the difference to the count two places earlier.
    """
    runs: List[int] = []
    value, shift = 0, 0
    for char in counts:
        c = char - 48
        value |= (c & 0x1F) << shift
        shift += 5
        if c & 0x20:
            continue
        if c & 0x10:
            value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
        value, shift = 0, 0
    return np.asarray(runs, dtype=np.int64)


def decode_segmentation_region(
    segmentation, height: int, width: int
) -> Optional[Tuple[slice, slice, np.ndarray]]:
    """The tight box of a COCO ``segmentation`` and the mask inside it, or None when empty.

    Compressed RLE (what the converters write) is decoded from its runs alone, so the cost follows
    the lesion's pixels, not the image's: a full-size mask of a 4288x2848 image per 10-pixel
    microaneurysm is what made loading an eye full of lesions slow.

    Returns:
        ``(rows, cols, patch)`` with ``mask[rows, cols] == patch`` and nothing outside.
    """
    if isinstance(segmentation, dict) and not isinstance(segmentation["counts"], list):
        counts = segmentation["counts"]
        if isinstance(counts, str):
            counts = counts.encode("ascii")
        h, w = segmentation["size"]
        runs = _rle_string_counts(counts)
        ends = np.cumsum(runs)
        starts = ends - runs
        lesion = slice(1, None, 2)  # runs alternate background, lesion
        first, length = starts[lesion], runs[lesion]
        keep = length > 0
        first, length = first[keep], length[keep]
        if not len(first):
            return None
        # Every lesion pixel's column-major index: each run's start repeated, plus 0..length-1.
        offsets = np.arange(length.sum()) - np.repeat(np.cumsum(length) - length, length)
        flat = np.repeat(first, length) + offsets
        rows, cols = flat % h, flat // h
    else:
        mask = decode_segmentation(segmentation, height, width)
        rows, cols = np.nonzero(mask)
        if not len(rows):
            return None
    r0, c0 = rows.min(), cols.min()
    patch = np.zeros((rows.max() - r0 + 1, cols.max() - c0 + 1), dtype=bool)
    patch[rows - r0, cols - c0] = True
    return slice(int(r0), int(rows.max()) + 1), slice(int(c0), int(cols.max()) + 1), patch


def mask_to_polygons(mask: np.ndarray) -> List[List[float]]:
    """The outer outlines of a mask's pieces as COCO polygons ([x0, y0, x1, y1, ...]).

    Each outline runs along the pixels' corners (pixel ``(row i, col j)`` covers
    ``[j, j + 1] x [i, i + 1]``), not through the boundary pixels' centres, so pycocotools
    rasterises it back to exactly the pixels it encloses: a 1-pixel microaneurysm is the unit
    square, a 1-pixel-wide line a thin rectangle. Holes have no outline here (COCO polygons are
    merged by union), so a mask with a hole does not round-trip; :func:`coco_annotation` checks.
    """
    # At twice the size every pixel is a 2x2 block whose boundary sub-pixels lie on the block's
    # outer side, so (u + 1) // 2 maps each traced sub-pixel to the pixel corner it touches.
    doubled = np.repeat(np.repeat(mask.astype(np.uint8), 2, axis=0), 2, axis=1)
    contours, _ = cv2.findContours(doubled, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        corners = (contour.reshape(-1, 2) + 1) // 2
        # Sub-pixels of one corner map to the same point: keep one of each run.
        corners = corners[np.any(corners != np.roll(corners, 1, axis=0), axis=1)]
        if len(corners) >= 3:
            polygons.append(corners.astype(np.float64).ravel().tolist())
    return polygons


def _exact_polygons(rle: dict) -> Optional[Tuple[List[List[float]], dict]]:
    """The polygons of an instance and their rasterised RLE, or None when pycocotools'
    rasterisation of them differs from the instance by any pixel (a hole, for one)."""
    height, width = rle["size"]
    region = decode_segmentation_region(rle, height, width)
    if region is None:
        return None
    rows, cols, patch = region
    # Traced in the instance's box (not a full-size mask per microaneurysm), then moved back.
    shift = np.array([cols.start, rows.start], np.float64)
    polygons = [
        (np.reshape(polygon, (-1, 2)) + shift).ravel().tolist()
        for polygon in mask_to_polygons(patch)
    ]
    if not polygons:
        return None
    drawn = mask_util.merge(mask_util.frPyObjects(polygons, height, width))
    stored = rle
    if isinstance(rle["counts"], str):
        stored = dict(rle, counts=rle["counts"].encode("ascii"))
    area = mask_util.area(stored)
    both = mask_util.area(mask_util.merge([drawn, stored], intersect=True))
    if mask_util.area(drawn) != area or both != area:
        return None
    return polygons, drawn


def coco_annotation(
    rle: dict,
    *,
    annotation_id: int,
    image_id: int,
    category_id: int,
    iscrowd: int = 0,
    segmentation_format: str = "rle",
) -> dict:
    """One COCO instance annotation for an instance's RLE.

    ``bbox`` is ``[x, y, w, h]`` of the instance's tight pixel box and ``area`` its pixel count, as
    pycocotools computes them from the stored segmentation.

    Args:
        rle: compressed RLE of the instance (from :func:`instance_rles` or :func:`encode_rle`).
        annotation_id, image_id, category_id, iscrowd: the COCO fields.
        segmentation_format: "rle" (default) or "polygon": pixel-corner outlines
            (:func:`mask_to_polygons`), kept only when pycocotools rasterises them back to exactly
            the instance's pixels; an instance with a hole (or any shape polygons would alter)
            keeps its RLE, so no pixel is ever lost or added.

    Returns:
        the annotation dict.
    """
    if segmentation_format not in ("rle", "polygon"):
        raise ValueError(f"segmentation_format must be 'rle' or 'polygon', got {segmentation_format!r}")
    segmentation, stored = rle, rle
    if segmentation_format == "polygon":
        exact = _exact_polygons(rle)
        if exact is not None:
            segmentation, stored = exact
    # Of what is stored: a polygon's area is what pycocotools rasterises it to.
    area = int(mask_util.area(stored))
    if area == 0:
        raise ValueError(f"annotation {annotation_id} on image {image_id} has an empty mask")
    return {
        "id": int(annotation_id),
        "image_id": int(image_id),
        "category_id": int(category_id),
        "segmentation": segmentation,
        "area": area,
        "bbox": [float(v) for v in mask_util.toBbox(rle)],
        "iscrowd": int(iscrowd),
    }
