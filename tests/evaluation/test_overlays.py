"""Overlay pictures at fundus scale: lesions outlined (a 2-pixel one still visible, with a ring),
never filled, one colour per lesion type with a legend of exactly the types present, no text
unless scores are asked for, titled panels, a 1:1 crop of the densest region, and one file per
image even when two images share a stem."""
import itertools

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.structures import Boxes, BoxMode, Instances
from PIL import Image

from retina_d2.data.instances import encode_rle
from retina_d2.data.lesions import lesion
from retina_d2.evaluation.overlays import OverlayEvaluator, write_overlay
from retina_d2.visualize import (
    IGNORE_COLOUR,
    crop_marks,
    densest_region,
    draw_ground_truth_overlay,
    draw_marks,
    draw_prediction_overlay,
    legend_entries,
    overlay_names,
    prediction_marks,
    ring_radius,
    side_by_side,
)

H, W = 400, 500
CLASSES = ["microaneurysm", "haemorrhage", "hard exudate"]
MA, HE, EX = (lesion(n).color for n in CLASSES)
META = Metadata(name="overlay_test", thing_classes=CLASSES)
GREY = 90  # the photograph: flat grey, so every drawn pixel stands out


def _photo(height=H, width=W):
    return np.full((height, width, 3), GREY, np.uint8)


def _instances(specs, height=H, width=W):
    """specs: (class index, (y0, y1, x0, x1), score)."""
    masks = torch.zeros((len(specs), height, width), dtype=torch.bool)
    boxes = []
    for i, (_, (y0, y1, x0, x1), _) in enumerate(specs):
        masks[i, y0:y1, x0:x1] = True
        boxes.append([x0, y0, x1, y1])
    instances = Instances((height, width))
    instances.pred_masks = masks
    instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    instances.pred_classes = torch.tensor([k for k, _, _ in specs], dtype=torch.int64)
    instances.scores = torch.tensor([s for _, _, s in specs], dtype=torch.float32)
    return instances


TWO_PIXEL_MA = (0, (200, 201, 250, 252), 0.9)  # one row, two columns
BIG_EX = (2, (100, 160, 300, 380), 0.8)


def _colour_mask(picture, colour):
    return (picture[..., :3] == np.array(colour, np.uint8)).all(axis=-1)


def test_a_two_pixel_lesion_is_outlined_and_ringed_in_the_saved_png(tmp_path):
    height, width = 1958, 2196  # a HEI-MED photograph's size
    y, x = 1000, 1200
    instances = _instances([(0, (y, y + 1, x, x + 2), 0.9)], height, width)
    picture = draw_prediction_overlay(_photo(height, width), instances, META, legend=False)
    Image.fromarray(picture).save(tmp_path / "o.png")
    saved = np.asarray(Image.open(tmp_path / "o.png").convert("RGB"))
    ma = _colour_mask(saved, MA)
    # Its outline: the lesion's own pixels carry the colour ...
    assert ma[y, x] and ma[y, x + 1]
    # ... and a ring around it, far enough out to be seen when the picture is shrunk.
    ring = ring_radius(height, width)
    assert ring >= 10
    ys, xs = np.nonzero(ma)
    distance = np.hypot(ys - y, xs - (x + 0.5))
    assert ring - 1 <= distance.max() <= ring + 3
    # The ring is a ring: its inside, but for the lesion and its outline, keeps the photograph.
    grid_y, grid_x = np.mgrid[y - ring:y + ring + 1, x - ring:x + ring + 2]
    inside = np.hypot(grid_y - y, grid_x - (x + 0.5)) < ring - 3
    inside &= ~((abs(grid_y - y) <= 2) & (grid_x >= x - 2) & (grid_x <= x + 3))
    assert (saved[grid_y[inside], grid_x[inside]] == GREY).all()
    # Shrunk to 900 pixels across, as a screen shows a fundus photograph, it is still there.
    small = np.asarray(Image.fromarray(saved).resize((900, 802), Image.BILINEAR)).astype(int)
    assert np.abs(small - GREY).sum(axis=-1).max() > 40
    # Without the ring, the shrunk outline alone is barely a smudge: the ring is what shows.
    bare = draw_marks(_photo(height, width), prediction_marks(instances, META), legend=False,
                      ring=1)
    bare_small = np.asarray(Image.fromarray(bare).resize((900, 802), Image.BILINEAR)).astype(int)
    assert (np.abs(bare_small - GREY).sum(axis=-1) > 40).sum() < (
        np.abs(small - GREY).sum(axis=-1) > 40).sum()


