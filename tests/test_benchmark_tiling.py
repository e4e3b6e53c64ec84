"""tools/benchmark.py tiling: a small smoke run, the synthetic photograph, and the small-lesion
recall it reports with trained weights."""
import json

import numpy as np
import torch
from scipy import ndimage

from retina_d2.benchmarks import main
from retina_d2.benchmarks.tiling import small_lesion_recall, synthetic_photograph


def test_tiling_benchmark_smoke(tmp_path):
    out = tmp_path / "tiling.json"
    main(["tiling", "--size", "small", "--detections", "32", "--out", str(out)])
    results = json.loads(out.read_text())
    assert [r["variant"] for r in results["rows"]] == ["whole image, native", "tiled, native"]
    for row in results["rows"]:
        assert "error" not in row, row
        assert row["seconds_per_image"] > 0 and row["peak_rss_mb"] >= row["pre_infer_rss_mb"] > 0
        assert row["network_input"] == "native" and "small_recall" not in row
    assert "random weights" in results["note"] and results["weights"] is None


def test_synthetic_photograph_has_separate_lesions_1_to_5_px_inside_the_eye():
    image, labels = synthetic_photograph(200, 300, lesions=25, seed=3)
    assert image.shape == (200, 300, 3) and labels.shape == (200, 300)
    assert labels.max() == 25
    assert not image[:, :40].any() and not image[:, -40:].any()  # the camera's black frame
    objects = ndimage.find_objects(labels)
    centres = []
    for lesion_id, (rows, cols) in enumerate(objects, start=1):
        side = max(rows.stop - rows.start, cols.stop - cols.start)
        assert 1 <= side <= 5
        assert (image[labels == lesion_id] == (95, 25, 12)).all()
        centres.append(((rows.start + rows.stop) / 2, (cols.start + cols.stop) / 2))
        # Inside the field of view: the eye (not the black frame) surrounds it.
        assert image[rows.start - 2, cols.start - 2].any()
    distances = [max(abs(a[0] - b[0]), abs(a[1] - b[1]))
                 for i, a in enumerate(centres) for b in centres[i + 1:]]
    assert min(distances) >= 5  # separate lesions, never one blob


def test_small_lesion_recall_counts_lesions_under_10_px_hit_at_the_iou():
    labels = np.zeros((40, 40), np.int32)
    labels[2:5, 2:5] = 1  # 3x3: found exactly
    labels[20:22, 20:22] = 2  # 2x2: only touched (IoU 1/12)
    labels[30:32, 5:17] = 3  # 12 px long: not small
    preds = torch.zeros((2, 40, 40), dtype=torch.bool)
    preds[0, 2:5, 2:5] = True
    preds[1, 21:24, 21:24] = True  # 1 px shared with lesion 2, union 4 + 9 - 1 = 12
    assert small_lesion_recall(labels, preds, 0.2) == {"small_lesions": 2, "small_found": 1}
    assert small_lesion_recall(labels, preds, 1 / 12) == {"small_lesions": 2, "small_found": 2}
    assert small_lesion_recall(labels, preds[:0], 0.2) == {"small_lesions": 2, "small_found": 0}
