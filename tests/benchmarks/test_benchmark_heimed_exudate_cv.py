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
    IMAGE_TOP_KS,
    THRESHOLDS,
    at_threshold,
    counts_at,
    reliability,
    select_screening_threshold,
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


def test_screening_threshold_is_the_lowest_within_the_false_alarm_budget():
    gt = {"categories": [{"id": 3, "name": "hard exudate"}]}
    # Two healthy eyes (2, 3) with false alarms at 0.9, 0.6, 0.6 and 0.35; eye 1 has exudates.
    fold = {"gt": gt, "truth": {1: True, 2: False, 3: False}, "results": [
        {"image_id": 1, "category_id": 3, "score": 0.2},
        {"image_id": 2, "category_id": 3, "score": 0.9},
        {"image_id": 2, "category_id": 3, "score": 0.6},
        {"image_id": 3, "category_id": 3, "score": 0.6},
        {"image_id": 3, "category_id": 3, "score": 0.35},
        {"image_id": 3, "category_id": 1, "score": 0.99},  # another lesion type: not an exudate
    ]}
    grid = (0.3, 0.4, 0.5, 0.7, 0.95)
    # >= 0.3: 4 alarms / 2 eyes = 2; >= 0.4 and 0.5: 1.5; >= 0.7: 0.5; >= 0.95: 0.
    assert select_screening_threshold([fold], 0.5, grid) == 0.7
    assert select_screening_threshold([fold], 1.5, grid) == 0.4
    assert select_screening_threshold([fold], 10, grid) == 0.3
    assert select_screening_threshold([fold], -1, grid) == 0.95  # none within: the highest
    # Pooled over folds: a second fold of two clean healthy eyes halves the rate (>= 0.4: 3
    # alarms on 4 eyes = 0.75, within 0.75; alone it is 1.5, and 0.7 is needed).
    clean = {"gt": gt, "truth": {7: False, 8: False}, "results": []}
    assert select_screening_threshold([fold], 0.75, grid) == 0.7
    assert select_screening_threshold([fold, clean], 0.75, grid) == 0.4


def test_reliability_by_hand():
    # Hits at 0.95 and 0.12, false alarms at 0.9, 0.15 and 0.05 (3 lesions, 2 images).
    a = _curve([(0.95, 1), (0.9, 0), (0.15, 0), (0.12, 1), (0.05, 0)], 3, 2)
    # A duplicate of a found lesion at 0.85: neither a hit nor a false alarm, so not counted.
    b = {"thresholds": [0.92, 0.85], "num_lesions": 1, "num_images": 1,
         "sensitivity": [1.0, 1.0], "fps_per_image": [0.0, 0.0]}
    table = reliability([a, b])
    rows = {tuple(r["scores"]): r for r in table["bins"]}
    assert sorted(rows) == [(0.0, 0.1), (0.1, 0.2), (0.9, 1.0)]
    top = rows[(0.9, 1.0)]
    assert top["predictions"] == 3 and top["share found a lesion"] == pytest.approx(2 / 3)
    assert top["mean score"] == pytest.approx((0.95 + 0.9 + 0.92) / 3)
    assert rows[(0.1, 0.2)]["share found a lesion"] == 0.5
    # |2/3 - 0.9233| * 3 + |0.5 - 0.135| * 2 + |0 - 0.05| * 1, over 6 predictions.
    expected = (abs(2 / 3 - 2.77 / 3) * 3 + abs(0.5 - 0.135) * 2 + 0.05) / 6
    assert table["expected calibration error"] == pytest.approx(expected)
    assert reliability([])["expected calibration error"] is None


