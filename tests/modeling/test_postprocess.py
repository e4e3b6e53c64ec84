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


def test_the_inference_pipeline_merges_a_lesion_rcnn_when_configured():
    """MODEL.LESION_MERGE is build_inference_model's last step: the model's own output is
    Detectron2's instances as they are; the pipeline merges them once."""
    from detectron2.modeling import build_model

    from retina_d2.config import get_retina_cfg
    from retina_d2.modeling.inference import build_inference_model

    cfg = get_retina_cfg()
    cfg.merge_from_file("configs/quick_schedules/maskrcnn_synthetic_instant_test.yaml")
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    torch.manual_seed(0)
    plain = build_model(cfg).eval()
    cfg.MODEL.LESION_MERGE.ENABLED = True
    cfg.MODEL.LESION_MERGE.SCORE_THRESH = 0.0
    model = build_model(cfg).eval()
    model.load_state_dict(plain.state_dict())
    image = torch.randint(0, 255, (3, 128, 128), dtype=torch.uint8)
    with torch.no_grad():
        raw = plain([{"image": image, "height": 128, "width": 128}])[0]["instances"]
        unmerged = model([{"image": image, "height": 128, "width": 128}])[0]["instances"]
        got = build_inference_model(cfg, model)([{"image": image, "height": 128,
                                                  "width": 128}])[0]["instances"]
    assert len(raw) > 1
    assert torch.equal(unmerged.pred_masks, raw.pred_masks)  # the model itself never merges
    expected = merge_connected_lesions(raw, 0.0)
    assert len(got) == len(expected) <= len(raw)
    torch.testing.assert_close(got.scores, expected.scores)
    assert torch.equal(got.pred_masks, expected.pred_masks)


def _reference_merge(instances, threshold, connectivity):
    """The definition, pixel by pixel over the whole frame: per class, the connected components
    of the union of the confident masks, each scored by the best prediction touching it; the
    rest as they were. Returns a set of (class, score, box, mask bytes)."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(2, 2 if connectivity == 8 else 1)
    masks = instances.pred_masks.numpy()
    scores, classes = instances.scores.numpy(), instances.pred_classes.numpy()
    out = set()
    for cls in set(classes[scores >= threshold].tolist()):
        members = [i for i in range(len(scores)) if classes[i] == cls and scores[i] >= threshold]
        labels, count = ndimage.label(np.any(masks[members], axis=0), structure=structure)
        for k in range(1, count + 1):
            region = labels == k
            score = max(float(scores[i]) for i in members if (masks[i] & region).any())
            ys, xs = np.nonzero(region)
            box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            out.add((cls, round(score, 6), tuple(float(v) for v in box), region.tobytes()))
    for i in np.flatnonzero(scores < threshold):
        box = tuple(float(v) for v in instances.pred_boxes.tensor[i].tolist())
        out.add((int(classes[i]), round(float(scores[i]), 6), box, masks[i].tobytes()))
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("connectivity", [4, 8])
def test_random_scenes_merge_as_the_pixelwise_definition_says(seed, connectivity):
    rng = np.random.default_rng(seed)
    size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
    specs = []
    for _ in range(int(rng.integers(1, 25))):
        y0, x0 = int(rng.integers(0, size[0] - 2)), int(rng.integers(0, size[1] - 2))
        y1, x1 = y0 + int(rng.integers(1, 9)), x0 + int(rng.integers(1, 9))
        specs.append((int(rng.integers(0, 3)), float(rng.uniform()), (y0, y1, x0, x1)))
    instances = _instances(specs, size)
    merged = merge_connected_lesions(instances, 0.4, connectivity)
    got = {
        (int(c), round(float(s), 6), tuple(float(v) for v in b.tolist()), m.numpy().tobytes())
        for c, s, b, m in zip(merged.pred_classes, merged.scores, merged.pred_boxes.tensor,
                              merged.pred_masks)
    }
    assert got == _reference_merge(instances, 0.4, connectivity)
    assert len(got) == len(merged)  # no instance twice
    assert torch.all(merged.scores[:-1] >= merged.scores[1:])  # sorted by score
