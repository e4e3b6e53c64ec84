"""Fundus preprocessing and augmentation as Detectron2 augmentations and transforms.

Every geometric transform here maps images, instance masks (``apply_segmentation``) and
coordinates (``apply_coords``, hence boxes and polygons) identically, in Detectron2's convention:
a coordinate is continuous, pixel ``(row i, col j)`` covers ``[j, j + 1] x [i, i + 1]``. The
photometric ones change only the image and leave masks and coordinates as they are.

:func:`build_preprocess` assembles the pipeline from ``cfg.RETINA.PREPROCESS``,
``cfg.RETINA.AUG`` and ``cfg.INPUT``::

    FieldOfViewCrop -> FieldOfViewCircleMask -> ResizeShortestEdge or FieldOfViewResize
    -> GrahamNormalization
    -> ClaheOnLightness -> FrameMargin -> (train) RandomCrop or RandomLesionCrop -> RandomFlip x2 -> RandomRotation90 -> RandomRotation -> RandomTranslateScale
    -> RandomBrightness / RandomContrast / RandomSaturation -> RETINA.AUG.ALBUMENTATIONS' pipeline
"""
from typing import List, Optional, Tuple

import cv2
import numpy as np
from detectron2.data import transforms as T
from fvcore.transforms.transform import CropTransform, NoOpTransform, Transform

__all__ = [
    "PhotometricTransform",
    "FieldOfViewCropTransform",
    "CircleMaskTransform",
    "GrahamTransform",
    "ClaheTransform",
    "Rotation90Transform",
    "TranslateScaleTransform",
    "FieldOfViewCrop",
    "FieldOfViewCircleMask",
    "FieldOfViewResize",
    "field_of_view_diameter",
    "wide_gaussian_blur",
    "GrahamNormalization",
    "ClaheOnLightness",
    "RandomRotation90",
    "RandomTranslateScale",
    "RandomLesionCrop",
    "FrameMarginTransform",
    "FrameMargin",
    "field_of_view_box",
    "build_preprocess",
]

# Bright components at least this fraction of the largest one belong to the FOV too: a dark band
# can split a poorly lit FOV, while JPEG specks and camera captions are far smaller.
_FOV_FRAGMENT_FRACTION = 0.01


# --------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------


def _check_colour_format(image_format: str) -> None:
    if image_format not in ("RGB", "BGR"):
        raise ValueError(f"CLAHE on lightness needs an RGB or BGR image, got {image_format!r}")


class PhotometricTransform(Transform):
    """Base of the transforms of pixel values only: coordinates and masks pass through."""

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation

    def inverse(self) -> Transform:
        # fvcore's contract: the inverse undoes geometry only, so a photometric one is a no-op.
        return NoOpTransform()


