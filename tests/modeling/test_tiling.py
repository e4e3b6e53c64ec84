"""Tiled inference (retina_d2/modeling/tiling.py): the grid covers the image, a lesion cut by seams
comes back as one instance, semantic maps blend as worked out by hand, results land in the
original frame, and a real LesionRCNN gives its untiled output where the image fits one tile."""
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from scipy import ndimage
from torch import nn

from retina_d2.config import get_retina_cfg
from retina_d2.engine import LesionTrainer
from retina_d2.modeling.inference import LesionMerging
from retina_d2.modeling.tiling import TiledInference, tile_grid

REPO = Path(__file__).resolve().parents[2]
INSTANT = REPO / "configs/quick_schedules/maskrcnn_synthetic_instant_test.yaml"


# ------------------------------------------------------------------------------------------------
# The grid
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "height,width,tile,overlap",
    [(4, 6, 4, 2), (7, 7, 4, 2), (16, 16, 16, 4), (17, 33, 16, 4), (5, 100, 32, 8),
     (2848, 4288, 512, 64), (300, 301, 128, 127)],
)
def test_tiles_cover_every_pixel_and_overlap_their_neighbours(height, width, tile, overlap):
    tiles = tile_grid(height, width, tile, overlap)
    covered = np.zeros((height, width), np.int32)
    for x0, y0, x1, y1 in tiles:
        assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert (x1 - x0, y1 - y0) == (min(tile, width), min(tile, height))
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1
    for axis_starts, length in (
        (sorted({t[0] for t in tiles}), width),
        (sorted({t[1] for t in tiles}), height),
    ):
        assert axis_starts[0] == 0 and axis_starts[-1] == max(length - tile, 0)  # flush
        # Neighbours share at least `overlap` pixels: starts at most tile - overlap apart.
        assert all(b - a <= tile - overlap for a, b in zip(axis_starts, axis_starts[1:]))
    assert len(set(tiles)) == len(tiles)


def test_grid_refuses_bad_sizes():
    with pytest.raises(ValueError, match="RETINA.TILE.OVERLAP"):
        tile_grid(10, 10, 4, 4)
    with pytest.raises(ValueError, match="RETINA.TILE.SIZE"):
        tile_grid(10, 10, 0, 0)
    with pytest.raises(ValueError, match="at least 1"):
        TiledInference(model=nn.Identity(), tile_size=8, overlap=0)


# ------------------------------------------------------------------------------------------------
# Instances across seams, with a model whose answer is known exactly
# ------------------------------------------------------------------------------------------------


class VisibleLesions(nn.Module):
    """A stand-in detector: channel 0 of the image marks lesion pixels with their class + 1; every
    8-connected component of one class in the tile it is given is an instance, with the
    component's tight box, its mask, and the score in channel 1 (/ 100)."""

    def forward(self, batched_inputs):
        outputs = []
        for inputs in batched_inputs:
            image = inputs["image"]
            h, w = image.shape[1:]
            assert (inputs["height"], inputs["width"]) == (h, w)  # tile frame in, tile frame out
            boxes, scores, classes, masks = [], [], [], []
            for cls in range(1, int(image[0].max()) + 1):
                labels, count = ndimage.label((image[0] == cls).numpy(), structure=np.ones((3, 3)))
                for k in range(1, count + 1):
                    mask = labels == k
                    rows, cols = np.nonzero(mask)
                    boxes.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
                    scores.append(float(image[1][rows[0], cols[0]]) / 100)
                    classes.append(cls - 1)
                    masks.append(torch.from_numpy(mask))
            instances = Instances((h, w))
            instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
            instances.scores = torch.tensor(scores, dtype=torch.float32)
            instances.pred_classes = torch.tensor(classes, dtype=torch.int64)
            instances.pred_masks = (
                torch.stack(masks) if masks else torch.zeros((0, h, w), dtype=torch.bool)
            )
            outputs.append({"instances": instances})
        return outputs


