"""Test-time augmentation (retina_d2/modeling/tta.py): views turn back exactly (boxes, masks and
maps checked against hand-worked cases), a model that sees each view alike gives its plain output
after merging, detections merge by mask as worked out by hand, semantic maps average, the wrapper
composes with tiling, and tools/train_net.py --eval-only runs with it on and off."""
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from scipy import ndimage
from torch import nn

from retina_d2.config import ConfigError, get_retina_cfg
from retina_d2.engine import LesionTrainer
from retina_d2.modeling.inference import LesionMerging
from retina_d2.modeling.meta_arch.lesion_rcnn import paste_into_frame
from retina_d2.modeling.postprocess import merge_connected_lesions
from retina_d2.modeling.tiling import TiledInference
from retina_d2.modeling.tta import TestTimeAugmentation as TTA  # (not a pytest class)
from retina_d2.modeling.tta import (
    View,
    tta_views,
    undo_view_boxes,
    undo_view_map,
    view_image,
)

REPO = Path(__file__).resolve().parents[2]
QUICK = REPO / "configs/quick_schedules"
ALL_VIEWS = tta_views(flip=True, rotations=[1, 2, 3])


# ------------------------------------------------------------------------------------------------
# Views
# ------------------------------------------------------------------------------------------------


def test_views_of_the_config_switches():
    assert tta_views(False) == [View(False, 0)]
    assert tta_views(True) == [View(False, 0), View(True, 0)]
    assert tta_views(False, [2]) == [View(False, 0), View(False, 2)]
    # All 8 symmetries of the square, each once: the 8 images of an asymmetric pattern differ.
    pattern = torch.arange(9).reshape(3, 3)
    images = {tuple(view_image(pattern, v).flatten().tolist()) for v in ALL_VIEWS}
    assert len(ALL_VIEWS) == 8 and len(images) == 8
    with pytest.raises(ConfigError, match="RETINA.TTA.ROTATIONS"):
        tta_views(True, [4])


def test_a_quarter_turn_is_counter_clockwise_and_undone_by_hand():
    # 2x3 image; one counter-clockwise quarter turn puts its last column on top.
    image = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert view_image(image, View(False, 1)).tolist() == [[3, 6], [2, 5], [1, 4]]
    assert view_image(image, View(True, 0)).tolist() == [[3, 2, 1], [6, 5, 4]]
    for view in ALL_VIEWS:
        assert torch.equal(undo_view_map(view_image(image, view), view), image)
    # Box (1, 0, 3, 2) of a 4x6 (h x w) frame: turned once, a 6x4 frame, x' = y, y' = 6 - x.
    turned = torch.tensor([[0.0, 3.0, 2.0, 5.0]])
    assert undo_view_boxes(turned, View(False, 1), (6, 4)).tolist() == [[1.0, 0.0, 3.0, 2.0]]
    # Mirrored: x -> 6 - x.
    mirrored = torch.tensor([[3.0, 0.0, 5.0, 2.0]])
    assert undo_view_boxes(mirrored, View(True, 0), (4, 6)).tolist() == [[1.0, 0.0, 3.0, 2.0]]


@pytest.mark.parametrize("view", ALL_VIEWS)
def test_boxes_turn_back_onto_the_pixels_they_framed(view):
    """A lit rectangle of a 7x11 frame: its box in each view, turned back, is the original box."""
    image = torch.zeros((7, 11), dtype=torch.bool)
    image[1:4, 2:8] = True
    seen = view_image(image, view)
    rows, cols = torch.nonzero(seen, as_tuple=True)
    box = torch.tensor([[cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]]).float()
    back = undo_view_boxes(box, view, tuple(seen.shape))
    assert back.tolist() == [[2.0, 1.0, 8.0, 4.0]]


# ------------------------------------------------------------------------------------------------
# Stand-in models whose outputs are known functions of their input
# ------------------------------------------------------------------------------------------------


def _tta(model, **kwargs):
    """The wrapper around ``model`` in eval mode (a training model is passed through)."""
    return TTA(model=model.eval(), **kwargs)