class FieldOfViewCropTransform(CropTransform):
    """The crop to the field of view; a distinct type so that the mapper can find it.

    Same arguments as fvcore's ``CropTransform``; ``orig_w``/``orig_h`` make it invertible.
    """

    @property
    def box(self) -> Tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` of the crop in the pixels of the image it crops."""
        return (self.x0, self.y0, self.x0 + self.w, self.y0 + self.h)


class CircleMaskTransform(PhotometricTransform):
    """Blank (set to ``fill``) the pixels of an ``h x w`` image whose centre lies outside a circle.

    Args:
        h, w: image size.
        center_x, center_y: circle centre in continuous coordinates.
        radius: circle radius in pixels.
        fill: value of the blanked pixels.
    """

    def __init__(
        self, h: int, w: int, center_x: float, center_y: float, radius: float, fill: int = 0
    ):
        super().__init__()
        self._set_attributes(
            dict(
                h=h,
                w=w,
                center_x=float(center_x),
                center_y=float(center_y),
                radius=float(radius),
                fill=fill,
            )
        )

    def inside(self) -> np.ndarray:
        """``h x w`` bool: the pixels kept."""
        yy, xx = np.ogrid[0 : self.h, 0 : self.w]
        dist2 = (xx + 0.5 - self.center_x) ** 2 + (yy + 0.5 - self.center_y) ** 2
        return dist2 <= self.radius**2

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        assert img.shape[:2] == (self.h, self.w), (img.shape, self.h, self.w)
        out = img.copy()
        out[~self.inside()] = self.fill
        return out


# A Gaussian this wide (in pixels) is smooth enough to compute on a grid this much coarser.
_BLUR_SIGMA_PER_COARSE_PIXEL = 8.0


def wide_gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """``cv2.GaussianBlur(image, (0, 0), sigma)`` within half a grey level, many times faster.

    At native resolution Graham's sigma is 40 px or more and an exact blur of a 2000 px eye takes
    close to a second; the blurred image has no detail finer than sigma, so it is computed on a
    grid ``sigma / 8`` times coarser (area-averaged down, bilinear back up).
    """
    factor = int(sigma // _BLUR_SIGMA_PER_COARSE_PIXEL)
    h, w = image.shape[:2]
    if factor < 2:
        return cv2.GaussianBlur(image, (0, 0), sigma)
    # Mirror the border at full resolution first: mirroring on the coarse grid would put the
    # mirror half a coarse pixel away and shift the blur near the image's edges.
    # The bottom and right get a few more rows and columns so that the coarse grid's cells are
    # exactly `factor` pixels: a fractional scale would shift the blur.
    pad = int(np.ceil(3 * sigma / factor)) * factor
    extra_h, extra_w = -(h + 2 * pad) % factor, -(w + 2 * pad) % factor
    padded = cv2.copyMakeBorder(
        image, pad, pad + extra_h, pad, pad + extra_w, cv2.BORDER_REFLECT_101
    )
    ph, pw = padded.shape[:2]
    small = cv2.resize(padded, (pw // factor, ph // factor), interpolation=cv2.INTER_AREA)
    # The area average is a box of width `factor`: take its variance out of the Gaussian's.
    small_sigma = np.sqrt(sigma**2 - factor**2 / 12.0) / factor
    blur = cv2.GaussianBlur(small, (0, 0), small_sigma)
    blur = cv2.resize(blur, (pw, ph), interpolation=cv2.INTER_LINEAR)
    return blur[pad : pad + h, pad : pad + w]


class GrahamTransform(PhotometricTransform):
    """Graham's local-average subtraction: ``clip(4 * img - 4 * GaussianBlur(img, sigma) + 128)``.

    It removes uneven illumination and amplifies local contrast (B. Graham, Kaggle DR 2015; the
    e-ophtha Mask R-CNN paper's preprocessing). Output is uint8; a uniform image maps to 128.
    """

    def __init__(self, sigma: float):
        super().__init__()
        self._set_attributes(dict(sigma=float(sigma)))

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        # Blur in float: rounding a uint8 blur would be amplified four times.
        image = img.astype(np.float32)
        blur = wide_gaussian_blur(image, self.sigma).reshape(image.shape)
        out = np.clip(4.0 * image - 4.0 * blur + 128.0, 0.0, 255.0)
        return np.rint(out).astype(np.uint8).reshape(img.shape)


class FrameMarginTransform(PhotometricTransform):
    """Set a band of ``margin`` pixels along the image's four edges to ``value``."""

    def __init__(self, margin: int, value: int):
        super().__init__()
        self._set_attributes(dict(margin=int(margin), value=int(value)))

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        m = self.margin
        if m <= 0:
            return img
        out = img.copy()
        out[:m], out[-m:], out[:, :m], out[:, -m:] = self.value, self.value, self.value, self.value
        return out


class ClaheTransform(PhotometricTransform):
    """CLAHE on the lightness (L of CIE Lab) of a uint8 colour image; hue and chroma are kept.

    Args:
        clip_limit: OpenCV's CLAHE contrast limit.
        tile_grid: tiles per side of the CLAHE grid.
        image_format: channel order of the image, "RGB" or "BGR".
    """

    def __init__(self, clip_limit: float, tile_grid: int, image_format: str = "RGB"):
        super().__init__()
        _check_colour_format(image_format)
        self._set_attributes(
            dict(clip_limit=float(clip_limit), tile_grid=int(tile_grid), image_format=image_format)
        )

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, (img.dtype, img.shape)
        to_lab, from_lab = (
            (cv2.COLOR_RGB2LAB, cv2.COLOR_LAB2RGB)
            if self.image_format == "RGB"
            else (cv2.COLOR_BGR2LAB, cv2.COLOR_LAB2BGR)
        )
        lab = cv2.cvtColor(np.ascontiguousarray(img), to_lab)
        clahe = cv2.createCLAHE(clipLimit=self.clip_limit, tileGridSize=(self.tile_grid,) * 2)
        lab[..., 0] = clahe.apply(np.ascontiguousarray(lab[..., 0]))
        return cv2.cvtColor(lab, from_lab)


class Rotation90Transform(Transform):
    """Rotate by ``k`` quarter turns counter-clockwise (as ``np.rot90``), exactly, no resampling.

    Args:
        h, w: size of the input image; the output is ``w x h`` for odd ``k``.
        k: number of quarter turns (taken modulo 4).
    """

    def __init__(self, h: int, w: int, k: int):
        super().__init__()
        self._set_attributes(dict(h=h, w=w, k=int(k) % 4))

    @property
    def output_size(self) -> Tuple[int, int]:
        """``(height, width)`` of the output."""
        return (self.w, self.h) if self.k % 2 else (self.h, self.w)

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        assert img.shape[:2] == (self.h, self.w), (img.shape, self.h, self.w)
        return np.ascontiguousarray(np.rot90(img, self.k, axes=(0, 1)))

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        coords = np.asarray(coords, dtype=np.float64)
        x, y = coords[:, 0].copy(), coords[:, 1].copy()
        if self.k == 1:  # np.rot90: new[i, j] = old[j, w - 1 - i]
            coords[:, 0], coords[:, 1] = y, self.w - x
        elif self.k == 2:
            coords[:, 0], coords[:, 1] = self.w - x, self.h - y
        elif self.k == 3:
            coords[:, 0], coords[:, 1] = self.h - y, x
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return self.apply_image(segmentation)

    def inverse(self) -> Transform:
        return Rotation90Transform(*self.output_size, k=(4 - self.k) % 4)


class TranslateScaleTransform(Transform):
    """Scale about the image centre, then shift; the output keeps the input's size.

    ``x' = scale * (x - w / 2) + w / 2 + shift_x`` (likewise for y). Images are resampled with
    ``interp`` (bilinear by default), masks with nearest neighbour; what enters from outside is
    ``fill``. Boxes follow through their corners (fvcore's ``apply_box``), which is exact for this
    axis-aligned map.

    Args:
        h, w: image size.
        scale: zoom factor (> 1 enlarges).
        shift_x, shift_y: shift in pixels, applied after scaling.
        interp: OpenCV interpolation flag for images.
        fill: value of the pixels that come from outside the input.
    """

    def __init__(
        self,
        h: int,
        w: int,
        scale: float,
        shift_x: float,
        shift_y: float,
        interp: int = cv2.INTER_LINEAR,
        fill: int = 0,
    ):
        super().__init__()
        self._set_attributes(
            dict(
                h=h,
                w=w,
                scale=float(scale),
                shift_x=float(shift_x),
                shift_y=float(shift_y),
                interp=interp,
                fill=fill,
            )
        )

    def _matrix(self, pixel_centres: bool) -> np.ndarray:
        """The 2x3 affine map, for continuous coordinates or for OpenCV's pixel indices.

        OpenCV puts pixel ``j``'s centre at ``j`` where Detectron2 puts it at ``j + 0.5``, so the
        warp's centre of scaling moves by half a pixel (cf. Detectron2's RotationTransform).
        """
        offset = 0.5 if pixel_centres else 0.0
        s = self.scale
        tx = (1.0 - s) * (self.w / 2.0 - offset) + self.shift_x
        ty = (1.0 - s) * (self.h / 2.0 - offset) + self.shift_y
        return np.array([[s, 0.0, tx], [0.0, s, ty]], dtype=np.float64)

    def _warp(self, img: np.ndarray, interp: int) -> np.ndarray:
        assert img.shape[:2] == (self.h, self.w), (img.shape, self.h, self.w)
        out = cv2.warpAffine(
            np.ascontiguousarray(img),
            self._matrix(pixel_centres=True),
            (self.w, self.h),
            flags=interp,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=self.fill,
        )
        return out.reshape(img.shape)  # OpenCV drops a trailing channel axis of size 1

    def apply_image(self, img: np.ndarray, interp: Optional[int] = None) -> np.ndarray:
        return self._warp(img, self.interp if interp is None else interp)

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        if segmentation.dtype == bool:  # OpenCV has no bool images
            return self._warp(segmentation.astype(np.uint8), cv2.INTER_NEAREST).astype(bool)
        return self._warp(segmentation, cv2.INTER_NEAREST)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        matrix = self._matrix(pixel_centres=False)
        coords = np.asarray(coords, dtype=np.float64)
        return coords @ matrix[:, :2].T + matrix[:, 2]

    def inverse(self) -> Transform:
        s = self.scale
        return TranslateScaleTransform(
            self.h, self.w, 1.0 / s, -self.shift_x / s, -self.shift_y / s, self.interp, self.fill
        )


# --------------------------------------------------------------------------------------------
# Augmentations
# --------------------------------------------------------------------------------------------


def field_of_view_box(
    image: np.ndarray, threshold: float, min_area_fraction: float = 0.1
) -> Optional[Tuple[int, int, int, int]]:
    """The bounding box of the field of view: the bright region of a fundus photograph.

    A pixel is bright when its largest channel exceeds ``threshold``. The FOV is the largest
    8-connected bright region together with any bright region at least 1% of its size; isolated
    specks (JPEG noise in the black border) and small captions are ignored.

    Args:
        image: ``HxW`` or ``HxWxC`` image.
        threshold: darkest value (0-255) that still counts as the FOV, exclusive.
        min_area_fraction: below this fraction of the image the bright region is not taken for a
            FOV (a very dark photograph, say) and None is returned.

    Returns:
        ``(x0, y0, x1, y1)`` in pixels (``x1``, ``y1`` exclusive), or None if no FOV was found.
    """
    if image.ndim == 3:
        # Channel by channel: numpy's max over a last axis of 3 is ten times slower.
        bright = image[..., 0]
        for channel in range(1, image.shape[2]):
            bright = np.maximum(bright, image[..., channel])
    else:
        bright = image
    bright = (bright > threshold).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(bright, connectivity=8)
    if count <= 1:
        return None
    stats = stats[1:]  # label 0 is the dark background
    areas = stats[:, cv2.CC_STAT_AREA]
    if areas.max() < min_area_fraction * bright.size:
        return None
    parts = stats[areas >= _FOV_FRAGMENT_FRACTION * areas.max()]
    x0 = parts[:, cv2.CC_STAT_LEFT]
    y0 = parts[:, cv2.CC_STAT_TOP]
    x1 = x0 + parts[:, cv2.CC_STAT_WIDTH]
    y1 = y0 + parts[:, cv2.CC_STAT_HEIGHT]
    return int(x0.min()), int(y0.min()), int(x1.max()), int(y1.max())


class FieldOfViewCrop(T.Augmentation):
    """Crop the black border around the field of view ("crop black border" of the e-ophtha paper).

    Returns a :class:`FieldOfViewCropTransform`, or a no-op when the FOV fills the frame or none
    is found. Boxes given with the input (the annotations' in training) are kept whole: the crop
    grows to contain them, so that a lesion on a dark rim is never cut.

    Args:
        threshold: see :func:`field_of_view_box`.
        min_area_fraction: see :func:`field_of_view_box`.
    """

    def __init__(self, threshold: float = 20, min_area_fraction: float = 0.1):
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray, boxes: Optional[np.ndarray]) -> Transform:
        h, w = image.shape[:2]
        box = field_of_view_box(image, self.threshold, self.min_area_fraction)
        if box is None:
            return NoOpTransform()
        x0, y0, x1, y1 = box
        if boxes is not None and len(boxes):
            boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
            x0 = min(x0, max(0, int(np.floor(boxes[:, 0].min()))))
            y0 = min(y0, max(0, int(np.floor(boxes[:, 1].min()))))
            x1 = max(x1, min(w, int(np.ceil(boxes[:, 2].max()))))
            y1 = max(y1, min(h, int(np.ceil(boxes[:, 3].max()))))
        if (x0, y0, x1, y1) == (0, 0, w, h):
            return NoOpTransform()
        return FieldOfViewCropTransform(x0, y0, x1 - x0, y1 - y0, orig_w=w, orig_h=h)


class FieldOfViewCircleMask(T.Augmentation):
    """Blank what lies outside the circle of the field of view ("circle the eye").

    The circle is centred on the FOV's box (:func:`field_of_view_box`) and its diameter is the
    box's longer side: a FOV that the camera truncated at the top and bottom still spans its full
    diameter across. Taking the box anew, rather than the crop's frame, keeps the circle on the
    eye when the crop grew to keep an annotation. Returns a no-op when no FOV is found.

    Args:
        threshold: see :func:`field_of_view_box`.
        min_area_fraction: see :func:`field_of_view_box`.
        margin: pixels kept outside the circle: the thresholded box can miss the anti-aliased rim
            by a pixel.
    """

    def __init__(self, threshold: float = 20, min_area_fraction: float = 0.1, margin: float = 1.0):
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> Transform:
        box = field_of_view_box(image, self.threshold, self.min_area_fraction)
        if box is None:
            return NoOpTransform()
        x0, y0, x1, y1 = box
        radius = max(x1 - x0, y1 - y0) / 2.0 + self.margin
        h, w = image.shape[:2]
        return CircleMaskTransform(h, w, (x0 + x1) / 2.0, (y0 + y1) / 2.0, radius)


def field_of_view_diameter(
    image: np.ndarray, threshold: float, min_area_fraction: float = 0.1
) -> Optional[float]:
    """The field of view's diameter in pixels: the longer side of its box
    (:func:`field_of_view_box`; a FOV the camera truncated at the top and bottom still spans its
    diameter across), or None when no FOV is found."""
    box = field_of_view_box(image, threshold, min_area_fraction)
    if box is None:
        return None
    x0, y0, x1, y1 = box
    return float(max(x1 - x0, y1 - y0))


class FieldOfViewResize(T.Augmentation):
    """Resize so that the field of view is ``diameter`` pixels across, whatever the camera.

    Cameras differ in resolution and field of view (HEI-MED's FOV is ~1950 px across,
    DIARETDB1's ~1420, IDRiD's ~3400), so a lesion of one physical size differs in pixels between
    them; measured against the eye itself, it does not. Returns Detectron2's
    :class:`~detectron2.data.transforms.ResizeTransform`, so annotations follow through
    Detectron2's own machinery, and at inference the model's postprocessing
    (``detector_postprocess`` / ``sem_seg_postprocess`` to the record's size) maps predictions
    back to the photograph's pixels. Without a FOV, the image's longer side is taken for it.

    Args:
        diameter: the FOV's diameter after resizing, in pixels.
        threshold: see :func:`field_of_view_box`.
        min_area_fraction: see :func:`field_of_view_box`.
    """

    def __init__(self, diameter: int, threshold: float = 20, min_area_fraction: float = 0.1):
        super().__init__()
        if diameter <= 0:
            raise ValueError(f"RETINA.PREPROCESS.FOV_DIAMETER must be > 0 here, got {diameter}")
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> Transform:
        h, w = image.shape[:2]
        # Measured on every 4th pixel: the FOV's components at full resolution cost a tenth of a
        # second per photograph, and the diameter is then still known within 0.5%.
        step = 4 if min(h, w) >= 512 else 1
        measured = field_of_view_diameter(
            image[::step, ::step], self.threshold, self.min_area_fraction
        )
        scale = self.diameter / (measured * step if measured else max(h, w))
        new_h, new_w = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        if (new_h, new_w) == (h, w):
            return NoOpTransform()
        return T.ResizeTransform(h, w, new_h, new_w)


class GrahamNormalization(T.Augmentation):
    """Graham normalisation with a blur scaled to the image: ``sigma_at_1024 * width / 1024``.

    Applied to an image cropped to its FOV, the blur spans the same fraction of the eye at every
    resolution.
    """

    def __init__(self, sigma_at_1024: float = 20.0):
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> Transform:
        return GrahamTransform(self.sigma_at_1024 * image.shape[1] / 1024.0)


class ClaheOnLightness(T.Augmentation):
    """CLAHE on the L channel of Lab; see :class:`ClaheTransform`."""

    def __init__(self, clip_limit: float = 2.0, tile_grid: int = 8, image_format: str = "RGB"):
        super().__init__()
        _check_colour_format(image_format)  # fail when the pipeline is built, not mid-training
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> Transform:
        return ClaheTransform(self.clip_limit, self.tile_grid, self.image_format)


class FrameMargin(T.Augmentation):
    """:class:`FrameMarginTransform` with the band a fraction of the image's width."""

    def __init__(self, fraction: float, value: int):
        super().__init__()
        if not 0 <= fraction < 0.5:
            raise ValueError(f"RETINA.PREPROCESS.FRAME_MARGIN must be in [0, 0.5), got {fraction}")
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> Transform:
        return FrameMarginTransform(round(self.fraction * image.shape[1]), self.value)


class RandomRotation90(T.Augmentation):
    """Rotate by a random multiple of 90 degrees (0, 90, 180 or 270, equally likely)."""

    def __init__(self):
        super().__init__()

    def get_transform(self, image: np.ndarray) -> Transform:
        h, w = image.shape[:2]
        return Rotation90Transform(h, w, k=int(np.random.randint(4)))


class RandomTranslateScale(T.Augmentation):
    """A random zoom about the centre and shift, keeping the image size.

    Args:
        max_shift_fraction: largest shift, as a fraction of the image's width (x) and height (y).
        scale_range: ``(min, max)`` of the uniformly drawn zoom factor.
    """

    def __init__(self, max_shift_fraction: float, scale_range: Tuple[float, float]):
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> Transform:
        h, w = image.shape[:2]
        scale = np.random.uniform(*self.scale_range)
        f = self.max_shift_fraction
        shift_x, shift_y = np.random.uniform(-f, f, size=2) * (w, h)
        return TranslateScaleTransform(h, w, scale, shift_x, shift_y)


class RandomLesionCrop(T.Augmentation):
    """A random crop that, with probability ``lesion_prob``, holds the centre of a random lesion.

    At native resolution a 512 px crop covers a few percent of a fundus image, and a uniform crop
    usually lands on healthy retina: centring some crops on lesions gives every step positives to
    learn from, while the uniform ones keep the background (vessels, optic disc, reflections) that
    false alarms come from.

    Args:
        crop_type, crop_size: as Detectron2's :class:`RandomCrop` (``cfg.INPUT.CROP``).
        lesion_prob: share of crops drawn around a lesion when the image has any.
    """

    def __init__(self, crop_type: str, crop_size, lesion_prob: float):
        super().__init__()
        if not 0.0 <= lesion_prob <= 1.0:
            raise ValueError(f"lesion_prob must be in [0, 1], got {lesion_prob}")
        self._sizer = T.RandomCrop(crop_type, crop_size)
        self._init(locals())

    def get_transform(self, image: np.ndarray, boxes: Optional[np.ndarray]) -> Transform:
        h, w = image.shape[:2]
        ch, cw = self._sizer.get_crop_size((h, w))
        ch, cw = min(ch, h), min(cw, w)
        x0 = np.random.randint(w - cw + 1)
        y0 = np.random.randint(h - ch + 1)
        if boxes is not None and len(boxes) and np.random.rand() < self.lesion_prob:
            x1, y1, x2, y2 = boxes[np.random.randint(len(boxes))]
            cx = int(np.clip((x1 + x2) / 2, 0, w - 1))
            cy = int(np.clip((y1 + y2) / 2, 0, h - 1))
            # Any window holding pixel (cx, cy), uniformly: the lesion is not always central.
            x0 = np.random.randint(max(0, cx - cw + 1), min(cx, w - cw) + 1)
            y0 = np.random.randint(max(0, cy - ch + 1), min(cy, h - ch) + 1)
        return CropTransform(int(x0), int(y0), int(cw), int(ch))


# --------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------


def _resize(cfg, is_train: bool) -> Optional[T.Augmentation]:
    """Detectron2's shortest-edge resize from ``cfg.INPUT``, or None when the size is 0."""
    if is_train:
        sizes = cfg.INPUT.MIN_SIZE_TRAIN
        max_size, sample_style = cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
    else:
        sizes, max_size, sample_style = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice"
    sizes = tuple(sizes) if isinstance(sizes, (list, tuple)) else (sizes,)
    if not any(sizes):
        return None
    return T.ResizeShortestEdge(sizes, max_size, sample_style)


def _colour_jitter(aug_cfg) -> List[T.Augmentation]:
    jitter = []
    for aug_class, intensity in (
        (T.RandomBrightness, aug_cfg.BRIGHTNESS),
        (T.RandomContrast, aug_cfg.CONTRAST),
        (T.RandomSaturation, aug_cfg.SATURATION),
    ):
        low, high = intensity
        if (low, high) != (1, 1):
            jitter.append(aug_class(low, high))
    return jitter


def build_preprocess(cfg, is_train: bool) -> List[T.Augmentation]:
    """The preprocessing (train and test) and augmentation (train only) of ``cfg``.

    Args:
        cfg: a config with retina_d2's keys (``add_retina_config``).
        is_train: add the random augmentations of ``cfg.RETINA.AUG``.

    Returns:
        The augmentations, in the order they apply.
    """
    pre, aug = cfg.RETINA.PREPROCESS, cfg.RETINA.AUG
    augs: List[T.Augmentation] = []
    if pre.FOV_CROP:
        augs += [FieldOfViewCrop(pre.FOV_THRESHOLD), FieldOfViewCircleMask(pre.FOV_THRESHOLD)]
    # A FOV diameter takes the place of INPUT's shortest-edge resize: one scale per image.
    resize = (
        FieldOfViewResize(pre.FOV_DIAMETER, pre.FOV_THRESHOLD)
        if pre.FOV_DIAMETER > 0
        else _resize(cfg, is_train)
    )
    if resize is not None:
        augs.append(resize)
    # After the resize: Graham's sigma is relative to the width the network sees, and CLAHE's
    # tiles cover the same part of the eye whatever the source resolution.
    if pre.GRAHAM:
        augs.append(GrahamNormalization(pre.GRAHAM_SIGMA))
    if pre.CLAHE:
        augs.append(ClaheOnLightness(pre.CLAHE_CLIP_LIMIT, pre.CLAHE_TILE_GRID, cfg.INPUT.FORMAT))
    if pre.FRAME_MARGIN > 0:
        augs.append(FrameMargin(pre.FRAME_MARGIN, 128 if pre.GRAHAM else 0))
    if not is_train:
        return augs
    if cfg.INPUT.CROP.ENABLED:
        # After Graham, whose sigma follows the whole eye's width, not the crop's: random crops
        # keep lesions at full size while a step costs what a small image costs.
        if aug.CROP_LESION_PROB > 0:
            augs.append(
                RandomLesionCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE, aug.CROP_LESION_PROB)
            )
        else:
            augs.append(T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
    if aug.HFLIP:
        augs.append(T.RandomFlip(horizontal=True, vertical=False))
    if aug.VFLIP:
        augs.append(T.RandomFlip(horizontal=False, vertical=True))
    if aug.ROT90:
        augs.append(RandomRotation90())
    if aug.ROTATION > 0:
        # Any angle: Detectron2's rotation keeps the size, masks nearest-neighbour, corners black.
        augs.append(T.RandomRotation([-aug.ROTATION, aug.ROTATION], expand=False))
    if aug.TRANSLATE > 0 or tuple(aug.SCALE) != (1, 1):
        augs.append(RandomTranslateScale(aug.TRANSLATE, tuple(aug.SCALE)))
    augs += _colour_jitter(aug)
    if aug.ALBUMENTATIONS:
        from .albumentations_aug import build_albumentations  # albumentations only when asked

        augs += build_albumentations(aug.ALBUMENTATIONS, cfg.INPUT.FORMAT)
    return augs