def test_image_auc_and_false_alarms_per_healthy_eye():
    from retina_d2.evaluation.image_scores import image_auc

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
        "RETINA.COMPONENTS.IMAGE_SCORE_TOP_K", "2",
    ])
    results = json.loads(out.read_text())
    assert results["images"] == 4 and len(results["model_folds"]) == 2
    # Image AUC with an eye scored by the mean of its 2 best lesions, recomputed from the
    # predictions the run wrote (sklearn, by hand), beside the best lesion's.
    from sklearn.metrics import roc_auc_score

    assert results["config_image_score_top_k"] == 2
    for k, model in enumerate(results["model_folds"]):
        fold = tmp_path / "work" / f"fold{k}"
        gt = json.loads((fold / "datasets" / "heimed" / "val.json").read_text())
        predictions = json.loads((fold / "predictions.json").read_text())
        exudate = next(c["id"] for c in gt["categories"] if c["name"] == "hard exudate")
        has = {a["image_id"] for a in gt["annotations"] if a["category_id"] == exudate}
        ids = [img["id"] for img in gt["images"]]
        lesions = {i: sorted((p["score"] for p in predictions if p["image_id"] == i
                              and p["category_id"] == exudate), reverse=True) for i in ids}
        labels = [i in has for i in ids]
        assert model["image AUC"] == pytest.approx(
            100 * roc_auc_score(labels, [sum(lesions[i][:2]) / 2 for i in ids]))
        assert model["best-lesion image AUC"] == pytest.approx(
            100 * roc_auc_score(labels, [max(lesions[i], default=0) for i in ids]))
        assert model["cv image score top k"] in IMAGE_TOP_KS
    assert results["image_score_top_k_to_ship"] in IMAGE_TOP_KS
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
    assert "diaretdb1" not in results  # only with --diaretdb1-root

    # Again from the fold models just trained (--skip-train), now also scored on DIARETDB1.
    again = tmp_path / "cv_diaretdb1.json"
    main([
        "heimed-exudate-cv", "--images", "4", "--folds", "2", "--iterations", "2",
        "--work", str(tmp_path / "work"), "--out", str(again), "--skip-train",
        "--diaretdb1-root", str(_diaretdb1_raw(tmp_path / "raw")),
        "RETINA.PREPROCESS.FOV_DIAMETER", "512", "INPUT.CROP.SIZE", "[128, 128]",
    ])
    scored = json.loads(again.read_text())
    for before, after in zip(results["model_folds"], scored["model_folds"]):
        assert after["segm AP35"] == before["segm AP35"] and after["FROC"] == before["FROC"]
    section = scored["diaretdb1"]
    assert section["images"] == 3 and len(section["model_folds"]) == 2
    for fold, heimed_row in zip(section["model_folds"], scored["model_folds"]):
        assert fold["cv threshold"] == heimed_row["cv threshold"]  # chosen on HEI-MED alone
        assert fold["image AUC"] is not None and fold["recall at <= 1 false alarm / image"] >= 0
        assert fold["recall at <= 1 false alarm / image (centre inside)"] >= 0
    assert "std" in section["model_summary"]["segm AP50"]
    assert section["floor"]["segm AP35"] is not None


@pytest.mark.slow
@pytest.mark.skipif(
    not (HEIMED_ROOT / "(00000101).jpg").is_file(),
    reason=f"the HEI-MED sample is not at {HEIMED_ROOT}",
)
def test_candidate_recipe_runs_end_to_end_on_four_real_images(tmp_path):
    # configs/exudate_candidates_heimed_cpu.yaml through the same benchmark: its map's components
    # are its candidates, scored and calibrated like any semantic model's lesions.
    config = REPO_ROOT / "configs" / "exudate_candidates_heimed_cpu.yaml"
    out = tmp_path / "cv.json"
    main([
        "heimed-exudate-cv", "--config-file", str(config), "--images", "4", "--folds", "2",
        "--iterations", "2", "--work", str(tmp_path / "work"), "--out", str(out),
        "RETINA.PREPROCESS.FOV_DIAMETER", "512",
    ])
    results = json.loads(out.read_text())
    assert results["config"] == "configs/exudate_candidates_heimed_cpu.yaml"
    for model in results["model_folds"]:
        for key in ("segm AP35", "FROC", "image AUC", "config false alarms / healthy eye",
                    "train s / image", "infer s / image"):
            assert model[key] is not None, key
    calibration = results["pooled_out_of_fold_lesion_calibration"]
    assert calibration["bins"] and 0 <= calibration["expected calibration error"] <= 1
    assert sum(b["predictions"] for b in calibration["bins"]) > 0


# --- DIARETDB1: the fold models on another camera ----------------------------------------------


