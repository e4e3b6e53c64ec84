"""tools/benchmark.py tta: differences from the 'off' row, and a quick run end to end on real
HEI-MED photographs (trained for 2 iterations, 2 val images)."""
import json

import pytest

from benchmarks import HEIMED_ROOT, main
from benchmarks.tta import VARIANTS, _add_differences


def test_differences_are_taken_from_the_off_row():
    rows = [
        {"variant": "off", "segm AP50": 10.0, "FROC": None, "infer s / image": 1.0},
        {"variant": "flip", "segm AP50": 12.5, "FROC": 3.0, "infer s / image": 2.5},
    ]
    _add_differences(rows)
    assert rows[0]["d segm AP50"] == 0.0
    assert rows[1]["d segm AP50"] == 2.5 and rows[1]["d infer s / image"] == 1.5
    assert "d FROC" not in rows[1]  # nothing to subtract from
    alone = [{"variant": "flip", "segm AP50": 1.0}]
    _add_differences(alone)
    assert "d segm AP50" not in alone[0]


def test_variants_switch_the_augmentation_through_the_config():
    from retina_d2.config import get_retina_cfg
    from retina_d2.modeling.tta import TestTimeAugmentation, tta_views
    from torch import nn

    views = {}
    for name, opts in VARIANTS.items():
        cfg = get_retina_cfg()
        cfg.MODEL.META_ARCHITECTURE = "SemanticLesionNet"
        cfg.merge_from_list(opts)
        views[name] = TestTimeAugmentation(cfg, nn.Identity()).views if cfg.TEST.AUG.ENABLED else 1
    assert views == {"off": 1, "flip": tta_views(True), "flip+turns": tta_views(True, [1, 2, 3])}


@pytest.mark.slow
@pytest.mark.skipif(
    not (HEIMED_ROOT / "(00000101).jpg").is_file(),
    reason=f"the HEI-MED sample is not at {HEIMED_ROOT}",
)
def test_quick_run_end_to_end_on_real_images(tmp_path, monkeypatch):
    import benchmarks.heimed_exudate_cv as exudate_cv

    scoring, seen_top_k = exudate_cv.score_results, []

    def score_results(gt, results, top_k=1, **kwargs):  # what each variant is scored with
        seen_top_k.append(top_k)
        return scoring(gt, results, top_k, **kwargs)

    monkeypatch.setattr(exudate_cv, "score_results", score_results)
    out = tmp_path / "tta.json"
    main([
        "tta", "--iterations", "2", "--limit", "2", "--work", str(tmp_path / "work"),
        "--out", str(out), "--variants", "off,flip",
        "RETINA.PREPROCESS.FOV_DIAMETER", "256", "INPUT.CROP.SIZE", "[128, 128]",
        "RETINA.COMPONENTS.IMAGE_SCORE_TOP_K", "3",
    ])
    assert seen_top_k == [3, 3]  # the eye's score the config says, for every variant
    results = json.loads(out.read_text())
    assert results["images"] == 2 and results["weights"] == "trained by this run"
    off, flip = results["variants"]
    assert (off["variant"], off["views"], flip["variant"], flip["views"]) == ("off", 1, "flip", 2)
    for row in (off, flip):
        for key in ("segm AP35", "segm AP50", "FROC", "infer s / image", "infer peak RSS MB"):
            assert row[key] is not None, key
    assert off["d segm AP50"] == 0.0
    assert flip["d segm AP50"] == pytest.approx(flip["segm AP50"] - off["segm AP50"])
