"""retina_d2/export.py and tools/export_model.py: TorchScript and ONNX exports of tiny random-weight
models of the instant configs equal the eager model on three photographs (two sizes and a small
one; one model finding no lesion at all), the check catches a model that differs, and bad input
is one error line naming the file or key."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from retina_d2 import export
from retina_d2.config import get_retina_cfg, merge_config
from retina_d2.data.synthetic import image_rng, render_fundus
from retina_d2.modeling.inference import build_inference_model

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "configs" / "quick_schedules"
DETECTOR = str(QUICK / "maskrcnn_synthetic_instant_test.yaml")
SEMANTIC = str(QUICK / "semantic_synthetic_instant_test.yaml")
MULTITASK = str(QUICK / "multitask_synthetic_instant_test.yaml")
# Native resolution (no resize), so the three photographs reach the network at three sizes: the
# traced graph must hold for sizes other than the one it was traced at.
NATIVE = ["INPUT.MIN_SIZE_TEST", "0", "INPUT.MAX_SIZE_TEST", "4000"]
# Random weights score every class near 1/6: a low threshold makes detections to compare, and
# merging touching ones exercises MODEL.LESION_MERGE (maskrcnn_heimed.yaml's postprocess).
DETECTOR_OPTS = NATIVE + [
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.05", "TEST.DETECTIONS_PER_IMAGE", "40",
    "MODEL.LESION_MERGE.ENABLED", "True", "MODEL.LESION_MERGE.SCORE_THRESH", "0.05",
]


def _random_weights(config, path, opts=()):
    cfg = get_retina_cfg()
    merge_config(cfg, config, ["MODEL.DEVICE", "cpu", *opts])
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Random weights of the two instant configs and three photographs: 320x256 (the field of
    view cut at top and bottom), a healthy 288x288 and a small 100x100."""
    root = tmp_path_factory.mktemp("export")
    photos = []
    for index, (size, rows, healthy) in enumerate(((320, (32, 288), False), (288, None, True),
                                                    (128, None, False))):
        image = render_fundus(image_rng(3, index), size=size, healthy=healthy).image
        if size == 128:  # the renderer's smallest
            image = cv2.resize(image, (100, 100), interpolation=cv2.INTER_AREA)
        if rows:
            image = image[rows[0]:rows[1]]
        path = root / f"photo_{index}.png"
        cv2.imwrite(str(path), np.ascontiguousarray(image[:, :, ::-1]))
        photos.append(str(path))
    return {
        "root": root,
        "photos": photos,
        "detector": _random_weights(DETECTOR, root / "detector.pth"),
        "semantic": _random_weights(SEMANTIC, root / "semantic.pth"),
    }


def _export(files, config, weights, fmt, folder, opts, photos=True):
    cfg = export.export_config(config, opts)
    samples = files["photos"] if photos else ()  # () = the two synthetic photographs
    manifest = export.export_model(cfg, files[weights], fmt, folder, samples)
    return cfg, manifest


def _eager(cfg, weights, photo):
    # What evaluation and prediction run: the model through the inference pipeline, whose last
    # step merges touching lesions (MODEL.LESION_MERGE).
    model = build_inference_model(cfg, export.load_eager_model(cfg, weights)[0]).eval()
    mapper = export._mapper(cfg)
    with torch.no_grad():
        return model([mapper({"file_name": photo})])[0]


def test_compare_outputs_hand_worked():
    """The check itself, on instances made by hand: a box 0.02 px off, a score 2e-4 off and a
    10-pixel mask of which the export keeps 9 (IoU 0.9) are each reported; within tolerance
    nothing is."""

    def instances(box_shift=0.0, score_shift=0.0, drop_pixel=False):
        inst = Instances((8, 8))
        inst.pred_boxes = Boxes(torch.tensor([[1.0, 1.0, 6.0, 3.0]]) + box_shift)
        inst.scores = torch.tensor([0.5 + score_shift])
        inst.pred_classes = torch.tensor([2])
        mask = torch.zeros(1, 8, 8, dtype=torch.bool)
        mask[0, 1:3, 1:6] = True  # 10 pixels
        if drop_pixel:
            mask[0, 1, 1] = False
        inst.pred_masks = mask
        return inst

    eager = {"instances": instances()}
    same = export.compare_outputs(eager, {"instances": instances(0.005, 5e-5)})
    assert same["problems"] == [] and same["min_mask_iou"] == 1.0
    assert same["max_box_diff_px"] == pytest.approx(0.005, abs=1e-6)
    for changed, words in (({"box_shift": 0.02}, "box"), ({"score_shift": 2e-4}, "score"),
                           ({"drop_pixel": True}, "IoU 0.9000")):
        result = export.compare_outputs(eager, {"instances": instances(**changed)})
        assert len(result["problems"]) == 1 and words in result["problems"][0], result
    empty = Instances((8, 8), pred_boxes=Boxes(torch.zeros(0, 4)), scores=torch.zeros(0),
                      pred_classes=torch.zeros(0, dtype=torch.long))
    missing = export.compare_outputs(eager, {"instances": empty})
    assert "0 instances instead of the eager model's 1" in missing["problems"][0]
    maps = torch.rand(2, 5, 6)
    assert export.compare_outputs({"sem_seg": maps}, {"sem_seg": maps + 5e-4})["problems"] == []
    far = export.compare_outputs({"sem_seg": maps}, {"sem_seg": maps + 2e-3})
    assert "probability differs" in far["problems"][0]


