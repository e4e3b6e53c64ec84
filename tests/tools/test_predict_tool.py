"""tools/predict.py: COCO results that pycocotools accepts, overlays, counts, clear errors."""
import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from retina_d2.data.converters import ConvertOptions, synthetic
from retina_d2.modeling import tiling
from retina_d2.tools import predict, train_net

REPO = Path(__file__).resolve().parents[2]

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


# --- the checkpoint alone (issue 15): no --config-file, no dataset; semantic and multi-task models

SEMANTIC = str(REPO / "configs/quick_schedules/semantic_synthetic_instant_test.yaml")
MULTITASK = str(REPO / "configs/quick_schedules/multitask_synthetic_instant_test.yaml")


def _train(trained, config, name):
    """A few iterations of ``config`` on the module's conversion (RETINA_D2_DATASETS is set)."""
    train_net.cli(["--config-file", config, "OUTPUT_DIR", str(trained / name),
                   "RETINA.EVAL.NUM_OVERLAYS", "0", "RETINA.EVAL.REPORT", "False"])
    return trained / name / "model_final.pth"


@pytest.fixture(scope="module")
def semantic_weights(trained):
    return _train(trained, SEMANTIC, "semantic")


@pytest.fixture(scope="module")
def multitask_weights(trained):
    return _train(trained, MULTITASK, "multitask")


def _one_image(trained, tmp_path):
    folder = tmp_path / "photo"
    folder.mkdir()
    source = sorted((trained / "datasets/synthetic/raw/images").glob("*.png"))[0]
    shutil.copy(source, folder / source.name)
    return folder, folder / source.name


def _stderr_errors(text):
    return [line for line in text.splitlines() if line.startswith("error: ")]


