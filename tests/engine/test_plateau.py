"""``PlateauHook`` in a real LesionTrainer: the LR is reduced after RETINA.PLATEAU.PATIENCE
evaluations without improvement (and Detectron2's scheduler keeps it reduced), early stopping
ends training after RETINA.EARLY_STOP.PATIENCE of them with model_final.pth written and the final
evaluation run, and the plateau's state (LR, best, counters) survives ``--resume``. The
evaluation's scores are scripted (its metrics are other tests' business)."""
import sys
from pathlib import Path

import pytest
import torch

from retina_d2.engine import LesionTrainer
from retina_d2.engine.plateau import EarlyStop, PlateauHook

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_resume import _cfg, _scripted_scores, dataset  # noqa: E402,F401  (fixture)

pytestmark = pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")

BASE_LR = 1e-3


def _plateau_cfg(dataset, out, max_iter, patience=2, early_stop=0, checkpoint_period=100):
    cfg = _cfg(dataset, out, max_iter=max_iter, checkpoint_period=checkpoint_period, eval_period=1)
    cfg.SOLVER.STEPS = ()  # constant: only the plateau lowers the LR
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.BASE_LR = BASE_LR
    cfg.RETINA.PLATEAU.ENABLED = True
    cfg.RETINA.PLATEAU.PATIENCE = patience
    cfg.RETINA.PLATEAU.FACTOR = 0.1
    cfg.RETINA.EARLY_STOP.PATIENCE = early_stop
    return cfg


def _lr_by_iteration(trainer):
    """The LR each iteration trained with (Detectron2's LRScheduler hook records it)."""
    return {it: lr for lr, it in trainer.storage.history("lr").values()}


def test_lr_is_reduced_after_patience_evaluations_without_improvement(
    dataset, tmp_path, monkeypatch
):
    # Evaluations after iterations 0..4, then the final one: best 0.5 at 0; 0.4 and 0.45 are two
    # evaluations without improvement (patience 2) -> x0.1 from iteration 3 on; 0.6 improves,
    # 0.6 again does not (one evaluation: no second reduction).
    left = _scripted_scores(monkeypatch, [0.5, 0.4, 0.45, 0.6, 0.6, 0.1])
    trainer = LesionTrainer(_plateau_cfg(dataset, tmp_path, max_iter=6))
    hook = next(h for h in trainer._hooks if isinstance(h, PlateauHook))
    trainer.train()
    assert not left
    lrs = _lr_by_iteration(trainer)
    assert [lrs[i] for i in range(6)] == pytest.approx([1e-3] * 3 + [1e-4] * 3)
    assert hook.reductions == 1 and hook.best == 0.6
    base_lrs = trainer.scheduler.base_lrs
    assert base_lrs == pytest.approx([BASE_LR * 0.1] * len(base_lrs))


def test_min_lr_floors_the_reductions(dataset, tmp_path, monkeypatch):
    _scripted_scores(monkeypatch, [0.5] + [0.1] * 6)
    cfg = _plateau_cfg(dataset, tmp_path, max_iter=6, patience=1)
    cfg.RETINA.PLATEAU.MIN_LR = 2e-5
    trainer = LesionTrainer(cfg)
    trainer.train()
    lrs = _lr_by_iteration(trainer)
    # 1e-3 -> 1e-4 (after eval 1) -> 2e-5 (floor, after eval 2) -> stays.
    assert [lrs[i] for i in range(6)] == pytest.approx([1e-3, 1e-3, 1e-4, 2e-5, 2e-5, 2e-5])


def test_early_stop_ends_training_with_model_final_and_a_final_evaluation(
    dataset, tmp_path, monkeypatch
):
    # Best 0.5 at iteration 0; three evaluations without improvement (early stop patience 3)
    # end training after iteration 3 of 20; the final evaluation is the fifth score.
    left = _scripted_scores(monkeypatch, [0.5, 0.4, 0.3, 0.2, 0.25, 0.9])
    trainer = LesionTrainer(_plateau_cfg(dataset, tmp_path, max_iter=20, patience=10, early_stop=3))
    results = trainer.train()  # returns: the early stop is not an error
    assert left == [0.9]  # 4 periodic evaluations + the final one
    assert results == {"sem_seg": {"mAUCPR": 0.25}}
    assert trainer.iter == 3 and trainer.max_iter == 4
    final = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert final["iteration"] == 3
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert not (tmp_path / "model_0000019.pth").exists()