def test_torchscript_detector_equals_eager(files, tmp_path):
    cfg, manifest = _export(files, DETECTOR, "detector", "torchscript", tmp_path, DETECTOR_OPTS)
    assert sorted(os.listdir(tmp_path)) == ["config.yaml", "export.json", "model.ts"]
    sizes = [tuple(c["input_size"]) for c in manifest["checked_on"]]
    assert len(set(sizes)) == 3, sizes  # three input sizes, one trace
    exported = export.ExportedLesionModel(tmp_path)
    network, _ = export.load_eager_model(cfg, files["detector"])
    model = build_inference_model(cfg, network).eval()  # as evaluation and prediction run it
    for photo in files["photos"]:
        inputs = exported.mapper({"file_name": photo})
        with torch.no_grad():
            eager = model([inputs])[0]["instances"]
        ours = exported(photo)["instances"]
        assert len(eager) > 0 and ours.image_size == eager.image_size
        # On the CPU the trace replays the eager kernels: not close, equal.
        assert torch.equal(ours.pred_boxes.tensor, eager.pred_boxes.tensor)
        assert torch.equal(ours.scores, eager.scores)
        assert torch.equal(ours.pred_classes, eager.pred_classes)
        assert torch.equal(ours.pred_masks, eager.pred_masks)
    # The check is not vacuous: a model whose box regression moved is reported.
    with torch.no_grad():
        network.roi_heads.box_predictor.bbox_pred.bias += 0.5
        inputs = exported.mapper({"file_name": files["photos"][0]})
        moved = export.compare_outputs(model([inputs])[0], exported.predict_mapped(inputs))
    assert any("box differs" in p for p in moved["problems"]), moved


def test_onnx_detector_within_tolerance(files, tmp_path):
    cfg, manifest = _export(files, DETECTOR, "detector", "onnx", tmp_path, DETECTOR_OPTS)
    assert manifest["onnx_opset"] == export.ONNX_OPSET
    assert [o["name"] for o in manifest["outputs"]] == ["boxes", "scores", "classes", "mask_probs"]
    exported = export.ExportedLesionModel(tmp_path)
    assert exported.format == "onnx"
    for photo in files["photos"]:
        eager = _eager(cfg, files["detector"], photo)["instances"]
        ours = exported(photo)["instances"]
        assert len(ours) == len(eager) > 0
        assert (ours.pred_boxes.tensor - eager.pred_boxes.tensor).abs().max() <= 1e-2
        assert (ours.scores - eager.scores).abs().max() <= 1e-4
        inter = (ours.pred_masks & eager.pred_masks).flatten(1).sum(1)
        union = (ours.pred_masks | eager.pred_masks).flatten(1).sum(1)
        assert ((inter / union.clamp(min=1))[union > 0] >= 0.99).all()


@pytest.mark.parametrize("fmt", export.EXPORT_FORMATS)
def test_semantic_export_equals_eager(files, tmp_path, fmt):
    cfg, manifest = _export(files, SEMANTIC, "semantic", fmt, tmp_path, NATIVE)
    assert manifest["architecture"] == "SemanticLesionNet"
    exported = export.ExportedLesionModel(tmp_path)
    for photo in files["photos"]:
        eager = _eager(cfg, files["semantic"], photo)["sem_seg"]
        ours = exported(photo)["sem_seg"]
        assert ours.shape == eager.shape == (5,) + cv2.imread(photo).shape[:2]
        if fmt == "torchscript":
            assert torch.equal(ours, eager)
        else:
            assert (ours - eager).abs().max() <= 1e-3


