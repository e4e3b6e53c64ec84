"""An eye's score for a lesion type, from the scores of the lesions found on it.

Screening asks of each photograph "does it show exudates?", and a model that finds lesions
answers with one number per image and lesion type. The usual one is the best lesion's score
(``top_k = 1``). A single bright reflection or drusen on a healthy eye can score as high as a real
exudate, while eyes with exudates usually hold several: the mean of the ``top_k`` best scores
(missing lesions count 0) asks for several confident findings before it calls an eye positive.
Which ``top_k`` ranks eyes best is an empirical question; ``tools/benchmark.py
heimed-exudate-cv`` chooses it by cross-validation and a config ships it as
``RETINA.COMPONENTS.IMAGE_SCORE_TOP_K``.
"""
from typing import Dict, Iterable, Optional, Sequence

import numpy as np

__all__ = ["check_top_k", "image_auc", "image_score", "image_scores"]


def check_top_k(top_k, what: str = "top_k") -> int:
    """``top_k`` as an int, or a ValueError naming ``what`` (e.g. the config key and file) when it
    is not a whole number >= 1."""
    if isinstance(top_k, bool) or not isinstance(top_k, (int, float)) or top_k != int(top_k) \
            or top_k < 1:
        raise ValueError(f"{what} must be a whole number >= 1, got {top_k!r}")
    return int(top_k)


def image_score(scores: Iterable[float], top_k: int = 1) -> float:
    """The mean of the ``top_k`` highest ``scores``, missing ones counting 0 (0 for none)."""
    top_k = check_top_k(top_k)
    best = sorted((float(s) for s in scores), reverse=True)[:top_k]
    return sum(best) / top_k


def image_scores(results: Sequence[dict], image_ids: Iterable[int], category_id: int,
                 top_k: int = 1) -> Dict[int, float]:
    """Every image's :func:`image_score` for ``category_id`` from COCO results (dicts with
    ``image_id``, ``category_id``, ``score``); images in ``image_ids`` without a result get 0."""
    by_image = {image_id: [] for image_id in image_ids}
    for r in results:
        if r["category_id"] == category_id and r["image_id"] in by_image:
            by_image[r["image_id"]].append(r["score"])
    return {image_id: image_score(scores, top_k) for image_id, scores in by_image.items()}


def image_auc(scores: Sequence[float], positive: Sequence[bool]) -> Optional[float]:
    """ROC AUC (a fraction) of image scores against image labels; None when all images are of one
    class (no AUC exists)."""
    from sklearn.metrics import roc_auc_score  # imported here: predict never needs it

    positive = np.asarray(positive, bool)
    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, np.asarray(scores, dtype=np.float64)))
