"""No config selects a checkpoint or tunes anything on a test split.

``DATASETS.TEST`` is what periodic evaluation scores and what ``model_best.pth`` is chosen by
(``RETINA.EVAL.BEST_METRIC``), so it must name training-side splits only (``val``, DDR's
``valid``). Test splits are scored once, with ``--eval-only`` and a ``DATASETS.TEST`` override.
"""
from pathlib import Path

import pytest

from retina_d2.config import get_retina_cfg

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("**/*.yaml") if not p.name.startswith("Base"))
# Registered names are <dataset>_<task>_<split> (retina_d2.data.register).
TEST_SPLITS = ("test", "testing")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_selection_never_uses_a_test_split(path):
    cfg = get_retina_cfg()
    cfg.merge_from_file(str(path))
    for name in cfg.DATASETS.TEST:
        assert name.rsplit("_", 1)[-1].lower() not in TEST_SPLITS, (
            f"{path.name}: DATASETS.TEST names the test split {name!r}; periodic evaluation and "
            "model_best.pth would be chosen on it"
        )


def test_the_rule_catches_a_test_split():
    # The check above must be able to fail: the names the IDRiD configs used before.
    for name in ("idrid_seg_test", "idrid_grading_test"):
        assert name.rsplit("_", 1)[-1] in TEST_SPLITS
