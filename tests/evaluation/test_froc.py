"""Lesion-level FROC and F1: cases worked by hand (the arithmetic is in the comments), and the
Detectron2 evaluator against froc_curve."""
import copy
import json
import math

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

import retina_d2  # noqa: F401  (patches Detectron2 0.6 before it is imported)
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances
from retina_d2.config import add_retina_config
from retina_d2.data.register import load_lesion_json
from retina_d2.evaluation import (
    FP_RATES,
    InstanceEvalError,
    LesionFROCEvaluator,
    format_froc,
    froc_curve,
    froc_metrics,
    rate_name,
)

CATEGORIES = [
    {"id": 1, "name": "microaneurysm"},
    {"id": 2, "name": "haemorrhage"},  # never in the GT: NaN, left out of the means
    {"id": 3, "name": "hard exudate"},
]
MA, HE, EX = 1, 2, 3
H, W = 40, 60
RATES = [rate_name(r) for r in FP_RATES]


# --- building GT and detections -------------------------------------------------------------


def rect(y, x, h, w):
    mask = np.zeros((H, W), np.uint8)
    mask[y : y + h, x : x + w] = 1
    return mask


def encode(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def make_gt(num_images, lesions, extra=None):
    """lesions: [(image_id, category, mask)] or [(image_id, category, mask, iscrowd)]."""
    annotations = []
    for i, lesion in enumerate(lesions, start=1):
        image_id, category, mask = lesion[:3]
        rle = encode(mask)
        annotations.append(
            {
                "id": i,
                "image_id": image_id,
                "category_id": category,
                "segmentation": rle,
                "area": float(mask_util.area(rle)),
                "bbox": [float(v) for v in mask_util.toBbox(rle)],
                "iscrowd": lesion[3] if len(lesion) > 3 else 0,
            }
        )
    images = [
        {"id": i, "height": H, "width": W, "file_name": f"{i}.jpg", **(extra or {}).get(i, {})}
        for i in range(1, num_images + 1)
    ]
    return {"images": images, "annotations": annotations, "categories": copy.deepcopy(CATEGORIES)}


def det(image_id, category, mask, score):
    rle = encode(mask)
    return {
        "image_id": image_id,
        "category_id": category,
        "bbox": [float(v) for v in mask_util.toBbox(rle)],
        "segmentation": rle,
        "score": score,
    }


def sensitivities(curve):
    return [curve["sensitivity_at"][r] for r in RATES]


# --- cases worked by hand -------------------------------------------------------------------


@pytest.mark.parametrize("match", ["iou", "center"])
def test_all_hits_give_100_at_every_rate(match):
    # 2 images, 2 MAs each, each predicted exactly: 4 hits, 0 FP.
    lesions = [(i, MA, rect(5 + 20 * j, 5 + 20 * j, 3, 3)) for i in (1, 2) for j in (0, 1)]
    gt = make_gt(2, lesions)
    dets = [det(i, c, m, 0.9 - 0.1 * n) for n, (i, c, m) in enumerate(lesions)]
    froc = froc_curve(gt, dets, match=match)
    ma = froc["categories"]["microaneurysm"]
    assert sensitivities(ma) == [1.0] * 7 and ma["froc"] == 1.0
    # One operating point per score: 1/4, 2/4, 3/4, 4/4 found, never a FP.
    assert ma["sensitivity"] == [0.25, 0.5, 0.75, 1.0] and ma["fps_per_image"] == [0.0] * 4
    assert (ma["tp"], ma["fp"], ma["fn"]) == (4, 0, 0)  # scores 0.9..0.6 >= 0.35
    assert ma["precision"] == ma["recall"] == ma["f1"] == 1.0
    metrics = froc_metrics(froc)
    assert metrics["FROC"] == 100.0 and metrics["FROC-microaneurysm"] == 100.0
    assert metrics["sens@1/8"] == 100.0 and metrics["F1"] == 100.0
    # No haemorrhage in the GT: NaN, and not part of the mean.
    assert math.isnan(metrics["FROC-haemorrhage"]) and froc["mean"]["num_categories"] == 1


def test_all_misses_give_0():
    # 2 images, 1 MA each; 3 predictions per image, all away from the MA: 6 FPs.
    gt = make_gt(2, [(1, MA, rect(5, 5, 3, 3)), (2, MA, rect(5, 5, 3, 3))])
    dets = [
        det(i, MA, rect(30, 10 + 10 * k, 3, 3), 0.9 - 0.1 * k) for i in (1, 2) for k in range(3)
    ]
    ma = froc_curve(gt, dets)["categories"]["microaneurysm"]
    assert sensitivities(ma) == [0.0] * 7 and ma["froc"] == 0.0
    # Scores 0.9, 0.8, 0.7 (two predictions each): 2, 4, 6 FPs over 2 images.
    assert ma["fps_per_image"] == [1.0, 2.0, 3.0]
    assert (ma["tp"], ma["fp"], ma["fn"]) == (0, 6, 2)
    assert ma["precision"] == 0.0 and ma["recall"] == 0.0 and ma["f1"] == 0.0


def spread_case():
    """4 images with 2 MAs each (8 lesions). In descending score, with H a hit and F a FP:

        H F H F H F F H F F F F H F*8 H F*16 H F H

    Cumulative (FPs, hits) after each H: (0, 1) (1, 2) (2, 3) (4, 4) (8, 5) (16, 6) (32, 7)
    (33, 8). The FP budget at rate r is 4 r FPs (4 images): 0.5, 1, 2, 4, 8, 16, 32, so the
    sensitivity at 1/8 .. 8 is 1/8, 2/8, ..., 7/8 and FROC = (1+2+...+7) / 8 / 7 = 28/56 = 1/2.
    The 8th hit comes after a 33rd FP: beyond 8 FPs per image.
    """
    lesion_spots = [(5, 5), (25, 15)]
    lesions = [(i, MA, rect(y, x, 3, 3)) for i in range(1, 5) for y, x in lesion_spots]
    # FPs on the right half, 18 spots per image, away from the MAs (x < 30).
    spots = [(2 + 6 * r, 40 + 6 * c) for r in range(6) for c in range(3)]
    sequence = "HFHFHFFHFFFFH" + "F" * 8 + "H" + "F" * 16 + "HFH"
    dets, hits, fps = [], iter(lesions), 0
    for n, outcome in enumerate(sequence):
        score = 0.99 - 0.01 * n
        if outcome == "H":
            image_id, _, mask = next(hits)
        else:
            image_id, (y, x) = fps % 4 + 1, spots[fps // 4]  # round-robin over the images
            mask, fps = rect(y, x, 3, 3), fps + 1
        dets.append(det(image_id, MA, mask, score))
    assert fps == 33
    return make_gt(4, lesions), dets


def test_fps_spread_over_images_give_each_rate_its_sensitivity():
    gt, dets = spread_case()
    froc = froc_curve(gt, dets)
    ma = froc["categories"]["microaneurysm"]
    assert sensitivities(ma) == pytest.approx([k / 8 for k in range(1, 8)])
    assert ma["froc"] == pytest.approx(0.5)
    assert ma["num_lesions"] == 8 and ma["num_images"] == 4 and ma["num_predictions"] == 41
    # The last point: all 33 FPs over 4 images, all 8 found.
    assert ma["fps_per_image"][-1] == pytest.approx(33 / 4) and ma["sensitivity"][-1] == 1.0
    # The same predictions given in another order: the sweep sorts them by score.
    shuffled = [dets[i] for i in np.random.default_rng(0).permutation(len(dets))]
    assert froc_curve(gt, shuffled)["categories"]["microaneurysm"]["froc"] == pytest.approx(0.5)
    metrics = froc_metrics(froc)
    assert metrics["sens@1/8"] == pytest.approx(12.5) and metrics["sens@8"] == pytest.approx(87.5)
    assert metrics["FROC"] == pytest.approx(50.0)
    table = format_froc(froc)
    assert "| microaneurysm" in table and "@1/8" in table and "over 4 images" in table


def test_duplicate_hit_is_neither_hit_nor_fp():
    # 1 image, 1 MA. Scores: exact hit 0.9, a second (shifted, IoU 6/12 = 0.5) copy 0.8, a FP
    # 0.7. The copy finds nothing new and is no FP: (FPs, found) = (0, 1) (0, 1) (1, 1).
    gt = make_gt(1, [(1, MA, rect(10, 10, 3, 3))])
    dets = [
        det(1, MA, rect(10, 10, 3, 3), 0.9),
        det(1, MA, rect(10, 11, 3, 3), 0.8),
        det(1, MA, rect(30, 40, 3, 3), 0.7),
    ]
    ma = froc_curve(gt, dets)["categories"]["microaneurysm"]
    assert ma["fps_per_image"] == [0.0, 0.0, 1.0] and ma["sensitivity"] == [1.0, 1.0, 1.0]
    assert ma["froc"] == 1.0
    # At 0.35: TP 1, FP 1 (COCOeval would say FP 2): P 1/2, R 1, F1 2*1/(2*1+1+0) = 2/3.
    assert (ma["tp"], ma["fp"]) == (1, 1)
    assert ma["precision"] == 0.5 and ma["f1"] == pytest.approx(2 / 3)
    # Ranked first, the shifted copy takes the lesion and the exact one is the duplicate.
    dets[0]["score"], dets[1]["score"] = 0.8, 0.9
    assert froc_curve(gt, dets)["categories"]["microaneurysm"]["fp"] == 1


def test_prediction_overlapping_a_found_and_a_free_lesion_hits_the_free_one():
    # Two adjacent 2x3 MAs (rows 10-11, 12-13); the second prediction (rows 11-12) overlaps
    # both (IoU 3/9 with each): the first lesion is found already, so it finds the second.
    gt = make_gt(1, [(1, MA, rect(10, 10, 2, 3)), (1, MA, rect(12, 10, 2, 3))])
    dets = [det(1, MA, rect(10, 10, 2, 3), 0.9), det(1, MA, rect(11, 10, 2, 3), 0.8)]
    ma = froc_curve(gt, dets)["categories"]["microaneurysm"]
    assert ma["sensitivity"] == [0.5, 1.0] and ma["fp"] == 0


@pytest.mark.parametrize("match", ["iou", "center"])
def test_prediction_on_ignore_region_is_neither(match):
    # 1 image: a MA and a crowd (ignore) region. Hit 0.9, on the crowd region 0.8 (inside it:
    # overlap = intersection / its own area = 1), a FP 0.7: FPs 0, 0, 1; the crowd region is no
    # lesion to find.
    gt = make_gt(1, [(1, MA, rect(5, 5, 3, 3)), (1, MA, rect(20, 20, 10, 10), 1)])
    dets = [
        det(1, MA, rect(5, 5, 3, 3), 0.9),
        det(1, MA, rect(22, 22, 3, 3), 0.8),
        det(1, MA, rect(5, 45, 3, 3), 0.7),
    ]
    ma = froc_curve(gt, dets, match=match)["categories"]["microaneurysm"]
    assert ma["num_lesions"] == 1
    assert ma["fps_per_image"] == [0.0, 0.0, 1.0] and ma["sensitivity"] == [1.0] * 3
    assert (ma["tp"], ma["fp"], ma["fn"]) == (1, 1, 0)


def crafted_match_case():
    """1 image, 2 MAs.

    A (0.9): a 10x10 square around a 3x3 MA at rows/cols 14-16: IoU 9/100 = 0.09 < 0.2, but its
    centroid (mean index 14.5, pixel centre 15.0) is the MA's middle pixel (15, 15).
    B (0.8): a 10x10 square shifted 5 columns from a 10x10 lesion at rows 0-9, cols 20-29:
    IoU 50/150 = 1/3 >= 0.2, but its centroid column is 29.5 + 0.5 = 30: outside the lesion.
    """
    gt = make_gt(1, [(1, MA, rect(14, 14, 3, 3)), (1, MA, rect(0, 20, 10, 10))])
    dets = [det(1, MA, rect(10, 10, 10, 10), 0.9), det(1, MA, rect(0, 25, 10, 10), 0.8)]
    return gt, dets


def test_center_and_iou_matching_differ_on_a_crafted_case():
    gt, dets = crafted_match_case()
    # IoU: A a FP (FPs 1, found 0), then B a hit (1, 1/2). 1 FP per image > 1/8, 1/4, 1/2: 0
    # there, 1/2 at 1, 2, 4, 8: FROC = 4 * 0.5 / 7 = 2/7.
    by_iou = froc_curve(gt, dets, match="iou")["categories"]["microaneurysm"]
    assert sensitivities(by_iou) == [0, 0, 0, 0.5, 0.5, 0.5, 0.5]
    assert by_iou["froc"] == pytest.approx(2 / 7)
    # Centre: A a hit (0, 1/2), then B a FP (1, 1/2): 1/2 at every rate, FROC 1/2.
    by_center = froc_curve(gt, dets, match="center")["categories"]["microaneurysm"]
    assert sensitivities(by_center) == [0.5] * 7 and by_center["froc"] == 0.5
    # A laxer IoU (0.05) takes A as well: both found, FROC 1.
    lax = froc_curve(gt, dets, match="iou", iou_threshold=0.05)["categories"]["microaneurysm"]
    assert lax["froc"] == 1.0


def test_boxes_instead_of_masks():
    # A diagonal line across a 10x10 lesion: mask IoU 10/100 = 0.1 < 0.2, box IoU 1.
    line = np.zeros((H, W), np.uint8)
    line[np.arange(10, 20), np.arange(10, 20)] = 1
    gt = make_gt(1, [(1, MA, rect(10, 10, 10, 10))])
    dets = [det(1, MA, line, 0.9)]
    assert froc_curve(gt, dets)["categories"]["microaneurysm"]["froc"] == 0.0
    assert froc_curve(gt, dets, use_masks=False)["categories"]["microaneurysm"]["froc"] == 1.0
    # Box centre (15, 15) inside the lesion's box.
    boxes = froc_curve(gt, dets, match="center", use_masks=False)
    assert boxes["categories"]["microaneurysm"]["froc"] == 1.0 and not boxes["params"]["use_masks"]
    # Results without masks are matched by boxes (with a warning), whatever use_masks says.
    no_masks = [{k: v for k, v in d.items() if k != "segmentation"} for d in dets]
    assert froc_curve(gt, no_masks)["categories"]["microaneurysm"]["froc"] == 1.0


def test_healthy_images_add_to_the_fp_denominator():
    # Image 1: one MA; image 2 healthy. A FP on image 2 (0.9), then the hit on image 1 (0.8).
    # 2 images: (FPs/image, found) = (1/2, 0) (1/2, 1): 0 at 1/8 and 1/4, 1 from 1/2 on:
    # FROC 5/7.
    dets = [det(2, MA, rect(20, 20, 3, 3), 0.9), det(1, MA, rect(5, 5, 3, 3), 0.8)]
    two = froc_curve(make_gt(2, [(1, MA, rect(5, 5, 3, 3))]), dets)
    assert sensitivities(two["categories"]["microaneurysm"]) == [0, 0, 1, 1, 1, 1, 1]
    assert two["categories"]["microaneurysm"]["froc"] == pytest.approx(5 / 7)
    # Two more healthy images, without predictions: 1 FP over 4 images = 1/4 per image, within
    # the 1/4 budget: 0 at 1/8 only, FROC 6/7.
    four = froc_curve(make_gt(4, [(1, MA, rect(5, 5, 3, 3))]), dets)
    ma = four["categories"]["microaneurysm"]
    assert ma["num_images"] == 4 and ma["fps_per_image"] == [0.25, 0.25]
    assert sensitivities(ma) == [0, 1, 1, 1, 1, 1, 1] and ma["froc"] == pytest.approx(6 / 7)


def test_tied_scores_enter_together():
    # A FP and a hit with the same score: one operating point (1 FP, 1 found) on 1 image; the hit
    # cannot be had without the FP, so 0 below 1 FP per image: FROC 4/7.
    gt = make_gt(1, [(1, MA, rect(5, 5, 3, 3))])
    dets = [det(1, MA, rect(30, 30, 3, 3), 0.5), det(1, MA, rect(5, 5, 3, 3), 0.5)]
    ma = froc_curve(gt, dets)["categories"]["microaneurysm"]
    assert ma["thresholds"] == [0.5] and ma["fps_per_image"] == [1.0]
    assert ma["froc"] == pytest.approx(4 / 7)


def test_precision_recall_f1_at_a_score_threshold():
    # 4 MAs on 1 image; in descending score: hit 0.9, FP 0.6, hit 0.4, FP 0.3, hit 0.2.
    spots = [(2, 2), (2, 20), (20, 2), (20, 20)]
    gt = make_gt(1, [(1, MA, rect(y, x, 3, 3)) for y, x in spots])
    dets = [
        det(1, MA, rect(2, 2, 3, 3), 0.9),
        det(1, MA, rect(30, 50, 3, 3), 0.6),
        det(1, MA, rect(2, 20, 3, 3), 0.4),
        det(1, MA, rect(30, 40, 3, 3), 0.3),
        det(1, MA, rect(20, 2, 3, 3), 0.2),
    ]
    # >= 0.35: TP 2, FP 1, FN 2: P 2/3, R 2/4, F1 = 2*2 / (2*2 + 1 + 2) = 4/7.
    ma = froc_curve(gt, dets)["categories"]["microaneurysm"]
    assert (ma["tp"], ma["fp"], ma["fn"]) == (2, 1, 2)
    assert ma["precision"] == pytest.approx(2 / 3) and ma["recall"] == 0.5
    assert ma["f1"] == pytest.approx(4 / 7)
    # >= 0.4 keeps the 0.4 hit (the threshold is inclusive): the same.
    assert froc_curve(gt, dets, score_threshold=0.4)["categories"]["microaneurysm"]["tp"] == 2
    # >= 0.5: TP 1, FP 1, FN 3: P 1/2, R 1/4, F1 = 2 / (2 + 1 + 3) = 1/3.
    ma = froc_curve(gt, dets, score_threshold=0.5)["categories"]["microaneurysm"]
    assert (ma["precision"], ma["recall"]) == (0.5, 0.25) and ma["f1"] == pytest.approx(1 / 3)
    # > every score: nothing kept, precision undefined, F1 0 (4 lesions missed).
    ma = froc_curve(gt, dets, score_threshold=0.95)["categories"]["microaneurysm"]
    assert math.isnan(ma["precision"]) and ma["recall"] == 0.0 and ma["f1"] == 0.0
    # Sweep: (FPs, found) = (0, 1) (1, 1) (1, 2) (2, 2) (2, 3) on 1 image: 1/4 at 1/8..1/2,
    # 2/4 at 1, 3/4 at 2, 4, 8: FROC = (3*0.25 + 0.5 + 3*0.75) / 7 = 3.5 / 7 = 1/2.
    swept = froc_curve(gt, dets)["categories"]["microaneurysm"]
    assert sensitivities(swept) == [0.25, 0.25, 0.25, 0.5, 0.75, 0.75, 0.75]
    assert swept["froc"] == pytest.approx(0.5)


def two_types_case():
    """e-ophtha-like: image 1 graded for exudates, image 2 for MAs, image 3 healthy, graded for
    both. Predictions: the exudate and the MA found (0.8), a MA predicted on image 1 (0.9) and
    an exudate on image 3 (0.6)."""
    extra = {
        1: {"annotated_category_ids": [EX]},
        2: {"annotated_category_ids": [MA]},
        3: {"annotated_category_ids": [MA, EX]},
    }
    gt = make_gt(3, [(1, EX, rect(5, 5, 8, 8)), (2, MA, rect(20, 30, 3, 3))], extra)
    dets = [
        det(1, EX, rect(5, 5, 8, 8), 0.8),
        det(1, MA, rect(30, 40, 3, 3), 0.9),
        det(2, MA, rect(20, 30, 3, 3), 0.8),
        det(3, EX, rect(10, 10, 5, 5), 0.6),
    ]
    return gt, dets


def test_per_category_mean_pooled_and_annotated_only():
    gt, dets = two_types_case()
    froc = froc_curve(gt, dets)
    ma, ex = froc["categories"]["microaneurysm"], froc["categories"]["hard exudate"]
    # MA: FP (1/3 per image), then the hit: 0 at 1/8 and 1/4, 1 from 1/2: FROC 5/7.
    assert sensitivities(ma) == [0, 0, 1, 1, 1, 1, 1]
    # Exudate: hit, then FP at 1/3 per image: 1 everywhere.
    assert ex["froc"] == 1.0
    assert froc["mean"]["froc"] == pytest.approx((5 / 7 + 1) / 2)
    assert froc["mean"]["sensitivity_at"]["1/8"] == 0.5
    # Pooled, one threshold over both types on 3 images: MA FP (0.9), two hits (0.8), exudate FP
    # (0.6): (1, 0) (1, 2) (2, 2): 0 at 1/8, 1/4; 1 at 1/2 (1 FP <= 1.5); FROC 5/7.
    assert froc["overall"]["num_lesions"] == 2 and froc["overall"]["fp"] == 2
    assert sensitivities(froc["overall"]) == [0, 0, 1, 1, 1, 1, 1]
    # annotated_only: the MA on image 1 is dropped and each type counts its own images (MA:
    # images 2, 3; exudate: 1, 3): both FROC 1; the exudate FP is 1/2 per image.
    kept = froc_curve(gt, dets, annotated_only=True)
    assert kept["categories"]["microaneurysm"]["num_images"] == 2
    assert kept["categories"]["microaneurysm"]["fp"] == 0
    assert kept["categories"]["hard exudate"]["fps_per_image"] == [0.0, 0.5]
    assert kept["mean"]["froc"] == 1.0


def test_bad_inputs_are_refused(tmp_path):
    gt, dets = two_types_case()
    with pytest.raises(ValueError, match="match must be one of"):
        froc_curve(gt, dets, match="overlap")
    with pytest.raises(ValueError, match="fp_rates"):
        froc_curve(gt, dets, fp_rates=(0, 1))
    other = tmp_path / "other.json"
    other.write_text(json.dumps([dict(d, image_id=d["image_id"] + 100) for d in dets]))
    with pytest.raises(InstanceEvalError, match="other.json"):
        froc_curve(gt, other)
    assert rate_name(0.125) == "1/8" and rate_name(2.0) == "2"


# --- the Detectron2 evaluator --------------------------------------------------------------------


@pytest.fixture
def registered(tmp_path):
    """The two-types case registered as the converters' datasets are: (name, GT dict, dets)."""
    gt, dets = two_types_case()
    json_file = tmp_path / "all.json"
    json_file.write_text(json.dumps(gt))
    name = "test_lesion_froc_eval"
    DatasetCatalog.register(name, lambda: load_lesion_json(str(json_file), str(tmp_path), name))
    MetadataCatalog.get(name).set(
        json_file=str(json_file),
        image_root=str(tmp_path),
        evaluator_type="coco",
        thing_classes=[c["name"] for c in CATEGORIES],
        thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(CATEGORIES)},
    )
    yield name, gt, dets
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def to_instances(dets, contiguous):
    instances = Instances((H, W))
    masks = np.zeros((len(dets), H, W), bool)
    for mask, d in zip(masks, dets):
        mask[:] = mask_util.decode(d["segmentation"])
    boxes = [[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in dets)]
    instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    instances.scores = torch.tensor([d["score"] for d in dets])
    instances.pred_classes = torch.tensor([contiguous[d["category_id"]] for d in dets])
    instances.pred_masks = torch.from_numpy(masks)
    return instances


def run_evaluator(evaluator, name, dets):
    contiguous = MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id
    evaluator.reset()
    for record in DatasetCatalog.get(name):
        mine = [d for d in dets if d["image_id"] == record["image_id"]]
        evaluator.process([record], [{"instances": to_instances(mine, contiguous)}])
    return evaluator.evaluate()


def same(a, b):
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-9)