def test_outlines_not_fills_and_no_text_by_default():
    instances = _instances([TWO_PIXEL_MA, BIG_EX])
    photo = _photo()
    plain = draw_prediction_overlay(photo, instances, META, legend=False)
    changed = (plain != photo).any(axis=-1)
    # Every pixel drawn is an outline or ring in a lesion type's colour: no text, no blend.
    assert (_colour_mask(plain, MA) | _colour_mask(plain, EX))[changed].all()
    # The big exudate is outlined, not filled: its inside is the photograph.
    assert (plain[110:150, 310:370] == GREY).all()
    assert _colour_mask(plain, EX)[100, 300:380].all()
    # Scores on request: text appears (pixels of other colours than the lesions').
    scored = draw_prediction_overlay(photo, instances, META, legend=False, show_scores=True)
    extra = (scored != photo).any(axis=-1) & ~_colour_mask(scored, MA) & ~_colour_mask(scored, EX)
    assert extra.sum() > 20
    # Below the score threshold a lesion is not drawn.
    high = draw_prediction_overlay(photo, instances, META, 0.85, legend=False)
    assert not _colour_mask(high, EX).any() and _colour_mask(high, MA).any()


def test_the_legend_lists_exactly_the_lesion_types_present():
    instances = _instances([TWO_PIXEL_MA, BIG_EX, (2, (300, 330, 50, 90), 0.7)])
    marks = prediction_marks(instances, META)
    assert legend_entries(marks, CLASSES) == [("microaneurysm", MA), ("hard exudate", EX)]
    photo = _photo()
    picture = draw_prediction_overlay(photo, instances, META)
    no_legend = draw_prediction_overlay(photo, instances, META, legend=False)
    # A band below the photograph, which keeps its rows: nothing covers the retina.
    assert picture.shape[0] > H and (picture[:H] == no_legend).all()
    band = picture[H:]
    # One swatch per type present, none of the absent haemorrhage; white names.
    assert _colour_mask(band, MA).sum() > 20 and _colour_mask(band, EX).sum() > 20
    assert not _colour_mask(picture, HE).any()
    assert _colour_mask(band, (255, 255, 255)).sum() > 20
    # Two entries: the band with only the exudates holds less white text.
    only_ex = draw_prediction_overlay(photo, _instances([BIG_EX]), META)[H:]
    assert not _colour_mask(only_ex, MA).any() and _colour_mask(only_ex, EX).any()
    assert _colour_mask(only_ex, (255, 255, 255)).sum() < _colour_mask(band, (255, 255, 255)).sum()
    # Nothing found: the photograph untouched, the band says so (text, no swatch).
    empty = draw_prediction_overlay(photo, _instances([]), META)
    assert (empty[:H] == photo).all()
    assert not any(_colour_mask(empty, c).any() for c in (MA, HE, EX))


def test_ground_truth_overlay_outlines_lesions_and_greys_ignore_regions():
    def ann(category, rows, cols, crowd=0):
        mask = np.zeros((H, W), bool)
        mask[rows, cols] = True
        ys, xs = np.nonzero(mask)
        return {"category_id": category, "iscrowd": crowd, "segmentation": encode_rle(mask),
                "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1],
                "bbox_mode": BoxMode.XYWH_ABS}

    record = {"annotations": [ann(1, slice(50, 90), slice(60, 120)),
                              ann(2, slice(300, 350), slice(300, 400), crowd=1)]}
    picture = draw_ground_truth_overlay(_photo(), record, META, legend=False)
    assert _colour_mask(picture, HE)[50, 60:120].all() and (picture[60:80, 70:110] == GREY).all()
    assert _colour_mask(picture, IGNORE_COLOUR)[300, 300:400].all()
    with_legend = draw_ground_truth_overlay(_photo(), record, META)
    assert not _colour_mask(with_legend, MA).any()  # no microaneurysm in the truth, none listed


def test_panels_are_titled_and_keep_the_pictures():
    left, right = np.full((H, W, 3), 10, np.uint8), np.full((H, W, 3), 200, np.uint8)
    panels = side_by_side(left, right, gap=8, titles=("ground truth", "prediction"))
    band = panels.shape[0] - H
    assert band > 10 and panels.shape[1] == 2 * W + 8
    assert (panels[band:, :W] == 10).all() and (panels[band:, W + 8:] == 200).all()
    for x0 in (0, W + 8):  # white title text in each band
        assert _colour_mask(panels[:band, x0:x0 + W], (255, 255, 255)).sum() > 20
    assert side_by_side(left, right).shape == (H, 2 * W + 8, 3)  # untitled: as before


