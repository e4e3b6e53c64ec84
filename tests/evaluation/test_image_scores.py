"""An eye's score from its lesions (retina_d2/evaluation/image_scores.py), by hand."""
import pytest

from retina_d2.evaluation.image_scores import check_top_k, image_score, image_scores


def test_top_1_is_the_best_lesion():
    assert image_score([0.2, 0.9, 0.4]) == 0.9
    assert image_score([]) == 0.0


def test_top_k_is_the_mean_of_the_k_best_with_missing_lesions_counting_zero():
    assert image_score([0.2, 0.9, 0.4], top_k=2) == pytest.approx((0.9 + 0.4) / 2)
    # Two lesions, k = 4: the two missing ones count 0.
    assert image_score([0.8, 0.6], top_k=4) == pytest.approx((0.8 + 0.6) / 4)


def test_top_k_ranks_several_findings_above_one_confident_reflection():
    # The case it exists for: a healthy eye with one bright reflection scoring 0.95 and an eye
    # with four moderate exudates. The best lesion ranks the healthy eye first; k = 3 does not.
    healthy, exudates = [0.95, 0.1], [0.7, 0.65, 0.6, 0.55]
    assert image_score(healthy) > image_score(exudates)
    assert image_score(healthy, 3) < image_score(exudates, 3)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_k_is_refused(bad):
    with pytest.raises(ValueError, match="top_k"):
        image_score([0.5], bad)
    with pytest.raises(ValueError, match=r"^RETINA.COMPONENTS.IMAGE_SCORE_TOP_K of a.yaml must be"):
        check_top_k(bad, "RETINA.COMPONENTS.IMAGE_SCORE_TOP_K of a.yaml")
    assert check_top_k(3.0) == 3


def test_image_scores_of_coco_results_per_image_and_category():
    results = [
        {"image_id": 1, "category_id": 3, "score": 0.9},
        {"image_id": 1, "category_id": 3, "score": 0.5},
        {"image_id": 1, "category_id": 1, "score": 0.99},  # another lesion type: not counted
        {"image_id": 2, "category_id": 3, "score": 0.3},
        {"image_id": 7, "category_id": 3, "score": 0.8},  # an image not asked for
    ]
    assert image_scores(results, [1, 2, 3], category_id=3, top_k=2) == {
        1: pytest.approx(0.7), 2: pytest.approx(0.15), 3: 0.0,
    }
