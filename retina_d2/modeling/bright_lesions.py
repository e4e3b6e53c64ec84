"""Bright-lesion candidates of a fundus photograph without training, and what describes each.

Exudates are the brightest small structures of the green channel once the slow illumination is
divided out; the optic disc is brighter and larger, so it is found (:func:`brightest_region_center`)
and blanked. :func:`bright_lesion_candidates` turns the relative contrast into connected
components: that alone is DESIGN.md's training-free floor (``benchmarks/exudate_floor.py`` scores
it), and the candidates of :class:`~retina_d2.modeling.meta_arch.candidate_net.BrightCandidateNet`,
which learns to tell exudates among them from drusen, reflections and the vessel light reflex by
:func:`candidate_features`.

Every length is a fraction of the field of view's diameter and every brightness a ratio to the
local background, so photographs of any resolution and exposure are treated alike.
"""
from typing import List, NamedTuple, Optional, Tuple

import cv2
import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from ..data.preprocess import wide_gaussian_blur, field_of_view_box

__all__ = [
    "FEATURE_NAMES",
    "BrightLesionMaps",
    "BrightLesionParams",
    "bright_lesion_candidates",
    "bright_lesion_maps",
    "brightest_region_center",
    "candidate_features",
    "label_overlap_ious",
]

# Width the disc search works at: the disc is ~70 px across there, plenty for its centre.
_DISC_SEARCH_WIDTH = 512


class BrightLesionParams:
    """The candidates' settings (lengths are fractions of the FOV's diameter).

    Attributes:
        background_sigma: Gaussian of the background estimate (retina without lesions).
        min_contrast: relative brightness over the background from which a pixel is a candidate.
        score_scale: contrast at which a candidate's training-free score is 1 - 1/e.
        disc_radius: radius of the blanked optic disc (its diameter is ~0.14 of the FOV's).
        rim: band inside the FOV's edge left out (the rim's vignetting and glare).
        min_area: fewest pixels of a candidate at a 2000 px FOV (scaled with the FOV's area).
        fov_threshold: channel maximum above which a pixel is inside the FOV.
        ring: width of the surround a candidate is compared with (:func:`candidate_features`).
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
        ring: float = 0.004,
    ):
        self.background_sigma = background_sigma
        self.min_contrast = min_contrast
        self.score_scale = score_scale
        self.disc_radius = disc_radius
        self.rim = rim
        self.min_area = min_area
        self.fov_threshold = fov_threshold
        self.ring = ring


class BrightLesionMaps(NamedTuple):
    """What the candidates are cut from.

    Attributes:
        inside: bool (H, W), the FOV less its rim band.
        diameter: the FOV's diameter in pixels.
        contrast: float32 (3, H, W), each RGB channel's (value - background) / background inside
            the FOV (0 outside).
        disc: (x, y) of the optic disc's centre.
        lesion_contrast: float32 (H, W), the green contrast with the disc blanked: what the
            candidates are thresholded on.
    """

    inside: np.ndarray
    diameter: float
    contrast: np.ndarray
    disc: Tuple[float, float]
    lesion_contrast: np.ndarray


def brightest_region_center(
    image: np.ndarray, fov_threshold: int = 20, disc_fraction: float = 0.14
) -> Tuple[float, float]:
    """The centre (x, y) of the brightest disc-sized region inside the field of view.

    The luminance inside the FOV is averaged over a Gaussian of a quarter disc diameter (the disc
    taken as ``disc_fraction`` of the FOV's width), normalised by the FOV mask blurred alike so
    the dark rim does not pull the average down, and the maximum is taken at least half a disc
    from the rim: small bright exudates average away, the disc does not.

    Args:
        image: HxWx3 uint8 RGB.
        fov_threshold: pixels brighter than this (channel maximum) are inside the FOV.
        disc_fraction: the disc's diameter over the FOV's width.

    Returns:
        (x, y) in the image's pixels.
    """
    height, width = image.shape[:2]
    scale = min(1.0, _DISC_SEARCH_WIDTH / width)
    size = (round(width * scale), round(height * scale))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    fov = (small.max(axis=2) > fov_threshold).astype(np.float32)
    cols = np.flatnonzero(fov.any(axis=0))
    fov_width = float(cols[-1] - cols[0] + 1) if cols.size else float(small.shape[1])
    disc = disc_fraction * fov_width
    grey = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY).astype(np.float32) * fov
    sigma = disc / 4.0
    mean = cv2.GaussianBlur(grey, (0, 0), sigma) / np.maximum(
        cv2.GaussianBlur(fov, (0, 0), sigma), 1e-3
    )
    margin = max(1, int(round(disc / 2)))
    inner = cv2.erode(fov, np.ones((2 * margin + 1, 2 * margin + 1), np.uint8))
    mean[inner == 0] = -1.0
    y, x = np.unravel_index(int(np.argmax(mean)), mean.shape)
    # Pixel centres map back through the resize: (i + 0.5) / scale - 0.5.
    return (x + 0.5) / scale - 0.5, (y + 0.5) / scale - 0.5


def _fov_mask(image: np.ndarray, params: BrightLesionParams) -> Tuple[np.ndarray, float]:
    """The field of view's pixels (eroded by the rim band) and its diameter in pixels."""
    box = field_of_view_box(image, params.fov_threshold)
    height, width = image.shape[:2]
    x0, y0, x1, y1 = box if box is not None else (0, 0, width, height)
    diameter = float(max(x1 - x0, y1 - y0))
    inside = image.max(axis=2) > params.fov_threshold
    rim = max(1, int(round(params.rim * diameter)))
    inside = cv2.erode(inside.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=rim) > 0
    return inside, diameter


def bright_lesion_maps(
    image: np.ndarray, params: Optional[BrightLesionParams] = None, channels=(0, 1, 2)
) -> BrightLesionMaps:
    """The FOV, the disc and the relative contrast of ``channels`` (RGB indices; the others stay
    0) of one photograph (HxWx3 uint8 RGB)."""
    params = params or BrightLesionParams()
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"bright lesions need an HxWx3 RGB image, got shape {image.shape}")
    inside, diameter = _fov_mask(image, params)
    weight = inside.astype(np.float32)
    sigma = params.background_sigma * diameter
    # A blur of the FOV alone, normalised by the blurred FOV mask: the black border would darken
    # the background near the rim and turn the whole rim into candidates.
    norm = np.maximum(wide_gaussian_blur(weight, sigma), 1e-3)
    contrast = np.zeros((3,) + image.shape[:2], np.float32)
    for c in channels:
        value = image[..., c].astype(np.float32)
        background = wide_gaussian_blur(value * weight, sigma) / norm
        contrast[c] = (value - background) / np.maximum(background, 1.0)
        contrast[c][~inside] = 0.0
    disc_x, disc_y = brightest_region_center(image, params.fov_threshold)
    yy, xx = np.ogrid[: image.shape[0], : image.shape[1]]
    radius = params.disc_radius * diameter
    lesion_contrast = contrast[1].copy()
    lesion_contrast[(xx + 0.5 - disc_x) ** 2 + (yy + 0.5 - disc_y) ** 2 <= radius**2] = 0.0
    return BrightLesionMaps(inside, diameter, contrast, (disc_x, disc_y), lesion_contrast)