def _square_rle(top, left, size=4, shape=(32, 32)):
    from pycocotools import mask as mask_util

    mask = np.zeros(shape, np.uint8, order="F")
    mask[top:top + size, left:left + size] = 1
    rle = mask_util.encode(mask)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def test_cross_dataset_row_counts_recall_and_false_alarms_on_every_image():
    from benchmarks.heimed_exudate_cv import AT_ONE_FALSE_ALARM, cross_dataset_row, score_results

    exudate = 3
    gt = {
        "images": [{"id": 1, "file_name": "a.png", "height": 32, "width": 32},
                   {"id": 2, "file_name": "b.png", "height": 32, "width": 32}],
        "categories": [{"id": 1, "name": "microaneurysm"}, {"id": exudate, "name": "hard exudate"}],
        "annotations": [
            {"id": i + 1, "image_id": 1, "category_id": exudate, "iscrowd": 0, "area": 16,
             "bbox": [left, top, 4, 4], "segmentation": _square_rle(top, left)}
            for i, (top, left) in enumerate([(2, 2), (20, 20)])
        ],
    }

    def result(image_id, top, left, score):
        return {"image_id": image_id, "category_id": exudate, "score": score,
                "bbox": [left, top, 4, 4], "segmentation": _square_rle(top, left)}

    # Image 1 holds both lesions, image 2 none. In score order: a hit (0.9), three false alarms
    # (0.8 and 0.6 on image 2, 0.7 on image 1 away from both lesions), the second hit (0.5).
    results = [result(1, 2, 2, 0.9), result(2, 10, 10, 0.8), result(1, 10, 2, 0.7),
               result(2, 25, 25, 0.6), result(1, 20, 20, 0.5)]
    scored = score_results(gt, results)
    row = cross_dataset_row(scored, [("cv", 0.75), ("config", 0.5)])
    # >= 0.75: 1 of 2 lesions, 1 false alarm over 2 images.
    assert (row["cv recall"], row["cv false alarms / image"]) == (50.0, 0.5)
    # >= 0.5: both lesions, 3 false alarms over 2 images.
    assert (row["config recall"], row["config false alarms / image"]) == (100.0, 1.5)
    # Within 1 false alarm per image (2 on 2 images) only the first hit is reached: the second
    # comes after the third false alarm.
    assert row[AT_ONE_FALSE_ALARM] == 50.0
    assert row["image AUC"] == 100.0  # image 1's best lesion (0.9) above image 2's (0.8)
    assert row["cv threshold"] == 0.75 and row["segm AP50"] is not None


IMAGES_WITH_EXUDATES = ("diaretdb1_image001", "diaretdb1_image003")


