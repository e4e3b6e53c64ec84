"""LesionGradingEvaluator: quadratic weighted kappa, accuracy and confusion matrices against
scikit-learn, lesion-classification F1 against scikit-learn, which images and lesions are scored,
and the {task: {metric: value}} file the report reads."""
import json
import math

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from sklearn.metrics import cohen_kappa_score, f1_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from retina_d2.evaluation.grading_eval import (
    LesionGradingEvaluator,
    confusion_matrix,
    lesion_presence_metrics,
    quadratic_weighted_kappa,
)

LESIONS = ["microaneurysm", "haemorrhage", "hard exudate"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kappa_matches_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 5, 60)
    predicted = np.clip(truth + rng.integers(-2, 3, 60), 0, 4)
    expected = cohen_kappa_score(truth, predicted, weights="quadratic", labels=list(range(5)))
    assert quadratic_weighted_kappa(truth, predicted, 5) == pytest.approx(expected, abs=1e-12)
    assert np.array_equal(
        confusion_matrix(truth, predicted, 5),
        sk_confusion_matrix(truth, predicted, labels=list(range(5))),
    )


def test_kappa_and_confusion_on_a_hand_worked_case():
    # truth 0 1 2, predicted 0 2 2: O = [[1,0,0],[0,0,1],[0,0,1]], row sums 1 1 1, column sums
    # 1 0 2, E = outer / 3; W = (i-j)^2. sum W*O = 1, sum W*E = 8/3 + 1 + 4/3 = 5: kappa 0.8.
    assert quadratic_weighted_kappa([0, 1, 2], [0, 2, 2], 3) == pytest.approx(0.8, abs=1e-12)
    assert confusion_matrix([0, 1, 2], [0, 2, 2], 3).tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]
    # A grade of the scale nobody gave still has its row and column.
    assert confusion_matrix([0, 0], [1, 0], 3).tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 0]]


def test_kappa_keeps_the_distance_of_grades_nobody_gave():
    # No grade 2 or 3 anywhere: the 0 -> 4 confusion is still 4 steps away, not 2, and 1 -> 4
    # still 3, not 1 (scoring the grades present only would make it so).
    truth, predicted = [0, 1, 4, 4, 0, 1], [0, 1, 4, 0, 0, 4]
    full = cohen_kappa_score(truth, predicted, weights="quadratic", labels=list(range(5)))
    present_only = cohen_kappa_score(truth, predicted, weights="quadratic")
    assert quadratic_weighted_kappa(truth, predicted, 5) == pytest.approx(full)
    assert full != pytest.approx(present_only)
    assert quadratic_weighted_kappa([1, 2, 3], [1, 2, 3], 5) == pytest.approx(1.0)
    assert math.isnan(quadratic_weighted_kappa([2, 2], [2, 2], 5))  # chance already perfect
    assert math.isnan(quadratic_weighted_kappa([], [], 5))


def test_lesion_f1_matches_scikit_learn_over_the_known_images_only():
    probs = np.array([[0.9, 0.2, 0.6], [0.1, 0.7, 0.4], [0.8, 0.9, 0.51], [0.3, 0.1, 0.2]])
    truth = np.array([[1, 0, 1], [0, 1, -1], [0, 1, 1], [1, -1, 0]])
    metrics = lesion_presence_metrics(probs, truth, LESIONS, threshold=0.5)
    for c, lesion in enumerate(LESIONS):
        known = truth[:, c] >= 0
        expected = f1_score(truth[known, c], probs[known, c] >= 0.5) * 100
        assert metrics[f"F1-{lesion}"] == pytest.approx(expected)
    assert metrics["precision-microaneurysm"] == pytest.approx(50.0)  # 1 of 2 predicted
    assert metrics["recall-microaneurysm"] == pytest.approx(50.0)  # 1 of 2 present
    assert metrics["mF1"] == pytest.approx(np.mean([metrics[f"F1-{n}"] for n in LESIONS]))


@pytest.fixture
def dataset():
    name = "grading_eval_test"
    records = [
        # Annotated for all three; a microaneurysm; haemorrhage only as an ignore region.
        {"file_name": "a.jpg", "annotated_category_ids": [1, 2, 3], "annotations": [
            {"category_id": 0, "iscrowd": 0}, {"category_id": 1, "iscrowd": 1}]},
        # Annotated for hard exudates only (e-ophtha style): an exudate.
        {"file_name": "b.jpg", "annotated_category_ids": [3], "annotations": [
            {"category_id": 2, "iscrowd": 0}]},
        # A healthy, fully annotated eye.
        {"file_name": "c.jpg", "annotated_category_ids": [1, 2, 3], "annotations": []},
        # A grading-only record: no lesion truth at all.
        {"file_name": "d.jpg", "annotations": []},
    ]
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(
        thing_classes=LESIONS, thing_dataset_id_to_contiguous_id={1: 0, 2: 1, 3: 2}
    )
    yield name
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def _output(dr, dme, presence):
    return {"dr_grade": torch.tensor(dr), "dme_grade": torch.tensor(dme),
            "lesion_presence": torch.tensor(presence)}


