"""What README and configs/exudate_candidates_heimed_cpu.yaml say about the CPU exudate recipe is
what benchmarks/results/heimed_exudate_candidates_cv.json measured: a rerun that changes the file
fails here until the quotes follow it (the file itself is only ever written by the benchmark)."""
import pytest
from recipe_quotes import flat, full_run_config, pm, read_results

from benchmarks import REPO_ROOT

CONFIG = REPO_ROOT / "configs" / "exudate_candidates_heimed_cpu.yaml"


@pytest.fixture(scope="module")
def results():
    return read_results("heimed_exudate_candidates_cv.json")


def test_the_results_are_the_configs_full_schedule(results):
    cfg = full_run_config(results, CONFIG)
    # The config ships the screening threshold the cross-validation chose (the run scored its
    # then config_threshold as well).
    assert results["false_alarm_budget_per_healthy_eye"] == 0.5
    assert cfg.RETINA.COMPONENTS.SCORE_THRESHOLD == results["screening_threshold_to_ship"]
    # ... and the image score's k it chose.
    assert cfg.RETINA.COMPONENTS.IMAGE_SCORE_TOP_K == results["image_score_top_k_to_ship"]


def test_config_comment_quotes_the_results(results):
    mean = {k: v["mean"] for k, v in results["model_summary"].items()}
    best_lesion = results["model_summary"]["best-lesion image AUC"]
    floor = results["floor_summary"]
    text = flat(CONFIG.read_text())
    ece = results["pooled_out_of_fold_lesion_calibration"]["expected calibration error"]
    k_run = results["config_image_score_top_k"]
    assert best_lesion["min"] == best_lesion["max"] == 100  # "100 in every fold"
    for quoted in (
        f"the mean of its {results['image_score_top_k_to_ship']} best lesion scores",
        f"the run scored k = {k_run} as well",
        f"other folds chose: image AUC {mean['cv image AUC']:.1f}",
        f"(100 in every fold, pooled {results['pooled_out_of_fold_best_lesion_image_AUC']:.1f} "
        f"against {results['pooled_out_of_fold_image_AUC']:.1f} for k = {k_run})",
        f"rises from {floor['best-lesion image AUC']['mean']:.1f} to "
        f"{floor['image AUC']['mean']:.1f} with k = {k_run}",
        f"{mean['screening false alarms / healthy eye']:.2f} false alarms per healthy eye",
        f"precision {mean['screening precision']:.0f} / recall {mean['screening recall']:.0f}",
        f"F1 would be at {results['cv_threshold_to_ship']:.2f}",
        f"recall {mean['cv recall']:.0f}, but {mean['cv false alarms / healthy eye']:.1f} false",
        f"calibration error {ece:.2f}",
    ):
        assert quoted in text, quoted


def test_readme_quotes_the_results(results):
    model, floor = results["model_summary"], results["floor_summary"]
    text = (REPO_ROOT / "README.md").read_text()
    k_run, k_ship = results["config_image_score_top_k"], results["image_score_top_k_to_ship"]
    cv_k = model["cv image score top k"]
    calibration = {tuple(b["scores"]): b
                   for b in results["pooled_out_of_fold_lesion_calibration"]["bins"]}

    def mean(summary, key, digits=0):
        return f"{summary[key]['mean']:.{digits}f}"

    def span(key, digits):
        return f"{model[key]['min']:.{digits}f}-{model[key]['max']:.{digits}f}"

    assert results["config_threshold"] == results["screening_threshold_to_ship"]
    for quoted in (
        f"| exudate segm AP35 | {pm(model, 'segm AP35')} ({span('segm AP35', 1)}) | "
        f"{pm(floor, 'segm AP35')} |",
        f"| exudate segm AP50 | {pm(model, 'segm AP50')} | {pm(floor, 'segm AP50')} |",
        f"| exudate segm AP75 | {pm(model, 'segm AP75')} | {pm(floor, 'segm AP75')} |",
        f"| lesion FROC | {pm(model, 'FROC')} | {pm(floor, 'FROC')} |",
        f"k chosen on the other folds ({cv_k['min']:.0f}-{cv_k['max']:.0f}; shipped: {k_ship}) | "
        f"{pm(model, 'cv image AUC')} |",
        f"| image AUC, the mean of its {k_run} best (the run's config) | {pm(model, 'image AUC')} "
        f"(pooled out of fold: {results['pooled_out_of_fold_image_AUC']:.1f}) | "
        f"{pm(floor, 'image AUC')} |",
        f"| image AUC, its best lesion | {pm(model, 'best-lesion image AUC')} (pooled out of fold: "
        f"{results['pooled_out_of_fold_best_lesion_image_AUC']:.1f}) | "
        f"{pm(floor, 'best-lesion image AUC')} |",
        f"| at the screening threshold chosen on the other folds ({span('screening threshold', 1)}"
        f", shipped: {results['screening_threshold_to_ship']:.1f}): precision / recall, false "
        f"alarms per healthy eye | {mean(model, 'screening precision')} / "
        f"{mean(model, 'screening recall')}, "
        f"{pm(model, 'screening false alarms / healthy eye', 2)} |",
        f"| at the shipped {results['config_threshold']:.1f}: lesion precision / recall / F1 | "
        f"{mean(model, 'config precision')} / {mean(model, 'config recall')} / "
        f"{mean(model, 'config F1')} | {mean(floor, 'config precision')} / "
        f"{mean(floor, 'config recall')} / {mean(floor, 'config F1')} |",
        f"| false alarms per healthy eye at {results['config_threshold']:.1f} | "
        f"{pm(model, 'config false alarms / healthy eye', 2)} | "
        f"{pm(floor, 'config false alarms / healthy eye', 0)} |",
        f"| at the best-F1 threshold chosen on the other folds ({span('cv threshold', 2)}): F1, "
        f"false alarms per healthy eye | {pm(model, 'cv F1', 0)}, "
        f"{pm(model, 'cv false alarms / healthy eye')} |",
        f"| train / infer seconds per image, peak RSS MB | {mean(model, 'train s / image', 1)} / "
        f"{mean(model, 'infer s / image', 1)}, {mean(model, 'train peak RSS MB')} / "
        f"{mean(model, 'infer peak RSS MB')} | — / {mean(floor, 'seconds / image', 1)} |",
        f"scoring 0.5-0.6 that are real exudates is "
        f"{calibration[(0.5, 0.6)]['share found a lesion']:.2f}, of those scoring 0.9-1.0 "
        f"{calibration[(0.9, 1.0)]['share found a lesion']:.2f} (expected calibration error "
        f"{results['pooled_out_of_fold_lesion_calibration']['expected calibration error']:.3f}",
        f"(drawn at 1400 px across, AP50 {model['segm AP50']['mean']:.1f})",
        f"the floor, whose healthy eyes carry bright reflections, gains "
        f"{floor['image AUC']['mean'] - floor['best-lesion image AUC']['mean']:.0f} points",
    ):
        assert flat(quoted) in flat(text), quoted
