"""LesionSemanticEvaluator against an independent sklearn computation on crafted predictions, the
evaluators LesionTrainer picks, and tools/train_net.py end to end with a semantic model."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score, jaccard_score

from retina_d2.config import get_retina_cfg
from retina_d2.data.converters import ConvertOptions, synthetic
from retina_d2.engine import LesionTrainer
from retina_d2.evaluation import (
    LesionFROCEvaluator,
    LesionInstanceEvaluator,
    OverlayEvaluator,
)
from retina_d2.evaluation.semantic_eval import LesionSemanticEvaluator

REPO = Path(__file__).resolve().parents[2]
from retina_d2.tools import train_net  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")

TINY = "test_semantic_eval_tiny"
LESIONS = ["microaneurysm", "haemorrhage", "hard exudate"]
SEMANTIC_INSTANT = str(REPO / "configs/quick_schedules/semantic_synthetic_instant_test.yaml")
MASKRCNN_INSTANT = str(REPO / "configs/quick_schedules/maskrcnn_synthetic_instant_test.yaml")


def _target(rng, shape, positive=0.3, ignore=0.0):
    t = (rng.random(shape) < positive).astype(np.uint8)
    t[rng.random(shape) < ignore] = 255
    return t


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(records, targets, predictions) of a registered 5-image dataset. Targets are (C, H, W)
    with 255 where the image has no PNG for a lesion; predictions are multiples of 0.01 (bin
    edges, where the binned AUC-PR is exact), 0.5 among them. Image 2 is not annotated for
    microaneurysms, image 3's microaneurysm PNG is all ignore and image 4's haemorrhage PNG too;
    hard exudates are never positive."""
    out = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    shapes = [(6, 8), (5, 7), (4, 4), (4, 5), (7, 6)]
    records, targets, predictions = [], [], []
    for index, shape in enumerate(shapes):
        target = np.stack(
            [
                _target(rng, shape, ignore=0.2),
                _target(rng, shape, 0.4, 0.1),
                _target(rng, shape, 0.0),
            ]
        )
        if index == 3:
            target[0] = 255
        if index == 4:
            target[1] = 255
        if index == 0:
            target[1] = 0  # a healthy image for haemorrhages: an image-level negative
        files = {}
        for c, lesion in enumerate(LESIONS):
            if index == 2 and lesion == "microaneurysm":
                target[c] = 255
                continue
            files[lesion] = str(out / f"{index}_{c}.png")
            Image.fromarray(target[c]).save(files[lesion])
        prediction = rng.integers(0, 101, size=(len(LESIONS),) + shape) / 100
        # Haemorrhage scores that say something: positives score at least 0.3.
        prediction[1][target[1] == 1] = np.maximum(prediction[1][target[1] == 1], 0.3)
        prediction[0, 0, 0] = 0.5
        records.append(
            dict(
                file_name=str(out / f"{index}.png"),
                image_id=index,
                height=shape[0],
                width=shape[1],
                sem_seg_files=files,
            )
        )
        targets.append(target)
        predictions.append(prediction)
    DatasetCatalog.register(TINY, lambda: records)
    MetadataCatalog.get(TINY).set(thing_classes=LESIONS)
    yield records, targets, predictions
    DatasetCatalog.remove(TINY)
    MetadataCatalog.remove(TINY)


def _sklearn_metrics(targets, predictions, c):
    """Pixel AP / F1 / IoU and image F1 of lesion ``c`` over the valid pixels, by sklearn."""
    valid = [t[c] != 255 for t in targets]
    labels = np.concatenate([t[c][v] for t, v in zip(targets, valid)])
    scores = np.concatenate([p[c][v] for p, v in zip(predictions, valid)])
    image_true = [bool((t[c][v] == 1).any()) for t, v in zip(targets, valid) if v.any()]
    image_pred = [bool(p[c][v].max() >= 0.5) for p, v in zip(predictions, valid) if v.any()]

    def defined(score, y_true, y_pred):  # NaN where nothing is positive, predicted or true
        return score(y_true, y_pred) * 100 if np.any(y_true) or np.any(y_pred) else math.nan

    return {
        "AUCPR": average_precision_score(labels, scores) * 100 if labels.any() else math.nan,
        "F1": defined(f1_score, labels, scores >= 0.5),
        "IoU": defined(jaccard_score, labels, scores >= 0.5),
        "imageF1": defined(f1_score, image_true, image_pred),
    }


