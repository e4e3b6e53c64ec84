"""What the exudate recipes' quote tests (test_*_recipe_quotes.py) share: reading a results file
written by tools/benchmark.py heimed-exudate-cv, checking it is its config's full run, and
formatting figures as README and the configs quote them."""
import json
import re
from pathlib import Path

from benchmarks import REPO_ROOT


def read_results(name: str) -> dict:
    return json.loads((REPO_ROOT / "benchmarks" / "results" / name).read_text())


def flat(text: str) -> str:
    """Comment and table text with line breaks and comment marks folded into single spaces."""
    return re.sub(r"\s*\n\s*#?\s*", " ", text)


def full_run_config(results: dict, config: Path):
    """``config`` merged, after checking ``results`` are its full schedule on all 40 dev images in
    4 folds, without overrides."""
    from retina_d2.config import get_retina_cfg

    cfg = get_retina_cfg()
    cfg.merge_from_file(str(config))
    assert results["config"] == str(config.relative_to(REPO_ROOT))
    assert results["iterations"] == cfg.SOLVER.MAX_ITER and not results["overrides"]
    assert results["folds"] == results["folds_completed"] == 4 and results["images"] == 40
    return cfg


def pm(summary: dict, key: str, digits: int = 1) -> str:
    """A summary figure as quoted: "mean ± std"."""
    return f"{summary[key]['mean']:.{digits}f} ± {summary[key]['std']:.{digits}f}"
