"""The HTML evaluation report: its numbers are the metrics files', its gallery shows the FROC
matching's hits, misses and false alarms, and it renders in a real browser with every picture."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retina_d2.data.instances import encode_rle
from retina_d2.evaluation import evaluate_coco_results, froc_curve, write_metrics_json
from retina_d2.evaluation.froc import save_froc_plots, write_froc_json
from retina_d2.evaluation.instance_eval import load_coco_gt
from retina_d2.report import ReportError, build_report
from retina_d2.report.gallery import pick_worst_and_best, score_images

REPO = Path(__file__).resolve().parents[2]
SIZE = 64
MA, EX = 1, 2


def _box_mask(y0, y1, x0, x1):
    mask = np.zeros((SIZE, SIZE), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _ann(ann_id, image_id, category_id, mask, iscrowd=0):
    ys, xs = np.nonzero(mask)
    return {
        "id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": iscrowd,
        "segmentation": encode_rle(mask), "area": int(mask.sum()),
        "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1],
    }


def _pred(image_id, category_id, mask, score):
    return {"image_id": image_id, "category_id": category_id, "score": score,
            "segmentation": encode_rle(mask)}


# Image 1: exudates A (found) and B (missed), a microaneurysm (found), a false alarm.
# Image 2: one exudate, found. Image 3: healthy but for an ignore region; one false alarm, one
# prediction on the ignore region (neither), one below the score threshold (not shown).
A, B = _box_mask(10, 20, 10, 20), _box_mask(40, 50, 40, 50)
C, D = _box_mask(30, 32, 5, 7), _box_mask(20, 30, 30, 40)
IGNORE = _box_mask(0, 10, 50, 64)
GT_ANNS = [_ann(1, 1, EX, A), _ann(2, 1, EX, B), _ann(3, 1, MA, C), _ann(4, 2, EX, D),
           _ann(5, 3, EX, IGNORE, iscrowd=1)]
RESULTS = [
    _pred(1, EX, A, 0.9), _pred(1, EX, _box_mask(50, 60, 5, 15), 0.8), _pred(1, MA, C, 0.6),
    _pred(2, EX, D, 0.95),
    _pred(3, EX, _box_mask(30, 40, 30, 40), 0.7), _pred(3, EX, _box_mask(1, 8, 52, 62), 0.5),
    _pred(3, EX, _box_mask(45, 50, 5, 10), 0.1),
]


@pytest.fixture
def eval_dir(tmp_path):
    """An OUTPUT_DIR as training leaves it: config and environment, and one evaluation folder."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    records = []
    for image_id in (1, 2, 3):
        name = f"eye{image_id}.png"
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(images / name)
        records.append({"id": image_id, "file_name": name, "height": SIZE, "width": SIZE})
    gt = {"images": records, "annotations": GT_ANNS,
          "categories": [{"id": MA, "name": "microaneurysm"}, {"id": EX, "name": "hard exudate"}]}
    gt_path = tmp_path / "val.json"
    gt_path.write_text(json.dumps(gt))

    output = tmp_path / "run"
    folder = output / "inference" / "toy_val"
    folder.mkdir(parents=True)
    (output / "config.yaml").write_text("RETINA:\n  EVAL:\n    FROC_SCORE_THRESHOLD: 0.35\n")
    (output / "env.txt").write_text("torch 2.14.1 on a test machine\n")
    (folder / "coco_instances_results.json").write_text(json.dumps(RESULTS))
    (folder / "eval_info.json").write_text(json.dumps(
        {"dataset": "toy_val", "gt_json": str(gt_path), "image_root": str(images)}))
    write_metrics_json(evaluate_coco_results(gt_path, RESULTS), folder / "instance_metrics.json")
    froc = froc_curve(gt_path, RESULTS, score_threshold=0.35)
    write_froc_json(froc, str(folder / "froc.json"))
    save_froc_plots(froc, str(folder))
    (folder / "semantic_metrics.json").write_text(json.dumps({"sem_seg": {
        "AUCPR-hard exudate": 61.25, "F1-hard exudate": 48.5, "AUCPR-microaneurysm": None,
        "mAUCPR": 61.25}}))
    (folder / "grading_metrics.json").write_text(json.dumps({"grading": {"kappa": 71.5,
                                                                         "accuracy": 80.0}}))
    return folder


# --- the gallery's matching, worked by hand ------------------------------------------------------


def test_images_are_scored_with_the_froc_rules(eval_dir):
    coco_gt, _ = load_coco_gt(eval_dir.parents[2] / "val.json")
    outcomes = {o.image_id: o for o in score_images(coco_gt, RESULTS, score_threshold=0.35)}
    counts = {i: (len(o.hits), len(o.misses), len(o.false_alarms), len(o.ignored))
              for i, o in outcomes.items()}
    assert counts == {1: (2, 1, 1, 0), 2: (1, 0, 0, 0), 3: (0, 0, 1, 1)}
    assert outcomes[1].misses[0]["id"] == 2  # lesion B
    assert math.isclose(outcomes[1].f1, 2 * 2 / (2 * 2 + 1 + 1))
    assert (outcomes[2].f1, outcomes[3].f1) == (1.0, 0.0)
    worst, best = pick_worst_and_best(list(outcomes.values()), 2)
    assert [o.image_id for o in worst] == [3, 1] and [o.image_id for o in best] == [2]
    # A lower threshold lets the 0.1 prediction in: image 3 gains a false alarm.
    low = {o.image_id: o for o in score_images(coco_gt, RESULTS, score_threshold=0.05)}
    assert len(low[3].false_alarms) == 2