def _scene(height, width, lesions):
    """(image, [(class, score, mask)]): lesions drawn as class + 1 in channel 0, score in 1."""
    image = torch.zeros((3, height, width), dtype=torch.uint8)
    truth = []
    for cls, score, (x0, y0, x1, y1) in lesions:
        mask = np.zeros((height, width), bool)
        mask[y0:y1, x0:x1] = True
        image[0][torch.from_numpy(mask)] = cls + 1
        image[1][torch.from_numpy(mask)] = score
        truth.append((cls, score / 100, mask))
    return image, truth


# Tiles of 16 with overlap 4 on 40x50: columns start at 0, 12, 24, 34; rows at 0, 12, 24.
SEAM_SCENE = [
    (0, 90, (8, 2, 20, 6)),  # across the first vertical seam, wider than the overlap
    (1, 80, (10, 10, 18, 18)),  # across a four-tile corner
    (0, 70, (13, 30, 15, 32)),  # a 2x2 lesion inside an overlap: seen whole by two tiles
    (2, 60, (24, 2, 26, 4)),  # two lesions 1 px apart in an overlap: stay two
    (2, 50, (27, 2, 28, 4)),
    (3, 40, (2, 20, 47, 22)),  # longer than a tile: four tiles, three seams
    (0, 30, (40, 35, 41, 36)),  # one pixel near the corner, in a single tile
    (1, 20, (5, 24, 7, 28)),  # exactly on a row seam
]


def _as_set(instances):
    return sorted(
        (int(c), round(float(s), 4), tuple(map(tuple, np.argwhere(m.numpy()))))
        for c, s, m in zip(instances.pred_classes, instances.scores, instances.pred_masks)
    )


def test_a_lesion_cut_by_seams_comes_back_as_one_instance():
    image, truth = _scene(40, 50, SEAM_SCENE)
    model = TiledInference(model=VisibleLesions(), tile_size=16, overlap=4, merge_iou=0.5)
    model.eval()
    tiles = tile_grid(40, 50, 16, 4)
    assert len(tiles) == 12
    # The stand-in model does cut the lesions: it returns more pieces than lesions.
    pieces = sum(len(o["instances"]) for o in VisibleLesions()(
        [{"image": image[:, y0:y1, x0:x1], "height": y1 - y0, "width": x1 - x0}
         for x0, y0, x1, y1 in tiles]))
    assert pieces > 2 * len(truth)

    instances = model([{"image": image, "height": 40, "width": 50}])[0]["instances"]
    expected = sorted(
        (c, round(s, 4), tuple(map(tuple, np.argwhere(m)))) for c, s, m in truth
    )
    assert _as_set(instances) == expected
    # Boxes: the union of the pieces' boxes is the whole lesion's tight box.
    for box, mask in zip(instances.pred_boxes.tensor, instances.pred_masks):
        rows, cols = np.nonzero(mask.numpy())
        assert box.tolist() == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
    # Highest score first, as Detectron2 orders its detections.
    assert instances.scores.tolist() == sorted(instances.scores.tolist(), reverse=True)
    assert instances.image_size == (40, 50)


class VisibleBoxes(VisibleLesions):
    """:class:`VisibleLesions` without masks: a box-only detector."""

    def forward(self, batched_inputs):
        outputs = super().forward(batched_inputs)
        for output in outputs:
            output["instances"].remove("pred_masks")
        return outputs


def test_a_box_only_detector_is_merged_by_its_boxes():
    image, truth = _scene(40, 50, SEAM_SCENE)
    model = TiledInference(model=VisibleBoxes(), tile_size=16, overlap=4).eval()
    instances = model([{"image": image, "height": 40, "width": 50}])[0]["instances"]
    assert not instances.has("pred_masks")
    expected = []
    for cls, score, mask in truth:
        rows, cols = np.nonzero(mask)
        box = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
        expected.append((cls, round(score, 4), box))
    got = [
        (int(c), round(float(s), 4), b.tolist())
        for c, s, b in zip(instances.pred_classes, instances.scores, instances.pred_boxes.tensor)
    ]
    assert sorted(got) == sorted(expected)


