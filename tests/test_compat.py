"""Detectron2 0.6 works on this stack through retina_d2.compat: imports, model zoo configs, a
Mask R-CNN forward and training step on CPU, checkpoints, and clear errors for _C-only features."""
import numpy as np
import PIL.Image
import pytest
import torch

import retina_d2  # noqa: F401  (applies the compat patches)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import SimpleTrainer
from detectron2.model_zoo import get_config_file
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from retina_d2 import compat


def test_removed_aliases_are_back():
    # Detectron2 0.6 writes e.g. mask.astype(np.bool) and np.zeros(n, dtype=np.int).
    assert np.zeros(2).astype(np.bool).dtype == np.bool_
    assert np.zeros(2, dtype=np.int).dtype.kind == "i"
    assert np.zeros(2).astype(np.float).dtype.kind == "f"
    assert PIL.Image.LINEAR == PIL.Image.Resampling.BILINEAR
    import detectron2.data.transforms  # uses Image.LINEAR as a default argument  # noqa: F401


def test_model_zoo_config_file_resolves():
    path = get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
    assert path.endswith("mask_rcnn_R_50_FPN_3x.yaml")
    cfg = get_cfg()
    cfg.merge_from_file(path)
    assert cfg.MODEL.MASK_ON


def test_collect_env_info_runs():
    from detectron2.utils.collect_env import collect_env_info

    info = collect_env_info()
    assert "detectron2" in info


@pytest.mark.skipif(compat.HAS_D2_EXTENSION, reason="a compiled detectron2._C is installed")
def test_extension_only_features_raise_clear_errors():
    from detectron2.layers import DeformConv, ROIAlignRotated, nms_rotated
    from detectron2.structures import RotatedBoxes, pairwise_iou_rotated

    boxes = RotatedBoxes(torch.tensor([[10.0, 10.0, 4.0, 4.0, 0.0]]))
    with pytest.raises(compat.MissingExtensionError, match="rotated-box IoU"):
        pairwise_iou_rotated(boxes, boxes)
    with pytest.raises(compat.MissingExtensionError, match="rotated-box NMS"):
        nms_rotated(boxes.tensor, torch.ones(1), 0.5)
    with pytest.raises(compat.MissingExtensionError, match="ROIAlignRotated"):
        ROIAlignRotated((2, 2), 1.0, 0)(torch.zeros(1, 1, 8, 8), torch.tensor([[0, 4, 4, 2, 2, 0.0]]))
    # On CPU, DeformConv runs through torchvision's deform_conv2d and needs no extension.
    conv = DeformConv(1, 1, 3, padding=1)
    assert conv(torch.zeros(1, 1, 8, 8), torch.zeros(1, 18, 8, 8)).shape == (1, 1, 8, 8)


def _tiny_mask_rcnn_cfg():
    cfg = get_cfg()
    cfg.merge_from_file(get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.NORM = "GN"  # frozen BN on random weights diverges; GN trains from scratch
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 32
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 32
    cfg.INPUT.MIN_SIZE_TEST = 128
    cfg.INPUT.MAX_SIZE_TEST = 128
    return cfg


def _batch():
    """Two 128x128 images: one with two lesions, one healthy (no instances)."""
    inputs = []
    for n in (2, 0):
        image = torch.randint(0, 255, (3, 128, 128), dtype=torch.uint8)
        inst = Instances((128, 128))
        boxes = torch.tensor([[20.0, 20.0, 50.0, 44.0], [70.0, 80.0, 90.0, 100.0]])[:n]
        masks = torch.zeros(n, 128, 128, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[i, y0:y1, x0:x1] = True
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.tensor([0, 1])[:n]
        inst.gt_masks = BitMasks(masks)
        inputs.append({"image": image, "instances": inst, "height": 128, "width": 128})
    return inputs


def test_mask_rcnn_forward_and_training_step_on_cpu(tmp_path):
    torch.manual_seed(0)
    cfg = _tiny_mask_rcnn_cfg()
    model = build_model(cfg)
    model.eval()
    with torch.no_grad():
        outputs = model([{"image": torch.randint(0, 255, (3, 128, 160), dtype=torch.uint8)}])
    assert outputs[0]["instances"].image_size == (128, 160)

    model.train()
    batch = _batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    trainer = SimpleTrainer(model, [batch] * 3, optimizer)
    trainer.train(0, 2)
    with EventStorage(0):
        losses = model(batch)
    assert {"loss_mask", "loss_cls", "loss_box_reg", "loss_rpn_cls"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())

    # Checkpoint round-trip through Detectron2's checkpointer (torch.load on a full checkpoint).
    checkpointer = DetectionCheckpointer(model, save_dir=str(tmp_path))
    checkpointer.save("model_test", iteration=2)
    clone = build_model(cfg)
    DetectionCheckpointer(clone).load(str(tmp_path / "model_test.pth"))
    for (name, a), (_, b) in zip(model.state_dict().items(), clone.state_dict().items()):
        assert torch.equal(a, b), name
