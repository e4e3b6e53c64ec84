"""RETINA.AUG.CROP_MIN_VISIBLE: a lesion the training crop cuts is kept only if enough of it is
left; 0 keeps Detectron2's rule (any visible part)."""
import numpy as np
import pytest
import torch
from detectron2.structures import BoxMode
from fvcore.transforms.transform import CropTransform, HFlipTransform, TransformList
from PIL import Image
from pycocotools import mask as mask_util

from retina_d2.config import get_retina_cfg
from retina_d2.data.mapper import LesionDatasetMapper, _layered_instances
from retina_d2.data.preprocess import FieldOfViewCropTransform

pytestmark = pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")

HEIGHT, WIDTH = 60, 80
# Boxes (x0, y0, x1, y1) of 10x10 lesions; category = position in the list.
LESIONS = [(15, 15, 25, 25), (35, 15, 45, 25), (22, 32, 32, 42), (50, 40, 60, 50),
           (5, 45, 15, 55), (62, 5, 72, 15)]


def _annotation(category, box):
    x0, y0, x1, y1 = box
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[y0:y1, x0:x1] = 1
    rle = mask_util.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    return dict(bbox=[x0, y0, x1 - x0, y1 - y0], bbox_mode=BoxMode.XYWH_ABS,
                category_id=category, iscrowd=0, segmentation=rle)


def _classes(instances):
    return sorted(instances.gt_classes.tolist())


def test_hand_worked_crop_keeps_lesions_with_enough_area_inside():
    """An 80x60 file, a FOV crop of 10 px at the left (which cuts nothing), then a crop whose
    left edge at x = 22 (FOV frame) leaves 3/10, 10/10 and 8/10 of lesions 0, 1 and 2."""
    annos = [_annotation(0, (25, 10, 35, 20)), _annotation(1, (40, 10, 50, 20)),
             _annotation(2, (30, 30, 40, 40)), _annotation(3, (70, 40, 80, 50))]
    fov = FieldOfViewCropTransform(10, 0, 70, 60, orig_w=WIDTH, orig_h=HEIGHT)
    # In the FOV frame lesion 0 spans x 15..25, 1 spans 30..40, 2 spans 20..30, 3 spans 60..70.
    crop = CropTransform(22, 5, 30, 40)
    transforms = TransformList([fov, crop, HFlipTransform(30)])

    def kept(min_visible):
        inst = _layered_instances(annos, transforms, (40, 30), (HEIGHT, WIDTH), min_visible)
        return _classes(inst)

    assert kept(0.0) == [0, 1, 2]  # Detectron2's rule; lesion 3 lies outside the crop
    assert kept(0.3) == [0, 1, 2]  # 3/10 is not below 0.3
    assert kept(0.31) == [1, 2]
    assert kept(0.8) == [1, 2]
    assert kept(0.81) == [1]
    assert kept(1.0) == [1]
    # The masks of what is kept are those of the permissive rule.
    loose = _layered_instances(annos, transforms, (40, 30), (HEIGHT, WIDTH), 0.0)
    strict = _layered_instances(annos, transforms, (40, 30), (HEIGHT, WIDTH), 0.5)
    keep = [c in (1, 2) for c in loose.gt_classes.tolist()]
    assert torch.equal(strict.gt_masks.tensor, loose.gt_masks.tensor[keep])
    assert torch.equal(strict.gt_boxes.tensor, loose.gt_boxes.tensor[keep])


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    image = np.full((HEIGHT, WIDTH, 3), 90, np.uint8)
    Image.fromarray(image).save(path)
    annos = [_annotation(k, box) for k, box in enumerate(LESIONS)]
    return dict(file_name=str(path), height=HEIGHT, width=WIDTH, image_id=1, annotations=annos)


def _mapper(min_visible, lesion_prob=0.0):
    cfg = get_retina_cfg()
    cfg.MODEL.MASK_ON = True
    cfg.INPUT.MASK_FORMAT = "bitmask"
    cfg.INPUT.MIN_SIZE_TRAIN = (0,)  # no resize: the file's areas are the pre-crop areas
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE = "absolute", [30, 30]
    cfg.RETINA.PREPROCESS.FOV_CROP = False
    aug = cfg.RETINA.AUG
    aug.CROP_LESION_PROB = lesion_prob
    aug.TRANSLATE, aug.SCALE = 0.0, (1.0, 1.0)
    aug.BRIGHTNESS = aug.CONTRAST = aug.SATURATION = (1.0, 1.0)
    aug.CROP_MIN_VISIBLE = min_visible
    return LesionDatasetMapper(cfg, is_train=True)


@pytest.mark.parametrize("lesion_prob", [0.0, 0.5])
def test_mapper_drops_lesions_cut_below_the_fraction(record, lesion_prob):
    """Over random crops (uniform and lesion-centred) followed by flips and quarter turns: the
    strict mapper keeps exactly the lesions whose visible area (the permissive mapper's mask,
    which no later transform resizes) is at least half of their 100 px, with the same masks."""
    loose, strict = _mapper(0.0, lesion_prob), _mapper(0.5, lesion_prob)
    dropped_some = kept_cut = 0
    for seed in range(40):
        np.random.seed(seed)
        a = loose(record)["instances"]
        np.random.seed(seed)
        b = strict(record)["instances"]
        visible = a.gt_masks.tensor.flatten(1).sum(1)
        keep = visible >= 50
        assert _classes(b) == sorted(a.gt_classes[keep].tolist())
        assert torch.equal(b.gt_masks.tensor, a.gt_masks.tensor[keep])
        dropped_some += int((~keep).sum())
        kept_cut += int(((visible < 100) & keep).sum())
    assert dropped_some > 5 and kept_cut > 5  # both sides of the rule were exercised


def test_zero_is_the_default_and_any_fraction_above_it_keeps_every_visible_part(record):
    """The measuring path (split at the crop) transforms masks exactly as the plain path does."""
    assert get_retina_cfg().RETINA.AUG.CROP_MIN_VISIBLE == 0.0
    loose, tiny = _mapper(0.0, 0.5), _mapper(1e-9, 0.5)
    for seed in range(10):
        np.random.seed(seed)
        a = loose(record)["instances"]
        np.random.seed(seed)
        b = tiny(record)["instances"]
        assert torch.equal(a.gt_masks.tensor, b.gt_masks.tensor)
        assert torch.equal(a.gt_boxes.tensor, b.gt_boxes.tensor)
        assert torch.equal(a.gt_classes, b.gt_classes)


def test_bad_fractions_and_formats_are_refused():
    with pytest.raises(ValueError, match=r"CROP_MIN_VISIBLE\) must be in \[0, 1\]"):
        _mapper(1.5)
    cfg = get_retina_cfg()
    cfg.MODEL.MASK_ON = True
    cfg.INPUT.MASK_FORMAT = "polygon"
    cfg.RETINA.AUG.CROP_MIN_VISIBLE = 0.5
    with pytest.raises(ValueError, match="needs MODEL.MASK_ON with INPUT.MASK_FORMAT 'bitmask'"):
        LesionDatasetMapper(cfg, is_train=True)
