"""Preprocessing and augmentation: every geometric transform moves masks with the image.

The check is independent of the transforms' own code: lesion pixels are painted in a colour that
appears nowhere else (cyan on an orange fundus on black), so after any transform the image itself
says where the lesions went, and the transformed mask must cover exactly those pixels, up to the
band at the edges that bilinear resampling blends.
"""
import cv2
import numpy as np
import pytest
from detectron2.data import transforms as T
from fvcore.transforms.transform import NoOpTransform
from scipy import ndimage

from retina_d2.config import get_retina_cfg
from retina_d2.data.preprocess import (
    CircleMaskTransform,
    ClaheOnLightness,
    ClaheTransform,
    FieldOfViewCircleMask,
    FieldOfViewCrop,
    FieldOfViewCropTransform,
    FrameMargin,
    FrameMarginTransform,
    GrahamNormalization,
    GrahamTransform,
    RandomLesionCrop,
    RandomRotation90,
    RandomTranslateScale,
    Rotation90Transform,
    TranslateScaleTransform,
    build_preprocess,
    field_of_view_box,
)
from retina_d2.data.synthetic import render_fundus

# Detectron2's ResizeTransform returns PIL's read-only buffer and fvcore's VFlipTransform hands it
# to torch.from_numpy, which warns although nothing writes to it.
pytestmark = pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")

LESION_RGB = (0, 255, 255)  # cyan: no fundus pixel (orange-red) or border pixel (black) is near it
FOV_RADIUS = 0.46  # of the shorter side, as in retina_d2.data.synthetic


# --------------------------------------------------------------------------------------------
# Helpers (test_mapper.py uses them too)
# --------------------------------------------------------------------------------------------


def lesion_scene(height, width, seed=0, count=6):
    """An orange FOV disc on black with ``count`` cyan blobs in its central half.

    Returns:
        ``(image, mask)``: HxWx3 uint8 RGB and HxW bool, ``mask`` exactly the cyan pixels. Blobs
        are separate 8-connected components, far enough inside that a 10% shift and 1.1 zoom keep
        them in the frame.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    cx, cy, radius = (width - 1) / 2, (height - 1) / 2, FOV_RADIUS * min(height, width)
    fov = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
    image = np.zeros((height, width, 3), np.uint8)
    # A gradient, so that a wrong geometry would also show in the background.
    image[fov] = np.stack(
        [np.full(fov.sum(), 200), 80 + 60 * xx[fov] / width, 30 + 50 * yy[fov] / height], axis=1
    ).astype(np.uint8)
    mask = np.zeros((height, width), bool)
    largest = int(np.clip(radius / 6, 4, 9))
    placed = 0
    for _ in range(200 * count):
        blob = np.zeros((height, width), np.uint8)
        r = rng.uniform(0.05, 0.5) * radius
        angle = rng.uniform(0, 2 * np.pi)
        centre = (int(cx + r * np.cos(angle)), int(cy + r * np.sin(angle)))
        axes = (int(rng.integers(3, largest + 1)), int(rng.integers(3, largest + 1)))
        cv2.ellipse(blob, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        grown = cv2.dilate(blob, np.ones((5, 5), np.uint8)).astype(bool)
        if not (grown & mask).any():  # keep blobs apart: one component per lesion
            mask |= blob.astype(bool)
            placed += 1
            if placed == count:
                break
    assert placed == count, f"no room for {count} lesions in {height}x{width}"
    image[mask] = LESION_RGB
    return image, mask


def lesion_colour(image):
    """Where an RGB image shows the lesion colour (blue high: neither orange nor black)."""
    return image[..., 2] > 160


def assert_mask_matches_colour(image, mask, band=1):
    """``mask`` covers the lesion-coloured pixels of ``image``, except within ``band`` px of its
    edge, where interpolation blends colours."""
    mask = np.asarray(mask, bool)
    colour = lesion_colour(image)
    assert mask.any() and colour.any()
    kernel = np.ones((2 * band + 1,) * 2, np.uint8)
    m = mask.astype(np.uint8)
    edge = cv2.dilate(m, kernel).astype(bool) & ~cv2.erode(m, kernel).astype(bool)
    wrong = (colour != mask) & ~edge
    assert not wrong.any(), f"{wrong.sum()} pixels disagree away from lesion edges"
    assert (colour & mask).sum() / (colour | mask).sum() > 0.8


def tight_box(mask):
    """XYXY box of a bool mask in Detectron2's continuous coordinates."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def components(mask):
    labels, count = ndimage.label(mask, np.ones((3, 3)))
    return [labels == i for i in range(1, count + 1)]


