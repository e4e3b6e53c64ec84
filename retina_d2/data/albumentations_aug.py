"""albumentations transforms as Detectron2 augmentations, so masks and instances move with the
image, and the named pipelines of the papers that use them (``RETINA.AUG.ALBUMENTATIONS``).

Detectron2 has no elastic, grid or optical distortion, gamma, HSV shift or noise; albumentations
(MIT) has them all. An albumentations transform draws its parameters once per call and applies
them to the image and to each mask it is given. Here the draw happens in
:meth:`Albumentation.get_transform`, and the parameters are frozen into a Detectron2
``Transform``: the mapper then applies the same parameters to the image, to every semantic target
and to the instance label maps (``apply_segmentation``: albumentations' mask path, nearest
neighbour, fill 0), and to coordinates (``apply_coords``: its keypoint path, for boxes and
landmarks). A non-invertible distortion (elastic, grid, optical) thus moves masks exactly as it
moves the image; its boxes follow the keypoint path only approximately, and the mapper rebuilds
instance boxes from the moved masks (``recompute_boxes``). Pixel-value transforms (brightness,
gamma, HSV, noise, blur) are photometric: masks and coordinates pass through.

Randomness comes from NumPy's global generator, which Detectron2 seeds per data-loader worker:
every draw reseeds the transform's own generators from it, so workers do not repeat each other.
"""
from typing import List, Sequence

import cv2
import numpy as np
from detectron2.data import transforms as T
from detectron2.utils.registry import Registry
from fvcore.transforms.transform import NoOpTransform, Transform

from .preprocess import PhotometricTransform

__all__ = [
    "ALBUMENTATIONS_PIPELINES",
    "Albumentation",
    "AlbumentationsOneOf",
    "AlbumentationsTransform",
    "AlbumentationsPhotometricTransform",
    "build_albumentations",
]

ALBUMENTATIONS_PIPELINES = Registry("ALBUMENTATIONS_PIPELINES")
ALBUMENTATIONS_PIPELINES.__doc__ = """
Named albumentations pipelines (``RETINA.AUG.ALBUMENTATIONS``). Each entry is called with the
image format and returns a list of Detectron2 augmentations.
"""

# albumentations puts pixel j's centre at j, Detectron2 at j + 0.5.
_HALF_PIXEL = 0.5


def _albumentations():
    try:
        import albumentations
    except ImportError as e:  # a clear line rather than a traceback deep in the data loader
        raise ImportError(
            "RETINA.AUG.ALBUMENTATIONS needs the albumentations package (requirements.in): "
            f"pip install albumentations==2.0.8 ({e})"
        ) from None
    return albumentations


def _reseed(transform) -> None:
    transform.set_random_seed(int(np.random.randint(2**31)))


def _draw_params(transform, image: np.ndarray) -> dict:
    """The parameters one call of ``transform`` on ``image`` would use."""
    data = {"image": image}
    params = transform.get_params()
    params = transform.update_transform_params(params=params, data=data)
    params.update(transform.get_params_dependent_on_data(params=params, data=data))
    return params


class AlbumentationsPhotometricTransform(PhotometricTransform):
    """An albumentations pixel-value transform with its drawn parameters: image only."""

    def __init__(self, transform, params: dict):
        super().__init__()
        self._set_attributes(dict(transform=transform, params=params))

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return self.transform.apply(img, **self.params)