def _run(tiny, output_dir=None, drop_files=False):
    records, _, predictions = tiny
    evaluator = LesionSemanticEvaluator(TINY, output_dir)
    evaluator.reset()
    for record, prediction in zip(records, predictions):
        inputs = {k: v for k, v in record.items() if not (drop_files and k == "sem_seg_files")}
        evaluator.process([inputs], [{"sem_seg": torch.from_numpy(prediction).float()}])
    return evaluator.evaluate()


def _same(a, b):
    """Equal metric dicts, NaN equal to NaN."""
    return a.keys() == b.keys() and all(
        a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a
    )


def test_numbers_equal_sklearn_on_the_valid_pixels(tiny, tmp_path):
    _, targets, predictions = tiny
    results = _run(tiny, tmp_path)["sem_seg"]
    # float32 predictions, as a model gives them: sklearn sees the same values.
    predictions = [p.astype(np.float32) for p in predictions]
    means = {"AUCPR": [], "F1": [], "IoU": [], "imageF1": []}
    for c, lesion in enumerate(LESIONS):
        expected = _sklearn_metrics(targets, predictions, c)
        for name, value in expected.items():
            assert results[f"{name}-{lesion}"] == pytest.approx(value, abs=1e-9, nan_ok=True), name
            if not math.isnan(value):
                means[name].append(value)
        assert results[f"AP-{lesion}"] == pytest.approx(expected["AUCPR"], nan_ok=True)
        assert results[f"Dice-{lesion}"] == pytest.approx(expected["F1"], nan_ok=True)
    assert math.isnan(results["AUCPR-hard exudate"])  # never positive
    assert results["mAUCPR"] == pytest.approx(np.mean(means["AUCPR"]))
    assert results["mF1"] == pytest.approx(np.mean(means["F1"]))
    assert results["mIoU"] == pytest.approx(np.mean(means["IoU"]))
    assert results["mImageF1"] == pytest.approx(np.mean(means["imageF1"]))


def test_ignore_pixels_and_unannotated_lesions_take_no_part(tiny):
    """Changing predictions where targets are 255 (or where a lesion has no PNG) changes
    nothing; changing one valid pixel does."""
    records, targets, predictions = tiny
    before = _run(tiny)["sem_seg"]
    scrambled = [np.where(t == 255, 1.0 - p, p) for t, p in zip(targets, predictions)]
    assert _same(_run((records, targets, scrambled))["sem_seg"], before)
    moved = [p.copy() for p in predictions]
    valid = np.argwhere(targets[1][1] != 255)[0]
    moved[1][1][tuple(valid)] = 1.0 - moved[1][1][tuple(valid)]
    assert not _same(_run((records, targets, moved))["sem_seg"], before)


def test_targets_come_from_the_catalog_when_the_inputs_lack_them(tiny):
    assert _same(_run(tiny, drop_files=True)["sem_seg"], _run(tiny)["sem_seg"])


def test_writes_strict_json_and_pr_curves(tiny, tmp_path):
    results = _run(tiny, tmp_path)
    written = json.loads((tmp_path / "semantic_metrics.json").read_text())
    assert written["sem_seg"]["AUCPR-hard exudate"] is None
    assert written["sem_seg"]["mAUCPR"] == pytest.approx(results["sem_seg"]["mAUCPR"])
    # The PR curves as numbers for the report (no picture): lesions with positive pixels only.
    curves = json.loads((tmp_path / "semantic_pr_curves.json").read_text())
    assert sorted(curves) == ["haemorrhage", "microaneurysm"]
    for lesion, curve in curves.items():
        assert curve["auc_pr"] * 100 == pytest.approx(results["sem_seg"][f"AUCPR-{lesion}"])
        assert len(curve["recall"]) == 101  # recall levels 0, 0.01, .., 1
        assert curve["recall"][0] == 0.0 and curve["recall"][-1] == 1.0
    assert not list(tmp_path.rglob("*.png"))