def _instances(h, w, boxes, scores, classes, masks):
    instances = Instances((h, w))
    instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    instances.scores = torch.tensor(scores, dtype=torch.float32)
    instances.pred_classes = torch.tensor(classes, dtype=torch.int64)
    if masks is not None:  # None: a box-only detector
        instances.pred_masks = (
            torch.stack(masks) if masks else torch.zeros((0, h, w), dtype=torch.bool)
        )
    return instances


def _frame(inputs):
    """The input's image size, and the frame its outputs go to (honouring fov_box)."""
    h, w = inputs["image"].shape[-2:]
    fov_box = inputs.get("fov_box")
    if fov_box is None:
        assert (inputs["height"], inputs["width"]) == (h, w)  # the views come at their own size
    else:
        x0, y0, x1, y1 = fov_box
        assert (y1 - y0, x1 - x0) == (h, w)
    return h, w, fov_box


class VisibleLesions(nn.Module):
    """A detector that sees every view alike: channel 0 marks lesion pixels with class + 1, each
    4-connected component of one class is an instance (tight box, its mask), scored by the
    highest value of channel 1 (/ 100) in it. (LESION_MERGE's 8-connectivity joins diagonal
    neighbours that this keeps apart.)"""

    def forward(self, batched_inputs):
        outputs = []
        for inputs in batched_inputs:
            image = inputs["image"]
            h, w, fov_box = _frame(inputs)
            found = []
            for cls in range(1, int(image[0].max()) + 1):
                labels, count = ndimage.label((image[0] == cls).numpy())
                for k in range(1, count + 1):
                    mask = labels == k
                    rows, cols = np.nonzero(mask)
                    score = float(image[1].numpy()[mask].max()) / 100
                    box = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
                    found.append((score, box, cls - 1, torch.from_numpy(mask)))
            found.sort(key=lambda f: -f[0])
            instances = _instances(
                h, w, [f[1] for f in found], [f[0] for f in found], [f[2] for f in found],
                [f[3] for f in found],
            )
            if fov_box is not None:
                instances = paste_into_frame(instances, fov_box, inputs["height"], inputs["width"])
            outputs.append({"instances": instances})
        return outputs


def _scene(height, width, lesions):
    image = torch.zeros((3, height, width), dtype=torch.uint8)
    for cls, score, (x0, y0, x1, y1) in lesions:
        image[0, y0:y1, x0:x1] = cls + 1
        image[1, y0:y1, x0:x1] = score
    return image


# Lesions of a 20x30 image, no symmetry: three classes, an L of two touching rectangles of one
# class (one component), two lesions of class 0 that touch diagonally (LESION_MERGE joins them).
ASYMMETRIC = [
    (0, 90, (2, 1, 6, 4)),
    (0, 60, (6, 4, 8, 6)),  # diagonal neighbour of the first
    (1, 80, (20, 3, 23, 12)),
    (1, 70, (20, 12, 28, 14)),  # with the one above: one L-shaped component
    (2, 50, (10, 15, 11, 16)),  # one pixel
    (3, 40, (14, 8, 17, 10)),
]


def _symmetric_scene(size):
    """A square image unchanged by every flip and quarter turn: lesions placed in all 8 images of
    one asymmetric placement (a symmetric image's lesions come in symmetric sets)."""
    base = _scene(size, size, [(0, 90, (1, 5, 4, 6)), (1, 60, (7, 1, 8, 2)), (2, 70, (4, 6, 6, 8))])
    image = torch.zeros_like(base)
    for view in ALL_VIEWS:
        image = torch.maximum(image, view_image(base, view))
    return image


def _same_instances(a: Instances, b: Instances):
    assert a.image_size == b.image_size
    assert len(a) == len(b)
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.scores, b.scores)
    assert torch.equal(a.pred_classes, b.pred_classes)
    assert torch.equal(a.pred_masks, b.pred_masks)


@pytest.mark.parametrize("score", ["mean", "max"])
@pytest.mark.parametrize("views", [tta_views(True), ALL_VIEWS], ids=["flip", "flip+turns"])
def test_a_symmetric_image_gives_the_unaugmented_detections(views, score):
    image = _symmetric_scene(20)
    inputs = {"image": image, "height": 20, "width": 20}
    for view in views:  # the image and each of its views give the model the same picture
        assert torch.equal(view_image(image, view), image)
    plain = VisibleLesions()([inputs])[0]["instances"]
    augmented = _tta(VisibleLesions(), views=views, score=score)
    merged = augmented([inputs])[0]["instances"]
    assert len(plain) == 24  # 3 lesions x 8 placements
    _same_instances(merged, plain)