def test_report_is_written_with_tables_curves_and_gallery(eval_dir):
    page = build_report(eval_dir, gallery_size=2)
    assert page == eval_dir / "report" / "index.html"
    text = page.read_text()
    for heading in ("Instance detection", "Lesion-level FROC", "Lesion segmentation", "Grading",
                    "Worst", "Best", "What produced these numbers"):
        assert heading in text
    assert "torch 2.14.1 on a test machine" in text and "FROC_SCORE_THRESHOLD" in text
    report = page.parent
    assert sorted(p.name for p in (report / "gallery").iterdir()) == ["1.png", "2.png", "3.png"]
    assert {p.name for p in (report / "figures").glob("segm_pr_*.png")} == {
        "segm_pr_hard_exudate.png", "segm_pr_microaneurysm.png"}
    assert (report / "figures" / "froc_hard_exudate.png").is_file()
    # The gallery picture outlines a missed lesion in the miss colour, on the original's grid.
    picture = np.asarray(Image.open(report / "gallery" / "1.png"))
    assert picture.shape == (SIZE, SIZE, 3)
    assert (picture == (255, 140, 0)).all(axis=-1)[40:50, 40:50].any()
    # Written again, it replaces the old report whole.
    (report / "stale.png").write_bytes(b"")
    build_report(eval_dir, gallery_size=1)
    assert not (report / "stale.png").exists()
    assert len(list((report / "gallery").iterdir())) == 2


def test_broken_inputs_give_clear_errors(eval_dir, tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        build_report(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match="no metrics file"):
        build_report(empty)
    (eval_dir / "froc.json").write_text("{ not json")
    with pytest.raises(ReportError, match="froc.json"):
        build_report(eval_dir)
    (eval_dir / "froc.json").unlink()
    # Predictions made for another ground truth: their image ids are not in this one.
    other = [dict(r, image_id=r["image_id"] + 100) for r in RESULTS]
    (eval_dir / "coco_instances_results.json").write_text(json.dumps(other))
    with pytest.raises(ReportError, match="does not fit the ground truth"):
        build_report(eval_dir)
    assert not (eval_dir / "report").exists()  # nothing half-written


def test_report_tool_exit_codes(eval_dir, tmp_path):
    tool = [sys.executable, str(REPO / "tools" / "report.py")]
    done = subprocess.run(tool + ["--eval-dir", str(tmp_path / "nowhere")], capture_output=True,
                          text=True)
    assert done.returncode == 2 and "does not exist" in done.stderr
    done = subprocess.run(tool + ["--eval-dir", str(eval_dir), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "r" / "index.html").is_file()


# --- in a browser --------------------------------------------------------------------------------


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("Debian's chromium and chromium-driver are not installed "
                    "(apt-get install chromium chromium-driver; .ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # The flags of a headless browser on a closed network: no sandbox as root, nothing fetched.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1300,2000"):
        options.add_argument(flag)
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def _at(document, path):
    for key in path:
        document = document[key]
    return document


def test_report_renders_in_headless_chromium(eval_dir):
    page = build_report(eval_dir, gallery_size=2)
    browser = _browser()
    try:
        browser.get(page.as_uri())
        assert browser.title == "Evaluation report: toy_val"
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete,"
            " i.naturalWidth]);")
        cells = browser.execute_script(
            "return Array.from(document.querySelectorAll('td[data-path]')).map(td => ["
            "td.dataset.source, td.dataset.path, td.dataset.scale, td.dataset.value,"
            " td.textContent]);")
    finally:
        browser.quit()
    pngs = {p.relative_to(page.parent).as_posix() for p in page.parent.rglob("*.png")}
    assert {src for src, _, _ in images} == pngs and len(images) == len(pngs)
    assert all(complete and width > 0 for _, complete, width in images), images

    files = {name: json.loads((eval_dir / name).read_text()) for name in (
        "instance_metrics.json", "froc.json", "semantic_metrics.json", "grading_metrics.json")}
    shown = set()
    for source, path, scale, value, text in cells:
        path = tuple(json.loads(path))
        expected = _at(files[source], path)
        shown.add((source, path))
        if expected is None:
            assert value == "null" and text == "–", (source, path)
        else:
            expected *= float(scale)
            assert math.isclose(float(value), expected, rel_tol=1e-12, abs_tol=1e-12)
            assert text == f"{expected:.2f}", (source, path, text)
    # Every number of the {task: {metric: value}} files is on the page.
    for name in ("instance_metrics.json", "semantic_metrics.json", "grading_metrics.json"):
        for task, metrics in files[name].items():
            assert {(name, (task, key)) for key in metrics} <= shown, name
    froc = files["froc.json"]
    assert ("froc.json", ("mean", "froc")) in shown
    for rate in froc["mean"]["sensitivity_at"]:
        assert ("froc.json", ("categories", "hard exudate", "sensitivity_at", rate)) in shown