def _geometric_transforms(height, width, image):
    crop = FieldOfViewCrop(20).get_transform(image, None)
    assert isinstance(crop, FieldOfViewCropTransform)
    return [Rotation90Transform(height, width, k) for k in range(4)] + [
        TranslateScaleTransform(height, width, 1.1, 5.3, -7.8),
        TranslateScaleTransform(height, width, 0.9, -4.2, 3.7),
        TranslateScaleTransform(height, width, 1.0, 9.0, 9.0),
        crop,
    ]


# --------------------------------------------------------------------------------------------
# Geometric transforms
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(8))
def test_geometric_transform_moves_mask_with_image(index):
    image, mask = lesion_scene(120, 170, seed=index)
    tfm = _geometric_transforms(120, 170, image)[index]
    out_image = tfm.apply_image(image)
    out_mask = tfm.apply_segmentation(mask.astype(np.uint8)).astype(bool)
    assert out_mask.shape == out_image.shape[:2]
    assert_mask_matches_colour(out_image, out_mask, band=1)
    # Rotations and crops are exact; nearest-neighbour resampling can drop the one row or column
    # that held a blob's tip, a pixel plus the fraction by which the box edge falls inside it.
    exact = not isinstance(tfm, TranslateScaleTransform)
    for lesion in components(mask):
        moved = tfm.apply_segmentation(lesion.astype(np.uint8)).astype(bool)
        box = tfm.apply_box(tight_box(lesion)[None])[0]
        np.testing.assert_allclose(box, tight_box(moved), atol=1e-9 if exact else 1.5)


@pytest.mark.parametrize("index", [0, 1, 2, 3, 7])
def test_exact_transforms_map_pixel_centres_onto_mask(index):
    """Rotations and crops resample nothing: each lesion pixel's centre lands in the new mask."""
    image, mask = lesion_scene(120, 170, seed=index)
    tfm = _geometric_transforms(120, 170, image)[index]
    out_mask = tfm.apply_segmentation(mask.astype(np.uint8)).astype(bool)
    ys, xs = np.nonzero(mask)
    moved = tfm.apply_coords(np.stack([xs + 0.5, ys + 0.5], axis=1).astype(np.float64))
    cols, rows = np.floor(moved).astype(int).T
    assert out_mask[rows, cols].all() and out_mask.sum() == mask.sum()


@pytest.mark.parametrize("k", range(4))
def test_rotation90_round_trips_exactly(k):
    image, mask = lesion_scene(60, 90, seed=k, count=3)
    tfm = Rotation90Transform(60, 90, k)
    rotated = tfm.apply_image(image)
    assert rotated.shape[:2] == tfm.output_size == ((90, 60) if k % 2 else (60, 90))
    inverse = tfm.inverse()
    np.testing.assert_array_equal(inverse.apply_image(rotated), image)
    np.testing.assert_array_equal(inverse.apply_segmentation(tfm.apply_segmentation(mask)), mask)
    coords = np.array([[0.0, 0.0], [90.0, 60.0], [12.25, 47.5], [89.0, 1.0]])
    np.testing.assert_array_equal(inverse.apply_coords(tfm.apply_coords(coords.copy())), coords)


def test_random_rotation90_draws_every_quarter_turn():
    image = np.zeros((10, 20, 3), np.uint8)
    np.random.seed(0)
    ks = {RandomRotation90().get_transform(image).k for _ in range(40)}
    assert ks == {0, 1, 2, 3}


def test_translate_scale_inverse_and_ranges():
    tfm = TranslateScaleTransform(100, 150, 1.1, 6.0, -4.0)
    coords = np.array([[0.0, 0.0], [75.0, 50.0], [150.0, 100.0], [12.5, 80.25]])
    np.testing.assert_allclose(
        tfm.inverse().apply_coords(tfm.apply_coords(coords)), coords, atol=1e-9
    )
    # The centre moves by the shift only; the size is kept.
    np.testing.assert_allclose(tfm.apply_coords(np.array([[75.0, 50.0]])), [[81.0, 46.0]])
    assert tfm.apply_image(np.zeros((100, 150, 3), np.uint8)).shape == (100, 150, 3)
    np.random.seed(1)
    aug = RandomTranslateScale(0.1, (0.9, 1.1))
    for _ in range(20):
        t = aug.get_transform(np.zeros((100, 150, 3), np.uint8))
        assert 0.9 <= t.scale <= 1.1 and abs(t.shift_x) <= 15 and abs(t.shift_y) <= 10