def test_merging_does_not_depend_on_the_batch_of_tiles():
    image, _ = _scene(40, 50, SEAM_SCENE)
    one = TiledInference(model=VisibleLesions(), tile_size=16, overlap=4).eval()
    five = TiledInference(model=VisibleLesions(), tile_size=16, overlap=4, batch_size=5).eval()
    a = one([{"image": image}])[0]["instances"]
    b = five([{"image": image}])[0]["instances"]
    assert _as_set(a) == _as_set(b)


def test_detections_are_capped_by_score():
    image, truth = _scene(40, 50, SEAM_SCENE)
    model = TiledInference(model=VisibleLesions(), tile_size=16, overlap=4, max_detections=3)
    instances = model.eval()([{"image": image}])[0]["instances"]
    assert instances.scores.tolist() == pytest.approx([0.9, 0.8, 0.7])


@pytest.mark.parametrize("scale", [1, 2])
def test_instances_land_in_the_original_frame(scale):
    """The input is the FOV crop of a 70x90 photograph, shrunk by ``scale``; masks come back in
    the photograph's pixels (nearest neighbour), boxes scaled and shifted like LesionRCNN's."""
    lesions = [(0, 90, (8, 2, 20, 6)), (1, 80, (10, 10, 18, 18)), (3, 40, (2, 20, 47, 22))]
    image, truth = _scene(40, 50, lesions)
    fov_box = [13, 7, 13 + 50 * scale, 7 + 40 * scale]
    inputs = {"image": image, "height": 100, "width": 120, "fov_box": fov_box}
    model = TiledInference(model=VisibleLesions(), tile_size=16, overlap=4).eval()
    instances = model([inputs])[0]["instances"]
    assert instances.image_size == (100, 120)
    assert instances.pred_masks.shape == (3, 100, 120)
    for (cls, score, mask), got_mask, box in zip(
        truth, instances.pred_masks, instances.pred_boxes.tensor
    ):
        expected = np.zeros((100, 120), bool)
        expected[7 : 7 + 40 * scale, 13 : 13 + 50 * scale] = np.kron(
            mask, np.ones((scale, scale), bool)
        )
        np.testing.assert_array_equal(got_mask.numpy(), expected)
        rows, cols = np.nonzero(mask)
        assert box.tolist() == [
            13 + cols.min() * scale, 7 + rows.min() * scale,
            13 + (cols.max() + 1) * scale, 7 + (rows.max() + 1) * scale,
        ]


class FixedTilePredictions(nn.Module):
    """A stand-in detector that returns, for the tile starting at column c (channel 0 of the image
    holds each pixel's column), the boxes ``by_column[c]`` given in the image's pixels as
    ``(class, score, (x0, y0, x1, y1))``, each with its box filled as its mask."""

    def __init__(self, by_column):
        super().__init__()
        self.by_column = by_column

    def forward(self, batched_inputs):
        outputs = []
        for inputs in batched_inputs:
            image = inputs["image"]
            h, w = image.shape[1:]
            left = int(image[0, 0, 0])
            instances = Instances((h, w))
            lesions = self.by_column[left]
            boxes = torch.tensor([b for _, _, b in lesions], dtype=torch.float32)
            boxes -= torch.tensor([left, 0, left, 0], dtype=torch.float32)
            instances.pred_boxes = Boxes(boxes)
            instances.scores = torch.tensor([s for _, s, _ in lesions])
            instances.pred_classes = torch.tensor([c for c, _, _ in lesions])
            masks = torch.zeros((len(lesions), h, w), dtype=torch.bool)
            for mask, (x0, y0, x1, y1) in zip(masks, boxes.to(torch.int64).tolist()):
                mask[y0:y1, x0:x1] = True
            instances.pred_masks = masks
            outputs.append({"instances": instances})
        return outputs


