"""tools/evaluate.py: the documented JSON, the table, and exit code 2 naming the bad file."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest

import retina_d2  # noqa: F401  (patches Detectron2 0.6 before it is imported)
from retina_d2.evaluation import evaluate_coco_results, froc_curve, froc_metrics

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "evaluate.py"


def load_tool():
    from retina_d2.tools import evaluate

    return evaluate


evaluate_tool = load_tool()


def square(y, x, size, shape=(40, 60)):
    mask = np.zeros(shape, np.uint8)
    mask[y : y + size, x : x + size] = 1
    rle = mask_util.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle, [float(v) for v in mask_util.toBbox(rle)]


@pytest.fixture
def files(tmp_path):
    """GT: image 1 graded for exudates (id 3), image 2 for microaneurysms (id 1); detections:
    a hit of each, a MA on image 1 ranked first, and an exudate shifted to IoU 0.43."""
    images = [
        {"id": 1, "height": 40, "width": 60, "file_name": "a.jpg", "annotated_category_ids": [3]},
        {"id": 2, "height": 40, "width": 60, "file_name": "b.jpg", "annotated_category_ids": [1]},
    ]
    annotations, dets = [], []
    for i, (image_id, cat, y, x, size) in enumerate([(1, 3, 5, 5, 10), (2, 1, 20, 30, 3)], 1):
        rle, box = square(y, x, size)
        ann = dict(id=i, image_id=image_id, category_id=cat, segmentation=rle, bbox=box)
        annotations.append(dict(ann, area=float(size * size), iscrowd=0))
        dets.append(dict(image_id=image_id, category_id=cat, segmentation=rle, bbox=box, score=0.8))
    rle, box = square(30, 40, 3)
    dets.append(dict(image_id=1, category_id=1, segmentation=rle, bbox=box, score=0.9))
    rle, box = square(5, 9, 10)
    dets.append(dict(image_id=1, category_id=3, segmentation=rle, bbox=box, score=0.7))
    categories = [
        {"id": 1, "name": "microaneurysm"},
        {"id": 2, "name": "haemorrhage"},
        {"id": 3, "name": "hard exudate"},
    ]
    gt = tmp_path / "gt.json"
    gt_dict = {"images": images, "annotations": annotations, "categories": categories}
    gt.write_text(json.dumps(gt_dict))
    dt = tmp_path / "dt.json"
    dt.write_text(json.dumps(dets))
    return gt, dt, dets


def run_tool(capsys, *argv):
    code = evaluate_tool.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_the_documented_json(files, tmp_path):
    gt, dt, _ = files
    out = tmp_path / "report" / "metrics.json"
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--gt", str(gt), "--predictions", str(dt), "--json", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # the tool finds retina_d2 from its own path, not the working directory
    )
    assert proc.returncode == 0, proc.stderr
    assert "AP35" in proc.stdout and "annotated_only not applied" in proc.stdout
    written = json.loads(out.read_text())
    assert list(written) == ["bbox", "segm"]
    expected = evaluate_coco_results(gt, dt)
    for task in written:
        assert {"AP35", "AP50", "AP75", "AP", "APs", "AP50s", "AR", "AR50"} <= set(written[task])
        for key, value in expected[task].items():
            if value != value:  # NaN: no GT of that category / size
                assert written[task][key] is None, key
            else:
                assert written[task][key] == pytest.approx(value, abs=1e-9), key
    # By hand: MA: FP then TP (precision 1/2); exudate: TP at every IoU, and at 0.35 also the
    # shifted copy's match is taken already (a FP ranked below): precision 1.
    assert written["segm"]["AP50-microaneurysm"] == pytest.approx(50.0)
    assert written["segm"]["AP35-hard exudate"] == pytest.approx(100.0)
    assert written["segm"]["AP-haemorrhage"] is None


def test_annotated_only_and_thresholds(files, tmp_path, capsys):
    gt, dt, _ = files
    out = tmp_path / "m.json"
    argv = ["--gt", gt, "--predictions", dt, "--annotated-only", "--iou", "0.1", "0.5"]
    code, stdout, _ = run_tool(capsys, *argv, "--max-dets", "300", "--json", out)
    assert code == 0
    assert "annotated_only applied" in stdout
    written = json.loads(out.read_text())
    assert written["segm"]["AP50-microaneurysm"] == pytest.approx(100.0)
    assert "AP10" in written["bbox"] and "AP35" not in written["bbox"]


def test_box_only_results_are_scored_for_bbox_with_a_warning(files, tmp_path, capsys, caplog):
    gt, _, dets = files
    dt = tmp_path / "boxes.json"
    dt.write_text(json.dumps([{k: v for k, v in d.items() if k != "segmentation"} for d in dets]))
    out = tmp_path / "m.json"
    code, _, _ = run_tool(capsys, "--gt", gt, "--predictions", dt, "--json", out)
    assert code == 0
    assert list(json.loads(out.read_text())) == ["bbox"]
    assert "boxes.json has no segmentation: evaluating bbox only" in caplog.text


def test_missing_files_exit_2_naming_them(files, tmp_path, capsys):
    gt, dt, _ = files
    code, _, err = run_tool(capsys, "--gt", tmp_path / "nope.json", "--predictions", dt)
    assert code == 2 and "nope.json" in err and "not found" in err
    code, _, err = run_tool(capsys, "--gt", gt, "--predictions", tmp_path / "none.json")
    assert code == 2 and "none.json" in err


def test_malformed_json_exits_2_naming_the_file(files, tmp_path, capsys):
    gt, dt, _ = files
    broken = tmp_path / "broken.json"
    broken.write_text('[{"image_id": 1,')
    code, _, err = run_tool(capsys, "--gt", gt, "--predictions", broken)
    assert code == 2 and "broken.json" in err and "not valid JSON" in err
    code, _, err = run_tool(capsys, "--gt", broken, "--predictions", dt)
    assert code == 2 and "broken.json" in err
    not_coco = tmp_path / "list.json"
    not_coco.write_text("[]")
    code, _, err = run_tool(capsys, "--gt", not_coco, "--predictions", dt)
    assert code == 2 and "list.json" in err and "not a COCO instances file" in err


def test_results_for_another_gt_exit_2(files, tmp_path, capsys):
    gt, _, dets = files
    other = tmp_path / "other.json"
    other.write_text(json.dumps([dict(d, image_id=d["image_id"] + 100) for d in dets]))
    code, _, err = run_tool(capsys, "--gt", gt, "--predictions", other)
    assert code == 2 and "other.json" in err and "another GT" in err


def test_results_with_some_masks_missing_exit_2(files, tmp_path, capsys):
    gt, _, dets = files
    mixed = tmp_path / "mixed.json"
    dets[1] = {k: v for k, v in dets[1].items() if k != "segmentation"}
    mixed.write_text(json.dumps(dets))
    code, _, err = run_tool(capsys, "--gt", gt, "--predictions", mixed)
    assert code == 2 and "mixed.json" in err and "1 of 4 entries have no 'segmentation'" in err


def test_bad_arguments_exit_2(files, capsys):
    gt, dt, _ = files
    with pytest.raises(SystemExit) as exit_info:
        evaluate_tool.main(["--gt", str(gt), "--predictions", str(dt), "--iou", "1.5"])
    assert exit_info.value.code == 2
    assert "IoU threshold" in capsys.readouterr().err


def test_froc_adds_a_table_and_the_json_key(files, tmp_path, capsys):
    gt, dt, _ = files
    out = tmp_path / "m.json"
    code, stdout, _ = run_tool(capsys, "--gt", gt, "--predictions", dt, "--froc", "--json", out)
    assert code == 0
    assert "Lesion-level FROC" in stdout and "| microaneurysm" in stdout and "@1/8" in stdout
    written = json.loads(out.read_text())
    assert list(written) == ["bbox", "segm", "froc"]
    for key, value in froc_metrics(froc_curve(gt, dt)).items():
        if value != value:
            assert written["froc"][key] is None, key
        else:
            assert written["froc"][key] == pytest.approx(value, abs=1e-9), key
    # By hand, 2 images. MA: the FP on image 1 (0.9, 1/2 FP per image) before the hit (0.8):
    # 0 at 1/8 and 1/4, 1 from 1/2 on: FROC 5/7. Exudate: hit (0.8), then the shifted copy
    # (IoU 60/140 = 0.43 >= 0.2) finds it again: a duplicate, neither hit nor FP: FROC 1.
    assert written["froc"]["FROC-microaneurysm"] == pytest.approx(500 / 7)
    assert written["froc"]["sens@1/4-microaneurysm"] == 0.0
    assert written["froc"]["FROC-hard exudate"] == pytest.approx(100.0)
    assert written["froc"]["FROC"] == pytest.approx(600 / 7)
    assert written["froc"]["FROC-haemorrhage"] is None
    # F1 at 0.35: MA TP 1 FP 1: 2/3; exudate TP 1 FP 0: 1.
    assert written["froc"]["F1-microaneurysm"] == pytest.approx(200 / 3)
    assert written["froc"]["F1-hard exudate"] == pytest.approx(100.0)


def test_froc_options(files, tmp_path, capsys):
    gt, dt, _ = files
    out = tmp_path / "m.json"
    argv = ["--gt", gt, "--predictions", dt, "--froc", "--json", out]
    # --froc-iou 0.5: the shifted exudate copy (IoU 0.43) is now a FP: P 1/2, F1 2/3.
    code, _, _ = run_tool(capsys, *argv, "--froc-iou", "0.5")
    assert code == 0
    froc = json.loads(out.read_text())["froc"]
    assert froc["F1-hard exudate"] == pytest.approx(200 / 3)
    assert froc["FROC-hard exudate"] == pytest.approx(100.0)  # its FP comes after the hit
    # --froc-match center: the copy (rows 5-14, cols 9-18) has its centroid at pixel (row 10,
    # col 14), inside the exudate (rows and cols 5-14): a duplicate again.
    code, stdout, _ = run_tool(capsys, *argv, "--froc-match", "center")
    assert code == 0 and "centre inside the lesion" in stdout
    assert json.loads(out.read_text())["froc"]["F1-hard exudate"] == pytest.approx(100.0)
    # --annotated-only: the MA on image 1 (graded for exudates) is dropped, and each type counts
    # the images graded for it (1 each): both FROC 100.
    code, _, _ = run_tool(capsys, *argv, "--annotated-only")
    assert json.loads(out.read_text())["froc"]["FROC"] == pytest.approx(100.0)
    # Without --froc there is no "froc" key; a bad match is an argparse error.
    run_tool(capsys, "--gt", gt, "--predictions", dt, "--json", out)
    assert "froc" not in json.loads(out.read_text())
    with pytest.raises(SystemExit) as exit_info:
        evaluate_tool.main(["--gt", str(gt), "--predictions", str(dt), "--froc-match", "x"])
    assert exit_info.value.code == 2


def test_json_pointing_at_a_folder_exits_2_before_evaluating(files, tmp_path, capsys,
                                                              monkeypatch):
    gt, dt, _ = files
    folder = tmp_path / "metrics"
    folder.mkdir()
    evaluated = []
    monkeypatch.setattr(evaluate_tool, "evaluate_coco_results",
                        lambda *a, **k: evaluated.append(1) or {})
    code, _, err = run_tool(capsys, "--gt", gt, "--predictions", dt, "--json", folder)
    assert code == 2 and evaluated == []
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(folder) in lines[0]
    assert "folder" in lines[0] and list(folder.iterdir()) == []


def test_json_below_a_file_or_unwritable_exits_2_naming_it(files, tmp_path, capsys):
    gt, dt, _ = files
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, _, err = run_tool(capsys, "--gt", gt, "--predictions", dt, "--json",
                            blocker / "m.json")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(blocker / "m.json") in err and "not a folder" in err
    # Written through, then refused by the disk (read-only, full): one line, no traceback.
    def refuse(metrics, path):
        raise PermissionError(13, "Permission denied", str(path))

    import unittest.mock

    with unittest.mock.patch.object(evaluate_tool, "write_metrics_json", refuse):
        code, _, err = run_tool(capsys, "--gt", gt, "--predictions", dt, "--json",
                                tmp_path / "m.json")
    assert code == 2 and err.strip().splitlines() == [
        f"error: cannot write --json {tmp_path / 'm.json'}: Permission denied"]


# --- --image-level -------------------------------------------------------------------------------


@pytest.fixture
def screening(tmp_path):
    """Five photographs graded for exudates (id 3): 1 and 2 with an exudate, 3-5 without. An
    eye's exudate detections: 1: 0.9; 2: 0.6, 0.5; 3: 0.8 (a lone bright reflection); 4: 0.3,
    0.2; 5: none. A microaneurysm (id 1, none in the GT) scores 0.95 on image 3."""
    images = [{"id": i, "height": 40, "width": 60, "file_name": f"{i}.jpg"} for i in range(1, 6)]
    annotations = []
    for i, image_id in enumerate([1, 2], 1):
        rle, box = square(5, 5, 10)
        annotations.append(dict(id=i, image_id=image_id, category_id=3, segmentation=rle,
                                bbox=box, area=100.0, iscrowd=0))
    dets = []
    for image_id, category_id, score in [(1, 3, 0.9), (2, 3, 0.6), (2, 3, 0.5), (3, 3, 0.8),
                                         (4, 3, 0.3), (4, 3, 0.2), (3, 1, 0.95)]:
        rle, box = square(20, 30, 4)
        dets.append(dict(image_id=image_id, category_id=category_id, segmentation=rle, bbox=box,
                         score=score))
    categories = [{"id": 1, "name": "microaneurysm"}, {"id": 3, "name": "hard exudate"}]
    gt_dict = {"images": images, "annotations": annotations, "categories": categories}

    def write(gt_dict=gt_dict, dets=dets):
        gt, dt = tmp_path / "gt.json", tmp_path / "dt.json"
        gt.write_text(json.dumps(gt_dict))
        dt.write_text(json.dumps(dets))
        return gt, dt

    return write, gt_dict, dets


def image_level(capsys, tmp_path, gt, dt, *options):
    out = tmp_path / "m.json"
    code, stdout, err = run_tool(capsys, "--gt", gt, "--predictions", dt, *options, "--json", out)
    assert code == 0, err
    return json.loads(out.read_text())["image_level"], stdout


def test_image_level_auc_at_top_k_1_and_2(screening, tmp_path, capsys):
    from sklearn.metrics import roc_auc_score

    write, _, _ = screening
    gt, dt = write()
    labels = [1, 1, 0, 0, 0]
    # k = 1: eyes 0.9, 0.6 | 0.8, 0.3, 0. 0.9 outranks the 3 healthy eyes, 0.6 only 2: 5/6.
    level, stdout = image_level(capsys, tmp_path, gt, dt, "--image-level")
    assert level["AUC-hard exudate"] == pytest.approx(500 / 6)
    assert level["AUC-hard exudate"] == pytest.approx(
        100 * roc_auc_score(labels, [0.9, 0.6, 0.8, 0.3, 0.0]))
    assert level["top_k"] == 1 and level["images"] == 5
    assert level["images-hard exudate"] == 5 and level["images_with-hard exudate"] == 2
    assert level["healthy_images-hard exudate"] == 3
    # Types without lesions in the GT get no row: the microaneurysm is not scored.
    assert not any(k.endswith("-microaneurysm") for k in level)
    assert "Image-level screening (5 images)" in stdout and "| hard exudate" in stdout
    assert "83.33" in stdout
    # k = 2: eyes 0.45, 0.55 | 0.4, 0.25, 0: the lone reflection no longer outranks eye 2.
    level, stdout = image_level(capsys, tmp_path, gt, dt, "--image-level", "--image-top-k", "2")
    assert level["AUC-hard exudate"] == pytest.approx(100.0)
    assert level["AUC-hard exudate"] == pytest.approx(
        100 * roc_auc_score(labels, [0.45, 0.55, 0.4, 0.25, 0.0]))
    assert level["top_k"] == 2 and "mean of its 2 best" in stdout
    # --image-top-k alone implies --image-level; without either there is no "image_level" key.
    level, _ = image_level(capsys, tmp_path, gt, dt, "--image-top-k", "2")
    assert level["AUC-hard exudate"] == pytest.approx(100.0)
    out = tmp_path / "plain.json"
    run_tool(capsys, "--gt", gt, "--predictions", dt, "--json", out)
    assert "image_level" not in json.loads(out.read_text())


def test_image_level_false_alarms_per_healthy_image(screening, tmp_path, capsys):
    write, _, _ = screening
    gt, dt = write()
    # Healthy eyes 3, 4, 5. At the default 0.35 only eye 3's 0.8 counts (its microaneurysm
    # 0.95 is another type): 1/3. At 0.25 eye 4's 0.3 too: 2/3; at 0.2 (>=) also its 0.2: 3/3.
    # Eye 1's and 2's detections never count, whatever their score.
    for threshold, expected in ((None, 1 / 3), ("0.25", 2 / 3), ("0.2", 1.0)):
        options = ["--image-level"] + (["--froc-score-threshold", threshold] if threshold else [])
        level, stdout = image_level(capsys, tmp_path, gt, dt, *options)
        assert level["false_alarms_per_healthy_image-hard exudate"] == pytest.approx(expected)
        assert level["score_threshold"] == float(threshold or 0.35)
        assert f"scoring >= {float(threshold or 0.35)}" in stdout


def test_image_level_crowd_only_and_annotated_only(screening, tmp_path, capsys):
    write, gt_dict, dets = screening
    # Eye 6 holds only a crowd (ignore) exudate region and a 0.7 detection: a negative for the
    # AUC (0.9 outranks 4 negatives, 0.6 two: 6/8) but not healthy (false alarms still 1/3).
    rle, box = square(5, 5, 10)
    crowd = dict(gt_dict, images=gt_dict["images"] + [dict(gt_dict["images"][0], id=6)],
                 annotations=gt_dict["annotations"] + [dict(
                     gt_dict["annotations"][0], id=9, image_id=6, iscrowd=1)])
    gt, dt = write(crowd, dets + [dict(dets[0], image_id=6, score=0.7)])
    level, _ = image_level(capsys, tmp_path, gt, dt, "--image-level")
    assert level["AUC-hard exudate"] == pytest.approx(75.0)
    assert level["false_alarms_per_healthy_image-hard exudate"] == pytest.approx(1 / 3)
    assert level["images_with-hard exudate"] == 2 and level["healthy_images-hard exudate"] == 3
    # --annotated-only: eye 5, graded for microaneurysms only, says nothing about exudates:
    # negatives 0.8, 0.3 (AUC 3/4), false alarms 1 on 2 healthy eyes.
    graded = dict(gt_dict, images=[dict(im, annotated_category_ids=[1] if im["id"] == 5 else [3])
                                   for im in gt_dict["images"]])
    gt, dt = write(graded, dets)
    level, _ = image_level(capsys, tmp_path, gt, dt, "--image-level", "--annotated-only")
    assert level["images"] == 5 and level["images-hard exudate"] == 4
    assert level["AUC-hard exudate"] == pytest.approx(75.0)
    assert level["false_alarms_per_healthy_image-hard exudate"] == pytest.approx(0.5)


def test_image_level_from_predict_image_scores(screening, tmp_path, capsys):
    from sklearn.metrics import roc_auc_score

    write, _, _ = screening
    gt, dt = write()
    given = {1: 0.1, 2: 0.9, 3: 0.5, 4: 0.2, 5: 0.0}
    predictions = {
        f"photos/{i}.jpg": {"image_id": i, "image_scores": {"hard exudate": s, "microaneurysm": 0}}
        for i, s in given.items()
    }
    scores_file = tmp_path / "image_predictions.json"
    scores_file.write_text(json.dumps(predictions))
    # The file's scores rank the eyes, not the detections: 0.1 outranks 1 of 3, 0.9 all: 4/6.
    # False alarms still count detections: 1/3.
    level, stdout = image_level(capsys, tmp_path, gt, dt, "--image-scores", scores_file)
    assert level["AUC-hard exudate"] == pytest.approx(400 / 6)
    assert level["AUC-hard exudate"] == pytest.approx(
        100 * roc_auc_score([1, 1, 0, 0, 0], list(given.values())))
    assert level["false_alarms_per_healthy_image-hard exudate"] == pytest.approx(1 / 3)
    assert level["top_k"] is None and f"the image_scores of {scores_file}" in stdout
    # An eye the file lacks: one error line naming the file and the image id.
    del predictions["photos/4.jpg"]
    scores_file.write_text(json.dumps(predictions))
    code, _, err = run_tool(capsys, "--gt", gt, "--predictions", dt, "--image-scores",
                            scores_file)
    assert code == 2 and err.strip().splitlines() == [
        f"error: image scores file {scores_file} has no entry for image id 4"]
    # A lesion type the file does not score, an image of another GT, a missing file.
    predictions["photos/4.jpg"] = {"image_id": 4, "image_scores": {"microaneurysm": 0.3}}
    scores_file.write_text(json.dumps(predictions))
    code, _, err = run_tool(capsys, "--gt", gt, "--predictions", dt, "--image-scores",
                            scores_file)
    assert code == 2 and str(scores_file) in err and "image id 4" in err
    assert "no image score for 'hard exudate'" in err
    predictions["photos/4.jpg"] = {"image_id": 44, "image_scores": {"hard exudate": 0.3}}
    scores_file.write_text(json.dumps(predictions))
    code, _, err = run_tool(capsys, "--gt", gt, "--predictions", dt, "--image-scores",
                            scores_file)
    assert code == 2 and str(scores_file) in err and "another GT" in err
    code, _, err = run_tool(capsys, "--gt", gt, "--predictions", dt, "--image-scores",
                            tmp_path / "none.json")
    assert code == 2 and "none.json" in err and "not found" in err
    # An eye given twice, a NaN score, a file that is not predict's object: refused by name.
    for broken, problem in (
        (dict(predictions, **{"photos/4.jpg": {"image_id": 1, "image_scores": {}}}), "twice"),
        (dict(predictions, **{"photos/4.jpg": {"image_id": 4, "image_scores": {
            "hard exudate": float("nan")}}}), "not a finite number"),
        (list(predictions.values()), "not tools/predict.py's image_predictions.json"),
    ):
        scores_file.write_text(json.dumps(broken))
        code, _, err = run_tool(capsys, "--gt", gt, "--predictions", dt, "--image-scores",
                                scores_file)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert str(scores_file) in err and problem in err
    # A k and a scores file contradict each other: an argparse error.
    with pytest.raises(SystemExit) as exit_info:
        evaluate_tool.main(["--gt", str(gt), "--predictions", str(dt), "--image-scores",
                            str(scores_file), "--image-top-k", "2"])
    assert exit_info.value.code == 2


def test_image_level_without_healthy_images_is_null(screening, tmp_path, capsys):
    write, gt_dict, dets = screening
    rle, box = square(5, 5, 10)
    everyone = dict(gt_dict, annotations=[
        dict(id=i, image_id=i, category_id=3, segmentation=rle, bbox=box, area=100.0, iscrowd=0)
        for i in range(1, 6)])
    gt, dt = write(everyone, dets)
    level, stdout = image_level(capsys, tmp_path, gt, dt, "--image-level")
    assert level["AUC-hard exudate"] is None
    assert level["false_alarms_per_healthy_image-hard exudate"] is None
    assert level["images_with-hard exudate"] == 5 and level["healthy_images-hard exudate"] == 0
    assert "| hard exudate" in stdout