def label_overlap_ious(
    first: np.ndarray, second: np.ndarray
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The IoU of every overlapping pair of regions of two label maps of one image.

    Args:
        first, second: non-negative int label maps of the same shape (0: no region).

    Returns:
        ``(first_labels, second_labels, ious)``: one entry per pair of a ``first`` region and a
        ``second`` region that share a pixel (pairs that do not overlap have IoU 0 and are left
        out).
    """
    both = (first > 0) & (second > 0)
    if not both.any():
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0)
    # One pass over the overlap: each pair of labels as one number, counted by np.unique.
    span = int(second.max()) + 1
    pairs, overlap = np.unique(
        first[both].astype(np.int64) * span + second[both], return_counts=True
    )
    a, b = pairs // span, pairs % span
    first_area = np.bincount(first.ravel())
    second_area = np.bincount(second.ravel(), minlength=span)
    return a, b, overlap / (first_area[a] + second_area[b] - overlap)


def bright_lesion_candidates(
    image: np.ndarray, params: Optional[BrightLesionParams] = None,
    maps: Optional[BrightLesionMaps] = None,
) -> Tuple[np.ndarray, List[Tuple[int, List[int], float]]]:
    """Bright lesions of one fundus photograph, without training.

    Args:
        image: HxWx3 uint8 RGB.
        params: the settings (default :class:`BrightLesionParams`).
        maps: :func:`bright_lesion_maps` of the image, when already computed.

    Returns:
        ``(labels, lesions)``: an int32 label map of the image's size (0: no lesion) and
        ``(label, [x0, y0, x1, y1], score)`` per lesion, a connected component of the candidate
        pixels (one label each; a full-size mask per lesion would cost gigabytes on an eye with
        hundreds), the score in (0, 1) growing with its peak contrast; sorted by score, highest
        first. Components under the minimum area keep no label (they are 0 in ``labels``).
    """
    params = params or BrightLesionParams()
    if maps is None:
        maps = bright_lesion_maps(image, params, channels=(1,))
    contrast = maps.lesion_contrast
    labels, count = ndimage.label(contrast > params.min_contrast, np.ones((3, 3), bool))
    if count == 0:
        return labels, []
    min_area = params.min_area * (maps.diameter / 2000.0) ** 2
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    # Over the candidate pixels only: scipy's maximum over the whole image sorts it all.
    lesion = labels > 0
    peaks = ndimage.maximum(contrast[lesion], labels[lesion], np.arange(1, count + 1))
    small = areas < min_area
    small[0] = False
    labels[small[labels]] = 0
    candidates = []
    for index, window in enumerate(ndimage.find_objects(labels), start=1):
        if window is None or small[index]:
            continue
        rows, cols = window
        score = float(1.0 - np.exp(-peaks[index - 1] / params.score_scale))
        candidates.append((index, [cols.start, rows.start, cols.stop, rows.stop], score))
    candidates.sort(key=lambda c: -c[2])
    return labels, candidates


# What describes a candidate (candidate_features' columns). Brightness is relative to the local
# background or on the 0-1 scale, sizes and distances are fractions of the FOV: nothing depends
# on the camera's resolution.
FEATURE_NAMES = (
    "log_area",  # log of the area at a 2000 px FOV
    "fill",  # area / box area: blobs fill their box, vessel reflexes do not
    "log_aspect",
    "red_contrast_mean", "red_contrast_max",
    "green_contrast_mean", "green_contrast_max",
    "blue_contrast_mean", "blue_contrast_max",
    "red", "green", "blue",  # mean value inside, 0-1
    "red_surround", "green_surround", "blue_surround",  # mean of the ring around it, 0-1
    "green_surround_std",
    "edge",  # (green inside - surround) / surround spread: a sharp-edged exudate vs a soft glow
    "disc_distance",  # from the optic disc's centre, / FOV diameter
    "center_distance",  # from the FOV's centre, / FOV diameter
    "log_candidates",  # log(1 + candidates in the image): exudates come in clusters
    "log_neighbours",  # log(1 + candidates within 0.05 FOV diameters)
)


def candidate_features(
    image: np.ndarray, labels: np.ndarray, candidates, maps: BrightLesionMaps,
    params: Optional[BrightLesionParams] = None,
) -> np.ndarray:
    """One row of :data:`FEATURE_NAMES` per candidate of :func:`bright_lesion_candidates`.

    Args:
        image: the HxWx3 uint8 RGB photograph.
        labels, candidates: :func:`bright_lesion_candidates`'s output.
        maps: :func:`bright_lesion_maps` with all three channels' contrast.

    Returns:
        float32 (len(candidates), len(FEATURE_NAMES)).
    """
    params = params or BrightLesionParams()
    if not candidates:
        return np.zeros((0, len(FEATURE_NAMES)), np.float32)
    index = np.array([c[0] for c in candidates])
    boxes = np.array([c[1] for c in candidates], np.float64)
    diameter = maps.diameter
    areas = np.bincount(labels.ravel(), minlength=int(index.max()) + 1)[index].astype(np.float64)
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    columns = [
        np.log(areas * (2000.0 / diameter) ** 2),
        areas / (widths * heights),
        np.log(heights / widths),
    ]
    # Statistics over the candidates' pixels only: scipy's over the whole image sort it all.
    lesion = labels > 0
    lesion_labels = labels[lesion]
    for c in range(3):
        pixels = maps.contrast[c][lesion]
        columns.append(ndimage.mean(pixels, lesion_labels, index))
        columns.append(ndimage.maximum(pixels, lesion_labels, index))
    values = [image[..., c].astype(np.float32) / 255.0 for c in range(3)]
    columns += [ndimage.mean(v[lesion], lesion_labels, index) for v in values]
    # The surround: pixels within `ring` of a candidate that belong to no candidate, labelled by
    # the nearest candidate's label (grey dilation takes the largest label nearby; where two
    # candidates are that close, the larger label gets the ring, which costs little).
    width = max(1, int(round(params.ring * diameter)))
    # (cv2's float dilation is exact for labels below 2**24 and much faster than scipy's.)
    kernel = np.ones((2 * width + 1, 2 * width + 1), np.uint8)
    grown = cv2.dilate(labels.astype(np.float32), kernel).astype(labels.dtype)
    ring = np.where((labels == 0) & maps.inside, grown, 0)
    present = np.isin(index, np.unique(ring))
    with np.errstate(invalid="ignore", divide="ignore"):  # candidates without a ring: replaced
        for c in range(3):
            surround = np.asarray(ndimage.mean(values[c], ring, index))
            columns.append(np.where(present, surround, columns[9 + c]))
        spread = np.where(present, ndimage.standard_deviation(values[1], ring, index), 0.0)
    columns.append(spread)
    columns.append((columns[10] - columns[13]) / (spread + 1.0 / 255.0))
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)
    columns.append(np.hypot(*(centres - np.asarray(maps.disc)).T) / diameter)
    fov_centre = np.argwhere(maps.inside).mean(axis=0)[::-1] if maps.inside.any() else (
        np.array(labels.shape[::-1], np.float64) / 2)
    columns.append(np.hypot(*(centres - fov_centre).T) / diameter)
    columns.append(np.full(len(candidates), np.log1p(len(candidates))))
    tree = cKDTree(centres)
    neighbours = tree.query_ball_point(centres, 0.05 * diameter, return_length=True)
    columns.append(np.log1p(np.asarray(neighbours) - 1))
    return np.stack([np.asarray(c, np.float64) for c in columns], axis=1).astype(np.float32)