@pytest.mark.parametrize("merge", [False, True])
def test_a_model_that_sees_every_view_alike_gives_its_plain_output_on_an_asymmetric_image(merge):
    """Each view's detections, turned back, must land exactly on the plain ones: a wrong
    un-transform of any view leaves lesions found by fewer views, at lower scores, elsewhere.
    Inside a field-of-view crop, and with the lesion merge run once on the result."""
    crop = _scene(20, 30, ASYMMETRIC)
    inputs = {"image": crop, "height": 40, "width": 50, "fov_box": [7, 11, 37, 31]}
    plain = VisibleLesions()([inputs])[0]["instances"]
    augmented = _tta(VisibleLesions(), views=ALL_VIEWS)
    if merge:  # the pipeline's last step, after the views are merged
        augmented = LesionMerging(model=augmented, score_threshold=0.5).eval()
    merged = augmented([inputs])[0]["instances"]
    if merge:
        plain = merge_connected_lesions(plain, 0.5)
        assert len(plain) == 4  # the diagonal pair of class 0 became one lesion
    else:
        assert len(plain) == 5
    _same_instances(merged, plain)
    assert merged.image_size == (40, 50)
    assert not merged.pred_masks[:, :11].any() and not merged.pred_masks[:, :, :7].any()


class CornerLesion(nn.Module):
    """A detector that sees nothing: one lesion of class 1 in the top-left 2 (wide) x 3 (high)
    pixels of whatever it is given, score 0.8."""

    def forward(self, batched_inputs):
        outputs = []
        for inputs in batched_inputs:
            h, w, _ = _frame(inputs)
            mask = torch.zeros((h, w), dtype=torch.bool)
            mask[0:3, 0:2] = True
            outputs.append({"instances": _instances(h, w, [[0, 0, 2, 3]], [0.8], [1], [mask])})
        return outputs


