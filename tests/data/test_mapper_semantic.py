"""LesionDatasetMapper's semantic targets: loaded per lesion in thing_classes order, moved with the
image through every augmentation, ignore kept, and equal to the instance masks they come from."""
import json

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import MetadataCatalog
from PIL import Image

from retina_d2.config import get_retina_cfg
from retina_d2.data.converters.base import ConvertOptions
from retina_d2.data.converters.synthetic import convert
from retina_d2.data.mapper import LesionDatasetMapper, semantic_classes
from retina_d2.data.preprocess import TranslateScaleTransform
from retina_d2.data.register import load_lesion_json

pytestmark = pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")

LESIONS = ["microaneurysm", "haemorrhage", "hard exudate"]
# Pure colours far from the FOV's orange and from each other: one per painted target.
HAEMORRHAGE_RGB = (0, 255, 255)
EXUDATE_RGB = (255, 0, 255)
IGNORE_RGB = (0, 0, 255)
SYNTHETIC = "test_mapper_semantic_synthetic_train"
PAINTED = "test_mapper_semantic_painted"


def _cfg(**aug):
    cfg = get_retina_cfg()
    cfg.MODEL.META_ARCHITECTURE = "SemanticLesionNet"
    cfg.DATASETS.TRAIN = (PAINTED,)
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MASK_FORMAT = "bitmask"
    cfg.INPUT.MIN_SIZE_TRAIN = (120, 150)
    cfg.INPUT.MAX_SIZE_TRAIN = 300
    cfg.INPUT.MIN_SIZE_TEST = 120
    cfg.INPUT.MAX_SIZE_TEST = 300
    for key, value in dict(BRIGHTNESS=(1, 1), CONTRAST=(1, 1), SATURATION=(1, 1), **aug).items():
        setattr(cfg.RETINA.AUG, key, value)
    return cfg


def _blobs(shape, seed, count):
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, np.uint8)
    height, width = shape
    for _ in range(count):
        centre = (
            int(rng.integers(width * 0.3, width * 0.7)),
            int(rng.integers(height * 0.3, height * 0.7)),
        )
        axes = (int(rng.integers(4, 9)), int(rng.integers(4, 9)))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return mask.astype(bool)


@pytest.fixture(scope="module")
def painted(tmp_path_factory):
    """An eye whose haemorrhages, exudates and ignore region are painted in colours of their own,
    with their 0 / 1 / 255 PNGs; microaneurysms are not annotated (no PNG)."""
    out = tmp_path_factory.mktemp("painted")
    height, width = 180, 240
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.zeros((height, width, 3), np.uint8)
    fov = (xx - width / 2) ** 2 + (yy - height / 2) ** 2 <= (0.46 * height) ** 2
    image[fov] = (200, 110, 50)
    haemorrhage = _blobs((height, width), 1, 4) & fov
    exudate = _blobs((height, width), 2, 4) & fov & ~haemorrhage
    ignore = np.zeros((height, width), bool)
    ignore[60:75, 150:170] = True
    ignore &= ~haemorrhage & ~exudate
    image[haemorrhage], image[exudate], image[ignore] = HAEMORRHAGE_RGB, EXUDATE_RGB, IGNORE_RGB
    Image.fromarray(image).save(out / "eye.png")
    targets = {
        "haemorrhage": haemorrhage.astype(np.uint8),
        "hard exudate": exudate.astype(np.uint8),
    }
    targets["hard exudate"][ignore] = 255
    files = {}
    for name, target in targets.items():
        files[name] = str(out / f"{name.replace(' ', '_')}.png")
        Image.fromarray(target).save(files[name])
    MetadataCatalog.get(PAINTED).set(thing_classes=LESIONS)
    yield dict(
        file_name=str(out / "eye.png"),
        height=height,
        width=width,
        image_id=1,
        annotations=[],
        sem_seg_files=files,
    )
    MetadataCatalog.remove(PAINTED)


def _colour(image, rgb):
    return (np.abs(image.astype(int) - np.array(rgb)).max(axis=-1) < 50)


def _assert_matches_colour(image, mask, rgb, band=2):
    """``mask`` is the ``rgb``-coloured pixels of ``image``, except within ``band`` px of its edge,
    where interpolation blends colours."""
    colour = _colour(image, rgb)
    assert mask.any() and colour.any()
    kernel = np.ones((2 * band + 1,) * 2, np.uint8)
    m = mask.astype(np.uint8)
    edge = cv2.dilate(m, kernel).astype(bool) & ~cv2.erode(m, kernel).astype(bool)
    wrong = (colour != mask) & ~edge
    assert not wrong.any(), f"{wrong.sum()} pixels disagree away from the edges"


