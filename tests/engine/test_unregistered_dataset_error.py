"""An unregistered dataset's error says where the datasets root is, what RETINA_D2_DATASETS must
point at, and lists only the datasets converted there (not Detectron2's built-in COCO,
Cityscapes, ADE20k, ... which it registers by itself)."""
from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog

from retina_d2.config import ConfigError
from retina_d2.engine import setup_cfg

REPO = Path(__file__).resolve().parents[2]
INSTANT = str(REPO / "configs/quick_schedules/maskrcnn_synthetic_instant_test.yaml")
ELSEWHERE = ["DATASETS.TRAIN", "('idrid_seg_train',)"]


def test_lists_only_the_converted_datasets_and_where_the_root_must_point(
    synthetic_datasets, monkeypatch
):
    monkeypatch.setenv("RETINA_D2_DATASETS", str(synthetic_datasets))
    with pytest.raises(ConfigError) as info:
        setup_cfg(INSTANT, ELSEWHERE)
    message = str(info.value)
    root = synthetic_datasets.resolve()
    assert message.startswith(f"{INSTANT}: dataset 'idrid_seg_train' is not registered")
    assert f"datasets root {root} ($RETINA_D2_DATASETS)" in message
    assert "RETINA_D2_DATASETS must point at the folder holding the converted datasets" in message
    assert f"{root}/idrid/retina_d2.json" in message
    assert message.endswith(
        "converted datasets found there: synthetic_seg_train, synthetic_seg_val"
    )
    # Detectron2's own registrations exist, and are not offered as converted datasets.
    assert "ade20k_sem_seg_train" in DatasetCatalog.list()
    assert "ade20k" not in message and "cityscapes" not in message and "coco" not in message


def test_a_root_that_does_not_exist_is_said_to_be_missing(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv("RETINA_D2_DATASETS", str(missing))
    with pytest.raises(ConfigError) as info:
        setup_cfg(INSTANT, ELSEWHERE)
    message = str(info.value)
    assert f"{missing.resolve()} ($RETINA_D2_DATASETS, which does not exist)" in message
    assert message.endswith("converted datasets found there: none")
