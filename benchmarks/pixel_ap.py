"""Pixel average precision on a full-size probability map: retina_d2's own AP against
scikit-learn's ``average_precision_score`` (the reference it is tested against).

The question it answers (issue 15): is the hand-written AP of
``retina_d2/evaluation/semantic_metrics.py`` worth keeping beside a maintained library? Three
ways of scoring one lesion map of a full-size photograph (default 2196 x 1958, the size of a
HEI-MED image) are timed on the same synthetic map:

- ``sklearn``: ``sklearn.metrics.average_precision_score(labels, scores)``;
- ``exact``: :func:`~retina_d2.evaluation.semantic_metrics.average_precision` (the
  ``exact=True`` path of the evaluator), the same number;
- ``binned``: what the evaluator does by default per image and lesion: scores binned into
  10,000 bins, the two histograms added (``SemanticLesionMetrics._add_pixels``), then the AP of
  the histograms. Its memory does not grow with the test set, which neither exact way offers.

Each variant runs in a fresh process (:func:`~benchmarks.measure_in_subprocess`), so
its peak memory is its own; the time is the median of ``--repeats`` runs after one warm-up.
"""
import statistics
import time
from pathlib import Path

import numpy as np

from . import REPO_ROOT, format_table, machine_info, measure_in_subprocess

__all__ = ["VARIANTS", "synthetic_lesion_map", "time_variant", "add_arguments", "run"]

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "pixel_ap.json"
VARIANTS = ("sklearn", "exact", "binned")


def synthetic_lesion_map(height: int, width: int, seed: int = 0):
    """(scores float32 (H, W) in [0, 1], labels bool (H, W)): ~1% of the pixels in round lesions
    scoring higher on average, every score distinct-valued as a network's float32 output is."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((height, width), bool)
    yy, xx = np.ogrid[:height, :width]
    target = 0.01 * height * width
    while labels.sum() < target:
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        radius = rng.integers(2, 25)
        labels |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    noise = rng.random((height, width), dtype=np.float32)
    scores = np.where(labels, 0.35 + 0.65 * noise, 0.7 * noise ** 3).astype(np.float32)
    return scores, labels


def _score(variant: str, scores: np.ndarray, labels: np.ndarray) -> float:
    if variant == "sklearn":
        from sklearn.metrics import average_precision_score

        return float(average_precision_score(labels.ravel(), scores.ravel()))
    from retina_d2.evaluation.semantic_metrics import (
        SemanticLesionMetrics,
        average_precision,
    )

    if variant == "exact":
        return average_precision(scores.ravel(), labels.ravel())
    metrics = SemanticLesionMetrics(["lesion"])
    metrics._add_pixels(0, scores.ravel(), labels.ravel())
    return metrics.auc_pr(0)


def time_variant(variant: str, height: int, width: int, repeats: int, seed: int = 0) -> dict:
    """Run in the measured process: AP of one synthetic map by ``variant``, timed."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    scores, labels = synthetic_lesion_map(height, width, seed)
    value = _score(variant, scores, labels)  # warm-up: imports and first-touch allocations
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = _score(variant, scores, labels)
        seconds.append(time.perf_counter() - start)
    return {
        "variant": variant,
        "ap": value,
        "seconds_median": statistics.median(seconds),
        "seconds_min": min(seconds),
        "seconds": seconds,
    }


def add_arguments(parser) -> None:
    parser.add_argument("--height", type=int, default=2196, help="map height in pixels")
    parser.add_argument("--width", type=int, default=1958, help="map width in pixels")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per variant")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON file")


def run(args) -> dict:
    """Time every variant in its own process, write the results file, print a table."""
    from retina_d2.data.converters.base import write_json_atomic

    rows = []
    for variant in VARIANTS:
        row = measure_in_subprocess(
            f"{__name__}:time_variant",
            {"variant": variant, "height": args.height, "width": args.width,
             "repeats": args.repeats},
        )
        row.setdefault("variant", variant)
        rows.append(row)
    by_name = {r["variant"]: r for r in rows}
    reference = by_name["sklearn"]
    for row in rows:
        if "error" in row or "error" in reference:
            continue
        row["speedup_vs_sklearn"] = reference["seconds_median"] / row["seconds_median"]
        row["ap_difference_vs_sklearn"] = row["ap"] - reference["ap"]
    results = {
        "benchmark": "pixel-ap",
        "map": {"height": args.height, "width": args.width, "pixels": args.height * args.width,
                "positive_fraction": "~0.01", "seed": 0},
        "repeats": args.repeats,
        "machine": machine_info(),
        "rows": rows,
        "note": "median seconds of one lesion map's AP after a warm-up run, each variant in a "
                "fresh process; peak_rss_mb is that process's (map included)",
    }
    write_json_atomic(args.out, results, indent=2)
    print(format_table(rows, [
        ("variant", "variant", "s"), ("median s", "seconds_median", ".3f"),
        ("min s", "seconds_min", ".3f"), ("x sklearn", "speedup_vs_sklearn", ".2f"),
        ("AP", "ap", ".6f"), ("AP - sklearn", "ap_difference_vs_sklearn", ".1e"),
        ("peak MB", "peak_rss_mb", ".0f"),
    ]))
    print(f"\nresults: {args.out}")
    return results
