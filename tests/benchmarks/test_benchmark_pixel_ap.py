"""tools/benchmark.py pixel-ap: the three ways of scoring a lesion map give sklearn's AP (the
binned one to within its bins), and the run writes its results file itself."""
import argparse
import json

import pytest
from sklearn.metrics import average_precision_score

from benchmarks import build_parser
from benchmarks.pixel_ap import VARIANTS, run, synthetic_lesion_map, time_variant


def test_synthetic_map_has_lesions_scoring_higher():
    scores, labels = synthetic_lesion_map(120, 100, seed=3)
    assert scores.shape == labels.shape == (120, 100) and scores.dtype.name == "float32"
    assert 0.01 <= labels.mean() < 0.2
    assert scores[labels].mean() > scores[~labels].mean() + 0.3
    assert 0 <= scores.min() and scores.max() <= 1


def test_every_variant_gives_sklearns_ap():
    scores, labels = synthetic_lesion_map(90, 70, seed=0)
    reference = average_precision_score(labels.ravel(), scores.ravel())
    found = {v: time_variant(v, 90, 70, repeats=2) for v in VARIANTS}
    assert found["sklearn"]["ap"] == pytest.approx(reference, abs=1e-12)
    assert found["exact"]["ap"] == pytest.approx(reference, abs=1e-12)
    assert found["binned"]["ap"] == pytest.approx(reference, abs=1e-3)
    for row in found.values():
        assert len(row["seconds"]) == 2 and row["seconds_min"] <= row["seconds_median"]
    with pytest.raises(ValueError, match="variant"):
        time_variant("numba", 10, 10, 1)


def test_run_writes_its_results_file(tmp_path):
    out = tmp_path / "pixel_ap.json"
    args = build_parser(["pixel-ap"]).parse_args(
        ["pixel-ap", "--height", "40", "--width", "30", "--repeats", "1", "--out", str(out)])
    assert isinstance(args, argparse.Namespace)
    results = run(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    rows = {r["variant"]: r for r in results["rows"]}
    assert set(rows) == set(VARIANTS) and not any("error" in r for r in rows.values())
    assert rows["exact"]["ap_difference_vs_sklearn"] == pytest.approx(0, abs=1e-12)
    assert results["map"]["pixels"] == 1200 and rows["sklearn"]["speedup_vs_sklearn"] == 1.0
