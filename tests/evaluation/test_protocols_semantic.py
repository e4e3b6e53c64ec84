"""The semantic protocols (argmax_dice, pr_operating_point, component_ap): hand-worked cases,
scikit-learn on random maps, and the evaluator interface on a tiny registered dataset."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, jaccard_score

from detectron2.data import DatasetCatalog, MetadataCatalog

from retina_d2.config import get_retina_cfg
from retina_d2.evaluation.protocols import (
    ArgmaxDiceEvaluator,
    ArgmaxSegmentationMetrics,
    ComponentAPEvaluator,
    ComponentAPMetrics,
    OperatingPointEvaluator,
    OperatingPointMetrics,
    build_protocol_evaluators,
)
from retina_d2.evaluation.protocols.semantic import class_labels

LESIONS = ["microaneurysm", "hard exudate"]
BG, MA_P, EX_P = [0.1, 0.1], [0.7, 0.1], [0.1, 0.7]


def probs_of(classes):
    """(2, H, W) probabilities whose argmax (background = 1 - sum) is ``classes``."""
    table = np.array([BG, MA_P, EX_P])
    return np.moveaxis(table[np.asarray(classes)], -1, 0)


def targets_of(classes):
    """(2, H, W) 0 / 1 targets of a class map (0 = background)."""
    classes = np.asarray(classes)
    return np.stack([(classes == 1), (classes == 2)]).astype(np.uint8)


# --- argmax_dice ---------------------------------------------------------------------------------


def test_argmax_hand_worked():
    truth = [[0, 1, 2], [0, 0, 2]]
    predicted = [[0, 1, 1], [1, 0, 2]]
    metrics = ArgmaxSegmentationMetrics(LESIONS, size=0)
    metrics.update(probs_of(predicted), targets_of(truth))
    m = metrics.compute()
    # MA: TP 1, FP 2, FN 0 -> Dice 2/4, IoU 1/3. EX: TP 1, FP 0, FN 1 -> Dice 2/3, IoU 1/2.
    assert m["Dice-microaneurysm"] == pytest.approx(50.0)
    assert m["IoU-microaneurysm"] == pytest.approx(100 / 3)
    assert m["Dice-hard exudate"] == pytest.approx(200 / 3)
    assert m["IoU-hard exudate"] == pytest.approx(50.0)
    assert m["mDice"] == pytest.approx((50 + 200 / 3) / 2)  # background left out
    assert m["mIoU"] == pytest.approx((100 / 3 + 50) / 2)
    assert m["pixel_accuracy"] == pytest.approx(400 / 6)  # background counted: 4 of 6 right


def test_argmax_ignore_pixels_and_overlaps():
    targets = targets_of([[1, 0], [2, 0]])
    targets[:, 0, 1] = 255  # unknown: left out
    targets[1, 0, 0] = 1  # MA and EX both: the first lesion (MA) wins
    metrics = ArgmaxSegmentationMetrics(LESIONS, size=0)
    metrics.update(probs_of([[1, 2], [2, 0]]), targets)
    m = metrics.compute()
    assert m["Dice-microaneurysm"] == 100 and m["Dice-hard exudate"] == 100
    assert m["pixel_accuracy"] == 100


def test_class_labels_follow_resunet_training_targets():
    from retina_d2.modeling.semantic.resunet import softmax_class_targets

    rng = np.random.default_rng(0)
    targets = rng.choice(np.array([0, 1, 255], np.uint8), size=(5, 3, 16, 16), p=[.6, .3, .1])
    for image in targets:
        expected = softmax_class_targets(torch.from_numpy(image[None]))[0].numpy()
        np.testing.assert_array_equal(class_labels(image), expected)


def random_case(rng, count=6, shape=(12, 10), lesions=3):
    probs, targets = [], []
    for _ in range(count):
        logits = rng.normal(size=(lesions + 1,) + shape) * 2
        p = np.exp(logits) / np.exp(logits).sum(axis=0)
        truth = rng.integers(0, lesions + 1, size=shape)
        t = np.stack([(truth == k + 1) for k in range(lesions)]).astype(np.uint8)
        t[:, rng.random(shape) < 0.05] = 255  # a few unknown pixels
        probs.append(p[1:])
        targets.append(t)
    return probs, targets


def sklearn_rates(probs, targets, lesions):
    truth = np.concatenate([class_labels(t).ravel() for t in targets])
    predicted = np.concatenate([np.argmax(np.concatenate([1 - p.sum(0, keepdims=True), p]), 0)
                                .ravel() for p in probs])
    keep = truth != 255
    truth, predicted = truth[keep], predicted[keep]
    labels = list(range(1, lesions + 1))
    dice = f1_score(truth, predicted, labels=labels, average=None)
    iou = jaccard_score(truth, predicted, labels=labels, average=None)
    return dice, iou, accuracy_score(truth, predicted)


def test_argmax_equals_sklearn_pooled_and_per_batch():
    rng = np.random.default_rng(1)
    names = ["a", "b", "c"]
    for _ in range(5):
        probs, targets = random_case(rng)
        pooled = ArgmaxSegmentationMetrics(names, size=0)
        batched = ArgmaxSegmentationMetrics(names, size=0, reduction="per_batch", batch_size=4)
        for p, t in zip(probs, targets):
            pooled.update(p, t)
            batched.update(p, t)
        dice, iou, accuracy = sklearn_rates(probs, targets, 3)
        m = pooled.compute()
        for k, name in enumerate(names):
            assert m[f"Dice-{name}"] == pytest.approx(dice[k] * 100)
            assert m[f"IoU-{name}"] == pytest.approx(iou[k] * 100)
        assert m["mDice"] == pytest.approx(np.mean(dice) * 100)
        assert m["pixel_accuracy"] == pytest.approx(accuracy * 100)
        # Batches of 4: images 0-3 and 4-5, each by sklearn, then averaged.
        batches = [sklearn_rates(probs[s], targets[s], 3) for s in (slice(0, 4), slice(4, 6))]
        m = batched.compute()
        assert m["mDice"] == pytest.approx(np.mean([np.mean(b[0]) for b in batches]) * 100)
        assert m["mIoU"] == pytest.approx(np.mean([np.mean(b[1]) for b in batches]) * 100)
        assert m["pixel_accuracy"] == pytest.approx(np.mean([b[2] for b in batches]) * 100)
        assert m["Dice-b"] == pytest.approx(np.mean([b[0][1] for b in batches]) * 100)


def test_argmax_resizes_both_maps_to_the_paper_size():
    # A 2x2 microaneurysm block in an 8x8 image at 4 px: one pixel of probability 1 (area
    # average), and the nearest-neighbour target keeps one lesion pixel there.
    classes = np.zeros((8, 8), int)
    classes[:2, :2] = 1
    metrics = ArgmaxSegmentationMetrics(LESIONS, size=4)
    metrics.update(probs_of(classes), targets_of(classes))
    assert metrics.compute()["Dice-microaneurysm"] == 100
    # A prediction one block off is a miss at 4 px.
    shifted = np.roll(classes, 2, axis=1)
    metrics.reset()
    metrics.update(probs_of(shifted), targets_of(classes))
    assert metrics.compute()["Dice-microaneurysm"] == 0


def test_argmax_bad_arguments():
    with pytest.raises(ValueError, match="reduction"):
        ArgmaxSegmentationMetrics(LESIONS, reduction="mean")
    with pytest.raises(ValueError, match="C = 2"):
        ArgmaxSegmentationMetrics(LESIONS).update(np.zeros((3, 4, 4)), np.zeros((3, 4, 4)))


# --- pr_operating_point --------------------------------------------------------------------------

SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
LABELS = np.array([1, 0, 1, 1, 0, 0])


def operating_point(threshold=None, **options):
    metrics = OperatingPointMetrics(["microaneurysm"], threshold=threshold, exact=True, **options)
    metrics.update(SCORES.reshape(1, 1, 6), LABELS.reshape(1, 1, 6).astype(np.uint8))
    return metrics.compute()


def test_break_even_point_by_hand():
    # Thresholds 0.9, 0.8, 0.7: P 1, 1/2, 2/3 and R 1/3, 1/3, 2/3 -> equal at 0.7.
    m = operating_point()
    assert m["precision-microaneurysm"] == pytest.approx(200 / 3)
    assert m["recall-microaneurysm"] == pytest.approx(200 / 3)
    assert m["threshold-microaneurysm"] == pytest.approx(0.7)
    assert m["AUCPR-microaneurysm"] == pytest.approx(average_precision_score(LABELS, SCORES) * 100)
    assert m["mPrecision"] == m["precision-microaneurysm"]


def test_fixed_operating_point_by_hand():
    m = operating_point(0.5)  # 5 pixels >= 0.5, 3 of them lesion, all 3 lesion pixels found
    assert m["precision-microaneurysm"] == pytest.approx(60.0)
    assert m["recall-microaneurysm"] == pytest.approx(100.0)
    assert m["threshold-microaneurysm"] == 0.5


def test_operating_point_scores_only_the_named_lesions():
    metrics = OperatingPointMetrics(LESIONS, scored_lesions=["hard exudate"])
    metrics.update(np.full((2, 2, 2), 0.5), np.ones((2, 2, 2), np.uint8))
    assert [k for k in metrics.compute() if k.endswith("microaneurysm")] == []
    with pytest.raises(ValueError, match="not among"):
        OperatingPointMetrics(LESIONS, scored_lesions=["drusen"])


def test_binned_break_even_is_close_to_exact_on_random_maps():
    rng = np.random.default_rng(2)
    labels = (rng.random((1, 50, 50)) < 0.2).astype(np.uint8)
    scores = np.clip(rng.normal(0.3 + 0.3 * labels, 0.2), 0, 1)
    exact = OperatingPointMetrics(["x"], exact=True)
    binned = OperatingPointMetrics(["x"])
    for m in (exact, binned):
        m.update(scores, labels)
    e, b = exact.compute(), binned.compute()
    assert abs(e["precision-x"] - e["recall-x"]) < 1.0  # a real break-even point
    assert b["precision-x"] == pytest.approx(e["precision-x"], abs=0.5)
    assert b["AUCPR-x"] == pytest.approx(average_precision_score(labels.ravel(),
                                                                 scores.ravel()) * 100, abs=0.1)


# --- component_ap --------------------------------------------------------------------------------


def component_case():
    """One lesion type, 20x20: two 2x2 lesions; one found exactly (0.9), one missed, and a 2x2
    false alarm (0.8)."""
    target = np.zeros((1, 20, 20), np.uint8)
    target[0, 2:4, 2:4] = 1
    target[0, 10:12, 10:12] = 1
    probs = np.zeros((1, 20, 20))
    probs[0, 2:4, 2:4] = 0.9
    probs[0, 15:17, 2:4] = 0.8
    return probs, target


def test_component_ap_by_hand():
    probs, target = component_case()
    metrics = ComponentAPMetrics(["microaneurysm"], size=0, exact=True)
    metrics.update(probs, target)
    m = metrics.compute()
    # At every IoU in 0.50..0.95: the hit ranks first, so precision is 1 up to recall 1/2 and
    # then undefined: COCO's 101 recall points give 51 / 101.
    assert m["AP-microaneurysm"] == pytest.approx(51 / 101 * 100)
    assert m["mAP"] == m["AP-microaneurysm"]
    # Pixels at 0.5: 4 right, 4 false, 4 missed -> IoU 4 / 12.
    assert m["IoU-microaneurysm"] == pytest.approx(100 / 3)
    expected = average_precision_score(target.ravel(), probs.ravel()) * 100
    assert m["AUCPR-microaneurysm"] == pytest.approx(expected)


def test_component_ap_averages_precision_over_iou_050_to_095():
    # A 1x10 lesion predicted one pixel to the right: IoU 9 / 11 = 0.82, a hit at 0.50..0.80
    # (7 of the 10 thresholds) -> AP 70.
    target = np.zeros((1, 5, 20), np.uint8)
    target[0, 2, 3:13] = 1
    probs = np.zeros((1, 5, 20))
    probs[0, 2, 4:14] = 0.7
    metrics = ComponentAPMetrics(["haemorrhage"], size=0)
    metrics.update(probs, target)
    assert metrics.compute()["AP-haemorrhage"] == pytest.approx(70.0)


def test_component_ap_skips_unannotated_lesions_and_ignore_pixels():
    probs, target = component_case()
    probs = np.concatenate([probs, probs])
    target = np.concatenate([target, np.full_like(target, 255)])  # second lesion not annotated
    target[0, 15:17, 2:4] = 255  # the false alarm lies on unknown pixels
    metrics = ComponentAPMetrics(["microaneurysm", "haemorrhage"], size=0)
    metrics.update(probs, target)
    m = metrics.compute()
    # The false alarm on unknown pixels is gone; the found and the missed lesion remain.
    assert m["AP-microaneurysm"] == pytest.approx(51 / 101 * 100)
    assert math.isnan(m["AP-haemorrhage"]) and math.isnan(m["IoU-haemorrhage"])
    assert m["mAP"] == m["AP-microaneurysm"]


def test_component_ap_resizes_to_the_paper_size():
    probs, target = component_case()
    big_probs = np.kron(probs, np.ones((1, 2, 2)))  # 40x40, every lesion 4x4
    big_target = np.kron(target, np.ones((1, 2, 2), np.uint8))
    at_20 = ComponentAPMetrics(["microaneurysm"], size=20)
    at_20.update(big_probs, big_target)
    native = ComponentAPMetrics(["microaneurysm"], size=0)
    native.update(probs, target)
    assert at_20.compute()["AP-microaneurysm"] == pytest.approx(
        native.compute()["AP-microaneurysm"])
    assert at_20.images[0][:2] == (20, 20)


# --- the evaluators ------------------------------------------------------------------------------

TINY = "test_protocols_semantic_tiny"


@pytest.fixture
def tiny(tmp_path):
    rng = np.random.default_rng(3)
    records, probs = [], []
    for index in range(5):
        classes = rng.integers(0, 3, size=(16, 24))
        classes[:4] = 0
        target = targets_of(classes)
        files = {}
        for c, lesion in enumerate(LESIONS):
            files[lesion] = str(tmp_path / f"{index}_{c}.png")
            Image.fromarray(target[c]).save(files[lesion])
        p = probs_of(np.where(rng.random(classes.shape) < 0.7, classes, 0))
        records.append(dict(file_name=str(tmp_path / f"{index}.png"), image_id=index,
                            height=16, width=24, sem_seg_files=files))
        probs.append((p, target))
    DatasetCatalog.register(TINY, lambda: records)
    MetadataCatalog.get(TINY).set(thing_classes=LESIONS)
    yield records, probs
    DatasetCatalog.remove(TINY)
    MetadataCatalog.remove(TINY)


def run(evaluator, records, probs):
    evaluator.reset()
    for record, (p, _) in zip(records, probs):
        evaluator.process([record], [{"sem_seg": torch.from_numpy(p).float()}])
    return evaluator.evaluate()


@pytest.mark.parametrize(
    "evaluator_cls, metrics_cls, options",
    [
        (ArgmaxDiceEvaluator, ArgmaxSegmentationMetrics, dict(size=8)),
        (ArgmaxDiceEvaluator, ArgmaxSegmentationMetrics, dict(size=0, reduction="per_batch")),
        (OperatingPointEvaluator, OperatingPointMetrics, dict(threshold=0.5)),
        (OperatingPointEvaluator, OperatingPointMetrics, dict()),
        (ComponentAPEvaluator, ComponentAPMetrics, dict(size=12)),
    ],
)
def test_evaluators_equal_their_accumulators(tiny, tmp_path, evaluator_cls, metrics_cls,
                                             options):
    records, probs = tiny
    evaluator = evaluator_cls(TINY, str(tmp_path / "eval"), distributed=False, **options)
    got = run(evaluator, records, probs)[evaluator.protocol]
    direct = metrics_cls(LESIONS, **options)
    for p, t in probs:
        direct.update(p.astype(np.float32), t)
    expected = direct.compute()
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, nan_ok=True), key
    written = json.loads((tmp_path / "eval" / f"{evaluator.protocol}_metrics.json").read_text())
    assert list(written[evaluator.protocol]) == list(expected)


def semantic_cfg(protocols):
    cfg = get_retina_cfg()
    cfg.MODEL.META_ARCHITECTURE = "SemanticLesionNet"
    cfg.RETINA.EVAL.PROTOCOLS = list(protocols)
    cfg.RETINA.EVAL.ARGMAX_SIZE = 8
    cfg.RETINA.EVAL.OPERATING_POINT = 0.4
    cfg.RETINA.EVAL.COMPONENT_AP_SIZE = 12
    return cfg


def test_protocols_are_built_from_the_config(tiny):
    cfg = semantic_cfg(["argmax_dice", "pr_operating_point", "component_ap"])
    built = build_protocol_evaluators(cfg, TINY)
    assert [type(e) for e in built] == [ArgmaxDiceEvaluator, OperatingPointEvaluator,
                                        ComponentAPEvaluator]
    assert built[0]._metrics.size == 8 and built[1]._metrics.threshold == 0.4
    assert built[2]._metrics.size == 12


def test_red_seg_config_scores_its_two_lesions(tiny):
    cfg = semantic_cfg(["pr_operating_point"])
    cfg.MODEL.SEM_SEG_HEAD.NAME = "RedSegHead"
    cfg.MODEL.RED_SEG.LESIONS = ["microaneurysm"]
    (evaluator,) = build_protocol_evaluators(cfg, TINY)
    assert evaluator._metrics.scored == ["microaneurysm"]


@pytest.mark.parametrize(
    "protocols, arch, message",
    [
        (["per_image_map"], "SemanticLesionNet", "scores lesion instances"),
        (["argmax_dice"], "LesionRCNN", "scores semantic lesion maps"),
        (["mAP"], "SemanticLesionNet", "unknown protocol 'mAP'"),
    ],
)
def test_protocols_the_model_cannot_feed_are_refused(tiny, protocols, arch, message):
    cfg = semantic_cfg(protocols)
    cfg.MODEL.META_ARCHITECTURE = arch
    with pytest.raises(ValueError, match=f"RETINA.EVAL.PROTOCOLS: .*{message}"):
        build_protocol_evaluators(cfg, TINY)


def test_trainer_adds_the_configured_protocols(tiny, tmp_path):
    from retina_d2.engine.trainer import LesionTrainer
    from retina_d2.evaluation import LesionSemanticEvaluator

    cfg = semantic_cfg(["argmax_dice", "component_ap"])
    cfg.OUTPUT_DIR = str(tmp_path)
    built = LesionTrainer.build_evaluator(cfg, TINY)._evaluators
    assert [type(e) for e in built] == [LesionSemanticEvaluator, ArgmaxDiceEvaluator,
                                        ComponentAPEvaluator]
    cfg.RETINA.EVAL.PROTOCOLS = []
    assert [type(e) for e in LesionTrainer.build_evaluator(cfg, TINY)._evaluators] == [
        LesionSemanticEvaluator]