# Tiles of 16 with overlap 4 on 8x28: columns [0, 16) and [12, 28). Each tile sees one half of a
# plaque cut at column 14: inside the shared columns 12-15 the halves touch but do not overlap, so
# the IoU merge keeps them apart. A third lesion lies apart from the plaque.
HALVES = {
    0: [(0, 0.9, (6, 2, 14, 6))],
    12: [(0, 0.6, (14, 2, 22, 6)), (0, 0.5, (24, 2, 26, 4))],
}


@pytest.mark.parametrize("merge", [True, False])
def test_the_lesion_merge_joins_touching_halves_from_different_tiles(merge):
    image = torch.arange(28, dtype=torch.uint8).repeat(3, 8, 1)  # channel 0: the column
    model = TiledInference(model=FixedTilePredictions(HALVES), tile_size=16, overlap=4)
    if merge:  # the pipeline's last step, on the assembled image
        model = LesionMerging(model=model, score_threshold=0.3)
    model = model.eval()
    instances = model([{"image": image}])[0]["instances"]
    got = [
        (round(float(s), 4), b.tolist())
        for s, b in zip(instances.scores, instances.pred_boxes.tensor)
    ]
    if merge:  # one plaque, scored by its best half, and the lesion apart
        assert got == [(0.9, [6, 2, 22, 6]), (0.5, [24, 2, 26, 4])]
        plaque = torch.zeros((8, 28), dtype=torch.bool)
        plaque[2:6, 6:22] = True
        assert torch.equal(instances.pred_masks[0], plaque)
    else:
        assert got == [(0.9, [6, 2, 14, 6]), (0.6, [14, 2, 22, 6]), (0.5, [24, 2, 26, 4])]


# ------------------------------------------------------------------------------------------------
# Semantic maps
# ------------------------------------------------------------------------------------------------


class TileConstant(nn.Module):
    """A stand-in semantic model whose one lesion map is a constant per tile, chosen by the
    tile's first column (channel 0 of the image holds each pixel's column)."""

    def __init__(self, by_column):
        super().__init__()
        self.by_column = by_column

    def forward(self, batched_inputs):
        return [
            {"sem_seg": torch.full(
                (1, *x["image"].shape[1:]), self.by_column[int(x["image"][0, 0, 0])]
            )}
            for x in batched_inputs
        ]


@pytest.mark.parametrize(
    "width,by_column,expected",
    [
        # Tiles [0, 4) and [2, 6): weights (1, 1, .75, .25) and (.25, .75, 1, 1).
        (6, {0: 0.2, 2: 0.6}, [0.2, 0.2, 0.3, 0.5, 0.6, 0.6]),
        # A third tile [3, 7) flush with the border; the middle one ramps on both sides,
        # (.25, .75, .75, .25), the last (.25, .75, 1, 1): column 3 = (.2*.25 + .6*.75 + 1*.25)
        # / 1.25 = .6, column 4 = (.6*.75 + .75) / 1.5 = .8, column 5 = (.6*.25 + 1) / 1.25 = .92.
        (7, {0: 0.2, 2: 0.6, 3: 1.0}, [0.2, 0.2, 0.3, 0.6, 0.8, 0.92, 1.0]),
    ],
)
def test_semantic_maps_cross_fade_over_the_overlap(width, by_column, expected):
    image = torch.arange(width, dtype=torch.uint8).repeat(3, 4, 1)  # channel 0: the column
    model = TiledInference(model=TileConstant(by_column), tile_size=4, overlap=2).eval()
    probs = model([{"image": image}])[0]["sem_seg"]
    assert probs.shape == (1, 4, width)
    for row in probs[0]:
        assert row.tolist() == pytest.approx(expected, abs=1e-6)