@pytest.mark.parametrize("annotated_only", [False, True])
def test_evaluator_equals_froc_curve(registered, tmp_path, annotated_only):
    name, gt, dets = registered
    out = tmp_path / "eval"
    evaluator = LesionFROCEvaluator(
        name, str(out), annotated_only=annotated_only, distributed=False
    )
    metrics = run_evaluator(evaluator, name, dets)
    expected = froc_metrics(froc_curve(gt, dets, annotated_only=annotated_only))
    assert list(metrics) == ["froc"] and list(metrics["froc"]) == list(expected)
    for key, value in expected.items():
        assert same(metrics["froc"][key], value), (key, metrics["froc"][key], value)
    assert metrics["froc"]["FROC"] == pytest.approx(100.0 if annotated_only else 600 / 7)
    assert math.isnan(metrics["froc"]["FROC-haemorrhage"])
    written = json.loads((out / "froc.json").read_text())
    assert written["categories"]["haemorrhage"]["froc"] is None  # NaN written as null
    assert written["mean"]["froc"] == pytest.approx(metrics["froc"]["FROC"] / 100)
    # Numbers only: every operating point, from which the report draws the curves; no picture.
    curve = froc_curve(gt, dets, annotated_only=annotated_only)["categories"]["hard exudate"]
    assert written["categories"]["hard exudate"]["fps_per_image"] == curve["fps_per_image"]
    assert written["categories"]["hard exudate"]["sensitivity"] == curve["sensitivity"]
    assert sorted(p.name for p in out.iterdir()) == ["eval_info.json", "froc.json"]


