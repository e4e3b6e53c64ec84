"""Evaluators write numbers, the report draws them (issue 14 item 4): no evaluator module draws,
and the report draws every FROC curve, pixel PR curve and confusion matrix from the JSON files
alone (a folder holding nothing else), pictures that show the numbers they were drawn from."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from retina_d2.report import ReportError, build_report
from retina_d2.schema import (
    FROC_FILE,
    GRADING_CONFUSION_FILE,
    GRADING_METRICS_FILE,
    PR_CURVE_DIR,
    SEMANTIC_METRICS_FILE,
    SEMANTIC_PR_CURVES_FILE,
)

REPO = Path(__file__).resolve().parents[2]
EVALUATION = REPO / "retina_d2" / "evaluation"
# matplotlib's first line colour (the curves) and the darkest cell of the "Blues" colour map.
CURVE_BLUE = (31, 119, 180)
DARKEST_BLUE = tuple(round(255 * c) for c in colormaps["Blues"](1.0)[:3])


def test_no_evaluator_module_draws():
    """Pictures are the report's: nothing under retina_d2/evaluation imports matplotlib or
    saves a figure."""
    drawing = re.compile(r"\bmatplotlib\b|\bsavefig\b|\bpyplot\b")
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in sorted(EVALUATION.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if drawing.search(line)
    ]
    assert not found, f"evaluator modules draw: {found}"


# --- a folder of hand-made numbers ------------------------------------------------------------

RATES = [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]
RATE_NAMES = ["1/8", "1/4", "1/2", "1", "2", "4", "8"]


def _froc_category(sensitivity: float, num_lesions: int = 10) -> dict:
    """A lesion found at ``sensitivity`` from the first operating point on (0.1 FPs per image)
    up to 16 FPs per image."""
    return {
        "num_lesions": num_lesions, "num_images": 8, "num_predictions": 40,
        "froc": sensitivity, "sensitivity_at": dict.fromkeys(RATE_NAMES, sensitivity),
        "tp": 5, "fp": 3, "fn": 5, "precision": 0.625, "recall": 0.5, "f1": 0.55,
        "thresholds": [0.9, 0.5, 0.1], "fps_per_image": [0.1, 1.0, 16.0],
        "sensitivity": [sensitivity] * 3,
    }


FROC = {
    "params": {"match": "iou", "iou_threshold": 0.2, "fp_rates": RATES, "use_masks": True,
               "annotated_only": False, "score_threshold": 0.35},
    "num_images": 8,
    "categories": {"hard exudate": _froc_category(0.9), "microaneurysm": _froc_category(0.1),
                   "haemorrhage": dict(_froc_category(0.0, num_lesions=0), froc=None)},
    "mean": {"num_categories": 2, "froc": 0.5, "sensitivity_at": dict.fromkeys(RATE_NAMES, 0.5),
             "precision": 0.625, "recall": 0.5, "f1": 0.55},
}
LEVELS = np.linspace(0, 1, 101).tolist()
PR_CURVES = {
    "hard exudate": {"auc_pr": 0.9, "recall": LEVELS, "precision": [0.9] * 101,
                     "threshold": np.linspace(1, 0, 101).tolist()},
    "microaneurysm": {"auc_pr": 0.2, "recall": LEVELS, "precision": [0.2] * 101,
                      "threshold": np.linspace(1, 0, 101).tolist()},
}
CONFUSION = {"dr_grade": {"matrix": [[7, 1, 0], [0, 0, 0], [0, 0, 7]], "images": 15}}


@pytest.fixture
def numbers_only(tmp_path):
    """An evaluation folder holding the evaluators' JSON files and nothing else."""
    folder = tmp_path / "inference" / "toy_val"
    folder.mkdir(parents=True)
    files = {
        FROC_FILE: FROC,
        SEMANTIC_METRICS_FILE: {"sem_seg": {"AUCPR-hard exudate": 90.0,
                                            "AUCPR-microaneurysm": 20.0, "mAUCPR": 55.0}},
        SEMANTIC_PR_CURVES_FILE: PR_CURVES,
        GRADING_METRICS_FILE: {"dr_grade": {"kappa": 0.9, "accuracy": 93.3, "images": 15.0}},
        GRADING_CONFUSION_FILE: CONFUSION,
    }
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content))
    return folder


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def _rows_of(picture: np.ndarray, colour) -> np.ndarray:
    """Row index of every pixel of (nearly) ``colour``."""
    return np.nonzero((np.abs(picture - np.asarray(colour)) <= 3).all(axis=-1))[0]