def test_semantic_maps_are_padded_into_the_fov_frame():
    image = torch.zeros((3, 4, 6), dtype=torch.uint8)
    model = TiledInference(model=TileConstant({0: 0.5}), tile_size=8, overlap=2).eval()
    probs = model([{"image": image, "height": 10, "width": 9, "fov_box": [2, 3, 8, 7]}])[0]
    expected = torch.zeros((1, 10, 9))
    expected[:, 3:7, 2:8] = 0.5
    assert torch.equal(probs["sem_seg"], expected)


def test_outputs_without_a_tiled_form_are_refused():
    class Grader(nn.Module):
        def forward(self, batched_inputs):
            return [{"dr_grade": torch.zeros(5)} for _ in batched_inputs]

    model = TiledInference(model=Grader(), tile_size=8, overlap=2).eval()
    with pytest.raises(NotImplementedError, match="dr_grade"):
        model([{"image": torch.zeros((3, 8, 8), dtype=torch.uint8)}])


# ------------------------------------------------------------------------------------------------
# A real LesionRCNN
# ------------------------------------------------------------------------------------------------


def _rcnn_cfg():
    cfg = get_retina_cfg()
    cfg.merge_from_file(str(INSTANT))
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.MIN_SIZE_TEST = 0  # native resolution: the tiles' scale is the image's
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # random weights: keep every detection...
    cfg.TEST.DETECTIONS_PER_IMAGE = 40  # ...up to a number that pastes quickly on a CPU
    cfg.MODEL.LESION_SEG.ENABLED = True  # lesion maps beside the instances
    cfg.MODEL.SEM_SEG_HEAD.NAME = "LesionFPNSemHead"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 5
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 32
    cfg.MODEL.SEM_SEG_HEAD.COMMON_STRIDE = 4
    cfg.MODEL.SEM_SEG_HEAD.NORM = "GN"
    cfg.RETINA.TILE.ENABLED = True
    cfg.RETINA.TILE.SIZE = 128
    cfg.RETINA.TILE.OVERLAP = 16
    return cfg


@pytest.fixture(scope="module")
def rcnn():
    torch.manual_seed(0)
    cfg = _rcnn_cfg()
    return cfg, build_model(cfg).eval()


def _photo_inputs():
    generator = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 96, 128), generator=generator, dtype=torch.uint8)
    return {"image": image, "height": 130, "width": 150, "fov_box": [10, 20, 138, 116]}


def test_tiled_lesion_rcnn_equals_untiled_where_the_image_fits_one_tile(rcnn):
    cfg, model = rcnn
    # eval(): a wrapper in training mode passes its inputs straight to the model (no tiling).
    tiled = LesionTrainer.build_inference_model(cfg, model).eval()
    assert isinstance(tiled, TiledInference)
    with torch.no_grad():
        whole = model([_photo_inputs()])[0]
        tiles = tiled([_photo_inputs()])[0]
    a, b = whole["instances"], tiles["instances"]
    assert len(a) > 10 and a.image_size == b.image_size == (130, 150)
    assert set(a.get_fields()) == set(b.get_fields())
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    assert torch.equal(a.scores, b.scores)
    assert torch.equal(a.pred_classes, b.pred_classes)
    assert a.pred_masks.dtype == b.pred_masks.dtype == torch.bool
    assert torch.equal(a.pred_masks, b.pred_masks)
    assert a.pred_masks.flatten(1).any(1).sum() > 0
    assert torch.equal(whole["sem_seg"], tiles["sem_seg"])