def _hand_mask(h, w, x0, y0, x1, y1):
    mask = torch.zeros((h, w), dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


@pytest.mark.parametrize(
    "views,score,expected",
    [
        # The mirror's corner lesion, mirrored back, is the top-right 2x3 of the 10x16 frame;
        # the two do not overlap: two lesions, each found by one view of two.
        (tta_views(True), "mean", [(0.4, (0, 0, 2, 3)), (0.4, (14, 0, 16, 3))]),
        (tta_views(True), "max", [(0.8, (0, 0, 2, 3)), (0.8, (14, 0, 16, 3))]),
        # A quarter turn sees the frame as 16x10; its top-left 2x3 is the original's top-right
        # corner, 3 wide and 2 high: x = 16 - y', y = x'.
        (tta_views(False, [1]), "mean", [(0.4, (0, 0, 2, 3)), (0.4, (13, 0, 16, 2))]),
        # Half a turn: the bottom-right corner.
        (tta_views(False, [2]), "mean", [(0.4, (0, 0, 2, 3)), (0.4, (14, 7, 16, 10))]),
        # Three quarter turns: the bottom-left corner, 3 wide and 2 high.
        (tta_views(False, [3]), "mean", [(0.4, (0, 0, 2, 3)), (0.4, (0, 8, 3, 10))]),
    ],
)
def test_each_view_turns_back_as_worked_out_by_hand(views, score, expected):
    augmented = _tta(CornerLesion(), views=views, score=score)
    merged = augmented([{"image": torch.zeros((3, 10, 16)), "height": 10, "width": 16}])[0]
    instances = merged["instances"]
    assert instances.scores.tolist() == pytest.approx([s for s, _ in expected])
    assert instances.pred_boxes.tensor.tolist() == [list(map(float, b)) for _, b in expected]
    assert instances.pred_classes.tolist() == [1, 1]
    for mask, (_, box) in zip(instances.pred_masks, expected):
        assert torch.equal(mask, _hand_mask(10, 16, *box))


class Scripted(nn.Module):
    """Returns, on its n-th call, the n-th of the given per-view detections: lists of
    (score, class, box, mask rectangle) in a 12x12 frame."""

    def __init__(self, per_call):
        super().__init__()
        self.per_call = per_call
        self.calls = 0

    def forward(self, batched_inputs):
        (inputs,) = batched_inputs
        h, w, _ = _frame(inputs)
        found = self.per_call[self.calls]
        self.calls += 1
        masks = [_hand_mask(h, w, *rect) for _, _, _, rect in found]
        return [{"instances": _instances(
            h, w, [b for _, _, b, _ in found], [s for s, _, _, _ in found],
            [c for _, c, _, _ in found], masks,
        )}]


def test_detections_merge_by_mask_iou_and_vote_as_worked_out_by_hand():
    """Four identity views (nothing to turn back) with scripted detections of one lesion.

    View 0: A (0.9), the 4x4 square (2, 2)-(6, 6), and A2 (0.1), A plus a row (IoU 0.8): the
        model kept them apart, so they stay apart (a view gives a lesion one detection).
    View 1: B (0.6), shifted one column right: IoU with A 12 / 20 = 0.6; and B' (0.7), of
        another class on A's pixels (never merged with A).
    View 2: C1 (0.5), shifted a row down (IoU 0.6), and C2 (0.4), A plus one column (IoU 16 / 20
        = 0.8): the higher IoU joins A, C1 stays a lesion of its own.
    View 3: D (0.3) far away: no overlap.
    Lesion A = {A, B, C2}: score (0.9 + 0.6 + 0.4 + 0) / 4 = 0.475; mask: pixels in at least 2
    of 3 masks: A's square plus the column x = 6, rows 2-5 (in B and C2). Lesion C1 = {C1, A2}
    (IoU 16 / 20): (0.5 + 0.1) / 4 = 0.15, its mask C1's (the tie of 1 of 2 goes to the leader).
    """
    square = (2, 2, 6, 6)
    per_call = [
        [(0.9, 0, [2.0, 2.0, 6.0, 6.0], square), (0.1, 0, [2.0, 2.0, 6.0, 7.0], (2, 2, 6, 7))],
        [(0.7, 1, [2.0, 2.0, 6.0, 6.0], square), (0.6, 0, [3.0, 2.0, 7.0, 6.0], (3, 2, 7, 6))],
        [(0.5, 0, [2.0, 3.0, 6.0, 7.0], (2, 3, 6, 7)),
         (0.4, 0, [2.0, 2.0, 7.0, 6.0], (2, 2, 7, 6))],
        [(0.3, 0, [9.0, 9.0, 11.0, 11.0], (9, 9, 11, 11))],
    ]
    identity = [View(False, 0)] * 4
    model = _tta(Scripted(per_call), views=identity, merge_iou=0.5)
    instances = model([{"image": torch.zeros((3, 12, 12)), "height": 12, "width": 12}])[0][
        "instances"
    ]
    got = [
        (round(float(s), 6), int(c), b.tolist())
        for s, c, b in zip(instances.scores, instances.pred_classes, instances.pred_boxes.tensor)
    ]
    assert got == [
        (0.475, 0, [2.0, 2.0, 6.0, 6.0]),  # A's box, as NMS keeps its top box
        (0.175, 1, [2.0, 2.0, 6.0, 6.0]),  # B' alone: 0.7 / 4
        (0.15, 0, [2.0, 3.0, 6.0, 7.0]),  # C1 with A2
        (0.075, 0, [9.0, 9.0, 11.0, 11.0]),  # D alone
    ]
    assert torch.equal(instances.pred_masks[0], _hand_mask(12, 12, 2, 2, 7, 6))
    assert torch.equal(instances.pred_masks[2], _hand_mask(12, 12, 2, 3, 6, 7))
    # Ties (2 of 4 masks) go the leader's way. Now C2 is A's square and D is B's: column 2 is
    # in A and C2 (the leader's: kept), column 6 in B and D (not the leader's: dropped).
    per_call[2] = [(0.4, 0, [2.0, 2.0, 6.0, 6.0], square)]
    per_call[3] = [(0.3, 0, [3.0, 2.0, 7.0, 6.0], (3, 2, 7, 6))]
    model = _tta(Scripted(per_call), views=identity, merge_iou=0.5)
    instances = model([{"image": torch.zeros((3, 12, 12)), "height": 12, "width": 12}])[0][
        "instances"
    ]
    assert torch.equal(instances.pred_masks[0], _hand_mask(12, 12, *square))
    assert float(instances.scores[0]) == pytest.approx((0.9 + 0.6 + 0.4 + 0.3) / 4)
    # A higher threshold keeps B and D (IoU 0.6 < 0.7) apart; C2 (IoU 1) still joins.
    model = _tta(Scripted(per_call), views=identity, merge_iou=0.7)
    instances = model([{"image": torch.zeros((3, 12, 12)), "height": 12, "width": 12}])[0][
        "instances"
    ]
    assert float(instances.scores[0]) == pytest.approx((0.9 + 0.4) / 4)


def test_detections_are_capped_by_score_after_merging():
    views = tta_views(True)
    model = _tta(CornerLesion(), views=views, max_detections=1)
    instances = model([{"image": torch.zeros((3, 10, 16)), "height": 10, "width": 16}])[0][
        "instances"
    ]
    assert instances.pred_boxes.tensor.tolist() == [[0.0, 0.0, 2.0, 3.0]]  # the identity's


class BoxesOnly(nn.Module):
    """A box detector: the corner box of CornerLesion, and a box covering the whole frame."""

    def forward(self, batched_inputs):
        outputs = []
        for inputs in batched_inputs:
            h, w, _ = _frame(inputs)
            instances = _instances(h, w, [[0, 0, 2, 3], [0, 0, w, h]], [0.8, 0.6], [1, 0], None)
            outputs.append({"instances": instances})
        return outputs


def test_a_box_only_detector_is_merged_by_its_boxes():
    model = _tta(BoxesOnly(), views=tta_views(True))
    instances = model([{"image": torch.zeros((3, 10, 16)), "height": 10, "width": 16}])[0][
        "instances"
    ]
    assert not instances.has("pred_masks")
    # The whole-frame boxes of the two views are one (IoU 1); the corners stay two.
    assert instances.pred_boxes.tensor.tolist() == [
        [0.0, 0.0, 16.0, 10.0], [0.0, 0.0, 2.0, 3.0], [14.0, 0.0, 16.0, 3.0]
    ]
    assert instances.scores.tolist() == pytest.approx([0.6, 0.4, 0.4])


# ------------------------------------------------------------------------------------------------
# Semantic maps
# ------------------------------------------------------------------------------------------------


class Ramps(nn.Module):
    """A semantic model whose maps ignore the image: channel 0 rises from 0 to 1 across its input's
    columns, channel 1 down its rows; padded into the fov_box frame."""

    def forward(self, batched_inputs):
        outputs = []
        for inputs in batched_inputs:
            h, w, fov_box = _frame(inputs)
            cols = torch.arange(w, dtype=torch.float32) / (w - 1)
            rows = torch.arange(h, dtype=torch.float32) / (h - 1)
            maps = torch.stack([cols[None, :].expand(h, w), rows[:, None].expand(h, w)])
            if fov_box is not None:
                x0, y0, x1, y1 = fov_box
                maps = torch.nn.functional.pad(
                    maps, (x0, inputs["width"] - x1, y0, inputs["height"] - y1)
                )
            outputs.append({"sem_seg": maps})
        return outputs


class Brightness(nn.Module):
    """A semantic model that sees every view alike: its maps are the image / 255."""

    def forward(self, batched_inputs):
        outputs = []
        for inputs in batched_inputs:
            _frame(inputs)
            outputs.append({"sem_seg": inputs["image"].float() / 255})
        return outputs


def test_maps_are_averaged_after_turning_back_as_worked_out_by_hand():
    h, w = 5, 9
    rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
    inputs = {"image": torch.zeros((3, h, w)), "height": h, "width": w}
    # The mirror's column ramp, mirrored back, falls: the mean is 1/2 everywhere.
    mirrored = _tta(Ramps(), views=tta_views(True))([inputs])[0]["sem_seg"]
    assert torch.allclose(mirrored[0], torch.full((h, w), 0.5))
    assert torch.allclose(mirrored[1], rows / (h - 1))  # rows are untouched by a mirror
    # A quarter turn sees the frame as 9x5: original pixel (r, c) is its (w - 1 - c, r), so its
    # column ramp, turned back, is r / (h - 1), and its row ramp (w - 1 - c) / (w - 1).
    turned = _tta(Ramps(), views=tta_views(False, [1]))([inputs])[0][
        "sem_seg"
    ]
    assert torch.allclose(turned[0], (cols / (w - 1) + rows / (h - 1)) / 2)
    assert torch.allclose(turned[1], (rows / (h - 1) + (w - 1 - cols) / (w - 1)) / 2)


def test_maps_are_averaged_in_the_crop_and_padded_into_the_photograph():
    inputs = {"image": torch.zeros((3, 4, 6)), "height": 10, "width": 12, "fov_box": [3, 2, 9, 6]}
    maps = _tta(Ramps(), views=tta_views(True))([inputs])[0]["sem_seg"]
    assert maps.shape == (2, 10, 12)
    assert torch.allclose(maps[0, 2:6, 3:9], torch.full((4, 6), 0.5))
    outside = torch.ones((10, 12), dtype=torch.bool)
    outside[2:6, 3:9] = False
    assert float(maps[:, outside].abs().max()) == 0.0


def test_a_semantic_model_that_sees_every_view_alike_gives_its_plain_maps():
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 7, 11), generator=generator, dtype=torch.uint8)
    inputs = {"image": image, "height": 7, "width": 11}
    plain = Brightness()([inputs])[0]["sem_seg"]
    for views in (tta_views(True), ALL_VIEWS):
        averaged = _tta(Brightness(), views=views)([inputs])[0]["sem_seg"]
        assert averaged.dtype == plain.dtype
        assert torch.equal(averaged, plain)  # summed in float64: exact for any number of views


