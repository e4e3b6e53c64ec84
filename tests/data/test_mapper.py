"""LesionDatasetMapper on converted synthetic data, and on a scene whose lesions have a colour
of their own."""
import copy
import json

import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.data.detection_utils import SizeMismatchError
from detectron2.structures import BoxMode
from PIL import Image
from pycocotools import mask as mask_util

from retina_d2.config import get_retina_cfg
from retina_d2.data.converters.base import ConvertOptions
from retina_d2.data.converters.synthetic import convert
from retina_d2.data.mapper import LesionDatasetMapper
from retina_d2.data.preprocess import FieldOfViewCrop
from retina_d2.data.register import load_lesion_json
from test_preprocess import assert_mask_matches_colour, components, lesion_scene, tight_box

pytestmark = pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")

SIZE = 256
OPTIC_DISC_ID = 5  # category id of "optic disc" in the synthetic conversion


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """split -> records of a converted 4-image synthetic dataset (Detectron2 dataset dicts)."""
    out = tmp_path_factory.mktemp("synthetic")
    convert(None, out, ConvertOptions(progress=False), count=4, size=SIZE)
    manifest = json.loads((out / "retina_d2.json").read_text())
    image_root = str(out / manifest["image_root"])
    return {
        split: load_lesion_json(str(out / rel), image_root)
        for split, rel in manifest["tasks"]["seg"].items()
    }


def _cfg(**aug):
    cfg = get_retina_cfg()
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MASK_FORMAT = "bitmask"
    cfg.INPUT.MIN_SIZE_TRAIN = (192,)
    cfg.INPUT.MAX_SIZE_TRAIN = 400
    cfg.INPUT.MIN_SIZE_TEST = 192
    cfg.INPUT.MAX_SIZE_TEST = 400
    cfg.MODEL.MASK_ON = True
    cfg.INPUT.MASK_FORMAT = "bitmask"
    for key, value in aug.items():
        setattr(cfg.RETINA.AUG, key, value)
    return cfg


def _no_jitter(**aug):
    return _cfg(BRIGHTNESS=(1.0, 1.0), CONTRAST=(1.0, 1.0), SATURATION=(1.0, 1.0), **aug)


def _in_frame(**aug):
    """Augmentations that keep every lesion in the frame: flips and quarter turns only."""
    return _no_jitter(TRANSLATE=0.0, SCALE=(1.0, 1.0), **aug)


def _expected_fov_box(size):
    centre, radius = (size - 1) / 2, 0.46 * size
    lo, hi = np.ceil(centre - radius), np.floor(centre + radius) + 1
    return [lo, lo, hi, hi]


def _assert_boxes_tight(instances):
    masks = instances.gt_masks.tensor.numpy()
    for box, mask in zip(instances.gt_boxes.tensor.numpy(), masks):
        np.testing.assert_allclose(box, tight_box(mask), atol=1.0)


def test_training_yields_one_instance_per_annotation(records):
    mapper = LesionDatasetMapper(_in_frame(), is_train=True)
    np.random.seed(0)
    for record in records["train"]:
        out = mapper(record)
        instances = out["instances"]
        assert out["image"].dtype == torch.uint8 and out["image"].shape[0] == 3
        assert min(out["image"].shape[1:]) == 192
        assert instances.image_size == tuple(out["image"].shape[1:])
        assert sorted(instances.gt_classes.tolist()) == sorted(
            a["category_id"] for a in record["annotations"]
        )
        assert instances.gt_masks.tensor.shape[1:] == out["image"].shape[1:]
        assert instances.gt_masks.tensor.flatten(1).any(dim=1).all()
        _assert_boxes_tight(instances)
        assert (out["height"], out["width"]) == (SIZE, SIZE) and "annotations" not in out


