"""Every lesion survives the mapper's resampling: 1-pixel lesions through the paper configs'
1024 px resize of an IDRiD-sized image (a 4.2x shrink), in instance and semantic targets."""
import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from fvcore.transforms.transform import CropTransform
from PIL import Image
from scipy import ndimage

from retina_d2.config import get_retina_cfg
from retina_d2.data.instances import encode_rle, instance_rles
from retina_d2.data.mapper import LesionDatasetMapper

pytestmark = pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")

HEIGHT, WIDTH = 2848, 4288  # IDRiD
RESIZED = (680, 1024)  # the long edge to 1024 px: round(2848 * 1024 / 4288) = 680


def _cfg(**aug):
    """The paper configs' resize (INPUT.*_SIZE_* 1024), without the FOV crop (the test image is
    uniform) and, unless given, without augmentation."""
    cfg = get_retina_cfg()
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (1024,), 1024
    cfg.MODEL.MASK_ON = True
    cfg.INPUT.MASK_FORMAT = "bitmask"
    cfg.RETINA.PREPROCESS.FOV_CROP = False
    still = dict(HFLIP=False, VFLIP=False, ROT90=False, TRANSLATE=0.0, SCALE=(1.0, 1.0),
                 BRIGHTNESS=(1, 1), CONTRAST=(1, 1), SATURATION=(1, 1))
    for key, value in dict(still, **aug).items():
        setattr(cfg.RETINA.AUG, key, value)
    return cfg