def test_outputs_without_a_merged_form_are_refused():
    class Grades(nn.Module):
        def forward(self, batched_inputs):
            return [{"sem_seg": torch.zeros((1, 4, 4)), "dr_grade": torch.zeros(5)}]

    model = _tta(Grades(), views=tta_views(True))
    with pytest.raises(NotImplementedError, match="dr_grade"):
        model([{"image": torch.zeros((3, 4, 4)), "height": 4, "width": 4}])


# ------------------------------------------------------------------------------------------------
# Real models, the config and the trainer
# ------------------------------------------------------------------------------------------------


def _cfg(config="maskrcnn_synthetic_instant_test.yaml"):
    cfg = get_retina_cfg()
    cfg.merge_from_file(str(QUICK / config))
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.MIN_SIZE_TEST = 0  # the mapped image is the crop at its own pixels
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # random weights: keep every detection...
    cfg.TEST.DETECTIONS_PER_IMAGE = 30  # ...up to a number that pastes quickly on a CPU
    return cfg


@pytest.fixture(scope="module")
def rcnn():
    torch.manual_seed(0)
    cfg = _cfg()
    cfg.MODEL.LESION_SEG.ENABLED = True  # lesion maps beside the instances
    cfg.MODEL.SEM_SEG_HEAD.NAME = "LesionFPNSemHead"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 5
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 32
    cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE = 4
    cfg.MODEL.SEM_SEG_HEAD.NORM = "GN"
    return cfg, build_model(cfg).eval()


