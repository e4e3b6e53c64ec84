"""albumentations as Detectron2 augmentations (retina_d2/data/albumentations_aug.py): after every
geometric albumentation, affine or not, a lesion painted on the image coincides with its semantic
target and its instance mask; pixel-value transforms leave targets alone; coordinates follow the
pixels; draws follow NumPy's (per-worker) seed; CBAM-DeepLab's pipeline through the config."""
import sys
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from detectron2.data import transforms as T

from retina_d2.data.albumentations_aug import (
    CBAM_DEEPLAB_DDR,
    Albumentation,
    AlbumentationsOneOf,
    AlbumentationsTransform,
    build_albumentations,
)
from retina_d2.data.mapper import LesionDatasetMapper
from retina_d2.data.preprocess import build_preprocess

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_mapper_semantic import (  # noqa: E402,F401  (fixtures)
    EXUDATE_RGB,
    HAEMORRHAGE_RGB,
    IGNORE_RGB,
    LESIONS,
    SYNTHETIC,
    _assert_matches_colour,
    _cfg,
    painted,
    synthetic,
)

pytestmark = pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")

BORDER = dict(border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0)
GEOMETRIC = {
    "hflip": lambda: A.HorizontalFlip(p=1),
    "vflip": lambda: A.VerticalFlip(p=1),
    "rot90": lambda: A.RandomRotate90(p=1),
    "affine": lambda: A.Affine(translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1),
                               rotate=(-15, 15), p=1, **BORDER),
    # The paper's elastic (alpha 1, sigma 50) barely moves a pixel: a strong one as well.
    "elastic_paper": lambda: A.ElasticTransform(alpha=1, sigma=50, p=1, **BORDER),
    "elastic_strong": lambda: A.ElasticTransform(alpha=40, sigma=6, p=1, **BORDER),
    "grid": lambda: A.GridDistortion(distort_limit=0.3, p=1, **BORDER),
    "optical": lambda: A.OpticalDistortion(distort_limit=1.0, p=1, **BORDER),
}
PHOTOMETRIC = {
    "brightness_contrast": lambda: A.RandomBrightnessContrast(0.2, 0.2, p=1),
    "gamma": lambda: A.RandomGamma((80, 120), p=1),
    "hsv": lambda: A.HueSaturationValue(10, 15, 10, p=1),
    "noise": lambda: A.GaussNoise(std_range=(0.0124, 0.0277), p=1),
    "blur": lambda: A.GaussianBlur(blur_limit=(3, 3), p=1),
}


def _mapper(augmentations):
    return LesionDatasetMapper(
        is_train=True, augmentations=augmentations, image_format="RGB", use_instance_mask=False,
        recompute_boxes=False, semantic_classes=LESIONS,
    )


@pytest.mark.parametrize("name", sorted(GEOMETRIC))
def test_painted_lesions_and_their_targets_move_together(painted, name):
    mapper = _mapper([Albumentation(GEOMETRIC[name]())])
    unmoved = _mapper([])(painted)["sem_seg"].numpy()
    moved_somewhere = False
    for seed in range(4):
        np.random.seed(seed)
        out = mapper(painted)
        image = out["image"].permute(1, 2, 0).numpy()
        sem_seg = out["sem_seg"].numpy()
        assert set(np.unique(sem_seg)) <= {0, 1, 255}  # nearest neighbour: no blended labels
        _assert_matches_colour(image, sem_seg[1] == 1, HAEMORRHAGE_RGB)
        _assert_matches_colour(image, sem_seg[2] == 1, EXUDATE_RGB)
        _assert_matches_colour(image, sem_seg[2] == 255, IGNORE_RGB)
        moved_somewhere |= sem_seg.shape != unmoved.shape or not np.array_equal(sem_seg, unmoved)
    if name != "elastic_paper":
        assert moved_somewhere  # the check above is not vacuous


