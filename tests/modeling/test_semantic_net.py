"""SemanticLesionNet and LesionRCNN's semantic head: training on padded, partly ignored targets,
probabilities at the original size, the field-of-view paste-back, and LesionFPNSemHead."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY, build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn

import retina_d2.modeling  # noqa: F401  (registration)
from retina_d2.config import get_retina_cfg
from retina_d2.modeling.losses import sigmoid_bce_loss
from retina_d2.modeling.meta_arch.lesion_rcnn import LesionRCNN
from retina_d2.modeling.meta_arch.semantic_net import (
    SemanticLesionNet,
    batch_semantic_targets,
    semantic_postprocess,
)
from retina_d2.modeling.semantic.simple_fpn_head import LesionFPNSemHead

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
NUM_LESIONS = 3


@SEM_SEG_HEADS_REGISTRY.register()
class TinyLesionTestHead(nn.Module):
    """The semantic head contract at its smallest: a 1x1 conv on one feature, bilinear upsampling
    to the input, BCE with 255 ignored. Records the loss stage of every training forward."""

    @configurable
    def __init__(self, *, in_feature: str, in_channels: int, num_classes: int):
        super().__init__()
        self.in_feature = in_feature
        self.predictor = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        self.loss_stage = 1
        self.stages_seen = []

    @classmethod
    def from_config(cls, cfg, input_shape):
        name = cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES[0]
        return {
            "in_feature": name,
            "in_channels": input_shape[name].channels,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
        }

    def forward(self, features, targets=None, image_size=None):
        logits = self.predictor(features[self.in_feature])
        logits = F.interpolate(logits, size=tuple(image_size), mode="bilinear", align_corners=False)
        if not self.training or targets is None:
            return logits, {}
        self.stages_seen.append(self.loss_stage)
        return logits, {"loss_tiny_bce": sigmoid_bce_loss(logits, targets)}


def tiny_semantic_cfg(head="TinyLesionTestHead"):
    """SemanticLesionNet on a slim FPN, ``NUM_LESIONS`` lesion channels."""
    cfg = get_retina_cfg()
    cfg.merge_from_file(str(CONFIGS / "quick_schedules/semantic_synthetic_instant_test.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.SEM_SEG_HEAD.NAME = head
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = NUM_LESIONS
    return cfg


def _targets(height, width, seed):
    """uint8 (C, H, W): a square lesion in channel 0, a 255 band in channel 1, channel 2 all
    ignored (a lesion not annotated on the image)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(NUM_LESIONS, height, width, dtype=torch.uint8)
    y, x = (int(v) for v in torch.randint(0, min(height, width) - 12, (2,), generator=g))
    t[0, y : y + 10, x : x + 10] = 1
    t[1, :, :5] = 255
    t[1, y : y + 4, x : x + 4] = 1
    t[2] = 255
    return t


def _batch():
    """Two images of different sizes: the smaller one's targets get padded."""
    g = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.randint(0, 255, (3, h, w), dtype=torch.uint8, generator=g),
            "sem_seg": _targets(h, w, i),
        }
        for i, (h, w) in enumerate([(72, 88), (64, 60)])
    ]


def test_targets_are_padded_with_ignore():
    batch = _batch()
    targets = batch_semantic_targets(batch, torch.device("cpu"), 32)
    assert targets.shape == (2, NUM_LESIONS, 96, 96) and targets.dtype == torch.uint8
    assert torch.equal(targets[1, :, :64, :60], batch[1]["sem_seg"])
    assert (targets[1, :, 64:] == 255).all() and (targets[1, :, :, 60:] == 255).all()
    with pytest.raises(ValueError, match="without 'sem_seg'"):
        batch_semantic_targets([{"image": batch[0]["image"], "file_name": "a.png"}], "cpu", 32)


