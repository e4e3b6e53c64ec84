"""The training-free exudate floor (benchmarks/exudate_floor.py): it finds a known bright
blob and not the optic disc on a drawn eye, and it is computed and scored on real HEI-MED images
(skipped without ../shared)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from benchmarks import HEIMED_ROOT, REPO_ROOT
from benchmarks.exudate_floor import (
    FLOOR_NAME,
    add_floor_ratios,
    bright_lesion_candidates,
    floor_coco_results,
    floor_row,
)


def _drawn_eye(blob=(700, 620), blob_radius=7):
    """A 1200 px eye: an orange FOV with a slow illumination gradient, a bright optic disc at
    (420, 560) and one small bright exudate."""
    image = np.zeros((1200, 1200, 3), np.uint8)
    yy, xx = np.mgrid[:1200, :1200]
    shade = (0.8 + 0.2 * xx / 1200.0)[..., None]  # uneven illumination, left to right
    retina = (np.array([150, 80, 35]) * shade).astype(np.uint8)
    fov = (xx - 600) ** 2 + (yy - 600) ** 2 <= 560**2
    image[fov] = retina[fov]
    cv2.circle(image, (420, 560), 80, (250, 220, 170), -1)  # disc: brighter and larger
    if blob is not None:
        cv2.circle(image, blob, blob_radius, (230, 170, 90), -1)
    return image


def test_floor_finds_a_known_bright_blob_first_and_not_the_disc():
    image = _drawn_eye()
    labels, lesions = bright_lesion_candidates(image)
    assert lesions, "the floor found nothing"
    label, (x0, y0, x1, y1), score = lesions[0]
    truth = np.zeros(image.shape[:2], np.uint8)
    cv2.circle(truth, (700, 620), 7, 1, -1)
    found = labels == label
    iou = (found & (truth > 0)).sum() / (found | (truth > 0)).sum()
    assert iou > 0.6, iou
    assert x0 <= 700 < x1 and y0 <= 620 < y1 and 0 < score < 1
    # Nothing is reported on the disc, which is brighter than the exudate.
    assert not labels[540:580, 400:440].any()


def test_floor_reports_nothing_on_an_eye_without_lesions():
    _, lesions = bright_lesion_candidates(_drawn_eye(blob=None))
    assert lesions == []


def test_floor_scores_grow_with_contrast_and_coco_results_are_valid(tmp_path):
    image = _drawn_eye()
    cv2.circle(image, (800, 800), 7, (255, 230, 150), -1)  # a brighter second exudate
    cv2.imwrite(str(tmp_path / "eye.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    results = floor_coco_results([{"id": 7, "file_name": "eye.png"}], tmp_path, category_id=3)
    assert len(results) == 2 and {r["image_id"] for r in results} == {7}
    best, second = sorted(results, key=lambda r: -r["score"])
    x, y, w, h = best["bbox"]
    assert x <= 800 < x + w and y <= 800 < y + h  # the brighter one ranks first
    from pycocotools import mask as mask_util

    assert mask_util.area(best["segmentation"]) == pytest.approx(math.pi * 7.5**2, rel=0.2)


def test_floor_ratios_divide_by_the_computed_floor():
    rows = [{"name": "model", "segm AP35": 20.0, "segm AP50": None}]
    add_floor_ratios(rows, {"segm AP35": 8.0, "segm AP50": 4.0}, ["segm AP35", "segm AP50"])
    assert rows[0]["segm AP35 x floor"] == 2.5 and "segm AP50 x floor" not in rows[0]


# Three real photographs: two with exudates, one without.
REAL_IMAGES = ["(00000101)", "(00000585)", "(00000197)"]


@pytest.mark.skipif(
    not (HEIMED_ROOT / "(00000101).jpg").is_file(),
    reason=f"the HEI-MED sample is not at {HEIMED_ROOT}",
)
def test_floor_row_is_computed_on_three_real_heimed_images(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in REAL_IMAGES:
        for path in HEIMED_ROOT.glob(f"{name}*"):
            (raw / path.name).symlink_to(path)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"val": REAL_IMAGES}))
    out = tmp_path / "heimed"
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "convert_dataset.py"), "heimed", "--root",
         str(raw), "--out", str(out), "--split-file", str(split), "--no-semantic"],
        check=True, capture_output=True,
    )
    row = floor_row(out / "val.json", raw)
    assert row["name"] == FLOOR_NAME and row["num_images"] == 3
    # The floor finds real exudates: above zero, below what a useful model must reach.
    assert 0 < row["segm AP35"] < 60 and 0 <= row["segm AP50"] <= row["segm AP35"]
    assert row["seconds"] > 0
