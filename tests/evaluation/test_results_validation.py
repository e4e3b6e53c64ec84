"""Bad values in a COCO results file are refused with one line naming the file and the entry
(tools/evaluate.py exits 2), instead of a traceback or a silently wrong AP; a valid file still
scores exactly as pycocotools' COCOeval, run independently here."""
import contextlib
import copy
import io
import json
import math

import numpy as np
import pycocotools.mask as mask_util
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import retina_d2  # noqa: F401  (patches Detectron2 0.6 before it is imported)
from retina_d2.evaluation import (
    InstanceEvalError,
    evaluate_coco_results,
    froc_curve,
    precision_recall_curves,
)

HEIGHT, WIDTH = 40, 60


def load_tool():
    from retina_d2.tools import evaluate

    return evaluate


evaluate_tool = load_tool()


def square(y, x, size, shape=(HEIGHT, WIDTH)):
    mask = np.zeros(shape, np.uint8)
    mask[y : y + size, x : x + size] = 1
    rle = mask_util.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle, [float(v) for v in mask_util.toBbox(rle)]


def make_case():
    """Two images, one microaneurysm each; detections: a hit on each, a false positive ranked
    between them."""
    images = [
        {"id": i, "height": HEIGHT, "width": WIDTH, "file_name": f"eye{i}.jpg"} for i in (1, 2)
    ]
    annotations, dets = [], []
    for i, (y, x) in enumerate([(5, 5), (20, 30)], 1):
        rle, box = square(y, x, 6)
        annotations.append(
            dict(id=i, image_id=i, category_id=1, segmentation=rle, bbox=box, area=36.0, iscrowd=0)
        )
    for image_id, (y, x), score in [(1, (5, 5), 0.9), (1, (30, 45), 0.5), (2, (20, 30), 0.3)]:
        rle, box = square(y, x, 6)
        dets.append(dict(image_id=image_id, category_id=1, segmentation=rle, bbox=box, score=score))
    gt = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "microaneurysm"}],
    }
    return gt, dets


def write(tmp_path, name, obj):
    path = tmp_path / name
    # allow_nan: Python's json writes NaN / Infinity, as a careless exporter does.
    path.write_text(json.dumps(obj, allow_nan=True))
    return path