def test_tool_in_subprocess_no_detections(files, tmp_path):
    """tools/export_model.py end to end: a model that finds nothing (threshold above any score)
    exports, and its export finds nothing either."""
    out = tmp_path / "deploy"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools/export_model.py"), "--config-file", DETECTOR,
         "--weights", files["detector"], "--format", "torchscript", "--output", str(out),
         "--sample-image", files["photos"][2], "--sample-image", files["photos"][0],
         *NATIVE, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "1.0"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((out / "export.json").read_text())
    assert [c["instances"] for c in manifest["checked_on"]] == [0, 0]
    assert [c["image"] for c in manifest["checked_on"]] == ["photo_2.png", "photo_0.png"]
    assert "model.ts" in proc.stdout
    ours = export.ExportedLesionModel(out)(files["photos"][1])["instances"]
    assert len(ours) == 0 and ours.pred_masks.shape[1:] == (288, 288)


def _error_line(capsys, argv):
    assert export.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_input_is_one_error_line(files, tmp_path, capsys):
    base = ["--config-file", DETECTOR, "--output", str(tmp_path / "out")]
    missing = tmp_path / "nowhere.pth"
    assert str(missing) in _error_line(capsys, base + ["--weights", str(missing)])
    assert not (tmp_path / "out").exists()  # nothing created for a bad weights file
    line = _error_line(capsys, ["--config-file", MULTITASK, "--weights", files["detector"],
                                "--output", str(tmp_path / "out")])
    assert "MultiTaskLesionNet" in line
    for key in ("RETINA.TILE.ENABLED", "RETINA.INFERENCE.AMP", "TEST.AUG.ENABLED"):
        assert key in _error_line(capsys, base + ["--weights", files["detector"], key, "True"])
    # Weights of another model: the safe checkpointer names the file.
    line = _error_line(capsys, base + ["--weights", files["semantic"]])
    assert files["semantic"] in line
    assert str(tmp_path / "no.yaml") in _error_line(
        capsys, ["--config-file", str(tmp_path / "no.yaml"), "--weights", files["detector"],
                 "--output", str(tmp_path / "out")])


def test_output_folder_of_someone_else_is_refused(files, tmp_path, capsys):
    (tmp_path / "model.ts").write_bytes(b"a user's own file")
    line = _error_line(capsys, ["--config-file", DETECTOR, "--weights", files["detector"],
                                "--output", str(tmp_path)])
    assert "model.ts" in line and str(tmp_path) in line
    assert (tmp_path / "model.ts").read_bytes() == b"a user's own file"
    assert sorted(os.listdir(tmp_path)) == ["model.ts"]


def test_onnx_without_its_packages_names_them(files, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    line = _error_line(capsys, ["--config-file", SEMANTIC, "--weights", files["semantic"],
                                "--format", "onnx", "--output", str(tmp_path / "out")])
    assert "onnxruntime" in line and "pip install onnxruntime" in line and "onnx and" not in line
    assert not (tmp_path / "out").exists()


def test_altered_export_is_refused(files, tmp_path):
    _, manifest = _export(files, SEMANTIC, "semantic", "torchscript", tmp_path, NATIVE, False)
    checked = manifest["checked_on"]
    assert [c["image"] for c in checked] == ["synthetic fundus 0", "synthetic fundus 1"]
    assert all(c["max_probability_diff"] == 0.0 for c in checked)
    with open(tmp_path / "model.ts", "ab") as f:
        f.write(b"\0")
    with pytest.raises(export.ExportError, match="sha256"):
        export.ExportedLesionModel(tmp_path)
    (tmp_path / "export.json").write_text("{}")
    with pytest.raises(export.ExportError, match="not written by retina_d2"):
        export.ExportedLesionModel(tmp_path)


def test_detectron2_export_imports_without_caffe2():
    from detectron2.export import TracingAdapter, scripting_with_instances  # noqa: F401
    import detectron2.export

    with pytest.raises(AttributeError, match="caffe2"):
        detectron2.export.Caffe2Tracer  # noqa: B018


def test_benchmark_writes_latency_and_differences(files, tmp_path, monkeypatch):
    """tools/benchmark.py export, cut to the semantic instant config and one photograph."""

    from benchmarks import export as bench

    monkeypatch.setattr(bench, "MODELS", {"semantic instant": str(Path(SEMANTIC).relative_to(REPO))})
    monkeypatch.setattr(bench, "_photographs", lambda count, scratch: files["photos"][:count])
    out = tmp_path / "export.json"
    bench.run(argparse.Namespace(out=out, images=1, repeats=1, formats=["torchscript"]))
    (row,) = json.loads(out.read_text())["rows"]
    assert "error" not in row, row
    assert row["eager_seconds"] > 0 and row["exported_seconds"] > 0
    assert row["max_probability_diff"] == 0.0 and len(row["input_sizes"]) == 1