class AlbumentationsTransform(Transform):
    """An albumentations geometric transform with its drawn parameters.

    Images through ``apply``, masks through ``apply_to_mask`` (its nearest-neighbour mask path;
    bool masks as uint8), coordinates through ``apply_to_keypoints`` (Detectron2's continuous
    coordinates shifted by half a pixel into albumentations' convention and back).
    """

    def __init__(self, transform, params: dict):
        super().__init__()
        self._set_attributes(dict(transform=transform, params=params))

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return self.transform.apply(img, **self.params)

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        if segmentation.dtype == bool:  # OpenCV has no bool images
            return self.apply_segmentation(segmentation.astype(np.uint8)).astype(bool)
        return self.transform.apply_to_mask(segmentation, **self.params)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        coords = np.asarray(coords, dtype=np.float64)
        if not len(coords):
            return coords.reshape(0, 2)
        # albumentations 2's keypoint rows: x, y, z, angle, scale, then our row index, which it
        # carries along: the distortions drop points they move out of the frame, and Detectron2
        # needs one output per input (a box is 4 corners).
        keypoints = np.zeros((len(coords), 6), dtype=np.float32)
        keypoints[:, :2] = coords - _HALF_PIXEL
        keypoints[:, 4] = 1.0
        keypoints[:, 5] = np.arange(len(coords))
        moved = np.asarray(self.transform.apply_to_keypoints(keypoints, **self.params))
        # A dropped point left the frame: it stays where it was, clipped to the frame's edge
        # (Detectron2 clips boxes to the image; masks carry the geometry that matters).
        out = coords.copy()
        shape = self.params.get("shape")
        if shape is not None:
            out[:, 0] = np.clip(out[:, 0], 0, shape[1])
            out[:, 1] = np.clip(out[:, 1], 0, shape[0])
        if len(moved):
            rows = moved[:, 5].round().astype(np.int64)
            out[rows] = moved[:, :2].astype(np.float64) + _HALF_PIXEL
        return out

    def inverse(self) -> Transform:
        raise NotImplementedError(
            f"{type(self.transform).__name__} from albumentations has no inverse; it is a "
            "training augmentation only"
        )


def _frozen(transform, image: np.ndarray) -> Transform:
    albumentations = _albumentations()
    params = _draw_params(transform, image)
    if isinstance(transform, albumentations.DualTransform):
        return AlbumentationsTransform(transform, params)
    return AlbumentationsPhotometricTransform(transform, params)


class Albumentation(T.Augmentation):
    """One albumentations transform as a Detectron2 augmentation, applied with its own
    probability ``p`` (albumentations' semantics)."""

    def __init__(self, transform):
        super().__init__()
        self.transform = transform

    def get_transform(self, image: np.ndarray) -> Transform:
        _reseed(self.transform)
        if not self.transform.should_apply():
            return NoOpTransform()
        return _frozen(self.transform, image)

    def __repr__(self):
        return f"Albumentation({self.transform!r})"


class AlbumentationsOneOf(T.Augmentation):
    """albumentations' ``OneOf``: with probability ``p``, one of ``transforms``, picked with
    probabilities proportional to their own ``p``, applied for certain."""

    def __init__(self, transforms: Sequence, p: float = 0.5):
        super().__init__()
        self.transforms = list(transforms)
        weights = np.array([t.p for t in self.transforms], dtype=np.float64)
        if not len(weights) or weights.sum() <= 0:
            raise ValueError("AlbumentationsOneOf needs transforms with a positive p")
        self.weights = weights / weights.sum()
        self.p = float(p)

    def get_transform(self, image: np.ndarray) -> Transform:
        if np.random.rand() >= self.p:
            return NoOpTransform()
        chosen = self.transforms[int(np.random.choice(len(self.transforms), p=self.weights))]
        _reseed(chosen)
        return _frozen(chosen, image)

    def __repr__(self):
        return f"AlbumentationsOneOf({self.transforms!r}, p={self.p})"


def build_albumentations(name: str, image_format: str) -> List[T.Augmentation]:
    """The augmentations of the pipeline registered as ``name`` ("" = none).

    Raises:
        KeyError: naming the registered pipelines, for an unknown name.
    """
    if not name:
        return []
    if name not in ALBUMENTATIONS_PIPELINES:
        raise KeyError(
            f"RETINA.AUG.ALBUMENTATIONS {name!r} is not a registered pipeline; registered: "
            f"{sorted(k for k, _ in ALBUMENTATIONS_PIPELINES)}"
        )
    return ALBUMENTATIONS_PIPELINES.get(name)(image_format)