def test_trains_a_few_iterations_and_predicts_probabilities_at_the_original_size():
    torch.manual_seed(0)
    model = build_model(tiny_semantic_cfg())
    assert isinstance(model, SemanticLesionNet)
    assert isinstance(model.sem_seg_head, TinyLesionTestHead)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    batch = _batch()
    losses = []
    with EventStorage(0):
        for _ in range(3):
            loss = sum(model(batch).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert model.sem_seg_head.stages_seen == [1, 1, 1]

    model.eval()
    with torch.no_grad():
        sized = {"image": batch[0]["image"], "height": 150, "width": 170}
        out = model([sized, {"image": batch[1]["image"]}])
    assert out[0]["sem_seg"].shape == (NUM_LESIONS, 150, 170)
    assert out[1]["sem_seg"].shape == (NUM_LESIONS, 64, 60)  # no size given: the input's
    for o in out:
        assert o["sem_seg"].dtype == torch.float32
        assert (o["sem_seg"] >= 0).all() and (o["sem_seg"] <= 1).all()


def test_fov_box_pastes_the_crop_prediction_into_the_original_frame():
    torch.manual_seed(0)
    model = build_model(tiny_semantic_cfg()).eval()
    image = _batch()[0]["image"]
    x0, y0, x1, y1 = 30, 12, 130, 102
    with torch.no_grad():
        framed = model([{"image": image, "height": 120, "width": 160, "fov_box": [x0, y0, x1, y1]}])
        framed = framed[0]["sem_seg"]
        on_crop = model([{"image": image, "height": y1 - y0, "width": x1 - x0}])[0]["sem_seg"]
    assert framed.shape == (NUM_LESIONS, 120, 160)
    torch.testing.assert_close(framed[:, y0:y1, x0:x1], on_crop)
    outside = torch.ones(120, 160, dtype=torch.bool)
    outside[y0:y1, x0:x1] = False
    assert (framed[:, outside] == 0).all() and (on_crop > 0).all()


def test_semantic_postprocess_softmax_drops_background():
    logits = torch.randn(NUM_LESIONS + 1, 40, 48)
    probs = semantic_postprocess(logits, (32, 40), 64, 80, activation="softmax")
    assert probs.shape == (NUM_LESIONS, 64, 80)
    assert (probs.sum(0) < 1).all()
    expected = F.interpolate(
        logits[None, :, :32, :40], size=(64, 80), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(probs, torch.softmax(expected[0], 0)[1:])
    with pytest.raises(ValueError, match="activation"):
        semantic_postprocess(logits, (32, 40), 64, 80, activation="relu")


def test_built_from_config_or_arguments_alike():
    cfg = tiny_semantic_cfg()
    torch.manual_seed(1)
    from_cfg = SemanticLesionNet(cfg).eval()
    torch.manual_seed(1)
    from_args = SemanticLesionNet(**SemanticLesionNet.from_config(cfg)).eval()
    inputs = [{"image": _batch()[0]["image"], "height": 50, "width": 60}]
    with torch.no_grad():
        torch.testing.assert_close(from_cfg(inputs)[0]["sem_seg"], from_args(inputs)[0]["sem_seg"])


def test_lesion_fpn_sem_head_trains_and_checks_its_config():
    torch.manual_seed(0)
    cfg = tiny_semantic_cfg("LesionFPNSemHead")
    model = build_model(cfg)
    assert isinstance(model.sem_seg_head, LesionFPNSemHead)
    with EventStorage(0):
        losses = model(_batch())
    assert set(losses) == {"loss_sem_seg_bce", "loss_sem_seg_dice"}
    sum(losses.values()).backward()
    assert model.sem_seg_head.predictor.weight.grad.abs().sum() > 0
    cfg.MODEL.LESION_SEG.ACTIVATION = "softmax"
    with pytest.raises(ValueError, match="ACTIVATION to 'sigmoid'"):
        build_model(cfg)
    cfg = tiny_semantic_cfg("LesionFPNSemHead")
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["p2", "res9"]
    with pytest.raises(ValueError, match="res9"):
        build_model(cfg)
    shapes = {"p2": ShapeSpec(channels=8, stride=4), "p3": ShapeSpec(channels=8, stride=8)}
    head = LesionFPNSemHead(
        input_shape=shapes, num_classes=2, conv_dims=8, common_stride=4, norm=""
    ).eval()
    features = {"p2": torch.randn(1, 8, 10, 12), "p3": torch.randn(1, 8, 5, 6)}
    logits, losses = head(features, None, (40, 48))
    assert logits.shape == (1, 2, 40, 48) and losses == {}


def _rcnn_cfg(loss_weight=1.0):
    cfg = get_retina_cfg()
    cfg.merge_from_file(str(CONFIGS / "quick_schedules/maskrcnn_synthetic_instant_test.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.LESION_SEG.ENABLED = True
    cfg.MODEL.LESION_SEG.LOSS_WEIGHT = loss_weight
    cfg.MODEL.SEM_SEG_HEAD.NAME = "LesionFPNSemHead"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = NUM_LESIONS
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 32
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # an untrained model's detections, to check
    return cfg


def test_lesion_rcnn_with_a_semantic_head_trains_both_and_returns_both():
    batch = _batch()
    for inputs in batch:
        h, w = inputs["image"].shape[1:]
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor([[10.0, 10.0, 20.0, 20.0]]))
        inst.gt_classes = torch.tensor([0])
        masks = torch.zeros(1, h, w, dtype=torch.bool)
        masks[0, 10:20, 10:20] = True
        inst.gt_masks = BitMasks(masks)
        inputs["instances"] = inst
    losses = {}
    for weight in (1.0, 2.5):
        torch.manual_seed(0)
        model = build_model(_rcnn_cfg(weight))
        assert isinstance(model, LesionRCNN) and isinstance(model.sem_seg_head, LesionFPNSemHead)
        torch.manual_seed(0)  # the same RPN / RoI sampling in both runs
        with EventStorage(0):
            losses[weight] = model(batch)
    expected = {"loss_mask", "loss_cls", "loss_rpn_cls", "loss_sem_seg_bce", "loss_sem_seg_dice"}
    assert expected <= set(losses[1.0])
    for name in ("loss_sem_seg_bce", "loss_sem_seg_dice"):
        torch.testing.assert_close(losses[2.5][name], 2.5 * losses[1.0][name])
    torch.testing.assert_close(losses[2.5]["loss_mask"], losses[1.0]["loss_mask"])
    sum(losses[2.5].values()).backward()

    model.eval()
    x0, y0, x1, y1 = 40, 20, 128, 92
    with torch.no_grad():
        framed = {"image": batch[0]["image"], "height": 110, "width": 150}
        out = model([dict(framed, fov_box=[x0, y0, x1, y1])])[0]
    assert out["instances"].image_size == (110, 150)
    assert out["sem_seg"].shape == (NUM_LESIONS, 110, 150)
    outside = torch.ones(110, 150, dtype=torch.bool)
    outside[y0:y1, x0:x1] = False
    assert (out["sem_seg"][:, outside] == 0).all() and (out["sem_seg"][:, ~outside] > 0).all()
    # Boxes were mapped through the crop, not rescaled to the whole frame.
    boxes = out["instances"].pred_boxes.tensor
    assert len(boxes) > 0
    assert (boxes[:, 0] >= x0).all() and (boxes[:, 2] <= x1).all()
    assert (boxes[:, 1] >= y0).all() and (boxes[:, 3] <= y1).all()


def test_lesion_rcnn_without_the_switch_has_no_semantic_head():
    cfg = _rcnn_cfg()
    cfg.MODEL.LESION_SEG.ENABLED = False
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.35
    model = build_model(cfg).eval()
    assert model.sem_seg_head is None
    with torch.no_grad():
        out = model([{"image": _batch()[0]["image"]}])[0]
    assert set(out) == {"instances"}
