"""tools/benchmark.py tiling: a small smoke run, the synthetic photograph, the small-lesion
recall it reports with trained weights, and the SAHI row (SAHI's slicing and merging around our
model: a stand-in detector whose answer is known, and the row's error when SAHI cannot run)."""
import importlib.util
import json

import numpy as np
import pytest
import torch
from detectron2.structures import Boxes, Instances
from scipy import ndimage
from torch import nn

from benchmarks import main, measure_in_subprocess
from benchmarks.tiling import small_lesion_recall, synthetic_photograph

HAS_SAHI = importlib.util.find_spec("sahi") is not None
needs_sahi = pytest.mark.skipif(
    not HAS_SAHI, reason="sahi is not importable (requirements-nodeps.txt; make env installs it)")


def test_tiling_benchmark_smoke(tmp_path):
    out = tmp_path / "tiling.json"
    args = ["tiling", "--size", "small", "--detections", "32", "--tile-proposals", "20",
            "--tile-detections", "8", "--out", str(out)]
    main(args + ([] if HAS_SAHI else ["--no-sahi"]))
    results = json.loads(out.read_text())
    variants = ["whole image, native", "tiled, native",
                "tiled, native, 20 proposals / 8 detections per tile"]
    if HAS_SAHI:
        variants.append("SAHI slices (Detectron2 adapter), native")
    assert [r["variant"] for r in results["rows"]] == variants
    for row in results["rows"]:
        assert "error" not in row, row
        assert row["seconds_per_image"] > 0 and row["peak_rss_mb"] >= row["pre_infer_rss_mb"] > 0
        assert row["network_input"] == "native" and "small_recall" not in row
        assert 0 <= row["detections_per_image"] <= 32
    assert "random weights" in results["note"] and results["weights"] is None
    assert results["weights_iteration"] is None
    assert results["tile_budget"] == {"proposals_per_tile": 20, "detections_per_tile": 8}
    if HAS_SAHI:
        sahi_row = results["rows"][-1]["sahi"]
        assert sahi_row["slice_height"] == sahi_row["slice_width"] == results["tile"] == 256
        assert sahi_row["overlap_width_ratio"] == results["overlap"] / 256
        assert sahi_row["perform_standard_pred"] is False


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


# ------------------------------------------------------------------------------------------------
# The SAHI row
# ------------------------------------------------------------------------------------------------


class MarkedLesions(nn.Module):
    """A stand-in detector whose answer is known: in a BGR image, every 8-connected component of
    blue (channel 0) pixels is a lesion of class 1 with its tight box and mask, scored by the
    red channel (/ 100). Fed channels in the wrong order, it finds nothing."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, batched_inputs):
        outputs = []
        for inputs in batched_inputs:
            image = inputs["image"]
            h, w = image.shape[1:]
            self.calls.append((h, w))
            labels, count = ndimage.label((image[0] > 0).numpy(), structure=np.ones((3, 3)))
            masks = torch.from_numpy(np.stack([labels == k for k in range(1, count + 1)])
                                     if count else np.zeros((0, h, w), bool))
            boxes = []
            for mask in masks.numpy():
                rows, cols = np.nonzero(mask)
                boxes.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
            scores = [float(image[2][m].max()) / 100 for m in masks]
            instances = Instances((h, w))
            instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
            instances.scores = torch.tensor(scores, dtype=torch.float32)
            instances.pred_classes = torch.ones(count, dtype=torch.int64)
            instances.pred_masks = masks
            outputs.append({"instances": instances})
        return outputs


@needs_sahi
def test_sahi_slices_and_merges_around_our_model_into_the_original_frame():
    """SAHI's slicing and merging (benchmarks/sahi_rcnn.py) with a model whose answer
    is known: 4 lesions in a 96x120 network input cut from a 130x150 photograph at (10, 20);
    SAHI's slices of 64 sharing 16 px start at columns 0, 48, 56 (its last slice flush with the
    border) and rows 0, 32. A lesion seen whole by several slices comes back once; the masks land
    in the photograph's frame, shifted by the FOV crop."""
    from benchmarks.sahi_rcnn import LesionSahiModel, SlicePredictor, sliced_instances

    lesions = [  # (x0, y0, x1, y1) in the network input, score
        ((5, 5, 10, 9), 90),  # the top-left slice only
        ((58, 10, 62, 14), 80),  # the top row's three slices
        ((58, 36, 62, 40), 70),  # all six slices
        ((100, 70, 110, 80), 60),  # the bottom row's last two slices
    ]
    image = torch.zeros((3, 96, 120), dtype=torch.uint8)
    for (x0, y0, x1, y1), score in lesions:
        image[0, y0:y1, x0:x1] = 255
        image[2, y0:y1, x0:x1] = score
    model = MarkedLesions()
    detection_model = LesionSahiModel(
        model=SlicePredictor(model, "BGR"), device="cpu", confidence_threshold=0.05,
        category_mapping={"0": "a", "1": "b"})
    inputs = {"image": image, "height": 130, "width": 150, "fov_box": [10, 20, 130, 116]}
    instances = sliced_instances(detection_model, inputs, tile=64, overlap=16, max_detections=100)

    assert model.calls == [(64, 64)] * 6  # SAHI's slices, at the network's pixels
    assert instances.image_size == (130, 150)
    assert instances.scores.tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6])
    assert instances.pred_classes.tolist() == [1, 1, 1, 1]
    for ((x0, y0, x1, y1), _), box, mask in zip(
            lesions, instances.pred_boxes.tensor, instances.pred_masks):
        expected = torch.zeros((130, 150), dtype=torch.bool)
        expected[20 + y0 : 20 + y1, 10 + x0 : 10 + x1] = True
        assert torch.equal(mask, expected)
        # SAHI's box of a mask is its polygon's: pixel centres, one pixel short of ours.
        assert box.tolist() == [10 + x0, 20 + y0, 10 + x1 - 1, 20 + y1 - 1]
    capped = sliced_instances(detection_model, inputs, tile=64, overlap=16, max_detections=2)
    assert capped.scores.tolist() == pytest.approx([0.9, 0.8])
    assert capped.pred_masks.shape == (2, 130, 150)


@needs_sahi
def test_the_sahi_adapter_wants_a_built_model_and_class_names():
    from benchmarks.sahi_rcnn import LesionSahiModel, SlicePredictor

    with pytest.raises(NotImplementedError, match="built model"):
        LesionSahiModel(device="cpu", category_mapping={"0": "a"})
    with pytest.raises(ValueError, match="category_mapping"):
        LesionSahiModel(model=SlicePredictor(MarkedLesions(), "BGR"), device="cpu")


def test_the_sahi_row_reports_why_sahi_cannot_run(tmp_path, monkeypatch):
    """Where SAHI cannot be imported the row carries the exception's text, and no numbers."""
    fake = tmp_path / "blocked" / "sahi"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("sahi blocked for this test")\n')
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "blocked"))
    image, _ = synthetic_photograph(200, 300, lesions=5)
    from PIL import Image

    Image.fromarray(image).save(tmp_path / "eye.png")
    row = measure_in_subprocess(
        "benchmarks.tiling:infer_images",
        {"images": [{"file": str(tmp_path / "eye.png")}], "tiled": True, "tile": 128,
         "overlap": 16, "detections": 5, "sahi": True},
        timeout=600,
    )
    assert "sahi blocked for this test" in row["error"]
    assert "seconds_per_image" not in row and "small_recall" not in row
