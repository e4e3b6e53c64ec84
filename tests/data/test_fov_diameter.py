"""RETINA.PREPROCESS.FOV_DIAMETER: every image is resized so its field of view is a set number of
pixels across, in training, evaluation and prediction, and predictions come back in the
photograph's own pixels. The same synthetic eye photographed at two resolutions (and framed
differently) gives the same network input and the same predictions, scaled."""
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import transforms as T
from detectron2.modeling import build_model

import retina_d2.modeling  # noqa: F401  (registration)
from retina_d2.config import get_retina_cfg
from retina_d2.data.mapper import LesionDatasetMapper
from retina_d2.data.preprocess import (
    FieldOfViewCircleMask,
    FieldOfViewCrop,
    FieldOfViewResize,
    build_preprocess,
    field_of_view_diameter,
)
from retina_d2.data.synthetic import image_rng, render_fundus

DIAMETER = 320


@pytest.fixture(scope="module")
def two_cameras(tmp_path_factory):
    """One synthetic eye: at 768 px in a wide black frame (camera A), and at 512 px filling its
    frame (camera B). Returns ((path, image) of A, (path, image) of B)."""
    folder = tmp_path_factory.mktemp("cameras")
    eye = render_fundus(image_rng(5, 0), size=768).image
    wide = np.zeros((768, 1000, 3), np.uint8)
    wide[:, 150:918] = eye
    small = cv2.resize(eye, (512, 512), interpolation=cv2.INTER_AREA)
    out = []
    for name, image in (("a.png", wide), ("b.png", small)):
        cv2.imwrite(str(folder / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        out.append((str(folder / name), image))
    return out


def _cfg(**preprocess):
    cfg = get_retina_cfg()
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TEST = 1024  # ignored once FOV_DIAMETER is set
    cfg.RETINA.PREPROCESS.FOV_DIAMETER = DIAMETER
    cfg.RETINA.PREPROCESS.GRAHAM = True
    for key, value in preprocess.items():
        setattr(cfg.RETINA.PREPROCESS, key, value)
    return cfg


def _mapped(cfg, path, image):
    record = {"file_name": path, "height": image.shape[0], "width": image.shape[1], "image_id": 0}
    return LesionDatasetMapper(cfg, is_train=False)(record)


def test_fov_diameter_replaces_the_shortest_edge_resize():
    cfg = _cfg()
    assert [type(a) for a in build_preprocess(cfg, is_train=False)][:3] == [
        FieldOfViewCrop, FieldOfViewCircleMask, FieldOfViewResize,
    ]
    assert not any(isinstance(a, T.ResizeShortestEdge) for a in build_preprocess(cfg, True))
    cfg.RETINA.PREPROCESS.FOV_DIAMETER = 0
    assert any(isinstance(a, T.ResizeShortestEdge) for a in build_preprocess(cfg, False))


def test_fov_resize_measures_the_eye_not_the_frame(two_cameras):
    (_, wide), (_, small) = two_cameras
    # The synthetic FOV is a disc of ~0.47 of the eye's size each side of the centre.
    assert field_of_view_diameter(wide, 20) == pytest.approx(field_of_view_diameter(small, 20) * 1.5, abs=2)
    tfm = FieldOfViewResize(DIAMETER).get_transform(wide)
    scale = DIAMETER / field_of_view_diameter(wide, 20)
    assert isinstance(tfm, T.ResizeTransform)
    assert (tfm.new_h, tfm.new_w) == (round(768 * scale), round(1000 * scale))


def test_two_resolutions_give_the_same_network_input(two_cameras):
    cfg = _cfg()
    (path_a, wide), (path_b, small) = two_cameras
    a, b = _mapped(cfg, path_a, wide), _mapped(cfg, path_b, small)
    assert a["image"].shape == b["image"].shape
    height, width = a["image"].shape[1:]
    assert abs(max(height, width) - DIAMETER) <= 2  # the crop is the FOV, now DIAMETER across
    diff = (a["image"].float() - b["image"].float()).abs()
    # Resampling differs (768 -> 320 and 512 -> 320); the eye does not.
    assert diff.mean() < 4 and np.percentile(diff.numpy(), 95) < 12
    # Camera A's frame was cropped in its own pixels; outputs are pasted back through it.
    assert a["fov_box"][0] >= 149 and a["fov_box"][2] <= 919
    assert (a["height"], a["width"]) == (768, 1000) and (b["height"], b["width"]) == (512, 512)


def test_predictions_come_back_at_each_original_size_and_agree_scaled(two_cameras):
    cfg = _cfg()
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.META_ARCHITECTURE = "SemanticLesionNet"
    cfg.MODEL.BACKBONE.NAME = "build_lesion_resnet_backbone"
    cfg.MODEL.LESION_RESNET.STEM_OUT_CHANNELS = 32
    cfg.MODEL.LESION_RESNET.RES2_OUT_CHANNELS = 32
    cfg.MODEL.LESION_RESNET.OUT_FEATURES = ["res2", "res3"]
    cfg.MODEL.SEM_SEG_HEAD.NAME = "LesionFPNSemHead"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res3"]
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 1
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 32
    cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE = 4
    cfg.MODEL.SEM_SEG_HEAD.NORM = "GN"
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    (path_a, wide), (path_b, small) = two_cameras
    with torch.no_grad():
        prob_a = model([_mapped(cfg, path_a, wide)])[0]["sem_seg"][0]
        prob_b = model([_mapped(cfg, path_b, small)])[0]["sem_seg"][0]
    assert prob_a.shape == (768, 1000) and prob_b.shape == (512, 512)
    assert prob_a[:, :140].abs().max() == 0  # the black frame outside the FOV crop
    # Camera A's map, cut to its eye and brought to camera B's pixels, is camera B's map.
    eye_a = F.interpolate(prob_a[None, None, :, 150:918], size=(512, 512), mode="area")[0, 0]
    fov = torch.from_numpy(small.max(axis=2) > 20)
    # Random weights amplify resampling differences; a map of another eye (A's upside down)
    # differs by ~0.38 on average, the same eye by ~0.04.
    assert (eye_a - prob_b)[fov].abs().mean() < 0.1
    assert (eye_a.flip(0) - prob_b)[fov].abs().mean() > 0.2
    # A "detection" (the map's top 1% inside the eye) lands on the same places.
    top_a, top_b = (p[fov] >= torch.quantile(p[fov], 0.99) for p in (eye_a, prob_b))
    assert (top_a & top_b).sum() / (top_a | top_b).sum() > 0.75


def test_training_annotations_follow_the_fov_resize(two_cameras):
    cfg = _cfg()
    for key in ("HFLIP", "VFLIP", "ROT90"):
        setattr(cfg.RETINA.AUG, key, False)
    cfg.RETINA.AUG.TRANSLATE, cfg.RETINA.AUG.SCALE = 0.0, (1.0, 1.0)
    cfg.RETINA.AUG.BRIGHTNESS = cfg.RETINA.AUG.CONTRAST = cfg.RETINA.AUG.SATURATION = (1.0, 1.0)
    (_, wide), _ = two_cameras
    box = np.array([[500.0, 300.0, 540.0, 330.0]])  # a lesion's box in camera A's pixels
    aug_input = T.AugInput(wide, boxes=box)
    transforms = T.AugmentationList(build_preprocess(cfg, is_train=True))(aug_input)
    scale = DIAMETER / field_of_view_diameter(wide, 20)
    crop = transforms.transforms[0]  # the FOV crop
    expected = (box - [crop.x0, crop.y0, crop.x0, crop.y0]) * scale
    np.testing.assert_allclose(aug_input.boxes, expected, atol=1.0)