def test_translate_scale_keeps_single_channel_and_bool_masks():
    tfm = TranslateScaleTransform(30, 40, 1.2, 2.0, 1.0)
    assert tfm.apply_image(np.ones((30, 40, 1), np.uint8)).shape == (30, 40, 1)
    assert tfm.apply_segmentation(np.ones((30, 40), bool)).dtype == bool


# --------------------------------------------------------------------------------------------
# Field of view
# --------------------------------------------------------------------------------------------


def _expected_fov_box(size, pad_x=0):
    """Continuous XYXY box of the synthetic generator's FOV disc (pixel centres within it)."""
    centre, radius = (size - 1) / 2, FOV_RADIUS * size
    lo, hi = np.ceil(centre - radius), np.floor(centre + radius) + 1
    return np.array([lo + pad_x, lo, hi + pad_x, hi])


def _fundus(size=256, seed=0):
    return render_fundus(np.random.default_rng(seed), size=size)


def _lesion_union(fundus):
    return np.logical_or.reduce(list(fundus.masks.values()))


@pytest.mark.parametrize("size", [200, 256])
def test_fov_crop_finds_the_disc_and_keeps_every_lesion(size):
    fundus = _fundus(size, seed=size)
    tfm = FieldOfViewCrop(20).get_transform(fundus.image, None)
    np.testing.assert_allclose(tfm.box, _expected_fov_box(size), atol=2)
    lesions = _lesion_union(fundus)
    assert tfm.apply_segmentation(lesions).sum() == lesions.sum()


def test_fov_crop_ignores_jpeg_noise_and_captions():
    fundus = _fundus(256, seed=1)
    ok, jpeg = cv2.imencode(".jpg", fundus.image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 60])
    image = np.ascontiguousarray(cv2.imdecode(jpeg, cv2.IMREAD_COLOR)[..., ::-1])
    rng = np.random.default_rng(0)
    fov = CircleMaskTransform(256, 256, 127.5, 127.5, FOV_RADIUS * 256 + 2).inside()
    border = ~fov
    ys, xs = np.nonzero(border)
    pick = rng.choice(len(ys), size=300, replace=False)
    image[ys[pick], xs[pick]] = 60  # isolated bright specks in the black border
    cv2.putText(image, "OD 2015", (2, 12), cv2.FONT_HERSHEY_PLAIN, 0.8, (255, 255, 255), 1)
    box = field_of_view_box(image, 20)
    np.testing.assert_allclose(box, _expected_fov_box(256), atol=2)


def test_fov_crop_of_letterboxed_and_truncated_fundus():
    fundus = _fundus(256, seed=2)
    wide = np.pad(fundus.image, ((0, 0), (40, 50), (0, 0)))  # black bars left and right
    tfm = FieldOfViewCrop(20).get_transform(wide, None)
    np.testing.assert_allclose(tfm.box, _expected_fov_box(256, pad_x=40), atol=2)
    # A camera that cuts the disc at the top and bottom: the crop spans the full height, and the
    # circle (the crop's width across) blanks no FOV pixel but the corners.
    truncated = fundus.image[30:-30]
    tfm = FieldOfViewCrop(20).get_transform(truncated, None)
    assert tfm.y0 == 0 and tfm.h == truncated.shape[0]
    cropped = tfm.apply_image(truncated)
    circle = FieldOfViewCircleMask(20).get_transform(cropped)
    circled = circle.apply_image(cropped)
    bright = cropped.max(axis=2) > 20
    np.testing.assert_array_equal(circled[bright], cropped[bright])
    assert circle.radius > cropped.shape[1] / 2 and not circled[0, 0].any()