def test_tiled_lesion_rcnn_over_many_tiles_keeps_the_output_contract(rcnn):
    cfg, model = rcnn
    cfg = cfg.clone()
    cfg.RETINA.TILE.SIZE, cfg.RETINA.TILE.OVERLAP = 64, 16
    tiled = TiledInference(cfg, model).eval()
    output = tiled([_photo_inputs()])[0]
    instances = output["instances"]
    assert 0 < len(instances) <= cfg.TEST.DETECTIONS_PER_IMAGE
    assert instances.pred_masks.shape == (len(instances), 130, 150)
    outside = torch.ones((130, 150), dtype=torch.bool)
    outside[20:116, 10:138] = False
    assert not instances.pred_masks[:, outside].any()  # nothing outside the FOV crop
    boxes = instances.pred_boxes.tensor
    assert (boxes[:, 0] >= 10).all() and (boxes[:, 2] <= 138).all()
    assert (boxes[:, 1] >= 20).all() and (boxes[:, 3] <= 116).all()
    assert output["sem_seg"].shape == (5, 130, 150)
    assert float(output["sem_seg"][:, outside].abs().max()) == 0.0
    assert 0.0 < float(output["sem_seg"].max()) <= 1.0


def test_a_merging_lesion_rcnn_is_merged_over_the_whole_image_not_per_tile(rcnn, monkeypatch):
    """MODEL.LESION_MERGE with tiles: the tiles are not merged (the model never merges), the
    pipeline's last step merges the assembled image once, and where the image fits one tile the
    result is the untiled merged one."""
    from retina_d2.modeling import inference

    cfg, model = rcnn
    cfg = cfg.clone()
    cfg.MODEL.LESION_MERGE.ENABLED = True
    cfg.MODEL.LESION_MERGE.SCORE_THRESH = 0.0
    merged_images = []
    merge = inference.merge_connected_lesions

    def counted(instances, *args, **kwargs):
        merged_images.append(instances.image_size)
        return merge(instances, *args, **kwargs)

    monkeypatch.setattr(inference, "merge_connected_lesions", counted)
    with torch.no_grad():
        unmerged = model([_photo_inputs()])[0]["instances"]
    whole = merge(unmerged, 0.0)
    assert merged_images == [] and len(whole) != len(unmerged)  # the merge changes them
    one_tile = LesionTrainer.build_inference_model(cfg, model).eval()
    assert isinstance(one_tile, LesionMerging) and isinstance(one_tile.model, TiledInference)
    assert (one_tile.score_threshold, one_tile.connectivity) == (0.0, 8)
    got = one_tile([_photo_inputs()])[0]["instances"]
    assert merged_images == [(130, 150)]  # once, in the photograph's frame
    assert len(whole) > 0
    assert torch.equal(whole.pred_boxes.tensor, got.pred_boxes.tensor)
    assert torch.equal(whole.scores, got.scores)
    assert torch.equal(whole.pred_masks, got.pred_masks)

    cfg.RETINA.TILE.SIZE, cfg.RETINA.TILE.OVERLAP = 64, 16
    LesionTrainer.build_inference_model(cfg, model).eval()([_photo_inputs()])
    assert merged_images == [(130, 150)] * 2  # six tiles, one merge


def test_only_a_detector_config_merges_the_tiled_image():
    cfg = get_retina_cfg()
    cfg.RETINA.TILE.ENABLED = True
    cfg.MODEL.LESION_MERGE.ENABLED = True
    cfg.MODEL.LESION_MERGE.SCORE_THRESH = 0.25
    cfg.MODEL.LESION_MERGE.CONNECTIVITY = 4
    cfg.MODEL.META_ARCHITECTURE = "LesionRCNN"
    merging = LesionTrainer.build_inference_model(cfg, nn.Identity())
    assert isinstance(merging.model, TiledInference)
    assert (merging.score_threshold, merging.connectivity) == (0.25, 4)
    # MultiTaskLesionNet merges what its LesionRCNN branch detects, as LesionRCNN does...
    cfg.MODEL.META_ARCHITECTURE = "MultiTaskLesionNet"
    cfg.MODEL.MULTITASK.LESION_ARCHITECTURE = "LesionRCNN"
    assert isinstance(LesionTrainer.build_inference_model(cfg, nn.Identity()), LesionMerging)
    # ...and a semantic lesion branch has no instances to merge.
    cfg.MODEL.MULTITASK.LESION_ARCHITECTURE = "SemanticLesionNet"
    assert isinstance(LesionTrainer.build_inference_model(cfg, nn.Identity()), TiledInference)