def test_detectron2_arbitrary_rotation_moves_targets_with_the_image(painted):
    cfg = _cfg(HFLIP=False, VFLIP=False, ROT90=False, TRANSLATE=0.0, SCALE=(1.0, 1.0),
               ROTATION=180.0)
    cfg.RETINA.PREPROCESS.FOV_CROP = False
    assert any(isinstance(a, T.RandomRotation) for a in build_preprocess(cfg, is_train=True))
    mapper = LesionDatasetMapper(cfg, is_train=True)
    for seed in range(4):
        np.random.seed(seed)
        out = mapper(painted)
        image = out["image"].permute(1, 2, 0).numpy()
        _assert_matches_colour(image, out["sem_seg"].numpy()[1] == 1, HAEMORRHAGE_RGB)


@pytest.mark.parametrize("name", sorted(PHOTOMETRIC))
def test_pixel_value_transforms_leave_targets_and_coordinates(painted, name):
    np.random.seed(0)
    tfm = Albumentation(PHOTOMETRIC[name]()).get_transform(np.zeros((8, 8, 3), np.uint8))
    coords = np.array([[1.5, 2.5], [7.0, 0.0]])
    assert np.array_equal(tfm.apply_coords(coords), coords)
    out = _mapper([Albumentation(PHOTOMETRIC[name]())])(painted)
    assert torch.equal(out["sem_seg"], _mapper([])(painted)["sem_seg"])
    before = _mapper([])(painted)["image"]
    assert not torch.equal(out["image"], before)  # it did change the pixels


@pytest.mark.parametrize(
    "name,tolerance",
    [("hflip", 1e-6), ("vflip", 1e-6), ("rot90", 1e-6), ("affine", 0.5), ("grid", 2.0),
     ("optical", 2.0)],
)
def test_coordinates_follow_the_pixels(name, tolerance):
    # A 5x5 square's centre, moved as coordinates, lands on the moved square's centre: exactly
    # for flips and quarter turns, within half a pixel for the affine map (the square's pixels
    # are resampled), within 2 px for distortions (albumentations looks keypoints up in its
    # displacement maps on the pixel grid; instance boxes are rebuilt from masks anyway).
    image = np.zeros((64, 80, 3), np.uint8)
    mask = np.zeros((64, 80), np.uint8)
    mask[20:25, 30:35] = 1
    for seed in range(3):
        np.random.seed(seed)
        tfm = Albumentation(GEOMETRIC[name]()).get_transform(image)
        assert isinstance(tfm, AlbumentationsTransform)
        moved = tfm.apply_segmentation(mask)
        rows, cols = np.nonzero(moved)
        centre = tfm.apply_coords(np.array([[32.5, 22.5]]))[0]
        error = np.hypot(centre[0] - (cols.mean() + 0.5), centre[1] - (rows.mean() + 0.5))
        assert error <= tolerance


def test_draws_follow_numpys_seed():
    image = np.random.default_rng(0).integers(0, 255, (32, 40, 3), dtype=np.uint8)
    aug = Albumentation(GEOMETRIC["elastic_strong"]())

    def draw(seed):
        np.random.seed(seed)
        return aug.get_transform(image).apply_image(image)

    assert np.array_equal(draw(1), draw(1))
    assert not np.array_equal(draw(1), draw(2))


def test_one_of_picks_by_the_childrens_p():
    first, second = A.HorizontalFlip(p=0.3), A.VerticalFlip(p=0.1)
    one_of = AlbumentationsOneOf([first, second], p=1.0)
    image = np.zeros((4, 6, 3), np.uint8)
    picks = []
    np.random.seed(0)
    for _ in range(400):
        picks.append(one_of.get_transform(image).transform is first)
    assert 0.68 < np.mean(picks) < 0.82  # 0.3 / (0.3 + 0.1) = 0.75
    never = AlbumentationsOneOf([first], p=0.0)
    assert type(never.get_transform(image)).__name__ == "NoOpTransform"