def run_tool(capsys, gt, dt, *extra):
    code = evaluate_tool.main(["--gt", str(gt), "--predictions", str(dt), *map(str, extra)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(err, *fragments):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def pycocotools_ap(gt, dets, task, iou):
    """COCOeval straight: AP at one IoU threshold, percent."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        dets = copy.deepcopy(dets)
        if task == "segm":
            for d in dets:
                d.pop("bbox")
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(dets), task)
        coco_eval.params.iouThrs = np.array([iou])
        coco_eval.params.maxDets = [1, 10, 256]
        coco_eval.evaluate()
        coco_eval.accumulate()
    precision = coco_eval.eval["precision"][0, :, :, 0, -1]
    return float(precision[precision > -1].mean() * 100)


def test_a_valid_file_scores_as_pycocotools(tmp_path, capsys):
    gt, dets = make_case()
    dets[0]["score"] = 1  # an integer score is a number like any other
    gt_path, dt_path = write(tmp_path, "gt.json", gt), write(tmp_path, "dt.json", dets)
    out = tmp_path / "m.json"
    code, _, err = run_tool(capsys, gt_path, dt_path, "--json", out)
    assert code == 0, err
    written = json.loads(out.read_text())
    for task in ("bbox", "segm"):
        for iou in (0.35, 0.5, 0.75):
            expected = pycocotools_ap(gt, dets, task, iou)
            assert written[task][f"AP{round(iou * 100)}"] == pytest.approx(expected, abs=1e-9)
    # By hand: hit (P 1), FP, hit (P 2/3): recall points 0..0.50 at 1, 0.51..1 at 2/3.
    assert written["segm"]["AP50"] == pytest.approx((51 + 50 * 2 / 3) / 101 * 100)


@pytest.mark.parametrize(
    "score, shown",
    [
        (float("nan"), "score nan"),
        (float("inf"), "score inf"),
        (float("-inf"), "score -inf"),
        ("0.9", "score '0.9': not a number"),
        (None, "score None: not a number"),
        (True, "score True: not a number"),
    ],
)
def test_a_bad_score_exits_2_naming_the_file_and_entry(tmp_path, capsys, score, shown):
    gt, dets = make_case()
    dets[1]["score"] = score
    dt = write(tmp_path, "scores.json", dets)
    code, out, err = run_tool(capsys, write(tmp_path, "gt.json", gt), dt)
    assert code == 2 and out == ""
    assert_one_error_line(err, str(dt), "entry 1 (image_id 1)", shown)


def test_all_nan_scores_are_refused_not_scored(tmp_path):
    # COCOeval ranks NaN scores in file order; today's silent AP of such a file was meaningless.
    gt, dets = make_case()
    for d in dets:
        d["score"] = float("nan")
    for evaluate in (evaluate_coco_results, froc_curve, precision_recall_curves):
        expected = r"nan.json: entry 0 \(image_id 1\) has score nan"
        with pytest.raises(InstanceEvalError, match=expected):
            evaluate(gt, write(tmp_path, "nan.json", dets))


@pytest.mark.parametrize(
    "bbox, shown",
    [
        (["5", 5, 6, 6], "not 4 finite numbers"),
        ([5, 5, 6], "not 4 finite numbers"),
        ([5, float("nan"), 6, 6], "not 4 finite numbers"),
        ("5 5 6 6", "not 4 finite numbers"),
        ([5, 5, -6, 6], "negative width or height"),
    ],
)
def test_a_bad_bbox_exits_2(tmp_path, capsys, bbox, shown):
    gt, dets = make_case()
    dets[2]["bbox"] = bbox
    dt = write(tmp_path, "boxes.json", dets)
    code, _, err = run_tool(capsys, write(tmp_path, "gt.json", gt), dt)
    assert code == 2
    assert_one_error_line(err, str(dt), "entry 2 (image_id 2)", shown)


@pytest.mark.parametrize(
    "field, value, shown",
    [
        ("image_id", [1], "image_id [1]: not an integer or string"),
        ("image_id", None, "image_id None: not an integer or string"),
        ("category_id", {"id": 1}, "category_id {'id': 1}: not an integer or string"),
        ("category_id", 1.5, "category_id 1.5: not an integer or string"),
    ],
)
def test_a_garbage_id_exits_2(tmp_path, capsys, field, value, shown):
    gt, dets = make_case()
    dets[0][field] = value
    dt = write(tmp_path, "ids.json", dets)
    code, _, err = run_tool(capsys, write(tmp_path, "gt.json", gt), dt)
    assert code == 2
    assert_one_error_line(err, str(dt), "entry 0", shown)


def test_a_mask_of_another_size_exits_2_naming_both_sizes_and_the_image(tmp_path, capsys):
    gt, dets = make_case()
    # The hit on image 2 predicted on the image at twice its size: pycocotools would count it
    # as overlapping nothing (a silent miss).
    dets[2]["segmentation"], dets[2]["bbox"] = square(40, 60, 12, shape=(2 * HEIGHT, 2 * WIDTH))
    dt = write(tmp_path, "resized.json", dets)
    code, _, err = run_tool(capsys, write(tmp_path, "gt.json", gt), dt)
    assert code == 2
    assert_one_error_line(
        err, str(dt), "entry 2 (image_id 2)", "80x120 mask", "GT image 2 (eye2.jpg) is 40x60"
    )
    with pytest.raises(InstanceEvalError, match="80x120 mask"):
        froc_curve(gt, dets)


@pytest.mark.parametrize(
    "segmentation, shown",
    [
        ({"size": "40x60", "counts": "abc"}, "mask size 40x60: not [height, width]"),
        ({"size": [HEIGHT, WIDTH], "counts": 17}, "mask counts 17: not an RLE"),
    ],
)
def test_a_malformed_rle_exits_2(tmp_path, capsys, segmentation, shown):
    gt, dets = make_case()
    dets[0]["segmentation"] = segmentation
    dt = write(tmp_path, "rle.json", dets)
    code, _, err = run_tool(capsys, write(tmp_path, "gt.json", gt), dt)
    assert code == 2
    assert_one_error_line(err, str(dt), "entry 0 (image_id 1)", shown)


def test_the_bad_entry_reported_is_the_first(tmp_path):
    gt, dets = make_case()
    dets[1]["score"] = "high"
    dets[2]["score"] = float("nan")
    with pytest.raises(InstanceEvalError) as info:
        evaluate_coco_results(gt, dets)
    message = str(info.value)
    assert "entry 1 " in message and "'high'" in message and "nan" not in message
    assert not math.isnan(dets[0]["score"])  # the caller's list is left as it was


def _set(path, value):
    """A mutation of the GT dict: path = keys / indices, the last one set to value."""

    def mutate(gt):
        target = gt
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


@pytest.mark.parametrize(
    "mutate, shown",
    [
        (_set(("images", 1, "height"), "40"), "image 1 (id 2) has height '40': not a positive"),
        (_set(("images", 0, "width"), 0), "image 0 (id 1) has width 0: not a positive integer"),
        (_set(("annotations", 0, "area"), "big"), "annotation 0 (id 1) has area 'big'"),
        (_set(("annotations", 1, "area"), float("nan")), "annotation 1 (id 2) has area nan"),
        (_set(("annotations", 0, "bbox"), [1, 2, "3", 4]), "annotation 0 (id 1) has bbox"),
        (_set(("annotations", 0, "iscrowd"), "no"), "has iscrowd 'no': not 0 or 1"),
        # Lesions pycocotools would silently leave out of the scores:
        (_set(("annotations", 1, "image_id"), 7), "has image_id 7, which the file's images"),
        (_set(("annotations", 1, "category_id"), 9), "category_id 9, which the file's categories"),
        (_set(("annotations", 0, "segmentation"), "x"), "has segmentation x: not polygons or RLE"),
        (_set(("images",), {"id": 1}), "images is not a list of objects"),
        (_set(("categories", 0), {"id": "one"}), "category 0 has no integer id and name"),
    ],
)
def test_garbage_in_the_gt_exits_2_naming_the_file_and_record(tmp_path, capsys, mutate, shown):
    gt, dets = make_case()
    mutate(gt)
    gt_path = write(tmp_path, "gt.json", gt)
    code, _, err = run_tool(capsys, gt_path, write(tmp_path, "dt.json", dets), "--froc")
    assert code == 2
    assert_one_error_line(err, f"GT file {gt_path}: ", shown)