def test_fresh_process_predicts_from_the_checkpoint_alone(trained, tmp_path):
    """No --config-file and RETINA_D2_DATASETS an empty folder: the same results as with the
    config file given and the datasets registered."""
    import os
    import subprocess

    photos, _ = _one_image(trained, tmp_path)
    empty = tmp_path / "no_datasets"
    empty.mkdir()
    weights = str(trained / "run/model_final.pth")
    done = subprocess.run(
        [sys.executable, str(REPO / "tools/predict.py"), "--weights", weights, "--input",
         str(photos), "--output", str(tmp_path / "alone"), "--score-threshold", "0.0"],
        capture_output=True, text=True, env=dict(os.environ, RETINA_D2_DATASETS=str(empty)),
        cwd=tmp_path, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert predict.main([
        "--config-file", INSTANT, "--weights", weights, "--input", str(photos),
        "--output", str(tmp_path / "given"), "--score-threshold", "0.0",
    ]) == 0
    alone = json.loads((tmp_path / "alone/coco_instances_results.json").read_text())
    given = json.loads((tmp_path / "given/coco_instances_results.json").read_text())
    assert alone and alone == given
    assert {r["category_id"] for r in alone} <= {1, 2, 3, 4, 5}  # the vocabulary's ids
    assert (tmp_path / "alone/lesion_counts.csv").read_text() == (
        tmp_path / "given/lesion_counts.csv").read_text()


def test_old_checkpoint_without_config_is_one_error_line(trained, tmp_path, capsys):
    import torch

    checkpoint = torch.load(trained / "run/model_final.pth", map_location="cpu", weights_only=True)
    del checkpoint["retina_d2"]  # as written before checkpoints carried their config
    old = tmp_path / "old.pth"
    torch.save(checkpoint, old)
    photos, _ = _one_image(trained, tmp_path)
    code = predict.main(["--weights", str(old), "--input", str(photos), "--output",
                         str(tmp_path / "out")])
    assert code == 2
    errors = _stderr_errors(capsys.readouterr().err)
    assert len(errors) == 1 and str(old) in errors[0] and "pass --config-file" in errors[0]
    assert not (tmp_path / "out").exists()


def test_score_threshold_below_the_models_lowers_it(trained, tmp_path, capsys):
    """The model drops detections under MODEL.ROI_HEADS.SCORE_THRESH_TEST (0.35 here) itself: a
    lower --score-threshold lowers it, giving exactly what the lowered config gives, and says so."""
    photos, _ = _one_image(trained, tmp_path)
    weights = str(trained / "run/model_final.pth")

    def results(name, *extra):
        assert predict.main(["--weights", weights, "--input", str(photos), "--output",
                             str(tmp_path / name), *extra]) == 0
        return json.loads((tmp_path / name / "coco_instances_results.json").read_text())

    default = results("default")
    assert all(r["score"] >= 0.35 for r in default)
    assert "lowered" not in capsys.readouterr().err
    lowered = results("lowered", "--score-threshold", "0.05")
    assert "is below the model's MODEL.ROI_HEADS.SCORE_THRESH_TEST 0.35: the model's threshold " \
        "is lowered to 0.05" in capsys.readouterr().err
    assert any(0.05 <= r["score"] < 0.35 for r in lowered)
    assert min(r["score"] for r in lowered) >= 0.05
    assert lowered == results("config", "--score-threshold", "0.05",
                              "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.05")


def test_semantic_checkpoint_writes_maps_and_components(trained, semantic_weights, tmp_path):
    """Maps: round(255 * probability) per lesion; lesions: the connected components of each map
    at RETINA.COMPONENTS.MASK_THRESHOLD, each the pixels of one 8-connected component."""
    import numpy as np
    from PIL import Image
    from pycocotools import mask as mask_util
    from scipy import ndimage

    from retina_d2 import load_model

    photos, photo = _one_image(trained, tmp_path)
    api = load_model(semantic_weights)
    outputs = api(photo)
    assert "instances" not in outputs
    probs = outputs["sem_seg"].float().cpu().numpy()
    # A threshold a few-iteration model reaches on part of the image.
    threshold = float(np.quantile(probs, 0.9))
    assert 0 < threshold < float(probs.max())
    code = predict.main([
        "--weights", str(semantic_weights), "--input", str(photos), "--output",
        str(tmp_path / "out"), "--score-threshold", str(threshold),
        "RETINA.COMPONENTS.MASK_THRESHOLD", str(threshold), "RETINA.COMPONENTS.MIN_AREA", "1",
    ])
    assert code == 0
    names = api.class_names
    for k, name in enumerate(names):
        png_file = tmp_path / "out/maps" / photo.stem / f"{predict.lesion_slug(name)}.png"
        png = np.asarray(Image.open(png_file))
        assert np.array_equal(png, np.rint(np.clip(probs[k], 0, 1) * 255).astype(np.uint8))
    results = json.loads((tmp_path / "out/coco_instances_results.json").read_text())
    assert results
    with open(tmp_path / "out/lesion_counts.csv") as f:
        counts = next(csv.DictReader(f))
    for k, name in enumerate(names):
        mine = [r for r in results if r["category_id"] == api.lesion_ids[k]]
        above = probs[k] >= threshold
        _, components = ndimage.label(above, np.ones((3, 3), bool))
        assert len(mine) == components == int(counts[name])
        union = np.zeros(above.shape, bool)
        for r in mine:
            mask = mask_util.decode(r["segmentation"]).astype(bool)
            assert not (union & mask).any()
            union |= mask
            assert r["score"] == pytest.approx(float(probs[k][mask].max()))
        assert np.array_equal(union, above)


def test_semantic_image_scores_count_every_lesion_whatever_the_score_threshold(
        trained, semantic_weights, tmp_path):
    """image_predictions.json: per lesion type the mean of the IMAGE_SCORE_TOP_K best components'
    peaks (missing ones 0), from every component, also those --score-threshold leaves out."""
    import numpy as np
    from scipy import ndimage

    from retina_d2 import load_model

    photos, photo = _one_image(trained, tmp_path)
    api = load_model(semantic_weights)
    probs = api(photo)["sem_seg"].float().cpu().numpy()
    mask_threshold = float(np.quantile(probs, 0.9))
    peaks = {}  # by hand: every 8-connected component's peak probability, per map
    for k, name in enumerate(api.class_names):
        labels, n = ndimage.label(probs[k] >= mask_threshold, np.ones((3, 3), bool))
        peaks[name] = sorted((float(probs[k][labels == i].max()) for i in range(1, n + 1)),
                             reverse=True)
    assert sum(len(p) >= 2 for p in peaks.values()), "no map with two lesions to average"
    # A --score-threshold above every lesion: no lesion is kept, every image score still counts.
    above_all = max(p[0] for p in peaks.values() if p) + 0.01
    code = predict.main([
        "--weights", str(semantic_weights), "--input", str(photos), "--output",
        str(tmp_path / "out"), "--score-threshold", str(above_all),
        "RETINA.COMPONENTS.MASK_THRESHOLD", str(mask_threshold), "RETINA.COMPONENTS.MIN_AREA", "1",
        "RETINA.COMPONENTS.IMAGE_SCORE_TOP_K", "2",
    ])
    assert code == 0
    assert json.loads((tmp_path / "out/coco_instances_results.json").read_text()) == []
    per_image = json.loads((tmp_path / "out/image_predictions.json").read_text())[str(photo)]
    assert per_image["image_id"] == 1
    assert list(per_image["image_scores"]) == api.class_names
    for name, scores in peaks.items():
        assert per_image["image_scores"][name] == pytest.approx(sum(scores[:2]) / 2, abs=1e-6)


def test_a_bad_image_score_k_is_one_error_line_before_any_photograph(
        trained, semantic_weights, tmp_path, capsys):
    photos, _ = _one_image(trained, tmp_path)
    code = predict.main(["--weights", str(semantic_weights), "--input", str(photos),
                         "--output", str(tmp_path / "out"),
                         "RETINA.COMPONENTS.IMAGE_SCORE_TOP_K", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"error: RETINA.COMPONENTS.IMAGE_SCORE_TOP_K of {semantic_weights} must be a whole " \
        "number >= 1, got 0" in err
    assert not (tmp_path / "out").exists()


def test_multitask_checkpoint_writes_grades_and_landmarks(trained, multitask_weights, tmp_path):
    import numpy as np

    from retina_d2 import load_model

    photos, photo = _one_image(trained, tmp_path)
    api = load_model(multitask_weights, opts=["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"])
    outputs = api(photo)
    code = predict.main(["--weights", str(multitask_weights), "--input", str(photos),
                         "--output", str(tmp_path / "out"), "--score-threshold", "0.0"])
    assert code == 0
    per_image = json.loads((tmp_path / "out/image_predictions.json").read_text())[str(photo)]
    assert per_image["image_id"] == 1
    for task in ("dr_grade", "dme_grade"):
        probabilities = per_image[task]["probabilities"]
        assert probabilities == pytest.approx(outputs[task].tolist(), abs=1e-6)
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
        assert per_image[task]["grade"] == int(np.argmax(probabilities))
    assert set(per_image["landmarks"]) == {"optic_disc", "fovea"}
    for name, (x, y) in outputs["landmarks"].items():
        seen = per_image["landmarks"][name]
        assert (seen["x"], seen["y"]) == pytest.approx((x, y))
        assert seen["score"] == pytest.approx(outputs["landmark_scores"][name])
    assert list(per_image["lesion_presence"]) == api.class_names
    # Its lesion branch is a detector with a semantic head: instances and maps both.
    results = json.loads((tmp_path / "out/coco_instances_results.json").read_text())
    assert len(results) == len(outputs["instances"])
    assert len(list((tmp_path / "out/maps" / photo.stem).glob("*.png"))) == len(api.class_names)


@pytest.mark.parametrize("tool", ["predict", "train_net"])
def test_a_bad_value_type_in_opts_is_one_line_in_a_fresh_process(trained, tmp_path, tool):
    """The whole of stderr is the error line: no traceback, no log before it."""
    import os
    import subprocess

    photos, _ = _one_image(trained, tmp_path)
    if tool == "predict":
        args = ["--weights", str(trained / "run/model_final.pth"), "--input", str(photos),
                "--output", str(tmp_path / "out")]
    else:
        args = ["--config-file", INSTANT, "OUTPUT_DIR", str(tmp_path / "out")]
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / f"{tool}.py"), *args, "SOLVER.MAX_ITER", "abc"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
        env=dict(os.environ, RETINA_D2_DATASETS=str(trained / "datasets")),
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: command line: SOLVER.MAX_ITER 'abc': expected int (like 3), got str"
    ]
    assert not (tmp_path / "out").exists()


def test_gt_selects_the_photographs_it_lists(tmp_path, capsys):
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": [{"id": 7, "file_name": "raw/a.jpg"},
                                         {"id": 9, "file_name": "raw/b.jpg"},
                                         {"id": 11, "file_name": "raw/gone.jpg"}]}))
    a, b, vessels = tmp_path / "a.jpg", tmp_path / "b.jpg", tmp_path / "a_vess.png"
    assert predict.image_ids([a, vessels, b], gt) == {a: 7, b: 9}
    err = capsys.readouterr().err
    assert "1 other file(s) under --input left out, 1 of its image(s) not found" in err
    with pytest.raises(ValueError, match=r"gt\.json: no image record for \['a_vess\.png'\]"):
        predict.image_ids([vessels], gt)