def test_training_keeps_masks_on_their_lesions(tmp_path):
    """The full augmentation (shift and zoom included) through the mapper: masks cover the pixels
    of the lesion colour, and boxes are the masks' tight boxes, recomputed or transformed."""
    image, mask = lesion_scene(180, 240, seed=5, count=8)
    path = tmp_path / "scene.png"
    Image.fromarray(image).save(path)
    annotations = []
    for lesion in components(mask):
        x0, y0, x1, y1 = tight_box(lesion)
        rle = mask_util.encode(np.asfortranarray(lesion.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        annotations.append(
            dict(
                bbox=[x0, y0, x1 - x0, y1 - y0],
                bbox_mode=BoxMode.XYWH_ABS,
                category_id=0,
                iscrowd=0,
                segmentation=rle,
            )
        )
    record = dict(file_name=str(path), height=180, width=240, image_id=1, annotations=annotations)
    cfg = _no_jitter(TRANSLATE=0.1, SCALE=(0.9, 1.1))
    cfg.INPUT.MIN_SIZE_TRAIN = (120, 150, 180)
    recomputing = LesionDatasetMapper(cfg, is_train=True)
    transforming = LesionDatasetMapper(
        **dict(LesionDatasetMapper.from_config(cfg, is_train=True), recompute_boxes=False)
    )
    for mapper in (recomputing, transforming):
        for seed in range(6):
            np.random.seed(seed)
            out = mapper(record)
            instances = out["instances"]
            assert len(instances) == len(annotations)
            union = instances.gt_masks.tensor.any(dim=0).numpy()
            assert_mask_matches_colour(out["image"].permute(1, 2, 0).numpy(), union, band=2)
            _assert_boxes_tight(instances)


def test_healthy_eye_gives_empty_instances(records):
    mapper = LesionDatasetMapper(_cfg(), is_train=True)
    for healthy in (
        dict(records["train"][0], annotations=[]),
        {k: v for k, v in records["train"][0].items() if k != "annotations"},
    ):
        out = mapper(healthy)
        instances = out["instances"]
        assert len(instances) == 0
        assert instances.gt_boxes.tensor.shape == (0, 4) and instances.gt_classes.shape == (0,)
        assert instances.gt_masks.tensor.shape == (0, *out["image"].shape[1:])
        assert instances.image_size == tuple(out["image"].shape[1:])


def test_crowd_annotations_are_dropped(records):
    record = copy.deepcopy(records["train"][0])
    for anno in record["annotations"]:
        if anno["category_id"] == OPTIC_DISC_ID:
            anno["iscrowd"] = 1
    np.random.seed(0)
    out = LesionDatasetMapper(_in_frame(), is_train=True)(record)
    classes = out["instances"].gt_classes.tolist()
    assert OPTIC_DISC_ID not in classes and len(classes) == len(record["annotations"]) - 1


def test_fov_crop_keeps_annotations_in_the_black_border(records):
    record = copy.deepcopy(records["train"][0])
    corner = np.zeros((SIZE, SIZE), np.uint8)
    corner[2:6, 3:8] = 1  # outside the FOV disc
    rle = mask_util.encode(np.asfortranarray(corner))
    record["annotations"].append(
        dict(
            bbox=[3, 2, 5, 4],
            bbox_mode=BoxMode.XYWH_ABS,
            category_id=1,
            iscrowd=0,
            segmentation=rle,
        )
    )
    cfg = _in_frame(HFLIP=False, VFLIP=False, ROT90=False)
    cfg.INPUT.MIN_SIZE_TRAIN = (0,)  # no resize: the output is the crop itself
    out = LesionDatasetMapper(cfg, is_train=True)(record)
    assert len(out["instances"]) == len(record["annotations"])
    # The crop now starts at the lesion's corner.
    np.testing.assert_array_equal(out["instances"].gt_boxes.tensor[-1].numpy(), [0, 0, 5, 4])


def test_inference_records_the_fov_crop(records):
    record = records["val"][0]
    out = LesionDatasetMapper(_cfg(), is_train=False)(record)
    assert "annotations" not in out and "instances" not in out
    assert (out["height"], out["width"]) == (SIZE, SIZE)
    x0, y0, x1, y1 = out["fov_box"]
    np.testing.assert_allclose(out["fov_box"], _expected_fov_box(SIZE), atol=2)
    assert min(out["image"].shape[1:]) == 192
    # Resized back to the box and put there, the network input is the original image.
    original = np.asarray(Image.open(record["file_name"]).convert("RGB")).astype(float)
    pasted = np.asarray(
        Image.fromarray(out["image"].permute(1, 2, 0).numpy()).resize((x1 - x0, y1 - y0))
    ).astype(float)
    def error(dx, dy):  # of pasting one pixel off
        inner = pasted[2:-2, 2:-2]
        return np.abs(inner - original[y0 + 2 + dy : y1 - 2 + dy, x0 + 2 + dx : x1 - 2 + dx]).mean()

    errors = {(dx, dy): error(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)}
    assert errors[0, 0] < 3 and min(errors, key=errors.get) == (0, 0)
    cfg = _cfg()
    cfg.RETINA.PREPROCESS.FOV_CROP = False
    assert "fov_box" not in LesionDatasetMapper(cfg, is_train=False)(record)


def test_polygon_mask_format_on_rle_data_is_refused(records):
    cfg = _cfg()
    cfg.INPUT.MASK_FORMAT = "polygon"
    mapper = LesionDatasetMapper(cfg, is_train=True)
    with pytest.raises(ValueError, match="INPUT.MASK_FORMAT to 'bitmask'") as error:
        mapper(records["train"][0])
    assert records["train"][0]["file_name"] in str(error.value)


def test_built_from_config_or_arguments_alike(records):
    cfg = _cfg()
    from_cfg = LesionDatasetMapper(cfg, is_train=True)
    from_args = LesionDatasetMapper(**LesionDatasetMapper.from_config(cfg, is_train=True))
    record = records["train"][1]
    snapshot = copy.deepcopy(record)
    outputs = []
    for mapper in (from_cfg, from_args):
        np.random.seed(3)
        outputs.append(mapper(record))
    assert torch.equal(outputs[0]["image"], outputs[1]["image"])
    masks = [o["instances"].gt_masks.tensor for o in outputs]
    assert torch.equal(masks[0], masks[1])
    assert record == snapshot  # the mapper works on a copy


def test_image_size_is_checked(records):
    record = dict(records["val"][0], width=SIZE + 1)
    with pytest.raises(SizeMismatchError):
        LesionDatasetMapper(_cfg(), is_train=False)(record)


def test_fov_crop_after_a_geometric_transform_is_refused(records):
    mapper = LesionDatasetMapper(
        is_train=False,
        augmentations=[T.RandomFlip(prob=1.0), FieldOfViewCrop(20)],
        image_format="RGB",
    )
    with pytest.raises(ValueError, match="must come before every geometric augmentation"):
        mapper(records["val"][0])


def test_layered_fast_path_equals_detectron2_per_mask_path(tmp_path):
    """The label-map path gives exactly the masks, classes and boxes of Detectron2's own
    per-instance transform, over random augmentations (crop, flips, rotations, shift/zoom)."""
    from detectron2.data import detection_utils as d2_utils

    from retina_d2.config import get_retina_cfg
    from retina_d2.data.converters import ConvertOptions, synthetic
    from retina_d2.data.mapper import LesionDatasetMapper
    from retina_d2.data.register import load_lesion_json

    out = tmp_path / "synthetic"
    synthetic.convert(None, out, ConvertOptions(progress=False, semantic=False), count=4, size=256)
    records = load_lesion_json(str(out / "train.json"), str(out / "raw"))
    cfg = get_retina_cfg()
    cfg.MODEL.MASK_ON = True
    cfg.INPUT.MASK_FORMAT = "bitmask"
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (200,), 200
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE = "absolute", [120, 120]
    fast = LesionDatasetMapper(cfg, is_train=True)
    slow = LesionDatasetMapper(cfg, is_train=True)
    slow.recompute_boxes = False  # takes Detectron2's path; boxes recomputed below
    compared = 0
    for seed in range(6):
        for record in records:
            np.random.seed(seed)
            a = fast(record)["instances"]
            np.random.seed(seed)
            b = slow(record)["instances"]
            b.gt_boxes = b.gt_masks.get_bounding_boxes()
            b = d2_utils.filter_empty_instances(b)
            assert torch.equal(a.gt_masks.tensor, b.gt_masks.tensor)
            assert torch.equal(a.gt_classes, b.gt_classes)
            assert torch.equal(a.gt_boxes.tensor, b.gt_boxes.tensor)
            compared += len(a)
    assert compared > 50
