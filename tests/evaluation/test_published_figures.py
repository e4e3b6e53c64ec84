"""The published figures: the shipped file loads, every system has its figures with their
sources, every number is in its paper's text, every results key is one our evaluators give, bad
files are refused naming what is wrong, and the paper-vs-ours table."""
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from retina_d2.evaluation.published import (
    FIGURES_FILE,
    PublishedFiguresError,
    format_paper_vs_ours,
    load_published_figures,
    paper_vs_ours,
    published_system,
)

PAPERS = Path(__file__).resolve().parents[3] / "shared" / "papers"
SYSTEMS = ["eophtha-maskrcnn", "idrid-resunet", "retinal-lesions-lesionnet", "ddr-cbam-deeplab",
           "idrid-redseg"]
VARIANTS = ["idrid-resunet-grading", "retinal-lesions-lesionnet-grading"]


def test_every_system_has_figures_with_sources():
    systems = load_published_figures()
    assert set(SYSTEMS + VARIANTS) <= set(systems)
    for system in systems.values():
        assert system.paper_file.endswith(".txt") and system.paper_title
        assert system.figures
        for figure in system.figures + system.baselines:
            assert figure.table and figure.split in ("train", "val", "test", "unstated")
        for figure in system.figures:
            assert figure.metrics and all("/" in m for m in figure.metrics)
    eophtha = systems["eophtha-maskrcnn"]
    test = {f.name: f.value for f in eophtha.figures if f.split == "test"}
    assert test == {"mAP35": 0.4562, "mAP50": 0.4370, "mAP75": 0.2071}
    assert systems["ddr-cbam-deeplab"].protocol == "component_ap"


def _printed(text: str) -> str:
    # The Red-Seg OCR splits numbers into digit groups ("0.483 9"); join them again.
    return re.sub(r"(?<=\d) (?=\d)", "", text)


@pytest.mark.skipif(not PAPERS.is_dir(), reason=f"the papers' texts are not at {PAPERS}")
def test_every_number_is_printed_in_its_paper():
    for system in load_published_figures().values():
        text = _printed((PAPERS / system.paper_file).read_text(encoding="utf-8"))
        for figure in system.figures + system.baselines:
            printed = f"{figure.value:g}"
            assert printed in text, (system.name, figure.name, printed)


@pytest.mark.skipif(not PAPERS.is_dir(), reason=f"the papers' texts are not at {PAPERS}")
def test_means_agree_with_their_per_lesion_figures():
    """A transcription check: each paper's mean equals the mean of the per-lesion numbers, up to
    their rounding (each printed value +-0.0005, so the two means differ by at most 0.001)."""
    systems = load_published_figures()
    for name, mean, prefix in [
        ("ddr-cbam-deeplab", "mAP", "AP ("), ("ddr-cbam-deeplab", "mIoU", "IoU ("),
        ("retinal-lesions-lesionnet", "pixel F1 (mean)", "pixel F1 "),
        ("retinal-lesions-lesionnet", "image F1 (mean)", "image F1 "),
        ("retinal-lesions-lesionnet-8s", "pixel F1 (mean)", "pixel F1 "),
    ]:
        figures = {f.name: f.value for f in systems[name].figures}
        parts = [v for k, v in figures.items() if k.startswith(prefix) and k != mean]
        assert figures[mean] == pytest.approx(np.mean(parts), abs=1e-3), (name, mean)


def _keys_our_evaluators_give():
    """Every results key our evaluators give for the datasets the systems use."""
    from retina_d2.evaluation.protocols import (
        ArgmaxSegmentationMetrics, ComponentAPMetrics, OperatingPointMetrics, per_image_map)
    from retina_d2.evaluation.semantic_eval import _report_name
    from retina_d2.evaluation.semantic_metrics import SemanticLesionMetrics

    lesions = ["microaneurysm", "haemorrhage", "hard exudate", "soft exudate", "optic disc",
               "vitreous haemorrhage", "preretinal haemorrhage", "neovascularization",
               "fibrous proliferation"]
    probs, targets = np.zeros((len(lesions), 4, 4)), np.zeros((len(lesions), 4, 4), np.uint8)
    keys = set()
    for task, metrics in [
        ("argmax_dice", ArgmaxSegmentationMetrics(lesions, size=0)),
        ("pr_operating_point", OperatingPointMetrics(lesions)),
        ("component_ap", ComponentAPMetrics(lesions, size=0)),
        ("sem_seg", SemanticLesionMetrics(lesions)),
    ]:
        metrics.update(probs, targets)
        keys |= {f"{task}/{_report_name(k)}" for k in metrics.compute()}
    gt = {"images": [{"id": 1, "height": 4, "width": 4}], "annotations": [],
          "categories": [{"id": 1, "name": "microaneurysm"}]}
    keys |= {f"per_image_map/{k}" for k in per_image_map(gt, [])}
    keys |= {f"segm/AP{t}" for t in (35, 50, 75)}  # instance_eval's standard names
    # grading_eval's documented keys
    keys |= {"dr_grade/kappa", "dr_grade/accuracy", "lesion_presence/mF1"}
    return keys


