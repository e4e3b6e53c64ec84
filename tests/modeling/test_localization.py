"""Landmark localization: landmarks moved with the image by the mapper (absent when cropped away),
Gaussian heatmap targets, the masked heatmap loss, sub-cell decoding and the way back to the
original image's pixels."""
import math

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.layers import ShapeSpec

from retina_d2.config import get_retina_cfg
from retina_d2.data.mapper import LesionDatasetMapper, transform_landmarks
from retina_d2.data.preprocess import build_preprocess
from retina_d2.modeling.localization import (
    LandmarkHeatmapHead,
    decode_heatmaps,
    gaussian_heatmaps,
    heatmap_loss,
    landmark_targets,
    to_original_frame,
    valid_cells,
)


def test_landmarks_follow_crop_resize_and_flip_and_vanish_when_cropped_away():
    transforms = T.TransformList([
        T.CropTransform(10, 20, 100, 80),  # x0, y0, w, h
        T.ResizeTransform(80, 100, 40, 50),  # h, w -> new h, new w
        T.HFlipTransform(50),
    ])
    record = {"optic_disc_center": [60.0, 50.0], "fovea_center": [5.0, 5.0]}
    # (60, 50) - (10, 20) = (50, 30); halved: (25, 15); mirrored in a 50 px width: 50 - 25.
    assert transform_landmarks(record, transforms, (40, 50)) == {"optic_disc": (25.0, 15.0)}
    assert transform_landmarks({"fovea_center": [30.0, 40.0]}, transforms, (40, 50)) == {
        "fovea": (50 - 10.0, 10.0)
    }
    assert transform_landmarks({}, transforms, (40, 50)) == {}


def _write_image(path, height=60, width=80):
    image = np.full((height, width, 3), 90, np.uint8)
    cv2.imwrite(str(path), image)
    return {"file_name": str(path), "height": height, "width": width, "image_id": 0,
            "annotations": [], "optic_disc_center": [20.0, 30.0], "dr_grade": 2}


def test_the_training_mapper_adds_moved_landmarks_only_when_asked(tmp_path):
    record = _write_image(tmp_path / "eye.png")
    augmentations = [T.ResizeTransform(60, 80, 30, 40), T.HFlipTransform(40)]
    common = dict(is_train=True, augmentations=augmentations, image_format="RGB",
                  use_instance_mask=False, recompute_boxes=False, instance_targets=False)
    mapped = LesionDatasetMapper(**common, landmark_targets=True)(record)
    assert mapped["landmarks"] == {"optic_disc": (40 - 10.0, 15.0)}
    assert mapped["optic_disc_center"] == [20.0, 30.0]  # the record's field is left as it was
    assert mapped["dr_grade"] == 2  # grades travel with the record's fields
    assert "landmarks" not in LesionDatasetMapper(**common)(record)


def test_fov_crop_and_resize_are_undone_into_the_original_frame(tmp_path):
    cfg = get_retina_cfg()
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 96, 96
    image = np.zeros((150, 200, 3), np.uint8)
    cv2.circle(image, (110, 70), 60, (200, 120, 60), -1)  # a field of view off the centre
    augs = T.AugmentationList(build_preprocess(cfg, is_train=False))
    aug_input = T.AugInput(image)
    transforms = augs(aug_input)
    record = {"optic_disc_center": [131.0, 52.5], "fovea_center": [80.25, 90.0]}
    moved = transform_landmarks(record, transforms, aug_input.image.shape[:2])
    crop = next(t for t in transforms.transforms if isinstance(t, T.CropTransform))
    fov_box = [crop.x0, crop.y0, crop.x0 + crop.w, crop.y0 + crop.h]
    assert fov_box != [0, 0, 200, 150]
    points = torch.tensor([moved["optic_disc"], moved["fovea"]])
    back = to_original_frame(points, aug_input.image.shape[:2], 150, 200, fov_box)
    assert torch.allclose(back, torch.tensor([[131.0, 52.5], [80.25, 90.0]]), atol=1e-3)


def test_gaussian_targets_peak_on_the_landmark_and_skip_padding_and_absent_ones():
    valid = valid_cells([(40, 56), (64, 64)], (8, 8), 8, "cpu")
    assert valid[0, 0].sum() == 5 * 7 and valid[1, 0].all()  # 40 x 56 px: 5 x 7 cells
    points = torch.tensor([[[21.0, 13.0], [0.0, 0.0]], [[60.0, 44.0], [3.0, 3.0]]])
    present = torch.tensor([[True, False], [True, True]])
    heat = gaussian_heatmaps(points, present, valid, stride=8, sigma=6.0)
    assert torch.allclose(heat.sum(dim=(2, 3)), present.float())
    assert heat[0, 1].abs().sum() == 0
    assert heat[0, 0][~valid[0, 0]].sum() == 0
    # Peak cell: the one holding the point (21 // 8, 13 // 8) -> column 2, row 1.
    assert divmod(int(heat[0, 0].argmax()), 8) == (1, 2)
    centre_x, centre_y = (2 + 0.5) * 8, (1 + 0.5) * 8
    expected = math.exp(-((21 - centre_x) ** 2 + (13 - centre_y) ** 2) / 72)
    ratio = heat[0, 0, 1, 2] / heat[0, 0, 1, 3]
    other = math.exp(-((21 - 28) ** 2 + (13 - centre_y) ** 2) / 72)
    assert float(ratio) == pytest.approx(expected / other, rel=1e-4)


