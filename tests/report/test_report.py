"""The HTML evaluation report: its numbers are the metrics files', its gallery shows the FROC
matching's hits, misses and false alarms (ranking only images with lesions, healthy eyes with
false alarms apart, each picture linked to its full-resolution view), it names the model scored,
shows every name as text, and renders in a real browser with every picture."""
import json
import math
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retina_d2.data.instances import encode_rle
from retina_d2.evaluation import evaluate_coco_results, froc_curve, write_metrics_json
from retina_d2.evaluation.froc import write_froc_json
from retina_d2.evaluation.instance_eval import load_coco_gt
from retina_d2.report import ReportError, build_report
from retina_d2.report.gallery import pick_gallery, score_images

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
        {"dataset": "toy_val", "gt_json": str(gt_path), "image_root": str(images),
         "model": {"weights": str(output / "model_final.pth"), "iteration": 1999,
                   "during_training": False}}))
    write_metrics_json(evaluate_coco_results(gt_path, RESULTS), folder / "instance_metrics.json")
    froc = froc_curve(gt_path, RESULTS, score_threshold=0.35)
    write_froc_json(froc, str(folder / "froc.json"))
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
    assert [outcomes[i].num_lesions for i in (1, 2, 3)] == [3, 1, 0]  # the ignore region: none
    # Image 3 is healthy: its F1 of 0 (one false alarm) does not rank it among the worst, and a
    # healthy eye with nothing found (F1 1) would never be "best".
    gallery = pick_gallery(list(outcomes.values()), 2)
    assert [o.image_id for o in gallery.worst] == [1] and [o.image_id for o in gallery.best] == [2]
    assert [o.image_id for o in gallery.healthy] == [3] and gallery.clean_healthy == 0
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
    for folder in (report / "gallery", report / "gallery" / "full"):
        assert sorted(p.name for p in folder.glob("*.png")) == ["1.png", "2.png", "3.png"]
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
    assert len(list((report / "gallery").glob("*.png"))) == 3  # worst, best, healthy


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


# --- the page, parsed ----------------------------------------------------------------------------


class _Page(HTMLParser):
    """What the tests read from a report page: every start tag, the title, the scored-model line,
    and per gallery group its pictures (image id, link, thumbnail, caption)."""

    def __init__(self, text: str):
        super().__init__()
        self.tags, self.title, self.model, self.groups = [], "", "", {}
        self._in, self._group, self._figure = [], None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        self._in.append((tag, attrs))
        if tag == "div" and "data-group" in attrs:
            self._group = self.groups.setdefault(attrs["data-group"], [])
        elif tag == "figure" and self._group is not None:
            self._figure = {"id": attrs.get("data-image-id"), "links": [], "caption": ""}
            self._group.append(self._figure)
        elif tag == "a" and self._figure is not None:
            self._figure["links"].append(attrs["href"])
        elif tag == "img" and self._figure is not None:
            self._figure["thumb"] = attrs["src"]
        if tag == "img":
            self._in.pop()  # a void element: no end tag

    def handle_endtag(self, tag):
        while self._in:
            open_tag, attrs = self._in.pop()
            if open_tag == "div" and "data-group" in attrs:
                self._group = None
            if open_tag == "figure":
                self._figure = None
            if open_tag == tag:
                break

    def handle_data(self, data):
        inside = [t for t, _ in self._in]
        if inside and inside[-1] == "title":
            self.title += data
        if any(t == "p" and a.get("id") == "scored-model" for t, a in self._in):
            self.model += data
        if self._figure is not None and "figcaption" in inside:
            self._figure["caption"] += data


def test_best_ranks_only_images_with_lesions_and_healthy_eyes_are_apart(eval_dir, tmp_path):
    # Two more healthy eyes, nothing found on them: F1 1, which used to fill "best".
    gt_path = eval_dir.parents[2] / "val.json"
    gt = json.loads(gt_path.read_text())
    for image_id in (4, 5):
        name = f"eye{image_id}.png"
        Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(
            eval_dir.parents[2] / "images" / name)
        gt["images"].append({"id": image_id, "file_name": name, "height": SIZE, "width": SIZE})
    gt_path.write_text(json.dumps(gt))
    page = _Page(build_report(eval_dir, gallery_size=4).read_text())
    with_lesions = {a["image_id"] for a in gt["annotations"] if not a["iscrowd"]}
    assert with_lesions == {1, 2}
    ids = {group: [int(f["id"]) for f in figures] for group, figures in page.groups.items()}
    assert ids == {"worst": [1], "best": [2], "healthy": [3]}
    assert set(ids["best"]) <= with_lesions and set(ids["worst"]) <= with_lesions
    assert "healthy eye, 1 false alarms" in page.groups["healthy"][0]["caption"]
    text = build_report(eval_dir, gallery_size=4).read_text()
    assert "False alarms on healthy eyes" in text and "2 of them without a false alarm" in text


def test_thumbnails_link_to_full_resolution_pictures_that_exist(eval_dir):
    page = build_report(eval_dir, gallery_size=2)
    parsed = _Page(page.read_text())
    figures = [f for group in parsed.groups.values() for f in group]
    assert len(figures) == 3
    for figure in figures:
        # The picture and its caption both link to the full view, inside the report.
        assert len(set(figure["links"])) == 1
        full = page.parent / figure["links"][0]
        assert full.is_file() and page.parent in full.resolve().parents
        assert full.parent.name == "full" and figure["thumb"] == f"gallery/{full.name}"
        assert Image.open(full).size == (SIZE, SIZE)  # the photograph's own size


