"""tools/predict.py's outputs: one overlay per image even when two images share a stem, and an
--output that cannot be written is one error line naming it."""
import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retina_d2.tools import predict, train_net

REPO = Path(__file__).resolve().parents[2]

INSTANT = str(REPO / "configs/quick_schedules/maskrcnn_synthetic_instant_test.yaml")


def test_overlay_names_are_unique_and_keep_the_stem_where_it_is():
    images = [Path(n) for n in ("eye.jpg", "eye.png", "Eye.tif", "left.png", "eye.jpg.tif",
                                "right.JPG")]
    names = predict.overlay_names(images)
    assert names[Path("left.png")] == "left.png" and names[Path("right.JPG")] == "right.png"
    assert names[Path("eye.jpg")] == "eye.jpg.png" and names[Path("eye.png")] == "eye.png.png"
    assert names[Path("Eye.tif")] == "Eye.tif.png"
    # "eye.jpg.tif" has a stem of its own, "eye.jpg": its natural name is taken, it is numbered.
    assert len({n.lower() for n in names.values()}) == len(images)
    assert all(Path(n).name == n and n.endswith(".png") for n in names.values())


@pytest.fixture(scope="module")
def weights(tmp_path_factory, synthetic_datasets):
    root = tmp_path_factory.mktemp("predict_outputs")
    mp = pytest.MonkeyPatch()
    mp.setenv("RETINA_D2_DATASETS", str(synthetic_datasets))
    train_net.cli(["--config-file", INSTANT, "OUTPUT_DIR", str(root / "run"),
                   "RETINA.EVAL.NUM_OVERLAYS", "0"])
    mp.undo()
    return root / "run" / "model_final.pth"


def _run(weights, photos, out, *extra):
    return predict.main([
        "--config-file", INSTANT, "--weights", str(weights), "--input", str(photos),
        "--output", str(out), "--score-threshold", "0.0", *extra,
    ])


def test_images_sharing_a_stem_get_an_overlay_each(weights, synthetic_datasets, tmp_path):
    """eye.jpg and eye.png are different photographs: before, the second overlay replaced the
    first; now each is drawn over its own image."""
    sources = sorted((synthetic_datasets / "synthetic/raw/images").glob("*.png"))[:2]
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.open(sources[0]).convert("RGB").save(photos / "eye.jpg", quality=95)
    Image.open(sources[1]).convert("RGB").save(photos / "eye.png")
    assert _run(weights, photos, tmp_path / "out") == 0
    overlays = sorted(p.name for p in (tmp_path / "out" / "overlays").iterdir())
    assert overlays == ["eye.jpg.png", "eye.png.png"]
    for name, source in (("eye.jpg.png", photos / "eye.jpg"), ("eye.png.png", photos / "eye.png")):
        overlay = np.asarray(Image.open(tmp_path / "out" / "overlays" / name).convert("RGB"),
                             dtype=float)
        own = np.asarray(Image.open(source).convert("RGB"), dtype=float)
        other = np.asarray(Image.open(photos / ("eye.png" if "jpg" in name else "eye.jpg"))
                           .convert("RGB"), dtype=float)
        # Drawn over its own photograph: far nearer to it than to the other one. (The legend
        # is a band below the photograph, whose rows come first.)
        assert overlay.shape[1:] == own.shape[1:] and overlay.shape[0] > own.shape[0]
        overlay = overlay[: own.shape[0]]
        # Median over pixels: lesion outlines and rings cover a share of the picture that the
        # mean counts, but most pixels are the photograph's own.
        assert np.median(np.abs(overlay - own)) < np.median(np.abs(overlay - other)) / 2
    counts = (tmp_path / "out" / "lesion_counts.csv").read_text().splitlines()
    assert len(counts) == 3


def test_an_output_that_cannot_be_written_is_one_error_naming_it(weights, synthetic_datasets,
                                                                  tmp_path, capsys):
    photos = sorted((synthetic_datasets / "synthetic/raw/images").glob("*.png"))[0]
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert _run(weights, photos, blocker / "out") == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(blocker / "out") in lines[0]
    assert "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_is_one_error_naming_it(weights, synthetic_datasets, tmp_path,
                                                   capsys):
    photos = sorted((synthetic_datasets / "synthetic/raw/images").glob("*.png"))[0]
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert _run(weights, photos, out) == 2
    finally:
        out.chmod(0o755)
    assert str(out) in capsys.readouterr().err


def test_results_files_get_the_permissions_the_umask_gives(weights, synthetic_datasets,
                                                           tmp_path):
    photos = sorted((synthetic_datasets / "synthetic/raw/images").glob("*.png"))[0]
    previous = os.umask(0o027)
    try:
        assert _run(weights, photos, tmp_path / "out") == 0
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    for name in ("coco_instances_results.json", "images.json", "lesion_counts.csv",
                 "overlays/" + photos.stem + ".png"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o640, name
    assert stat.S_IMODE((out / "overlays").stat().st_mode) == 0o750
    assert json.loads((out / "images.json").read_text()) == {str(photos): 1}
