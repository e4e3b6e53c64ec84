"""Merging touching predictions into the connected lesions the datasets define."""
import numpy as np
import pytest
import torch
from detectron2.structures import Boxes, Instances

from retina_d2.modeling.postprocess import merge_connected_lesions


def _instances(specs, size=(20, 30)):
    """specs: (class, score, (y0, y1, x0, x1)) per prediction, mask = that rectangle."""
    masks = torch.zeros((len(specs), *size), dtype=torch.bool)
    boxes = []
    for n, (_, _, (y0, y1, x0, x1)) in enumerate(specs):
        masks[n, y0:y1, x0:x1] = True
        boxes.append([x0, y0, x1, y1])
    inst = Instances(size)
    inst.pred_masks = masks
    inst.scores = torch.tensor([s for _, s, _ in specs])
    inst.pred_classes = torch.tensor([c for c, _, _ in specs])
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    return inst


def test_touching_confident_predictions_of_a_class_become_one_lesion():
    inst = _instances([
        (0, 0.9, (2, 5, 2, 5)),    # a and b overlap: one plaque
        (0, 0.6, (4, 8, 4, 9)),
        (0, 0.5, (8, 10, 9, 12)),  # touches b at a corner: same plaque with 8-connectivity
        (1, 0.8, (2, 5, 2, 5)),    # another lesion type on the same pixels: separate
        (0, 0.7, (15, 18, 20, 25)),  # far away: its own lesion
        (0, 0.2, (4, 6, 4, 6)),    # below the threshold: kept as it is
    ])
    out = merge_connected_lesions(inst, score_threshold=0.35)
    assert out.scores.tolist() == pytest.approx([0.9, 0.8, 0.7, 0.2])
    assert out.pred_classes.tolist() == [0, 1, 0, 0]
    plaque = np.zeros((20, 30), bool)
    plaque[2:5, 2:5] = plaque[4:8, 4:9] = plaque[8:10, 9:12] = True
    np.testing.assert_array_equal(out.pred_masks[0].numpy(), plaque)
    assert out.pred_boxes.tensor[0].tolist() == [2, 2, 12, 10]
    assert out.pred_boxes.tensor[3].tolist() == [4, 4, 6, 6] and out.pred_masks[3].sum() == 4
    # 4-connectivity: the corner contact no longer joins.
    four = merge_connected_lesions(inst, score_threshold=0.35, connectivity=4)
    assert four.scores.tolist() == pytest.approx([0.9, 0.8, 0.7, 0.5, 0.2])
    # Everything below the threshold: nothing changes but the order.
    same = merge_connected_lesions(inst, score_threshold=0.95)
    assert sorted(same.scores.tolist()) == sorted(inst.scores.tolist())
    with pytest.raises(ValueError, match="connectivity"):
        merge_connected_lesions(inst, 0.35, connectivity=6)


def test_lesion_rcnn_merges_when_configured():
    from detectron2.modeling import build_model

    from retina_d2.config import get_retina_cfg

    cfg = get_retina_cfg()
    cfg.merge_from_file("configs/quick_schedules/maskrcnn_synthetic_instant_test.yaml")
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    torch.manual_seed(0)
    plain = build_model(cfg).eval()
    cfg.MODEL.LESION_MERGE.ENABLED = True
    cfg.MODEL.LESION_MERGE.SCORE_THRESH = 0.0
    merging = build_model(cfg).eval()
    merging.load_state_dict(plain.state_dict())
    image = torch.randint(0, 255, (3, 128, 128), dtype=torch.uint8)
    with torch.no_grad():
        raw = plain([{"image": image, "height": 128, "width": 128}])[0]["instances"]
        got = merging([{"image": image, "height": 128, "width": 128}])[0]["instances"]
    assert len(raw) > 1
    expected = merge_connected_lesions(raw, 0.0)
    assert len(got) == len(expected) <= len(raw)
    torch.testing.assert_close(got.scores, expected.scores)
    assert torch.equal(got.pred_masks, expected.pred_masks)