def test_every_results_key_is_one_our_evaluators_give():
    known = _keys_our_evaluators_give()
    for system in load_published_figures().values():
        for figure in system.figures:
            for metric in figure.metrics:
                assert metric in known, (system.name, figure.name, metric)
            if system.protocol != "standard":  # the paper's protocol comes first
                assert figure.metrics[0].startswith(system.protocol + "/"), figure


def test_the_file_ships_with_the_package(tmp_path):
    """setuptools' build copies the YAML beside the module that reads it."""
    root = Path(__file__).resolve().parents[2]
    subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
        cwd=root, check=True, capture_output=True,
    )
    shipped = tmp_path / "retina_d2" / "evaluation" / FIGURES_FILE.name
    assert shipped.read_text() == FIGURES_FILE.read_text()


# --- bad files ---------------------------------------------------------------------------------


def _write(tmp_path, mutate):
    content = yaml.safe_load(FIGURES_FILE.read_text())
    mutate(content)
    path = tmp_path / "figures.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def _first(content):
    return content["systems"]["eophtha-maskrcnn"]["figures"][0]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: _first(c).pop("metrics"), "system 'eophtha-maskrcnn' figure 0: missing metrics"),
        (lambda c: _first(c).update(unit="percentage"), "unit must be one of"),
        (lambda c: _first(c).update(value=45.62), r"a fraction lies in \[0, 1\]"),
        (lambda c: _first(c).update(value="0.45"), "value must be a number"),
        (lambda c: _first(c).update(split="validation"), "split must be one of"),
        (lambda c: _first(c).update(metrics=["mAP35"]), "'<task>/<metric>'"),
        (lambda c: c["systems"]["idrid-redseg"].update(protocol="iou"), "protocol must be"),
        (lambda c: c["systems"]["idrid-redseg"].update(paper="red-seg"), "paper 'red-seg'"),
        (lambda c: c["systems"]["idrid-redseg"].update(figures=[]), "non-empty list"),
    ],
)
def test_bad_files_are_refused_naming_the_place(tmp_path, mutate, message):
    path = _write(tmp_path, mutate)
    with pytest.raises(PublishedFiguresError, match=message) as info:
        load_published_figures(path)
    assert str(path) in str(info.value)


def test_unknown_system_names_the_known_ones():
    with pytest.raises(PublishedFiguresError, match="no system 'idrid'.*eophtha-maskrcnn"):
        published_system("idrid")


# --- the table ---------------------------------------------------------------------------------


def test_paper_vs_ours_rows():
    system = published_system("eophtha-maskrcnn")
    results = {"per_image_map": {"mAP35": 40.0, "mAP50": float("nan")}, "segm": {"AP35": 30.5}}
    rows = paper_vs_ours(system, results, splits=["test"])
    assert [(r.figure.name, r.metric) for r in rows[:3]] == [
        ("mAP35", "per_image_map/mAP35"), ("mAP35", "segm/AP35"), ("mAP50", "per_image_map/mAP50")]
    assert rows[0].paper == pytest.approx(45.62) and rows[0].ours == 40.0
    assert rows[0].difference == pytest.approx(40.0 - 45.62)
    assert rows[1].difference == pytest.approx(30.5 - 45.62)
    assert rows[2].ours is None and rows[2].difference is None  # NaN: not measured
    assert len(paper_vs_ours(system, results)) == 18  # 9 figures x 2 keys, every split
    # Flat "task/metric" results read the same.
    assert paper_vs_ours(system, {"per_image_map/mAP35": 40.0}, ["val"])[0].difference == (
        pytest.approx(40.0 - 51.13))


def test_coefficients_and_percents_are_not_rescaled():
    kappa = paper_vs_ours(published_system("retinal-lesions-lesionnet-grading"),
                          {"dr_grade": {"kappa": 0.75}})[0]
    assert kappa.paper == pytest.approx(0.803) and kappa.difference == pytest.approx(-0.053)
    accuracy = [r for r in paper_vs_ours(published_system("idrid-resunet"),
                                         {"argmax_dice": {"pixel_accuracy": 97.0}})
                if r.ours is not None][0]
    assert accuracy.paper == 90 and accuracy.difference == pytest.approx(7.0)


def test_format_paper_vs_ours():
    system = published_system("idrid-resunet")
    text = format_paper_vs_ours(system, paper_vs_ours(system, {"argmax_dice": {"mDice": 70.0}}))
    assert "| metric" in text and "paper's figure (source)" in text and "difference" in text
    line = next(l for l in text.splitlines() if "argmax_dice/mDice" in l)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1:] == ["82.00 (Section III.A, test)", "70.00", "-12.00"]
    assert "> 90.00 (Section III.A, test)" in text  # "exceeding 90%"
    assert "keeps the best checkpoint there" in text  # the figure's note
    assert not math.isnan(system.figures[0].value)
