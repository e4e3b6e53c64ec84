"""tools/predict.py: COCO results that pycocotools accepts, overlays, counts, clear errors."""
import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
from pycocotools.coco import COCO

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import predict  # noqa: E402
import train_net  # noqa: E402

from retina_d2.data.converters import ConvertOptions, synthetic  # noqa: E402
from retina_d2.modeling import tiling  # noqa: E402

INSTANT = str(REPO / "configs/quick_schedules/maskrcnn_synthetic_instant_test.yaml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    synthetic.convert(None, root / "datasets" / "synthetic", ConvertOptions(progress=False), count=4, size=192)
    mp = pytest.MonkeyPatch()
    mp.setenv("RETINA_D2_DATASETS", str(root / "datasets"))
    train_net.cli(["--config-file", INSTANT, "OUTPUT_DIR", str(root / "run"), "RETINA.EVAL.NUM_OVERLAYS", "0"])
    yield root
    mp.undo()


def _images(trained, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for src in sorted((trained / "datasets/synthetic/raw/images").glob("*.png"))[:2]:
        shutil.copy(src, folder / src.name)
    return folder


def test_predict_writes_results_overlays_and_counts(trained, tmp_path):
    photos = _images(trained, tmp_path)
    gt = trained / "datasets/synthetic/train.json"
    # A folder may hold images from several splits: use a GT covering them all.
    merged = json.loads(gt.read_text())
    merged["images"] += json.loads((trained / "datasets/synthetic/val.json").read_text())["images"]
    for i, image in enumerate(merged["images"]):
        image["id"] = i + 1
    merged["annotations"] = []
    gt_all = tmp_path / "gt.json"
    gt_all.write_text(json.dumps(merged))
    code = predict.main([
        "--config-file", INSTANT, "--weights", str(trained / "run/model_final.pth"),
        "--input", str(photos), "--output", str(tmp_path / "out"), "--gt", str(gt_all),
        "--score-threshold", "0.0",
    ])
    assert code == 0
    results = json.loads((tmp_path / "out/coco_instances_results.json").read_text())
    coco = COCO(str(gt_all))
    if results:
        detections = coco.loadRes(results)  # raises for ids or categories not in the GT
        assert set(detections.getImgIds()) <= set(coco.getImgIds())
    assert sorted(p.name for p in (tmp_path / "out/overlays").iterdir()) == sorted(
        p.stem + ".png" for p in photos.iterdir()
    )
    with open(tmp_path / "out/lesion_counts.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and "microaneurysm" in rows[0]


def test_predict_runs_tile_by_tile_with_tiling_enabled(trained, tmp_path, monkeypatch):
    """RETINA.TILE.ENABLED on the command line: each image goes through TiledInference's grid;
    with a tile larger than the image the detections are the untiled ones."""
    photos = _images(trained, tmp_path)
    grids = []  # tiles per image the tiled path cut
    tile_grid = tiling.tile_grid

    def spy(height, width, tile, overlap):
        grid = tile_grid(height, width, tile, overlap)
        if (height, width) != (1, 1):  # not TiledInference's own check of its arguments
            grids.append(len(grid))
        return grid

    monkeypatch.setattr(tiling, "tile_grid", spy)

    def run(name, *opts):
        out = tmp_path / name
        code = predict.main([
            "--config-file", INSTANT, "--weights", str(trained / "run/model_final.pth"),
            "--input", str(photos), "--output", str(out), "--score-threshold", "0.0",
            # Three iterations of training score low: keep every detection to compare.
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", *opts,
        ])
        assert code == 0
        return json.loads((out / "coco_instances_results.json").read_text())

    untiled = run("untiled")
    assert grids == []
    run("tiles", "RETINA.TILE.ENABLED", "True", "RETINA.TILE.SIZE", "96",
        "RETINA.TILE.OVERLAP", "16")
    assert len(grids) == 2 and min(grids) > 1  # the 192 px network input needs several tiles
    grids.clear()
    one_tile = run("one_tile", "RETINA.TILE.ENABLED", "True", "RETINA.TILE.SIZE", "512")
    assert grids == [1, 1]

    def detections(results):
        # Masks only by their frame: the tiled path thresholds them at the network input's pixels
        # and resizes by nearest neighbour (tiling.py, step 5), the untiled model pastes them at
        # the photograph's, and the mapper resized the FOV crop.
        return [
            {**{k: v for k, v in r.items() if k != "segmentation"},
             "frame": r["segmentation"]["size"]}
            for r in results
        ]

    assert untiled and detections(one_tile) == detections(untiled)


def test_unreadable_image_is_skipped_with_a_warning(trained, tmp_path, capsys):
    photos = _images(trained, tmp_path)
    (photos / "broken.png").write_bytes(b"not a png")
    code = predict.main([
        "--config-file", INSTANT, "--weights", str(trained / "run/model_final.pth"),
        "--input", str(photos), "--output", str(tmp_path / "out"),
    ])
    assert code == 0
    assert "broken.png: unreadable image" in capsys.readouterr().err


@pytest.mark.parametrize("problem", ["weights", "input"])
def test_missing_files_are_clear_errors(trained, tmp_path, capsys, problem):
    weights = trained / "run/model_final.pth" if problem != "weights" else tmp_path / "none.pth"
    photos = _images(trained, tmp_path) if problem != "input" else tmp_path / "nowhere"
    code = predict.main([
        "--config-file", INSTANT, "--weights", str(weights), "--input", str(photos),
        "--output", str(tmp_path / "out"),
    ])
    assert code == 2
    assert ("no such file" in capsys.readouterr().err)