def _photo_inputs():
    generator = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 64, 96), generator=generator, dtype=torch.uint8)
    return {"image": image, "height": 90, "width": 120, "fov_box": [10, 20, 106, 84]}


def test_one_view_of_a_lesion_rcnn_is_its_plain_output(rcnn):
    cfg, model = rcnn
    cfg = cfg.clone()
    cfg.TEST.AUG.ENABLED, cfg.TEST.AUG.FLIP = True, False
    runner = LesionTrainer.build_inference_model(cfg, model).eval()
    assert isinstance(runner, TTA) and runner.views == [View(False, 0)]
    with torch.no_grad():
        plain = model([_photo_inputs()])[0]
    got = runner([_photo_inputs()])[0]
    assert len(plain["instances"]) > 5
    _same_instances(got["instances"], plain["instances"])
    assert torch.equal(got["sem_seg"], plain["sem_seg"])


def test_a_flipped_lesion_rcnn_merges_the_two_views_once(rcnn, monkeypatch):
    """Flip TTA on a real LesionRCNN with LESION_MERGE: each lesion is a detection of the image or
    of its mirror (mirrored back), the maps are the mean of both, the merge runs once, after the
    views are merged (the pipeline's last step; the model never merges)."""
    from retina_d2.modeling import inference

    cfg, model = rcnn
    cfg = cfg.clone()
    cfg.TEST.AUG.ENABLED = True
    cfg.MODEL.LESION_MERGE.ENABLED = True
    cfg.MODEL.LESION_MERGE.SCORE_THRESH = 0.99  # nothing of random weights: the merge is a no-op
    runner = LesionTrainer.build_inference_model(cfg, model).eval()
    assert isinstance(runner, LesionMerging) and isinstance(runner.model, TTA)
    assert runner.score_threshold == 0.99
    calls = []
    merge = inference.merge_connected_lesions
    monkeypatch.setattr(inference, "merge_connected_lesions",
                        lambda *a, **k: calls.append(1) or merge(*a, **k))
    got = runner([_photo_inputs()])[0]
    assert calls == [1]

    inputs = _photo_inputs()
    crop = {"image": inputs["image"], "height": 64, "width": 96}
    mirror = {"image": inputs["image"].flip(-1), "height": 64, "width": 96}
    with torch.no_grad():
        plain, mirrored = model([crop])[0], model([mirror])[0]
    shift = torch.tensor([10.0, 20.0, 10.0, 20.0])
    x0, y0, x1, y1 = mirrored["instances"].pred_boxes.tensor.unbind(1)
    candidates = torch.cat([
        plain["instances"].pred_boxes.tensor, torch.stack([96 - x1, y0, 96 - x0, y1], 1)
    ]) + shift
    boxes = got["instances"].pred_boxes.tensor
    assert 0 < len(boxes) <= cfg.TEST.DETECTIONS_PER_IMAGE
    assert all((candidates == box).all(1).any() for box in boxes)
    assert got["instances"].pred_masks.shape == (len(boxes), 90, 120)
    assert not got["instances"].pred_masks[:, :20].any()
    expected = (plain["sem_seg"].double() + mirrored["sem_seg"].flip(-1).double()) / 2
    assert torch.allclose(got["sem_seg"][:, 20:84, 10:106], expected.float())
    assert float(got["sem_seg"][:, :20].abs().max()) == 0.0