@pytest.fixture(scope="module")
def eye(tmp_path_factory):
    """A 4288x2848 image with 100 one-pixel lesions in its middle 60% (so that a 10% zoom keeps
    them inside), their annotations and their semantic PNG."""
    folder = tmp_path_factory.mktemp("small_lesions")
    image = folder / "eye.png"
    Image.fromarray(np.full((HEIGHT, WIDTH, 3), 90, np.uint8)).save(image, compress_level=1)
    rng = np.random.default_rng(7)
    cells = rng.choice(40 * 40, size=100, replace=False)  # one lesion per cell: none touch
    ys = (HEIGHT * 0.2 + (cells // 40) * HEIGHT * 0.6 / 40 + rng.integers(0, 40, 100)).astype(int)
    xs = (WIDTH * 0.2 + (cells % 40) * WIDTH * 0.6 / 40 + rng.integers(0, 60, 100)).astype(int)
    labels = np.zeros((HEIGHT, WIDTH), np.int32)
    labels[ys, xs] = np.arange(1, 101)
    annotations = [
        dict(segmentation=rle, bbox=[float(x), float(y), 1.0, 1.0], bbox_mode=BoxMode.XYWH_ABS,
             category_id=0, iscrowd=0)
        for (_, rle), y, x in zip(instance_rles(labels), ys, xs)
    ]
    target = (labels > 0).astype(np.uint8)
    Image.fromarray(target).save(folder / "ma.png", compress_level=1)
    record = dict(file_name=str(image), height=HEIGHT, width=WIDTH, image_id=1,
                  annotations=annotations, sem_seg_files={"microaneurysm": str(folder / "ma.png")})
    return record, ys, xs


def _expected_pixels(ys, xs):
    """Where each lesion's pixel centre lands, worked out by hand from the scale alone."""
    rows = np.floor((ys + 0.5) * RESIZED[0] / HEIGHT).astype(int)
    cols = np.floor((xs + 0.5) * RESIZED[1] / WIDTH).astype(int)
    return rows, cols


def _assert_one_pixel_each(instances, rows, cols):
    masks = instances.gt_masks.tensor.numpy()
    assert masks.shape == (len(rows),) + RESIZED, "lesions were lost"
    assert (masks.sum(axis=(1, 2)) == 1).all()
    for mask, box, row, col in zip(masks, instances.gt_boxes.tensor.numpy(), rows, cols):
        assert mask[row, col]
        assert box.tolist() == [col, row, col + 1, row + 1]


def test_one_pixel_lesions_all_survive_a_4x_shrink(eye):
    record, ys, xs = eye
    mapper = LesionDatasetMapper(_cfg(), is_train=True)
    out = mapper(record)
    assert tuple(out["image"].shape[1:]) == RESIZED
    # Plain nearest-neighbour resampling keeps only the lesions on its sampling grid.
    nearest = sum(
        (int((r + 0.5) * HEIGHT / RESIZED[0]) == y) and (int((c + 0.5) * WIDTH / RESIZED[1]) == x)
        for y, x, r, c in zip(ys, xs, *_expected_pixels(ys, xs))
    )
    assert nearest < 20
    _assert_one_pixel_each(out["instances"], *_expected_pixels(ys, xs))


def test_detectron2_per_mask_path_keeps_them_too(eye):
    record, ys, xs = eye
    some = 30  # Detectron2 transforms a full-size mask per lesion: slow
    record = dict(record, annotations=record["annotations"][:some])
    mapper = LesionDatasetMapper(_cfg(), is_train=True)
    mapper.recompute_boxes = False  # Detectron2's own per-annotation transform
    instances = mapper(record)["instances"]
    instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
    _assert_one_pixel_each(instances, *_expected_pixels(ys[:some], xs[:some]))


def test_they_survive_flips_turns_and_zoom_too(eye):
    record, _, _ = eye
    mapper = LesionDatasetMapper(
        _cfg(HFLIP=True, VFLIP=True, ROT90=True, SCALE=(0.9, 1.1)), is_train=True
    )
    for seed in range(2):
        np.random.seed(seed)
        instances = mapper(record)["instances"]
        masks = instances.gt_masks.tensor
        # A zoom above 1 may give a lesion a second pixel; none has none.
        assert len(instances) == 100 and (masks.sum(dim=(1, 2)) >= 1).all()
        boxes = instances.gt_masks.get_bounding_boxes().tensor
        assert torch.equal(instances.gt_boxes.tensor, boxes)


def test_semantic_targets_keep_every_lesion_and_match_the_instances(eye):
    record, ys, xs = eye
    arguments = LesionDatasetMapper.from_config(_cfg(HFLIP=True, SCALE=(0.9, 1.1)), is_train=True)
    mapper = LesionDatasetMapper(**dict(arguments, semantic_classes=["microaneurysm"]))
    np.random.seed(0)
    out = mapper(dict(record))
    union = out["instances"].gt_masks.tensor.any(dim=0)
    assert ndimage.label(out["sem_seg"][0].numpy() == 1)[1] == 100
    assert torch.equal(out["sem_seg"][0] == 1, union)
    # Without augmentation: at the hand-worked pixels.
    arguments = LesionDatasetMapper.from_config(_cfg(), is_train=True)
    mapper = LesionDatasetMapper(**dict(arguments, semantic_classes=["microaneurysm"]))
    channel = mapper(record)["sem_seg"][0].numpy()
    expected = np.zeros(RESIZED, np.uint8)
    expected[_expected_pixels(ys, xs)] = 1
    np.testing.assert_array_equal(channel, expected)


# A 4x shrink of a 100x100 image, then a crop of its columns 12..24.
_SHRINK_THEN_CROP = [
    T.ResizeTransform(100, 100, 25, 25, Image.BILINEAR),
    CropTransform(12, 0, 13, 25),
]


def _small_record(tmp_path, pixels):
    Image.fromarray(np.full((100, 100, 3), 90, np.uint8)).save(tmp_path / "eye.png")
    mask = np.zeros((100, 100), bool)
    mask[tuple(np.array(pixels).T)] = True
    annotation = dict(segmentation=encode_rle(mask), bbox=[0.0, 0.0, 100.0, 100.0],
                      bbox_mode=BoxMode.XYWH_ABS, category_id=0, iscrowd=0)
    return dict(file_name=str(tmp_path / "eye.png"), height=100, width=100, image_id=1,
                annotations=[annotation])


@pytest.mark.parametrize("min_visible,kept", [(0.5, True), (0.6, False)])
def test_a_missed_lesion_cut_by_the_crop_is_measured_by_its_pixel_centres(
    tmp_path, min_visible, kept
):
    """Hand-worked: a 4x shrink samples source rows 2, 6, 10, ... so a lesion on row 40 is missed;
    its two pixel centres (columns 47, 48) land on columns 11 and 12, and the crop starting at
    column 12 keeps one of the two: half the lesion."""
    record = _small_record(tmp_path, [(40, 47), (40, 48)])
    mapper = LesionDatasetMapper(
        is_train=True,
        augmentations=_SHRINK_THEN_CROP,
        image_format="RGB",
        crop_min_visible=min_visible,
    )
    instances = mapper(record)["instances"]
    if kept:
        masks = instances.gt_masks.tensor.numpy()
        assert masks.shape == (1, 25, 13) and masks[0, 10, 0] and masks.sum() == 1
    else:
        assert len(instances) == 0


def test_a_lesion_moved_out_of_the_image_is_not_brought_back(tmp_path):
    record = _small_record(tmp_path, [(40, 5)])
    mapper = LesionDatasetMapper(
        is_train=True,
        augmentations=_SHRINK_THEN_CROP,
        image_format="RGB",
    )
    assert len(mapper(record)["instances"]) == 0
