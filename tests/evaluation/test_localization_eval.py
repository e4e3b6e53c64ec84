"""LandmarkLocalizationEvaluator: Euclidean distances in original pixels against numpy, the share
within each radius (inclusive), images without a landmark left out, and the files it writes."""
import json
import math

import numpy as np
import pytest

from retina_d2.evaluation.localization_eval import (
    LandmarkLocalizationEvaluator,
    localization_metrics,
    radius_name,
)


def test_metrics_match_numpy_and_radii_are_inclusive():
    distances = [3.0, 4.0, 10.0, 50.0]
    metrics = localization_metrics(distances, [4.0, 37.5])
    assert metrics["distance"] == pytest.approx(np.mean(distances))
    assert metrics["median_distance"] == pytest.approx(7.0)
    assert metrics["within4px"] == pytest.approx(50.0)  # 3 and exactly 4
    assert metrics["within37.5px"] == pytest.approx(75.0)
    assert metrics["images"] == 4
    assert radius_name(37.5) == "within37.5px" and radius_name(100.0) == "within100px"
    assert math.isnan(localization_metrics([], [10.0])["distance"])


def test_evaluator_scores_each_landmark_where_the_record_has_it(tmp_path):
    rng = np.random.default_rng(0)
    truth = rng.uniform(0, 2000, size=(5, 2, 2))
    guess = truth + rng.normal(0, 40, size=truth.shape)
    inputs, outputs = [], []
    for i in range(5):
        record = {"file_name": f"{i}.jpg", "optic_disc_center": truth[i, 0].tolist()}
        if i != 2:  # image 2 has no fovea mark
            record["fovea_center"] = truth[i, 1].tolist()
        inputs.append(record)
        outputs.append({"landmarks": {"optic_disc": tuple(guess[i, 0]),
                                      "fovea": tuple(guess[i, 1])}})
    evaluator = LandmarkLocalizationEvaluator(str(tmp_path), str(tmp_path), radii=[30.0],
                                              distributed=False)
    evaluator.reset()
    evaluator.process(inputs[:3], outputs[:3])
    evaluator.process(inputs[3:], outputs[3:])
    results = evaluator.evaluate()
    od = np.hypot(*(guess[:, 0] - truth[:, 0]).T)
    fovea = np.delete(np.hypot(*(guess[:, 1] - truth[:, 1]).T), 2)
    assert results["optic_disc"]["distance"] == pytest.approx(od.mean())
    assert results["optic_disc"]["within30px"] == pytest.approx(np.mean(od <= 30) * 100)
    assert results["fovea"]["images"] == 4
    assert results["fovea"]["median_distance"] == pytest.approx(np.median(fovea))
    written = json.loads((tmp_path / "localization_metrics.json").read_text())
    assert written["fovea"]["distance"] == pytest.approx(fovea.mean())
    rows = json.loads((tmp_path / "landmark_predictions.json").read_text())
    assert len(rows) == 9 and {r["landmark"] for r in rows} == {"optic_disc", "fovea"}


def test_evaluator_checks_its_arguments_and_returns_nothing_without_truth():
    with pytest.raises(ValueError, match="unknown landmarks"):
        LandmarkLocalizationEvaluator("x", landmarks=["macula"])
    with pytest.raises(ValueError, match="radii"):
        LandmarkLocalizationEvaluator("x", radii=[0])
    evaluator = LandmarkLocalizationEvaluator("x", distributed=False)
    evaluator.process([{"file_name": "a"}], [{"landmarks": {"optic_disc": (1.0, 2.0)}}])
    assert evaluator.evaluate() == {}
