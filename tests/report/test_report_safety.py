"""What a report writes and deletes: it replaces only an earlier report, never a folder holding
anything else (the evaluation folder, a user's files); gallery pictures stay in the report
whatever the image ids are; its files get the umask's permissions; broken inputs and unwritable
folders are one error line naming the file."""
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retina_d2.report import REPORT_MARKER, ReportError, build_report
from retina_d2.report.build import gallery_file_name
from test_report import EX, GT_ANNS, MA, RESULTS, SIZE, eval_dir  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[2]
TOOL = [sys.executable, str(REPO / "tools" / "report.py")]


def _tool(*args):
    done = subprocess.run(TOOL + [str(a) for a in args], capture_output=True, text=True)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, errors


def _files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in folder.rglob("*") if p.is_file()}


# --- nothing deleted that the toolkit did not create --------------------------------------------


def test_out_on_a_folder_holding_a_user_file_is_refused_and_the_file_stays(eval_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("three years of work")
    code, errors = _tool("--eval-dir", eval_dir, "--out", out)
    assert code == 2 and len(errors) == 1
    assert str(out) in errors[0] and REPORT_MARKER in errors[0]
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    assert (out / "thesis.tex").read_text() == "three years of work"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("where", ["eval_dir", "output_dir"])
def test_out_on_the_evaluation_folder_or_above_it_deletes_nothing(eval_dir, where):
    """``--out EVAL_DIR`` (or OUTPUT_DIR, which holds it) would have deleted the metrics."""
    out = eval_dir if where == "eval_dir" else eval_dir.parents[1]
    before = _files(out)
    code, errors = _tool("--eval-dir", eval_dir, "--out", out)
    assert code == 2 and len(errors) == 1 and str(out) in errors[0]
    assert _files(out) == before
    # Even a marker there (planted, or from an old run) does not let it replace the folder.
    (eval_dir / REPORT_MARKER).write_text("{}")
    with pytest.raises(ReportError, match="evaluation folder"):
        build_report(eval_dir, out)
    assert (eval_dir / "instance_metrics.json").is_file()


def test_rerunning_onto_its_own_report_replaces_it(eval_dir, tmp_path):
    out = tmp_path / "r"
    assert _tool("--eval-dir", eval_dir, "--out", out) == (0, [])
    assert (out / REPORT_MARKER).is_file() and (out / "index.html").is_file()
    (out / "gallery" / "stale.png").write_bytes(b"")
    assert _tool("--eval-dir", eval_dir, "--out", out, "--gallery", "1") == (0, [])
    assert not (out / "gallery" / "stale.png").exists()
    # One each of worst, best and false alarms on a healthy eye, each with its full view.
    for folder in (out / "gallery", out / "gallery" / "full"):
        assert sorted(p.name for p in folder.glob("*.png")) == ["1.png", "2.png", "3.png"]
    # Nothing left beside it: no staging folder, no set-aside old report.
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_report_written_before_the_marker_is_replaced_and_a_lookalike_is_not(eval_dir):
    """Output folders of earlier versions hold reports without the marker: exactly index.html
    and PNGs in figures/ and gallery/. One more file of anyone else's, and it is not a report."""
    page = build_report(eval_dir, gallery_size=1)
    # As an earlier version wrote it: no marker, no full-resolution views.
    (page.parent / REPORT_MARKER).unlink()
    shutil.rmtree(page.parent / "gallery" / "full")
    build_report(eval_dir, gallery_size=2)
    assert len(list((page.parent / "gallery").glob("*.png"))) == 3
    (page.parent / REPORT_MARKER).unlink()
    shutil.rmtree(page.parent / "gallery" / "full")
    (page.parent / "figures" / "notes.txt").write_text("mine")
    with pytest.raises(ReportError, match="holds no earlier report"):
        build_report(eval_dir)
    assert (page.parent / "figures" / "notes.txt").read_text() == "mine"


def test_an_empty_folder_is_taken(eval_dir, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    build_report(eval_dir, out, gallery_size=1)
    assert (out / "index.html").is_file() and (out / REPORT_MARKER).is_file()


def test_out_that_is_a_file_is_refused(eval_dir, tmp_path):
    out = tmp_path / "report.html"
    out.write_text("mine")
    with pytest.raises(ReportError, match="not a folder"):
        build_report(eval_dir, out)
    assert out.read_text() == "mine"


def test_a_failed_rebuild_keeps_the_earlier_report(eval_dir):
    page = build_report(eval_dir, gallery_size=1)
    before = _files(page.parent)
    (eval_dir / "semantic_metrics.json").write_text("[1, 2]")
    with pytest.raises(ReportError, match="semantic_metrics.json"):
        build_report(eval_dir, gallery_size=1)
    assert _files(page.parent) == before


# --- nothing written outside --------------------------------------------------------------------


@pytest.fixture
def string_ids(tmp_path):
    """An evaluation folder whose GT gives images string ids that look like paths."""
    ids = {1: "../../escaped", 2: "a/b", 3: str(tmp_path / "abs")}
    images = tmp_path / "images"
    images.mkdir()
    records = []
    for number, image_id in ids.items():
        Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(images / f"eye{number}.png")
        records.append({"id": image_id, "file_name": f"eye{number}.png", "height": SIZE,
                        "width": SIZE})
    gt = {"images": records,
          "annotations": [dict(a, image_id=ids[a["image_id"]]) for a in GT_ANNS],
          "categories": [{"id": MA, "name": "microaneurysm"}, {"id": EX, "name": "hard exudate"}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    folder = tmp_path / "run" / "inference" / "val"
    folder.mkdir(parents=True)
    (folder / "coco_instances_results.json").write_text(
        json.dumps([dict(r, image_id=ids[r["image_id"]]) for r in RESULTS]))
    (folder / "eval_info.json").write_text(
        json.dumps({"gt_json": str(tmp_path / "gt.json"), "image_root": str(images)}))
    (folder / "instance_metrics.json").write_text(json.dumps({"segm": {"AP50": 50.0}}))
    return folder


def test_gallery_pictures_of_path_like_image_ids_stay_in_the_gallery(string_ids, tmp_path):
    before = {p for p in tmp_path.rglob("*")}
    page = build_report(string_ids, gallery_size=2)
    gallery = page.parent / "gallery"
    new = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    assert new and all(page.parent in p.parents for p in new), sorted(new)
    pictures = sorted(p.name for p in gallery.glob("*.png"))
    assert sorted(p.name for p in (gallery / "full").iterdir()) == pictures
    assert len(pictures) == 3 and all("/" not in n and not n.startswith(".") for n in pictures)
    assert not (tmp_path / "abs.png").exists()
    # The page shows each of them.
    text = page.read_text()
    assert all(f"gallery/{name}" in text for name in pictures)


def test_gallery_file_names_are_plain_and_unique():
    used = set()
    names = [gallery_file_name(i, used) for i in
             (7, "eye", "Eye", "../../x", "a/b", "a_b", "", "..", "x" * 300, "é")]
    assert names[:3] == ["7.png", "eye.png", "Eye-2.png"]
    assert len({n.lower() for n in names}) == len(names)
    for name in names:
        assert Path(name).name == name and not name.startswith((".", "-"))
        assert len(name) <= 70 and name.endswith(".png")


# --- one error line naming the file -------------------------------------------------------------


@pytest.mark.parametrize("name, content", [
    ("instance_metrics.json", [1, 2]),
    ("froc.json", ["not", "an object"]),
    ("grading_metrics.json", "a string"),
    ("eval_info.json", [{"gt_json": "x"}]),
])
def test_a_metrics_file_that_is_not_an_object_is_one_error_naming_it(eval_dir, name, content):
    (eval_dir / name).write_text(json.dumps(content))
    code, errors = _tool("--eval-dir", eval_dir)
    assert code == 2 and len(errors) == 1
    assert str(eval_dir / name) in errors[0] and "not an object" in errors[0]


def test_an_unwritable_out_is_one_error_naming_it(eval_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, errors = _tool("--eval-dir", eval_dir, "--out", blocker / "report")
    assert code == 2 and len(errors) == 1 and str(blocker / "report") in errors[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_is_one_error_naming_it(eval_dir, tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        code, errors = _tool("--eval-dir", eval_dir, "--out", parent / "report")
    finally:
        parent.chmod(0o755)
    assert code == 2 and len(errors) == 1 and str(parent / "report") in errors[0]


# --- permissions --------------------------------------------------------------------------------


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755),
                                                       (0o077, 0o600, 0o700)])
def test_the_report_gets_the_permissions_the_umask_gives(eval_dir, mask, file_mode, dir_mode):
    previous = os.umask(mask)
    try:
        page = build_report(eval_dir, gallery_size=1)
    finally:
        os.umask(previous)
    report = page.parent
    files = [p for p in report.rglob("*") if p.is_file()]
    folders = [report] + [p for p in report.rglob("*") if p.is_dir()]
    assert len(files) > 5 and len(folders) >= 3
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {file_mode}
    assert {stat.S_IMODE(p.stat().st_mode) for p in folders} == {dir_mode}
