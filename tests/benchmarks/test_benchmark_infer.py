"""tools/benchmark.py infer runs end to end (tiny size) and writes its results file."""
import json

from benchmarks import main


def test_infer_benchmark_smoke(tmp_path):
    out = tmp_path / "infer.json"
    main(["infer", "--size", "192", "--repeats", "1", "--no-train", "--out", str(out)])
    results = json.loads(out.read_text())
    assert len(results["rows"]) == 3
    for row in results["rows"]:
        assert "infer_error" not in row, row
        assert row["infer_seconds"] > 0 and row["infer_peak_rss_mb"] > 0