def test_cbam_deeplab_pipeline_through_the_config_moves_instances_and_maps_alike(synthetic):
    # LesionRCNN with a semantic head: every channel equals the union of its instance masks
    # after the whole pipeline (both come from the same masks through the same transforms), and
    # boxes are the moved masks' tight boxes.
    cfg = _cfg()
    cfg.MODEL.META_ARCHITECTURE = "LesionRCNN"
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.LESION_SEG.ENABLED = True
    cfg.DATASETS.TRAIN = (SYNTHETIC,)
    cfg.RETINA.AUG.ALBUMENTATIONS = "cbam_deeplab_ddr"
    mapper = LesionDatasetMapper(cfg, is_train=True)
    names = [type(getattr(a, "transform", a)).__name__ for a in mapper.augmentations.augs]
    assert "Affine" in names and "AlbumentationsOneOf" in names
    checked = 0
    for seed in range(6):
        for record in synthetic:
            np.random.seed(seed)
            out = mapper(record)
            instances, sem_seg = out["instances"], out["sem_seg"]
            for c in range(sem_seg.shape[0]):
                union = instances.gt_masks.tensor[instances.gt_classes == c].any(dim=0)
                assert torch.equal(sem_seg[c] == 1, union)
                checked += int(union.any())
            boxes = instances.gt_masks.get_bounding_boxes().tensor
            assert torch.equal(instances.gt_boxes.tensor, boxes)
    assert checked > 5


def test_the_pipeline_holds_the_papers_numbers():
    augs = build_albumentations("cbam_deeplab_ddr", "RGB")
    flat = []
    for aug in augs:
        flat += aug.transforms if isinstance(aug, AlbumentationsOneOf) else [aug.transform]
    by_name = {type(t).__name__: t for t in flat}
    c = CBAM_DEEPLAB_DDR
    assert by_name["HorizontalFlip"].p == by_name["VerticalFlip"].p == 0.5
    assert by_name["RandomRotate90"].p == 0.5
    affine = by_name["Affine"]
    assert affine.p == 0.5 and tuple(affine.rotate) == (-15, 15)
    assert tuple(affine.scale["x"]) == pytest.approx((0.9, 1.1))
    assert tuple(affine.translate_percent["x"]) == pytest.approx((-0.0625, 0.0625))
    assert by_name["RandomBrightnessContrast"].p == 0.4
    assert tuple(by_name["RandomGamma"].gamma_limit) == (80, 120)
    hsv = by_name["HueSaturationValue"]
    assert (hsv.hue_shift_limit, hsv.sat_shift_limit, hsv.val_shift_limit) == (
        (-10, 10), (-15, 15), (-10, 10))
    noise = by_name["GaussNoise"]
    assert noise.p == 0.15
    assert tuple(np.square(np.array(noise.std_range) * 255)) == pytest.approx((10, 50))
    assert tuple(by_name["GaussianBlur"].blur_limit) == (3, 3)
    elastic = by_name["ElasticTransform"]
    assert (elastic.alpha, elastic.sigma, elastic.p) == (1, 50, 0.15)
    assert by_name["GridDistortion"].p == by_name["OpticalDistortion"].p == 0.15
    one_ofs = [a for a in augs if isinstance(a, AlbumentationsOneOf)]
    assert [o.p for o in one_ofs] == [c["colour_one_of_p"], c["distortion_one_of_p"]] == [0.5, 0.3]


def test_unknown_pipeline_and_bgr_are_refused():
    with pytest.raises(KeyError, match="cbam_deeplab_ddr"):
        build_albumentations("nope", "RGB")
    with pytest.raises(ValueError, match="RGB"):
        build_albumentations("cbam_deeplab_ddr", "BGR")
    assert build_albumentations("", "BGR") == []


class _ShiftAndDropOutside:
    """Stands in for a distortion that moves points by +40 px in x and, as albumentations'
    distortions do, drops those that leave the frame (keeping the extra columns)."""

    def apply_to_keypoints(self, keypoints, **params):
        moved = keypoints.copy()
        moved[:, 0] += 40
        return moved[moved[:, 0] < params["shape"][1]]


def test_points_a_distortion_moves_out_of_the_frame_keep_their_row():
    from retina_d2.data.albumentations_aug import AlbumentationsTransform

    transform = AlbumentationsTransform(_ShiftAndDropOutside(), {"shape": (64, 64, 3)})
    points = np.array([[2.0, 5.0], [50.0, 6.0], [10.0, 70.0]])
    out = transform.apply_coords(points)
    assert out.shape == points.shape
    assert out[0].tolist() == [42.0, 5.0]  # moved
    assert out[1].tolist() == [50.0, 6.0]  # dropped by the distortion: where it was, in frame
    assert out[2].tolist() == [50.0, 70.0]  # kept by the distortion: as it moved it