def test_fov_crop_falls_back_to_the_whole_image():
    black = np.zeros((50, 60, 3), np.uint8)
    assert isinstance(FieldOfViewCrop(20).get_transform(black, None), NoOpTransform)
    dark = np.zeros((50, 60, 3), np.uint8)
    dark[20:23, 30:33] = 200  # a small bright spot is no field of view
    assert field_of_view_box(dark, 20) is None
    bright = np.full((50, 60, 3), 90, np.uint8)  # no border to crop
    assert isinstance(FieldOfViewCrop(20).get_transform(bright, None), NoOpTransform)


def test_fov_crop_grows_to_keep_annotated_boxes():
    fundus = _fundus(256, seed=3)
    boxes = np.array([[2.0, 3.5, 12.0, 14.0], [100.0, 100.0, 110.0, 110.0]])
    tfm = FieldOfViewCrop(20).get_transform(fundus.image, boxes)
    x0, y0, x1, y1 = tfm.box
    assert (x0, y0) == (2, 3) and (x1, y1) == tuple(_expected_fov_box(256)[2:].astype(int))


@pytest.mark.parametrize("size", [200, 256, 333])
def test_circle_mask_blanks_only_outside_the_fov(size):
    fundus = _fundus(size, seed=4)
    aug_input = T.AugInput(fundus.image)
    tfms = T.AugmentationList([FieldOfViewCrop(20), FieldOfViewCircleMask()])(aug_input)
    crop, circle = tfms.transforms
    assert isinstance(circle, CircleMaskTransform)
    cropped = crop.apply_image(fundus.image)
    out = aug_input.image
    bright = cropped.max(axis=2) > 20
    np.testing.assert_array_equal(out[bright], cropped[bright])
    assert not out[~circle.inside()].any()
    assert not out[:3, :3].any() and not out[-3:, -3:].any()  # the corners are black
    # The circle follows the eye, not the frame: in a crop grown to keep a box in the border, the
    # circle stays where it was.
    grown = FieldOfViewCrop(20).get_transform(fundus.image, np.array([[1.0, 1.0, 3.0, 3.0]]))
    moved = FieldOfViewCircleMask(20).get_transform(grown.apply_image(fundus.image))
    shift = np.array([crop.x0 - grown.x0, crop.y0 - grown.y0])
    np.testing.assert_allclose(
        [moved.center_x, moved.center_y], np.add([circle.center_x, circle.center_y], shift)
    )
    assert moved.radius == circle.radius
    # Only the image changes.
    mask = _lesion_union(fundus)[: crop.h, : crop.w]
    np.testing.assert_array_equal(circle.apply_segmentation(mask), mask)
    coords = np.array([[0.0, 0.0], [3.0, 4.0]])
    np.testing.assert_array_equal(circle.apply_coords(coords.copy()), coords)


# --------------------------------------------------------------------------------------------
# Photometric preprocessing
# --------------------------------------------------------------------------------------------


def test_graham_maps_a_uniform_image_to_128():
    out = GrahamTransform(7.0).apply_image(np.full((60, 90, 3), 77, np.uint8))
    assert out.dtype == np.uint8 and out.shape == (60, 90, 3) and (out == 128).all()


@pytest.mark.parametrize("sigma", [3.0, 17.0, 40.0, 61.0])
def test_graham_equals_the_exact_blur_on_a_fundus(sigma):
    # The blur behind Graham runs on a coarser grid when sigma is wide: the output must still be
    # the formula with cv2's exact Gaussian, within two grey levels everywhere (edges of the image and of the FOV included).
    fundus = render_fundus(np.random.default_rng(3), size=768).image
    image = fundus.astype(np.float32)
    exact = np.clip(4 * image - 4 * cv2.GaussianBlur(image, (0, 0), sigma) + 128, 0, 255)
    got = GrahamTransform(sigma).apply_image(fundus).astype(float)
    diff = np.abs(got - np.rint(exact))
    assert diff.mean() < 0.2 and diff.max() <= 2


def test_graham_sigma_scales_with_width():
    rng = np.random.default_rng(0)
    grid = rng.uniform(40, 220, size=(24, 24, 3)).astype(np.float32)
    big = np.clip(cv2.resize(grid, (1024, 1024), interpolation=cv2.INTER_CUBIC), 0, 255)
    big = big.astype(np.uint8)
    small = cv2.resize(big, (512, 512), interpolation=cv2.INTER_AREA)
    graham = GrahamNormalization(20)
    t_big, t_small = graham.get_transform(big), graham.get_transform(small)
    assert (t_big.sigma, t_small.sigma) == (20.0, 10.0)
    expected = cv2.resize(t_big.apply_image(big), (512, 512), interpolation=cv2.INTER_AREA)
    scaled = np.abs(t_small.apply_image(small).astype(int) - expected).mean()
    unscaled = np.abs(GrahamTransform(20).apply_image(small).astype(int) - expected).mean()
    assert scaled < 2 and unscaled > 10 * scaled
    mask = np.ones((512, 512), np.uint8)
    assert t_small.apply_segmentation(mask) is mask