def test_augmentation_wraps_the_tiled_model_and_agrees_with_it_where_one_tile_fits(rcnn):
    cfg, model = rcnn
    cfg = cfg.clone()
    cfg.TEST.AUG.ENABLED = True
    cfg.RETINA.TTA.ROTATIONS = [1]
    untiled = LesionTrainer.build_inference_model(cfg, model).eval()
    cfg.RETINA.TILE.ENABLED = True
    cfg.RETINA.TILE.SIZE, cfg.RETINA.TILE.OVERLAP = 128, 16
    tiled = LesionTrainer.build_inference_model(cfg, model).eval()
    assert isinstance(tiled, TTA) and isinstance(tiled.model, TiledInference)
    a, b = untiled([_photo_inputs()])[0], tiled([_photo_inputs()])[0]
    _same_instances(a["instances"], b["instances"])
    assert torch.equal(a["sem_seg"], b["sem_seg"])


def test_semantic_lesion_net_flip_is_the_mean_of_the_image_and_its_mirror():
    torch.manual_seed(0)
    cfg = _cfg("semantic_synthetic_instant_test.yaml")
    cfg.TEST.AUG.ENABLED = True
    model = build_model(cfg).eval()
    runner = LesionTrainer.build_inference_model(cfg, model).eval()
    inputs = _photo_inputs()
    got = runner([inputs])[0]
    assert set(got) == {"sem_seg"}
    with torch.no_grad():
        plain = model([{"image": inputs["image"], "height": 64, "width": 96}])[0]["sem_seg"]
        mirror = model([{"image": inputs["image"].flip(-1), "height": 64, "width": 96}])[0]
    expected = ((plain.double() + mirror["sem_seg"].flip(-1).double()) / 2).float()
    assert torch.equal(got["sem_seg"][:, 20:84, 10:106], expected)
    assert not torch.equal(expected, plain)  # the mirror did change the map