def test_evaluator_from_config(registered):
    name, gt, dets = registered
    cfg = get_cfg()
    add_retina_config(cfg)
    assert cfg.RETINA.EVAL.FROC_ENABLED is False and cfg.RETINA.EVAL.FROC_MATCH == "iou"
    assert cfg.RETINA.EVAL.FROC_IOU == 0.2
    cfg.MODEL.MASK_ON = True
    cfg.RETINA.EVAL.FROC_MATCH = "center"
    cfg.RETINA.EVAL.FROC_SCORE_THRESHOLD = 0.85
    # distributed (the default): one process, so comm.gather hands back this rank's list
    arguments = LesionFROCEvaluator.from_config(cfg, name)
    assert isinstance(arguments, dict) and arguments["match"] == "center"
    evaluator = LesionFROCEvaluator(cfg, name)
    metrics = run_evaluator(evaluator, name, dets)["froc"]
    expected = froc_metrics(froc_curve(gt, dets, match="center", score_threshold=0.85))
    assert metrics == pytest.approx(expected, nan_ok=True)
    # >= 0.85 keeps only the MA FP on image 1: MA precision 0, recall 0.
    assert metrics["P-microaneurysm"] == 0.0 and math.isnan(metrics["P-hard exudate"])
    cfg.MODEL.MASK_ON = False
    assert LesionFROCEvaluator(cfg, name)._options["use_masks"] is False
