"""tools/benchmark.py heimed-exudate-cv and its recipe (configs/exudate_fpnseg_heimed_cpu.yaml):
the folds, the cross-validated threshold on hand-worked curves, the components that become
lesions, a 10-iteration CPU training whose loss falls, and the benchmark's quick mode end to end
on 4 real images (skipped without ../shared)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import HEIMED_ROOT, REPO_ROOT, main
from benchmarks.heimed_exudate_cv import (
    CONFIG,
    THRESHOLDS,
    at_threshold,
    counts_at,
    image_auc,
    select_threshold,
    stratified_folds,
)
from retina_d2.modeling.components import components_to_coco, lesion_components


def test_folds_are_stratified_disjoint_and_complete():
    names = [f"im{i:02d}" for i in range(40)]
    positive = [i % 5 != 0 for i in range(40)]  # 8 healthy eyes
    folds = stratified_folds(names, positive, 4)
    assert sorted(n for f in folds for n in f) == names
    for fold in folds:
        assert len(fold) == 10
        assert sum(not positive[names.index(n)] for n in fold) == 2
    with pytest.raises(ValueError, match="at least 2 folds"):
        stratified_folds(names, positive, 1)


def _curve(scores_outcomes, num_lesions, num_images):
    """An FROC category curve as froc_curve builds it, from (score, hit?) pairs."""
    pairs = sorted(scores_outcomes, key=lambda p: -p[0])
    hits = np.cumsum([h for _, h in pairs])
    fps = np.cumsum([not h for _, h in pairs])
    return {
        "thresholds": [s for s, _ in pairs], "num_lesions": num_lesions,
        "num_images": num_images, "sensitivity": list(hits / num_lesions),
        "fps_per_image": list(fps / num_images),
    }


def test_threshold_is_the_best_pooled_lesion_f1():
    # Fold A: 4 lesions; hits at 0.9, 0.8, 0.6; false positives at 0.7, 0.45, 0.35.
    a = _curve([(0.9, 1), (0.8, 1), (0.7, 0), (0.6, 1), (0.45, 0), (0.35, 0)], 4, 2)
    # Fold B: 2 lesions; a hit at 0.55, false positives at 0.5 and 0.4.
    b = _curve([(0.55, 1), (0.5, 0), (0.4, 0)], 2, 2)
    assert counts_at(a, 0.6) == (3, 1, 4) and counts_at(a, 0.95) == (0, 0, 4)
    # Pooled (hits, FPs) of 6 lesions: >=0.55 -> (4, 1): F1 8/11; >=0.5 -> (4, 2): 8/12;
    # >=0.6 -> (3, 1): 6/10; >=0.35 -> (4, 5). The best is 0.55.
    assert select_threshold([a, b], thresholds=(0.35, 0.5, 0.55, 0.6, 0.9)) == 0.55
    assert select_threshold([a, b]) in THRESHOLDS


def test_image_auc_and_false_alarms_per_healthy_eye():
    assert image_auc([0.9, 0.2, 0.8, 0.1], [True, False, True, False]) == 1.0
    assert image_auc([0.9, 0.8], [True, True]) is None
    gt = {"categories": [{"id": 3, "name": "hard exudate"}]}
    scored = {"curve": _curve([(0.9, 1), (0.6, 0)], 1, 3),
              "truth": {1: True, 2: False, 3: False}}
    results = [{"image_id": 1, "category_id": 3, "score": 0.9},
               {"image_id": 2, "category_id": 3, "score": 0.6},
               {"image_id": 3, "category_id": 3, "score": 0.4}]
    row = at_threshold(scored, results, gt, 0.5)
    assert row["false alarms / healthy eye"] == 0.5  # one of the two healthy eyes
    assert row["F1"] == pytest.approx(100 * 2 / 3)


def test_components_are_lesions_scored_by_their_peak():
    probs = torch.zeros(2, 20, 30)
    probs[1, 2:5, 3:6] = 0.6
    probs[1, 3, 4] = 0.9  # the first lesion's peak
    probs[1, 10:12, 20:25] = 0.4
    probs[1, 15, 15] = 0.5  # one pixel: below min_area
    probs[0, 0:20, 0:30] = 0.99  # another channel, not read
    label_maps, lesions = lesion_components(probs, 0.3, min_area=2, channels=[1])
    assert [(c.box, round(c.score, 2), c.area) for c in lesions] == [
        ([3, 2, 6, 5], 0.9, 9), ([20, 10, 25, 12], 0.4, 10),
    ]
    results = components_to_coco(label_maps, lesions, image_id=7, category_ids=[1, 3])
    from pycocotools import mask as mask_util

    assert [r["category_id"] for r in results] == [3, 3]
    assert mask_util.area(results[0]["segmentation"]) == 9
    assert results[1]["bbox"] == [20.0, 10.0, 5.0, 2.0]


def test_recipe_trains_ten_iterations_and_its_loss_falls(tmp_path, monkeypatch):
    from retina_d2.data.converters import ConvertOptions, synthetic
    from retina_d2.engine.trainer import LesionTrainer, setup_cfg

    datasets = tmp_path / "datasets"
    synthetic.convert(None, datasets / "synthetic", ConvertOptions(progress=False), count=4, size=192)
    monkeypatch.setenv("RETINA_D2_DATASETS", str(datasets))
    cfg = setup_cfg(str(CONFIG), [
        "DATASETS.TRAIN", "('synthetic_seg_train',)", "DATASETS.TEST", "()",
        "RETINA.PREPROCESS.FOV_DIAMETER", "192", "INPUT.CROP.SIZE", "[128, 128]",
        "SOLVER.MAX_ITER", "10", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.CHECKPOINT_PERIOD", "100", "DATALOADER.NUM_WORKERS", "0", "SEED", "3",
        "OUTPUT_DIR", str(tmp_path / "run"),
    ])
    trainer = LesionTrainer(cfg)
    trainer.train()
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == 10
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses


@pytest.mark.slow
@pytest.mark.skipif(
    not (HEIMED_ROOT / "(00000101).jpg").is_file(),
    reason=f"the HEI-MED sample is not at {HEIMED_ROOT}",
)
def test_quick_mode_runs_end_to_end_on_four_real_images(tmp_path):
    out = tmp_path / "cv.json"
    main([
        "heimed-exudate-cv", "--images", "4", "--folds", "2", "--iterations", "2",
        "--work", str(tmp_path / "work"), "--out", str(out),
        "RETINA.PREPROCESS.FOV_DIAMETER", "512", "INPUT.CROP.SIZE", "[128, 128]",
    ])
    results = json.loads(out.read_text())
    assert results["images"] == 4 and len(results["model_folds"]) == 2
    assert sorted(n for f in results["fold_images"] for n in f) == sorted(
        set(n for f in results["fold_images"] for n in f)
    )
    for model, floor in zip(results["model_folds"], results["floor_folds"]):
        assert model["healthy eyes"] == 1 and model["images"] == 2
        for key in ("segm AP35", "segm AP50", "segm AP75", "FROC", "image AUC",
                    "cv false alarms / healthy eye", "config false alarms / healthy eye",
                    "train s / image", "infer s / image", "train peak RSS MB",
                    "infer peak RSS MB"):
            assert model[key] is not None, key
        assert model["cv threshold"] in THRESHOLDS
        # The floor is computed on the fold's own images in this run.
        assert floor["segm AP35"] is not None and floor["seconds / image"] > 0
    from retina_d2.config import get_retina_cfg

    cfg = get_retina_cfg()
    cfg.merge_from_file(str(CONFIG))
    assert results["config_threshold"] == cfg.RETINA.COMPONENTS.SCORE_THRESHOLD
    assert "segm AP35" in results["model_summary"] and "std" in results["model_summary"]["FROC"]