def test_full_resolution_view_of_a_large_photograph(tmp_path):
    """A thumbnail is 900 px wide; the linked view keeps every pixel, with outlines."""
    from retina_d2.report.gallery import draw_outcome, score_images as score

    height, width = 1200, 1800
    mask = np.zeros((height, width), bool)
    mask[600:602, 900:902] = True  # a 2x2 microaneurysm, missed
    gt = {"images": [{"id": 1, "file_name": "big.png", "height": height, "width": width}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": MA, "iscrowd": 0,
                           "segmentation": encode_rle(mask), "area": 4,
                           "bbox": [900, 600, 2, 2]}],
          "categories": [{"id": MA, "name": "microaneurysm"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    coco_gt, _ = load_coco_gt(tmp_path / "gt.json")
    outcome = score(coco_gt, [], score_threshold=0.5)[0]
    image = np.full((height, width, 3), 80, np.uint8)
    draw_outcome(image, outcome, coco_gt, tmp_path / "t.png", full_path=tmp_path / "f.png")
    thumb, full = np.asarray(Image.open(tmp_path / "t.png")), np.asarray(Image.open(tmp_path / "f.png"))
    assert thumb.shape == (600, 900, 3) and full.shape == (height, width, 3)
    miss = (255, 140, 0)
    assert (full == miss).all(axis=-1)[600:602, 900:902].all()
    # Shrunk 2x, the missed microaneurysm is still ringed in the miss colour.
    assert (np.abs(thumb.astype(int) - miss).sum(axis=-1) < 60).sum() >= 10


def test_the_page_names_the_checkpoint_and_iteration_scored(eval_dir):
    run = eval_dir.parents[1]
    page = _Page(build_report(eval_dir).read_text())
    assert " ".join(page.model.split()) == f"Model scored: {run / 'model_final.pth'}, iteration 1999."
    info = json.loads((eval_dir / "eval_info.json").read_text())
    info["model"] = {"weights": None, "iteration": 499, "during_training": True}
    (eval_dir / "eval_info.json").write_text(json.dumps(info))
    page = _Page(build_report(eval_dir).read_text())
    assert "in training at iteration 499 (no checkpoint was saved" in " ".join(page.model.split())
    del info["model"]
    (eval_dir / "eval_info.json").write_text(json.dumps(info))
    page = _Page(build_report(eval_dir).read_text())
    assert "not recorded in eval_info.json" in " ".join(page.model.split())
    info["model"] = {"weights": ["not", "a", "path"], "iteration": "x"}  # malformed: not shown
    (eval_dir / "eval_info.json").write_text(json.dumps(info))
    assert "not recorded" in _Page(build_report(eval_dir).read_text()).model


def test_names_and_texts_are_shown_as_text_not_markup(eval_dir):
    hostile = "<script>alert('x')</script>"
    info = json.loads((eval_dir / "eval_info.json").read_text())
    info["dataset"] = hostile
    info["model"]["weights"] = f"/w/{hostile}.pth"
    (eval_dir / "eval_info.json").write_text(json.dumps(info))
    config = eval_dir.parents[1] / "config.yaml"
    config.write_text(config.read_text() + f"# {hostile}\n")
    text = build_report(eval_dir).read_text()
    page = _Page(text)
    assert "script" not in page.tags
    assert page.title == f"Evaluation report: {hostile}"
    assert hostile in page.model
    assert "&lt;script&gt;" in text and "<script>" not in text


def test_templates_ship_as_package_data():
    import tomllib  # noqa: F401  (Python 3.11+)

    from retina_d2 import report

    templates = Path(report.__file__).parent / "templates"
    shipped = {p.name for p in templates.iterdir()}
    assert {"report.html.j2", "macros.html.j2", "report.css"} <= shipped
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["retina_d2"]
    assert "report/templates/*" in patterns
    assert "jinja2" in pyproject["project"]["dependencies"]


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
        groups = browser.execute_script(
            "return Array.from(document.querySelectorAll('.gallery')).map(g => ["
            "g.dataset.group, Array.from(g.querySelectorAll('figure')).map(f =>"
            " f.dataset.imageId)]);")
        model = browser.find_element("id", "scored-model").text
        links = browser.execute_script(
            "return Array.from(document.querySelectorAll('.gallery a')).map(a =>"
            " a.getAttribute('href'));")
        # A full-resolution view opens in the browser at the photograph's size.
        browser.get((page.parent / links[0]).as_uri())
        opened = browser.execute_script(
            "return [document.images.length, document.images[0].naturalWidth];")
    finally:
        browser.quit()
    pngs = {p.relative_to(page.parent).as_posix() for p in page.parent.rglob("*.png")}
    full = {p for p in pngs if p.startswith("gallery/full/")}
    assert {src for src, _, _ in images} == pngs - full and len(images) == len(pngs - full)
    assert all(complete and width > 0 for _, complete, width in images), images
    assert set(links) == full and opened == [1, SIZE]
    # Best holds only images with lesions; the healthy eye with a false alarm is apart.
    assert {g: [int(i) for i in ids] for g, ids in groups} == {
        "worst": [1], "best": [2], "healthy": [3]}
    assert "model_final.pth" in model and "iteration 1999" in model

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
