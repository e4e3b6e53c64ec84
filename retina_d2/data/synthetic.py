"""A seeded generator of fundus-like photographs with exactly known lesions.

This is the project's embedded default dataset: it needs no download, trains a small Mask R-CNN on
a CPU in minutes, and gives tests ground truth that is exact by construction. Each image shows a
circular field of view (FOV) on black, an optic disc (OD), a fovea, a vessel tree and up to four
kinds of lesion (see :data:`LESION_ABBREVS`).

Guarantees that the rest of the project (and ``tests/data/test_synthetic.py``) relies on:

* Every lesion mask is ``HxW`` bool. Instances of one type never touch, not even diagonally: at
  least two background pixels separate them, so the 8-connected components of ``masks[t]`` are
  exactly ``counts[t]`` instances. Each lesion pixel has a single type (masks are disjoint), no
  lesion overlaps the optic disc or a vessel, and all of them lie inside the FOV, away from its rim.
* Lesion sizes are specified at a reference width of 1024 px and scaled by ``size / 1024``;
  microaneurysms keep a diameter of at least 2 px below 1024 px so that they stay visible.
* ``dr_grade`` follows a simplified International Clinical DR scale over the lesion counts (0 none;
  1 at most 10 MAs only; 2 more MAs or any HE/EX/SE; 3 at least 4 HE, or SE with at least 2 HE;
  4 SE with at least 4 HE, standing in for proliferative DR). ``dme_grade`` is 0 without hard
  exudates, 2 if one lies within one disc diameter of the fovea, else 1 (as in IDRiD).
* Rendering depends only on the generator passed in. The background and the lesions draw from two
  independent child streams, so ``healthy=True`` yields the same eye as ``healthy=False``, minus
  the lesions.
"""
import csv
import json
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

import cv2
import numpy as np

__all__ = [
    "LESION_ABBREVS",
    "SyntheticFundus",
    "render_fundus",
    "image_rng",
    "generate_dataset",
]

LESION_ABBREVS = ("MA", "HE", "EX", "SE", "OD")  # microaneurysm, haemorrhage, hard/soft exudate, OD
_LESION_TYPES = ("MA", "HE", "EX", "SE")  # the drawn lesions; OD is anatomy with one instance

_MIN_SIZE = 128
_REFERENCE_SIZE = 1024.0  # lesion and vessel sizes below are given at this image width
_FOV_RADIUS = 0.46  # of the image size
_OD_DIAMETER = 1.0 / 7.0  # of the image size
_FOVEA_DISTANCE_DD = 2.5  # disc diameters between the OD centre and the fovea
_SAME_TYPE_GAP = 2  # background pixels that must separate two instances of the same type


@dataclass
class SyntheticFundus:
    """One rendered image and its exact ground truth.

    Attributes:
        image: ``HxWx3`` uint8 RGB photograph.
        masks: lesion abbreviation -> ``HxW`` bool mask, one per :data:`LESION_ABBREVS` entry
            (all False when the image has none of that type).
        counts: abbreviation -> number of separate instances drawn; equals the number of
            8-connected components of the mask. ``counts["OD"]`` is always 1. For hard exudates
            every spot of a cluster is one instance.
        dr_grade: diabetic-retinopathy grade 0-4 derived from the counts (see ``_dr_grade``).
        dme_grade: macular-oedema risk 0-2 from the hard exudates' distance to the fovea (see
            ``_dme_grade``).
        optic_disc_center: ``(x, y)`` in pixels.
        fovea_center: ``(x, y)`` in pixels.
    """

    image: np.ndarray
    masks: Dict[str, np.ndarray]
    counts: Dict[str, int]
    dr_grade: int
    dme_grade: int
    optic_disc_center: Tuple[float, float]
    fovea_center: Tuple[float, float]


# --------------------------------------------------------------------------------------------
# Grading
# --------------------------------------------------------------------------------------------


def _dr_grade(counts: Dict[str, int]) -> int:
    """A simplified International Clinical DR scale computed from lesion counts.

    0: no lesion. 1 (mild): microaneurysms only, at most 10. 2 (moderate): more than 10
    microaneurysms, or any haemorrhage or exudate. 3 (severe): at least 4 haemorrhages, or a soft
    exudate with at least 2 haemorrhages. 4: a soft exudate with at least 4 haemorrhages; there is
    no neovascularisation to draw, so this widespread ischaemia stands in for proliferative DR.
    """
    n_ma, n_he, n_ex, n_se = (counts[t] for t in _LESION_TYPES)
    if n_se >= 1 and n_he >= 4:
        return 4
    if n_he >= 4 or (n_se >= 1 and n_he >= 2):
        return 3
    if n_ma > 10 or n_he or n_ex or n_se:
        return 2
    if n_ma:
        return 1
    return 0