def test_report_draws_every_picture_from_the_json_alone(numbers_only):
    page = build_report(numbers_only)
    figures = page.parent / "figures"
    assert sorted(p.name for p in figures.iterdir()) == [
        "confusion_dr_grade.png", "froc_hard_exudate.png", "froc_microaneurysm.png",
        "pr_hard_exudate.png", "pr_microaneurysm.png",
    ]  # no FROC curve of haemorrhage: it has no lesion
    text = page.read_text()
    for name in ("froc_hard_exudate", "pr_microaneurysm", "confusion_dr_grade"):
        assert f"figures/{name}.png" in text and name.replace("_", " ") in text
    # The evaluation folder is left as it was: the pictures are the report's.
    assert not list(numbers_only.glob("*.png"))


@pytest.mark.parametrize("kind", ["froc", "pr"])
def test_curves_are_drawn_where_their_numbers_put_them(numbers_only, kind):
    """Sensitivity / precision 0.9 (hard exudate) is drawn high on the plot, 0.1 / 0.2
    (microaneurysm) low: the curve is there, and at its numbers' height."""
    figures = build_report(numbers_only).parent / "figures"
    high = _rows_of(_rgb(figures / f"{kind}_hard_exudate.png"), CURVE_BLUE)
    low = _rows_of(_rgb(figures / f"{kind}_microaneurysm.png"), CURVE_BLUE)
    assert high.size > 100 and low.size > 100  # a drawn line, not a blank plot
    height = _rgb(figures / f"{kind}_hard_exudate.png").shape[0]
    # Rows grow downwards: the 0.9 curve lies well above the low one (by > 40% of the height
    # between them, 0.7 - 0.8 of the axis).
    assert np.median(low) - np.median(high) > 0.4 * height


def test_confusion_matrix_shows_its_counts(numbers_only):
    picture = _rgb(build_report(numbers_only).parent / "figures" / "confusion_dr_grade.png")
    darkest = _rows_of(picture, DARKEST_BLUE)
    # The two cells of 7 (top left, bottom right) are the darkest: they span the matrix's height.
    assert darkest.size > 500
    assert darkest.max() - darkest.min() > 0.4 * picture.shape[0]
    other = dict(CONFUSION, dr_grade={"matrix": [[0, 0, 0], [0, 0, 0], [0, 0, 1]], "images": 1})
    (numbers_only / GRADING_CONFUSION_FILE).write_text(json.dumps(other))
    picture = _rgb(build_report(numbers_only).parent / "figures" / "confusion_dr_grade.png")
    darkest = _rows_of(picture, DARKEST_BLUE)
    assert darkest.size > 100 and darkest.min() > 0.5 * picture.shape[0]  # bottom row only


@pytest.mark.parametrize("name, broken", [
    (SEMANTIC_PR_CURVES_FILE, {"hard exudate": {"auc_pr": 0.9, "recall": [0.5]}}),
    (GRADING_CONFUSION_FILE, {"dr_grade": {"matrix": [[1, 2, 3]]}}),
    (FROC_FILE, dict(FROC, categories={"hard exudate": {"num_lesions": 3, "num_images": 2}})),
])
def test_numbers_that_do_not_draw_name_their_file(numbers_only, name, broken):
    (numbers_only / name).write_text(json.dumps(broken))
    with pytest.raises(ReportError, match=re.escape(name)):
        build_report(numbers_only)
    assert not (numbers_only / "report").exists()  # nothing half-written


def test_pictures_of_an_older_evaluation_are_still_shown(numbers_only, tmp_path):
    """An evaluation from before the evaluators stopped drawing has the PNGs, not the JSON."""
    figures = build_report(numbers_only).parent / "figures"
    (numbers_only / SEMANTIC_PR_CURVES_FILE).unlink()
    (numbers_only / GRADING_CONFUSION_FILE).unlink()
    (numbers_only / PR_CURVE_DIR).mkdir()
    old_pr = numbers_only / PR_CURVE_DIR / "pr_hard_exudate.png"
    shutil.copyfile(figures / "pr_hard_exudate.png", old_pr)
    shutil.copyfile(figures / "confusion_dr_grade.png", numbers_only / "confusion_dr_grade.png")
    figures = build_report(numbers_only).parent / "figures"
    assert sorted(p.name for p in figures.iterdir()) == [
        "confusion_dr_grade.png", "froc_hard_exudate.png", "froc_microaneurysm.png",
        "pr_hard_exudate.png",
    ]
    assert (figures / "pr_hard_exudate.png").read_bytes() == old_pr.read_bytes()