# The CBAM-DeepLab paper's numbers (papers/cbam-deeplab-ddr.txt, section "Data Preprocessing").
CBAM_DEEPLAB_DDR = {
    "flip_p": 0.5,  # horizontal and vertical, each
    "rot90_p": 0.5,
    "shift": 0.0625, "scale": 0.1, "rotate": 15.0, "shift_scale_rotate_p": 0.5,
    "colour_one_of_p": 0.5,
    "brightness": 0.2, "contrast": 0.2, "brightness_contrast_p": 0.4,
    "gamma": (80, 120), "gamma_p": 0.4,  # 0.8-1.2, in albumentations' percent
    "hue": 10, "saturation": 15, "value": 10, "hsv_p": 0.4,
    "noise_variance": (10.0, 50.0), "noise_p": 0.15,  # of 0-255 pixel values
    "blur_kernel": 3, "blur_p": 0.15,
    "distortion_one_of_p": 0.3,
    "elastic_alpha": 1.0, "elastic_sigma": 50.0, "elastic_p": 0.15,
    "grid_p": 0.15,
    "optical_distort": 1.0, "optical_p": 0.15,
}


@ALBUMENTATIONS_PIPELINES.register()
def cbam_deeplab_ddr(image_format: str) -> List[T.Augmentation]:
    """CBAM-DeepLab's augmentation list, in the paper's order and with its probabilities.

    Where albumentations 2.0 differs from the library the paper used: ShiftScaleRotate is
    Affine (the same map); GaussNoise takes a standard deviation as a fraction of 255, given here
    as sqrt(variance) / 255; OpticalDistortion has no shift_limit any more (the paper's 0.5 is
    dropped; the 1.0 distortion limit is kept).
    """
    if image_format != "RGB":
        raise ValueError(
            f"the cbam_deeplab_ddr pipeline shifts hue and saturation, which needs RGB images "
            f"(INPUT.FORMAT 'RGB'), got {image_format!r}"
        )
    A = _albumentations()
    c = CBAM_DEEPLAB_DDR
    border = {"border_mode": cv2.BORDER_CONSTANT, "fill": 0, "fill_mask": 0}
    std = tuple(float(np.sqrt(v)) / 255.0 for v in c["noise_variance"])
    return [
        Albumentation(A.HorizontalFlip(p=c["flip_p"])),
        Albumentation(A.VerticalFlip(p=c["flip_p"])),
        Albumentation(A.RandomRotate90(p=c["rot90_p"])),
        Albumentation(
            A.Affine(
                translate_percent=(-c["shift"], c["shift"]),
                scale=(1 - c["scale"], 1 + c["scale"]),
                rotate=(-c["rotate"], c["rotate"]),
                p=c["shift_scale_rotate_p"],
                **border,
            )
        ),
        AlbumentationsOneOf(
            [
                A.RandomBrightnessContrast(
                    brightness_limit=c["brightness"], contrast_limit=c["contrast"],
                    p=c["brightness_contrast_p"],
                ),
                A.RandomGamma(gamma_limit=c["gamma"], p=c["gamma_p"]),
                A.HueSaturationValue(
                    hue_shift_limit=c["hue"], sat_shift_limit=c["saturation"],
                    val_shift_limit=c["value"], p=c["hsv_p"],
                ),
            ],
            p=c["colour_one_of_p"],
        ),
        Albumentation(A.GaussNoise(std_range=std, p=c["noise_p"])),
        Albumentation(A.GaussianBlur(blur_limit=(c["blur_kernel"],) * 2, p=c["blur_p"])),
        AlbumentationsOneOf(
            [
                A.ElasticTransform(
                    alpha=c["elastic_alpha"], sigma=c["elastic_sigma"], p=c["elastic_p"], **border
                ),
                A.GridDistortion(p=c["grid_p"], **border),
                A.OpticalDistortion(distort_limit=c["optical_distort"], p=c["optical_p"], **border),
            ],
            p=c["distortion_one_of_p"],
        ),
    ]
