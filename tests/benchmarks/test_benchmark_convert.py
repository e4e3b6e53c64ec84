"""Smoke test of ``tools/benchmark.py convert`` on two images of the real HEI-MED sample."""
import json
from pathlib import Path

import pytest

from benchmarks import BENCHMARKS, main
from benchmarks.convert import VARIANTS

HEIMED_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "heimed"


@pytest.mark.skipif(
    not HEIMED_DIR.is_dir(),
    reason=f"real HEI-MED sample not found at {HEIMED_DIR} (it sits beside the CI checkout only)",
)
def test_convert_benchmark_two_images(tmp_path, capsys):
    out = tmp_path / "convert.json"
    assert main(["convert", "--root", str(HEIMED_DIR), "--limit", "2", "--out", str(out)]) == 0
    with open(out) as f:
        results = json.load(f)

    rows = {row["name"]: row for row in results["rows"]}
    assert list(rows) == list(VARIANTS)
    floor = rows["decode floor (PIL decode + map/GND read)"]
    assert floor["images"] == 2 and floor["x_floor"] == pytest.approx(1.0)
    for name in ("retina_d2 (COCO RLE)", "retina_d2 (COCO RLE + semantic PNGs)"):
        row = rows[name]
        assert "error" not in row, row.get("error")
        assert row["images"] == 2 and row["images_per_s"] > 0
        # Every blob is one instance: as many instances as .GND labels read by the floor.
        assert row["instances"] == floor["blobs"]
        assert row["peak_rss_mb"] >= row["import_rss_mb"] > 0
    peer = rows["imantics 0.1.12 (COCO polygons)"]
    assert "error" not in peer, peer.get("error")
    assert "skipped" in peer or peer["instances"] == floor["blobs"]
    assert "x floor" in capsys.readouterr().out


def test_every_benchmark_module_has_its_entry_points():
    import importlib

    for name, (module, description) in BENCHMARKS.items():
        benchmark = importlib.import_module(f"benchmarks.{module}")
        assert callable(benchmark.add_arguments) and callable(benchmark.run), name
        assert description, name