def test_targets_follow_the_image_through_every_augmentation(painted):
    cfg = _cfg(TRANSLATE=0.1, SCALE=(0.9, 1.1))
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE = "relative_range", [0.8, 0.8]
    mapper = LesionDatasetMapper(cfg, is_train=True)
    for seed in range(8):
        np.random.seed(seed)
        out = mapper(painted)
        image = out["image"].permute(1, 2, 0).numpy()
        sem_seg = out["sem_seg"].numpy()
        assert out["sem_seg"].dtype == torch.uint8 and sem_seg.shape == (3,) + image.shape[:2]
        assert (sem_seg[0] == 255).all()  # microaneurysm: not annotated on this image
        assert set(np.unique(sem_seg[1:])) <= {0, 1, 255}
        assert not (sem_seg[1] == 255).any()
        _assert_matches_colour(image, sem_seg[1] == 1, HAEMORRHAGE_RGB)
        _assert_matches_colour(image, sem_seg[2] == 1, EXUDATE_RGB)
        _assert_matches_colour(image, sem_seg[2] == 255, IGNORE_RGB)
        assert "instances" not in out  # a semantic-only model needs none


def test_pixels_shifted_in_from_outside_are_background_not_ignore(painted):
    height, width = painted["height"], painted["width"]
    mapper = LesionDatasetMapper(
        is_train=True,
        augmentations=[TranslateScaleTransform(height, width, 1.0, 10.0, 0.0)],
        image_format="RGB",
        use_instance_mask=False,
        recompute_boxes=False,
        semantic_classes=LESIONS,
    )
    sem_seg = mapper(painted)["sem_seg"].numpy()
    assert (sem_seg[2][:, :10] == 0).all() and (sem_seg[2] == 255).any()
    assert (sem_seg[1][:, :10] == 0).all()
    assert (sem_seg[0] == 255).all()  # not annotated: ignored everywhere, shifted in or not


def test_inference_loads_no_targets(painted):
    arguments = LesionDatasetMapper.from_config(_cfg(), is_train=False)
    mapper = LesionDatasetMapper(**dict(arguments, semantic_classes=LESIONS))
    assert "sem_seg" not in mapper(painted)
    assert LesionDatasetMapper(_cfg(), is_train=False).semantic_classes is None


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A converted 3-image synthetic dataset loaded under a name of this module (metadata with
    thing_classes and contiguous ids), removed again afterwards."""
    out = tmp_path_factory.mktemp("synthetic")
    convert(None, out, ConvertOptions(progress=False), count=3, size=160)
    manifest = json.loads((out / "retina_d2.json").read_text())
    records = load_lesion_json(
        str(out / manifest["tasks"]["seg"]["train"]), str(out / manifest["image_root"]), SYNTHETIC
    )
    yield records
    MetadataCatalog.remove(SYNTHETIC)


def test_from_config_orders_channels_by_thing_classes_and_matches_instances(synthetic):
    """With LesionRCNN + LESION_SEG.ENABLED, each channel is exactly the union of the instance
    masks of its class: both come from the same converted masks through the same transforms."""
    cfg = _cfg(TRANSLATE=0.1, SCALE=(0.9, 1.1))
    cfg.MODEL.META_ARCHITECTURE = "LesionRCNN"
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.LESION_SEG.ENABLED = True
    cfg.DATASETS.TRAIN = (SYNTHETIC,)
    mapper = LesionDatasetMapper(cfg, is_train=True)
    classes = MetadataCatalog.get(SYNTHETIC).thing_classes
    assert mapper.semantic_classes == classes == semantic_classes([SYNTHETIC])
    checked = 0
    for seed in range(3):
        for record in synthetic:
            np.random.seed(seed)
            out = mapper(record)
            instances = out["instances"]
            sem_seg = out["sem_seg"]
            assert sem_seg.shape == (len(classes),) + tuple(out["image"].shape[1:])
            for c in range(len(classes)):
                union = instances.gt_masks.tensor[instances.gt_classes == c].any(dim=0)
                assert torch.equal(sem_seg[c] == 1, union), classes[c]
                checked += int(union.any())
    assert checked > 5
    cfg.MODEL.LESION_SEG.ENABLED = False
    assert LesionDatasetMapper(cfg, is_train=True).semantic_classes is None


def test_bad_records_name_the_file(painted, tmp_path):
    mapper = LesionDatasetMapper(_cfg(), is_train=True)
    assert mapper.semantic_classes == LESIONS
    bare = {k: v for k, v in painted.items() if k != "sem_seg_files"}
    with pytest.raises(ValueError, match="no sem_seg_files") as error:
        mapper(bare)
    assert painted["file_name"] in str(error.value)
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(small)
    with pytest.raises(ValueError, match="12x10") as error:
        mapper(dict(painted, sem_seg_files={"haemorrhage": str(small)}))
    assert str(small) in str(error.value)
    with pytest.raises(ValueError, match="optic disc"):
        mapper(dict(painted, sem_seg_files={"optic disc": str(small)}))


def test_channel_order_needs_datasets_that_agree():
    names = ("test_mapper_semantic_a", "test_mapper_semantic_b")
    for name, classes in zip(names, (["haemorrhage"], ["microaneurysm"])):
        MetadataCatalog.get(name).set(thing_classes=classes)
    try:
        with pytest.raises(ValueError, match="one lesion list"):
            semantic_classes(names)
        with pytest.raises(ValueError, match="DATASETS.TRAIN is empty"):
            semantic_classes([])
    finally:
        for name in names:
            MetadataCatalog.remove(name)
