"""What README and configs/exudate_candidates_heimed_cpu.yaml say about the CPU exudate recipe is
what benchmarks/results/heimed_exudate_candidates_cv.json measured: a rerun that changes the file
fails here until the quotes follow it (the file itself is only ever written by the benchmark)."""
import json
import re

import pytest

from benchmarks import REPO_ROOT

RESULTS = REPO_ROOT / "benchmarks" / "results" / "heimed_exudate_candidates_cv.json"
CONFIG = REPO_ROOT / "configs" / "exudate_candidates_heimed_cpu.yaml"


@pytest.fixture(scope="module")
def results():
    return json.loads(RESULTS.read_text())


def _flat(text: str) -> str:
    """Comment and table text with line breaks and comment marks folded into single spaces."""
    return re.sub(r"\s*\n\s*#?\s*", " ", text)


def test_the_results_are_the_configs_full_schedule(results):
    from retina_d2.config import get_retina_cfg

    cfg = get_retina_cfg()
    cfg.merge_from_file(str(CONFIG))
    assert results["config"] == "configs/exudate_candidates_heimed_cpu.yaml"
    assert results["iterations"] == cfg.SOLVER.MAX_ITER and not results["overrides"]
    assert results["folds"] == results["folds_completed"] == 4 and results["images"] == 40
    # The config ships the screening threshold the cross-validation chose (the run scored its
    # then config_threshold as well).
    assert results["false_alarm_budget_per_healthy_eye"] == 0.5
    assert cfg.RETINA.COMPONENTS.SCORE_THRESHOLD == results["screening_threshold_to_ship"]


def test_config_comment_quotes_the_results(results):
    mean = {k: v["mean"] for k, v in results["model_summary"].items()}
    text = _flat(CONFIG.read_text())
    ece = results["pooled_out_of_fold_lesion_calibration"]["expected calibration error"]
    for quoted in (
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

    def pm(summary, key, digits=1):
        return f"{summary[key]['mean']:.{digits}f} ± {summary[key]['std']:.{digits}f}"

    for quoted in (
        f"| exudate segm AP35 | {pm(model, 'segm AP35')} ({model['segm AP35']['min']:.1f}-"
        f"{model['segm AP35']['max']:.1f}) | {pm(floor, 'segm AP35')} |",
        f"| exudate segm AP50 | {pm(model, 'segm AP50')} | {pm(floor, 'segm AP50')} |",
        f"| lesion FROC | {pm(model, 'FROC')} | {pm(floor, 'FROC')} |",
        f"| image AUC | {pm(model, 'image AUC')} (pooled out of fold: "
        f"{results['pooled_out_of_fold_image_AUC']:.1f}) | {pm(floor, 'image AUC')} |",
        f"| false alarms per healthy eye at 0.5 | "
        f"{pm(model, 'config false alarms / healthy eye', 2)} | "
        f"{floor['config false alarms / healthy eye']['mean']:.0f} ± "
        f"{floor['config false alarms / healthy eye']['std']:.0f} |",
        f"(expected calibration error "
        f"{results['pooled_out_of_fold_lesion_calibration']['expected calibration error']:.3f}",
        f"| at the screening threshold chosen on the other folds (0.55-0.6, shipped: "
        f"{results['screening_threshold_to_ship']:.1f}): precision / recall, false alarms per "
        f"healthy eye | {model['screening precision']['mean']:.0f} / "
        f"{model['screening recall']['mean']:.0f}, "
        f"{pm(model, 'screening false alarms / healthy eye', 2)} |",
    ):
        assert quoted in text, quoted