def test_trainer_wraps_the_model_only_when_tiling_is_enabled(rcnn):
    cfg, model = rcnn
    cfg = cfg.clone()
    cfg.RETINA.TILE.ENABLED = False
    assert LesionTrainer.build_inference_model(cfg, model) is model


def test_eval_only_with_tiling_runs_through_the_evaluators(tmp_path, monkeypatch):
    """train_net --eval-only with RETINA.TILE.ENABLED: the trainer's test runs the tiles through
    Detectron2's inference_on_dataset and the instance evaluator."""
    from retina_d2.tools import train_net

    from retina_d2.data.converters import ConvertOptions, synthetic

    synthetic.convert(None, tmp_path / "data" / "synthetic", ConvertOptions(progress=False),
                      count=6, size=192)
    monkeypatch.setenv("RETINA_D2_DATASETS", str(tmp_path / "data"))
    calls = []
    forward = TiledInference.forward
    monkeypatch.setattr(
        TiledInference, "forward", lambda self, x: calls.append(len(x)) or forward(self, x)
    )
    results = train_net.cli([
        "--config-file", str(INSTANT), "--eval-only", "OUTPUT_DIR", str(tmp_path / "out"),
        "RETINA.TILE.ENABLED", "True", "RETINA.TILE.SIZE", "96", "RETINA.TILE.OVERLAP", "16",
        "RETINA.EVAL.NUM_OVERLAYS", "0", "RETINA.EVAL.REPORT", "False",
    ])
    assert len(calls) >= 1  # every evaluation image went through the tiles
    assert "segm" in results and "AP50" in results["segm"]
    assert (tmp_path / "out/inference/synthetic_seg_val/instance_metrics.json").is_file()


# ------------------------------------------------------------------------------------------------
# The per-tile budget (RETINA.TILE.PROPOSALS_PER_TILE / DETECTIONS_PER_TILE)
# ------------------------------------------------------------------------------------------------


def test_a_tile_keeps_its_budget_of_proposals_and_detections(rcnn):
    """Every tile's RoI heads get exactly PROPOSALS_PER_TILE proposals and every tile returns
    DETECTIONS_PER_TILE detections (random weights and score threshold 0: more are available, as
    the unbudgeted run shows); the model's own counts are back afterwards."""
    cfg, model = rcnn
    cfg = cfg.clone()
    cfg.RETINA.TILE.SIZE, cfg.RETINA.TILE.OVERLAP = 64, 16  # 96x128: 2 rows x 3 columns
    own_proposals = model.proposal_generator.post_nms_topk[False]
    own_detections = model.roi_heads.box_predictor.test_topk_per_image
    assert (own_proposals, own_detections) == (
        cfg.MODEL.RPN.POST_NMS_TOPK_TEST, cfg.TEST.DETECTIONS_PER_IMAGE)
    proposals, detections = [], []
    hooks = [
        model.roi_heads.register_forward_pre_hook(
            lambda module, args: proposals.extend(len(p) for p in args[2])),
        model.register_forward_hook(
            lambda module, args, out: detections.extend(len(o["instances"]) for o in out)),
    ]
    try:
        TiledInference(cfg, model).eval()([_photo_inputs()])
        unbudgeted = list(zip(proposals, detections))
        proposals.clear()
        detections.clear()
        cfg.RETINA.TILE.PROPOSALS_PER_TILE, cfg.RETINA.TILE.DETECTIONS_PER_TILE = 7, 3
        output = TiledInference(cfg, model).eval()([_photo_inputs()])[0]
    finally:
        for hook in hooks:
            hook.remove()
    assert len(unbudgeted) == 6 and all(p > 7 and d > 3 for p, d in unbudgeted)
    assert proposals == [7] * 6 and detections == [3] * 6
    assert 0 < len(output["instances"]) <= 18
    assert model.proposal_generator.post_nms_topk[False] == own_proposals
    assert model.roi_heads.box_predictor.test_topk_per_image == own_detections