def test_the_config_switches_and_refusals():
    cfg = get_retina_cfg()
    assert cfg.TEST.AUG.ENABLED is False and cfg.TEST.AUG.FLIP is True
    cfg.MODEL.META_ARCHITECTURE = "LesionRCNN"
    cfg.RETINA.TTA.ROTATIONS = [1, 2, 3]
    cfg.RETINA.TTA.SCORE = "max"
    wrapper = TTA(cfg, nn.Identity())
    assert wrapper.views == ALL_VIEWS and wrapper.score == "max"
    cfg.RETINA.TTA.SCORE = "median"
    with pytest.raises(ConfigError, match="RETINA.TTA.SCORE"):
        TTA(cfg, nn.Identity())
    cfg.RETINA.TTA.SCORE = "mean"
    cfg.RETINA.TTA.MERGE_IOU = 0.0
    with pytest.raises(ConfigError, match="RETINA.TTA.MERGE_IOU"):
        TTA(cfg, nn.Identity())
    cfg.RETINA.TTA.MERGE_IOU = 0.5
    cfg.MODEL.META_ARCHITECTURE = "MultiTaskLesionNet"
    with pytest.raises(ConfigError, match="MultiTaskLesionNet .* not supported"):
        TTA(cfg, nn.Identity())


def test_the_trainer_wraps_only_when_enabled(rcnn):
    cfg, model = rcnn
    assert cfg.TEST.AUG.ENABLED is False
    assert LesionTrainer.build_inference_model(cfg, model) is model


def test_a_training_model_is_passed_through():
    class Losses(nn.Module):
        def forward(self, batched_inputs):
            return {"loss": torch.tensor(1.0)}

    assert TTA(model=Losses(), views=tta_views(True))([{}]) == {
        "loss": torch.tensor(1.0)
    }


# ------------------------------------------------------------------------------------------------
# tools/train_net.py --eval-only
# ------------------------------------------------------------------------------------------------


@pytest.fixture()
def train_net(synthetic_datasets, monkeypatch):
    monkeypatch.setenv("RETINA_D2_DATASETS", str(synthetic_datasets))
    from retina_d2.tools import train_net

    return train_net


@pytest.mark.parametrize(
    "config,opts,metrics",
    [
        ("maskrcnn_synthetic_instant_test.yaml", [], "instance_metrics.json"),
        ("maskrcnn_synthetic_instant_test.yaml",
         ["TEST.AUG.ENABLED", "True", "RETINA.TTA.ROTATIONS", "[1, 2]"], "instance_metrics.json"),
        ("semantic_synthetic_instant_test.yaml", ["TEST.AUG.ENABLED", "True"],
         "semantic_metrics.json"),
    ],
    ids=["detector-off", "detector-on", "semantic-on"],
)
def test_eval_only_runs_with_augmentation_on_and_off(train_net, tmp_path, monkeypatch, config, opts,
                                                     metrics):
    views = []
    forward = TTA._infer_one
    monkeypatch.setattr(
        TTA, "_infer_one",
        lambda self, inputs: views.append(len(self.views)) or forward(self, inputs),
    )
    results = train_net.cli([
        "--config-file", str(QUICK / config), "--eval-only", "OUTPUT_DIR", str(tmp_path / "out"),
        "RETINA.EVAL.NUM_OVERLAYS", "0", "RETINA.EVAL.REPORT", "False", *opts,
    ])
    assert results
    assert (tmp_path / "out/inference/synthetic_seg_val" / metrics).is_file()
    if opts:
        assert views and set(views) == {6 if "RETINA.TTA.ROTATIONS" in opts else 2}
    else:
        assert views == []


def test_eval_only_refuses_a_multitask_model_in_one_line(train_net, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_net.cli([
            "--config-file", str(QUICK / "multitask_synthetic_instant_test.yaml"), "--eval-only",
            "OUTPUT_DIR", str(tmp_path / "out"), "TEST.AUG.ENABLED", "True",
        ])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: TEST.AUG.ENABLED") and "MultiTaskLesionNet" in err[-1]
