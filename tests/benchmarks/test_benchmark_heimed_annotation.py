"""The annotation audit (benchmarks/heimed_annotation.py): its IoUs against pycocotools and hand
values, the filled-square test and the square placement by hand, and a run on 3 real HEI-MED
photographs checked against an independent reading of the conversion (skipped without
../shared)."""
import argparse
import json

import numpy as np
import pytest
from pycocotools import mask as mask_util

from benchmarks import HEIMED_ROOT
from benchmarks.heimed_annotation import (
    IOUS,
    best_iou_per_instance,
    filled_square_side,
    run,
    square_iou,
    square_offsets,
)


def _coco_iou(a: np.ndarray, b: np.ndarray) -> float:
    rle = [mask_util.encode(np.asfortranarray(m.astype(np.uint8))) for m in (a, b)]
    return float(mask_util.iou([rle[0]], [rle[1]], [0])[0, 0])


def test_filled_square_side_only_for_a_full_square_box():
    assert filled_square_side(np.ones((8, 8), bool)) == 8
    assert filled_square_side(np.ones((8, 7), bool)) == 0  # not square
    holed = np.ones((8, 8), bool)
    holed[3, 3] = False
    assert filled_square_side(holed) == 0  # square box, not filled


def test_best_iou_per_instance_matches_pycocotools_and_a_hand_case():
    instances = np.zeros((20, 20), np.int32)
    instances[0:4, 0:4] = 1  # 16 px
    instances[10:14, 10:14] = 2  # touched by no candidate
    instances[0:2, 15:20] = 3
    candidates = np.zeros((20, 20), np.int32)
    candidates[0:4, 0:2] = 1  # half of instance 1: IoU 8 / 16
    candidates[1:3, 1:3] = 2  # 4 px inside instance 1: IoU 4 / 16
    candidates[0:3, 14:20] = 3  # covers instance 3 (10 px) in 18 px: IoU 10 / 18
    best = best_iou_per_instance(candidates, instances, 3)
    # Candidate 2 overwrote part of candidate 1: the map's own outlines are what counts.
    expected = [max(_coco_iou(candidates == c, instances == i) for c in (1, 2, 3))
                for i in (1, 2, 3)]
    np.testing.assert_allclose(best, expected)
    assert best[1] == 0.0 and best[2] == pytest.approx(10 / 18)


def test_square_iou_by_hand_and_against_pycocotools():
    assert square_iou(8, 0, 0) == 1.0
    assert square_iou(8, 1, 0) == pytest.approx(56 / 72)
    assert square_iou(8, 8, 0) == 0.0 and square_iou(8, 0, -9) == 0.0
    rng = np.random.default_rng(0)
    for dx, dy in rng.integers(-9, 10, size=(20, 2)):
        a = np.zeros((40, 40), bool)
        b = np.zeros((40, 40), bool)
        a[15:23, 15:23] = True
        b[15 + dy:23 + dy, 15 + dx:23 + dx] = True
        assert square_iou(8, int(dx), int(dy)) == pytest.approx(_coco_iou(a, b))


def test_square_offsets_centre_on_the_brightest_pixel_near_the_square():
    contrast = np.zeros((60, 60), np.float32)
    contrast[22, 27] = 0.5  # near the square at (20, 20); its centred square starts at (23, 18)
    contrast[50, 50] = 0.9  # brighter, but more than a side away
    offsets = square_offsets(contrast, [(20, 20, 8), (40, 5, 8)], min_contrast=0.12)
    assert offsets == [(3, -2, 8)]  # the second square has nothing bright near it
    # The square centred on that pixel covers it.
    dx, dy, side = offsets[0]
    assert 20 + dx <= 27 < 20 + dx + side and 20 + dy <= 22 < 20 + dy + side
    assert square_offsets(contrast, [(20, 20, 8)], min_contrast=0.6) == []


@pytest.mark.skipif(not HEIMED_ROOT.is_dir(), reason=f"HEI-MED sample absent: {HEIMED_ROOT}")
def test_audit_on_three_real_photographs_agrees_with_the_conversion(tmp_path):
    out = tmp_path / "audit.json"
    args = argparse.Namespace(root=HEIMED_ROOT, out=out, work=tmp_path / "work", limit=3)
    results = run(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    # An independent count from the conversion's COCO file.
    gt = json.loads((tmp_path / "work" / "heimed" / "val.json").read_text())
    exudate = next(c["id"] for c in gt["categories"] if c["name"] == "hard exudate")
    anns = [a for a in gt["annotations"] if a["category_id"] == exudate and not a.get("iscrowd")]
    squares = {}
    for a in anns:
        w, h = a["bbox"][2:]
        if w == h and a["area"] == w * h:
            squares[str(int(w))] = squares.get(str(int(w)), 0) + 1
    assert results["images"] == 3 and results["exudates"] == len(anns) > 0
    assert results["filled_squares"] == squares and squares
    for group in ("all", "squares", "outlined"):
        floor = results["ceiling"]["floor threshold"][group]
        ladder = results["ceiling"]["any ladder threshold"][group]
        shares = [ladder[f"IoU>={t}"] for t in IOUS]
        assert shares == sorted(shares, reverse=True)  # a stricter IoU matches fewer
        # The ladder holds the floor's threshold: it matches at least what the floor does.
        assert all(ladder[k] >= floor[k] for k in floor)
    placement = results["square_placement"]
    assert 0 < placement["squares_with_a_bright_peak"] <= sum(squares.values())


def test_readme_quotes_the_audit_results():
    from benchmarks import REPO_ROOT

    results = json.loads((REPO_ROOT / "benchmarks/results/heimed_annotation.json").read_text())
    text = " ".join((REPO_ROOT / "README.md").read_text().split())
    ceiling = results["ceiling"]
    floor, ladder = ceiling["floor threshold"], ceiling["any ladder threshold"]
    placement = results["square_placement"]
    dx, dy = placement["median_abs_offset_px"]
    for quoted in (
        f"of {results['exudates']} annotated exudates, {results['filled_square_share']:.1f}% are "
        f"filled squares ({results['filled_squares']['8']} of them 8 x 8 px)",
        f"a median {dx:.1f} / {dy:.1f} px",
        f"IoU >= 0.5 for only {placement['peak_centred_square']['IoU>=0.5']:.1f}% of them",
        f"match {floor['all']['IoU>=0.5']:.1f}% of all exudates at IoU >= 0.5",
        f"({floor['squares']['IoU>=0.5']:.1f}% of the squares, "
        f"{floor['outlined']['IoU>=0.5']:.1f}% of the outlined ones)",
        f"and {ladder['all']['IoU>=0.5']:.1f}% at the best of seven thresholds from "
        f"{results['levels'][0]:.2f} to {results['levels'][-1]:.2f}",
    ):
        assert quoted in text, quoted
    assert len(results["levels"]) == 7 and results["floor_level"] == 0.12