def _dme_grade(ex_mask: np.ndarray, fovea: Tuple[float, float], disc_diameter: float) -> int:
    """IDRiD-style macular-oedema risk: 0 without hard exudates, 2 when any hard-exudate pixel is
    within one disc diameter of the fovea, 1 otherwise."""
    ys, xs = np.nonzero(ex_mask)
    if ys.size == 0:
        return 0
    nearest = np.sqrt(((xs - fovea[0]) ** 2 + (ys - fovea[1]) ** 2).min())
    return 2 if nearest <= disc_diameter else 1


# --------------------------------------------------------------------------------------------
# Background anatomy
# --------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, sigma: float) -> np.ndarray:
    """Low-frequency multiplicative texture: a coarse Gaussian grid upsampled bicubically."""
    grid = rng.normal(0.0, sigma, size=(cells, cells)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def _grow_vessel(
    canvas: np.ndarray,
    rng: np.random.Generator,
    start: Tuple[float, float],
    angle: float,
    curvature: float,
    width: float,
    length: float,
    depth: int,
    step: float,
    fov: Tuple[float, float, float],
) -> None:
    """Draw one vessel as a wandering polyline that thins along its length, and its branches.

    The bend per step decays along the vessel, so arcades turn near the disc and then run on.
    """
    cx, cy, radius = fov
    x, y = start
    travelled = 0.0
    while travelled < length:
        angle += curvature * math.exp(-travelled / (0.3 * length)) + rng.normal(0.0, 0.06)
        nx, ny = x + step * math.cos(angle), y + step * math.sin(angle)
        if math.hypot(nx - cx, ny - cy) > radius:
            break
        w = width * (1.0 - 0.55 * travelled / length)
        # shift=2: quarter-pixel end points keep thin vessels smooth instead of staircased.
        cv2.line(
            canvas,
            (int(round(x * 4)), int(round(y * 4))),
            (int(round(nx * 4)), int(round(ny * 4))),
            255,
            thickness=max(1, int(round(w))),
            lineType=cv2.LINE_AA,
            shift=2,
        )
        if depth < 3 and travelled > 3 * step and rng.random() < 0.05:
            side = 1.0 if rng.random() < 0.5 else -1.0
            _grow_vessel(
                canvas,
                rng,
                start=(nx, ny),
                angle=angle + side * rng.uniform(0.5, 1.0),
                curvature=side * rng.uniform(0.0, 0.03),
                width=w * 0.7,
                length=(length - travelled) * rng.uniform(0.4, 0.8),
                depth=depth + 1,
                step=step,
                fov=fov,
            )
            width *= 0.88  # a parent loses calibre at each bifurcation
        x, y = nx, ny
        travelled += step


def _draw_vessel_tree(
    rng: np.random.Generator,
    size: int,
    od: Tuple[float, float],
    temporal: float,
    fov: Tuple[float, float, float],
) -> Tuple[np.ndarray, np.ndarray]:
    """Veins and arteries as two 0-255 coverage layers, radiating from the optic disc.

    Four arcades leave the disc towards the fovea (``temporal`` = +1 when it lies to the right)
    and bend around the macula; shorter nasal vessels head the other way.
    """
    scale = size / _REFERENCE_SIZE
    step = size / 110.0
    veins = np.zeros((size, size), np.uint8)
    arteries = np.zeros((size, size), np.uint8)
    # (canvas, start angle for a right-hand fovea, curvature per step, width at 1024, length)
    specs = []
    for vertical in (-1.0, 1.0):  # superior, inferior
        for canvas, width, offset in ((veins, 11.0, 0.0), (arteries, 8.0, 0.18)):
            # Temporal arcades leave steeply and bend towards the fovea's side, passing around the
            # macula; nasal vessels fan out and bend away from it.
            a0 = vertical * (math.pi / 2 - rng.uniform(0.25, 0.45) - offset)
            specs.append((canvas, a0, -vertical * rng.uniform(0.04, 0.055), width, 0.75))
            nasal = vertical * (math.pi / 2 + rng.uniform(0.3, 0.7) + offset)
            specs.append((canvas, nasal, vertical * rng.uniform(0.0, 0.04), width * 0.7, 0.3))
    for _ in range(int(rng.integers(2, 4))):  # thin papillomacular vessels towards the fovea
        specs.append((arteries, rng.uniform(-0.35, 0.35), 0.0, 3.0, 0.22))
    for canvas, a0, curvature, width, length in specs:
        if temporal < 0:  # mirror the layout left-right
            a0, curvature = math.pi - a0, -curvature
        _grow_vessel(
            canvas,
            rng,
            start=od,
            angle=a0,
            curvature=curvature,
            width=max(1.0, width * scale),
            length=length * size * rng.uniform(0.85, 1.1),
            depth=0,
            step=step,
            fov=fov,
        )
    blur = max(0.5, 0.7 * scale)
    return cv2.GaussianBlur(veins, (0, 0), blur), cv2.GaussianBlur(arteries, (0, 0), blur)


# --------------------------------------------------------------------------------------------
# Lesion shapes
# --------------------------------------------------------------------------------------------


def _disc_patch(diameter: int, pad: int) -> np.ndarray:
    """A filled disc whose bounding box is exactly ``diameter`` pixels, with ``pad`` margin."""
    side = diameter + 2 * pad
    yy, xx = np.mgrid[0:side, 0:side]
    c = pad + (diameter - 1) / 2.0
    return (xx - c) ** 2 + (yy - c) ** 2 <= (diameter / 2.0) ** 2


def _blob_patch(rng: np.random.Generator, diameter: float, n_ellipses: int, pad: int) -> np.ndarray:
    """An irregular blob: a union of ellipses that all contain the patch centre.

    Sharing the centre keeps the union one 8-connected component; the component test below is a
    safety net for degenerate, sub-pixel ellipses.
    """
    extent = int(math.ceil(1.2 * diameter)) + 1
    side = extent + 2 * pad
    c = (side - 1) / 2.0
    canvas = np.zeros((side, side), np.uint8)
    for _ in range(n_ellipses):
        # Semi-axes up to 0.45 D shifted by up to a quarter of the minor one keep the blob's
        # extent within about 1.1 D, so ``diameter`` means what the callers' size ranges say.
        major = rng.uniform(0.3, 0.45) * diameter
        minor = rng.uniform(0.55, 1.0) * major
        theta = rng.uniform(0.0, 2 * math.pi)
        shift = rng.uniform(0.0, 0.25) * minor
        ex, ey = c + shift * math.cos(theta), c + shift * math.sin(theta)
        cv2.ellipse(
            canvas,
            (int(round(ex * 16)), int(round(ey * 16))),
            (max(1, int(round(major * 16))), max(1, int(round(minor * 16)))),
            float(rng.uniform(0.0, 180.0)),
            0,
            360,
            1,
            thickness=-1,
            shift=4,
        )
    ic = int(round(c))
    canvas[ic, ic] = 1
    _, labels = cv2.connectedComponents(canvas, connectivity=8)
    return labels == labels[ic, ic]


class _LesionCanvas:
    """Places lesions one by one while enforcing the placement rules of the module docstring."""

    def __init__(
        self,
        image: np.ndarray,
        allowed: np.ndarray,
        illumination: np.ndarray,
        masks: Dict[str, np.ndarray],
    ):
        self.image = image  # float32 HxWx3, modified in place
        self.allowed = allowed  # where any lesion pixel may go: inner FOV, off the disc and vessels
        self.illumination = illumination
        self.masks = masks
        self.owner = np.full(allowed.shape, -1, np.int8)  # type index per pixel, -1 = free
        self.counts = {t: 0 for t in _LESION_TYPES}
        self._gap_kernel = np.ones((2 * _SAME_TYPE_GAP + 1,) * 2, np.uint8)

    def try_place(
        self,
        kind: str,
        patch: np.ndarray,
        center: Tuple[float, float],
        color: np.ndarray,
        halo_sigma: float,
        opacity: float,
    ) -> bool:
        """Paint ``patch`` centred on ``center`` unless it breaks a placement rule.

        Args:
            kind: lesion abbreviation, one of ``_LESION_TYPES``.
            patch: bool shape whose border is at least ``_SAME_TYPE_GAP`` pixels of False.
            center: ``(x, y)`` of the patch centre in image pixels.
            color: RGB target colour (float) of the lesion core under full illumination.
            halo_sigma: Gaussian sigma of the soft edge painted around the core.
            opacity: blending weight of the colour inside the core.

        Returns:
            True when the lesion was drawn and recorded, False when it did not fit.
        """
        h, w = patch.shape
        y0 = int(round(center[1] - (h - 1) / 2.0))
        x0 = int(round(center[0] - (w - 1) / 2.0))
        size = self.allowed.shape[0]
        if y0 < 0 or x0 < 0 or y0 + h > size or x0 + w > size:
            return False
        region = (slice(y0, y0 + h), slice(x0, x0 + w))
        owner = self.owner[region]
        if not self.allowed[region][patch].all() or (owner[patch] >= 0).any():
            return False
        kind_index = _LESION_TYPES.index(kind)
        # Same-type instances must stay _SAME_TYPE_GAP pixels apart so that 8-connected labelling
        # recovers each one; the patch border leaves room for this dilation.
        grown = cv2.dilate(patch.astype(np.uint8), self._gap_kernel).astype(bool)
        if (owner[grown] == kind_index).any():
            return False

        self.masks[kind][region] |= patch
        owner[patch] = kind_index
        self.counts[kind] += 1

        core = patch.astype(np.float32)
        halo = cv2.GaussianBlur(core, (0, 0), halo_sigma) if halo_sigma > 0 else core
        alpha = np.maximum(core, np.clip(halo * 1.5, 0.0, 1.0)) * opacity
        alpha[(owner >= 0) & ~patch] = 0.0  # never tint another lesion's pixels
        light = 0.55 + 0.45 * self.illumination[region]
        target = color[None, None, :] * light[..., None]
        pixels = self.image[region]
        pixels += (target - pixels) * alpha[..., None]
        return True


def _random_point_in_disc(rng: np.random.Generator, center, radius) -> Tuple[float, float]:
    r = radius * math.sqrt(rng.random())
    theta = rng.uniform(0.0, 2 * math.pi)
    return center[0] + r * math.cos(theta), center[1] + r * math.sin(theta)


def _draw_lesions(
    rng: np.random.Generator,
    canvas: _LesionCanvas,
    size: int,
    fov: Tuple[float, float, float],
    fovea: Tuple[float, float],
    disc_diameter: float,
) -> None:
    """Draw 0-2 soft exudates, 0-6 haemorrhages, 0-3 hard-exudate clusters and 0-20 MAs.

    Large lesions go first so that they find room; a lesion that does not fit after a fixed number
    of tries is skipped, and the counts record only what was drawn.
    """
    scale = size / _REFERENCE_SIZE
    cx, cy, radius = fov
    n_se, n_he, n_ex, n_ma = (int(rng.integers(0, hi + 1)) for hi in (2, 6, 3, 20))

    def jitter(rgb):
        return np.asarray(rgb, np.float32) * rng.uniform(0.92, 1.08, size=3).astype(np.float32)

    for _ in range(n_se):  # cotton-wool spots: pale, fuzzy, anywhere in the FOV
        diameter = max(4.0, rng.uniform(10.0, 40.0) * scale)
        sigma = max(1.0, diameter / 5.0)
        patch = _blob_patch(rng, diameter, int(rng.integers(2, 5)), int(math.ceil(3 * sigma)) + 2)
        color = jitter((242, 234, 212))
        for _ in range(30):
            at = _random_point_in_disc(rng, (cx, cy), radius)
            if canvas.try_place("SE", patch, at, color, sigma, 0.7):
                break

    for _ in range(n_he):  # blot haemorrhages: dark red, irregular
        diameter = max(3.0, rng.uniform(6.0, 25.0) * scale)
        patch = _blob_patch(rng, diameter, int(rng.integers(2, 5)), 4)
        color = jitter((95, 12, 8))
        for _ in range(30):
            at = _random_point_in_disc(rng, (cx, cy), radius)
            if canvas.try_place("HE", patch, at, color, 0.8, 0.92):
                break

    for _ in range(n_ex):  # hard exudates: clusters of small waxy yellow spots, often macular
        spread = max(6.0, rng.uniform(20.0, 50.0) * scale)
        near_fovea = rng.random() < 0.5
        for _ in range(30):
            if near_fovea:
                centre = _random_point_in_disc(rng, fovea, 1.2 * disc_diameter)
            else:
                centre = _random_point_in_disc(rng, (cx, cy), radius)
            ix, iy = int(round(centre[0])), int(round(centre[1]))
            if 0 <= ix < size and 0 <= iy < size and canvas.allowed[iy, ix]:
                break
        else:
            continue
        for _ in range(int(rng.integers(3, 11))):
            diameter = max(2.0, (2.0 + 18.0 * rng.random() ** 2) * scale)
            if diameter < 3.5:
                patch = _disc_patch(int(round(diameter)), 3)
            else:
                patch = _blob_patch(rng, diameter, int(rng.integers(1, 4)), 3)
            color = jitter((248, 228, 105))
            for _ in range(15):
                at = _random_point_in_disc(rng, centre, spread)
                if canvas.try_place("EX", patch, at, color, 0.6, 0.95):
                    break

    min_ma = 1 if size >= _REFERENCE_SIZE else 2  # a 1-px dot is only legible at full resolution
    for _ in range(n_ma):  # microaneurysms: small round dark-red dots
        diameter = max(min_ma, int(round(int(rng.integers(1, 6)) * scale)))
        patch = _disc_patch(diameter, 3)
        color = jitter((110, 15, 12))
        for _ in range(40):
            at = _random_point_in_disc(rng, (cx, cy), radius)
            at = (round(at[0]), round(at[1]))  # whole pixels keep the disc's exact diameter
            if canvas.try_place("MA", patch, at, color, 0.5, 0.95):
                break


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def render_fundus(
    rng: np.random.Generator, size: int = 512, healthy: bool = False
) -> SyntheticFundus:
    """Render one synthetic colour fundus photograph and its ground truth.

    Args:
        rng: source of all randomness; the same generator state gives the same result.
        size: width and height of the square image in pixels, at least 128.
        healthy: draw no lesions. Background, vessels, optic disc and fovea are identical to those
            drawn with ``healthy=False`` from the same generator state.

    Returns:
        The image with its masks, instance counts, grades and landmark positions.

    Raises:
        ValueError: if ``size`` is below 128.
    """
    size = int(size)
    if size < _MIN_SIZE:
        raise ValueError(f"size must be at least {_MIN_SIZE} px, got {size}")
    # Separate streams: the number of lesions drawn must not change the eye behind them.
    bg_rng, lesion_rng = (np.random.default_rng(s) for s in rng.integers(0, 2**63, size=2))

    center = (size - 1) / 2.0
    fov_radius = _FOV_RADIUS * size
    fov = (center, center, fov_radius)
    # Open grids: every per-pixel map below is built by broadcasting a column against a row.
    yy, xx = (g.astype(np.float32) for g in np.ogrid[0:size, 0:size])
    rho = np.sqrt((xx - center) ** 2 + (yy - center) ** 2) / fov_radius

    # Fundus reflectance: orange-red, darker towards the rim, with blotchy choroidal texture.
    base = np.array([205.0, 88.0, 42.0], np.float32) * bg_rng.uniform(0.88, 1.08, size=3).astype(
        np.float32
    )
    illumination = (1.0 - 0.5 * np.clip(rho, 0.0, 1.0) ** 2.2) * (
        1.0 + _smooth_noise(bg_rng, size, 6, 0.07) + _smooth_noise(bg_rng, size, 28, 0.025)
    )
    illumination = illumination.astype(np.float32)

    # Optic disc on one side, fovea 2.5 disc diameters towards the centre on the same row.
    temporal = 1.0 if bg_rng.random() < 0.5 else -1.0  # +1: fovea right of the disc
    disc_radius = 0.5 * _OD_DIAMETER * size * bg_rng.uniform(0.95, 1.05)
    disc_diameter = 2.0 * disc_radius
    od_x = center - temporal * bg_rng.uniform(0.17, 0.21) * size
    od_y = center + bg_rng.uniform(-0.03, 0.03) * size
    fovea = (od_x + temporal * _FOVEA_DISTANCE_DD * disc_diameter, od_y)

    d_fovea2 = (xx - fovea[0]) ** 2 + (yy - fovea[1]) ** 2
    macula = 1.0 - 0.32 * np.exp(-d_fovea2 / (2 * (0.4 * disc_diameter) ** 2))
    macula -= 0.10 * np.exp(-d_fovea2 / (2 * (1.1 * disc_diameter) ** 2))
    illumination *= macula
    image = base[None, None, :] * illumination[..., None]

    disc_tall = disc_radius * bg_rng.uniform(1.0, 1.1)  # discs are slightly vertically oval
    # The disc and its glow fit in a box of two disc heights around the centre; work in it only.
    reach = int(math.ceil(2.0 * disc_tall))
    box = (
        slice(max(0, int(od_y) - reach), min(size, int(od_y) + reach + 1)),
        slice(max(0, int(od_x) - reach), min(size, int(od_x) + reach + 1)),
    )
    disc_rho = np.sqrt(
        ((xx[:, box[1]] - od_x) / disc_radius) ** 2 + ((yy[box[0]] - od_y) / disc_tall) ** 2
    )
    od_mask = np.zeros((size, size), bool)
    od_mask[box] = disc_rho <= 1.0
    # The rim is yellow-orange, the central cup near white; a faint glow spills past the margin.
    rim, cup = np.array([242, 190, 112], np.float32), np.array([255, 240, 196], np.float32)
    cup_weight = np.clip(1.0 - disc_rho / 0.45, 0.0, 1.0)[..., None]
    disc_color = rim + (cup - rim) * cup_weight
    disc_alpha = np.clip((1.0 - disc_rho) * disc_radius / 1.5 + 0.5, 0.0, 1.0)
    disc_alpha = np.maximum(disc_alpha, 0.35 * np.exp(-((disc_rho - 1.0) * 3.0) ** 2))[..., None]
    image[box] += (disc_color - image[box]) * disc_alpha

    veins, arteries = _draw_vessel_tree(bg_rng, size, (od_x, od_y), temporal, fov)
    for layer, color in ((veins, (105, 18, 22)), (arteries, (150, 38, 30))):
        alpha = (layer.astype(np.float32) / 255.0 * 0.85)[..., None]
        image += (np.array(color, np.float32) * illumination[..., None] - image) * alpha

    # Luminance-only grain: a third of the cost of per-channel noise and just as good a texture.
    sensor_noise = bg_rng.standard_normal((size, size), dtype=np.float32)[..., None] * 1.8

    masks = {t: np.zeros((size, size), bool) for t in LESION_ABBREVS}
    masks["OD"] = od_mask
    # Lesions stay off the rim, off a ring around the disc and off vessels (where a dark dot
    # would be invisible and its mask ambiguous).
    margin = max(4.0, 0.03 * size)
    disc_keepout = ((xx - od_x) / (disc_radius + margin)) ** 2 + (
        (yy - od_y) / (disc_tall + margin)
    ) ** 2
    allowed = (rho * fov_radius <= fov_radius - margin) & (disc_keepout > 1.0)
    allowed &= (veins < 40) & (arteries < 40)
    canvas = _LesionCanvas(image, allowed, illumination, masks)
    if not healthy:
        _draw_lesions(lesion_rng, canvas, size, fov, fovea, disc_diameter)

    # Anti-aliased FOV edge on black, as a fundus camera's circular aperture.
    fov_alpha = np.clip((fov_radius - rho * fov_radius) / 1.5 + 0.5, 0.0, 1.0)[..., None]
    image = (image + sensor_noise) * fov_alpha
    image = np.clip(image + 0.5, 0, 255).astype(np.uint8)

    counts = dict(canvas.counts)
    counts["OD"] = 1
    return SyntheticFundus(
        image=image,
        masks=masks,
        counts=counts,
        dr_grade=_dr_grade(counts),
        dme_grade=_dme_grade(masks["EX"], fovea, disc_diameter),
        optic_disc_center=(float(od_x), float(od_y)),
        fovea_center=(float(fovea[0]), float(fovea[1])),
    )


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator that :func:`generate_dataset` uses for image ``index`` under ``seed``.

    It is the ``index``-th child of ``SeedSequence(seed)``, so one image can be regenerated without
    rendering the others.

    Args:
        seed: dataset seed (non-negative).
        index: image index (non-negative).

    Returns:
        A fresh ``numpy.random.Generator``.
    """
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(index,)))


def _round_half_up(value: float) -> int:
    return int(math.floor(value + 0.5))


def _write_png(path: str, array: np.ndarray) -> None:
    if not cv2.imwrite(path, array):
        raise OSError(f"could not write {path}")


def generate_dataset(
    root,
    count: int = 16,
    size: int = 512,
    seed: int = 0,
    val_fraction: float = 0.25,
    healthy_fraction: float = 0.125,
) -> Dict[str, List[str]]:
    """Render ``count`` images into ``root`` with masks, grades, landmarks, counts and splits.

    Layout::

        root/images/synth_0000.png            RGB
        root/masks/<ABBREV>/synth_0000.png    uint8 0/255, one folder per LESION_ABBREVS entry
        root/grades.csv                       image,dr_grade,dme_grade
        root/landmarks.csv                    image,od_x,od_y,fovea_x,fovea_y
        root/counts.csv                       image,MA,HE,EX,SE,OD
        root/splits.json                      {"train": [stems], "val": [stems]}

    Image ``i`` is ``render_fundus(image_rng(seed, i), size, healthy)``. Which images are healthy
    and which go to validation is drawn from ``numpy.random.default_rng(seed)``.

    Args:
        root: output folder (str or path-like); created if missing, existing files overwritten.
        count: number of images, at least 1.
        size: image width and height in pixels, at least 128.
        seed: non-negative dataset seed.
        val_fraction: share of images in the validation split, in [0, 1). Rounded half up, at
            least 1 image when ``count >= 2`` and always leaving at least one training image.
        healthy_fraction: share of lesion-free images, in [0, 1]. Rounded half up, and at least
            1 image when ``count >= 4`` and the fraction is positive.

    Returns:
        The splits, ``{"train": [...], "val": [...]}``, each a sorted list of image stems.

    Raises:
        ValueError: for an out-of-range argument.
        OSError: if a PNG cannot be written.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if size < _MIN_SIZE:
        raise ValueError(f"size must be at least {_MIN_SIZE} px, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not 0.0 <= healthy_fraction <= 1.0:
        raise ValueError(f"healthy_fraction must be in [0, 1], got {healthy_fraction}")

    layout_rng = np.random.default_rng(seed)
    n_healthy = _round_half_up(count * healthy_fraction)
    if count >= 4 and healthy_fraction > 0:
        n_healthy = max(1, n_healthy)
    healthy = set(layout_rng.choice(count, size=n_healthy, replace=False).tolist())
    n_val = _round_half_up(count * val_fraction)
    if count >= 2:
        n_val = min(max(1, n_val), count - 1)
    else:
        n_val = 0
    val = set(layout_rng.choice(count, size=n_val, replace=False).tolist())

    root = os.fspath(root)
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir, exist_ok=True)
    for abbrev in LESION_ABBREVS:
        os.makedirs(os.path.join(root, "masks", abbrev), exist_ok=True)

    digits = max(4, len(str(count - 1)))
    grades: List[Tuple] = []
    landmarks: List[Tuple] = []
    counts: List[Tuple] = []
    splits: Dict[str, List[str]] = {"train": [], "val": []}
    for index in range(count):
        stem = f"synth_{index:0{digits}d}"
        fundus = render_fundus(image_rng(seed, index), size=size, healthy=index in healthy)
        _write_png(
            os.path.join(image_dir, stem + ".png"), cv2.cvtColor(fundus.image, cv2.COLOR_RGB2BGR)
        )
        for abbrev in LESION_ABBREVS:
            mask = fundus.masks[abbrev].astype(np.uint8) * 255
            _write_png(os.path.join(root, "masks", abbrev, stem + ".png"), mask)
        grades.append((stem, fundus.dr_grade, fundus.dme_grade))
        (od_x, od_y), (fov_x, fov_y) = fundus.optic_disc_center, fundus.fovea_center
        landmarks.append((stem, f"{od_x:.2f}", f"{od_y:.2f}", f"{fov_x:.2f}", f"{fov_y:.2f}"))
        counts.append((stem, *(fundus.counts[a] for a in LESION_ABBREVS)))
        splits["val" if index in val else "train"].append(stem)

    _write_csv(os.path.join(root, "grades.csv"), ("image", "dr_grade", "dme_grade"), grades)
    _write_csv(
        os.path.join(root, "landmarks.csv"),
        ("image", "od_x", "od_y", "fovea_x", "fovea_y"),
        landmarks,
    )
    _write_csv(os.path.join(root, "counts.csv"), ("image",) + LESION_ABBREVS, counts)
    with open(os.path.join(root, "splits.json"), "w") as f:
        json.dump(splits, f, indent=2)
    return splits


def _write_csv(path: str, header: Tuple[str, ...], rows: List[Tuple]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
