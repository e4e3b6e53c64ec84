"""Semantic lesion metrics: hand-worked cases, scikit-learn on the same pooled pixels (AP, F1,
Jaccard), the binned AUC-PR against the exact one, ignore pixels, merging and the PR curves
written for the report."""
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, jaccard_score
from sklearn.metrics import precision_recall_curve

from retina_d2.evaluation.semantic_metrics import (
    IGNORE_VALUE,
    PR_RECALL_LEVELS,
    SemanticLesionMetrics,
    average_precision,
    binned_average_precision,
    sample_pr_curve,
    score_bins,
)

LESIONS = ("microaneurysm", "haemorrhage", "hard exudate")


def _random_images(seed, num_images=4, shape=(30, 40), ignore_fraction=0.1):
    """Per-lesion probability maps correlated with sparse random targets, and ignore masks."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(num_images):
        c, (h, w) = len(LESIONS), shape
        targets = (rng.random((c, h, w)) < rng.uniform(0.02, 0.2, (c, 1, 1))).astype(np.uint8)
        probs = np.clip(rng.normal(0.3 + 0.35 * targets, 0.2), 0, 1)
        ignore = rng.random((h, w)) < ignore_fraction
        images.append((probs, targets, ignore))
    return images


def _pooled(images, lesion):
    """Valid scores and labels of one lesion over all images, as sklearn gets them."""
    scores = np.concatenate([p[lesion][~ig] for p, _, ig in images])
    labels = np.concatenate([t[lesion][~ig] for _, t, ig in images])
    return scores, labels


def _accumulate(images, **kwargs):
    metrics = SemanticLesionMetrics(LESIONS, **kwargs)
    for probs, targets, ignore in images:
        metrics.update(probs, targets, ignore)
    return metrics


# --- average precision ---------------------------------------------------------------------------


def test_average_precision_by_hand():
    # Descending scores 0.9 (+), 0.8 (-), 0.7 (+), 0.6 (-):
    # R = [1/2, 1/2, 1, 1], P = [1, 1/2, 2/3, 1/2] -> AP = 1/2 * 1 + 0 + 1/2 * 2/3 + 0 = 5/6.
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    labels = np.array([1, 0, 1, 0])
    assert average_precision(scores, labels) == pytest.approx(5 / 6)
    # Ten bins: every score on an edge, so the histograms give the same 5/6.
    bins = score_bins(scores, 10)
    assert bins.tolist() == [9, 8, 7, 6]
    pos = np.bincount(bins[labels == 1], minlength=10)
    neg = np.bincount(bins[labels == 0], minlength=10)
    assert binned_average_precision(pos, neg) == pytest.approx(5 / 6)
    # A tie between a positive and a negative at 0.8 is one threshold. Descending:
    # 0.9 (+) -> R 1/3, P 1; 0.8 (+, -) -> R 2/3, P 2/3; 0.1 (+) -> R 1, P 3/4.
    # AP = 1/3 + 1/3 * 2/3 + 1/3 * 3/4 = (12 + 8 + 9) / 36 = 29/36.
    tied = average_precision(np.array([0.9, 0.8, 0.8, 0.1]), np.array([1, 1, 0, 1]))
    assert tied == pytest.approx(29 / 36)
    assert math.isnan(average_precision(scores, np.zeros(4)))


@pytest.mark.parametrize("seed", range(4))
def test_exact_average_precision_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(3000) < 0.1
    scores = rng.random(3000) * 0.7 + 0.3 * labels
    if seed % 2:  # many ties
        scores = np.round(scores, 2)
    assert average_precision(scores, labels) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )


def test_score_bins_put_edges_in_their_own_bin():
    num_bins = 10000
    edges = np.arange(num_bins + 1) / num_bins
    expected = np.minimum(np.arange(num_bins + 1), num_bins - 1)
    assert (score_bins(edges, num_bins) == expected).all()
    just_below = np.nextafter(edges[1:], 0)
    assert (score_bins(just_below, num_bins) == np.arange(num_bins)).all()


def test_binned_auc_pr_is_close_to_sklearn_on_random_data():
    images = _random_images(0, num_images=6, shape=(80, 100))
    metrics = _accumulate(images).compute()
    for index, lesion in enumerate(LESIONS):
        reference = average_precision_score(*_pooled(images, index)[::-1])
        assert abs(metrics[f"AUC-PR-{lesion}"] - reference) < 1e-3
        assert metrics[f"AP-{lesion}"] == metrics[f"AUC-PR-{lesion}"]


def test_binned_auc_pr_is_exact_on_bin_edges():
    rng = np.random.default_rng(1)
    num_bins = 10000
    images = [
        (rng.integers(0, num_bins + 1, (3, 30, 40)) / num_bins, t, ig)
        for _, t, ig in _random_images(1)
    ]
    binned = _accumulate(images, num_bins=num_bins).compute()
    exact = _accumulate(images, exact=True).compute()
    for index, lesion in enumerate(LESIONS):
        reference = average_precision_score(*_pooled(images, index)[::-1])
        assert binned[f"AUC-PR-{lesion}"] == pytest.approx(reference, abs=1e-12)
        assert exact[f"AUC-PR-{lesion}"] == pytest.approx(reference, abs=1e-12)


def test_exact_path_matches_sklearn_on_continuous_scores():
    images = _random_images(2)
    metrics = _accumulate(images, exact=True)
    results = metrics.compute()
    for index, lesion in enumerate(LESIONS):
        scores, labels = _pooled(images, index)
        reference = average_precision_score(labels, scores)
        assert results[f"AUC-PR-{lesion}"] == pytest.approx(reference, abs=1e-12)
        # The stored curve integrates to the same number.
        precision, recall, thresholds = metrics.pr_curve(index)
        assert np.all(np.diff(thresholds) < 0)
        assert np.sum(np.diff(recall, prepend=0) * precision) == pytest.approx(reference)


# --- threshold metrics ---------------------------------------------------------------------------


def test_pixel_f1_dice_iou_match_sklearn_and_ignore_pixels_are_excluded():
    images = _random_images(3)
    results = _accumulate(images).compute()
    f1s, ious = [], []
    for index, lesion in enumerate(LESIONS):
        scores, labels = _pooled(images, index)
        predicted = scores >= 0.5
        f1s.append(f1_score(labels, predicted))
        ious.append(jaccard_score(labels, predicted))
        assert results[f"F1-{lesion}"] == pytest.approx(f1s[-1], abs=1e-12)
        assert results[f"Dice-{lesion}"] == results[f"F1-{lesion}"]
        assert results[f"IoU-{lesion}"] == pytest.approx(ious[-1], abs=1e-12)
    assert results["mF1"] == pytest.approx(np.mean(f1s))
    assert results["mDice"] == results["mF1"]
    assert results["mIoU"] == pytest.approx(np.mean(ious))
    aps = [results[f"AUC-PR-{lesion}"] for lesion in LESIONS]
    assert results["mAUC-PR"] == results["mAP"] == pytest.approx(np.mean(aps))

    # Anything under the ignore pixels (scores, targets) changes nothing.
    rng = np.random.default_rng(9)
    scrambled = []
    for probs, targets, ignore in images:
        probs, targets = probs.copy(), targets.copy()
        probs[:, ignore] = rng.random((3, int(ignore.sum())))
        targets[:, ignore] = rng.integers(0, 2, (3, int(ignore.sum())))
        scrambled.append((probs, targets, ignore))
    assert _accumulate(scrambled).compute() == results
    # The ignore value in the targets is the same as the mask.
    as_value = []
    for probs, targets, ignore in scrambled:
        targets = targets.copy()
        targets[:, ignore] = IGNORE_VALUE
        as_value.append((probs, targets, None))
    assert _accumulate(as_value).compute() == results


def test_threshold_metrics_by_hand():
    # One lesion, 2x3 pixels, the last one ignored (its score 0.99 would be a false positive).
    # Scores  [0.9, 0.5, 0.2 / 0.7, 0.1, 0.99]; targets [1, 0, 1 / 1, 0, ignore].
    # At >= 0.5: TP = 2 (0.9, 0.7), FP = 1 (0.5), FN = 1 (0.2):
    #   F1 = Dice = 4 / (4 + 1 + 1) = 2/3, IoU = 2 / 4 = 1/2.
    # AP: 0.9 (+) R 1/3 P 1; 0.7 (+) R 2/3 P 1; 0.5 (-) P 2/3; 0.2 (+) R 1, P 3/4; 0.1 (-).
    #   AP = 1/3 + 1/3 + 1/3 * 3/4 = 11/12.
    metrics = SemanticLesionMetrics(["microaneurysm"], num_bins=10)
    probs = np.array([[[0.9, 0.5, 0.2], [0.7, 0.1, 0.99]]])
    targets = np.array([[[1, 0, 1], [1, 0, IGNORE_VALUE]]], dtype=np.uint8)
    metrics.update(probs, targets)
    results = metrics.compute()
    assert results["F1-microaneurysm"] == pytest.approx(2 / 3)
    assert results["IoU-microaneurysm"] == pytest.approx(1 / 2)
    assert results["AUC-PR-microaneurysm"] == pytest.approx(11 / 12)
    # Image level: max over valid pixels 0.9 >= 0.5 and the lesion is present: one TP -> F1 1.
    assert results["imageF1-microaneurysm"] == 1.0


def test_image_level_f1_by_hand_and_against_sklearn():
    # Four images, one lesion. Global maxima [0.9, 0.2, 0.6, 0.4], lesion present in [1, 1, 0, 0]
    # -> predicted [1, 0, 1, 0]: TP 1, FN 1, FP 1 -> F1 = 2 / (2 + 1 + 1) = 1/2.
    # Image 4: its only high score (0.95) and its only lesion pixel are ignored -> absent, 0.3.
    metrics = SemanticLesionMetrics(["haemorrhage"])
    maxima, present = [0.9, 0.2, 0.6, 0.4], [1, 1, 0, 0]
    for peak, label in zip(maxima, present):
        probs = np.full((1, 4, 4), 0.05)
        probs[0, 1, 2] = peak
        targets = np.zeros((1, 4, 4), dtype=np.uint8)
        targets[0, 3, 3] = label
        metrics.update(probs, targets)
    probs = np.full((1, 4, 4), 0.3)
    probs[0, 0, 0] = 0.95
    targets = np.zeros((1, 4, 4), dtype=np.uint8)
    targets[0, 0, 0] = 1
    ignore = np.zeros((4, 4), dtype=bool)
    ignore[0, 0] = True
    metrics.update(probs, targets, ignore)
    result = metrics.compute()["imageF1-haemorrhage"]
    assert result == pytest.approx(0.5)
    assert result == pytest.approx(f1_score([1, 1, 0, 0, 0], [1, 0, 1, 0, 0]))
    assert metrics.num_images == 5


def test_lesions_without_positives_are_nan_and_skipped_by_the_means():
    metrics = SemanticLesionMetrics(LESIONS[:2])
    probs = np.stack([np.array([[0.9, 0.1]]), np.array([[0.2, 0.1]])])
    targets = np.array([[[1, 0]], [[0, 0]]], dtype=np.uint8)
    metrics.update(probs, targets)
    results = metrics.compute()
    assert results["AUC-PR-microaneurysm"] == 1.0
    assert math.isnan(results["AUC-PR-haemorrhage"])
    assert math.isnan(results["F1-haemorrhage"])  # no TP, FP or FN: undefined
    assert results["mAUC-PR"] == 1.0 and results["mF1"] == 1.0


def test_an_all_ignore_image_adds_nothing():
    images = _random_images(4, num_images=2)
    reference = _accumulate(images).compute()
    probs, targets, _ = _random_images(5, num_images=1)[0]
    with_ignored = images + [(probs, targets, np.ones(targets.shape[1:], dtype=bool))]
    assert _accumulate(with_ignored).compute() == reference


def test_merge_equals_one_accumulator():
    images = _random_images(6, num_images=4)
    for exact in (False, True):
        first, second = _accumulate(images[:2], exact=exact), _accumulate(images[2:], exact=exact)
        first.merge(second)
        assert first.compute() == _accumulate(images, exact=exact).compute()
    with pytest.raises(ValueError, match="merge"):
        first.merge(SemanticLesionMetrics(LESIONS[:1]))


def test_bad_inputs_are_refused():
    metrics = SemanticLesionMetrics(LESIONS)
    probs = np.zeros((3, 4, 4))
    with pytest.raises(ValueError, match="3 lesions"):
        metrics.update(np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="do not match"):
        metrics.update(probs, np.zeros((3, 4, 5)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.update(probs - 1, np.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="0, 1 or 255"):
        metrics.update(probs, np.full((3, 4, 4), 2))
    with pytest.raises(ValueError, match="ignore mask"):
        metrics.update(probs, np.zeros((3, 4, 4)), np.zeros((5, 5), dtype=bool))


# --- PR curves as numbers (the report draws them) -------------------------------------------------


def test_sample_pr_curve_hand_worked():
    # Operating points (recall ascending): P 1.0 up to R .25, 0.5 up to .5, 0.4 up to 1.
    precision, recall, thresholds = [1.0, 0.5, 0.4], [0.25, 0.5, 1.0], [0.9, 0.6, 0.2]
    levels, p, t = sample_pr_curve(precision, recall, thresholds, 5)
    assert levels.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert p.tolist() == [1.0, 1.0, 0.5, 0.4, 0.4]
    assert t.tolist() == [0.9, 0.9, 0.6, 0.2, 0.2]
    # Levels above the curve's highest recall are left out.
    levels, p, _ = sample_pr_curve(precision[:2], recall[:2], thresholds[:2], 5)
    assert levels.tolist() == [0.0, 0.25, 0.5] and p.tolist() == [1.0, 1.0, 0.5]
    with pytest.raises(ValueError, match="at least 2 recall levels"):
        sample_pr_curve(precision, recall, thresholds, 1)


def test_pr_curves_are_sklearns_curve_at_101_recall_levels():
    images = _random_images(7, num_images=2)
    for probs, targets, _ in images:
        targets[2] = 0  # no hard exudate anywhere: AUC-PR undefined, no curve
    metrics = _accumulate(images, exact=True)
    curves = metrics.pr_curves()
    assert list(curves) == ["microaneurysm", "haemorrhage"]
    for index, lesion in enumerate(LESIONS[:2]):
        curve = curves[lesion]
        assert curve["auc_pr"] == metrics.compute()[f"AUC-PR-{lesion}"]
        assert curve["recall"] == pytest.approx(np.linspace(0, 1, PR_RECALL_LEVELS).tolist())
        # At each level: the precision of sklearn's highest threshold whose recall reaches it.
        precision, recall, thresholds = precision_recall_curve(*_pooled(images, index)[::-1])
        precision, recall = precision[:-1], recall[:-1]  # sklearn's closing point has no threshold
        for level, p, t in zip(curve["recall"], curve["precision"], curve["threshold"]):
            best = np.flatnonzero(recall >= level).max()
            assert (p, t) == (pytest.approx(precision[best]), pytest.approx(thresholds[best]))