def test_evaluator_scores_grades_and_presence_and_writes_the_report_file(dataset, tmp_path):
    evaluator = LesionGradingEvaluator(
        dataset, str(tmp_path), tasks=["dr_grade", "dme_grade"], distributed=False
    )
    assert evaluator.presence_truth(DatasetCatalog.get(dataset)[0]).tolist() == [1, -1, 0]
    assert evaluator.presence_truth(DatasetCatalog.get(dataset)[1]).tolist() == [-1, -1, 1]
    assert evaluator.presence_truth(DatasetCatalog.get(dataset)[3]).tolist() == [-1, -1, -1]
    inputs = [
        {"file_name": "a.jpg", "dr_grade": 2, "dme_grade": 0},
        {"file_name": "b.jpg", "dr_grade": 4},  # no macular-oedema grade: not scored for it
        {"file_name": "c.jpg", "dr_grade": 0, "dme_grade": 1},
        {"file_name": "d.jpg"},  # no grades: scored for nothing
    ]
    outputs = [
        _output([0, 0.1, 0.8, 0.1, 0], [0.9, 0.1, 0], [0.9, 0.9, 0.2]),
        _output([0, 0, 0, 0.7, 0.3], [0.2, 0.2, 0.6], [0.9, 0.9, 0.3]),
        _output([0.6, 0.4, 0, 0, 0], [0.8, 0.1, 0.1], [0.2, 0.1, 0.7]),
        _output([1, 0, 0, 0, 0], [1, 0, 0], [0.9, 0.9, 0.9]),
    ]
    evaluator.reset()
    evaluator.process(inputs, outputs)
    results = evaluator.evaluate()
    dr_truth, dr_pred = [2, 4, 0], [2, 3, 0]
    assert results["dr_grade"]["kappa"] == pytest.approx(
        cohen_kappa_score(dr_truth, dr_pred, weights="quadratic", labels=list(range(5)))
    )
    assert results["dr_grade"]["accuracy"] == pytest.approx(200 / 3)
    assert results["dr_grade"]["images"] == 3
    assert results["dme_grade"]["images"] == 2 and results["dme_grade"]["accuracy"] == 50.0
    presence = results["lesion_presence"]
    # microaneurysm: a (present, 0.9) and c (absent, 0.2) -> F1 100; haemorrhage: only c (absent,
    # 0.1) -> no positives, no predictions: undefined; hard exudate: a 0.2 (absent), b 0.3
    # (present, missed), c 0.7 (absent, false alarm) -> F1 0.
    assert presence["F1-microaneurysm"] == pytest.approx(100.0)
    assert math.isnan(presence["F1-haemorrhage"])
    assert presence["F1-hard exudate"] == pytest.approx(0.0)
    assert presence["mF1"] == pytest.approx(50.0)
    written = json.loads((tmp_path / "grading_metrics.json").read_text())
    assert set(written) == {"dr_grade", "dme_grade", "lesion_presence"}
    assert written["dr_grade"]["accuracy"] == pytest.approx(200 / 3)
    assert written["lesion_presence"]["F1-haemorrhage"] is None  # NaN as null
    # The confusion matrices as counts (row = truth, column = prediction), no picture: DR a 2->2,
    # b 4->3, c 0->0; macular oedema a 0->0, c 1->0.
    confusion = json.loads((tmp_path / "grading_confusion.json").read_text())
    dr = np.zeros((5, 5), int)
    dr[2, 2] = dr[4, 3] = dr[0, 0] = 1
    assert confusion["dr_grade"] == {"matrix": dr.tolist(), "images": 3}
    assert confusion["dme_grade"] == {"matrix": [[1, 0, 0], [1, 0, 0], [0, 0, 0]], "images": 2}
    assert not list(tmp_path.glob("*.png"))


def test_evaluator_without_anything_to_score_returns_nothing(dataset, tmp_path):
    evaluator = LesionGradingEvaluator(dataset, str(tmp_path), distributed=False)
    evaluator.process([{"file_name": "d.jpg"}], [{"dr_grade": torch.tensor([1.0, 0, 0, 0, 0])}])
    assert evaluator.evaluate() == {}
    assert not (tmp_path / "grading_metrics.json").exists()
    with pytest.raises(ValueError, match="graded fields"):
        LesionGradingEvaluator(dataset, tasks=["glaucoma"])