def test_the_budget_is_restored_when_a_tile_fails():
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.box_regression import Box2BoxTransform
    from detectron2.modeling.roi_heads import FastRCNNOutputLayers

    from retina_d2.modeling.tiling import tile_budget

    predictor = FastRCNNOutputLayers(
        ShapeSpec(channels=4), box2box_transform=Box2BoxTransform((10, 10, 5, 5)), num_classes=2,
        test_topk_per_image=50)
    with pytest.raises(RuntimeError, match="tile failed"):
        with tile_budget(nn.Sequential(predictor), proposals=0, detections=5):
            assert predictor.test_topk_per_image == 5
            raise RuntimeError("tile failed")
    assert predictor.test_topk_per_image == 50
    with tile_budget(nn.Sequential(predictor), proposals=0, detections=0):
        assert predictor.test_topk_per_image == 50  # 0: the model's own


def test_a_negative_budget_is_refused():
    with pytest.raises(ValueError, match="RETINA.TILE.PROPOSALS_PER_TILE"):
        TiledInference(model=nn.Identity(), tile_size=8, overlap=2, proposals_per_tile=-1)
    with pytest.raises(ValueError, match="RETINA.TILE.DETECTIONS_PER_TILE"):
        TiledInference(model=nn.Identity(), tile_size=8, overlap=2, detections_per_tile=-5)


class BudgetedLesions(VisibleLesions):
    """:class:`VisibleLesions` keeping only its ``box_predictor.test_topk_per_image`` best pieces
    per tile, as a Detectron2 box predictor keeps its top detections."""

    def __init__(self, topk: int):
        from detectron2.layers import ShapeSpec
        from detectron2.modeling.box_regression import Box2BoxTransform
        from detectron2.modeling.roi_heads import FastRCNNOutputLayers

        super().__init__()
        self.box_predictor = FastRCNNOutputLayers(
            ShapeSpec(channels=4), box2box_transform=Box2BoxTransform((10, 10, 5, 5)),
            num_classes=4, test_topk_per_image=topk)

    def forward(self, batched_inputs):
        outputs = super().forward(batched_inputs)
        for output in outputs:
            instances = output["instances"]
            best = torch.sort(instances.scores, descending=True, stable=True).indices
            output["instances"] = instances[best[: self.box_predictor.test_topk_per_image]]
        return outputs


def test_tiles_under_a_detection_budget_still_merge_their_seams():
    image, truth = _scene(40, 50, SEAM_SCENE)
    tiles = tile_grid(40, 50, 16, 4)
    per_tile = [len(o["instances"]) for o in VisibleLesions()(
        [{"image": image[:, y0:y1, x0:x1], "height": y1 - y0, "width": x1 - x0}
         for x0, y0, x1, y1 in tiles])]
    expected = sorted((c, round(s, 4), tuple(map(tuple, np.argwhere(m)))) for c, s, m in truth)
    # The model's own count (1) would keep one piece per tile; a budget of the busiest tile's
    # piece count keeps every piece, and the seams merge exactly as without a budget.
    model = TiledInference(model=BudgetedLesions(topk=1), tile_size=16, overlap=4,
                           detections_per_tile=max(per_tile)).eval()
    assert max(per_tile) > 1
    assert _as_set(model([{"image": image}])[0]["instances"]) == expected
    assert model.model.box_predictor.test_topk_per_image == 1
    # Budget 1: each tile keeps its best piece. The two tiles across the first seam each keep
    # a half of the 0.9 lesion, and the halves still come back as the one whole lesion.
    one = TiledInference(model=BudgetedLesions(topk=100), tile_size=16, overlap=4,
                         detections_per_tile=1).eval()
    instances = one([{"image": image}])[0]["instances"]
    assert len(instances) < len(truth)
    top = _as_set(instances[:1])[0]
    assert top == expected[[e[1] for e in expected].index(0.9)]
