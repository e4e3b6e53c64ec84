"""Instance AP / AR: hand-made GT and detections, each checked against pycocotools' COCOeval run
independently here and against the value worked by hand."""
import contextlib
import copy
import io
import json
import math

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO

import retina_d2  # noqa: F401  (patches Detectron2 0.6 before it is imported)
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation.coco_evaluation import COCOevalMaxDets
from detectron2.structures import Boxes, Instances
from retina_d2.config import add_retina_config
from retina_d2.data.register import load_lesion_json
from retina_d2.evaluation import (
    InstanceEvalError,
    LesionInstanceEvaluator,
    evaluate_coco_results,
    format_instance_metrics,
)

THRESHOLDS = (0.35, 0.5, 0.75)
# Lesion-vocabulary ids: non-contiguous on purpose (the evaluator must map 0, 1, 2 back to them).
CATEGORIES = [
    {"id": 1, "name": "microaneurysm"},
    {"id": 2, "name": "haemorrhage"},  # never in the GT: its APs are NaN
    {"id": 3, "name": "hard exudate"},
]
MA, HE, EX = 1, 2, 3


# --- building GT and detections -------------------------------------------------------------


def rect(height, width, y, x, h, w):
    mask = np.zeros((height, width), np.uint8)
    mask[y : y + h, x : x + w] = 1
    return mask