def _diaretdb1_raw(parent: Path) -> Path:
    """A DIARETDB1 v2.1 folder: 3 test images (2 with consensus exudates), 1 training image."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "converters"))  # the layout writers
    from diaretdb1_layout import circle, four, write_dataset

    images = {
        "diaretdb1_image001": four([circle(30, 30, 6), circle(90, 60, 5)]),
        "diaretdb1_image002": four([]),
        "diaretdb1_image003": four([circle(100, 20, 5, kind="Hard_exudates")]),
        "diaretdb1_image004": four([circle(40, 40, 6)]),
    }
    return write_dataset(parent, images, ["diaretdb1_image004"],
                         ["diaretdb1_image001", "diaretdb1_image002", "diaretdb1_image003"])


def test_diaretdb1_rows_of_a_tiny_model_beside_the_floor(tmp_path, monkeypatch):
    """The benchmark's DIARETDB1 path (conversion, floor, a fold model's prediction in its own
    process, the rows) on a generated DIARETDB1 folder with a randomly initialised recipe model
    at 128 px."""
    from benchmarks.exudate_floor import floor_coco_results
    from benchmarks.heimed_exudate_cv import (
        AT_ONE_FALSE_ALARM,
        cross_dataset_row,
        diaretdb1_section,
        predict_scored,
        prepare_diaretdb1,
        score_results,
    )
    from detectron2.modeling import build_model

    from retina_d2.engine.trainer import setup_cfg
    from retina_d2.modeling import LesionCheckpointer

    raw = _diaretdb1_raw(tmp_path / "raw")
    work = tmp_path / "work"
    prepared = prepare_diaretdb1(raw, work)
    gt = prepared["gt"]
    assert [Path(i["file_name"]).stem for i in gt["images"]] == [
        "diaretdb1_image001", "diaretdb1_image002", "diaretdb1_image003"]  # the test list only
    assert prepared["floor"]["curve"]["num_lesions"] == 3  # the consensus exudates
    # The floor is computed in the run: the same as running and scoring it here.
    exudate = next(c["id"] for c in gt["categories"] if c["name"] == "hard exudate")
    direct = score_results(gt, floor_coco_results(gt["images"], prepared["image_root"], exudate))
    assert prepared["floor"]["row"] == direct["row"]

    # A fold's model: the recipe, randomly initialised (what is measured here is the path).
    datasets = work / "diaretdb1"
    monkeypatch.setenv("RETINA_D2_DATASETS", str(datasets))
    opts = ["DATASETS.TRAIN", "('diaretdb1_seg_train',)", "DATASETS.TEST", "()",
            "RETINA.PREPROCESS.FOV_DIAMETER", "128", "MODEL.DEVICE", "cpu"]
    torch.manual_seed(0)
    model = build_model(setup_cfg(str(CONFIG), opts))
    LesionCheckpointer(model, save_dir=str(tmp_path / "run")).save("model_final")
    predicted = predict_scored(CONFIG, tmp_path / "run" / "model_final.pth", datasets,
                               prepared["gt_file"], prepared["image_root"],
                               tmp_path / "d1.json", opts, "fold 0 on DIARETDB1")
    assert predicted["inference"]["num_images"] == 3
    assert predicted["results"]  # the random model's map has components (seed 0)
    assert {r["image_id"] for r in predicted["results"]} <= {i["id"] for i in gt["images"]}

    folds = [{"fold": 0, "cv threshold": 0.7, **predicted},
             {"fold": 1, "cv threshold": None, **predicted}]
    section = diaretdb1_section(prepared, folds, config_threshold=0.5)
    assert section["images"] == 3 and section["images with hard exudates"] == 2
    assert section["hard exudates"] == 3
    assert section["fusion"] == "mean expert confidence >= 0.75"  # the default fusion
    first, second = section["model_folds"]
    for key in ("segm AP35", "segm AP50", "image AUC", "cv recall", "config recall",
                AT_ONE_FALSE_ALARM):
        assert first[key] is not None and 0 <= first[key] <= 100, key
    for key in ("cv false alarms / image", "config false alarms / image", "infer s / image",
                "infer peak RSS MB"):
        assert first[key] >= 0, key
    assert first["cv threshold"] == 0.7 and "cv recall" not in second  # no other fold yet
    assert first == {**second, **{k: v for k, v in first.items() if k.startswith("cv ")},
                     "fold": 0}
    summary = section["model_summary"]
    assert summary["segm AP50"]["std"] == 0 and summary["segm AP50"]["mean"] == first["segm AP50"]
    # The floor's row: the floor's own scoring at the config's threshold.
    floor = section["floor"]
    expected = cross_dataset_row(direct, [("config", 0.5)])
    assert {k: floor[k] for k in expected} == expected
    assert floor["seconds / image"] > 0
    for key in ("segm AP35", "image AUC", AT_ONE_FALSE_ALARM):
        if floor[key]:
            assert first[f"{key} x floor"] == pytest.approx(first[key] / floor[key])


def test_another_dataset_with_other_categories_is_refused():
    # predict_fold reads channel c as the GT's c-th category: another vocabulary would mislabel.
    from benchmarks.heimed_exudate_cv import _check_same_categories

    heimed = {"categories": [{"id": 1, "name": "microaneurysm"}, {"id": 3, "name": "hard exudate"}]}
    _check_same_categories(heimed, {"categories": heimed["categories"][::-1]}, "d1/test.json")
    seven = {"categories": heimed["categories"] + [{"id": 9, "name": "neovascularization"}]}
    with pytest.raises(ValueError, match="d1/test.json: categories .* are not the model's"):
        _check_same_categories(heimed, seven, "d1/test.json")


def _fold(eyes):
    """A :func:`score_results`-like fold: ``eyes`` = [(has exudates, lesion scores), ...]."""
    return {"truth": {i: has for i, (has, _) in enumerate(eyes)},
            "lesion_scores": {i: list(scores) for i, (_, scores) in enumerate(eyes)}}


def test_image_top_k_is_chosen_on_the_folds_given_and_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    from benchmarks.heimed_exudate_cv import _pooled_image_auc, select_image_top_k

    # Healthy eyes each carry one confident reflection; exudate eyes several moderate lesions.
    # The best lesion ranks every healthy eye at or above every exudate eye; the mean of the 3
    # best ranks all but the single-lesion eye above them.
    folds = [
        _fold([(False, [0.95]), (True, [0.7, 0.6, 0.6, 0.5]), (True, [0.9, 0.8, 0.7])]),
        _fold([(False, [0.9, 0.2]), (True, [0.6, 0.6, 0.55]), (True, [0.8])]),
    ]
    labels = [False, True, True, False, True, True]
    best = [0.95, 0.7, 0.9, 0.9, 0.6, 0.8]
    assert _pooled_image_auc(folds, 1) == pytest.approx(roc_auc_score(labels, best))
    top3 = [0.95 / 3, 1.9 / 3, 0.8, 1.1 / 3, 1.75 / 3, 0.8 / 3]
    assert _pooled_image_auc(folds, 3) == pytest.approx(roc_auc_score(labels, top3))
    chosen = select_image_top_k(folds, (1, 3, 5))
    aucs = {k: _pooled_image_auc(folds, k) for k in (1, 3, 5)}
    assert aucs[chosen] == max(aucs.values()) and aucs[chosen] > aucs[1]
    # Ties go to the smaller k; without a healthy eye nothing is chosen but the best lesion.
    assert select_image_top_k(folds, (5, 6)) == 5
    assert select_image_top_k([_fold([(True, [0.5]), (True, [0.2, 0.1])])]) == 1


def test_default_results_file_is_the_shipped_one_only_for_the_recipe_as_shipped(tmp_path):
    from benchmarks.heimed_exudate_cv import WORK_ROOT, default_paths

    results = REPO_ROOT / "benchmarks" / "results"
    for config, shipped in [("exudate_fpnseg_heimed_cpu.yaml", "heimed_exudate_cv.json"),
                            ("exudate_candidates_heimed_cpu.yaml",
                             "heimed_exudate_candidates_cv.json")]:
        path = REPO_ROOT / "configs" / config
        work = WORK_ROOT / path.stem
        assert default_paths(path, True) == (results / shipped, work)
        # A quick run (fewer images, other schedule, overrides) keeps to its work folder.
        assert default_paths(path, False) == (work / "results.json", work)
    # Two configs never share a work folder (--skip-train would score the other's models).
    assert default_paths(CONFIG, True)[1] != default_paths(
        REPO_ROOT / "configs" / "exudate_candidates_heimed_cpu.yaml", True)[1]
    # A copy of a shipped config elsewhere is not the shipped recipe.
    copy = tmp_path / "exudate_fpnseg_heimed_cpu.yaml"
    copy.write_text((REPO_ROOT / "configs" / "exudate_fpnseg_heimed_cpu.yaml").read_text())
    assert default_paths(copy, True)[0] == WORK_ROOT / copy.stem / "results.json"


def test_a_lesion_inside_a_coarse_expert_region_is_found_by_its_centre():
    from benchmarks.heimed_exudate_cv import (
        AT_ONE_FALSE_ALARM,
        AT_ONE_FALSE_ALARM_CENTRE,
        cross_dataset_row,
        score_results,
    )

    from pycocotools import mask as mask_util

    exudate = 3
    region = np.zeros((32, 32), np.uint8)
    region[4:20, 4:20] = 1  # an expert's 16 x 16 region around a cluster
    rle = mask_util.encode(np.asfortranarray(region))
    rle["counts"] = rle["counts"].decode("ascii")
    gt = {
        "images": [{"id": 1, "file_name": "a.png", "height": 32, "width": 32}],
        "categories": [{"id": exudate, "name": "hard exudate"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": exudate, "iscrowd": 0,
                         "area": 256, "bbox": [4, 4, 16, 16], "segmentation": rle}],
    }
    # One exudate of the cluster outlined on its own: IoU 16 / 256, a miss at IoU 0.2, and then
    # a false alarm; its centre lies inside the region.
    results = [{"image_id": 1, "category_id": exudate, "score": 0.9, "bbox": [8, 8, 4, 4],
                "segmentation": _square_rle(8, 8)}]
    row = cross_dataset_row(score_results(gt, results, centre=True), [("config", 0.5)])
    assert row[AT_ONE_FALSE_ALARM] == 0.0
    assert row[AT_ONE_FALSE_ALARM_CENTRE] == 100.0
    assert AT_ONE_FALSE_ALARM_CENTRE not in cross_dataset_row(score_results(gt, results), [])


def test_a_bad_image_score_k_stops_the_run_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"IMAGE_SCORE_TOP_K of .*exudate_fpnseg_heimed_cpu\.yaml "
                                         r"must be a whole number >= 1, got -2"):
        main(["heimed-exudate-cv", "--work", str(tmp_path / "work"), "--out",
              str(tmp_path / "cv.json"), "RETINA.COMPONENTS.IMAGE_SCORE_TOP_K", "-2"])
    assert not (tmp_path / "work").exists() and not (tmp_path / "cv.json").exists()
