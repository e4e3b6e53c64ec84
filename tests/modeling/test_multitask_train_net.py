"""tools/train_net.py with MultiTaskLesionNet end to end on the synthetic dataset: the grading and
localization metric files, confusion matrices and report sections, eval-only reproducing them,
and the IDRiD protocol (frozen lesion branch trained on a grading-only dataset)."""
import json
from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

REPO = Path(__file__).resolve().parents[2]
from retina_d2.tools import train_net  # noqa: E402

from retina_d2.data.register import load_lesion_json  # noqa: E402

INSTANT = str(REPO / "configs/quick_schedules/multitask_synthetic_instant_test.yaml")
EVAL = Path("inference") / "synthetic_seg_val"


@pytest.fixture(scope="module")
def datasets(synthetic_datasets):
    return synthetic_datasets


@pytest.fixture(scope="module")
def trained(datasets, tmp_path_factory):
    out = tmp_path_factory.mktemp("multitask_run")
    mp = pytest.MonkeyPatch()
    mp.setenv("RETINA_D2_DATASETS", str(datasets))
    results = train_net.cli(["--config-file", INSTANT, "OUTPUT_DIR", str(out)])
    mp.undo()
    return out, results


def test_training_writes_grading_and_localization_metrics_and_report(trained):
    out, results = trained
    inference = out / EVAL
    grading = json.loads((inference / "grading_metrics.json").read_text())
    assert set(grading) == {"dr_grade", "dme_grade", "lesion_presence"}
    assert {"kappa", "accuracy", "images"} <= set(grading["dr_grade"])
    assert grading["dr_grade"]["images"] == 2  # the two val images
    assert "F1-hard exudate" in grading["lesion_presence"]
    localization = json.loads((inference / "localization_metrics.json").read_text())
    assert set(localization) == {"optic_disc", "fovea"}
    assert {"distance", "median_distance", "within9px", "within37px", "images"} <= set(
        localization["fovea"]
    )
    assert localization["optic_disc"]["distance"] == pytest.approx(
        results["optic_disc"]["distance"]
    )
    # The evaluator writes the matrices' counts; the report draws them.
    assert set(json.loads((inference / "grading_confusion.json").read_text())) == {
        "dr_grade", "dme_grade"}
    assert (inference / "report" / "figures" / "confusion_dr_grade.png").is_file()
    assert (inference / "report" / "figures" / "confusion_dme_grade.png").is_file()
    # Lesion evaluators still run beside them.
    assert (inference / "instance_metrics.json").is_file()
    assert (inference / "semantic_metrics.json").is_file()
    page = (inference / "report" / "index.html").read_text()
    assert "<h2>Grading</h2>" in page and "<h2>Localization</h2>" in page


def test_eval_only_reproduces_the_numbers(trained, datasets, monkeypatch, tmp_path):
    out, _ = trained
    monkeypatch.setenv("RETINA_D2_DATASETS", str(datasets))
    results = train_net.cli(
        ["--config-file", INSTANT, "--eval-only", "MODEL.WEIGHTS", str(out / "model_final.pth"),
         "OUTPUT_DIR", str(tmp_path)]
    )
    before = json.loads((out / EVAL / "localization_metrics.json").read_text())
    for name in ("optic_disc", "fovea"):
        assert results[name]["distance"] == pytest.approx(before[name]["distance"], rel=1e-5)
    grading = json.loads((out / EVAL / "grading_metrics.json").read_text())
    assert results["dr_grade"]["accuracy"] == pytest.approx(grading["dr_grade"]["accuracy"])


@pytest.fixture
def grading_only(datasets):
    """Synthetic images as a grading-only dataset (IDRiD parts B + C): grades and landmarks, no
    lesion annotations, no lesion classes."""
    conversion = datasets / "synthetic"
    names = []
    for split in ("train", "val"):
        records = load_lesion_json(str(conversion / f"{split}.json"), str(conversion / "raw"))
        for r in records:
            for key in ("annotations", "annotated_category_ids", "sem_seg_files"):
                r.pop(key, None)
        name = f"synthetic_gradeonly_{split}"
        DatasetCatalog.register(name, lambda rs=records: rs)
        MetadataCatalog.get(name).set(thing_classes=[], task="grading")
        names.append(name)
    yield names
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_frozen_lesion_branch_trains_on_a_grading_only_dataset(grading_only, datasets, monkeypatch,
                                                               tmp_path, capsys):
    monkeypatch.setenv("RETINA_D2_DATASETS", str(datasets))
    train, val = grading_only
    opts = ["DATASETS.TRAIN", f"('{train}',)", "DATASETS.TEST", f"('{val}',)",
            "SOLVER.MAX_ITER", "2", "RETINA.EVAL.BEST_METRIC", ""]
    results = train_net.cli(
        ["--config-file", INSTANT, "OUTPUT_DIR", str(tmp_path),
         "MODEL.MULTITASK.LESION_FROZEN", "True", *opts]
    )
    assert {"dr_grade", "dme_grade", "optic_disc", "fovea"} <= set(results)
    assert "lesion_presence" not in results and "segm" not in results  # no lesion truth here
    inference = tmp_path / "inference" / val
    assert not (inference / "instance_metrics.json").exists()
    assert (inference / "grading_metrics.json").is_file()
    # A lesion branch that trains needs lesion classes: one clear error, not a traceback.
    with pytest.raises(SystemExit) as exit_info:
        train_net.cli(["--config-file", INSTANT, "OUTPUT_DIR", str(tmp_path / "joint"), *opts])
    assert exit_info.value.code == 2
    assert f"{train} has 0 lesions" in capsys.readouterr().err
