"""LesionRCNN: built from every config, forward on CPU (with a healthy image), FOV paste-back."""
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

import retina_d2.modeling  # noqa: F401  (registration)
from retina_d2.config import get_retina_cfg
from retina_d2.modeling.meta_arch.lesion_rcnn import LesionRCNN, paste_into_frame

CONFIGS = sorted(Path(__file__).resolve().parents[2].glob("configs/**/*.yaml"))


def _cfg(path):
    cfg = get_retina_cfg()
    cfg.merge_from_file(str(path))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


@pytest.mark.parametrize("path", [p for p in CONFIGS if not p.name.startswith("Base")], ids=lambda p: p.name)
def test_every_config_merges_and_builds(path):
    cfg = _cfg(path)
    # The second-step multi-task configs load a lesion-only run's weights that no test has.
    cfg.MODEL.MULTITASK.LESION_WEIGHTS = ""
    model = build_model(cfg)
    assert type(model).__name__ == cfg.MODEL.META_ARCHITECTURE
    if isinstance(model, LesionRCNN):
        assert model.roi_heads.num_classes == cfg.MODEL.ROI_HEADS.NUM_CLASSES


def _tiny_cfg():
    cfg = _cfg(Path(__file__).resolve().parents[2] / "configs/quick_schedules/maskrcnn_synthetic_instant_test.yaml")
    return cfg


def test_train_step_with_a_healthy_image_and_inference():
    torch.manual_seed(0)
    model = build_model(_tiny_cfg())
    inst = Instances((96, 96))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 10.0, 14.0, 14.0]]))
    inst.gt_classes = torch.tensor([0])
    masks = torch.zeros(1, 96, 96, dtype=torch.bool)
    masks[0, 10:14, 10:14] = True
    inst.gt_masks = BitMasks(masks)
    healthy = Instances((96, 96))
    healthy.gt_boxes = Boxes(torch.zeros(0, 4))
    healthy.gt_classes = torch.zeros(0, dtype=torch.long)
    healthy.gt_masks = BitMasks(torch.zeros(0, 96, 96, dtype=torch.bool))
    batch = [
        {"image": torch.randint(0, 255, (3, 96, 96), dtype=torch.uint8), "instances": inst},
        {"image": torch.randint(0, 255, (3, 96, 96), dtype=torch.uint8), "instances": healthy},
    ]
    with EventStorage(0):
        losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model([{"image": batch[0]["image"], "height": 200, "width": 300, "fov_box": [50, 20, 146, 116]}])
    assert out[0]["instances"].image_size == (200, 300)


def test_paste_into_frame_shifts_boxes_and_pads_masks():
    inst = Instances((4, 6))
    inst.pred_boxes = Boxes(torch.tensor([[1.0, 1.0, 3.0, 2.0]]))
    mask = torch.zeros(1, 4, 6, dtype=torch.bool)
    mask[0, 1:2, 1:3] = True
    inst.pred_masks = mask
    inst.scores = torch.tensor([0.9])
    out = paste_into_frame(inst, [10, 5, 16, 9], height=20, width=30)
    assert out.image_size == (20, 30)
    assert out.pred_boxes.tensor.tolist() == [[11.0, 6.0, 13.0, 7.0]]
    assert out.pred_masks.shape == (1, 20, 30)
    ys, xs = torch.nonzero(out.pred_masks[0], as_tuple=True)
    assert ys.tolist() == [6, 6] and xs.tolist() == [11, 12]
    assert out.scores.tolist() == [pytest.approx(0.9)]