def encode(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def make_gt(images, lesions):
    """images: [(id, height, width, extra fields)]; lesions: [(image_id, category, mask, crowd)]."""
    annotations = []
    for i, (image_id, category, mask, iscrowd) in enumerate(lesions, start=1):
        rle = encode(mask)
        annotations.append(
            {
                "id": i,
                "image_id": image_id,
                "category_id": category,
                "segmentation": rle,
                "area": float(mask_util.area(rle)),
                "bbox": [float(v) for v in mask_util.toBbox(rle)],
                "iscrowd": iscrowd,
            }
        )
    return {
        "images": [
            {"id": i, "height": h, "width": w, "file_name": f"{i}.jpg", **extra}
            for i, h, w, extra in images
        ],
        "annotations": annotations,
        "categories": copy.deepcopy(CATEGORIES),
    }


def det(image_id, category, mask, score):
    rle = encode(mask)
    return {
        "image_id": image_id,
        "category_id": category,
        "bbox": [float(v) for v in mask_util.toBbox(rle)],
        "segmentation": rle,
        "score": score,
    }


# --- the independent reference: pycocotools' COCOeval, straight ----------------------------------


def run_cocoeval(gt, dets, task, iou_thresholds, max_dets):
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        dets = copy.deepcopy(dets)
        if task == "segm":
            for d in dets:
                d.pop("bbox")
        if dets:
            coco_dt = coco_gt.loadRes(dets)
        else:  # loadRes cannot take an empty list
            coco_dt = COCO()
            coco_dt.dataset = {"images": gt["images"], "categories": gt["categories"]}
            coco_dt.dataset["annotations"] = []
            coco_dt.createIndex()
        # Detectron2's subclass whose summarize() honours maxDets[2]: a second route to AP, APs.
        coco_eval = COCOevalMaxDets(coco_gt, coco_dt, task)
        if iou_thresholds is not None:
            coco_eval.params.iouThrs = np.array(iou_thresholds)
        # COCOeval sorts maxDets and scores the last: below 10, the 10 must go.
        coco_eval.params.maxDets = [1, 10, max_dets] if max_dets >= 10 else [1, max_dets, max_dets]
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def percent(values):
    valid = values[values > -1]
    return float(valid.mean() * 100) if valid.size else float("nan")


def reference(gt, dets, task, iou_thresholds=THRESHOLDS, max_dets=256):
    at = run_cocoeval(gt, dets, task, iou_thresholds, max_dets)
    coco = run_cocoeval(gt, dets, task, None, max_dets)
    p, r = at.eval["precision"], at.eval["recall"]
    ref = {}
    for i, t in enumerate(iou_thresholds):
        k = str(round(t * 100))
        ref[f"AP{k}"] = percent(p[i, :, :, 0, 2])
        ref[f"AR{k}"] = percent(r[i, :, 0, 2])
        for size, a in (("s", 1), ("m", 2), ("l", 3)):
            ref[f"AP{k}{size}"] = percent(p[i, :, :, a, 2])
        for c, cat in enumerate(CATEGORIES):
            ref[f"AP{k}-{cat['name']}"] = percent(p[i, :, c, 0, 2])
    stats = [s * 100 if s >= 0 else float("nan") for s in coco.stats]
    ref.update(AP=stats[0], APs=stats[3], APm=stats[4], APl=stats[5], AR=stats[8])
    for c, cat in enumerate(CATEGORIES):
        ref[f"AP-{cat['name']}"] = percent(coco.eval["precision"][:, :, c, 0, 2])
    # COCO's own AP50 / AP75 (default thresholds) agree with the run at our thresholds.
    for k, idx in (("AP50", 1), ("AP75", 2)):
        if k in ref:
            assert same(stats[idx], ref[k]), (k, stats[idx], ref[k])
    return ref


def same(a, b, tol=1e-6):
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


def check(gt, dets, expected, tasks=("bbox", "segm"), **kwargs):
    """Our metrics == the reference's for every key, and == the hand-worked ``expected``."""
    metrics = evaluate_coco_results(gt, dets, tasks=tasks, **kwargs)
    assert list(metrics) == list(tasks)
    for task in tasks:
        ref = reference(gt, dets, task, max_dets=kwargs.get("max_dets", 256))
        assert set(ref) <= set(metrics[task])
        for key, value in ref.items():
            assert same(metrics[task][key], value), (task, key, metrics[task][key], value)
        for key, value in expected.items():
            assert same(metrics[task][key], value), (task, key, metrics[task][key], value)
    return metrics


# --- cases worked by hand -------------------------------------------------------------------------


def test_perfect_detections_score_100_and_a_one_pixel_lesion_counts():
    lesions = [
        (1, MA, rect(40, 60, 5, 5, 1, 1), 0),  # a 1-pixel microaneurysm
        (1, MA, rect(40, 60, 10, 20, 3, 3), 0),
        (1, EX, rect(40, 60, 20, 30, 10, 12), 0),
        (2, MA, rect(40, 60, 30, 50, 4, 5), 0),
    ]
    gt = make_gt([(1, 40, 60, {}), (2, 40, 60, {})], lesions)
    dets = [det(i, c, m, 0.9 - 0.1 * n) for n, (i, c, m, _) in enumerate(lesions)]
    hand = {k: 100.0 for k in ("AP35", "AP50", "AP75", "AP", "APs", "AP50s", "AR", "AR50")}
    hand.update({"AP-microaneurysm": 100.0, "AP-hard exudate": 100.0, "AP50-microaneurysm": 100.0})
    nan = float("nan")
    hand.update({"AP-haemorrhage": nan, "AP50-haemorrhage": nan, "APm": nan, "APl": nan})
    check(gt, dets, hand)


def test_empty_predictions_score_0_and_nan_without_gt():
    gt = make_gt([(1, 40, 60, {})], [(1, MA, rect(40, 60, 10, 20, 3, 3), 0)])
    hand = {"AP35": 0.0, "AP50": 0.0, "AP75": 0.0, "AP": 0.0, "AR": 0.0, "AR35": 0.0}
    hand.update({"AP-microaneurysm": 0.0, "AP-hard exudate": float("nan")})
    check(gt, [], hand)


def test_shift_with_iou_between_035_and_05_counts_at_ap35_only():
    gt = make_gt([(1, 40, 60, {})], [(1, EX, rect(40, 60, 10, 10, 10, 10), 0)])
    # 10x10 squares 4 px apart: IoU = 60 / 140 = 0.43, for boxes and masks alike.
    dets = [det(1, EX, rect(40, 60, 10, 14, 10, 10), 0.9)]
    hand = {"AP35": 100.0, "AP50": 0.0, "AP75": 0.0, "AP": 0.0, "AR35": 100.0, "AR50": 0.0}
    hand.update({"AP35-hard exudate": 100.0, "AP50-hard exudate": 0.0, "AP35s": 100.0})
    check(gt, dets, hand)


def test_duplicate_detection_is_a_false_positive():
    a, b = rect(40, 60, 5, 5, 4, 4), rect(40, 60, 20, 30, 4, 4)
    gt = make_gt([(1, 40, 60, {})], [(1, MA, a, 0), (1, MA, b, 0)])
    dets = [det(1, MA, a, 0.9), det(1, MA, a, 0.8), det(1, MA, b, 0.7)]
    # TP (P 1, R 1/2), FP (P 1/2), TP (P 2/3, R 1): interpolated precision 1 at COCO's 51 recall
    # points <= 0.5 and 2/3 at the 50 above.
    ap = (51 + 50 * 2 / 3) / 101 * 100
    check(gt, dets, {"AP35": ap, "AP50": ap, "AP75": ap, "AP": ap, "AR": 100.0})
    # Without the duplicate, both are found with precision 1.
    check(gt, [dets[0], dets[2]], {"AP50": 100.0})
    # One detection per image and category: the first hit alone, recall 1/2.
    check(gt, dets, {"AP50": 51 / 101 * 100, "AR50": 50.0}, max_dets=1)


def test_detection_on_crowd_region_is_neither_tp_nor_fp():
    lesion, region = rect(40, 60, 5, 5, 4, 4), rect(40, 60, 20, 20, 15, 20)
    inside = rect(40, 60, 25, 25, 5, 5)
    dets = [det(1, EX, inside, 0.95), det(1, EX, lesion, 0.9)]
    crowd = make_gt([(1, 40, 60, {})], [(1, EX, lesion, 0), (1, EX, region, 1)])
    check(crowd, dets, {"AP35": 100.0, "AP50": 100.0, "AP75": 100.0, "AP": 100.0})
    # The same detection with no crowd region is a FP ranked first: precision 1/2 everywhere.
    plain = make_gt([(1, 40, 60, {})], [(1, EX, lesion, 0)])
    check(plain, dets, {"AP35": 50.0, "AP50": 50.0, "AP": 50.0})


def test_more_than_100_lesions_per_image_with_max_dets_256():
    lesions = [(1, EX, rect(40, 60, 4 * r, 4 * c, 2, 2), 0) for r in range(10) for c in range(15)]
    gt = make_gt([(1, 40, 60, {})], lesions)
    dets = [det(1, EX, m, 1.0 - 0.001 * n) for n, (_, _, m, _) in enumerate(lesions)]
    check(gt, dets, {"AP35": 100.0, "AP50": 100.0, "AP": 100.0, "AR": 100.0}, max_dets=256)
    # COCO's 100: only 100 of 150 found, precision 1 up to recall 0.66 (67 of 101 points).
    check(gt, dets, {"AP50": 67 / 101 * 100, "AR50": 100 / 150 * 100}, max_dets=100)


def annotated_case(extra=False):
    """e-ophtha-like: image 1 graded for exudates only, image 2 for microaneurysms only.

    With ``extra``, an undetected 1-pixel MA and an exudate found at IoU 40/45 besides.
    """
    ex, ma = rect(40, 60, 5, 5, 6, 6), rect(40, 60, 20, 30, 2, 2)
    images = [
        (1, 40, 60, {"annotated_category_ids": [EX]}),
        (2, 40, 60, {"annotated_category_ids": [MA]}),
    ]
    lesions = [(1, EX, ex, 0), (2, MA, ma, 0)]
    dets = [
        det(1, EX, ex, 0.8),
        det(1, MA, rect(40, 60, 30, 40, 2, 2), 0.9),  # image 1 is not graded for MA
        det(2, MA, ma, 0.8),
        det(2, EX, rect(40, 60, 5, 40, 6, 6), 0.9),  # image 2 is not graded for EX
    ]
    if extra:
        lesions += [(2, MA, rect(40, 60, 2, 2, 1, 1), 0), (1, EX, rect(40, 60, 30, 5, 5, 9), 0)]
        dets.append(det(1, EX, rect(40, 60, 30, 6, 5, 8), 0.7))
    return make_gt(images, lesions), dets


def test_annotated_only_drops_predictions_of_the_non_annotated_type():
    gt, dets = annotated_case()
    # Scored as they are, each type's top detection is a FP on the other image: AP 50.
    check(gt, dets, {"AP50": 50.0, "AP50-microaneurysm": 50.0, "AP50-hard exudate": 50.0})
    metrics = evaluate_coco_results(gt, dets, annotated_only=True)
    kept = [d for d in dets if d["score"] == 0.8]
    check(gt, kept, {"AP50": 100.0, "AP": 100.0, "AP-microaneurysm": 100.0})
    for task in metrics:
        for key, value in evaluate_coco_results(gt, kept)[task].items():
            assert same(metrics[task][key], value), key
    assert "annotated_only applied" in format_instance_metrics(metrics, annotated_only=True)
    assert "annotated_only not applied" in format_instance_metrics(metrics)


def test_annotated_only_takes_the_dataset_dicts_ids_over_the_gt_records():
    gt, dets = annotated_case()
    # Image 1 said (by its dataset dict) to be graded for both: its MA prediction stays, a FP.
    metrics = evaluate_coco_results(
        gt, dets, annotated_only=True, annotated_category_ids={1: [MA, EX]}
    )
    assert metrics["segm"]["AP50-microaneurysm"] == pytest.approx(50.0)
    assert metrics["segm"]["AP50-hard exudate"] == pytest.approx(100.0)


def random_case(seed=0, num_images=10, dets_per_image=100):
    """Random boxes of 1-20 px, 5% of GT crowd, two lesion types: 1000 detections."""
    rng = np.random.default_rng(seed)
    images, lesions, dets = [], [], []
    for image_id in range(1, num_images + 1):
        images.append((image_id, 120, 160, {}))
        for _ in range(int(rng.integers(5, 40))):
            y, x, h, w = (int(v) for v in (*rng.integers(0, 100, 2), *rng.integers(1, 20, 2)))
            crowd = int(rng.random() < 0.05)
            lesions.append((image_id, int(rng.choice([MA, EX])), rect(120, 160, y, x, h, w), crowd))
        for n in range(dets_per_image):
            if n < len(lesions) and lesions[-n - 1][0] == image_id and rng.random() < 0.5:
                # a jittered copy of a GT lesion, so that the APs are far from 0
                _, cat, mask, _ = lesions[-n - 1]
                mask = np.roll(mask, int(rng.integers(-1, 2)), axis=int(rng.integers(0, 2)))
            else:
                y, x, h, w = (int(v) for v in (*rng.integers(0, 100, 2), *rng.integers(1, 20, 2)))
                cat, mask = int(rng.choice([MA, EX])), rect(120, 160, y, x, h, w)
            dets.append(det(image_id, cat, mask, float(rng.random())))
    return make_gt(images, lesions), dets


def test_random_case_matches_pycocotools():
    gt, dets = random_case(seed=1, num_images=3, dets_per_image=40)
    metrics = check(gt, dets, {})
    assert 0 < metrics["segm"]["AP35"] < 100


def test_faster_coco_eval_gives_identical_numbers():
    gt, dets = random_case()
    assert len(dets) == 1000
    reference_metrics = evaluate_coco_results(gt, dets)
    faster = evaluate_coco_results(gt, dets, backend="faster_coco_eval")
    for task in ("bbox", "segm"):
        assert list(faster[task]) == list(reference_metrics[task])
        for key, value in reference_metrics[task].items():
            assert same(faster[task][key], value, tol=0.0), (task, key)
        assert 0 < reference_metrics[task]["AP50"] < 100


def test_results_for_another_gt_are_refused_naming_the_file(tmp_path):
    gt, dets = annotated_case()
    path = tmp_path / "dt.json"
    path.write_text(json.dumps([dict(dets[0], image_id=99)]))
    with pytest.raises(InstanceEvalError, match=r"dt\.json.*another GT"):
        evaluate_coco_results(gt, path)


def test_box_only_results_are_scored_for_bbox_only(caplog):
    gt, dets = annotated_case()
    boxes = [{k: v for k, v in d.items() if k != "segmentation"} for d in dets]
    metrics = evaluate_coco_results(gt, boxes)
    assert list(metrics) == ["bbox"]
    assert "no segmentation" in caplog.text
    for key, value in evaluate_coco_results(gt, dets, tasks=("bbox",))["bbox"].items():
        assert same(metrics["bbox"][key], value), key


# --- the Detectron2 evaluator --------------------------------------------------------------------


@pytest.fixture
def registered(tmp_path):
    """A tiny dataset registered as the converters' datasets are; yields (name, GT dict, dets)."""
    gt, dets = annotated_case(extra=True)
    json_file = tmp_path / "all.json"
    json_file.write_text(json.dumps(gt))
    name = "test_lesion_instance_eval"
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


def to_instances(dets, height, width, contiguous):
    instances = Instances((height, width))
    masks = np.zeros((len(dets), height, width), bool)
    for mask, d in zip(masks, dets):
        mask[:] = mask_util.decode(d["segmentation"])
    boxes = [[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in dets)]
    instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    instances.scores = torch.tensor([d["score"] for d in dets])
    classes = [contiguous[d["category_id"]] for d in dets]
    instances.pred_classes = torch.tensor(classes, dtype=torch.int64)
    instances.pred_masks = torch.from_numpy(masks)
    return instances


def run_evaluator(evaluator, name, dets):
    contiguous = MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id
    evaluator.reset()
    for record in DatasetCatalog.get(name):
        mine = [d for d in dets if d["image_id"] == record["image_id"]]
        outputs = {"instances": to_instances(mine, record["height"], record["width"], contiguous)}
        evaluator.process([record], [outputs])
    return evaluator.evaluate()


@pytest.mark.parametrize("annotated_only", [False, True])
def test_evaluator_equals_evaluate_coco_results(registered, tmp_path, annotated_only):
    name, gt, dets = registered
    out = tmp_path / "eval"
    evaluator = LesionInstanceEvaluator(
        name, output_dir=str(out), annotated_only=annotated_only, distributed=False
    )
    metrics = run_evaluator(evaluator, name, dets)
    expected = evaluate_coco_results(gt, dets, annotated_only=annotated_only)
    assert list(metrics) == ["bbox", "segm"]
    for task in metrics:
        assert list(metrics[task]) == list(expected[task])
        for key, value in expected[task].items():
            assert same(metrics[task][key], value), (task, key, metrics[task][key], value)
    # What it saved is COCO results with the dataset's ids, and the metrics with NaN as null.
    saved = json.loads((out / "coco_instances_results.json").read_text())
    assert sorted(d["category_id"] for d in saved) == sorted(d["category_id"] for d in dets)
    from_saved = evaluate_coco_results(gt, out / "coco_instances_results.json")
    assert same(from_saved["segm"]["AP50"], evaluate_coco_results(gt, dets)["segm"]["AP50"])
    written = json.loads((out / "instance_metrics.json").read_text())
    assert set(written) == {"bbox", "segm"}
    assert written["segm"]["AP50"] == pytest.approx(metrics["segm"]["AP50"])
    assert written["segm"]["AP-haemorrhage"] is None
    # Two MAs, one found: precision at COCO's 51 recall points <= 0.5 is 1 when image 1's MA
    # prediction is dropped, 1/2 when it is a FP ranked first.
    hand = 51 / 101 * 100 if annotated_only else 51 * 0.5 / 101 * 100
    assert same(metrics["segm"]["AP50-microaneurysm"], hand)
    assert same(
        metrics["segm"]["AP50-microaneurysm"],
        reference(gt, expected_dets(dets, annotated_only), "segm")["AP50-microaneurysm"],
    )


def expected_dets(dets, annotated_only):
    annotated = {1: EX, 2: MA}
    return [d for d in dets if not annotated_only or d["category_id"] == annotated[d["image_id"]]]


def test_evaluator_without_predictions_gives_zeros(registered):
    name, gt, _ = registered
    evaluator = LesionInstanceEvaluator(name, distributed=False)
    metrics = run_evaluator(evaluator, name, [])
    assert metrics["segm"]["AP50"] == 0.0 and metrics["bbox"]["AP"] == 0.0
    assert math.isnan(metrics["segm"]["AP50-haemorrhage"])


def test_evaluator_from_config(registered):
    name, gt, dets = registered
    cfg = get_cfg()
    add_retina_config(cfg)
    cfg.MODEL.MASK_ON = True
    cfg.RETINA.EVAL.IOU_THRESHOLDS = [0.1, 0.5]
    cfg.RETINA.EVAL.MAX_DETS = 300
    cfg.RETINA.EVAL.ANNOTATED_ONLY = True
    # distributed (the default): one process, so comm.gather hands back this rank's list
    # Detectron2's convention: from_config gives the arguments, the class builds from a config.
    arguments = LesionInstanceEvaluator.from_config(cfg, name, output_dir=None)
    assert isinstance(arguments, dict) and arguments["max_dets"] == 300
    evaluator = LesionInstanceEvaluator(cfg, name, output_dir=None)
    metrics = run_evaluator(evaluator, name, dets)
    assert {"AP10", "AP50", "AR10", "AP10-hard exudate"} <= set(metrics["segm"])
    assert "AP35" not in metrics["segm"]
    expected = evaluate_coco_results(gt, dets, (0.1, 0.5), 300, annotated_only=True)
    assert same(metrics["segm"]["AP10"], expected["segm"]["AP10"])
    cfg.MODEL.MASK_ON = False
    assert LesionInstanceEvaluator(cfg, name)._tasks == ("bbox",)
    # Keywords beside the config reach the constructor.
    assert LesionInstanceEvaluator(cfg, name, distributed=False)._distributed is False