def test_without_early_stop_training_runs_to_max_iter(dataset, tmp_path, monkeypatch):
    _scripted_scores(monkeypatch, [0.5] + [0.1] * 8)
    trainer = LesionTrainer(_plateau_cfg(dataset, tmp_path, max_iter=6, patience=2))
    trainer.train()
    assert trainer.iter == 6  # Detectron2's mark of a completed run


def test_plateau_state_survives_resume(dataset, tmp_path, monkeypatch):
    # Run 1 (iterations 0-3): best 0.5 after iteration 0; 0.4 after 1 and 0.45 after 2 are
    # evaluations without improvement (patience 1: LR x0.1 from iteration 2, again from 3); the
    # final evaluation (0.3) comes after training, as Detectron2 runs it. Saved at iteration 3.
    _scripted_scores(monkeypatch, [0.5, 0.4, 0.45, 0.3])
    first = LesionTrainer(
        _plateau_cfg(dataset, tmp_path, max_iter=4, patience=1, checkpoint_period=4)
    )
    first.train()
    hook = next(h for h in first._hooks if isinstance(h, PlateauHook))
    assert hook.reductions == 2 and hook.best == 0.5
    assert _lr_by_iteration(first)[3] == pytest.approx(BASE_LR * 1e-2)
    state = hook.state_dict()

    resumed = LesionTrainer(
        _plateau_cfg(dataset, tmp_path, max_iter=6, patience=1, checkpoint_period=4)
    )
    again = next(h for h in resumed._hooks if isinstance(h, PlateauHook))
    assert again.state_dict() != state  # a new trainer starts from nothing
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 4
    assert again.state_dict() == state
    assert resumed.scheduler.base_lrs == pytest.approx(first.scheduler.base_lrs)
    # The resumed run goes on from there: 0.1 after iteration 4 is one more evaluation without
    # improvement on 0.5 -> a third reduction, for iteration 5.
    _scripted_scores(monkeypatch, [0.1, 0.1])
    resumed.train()
    assert again.reductions == 3
    lrs = _lr_by_iteration(resumed)
    assert lrs[4] == pytest.approx(BASE_LR * 1e-2) and lrs[5] == pytest.approx(BASE_LR * 1e-3)


class _StagedModule(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.loss_stage = 1


class _FakeTrainer:
    """What PlateauHook touches of a trainer, for the loss-stage switch alone."""

    def __init__(self):
        self.model = torch.nn.Sequential(_StagedModule())
        param = torch.nn.Parameter(torch.zeros(1))
        self.optimizer = torch.optim.SGD([param], lr=BASE_LR)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda it: 1.0)
        self.iter = 7


def test_first_reduction_switches_two_stage_losses_when_asked():
    for switch, stage in ((True, 2), (False, 1)):
        hook = PlateauHook(metric="m", base_lr=BASE_LR, patience=1, switch_loss_stage=switch)
        hook.trainer = _FakeTrainer()
        hook._reduce()
        assert hook.trainer.model[0].loss_stage == stage
        assert hook.trainer.optimizer.param_groups[0]["lr"] == pytest.approx(BASE_LR * 0.1)


def test_a_stop_raises_early_stop_after_setting_the_last_iteration():
    hook = PlateauHook(metric="m", base_lr=BASE_LR, early_stop_patience=1)
    hook.trainer = _FakeTrainer()
    with pytest.raises(EarlyStop):
        hook._stop()
    assert hook.trainer.max_iter == 8


@pytest.mark.parametrize(
    "kwargs",
    [dict(metric=""), dict(metric="m", mode="up"), dict(metric="m", factor=1.0),
     dict(metric="m", patience=0)],
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        PlateauHook(base_lr=BASE_LR, **kwargs)