def test_mismatched_outputs_are_refused(tiny):
    records, _, predictions = tiny
    evaluator = LesionSemanticEvaluator(TINY)
    with pytest.raises(ValueError, match="2 semantic channels but"):
        evaluator.process(records[:1], [{"sem_seg": torch.zeros(2, 6, 8)}])
    with pytest.raises(ValueError, match="not the image's 8x6"):
        evaluator.process(records[:1], [{"sem_seg": torch.zeros(3, 6, 9)}])
    evaluator.process(records[:1], [{"instances": None}])  # a detector's output: nothing to score
    assert evaluator._metrics.num_images == 0


# --------------------------------------------------------------------------------------------
# LesionTrainer's evaluators and tools/train_net.py
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    synthetic.convert(None, root / "synthetic", ConvertOptions(progress=False), count=4, size=128)
    return root


@pytest.fixture(scope="module")
def semantic_run(datasets, tmp_path_factory):
    out = tmp_path_factory.mktemp("semantic_run")
    mp = pytest.MonkeyPatch()
    mp.setenv("RETINA_D2_DATASETS", str(datasets))
    results = train_net.cli(
        ["--config-file", SEMANTIC_INSTANT, "OUTPUT_DIR", str(out)]
        + ["INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MIN_SIZE_TEST", "128"]
    )
    mp.undo()
    return out, results


def test_train_net_trains_and_evaluates_semantic_lesion_net(semantic_run):
    out, _ = semantic_run
    assert (out / "model_final.pth").is_file()
    inference = out / "inference" / "synthetic_seg_val"
    metrics = json.loads((inference / "semantic_metrics.json").read_text())["sem_seg"]
    classes = MetadataCatalog.get("synthetic_seg_val").thing_classes
    assert {f"AUCPR-{c}" for c in classes} | {"mAUCPR", "mF1", "mIoU"} <= set(metrics)
    assert not (inference / "instance_metrics.json").exists()
    assert (inference / "semantic_pr_curves.json").is_file()
    assert list((inference / "report" / "figures").glob("pr_*.png"))  # drawn by the report


def test_trainer_picks_evaluators_by_what_the_model_outputs(semantic_run, tmp_path):
    def kinds(**overrides):
        cfg = get_retina_cfg()
        cfg.merge_from_file(MASKRCNN_INSTANT)
        for key, value in overrides.items():
            cfg.merge_from_list([key, value])
        evaluators = LesionTrainer.build_evaluator(cfg, "synthetic_seg_val", str(tmp_path))
        return [type(e) for e in evaluators._evaluators]

    # The synthetic configs also score FROC.
    assert kinds() == [LesionInstanceEvaluator, LesionFROCEvaluator, OverlayEvaluator]
    assert kinds(**{"RETINA.EVAL.FROC_ENABLED": False}) == [
        LesionInstanceEvaluator, OverlayEvaluator]
    assert kinds(**{"MODEL.LESION_SEG.ENABLED": True}) == [
        LesionInstanceEvaluator,
        LesionFROCEvaluator,
        OverlayEvaluator,
        LesionSemanticEvaluator,
    ]
    assert kinds(**{"MODEL.META_ARCHITECTURE": "SemanticLesionNet"}) == [LesionSemanticEvaluator]


def test_train_net_trains_lesion_rcnn_with_a_semantic_head(
    semantic_run, datasets, monkeypatch, tmp_path
):
    monkeypatch.setenv("RETINA_D2_DATASETS", str(datasets))
    semantic_head = {
        "MODEL.LESION_SEG.ENABLED": "True",
        "MODEL.SEM_SEG_HEAD.NAME": "LesionFPNSemHead",
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES": "5",
        "MODEL.SEM_SEG_HEAD.CONVS_DIM": "32",
        "INPUT.MIN_SIZE_TRAIN": "(128,)",
        "INPUT.MIN_SIZE_TEST": "128",
        "OUTPUT_DIR": str(tmp_path),
    }
    opts = [item for pair in semantic_head.items() for item in pair]
    results = train_net.cli(["--config-file", MASKRCNN_INSTANT, *opts])
    inference = tmp_path / "inference" / "synthetic_seg_val"
    assert (inference / "instance_metrics.json").is_file()
    assert (inference / "semantic_metrics.json").is_file()
    assert {"segm", "sem_seg"} <= set(results)