def test_absent_landmarks_are_masked_out_of_the_loss():
    torch.manual_seed(0)
    valid = valid_cells([(32, 32)] * 2, (4, 4), 8, "cpu")
    points = torch.tensor([[[10.0, 12.0], [20.0, 20.0]], [[5.0, 25.0], [0.0, 0.0]]])
    present = torch.tensor([[True, True], [True, False]])
    targets = gaussian_heatmaps(points, present, valid, 8, 8.0)
    logits = torch.randn(2, 2, 4, 4, requires_grad=True)
    loss = heatmap_loss(logits, targets, present, valid)
    loss.backward()
    assert logits.grad[1, 1].abs().sum() == 0
    # The mean over the three present pairs of KL(target || softmax), computed by hand.
    kls = []
    for i, j in ((0, 0), (0, 1), (1, 0)):
        p = torch.softmax(logits[i, j].detach().flatten(), 0)
        t = targets[i, j].flatten()
        kls.append(float((t[t > 0] * (t[t > 0].log() - p[t > 0].log())).sum()))
    assert loss.item() == pytest.approx(np.mean(kls), rel=1e-5)
    none = heatmap_loss(logits, targets, torch.zeros_like(present), valid)
    assert none.item() == 0.0 and none.requires_grad


def test_decoding_finds_a_peak_between_cell_centres_and_ignores_padding():
    stride, sigma = 8, 8.0
    valid = valid_cells([(48, 64)], (8, 8), stride, "cpu")  # the last 2 rows are padding
    truth = torch.tensor([[[37.3, 21.9]]])
    heat = gaussian_heatmaps(truth, torch.tensor([[True]]), valid, stride, sigma)
    logits = heat.clamp_min(1e-12).log()
    logits[0, 0, 7, 7] = 50.0  # a spurious peak in the padding
    points, scores = decode_heatmaps(logits, valid, stride, radius=2)
    error = float((points[0, 0] - truth[0, 0]).norm())
    peak_cell_error = math.hypot(36 - 37.3, 20 - 21.9)  # centre of the cell holding the truth
    assert error < 1.0 < peak_cell_error
    assert 0.9 < float(scores[0, 0]) <= 1.0
    only_peak, _ = decode_heatmaps(logits, valid, stride, radius=0)
    assert torch.allclose(only_peak[0, 0], torch.tensor([36.0, 20.0]))


def test_head_builds_from_config_and_predicts_at_its_finest_stride():
    cfg = get_retina_cfg()
    cfg.MODEL.LOCALIZATION.LANDMARKS = ["optic_disc", "fovea"]
    cfg.MODEL.LOCALIZATION.IN_FEATURES = ["res4", "res3"]
    cfg.MODEL.LOCALIZATION.CONVS_DIM = 16
    shapes = {"res3": ShapeSpec(channels=8, stride=8), "res4": ShapeSpec(channels=12, stride=16)}
    head = LandmarkHeatmapHead(cfg, shapes)
    assert head.stride == 8 and head.landmarks == ["optic_disc", "fovea"]
    features = {"res3": torch.randn(2, 8, 6, 5), "res4": torch.randn(2, 12, 3, 3)}
    logits = head(features)
    assert logits.shape == (2, 2, 6, 5)
    inputs = [{"landmarks": {"optic_disc": (10.0, 20.0)}}, {"landmarks": {}}]
    losses = head.losses(logits, inputs, [(48, 40), (40, 40)])
    assert set(losses) == {"loss_landmarks"} and losses["loss_landmarks"] > 0
    points, present = landmark_targets(inputs, head.landmarks, "cpu")
    assert present.tolist() == [[True, False], [False, False]]
    cfg.MODEL.LOCALIZATION.IN_FEATURES = ["res5"]
    with pytest.raises(ValueError, match="MODEL.LOCALIZATION.IN_FEATURES"):
        LandmarkHeatmapHead(cfg, shapes)
    with pytest.raises(ValueError, match="MODEL.LOCALIZATION.LANDMARKS"):
        LandmarkHeatmapHead(shapes, landmarks=["macula"])