def _hue_degrees(rgb):
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL)[..., 0].astype(float) * 360 / 256


def test_clahe_changes_lightness_only():
    rng = np.random.default_rng(0)
    # A dull fundus: orange-red with low-contrast, low-frequency lightness variation.
    shade = cv2.resize(rng.uniform(0.55, 0.8, (6, 8)), (160, 120), interpolation=cv2.INTER_CUBIC)
    image = np.clip(np.array([200.0, 95.0, 45.0]) * shade[..., None], 0, 255).astype(np.uint8)
    out = ClaheTransform(2.0, 8).apply_image(image)
    assert out.shape == image.shape and out.dtype == np.uint8
    lab_in, lab_out = (cv2.cvtColor(x, cv2.COLOR_RGB2LAB).astype(int) for x in (image, out))
    assert np.abs(lab_out[..., 0] - lab_in[..., 0]).mean() > 3  # lightness changed
    assert lab_out[..., 0].std() > lab_in[..., 0].std()  # and its contrast grew
    assert np.abs(lab_out[..., 1:] - lab_in[..., 1:]).mean() < 2  # colour did not
    hue_shift = np.abs((_hue_degrees(out) - _hue_degrees(image) + 180) % 360 - 180)
    assert np.median(hue_shift) < 5
    bgr = ClaheTransform(2.0, 8, "BGR").apply_image(np.ascontiguousarray(image[..., ::-1]))
    np.testing.assert_array_equal(bgr[..., ::-1], out)
    with pytest.raises(ValueError, match="RGB or BGR"):
        ClaheOnLightness(2.0, 8, image_format="YUV-BT.601")


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


def _cfg(**aug):
    cfg = get_retina_cfg()
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TRAIN = (100, 120, 140)
    cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    cfg.INPUT.MAX_SIZE_TRAIN = 1000
    cfg.INPUT.MIN_SIZE_TEST = 120
    for key, value in aug.items():
        setattr(cfg.RETINA.AUG, key, value)
    return cfg


def _types(augs):
    return [type(a) for a in augs]


def test_build_preprocess_follows_the_config():
    cfg = _cfg()
    assert _types(build_preprocess(cfg, is_train=True)) == [
        FieldOfViewCrop,
        FieldOfViewCircleMask,
        T.ResizeShortestEdge,
        T.RandomFlip,
        T.RandomFlip,
        RandomRotation90,
        RandomTranslateScale,
        T.RandomBrightness,
        T.RandomContrast,
        T.RandomSaturation,
    ]
    flips = build_preprocess(cfg, is_train=True)[3:5]
    assert (flips[0].horizontal, flips[1].vertical) == (True, True)
    assert _types(build_preprocess(cfg, is_train=False)) == [
        FieldOfViewCrop,
        FieldOfViewCircleMask,
        T.ResizeShortestEdge,
    ]
    cfg.RETINA.PREPROCESS.FOV_CROP = False
    cfg.RETINA.PREPROCESS.GRAHAM = True
    cfg.RETINA.PREPROCESS.CLAHE = True
    cfg.INPUT.MIN_SIZE_TEST = 0
    assert _types(build_preprocess(cfg, is_train=False)) == [GrahamNormalization, ClaheOnLightness]
    # Random crops (training only) come after Graham, whose sigma follows the whole image.
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = [64, 64]
    train = _types(build_preprocess(cfg, is_train=True))
    assert train.index(T.RandomCrop) == train.index(ClaheOnLightness) + 1
    assert T.RandomCrop not in _types(build_preprocess(cfg, is_train=False))
    cfg.RETINA.AUG.CROP_LESION_PROB = 0.5
    train = _types(build_preprocess(cfg, is_train=True))
    assert RandomLesionCrop in train and T.RandomCrop not in train
    off = _cfg(
        HFLIP=False,
        VFLIP=False,
        ROT90=False,
        TRANSLATE=0.0,
        SCALE=(1.0, 1.0),
        BRIGHTNESS=(1.0, 1.0),
        CONTRAST=(1.0, 1.0),
        SATURATION=(1, 1),
    )
    assert _types(build_preprocess(off, is_train=True)) == _types(build_preprocess(off, False))
    only_scale = _cfg(TRANSLATE=0.0)
    assert RandomTranslateScale in _types(build_preprocess(only_scale, is_train=True))


