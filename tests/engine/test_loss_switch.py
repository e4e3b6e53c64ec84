"""LossSwitchHook: two-stage heads switch to their stage-2 loss exactly at the configured iteration
(or at the first LR drop) inside a real LesionTrainer (DefaultTrainer) run."""
import sys
from pathlib import Path

import pytest
from detectron2.data import MetadataCatalog
from detectron2.engine import hooks

from retina_d2.config import get_retina_cfg
from retina_d2.engine import LesionTrainer
from retina_d2.engine.hooks import LossSwitchHook, loss_switch_iter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "modeling"))
from tiny_dataset import registered_tiny_synthetic  # noqa: E402
from test_semantic_net import TinyLesionTestHead, tiny_semantic_cfg  # noqa: E402  (registers it)

pytestmark = pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")

DATASET = "test_loss_switch_synthetic_train"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two tiny synthetic eyes under a name of this module, unregistered afterwards."""
    with registered_tiny_synthetic(tmp_path_factory.mktemp("synthetic"), DATASET) as name:
        yield name


def _stages_of_a_run(dataset, tmp_path, switch_iter, steps, max_iter=4):
    cfg = tiny_semantic_cfg()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = len(MetadataCatalog.get(dataset).thing_classes)
    cfg.MODEL.LESION_SEG.LOSS_SWITCH_ITER = switch_iter
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (dataset,), ()
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64,), 64
    cfg.SOLVER.IMS_PER_BATCH = 1
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS = max_iter, steps
    cfg.SOLVER.CHECKPOINT_PERIOD = 1000
    cfg.OUTPUT_DIR = str(tmp_path)
    trainer = LesionTrainer(cfg)
    assert any(isinstance(h, LossSwitchHook) for h in trainer._hooks)
    trainer.train()
    head = trainer.model.sem_seg_head
    assert isinstance(head, TinyLesionTestHead)
    return head.stages_seen


def test_switches_exactly_at_the_configured_iteration(dataset, tmp_path):
    assert _stages_of_a_run(dataset, tmp_path, switch_iter=2, steps=()) == [1, 1, 2, 2]


def test_minus_one_switches_at_the_first_lr_drop(dataset, tmp_path):
    assert _stages_of_a_run(dataset, tmp_path, switch_iter=-1, steps=(3,)) == [1, 1, 1, 2]


def test_zero_never_switches(dataset, tmp_path):
    assert _stages_of_a_run(dataset, tmp_path, switch_iter=0, steps=(1,), max_iter=3) == [1, 1, 1]


def test_the_hook_runs_after_the_lr_scheduler(dataset, tmp_path):
    cfg = tiny_semantic_cfg()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = len(MetadataCatalog.get(dataset).thing_classes)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (dataset,), ()
    cfg.OUTPUT_DIR = str(tmp_path)
    kinds = [type(h) for h in LesionTrainer(cfg)._hooks]
    assert kinds.index(LossSwitchHook) == kinds.index(hooks.LRScheduler) + 1


@pytest.mark.parametrize(
    "value,steps,expected", [(-1, (7, 9), 7), (-1, (), 0), (0, (7,), 0), (5, (7,), 5)]
)
def test_switch_iteration_is_resolved_from_the_config(value, steps, expected):
    cfg = get_retina_cfg()
    cfg.MODEL.LESION_SEG.LOSS_SWITCH_ITER, cfg.SOLVER.STEPS = value, steps
    assert loss_switch_iter(cfg) == expected == LossSwitchHook.from_config(cfg).switch_iter


def test_a_value_below_minus_one_is_refused():
    cfg = get_retina_cfg()
    cfg.MODEL.LESION_SEG.LOSS_SWITCH_ITER = -2
    with pytest.raises(ValueError, match="LOSS_SWITCH_ITER must be >= -1"):
        loss_switch_iter(cfg)