def test_densest_region_finds_the_cluster_and_the_crop_is_full_resolution(tmp_path):
    cluster = [(0, (y, y + 2, x, x + 2), 0.9) for y, x in itertools.product((300, 320, 340),
                                                                           (400, 420, 440))]
    lone = [(2, (20, 60, 20, 60), 0.8)]
    instances = _instances(cluster + lone)
    pred = prediction_marks(instances, META)
    x0, y0, x1, y1 = densest_region([pred], H, W, size=128)
    assert (x1 - x0, y1 - y0) == (128, 128)
    assert x0 <= 400 and x1 >= 442 and y0 <= 300 and y1 >= 342
    assert len(crop_marks(pred, (x0, y0, x1, y1))) == 9
    assert densest_region([[]], H, W, size=128) == ((W - 128) // 2, (H - 128) // 2,
                                                     (W - 128) // 2 + 128, (H - 128) // 2 + 128)

    photo = np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8)
    box = write_overlay(photo, [], pred, CLASSES, tmp_path / "o.png", tmp_path / "crops/o.png",
                        crop_size=128)
    full = np.asarray(Image.open(tmp_path / "o.png"))
    crop = np.asarray(Image.open(tmp_path / "crops/o.png"))
    x0, y0, x1, y1 = box
    # Title bands above, legend bands below each panel.
    assert full.shape[1] == 2 * W + 8 and crop.shape[1] == 2 * 128 + 8
    title = int(np.argmax((full[:, W + 8:] == photo[0, 0]).all(axis=-1).any(axis=1)))
    crop_title = int(np.argmax((crop[:, 128 + 8:] == photo[y0, x0]).all(axis=-1).any(axis=1)))
    assert 10 < title and 10 < crop_title < crop.shape[0] - 128
    # 1:1: the crop's prediction panel is the full picture's, pixel for pixel.
    full_pred = full[title:title + H, W + 8:][y0:y1, x0:x1]
    crop_pred = crop[crop_title:crop_title + 128, 128 + 8:]
    assert (full_pred == crop_pred).all()
    assert _colour_mask(crop_pred, MA).sum() > 9 * 6


def test_overlay_names_match_predict_and_evaluator_writes_one_file_per_image(tmp_path):
    names = overlay_names(["a/eye.jpg", "b/eye.png", "left.png"])
    assert names == {"a/eye.jpg": "eye.jpg.png", "b/eye.png": "eye.png.png", "left.png": "left.png"}

    dataset = "overlay_test_eye_stems"
    records = []
    for image_id, name in enumerate(("eye.jpg", "eye.png")):
        path = tmp_path / name
        Image.fromarray(_photo()).save(path)
        records.append({"file_name": str(path), "image_id": image_id, "height": H, "width": W,
                        "annotations": []})
    DatasetCatalog.register(dataset, lambda: records)
    MetadataCatalog.get(dataset).set(thing_classes=CLASSES)
    try:
        evaluator = OverlayEvaluator(dataset, str(tmp_path / "out"), num_images=8)
        evaluator.reset()
        evaluator.process(records, [{"instances": _instances([TWO_PIXEL_MA])}] * 2)
    finally:
        DatasetCatalog.remove(dataset)
        MetadataCatalog.remove(dataset)
    overlays = tmp_path / "out" / "overlays"
    assert sorted(p.name for p in overlays.glob("*.png")) == ["eye.jpg.png", "eye.png.png"]
    assert sorted(p.name for p in (overlays / "crops").glob("*.png")) == [
        "eye.jpg.png", "eye.png.png"]
    picture = np.asarray(Image.open(overlays / "eye.png.png"))
    assert _colour_mask(picture[:, W + 8:], MA).any()  # the prediction panel
    assert not _colour_mask(picture[:, :W], MA).any()  # no ground truth lesion
    assert (picture[-10:, :W] != GREY).any()  # the ground truth's legend band: "no lesion"


def test_boxes_outline_box_only_predictions_and_empty_masks_are_left_out():
    instances = _instances([BIG_EX, (0, (10, 10, 10, 10), 0.9)])  # the second mask is empty
    instances.pred_boxes.tensor[1] = torch.tensor([10.0, 10.0, 40.0, 30.0])
    assert [m.name for m in prediction_marks(instances, META)] == ["hard exudate"]
    boxes_only = Instances((H, W))
    boxes_only.pred_boxes = instances.pred_boxes
    boxes_only.pred_classes = instances.pred_classes
    boxes_only.scores = instances.scores
    marks = prediction_marks(boxes_only, META)
    assert [m.box for m in marks] == [(300, 100, 380, 160), (10, 10, 40, 30)]
    picture = draw_prediction_overlay(_photo(), boxes_only, META, legend=False)
    assert _colour_mask(picture, MA)[10, 10:40].all() and (picture[15:25, 15:35] == GREY).all()