def test_training_pipeline_moves_masks_with_image():
    image, mask = lesion_scene(150, 200, seed=11, count=8)
    cfg = _cfg(BRIGHTNESS=(1.0, 1.0), CONTRAST=(1.0, 1.0), SATURATION=(1.0, 1.0))
    augs = T.AugmentationList(build_preprocess(cfg, is_train=True))
    lesions = components(mask)
    shapes = set()
    for seed in range(8):
        np.random.seed(seed)
        aug_input = T.AugInput(image)
        tfms = augs(aug_input)
        out_mask = tfms.apply_segmentation(mask.astype(np.uint8)).astype(bool)
        shapes.add(out_mask.shape)
        # Resizing down blends a wider edge than one pixel.
        assert_mask_matches_colour(aug_input.image, out_mask, band=2)
        for lesion in lesions:
            moved = tfms.apply_segmentation(lesion.astype(np.uint8)).astype(bool)
            box = tfms.apply_box(tight_box(lesion)[None])[0]
            np.testing.assert_allclose(box, tight_box(moved), atol=1.5)
    assert len(shapes) > 1  # sizes and quarter turns were drawn


def test_lesion_crop_holds_a_lesion_centre_and_stays_inside():
    h, w, crop = 300, 500, 64
    boxes = np.array([[10, 20, 14, 26], [480, 280, 499, 299]], dtype=np.float32)
    image = np.zeros((h, w, 3), np.uint8)
    always = RandomLesionCrop("absolute", [crop, crop], lesion_prob=1.0)
    never = RandomLesionCrop("absolute", [crop, crop], lesion_prob=0.0)
    corners = set()
    np.random.seed(0)
    for _ in range(200):
        t = always.get_transform(image, boxes)
        assert (t.w, t.h) == (crop, crop)
        assert 0 <= t.x0 <= w - crop and 0 <= t.y0 <= h - crop
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2
        inside = [
            t.x0 <= cx < t.x0 + crop and t.y0 <= cy < t.y0 + crop for cx, cy in centres
        ]
        assert any(inside)
        corners.add((t.x0, t.y0))
    assert len(corners) > 20  # the lesion lands anywhere in the window, not always central
    # Uniform crops: this small a lesion would be held by chance in about 2% of them.
    held = 0
    for _ in range(200):
        t = never.get_transform(image, boxes)
        held += t.x0 <= 12 < t.x0 + crop and t.y0 <= 23 < t.y0 + crop
    assert held < 20
    # No boxes (a healthy eye): a uniform crop, and a crop larger than the image is clipped.
    t = always.get_transform(np.zeros((40, 50, 3), np.uint8), None)
    assert (t.x0, t.y0, t.w, t.h) == (0, 0, 50, 40)
    with pytest.raises(ValueError, match="lesion_prob"):
        RandomLesionCrop("absolute", [crop, crop], lesion_prob=1.5)


def test_frame_margin_neutralises_the_edges_only():
    image = np.full((40, 60, 3), 200, np.uint8)
    image[-2:] = 255  # a camera's bright line in the last rows
    out = FrameMargin(0.05, 128).get_transform(image).apply_image(image)  # 3 px of 60
    band = np.ones((40, 60), bool)
    band[3:-3, 3:-3] = False
    assert (out[band] == 128).all() and (out[~band] == 200).all()
    mask = np.ones((40, 60), np.uint8)
    assert FrameMarginTransform(3, 128).apply_segmentation(mask) is mask
    cfg = _cfg()
    cfg.RETINA.PREPROCESS.GRAHAM = True
    cfg.RETINA.PREPROCESS.FRAME_MARGIN = 0.01
    test_types = _types(build_preprocess(cfg, is_train=False))
    assert test_types.index(FrameMargin) == test_types.index(GrahamNormalization) + 1
    with pytest.raises(ValueError, match="FRAME_MARGIN"):
        FrameMargin(0.6, 128)
