"""``--resume`` restores the whole training state in a real LesionTrainer (DefaultTrainer): model,
optimizer (Adam's moments, which Detectron2 0.6 never saves), LR scheduler, iteration, and the
best checkpoint's score, so a resumed run's first evaluation cannot replace model_best.pth with a
worse model. Every saved piece loads with ``torch.load(weights_only=True)``."""
import hashlib
import sys
from pathlib import Path

import pytest
import torch
from detectron2.data import MetadataCatalog

from retina_d2.engine import LesionTrainer
from retina_d2.engine.hooks import LesionBestCheckpointer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "modeling"))
from tiny_dataset import registered_tiny_synthetic  # noqa: E402
from test_semantic_net import tiny_semantic_cfg  # noqa: E402  (registers TinyLesionTestHead)

pytestmark = pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")

DATASET = "test_resume_synthetic_train"
METRIC = "sem_seg/mAUCPR"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two tiny synthetic eyes under a name of this module, unregistered afterwards."""
    with registered_tiny_synthetic(tmp_path_factory.mktemp("synthetic"), DATASET) as name:
        yield name


def _cfg(dataset, out, max_iter, checkpoint_period, eval_period=0):
    cfg = tiny_semantic_cfg()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = len(MetadataCatalog.get(dataset).thing_classes)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (dataset,), ()
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (64,), 64
    cfg.SOLVER.IMS_PER_BATCH = 1
    cfg.SOLVER.OPTIMIZER = "ADAM"
    cfg.SOLVER.BASE_LR = 1e-3
    cfg.SOLVER.STEPS, cfg.SOLVER.GAMMA = (1,), 0.1  # the LR a resumed run needs is not BASE_LR
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.CHECKPOINT_PERIOD = checkpoint_period
    cfg.TEST.EVAL_PERIOD = eval_period
    cfg.RETINA.EVAL.BEST_METRIC = METRIC
    cfg.OUTPUT_DIR = str(out)
    return cfg


def _equal_states(a, b):
    """Two optimizer state dicts hold the same tensors and numbers."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal_states(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_states(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def test_resume_restores_optimizer_scheduler_model_and_iteration(dataset, tmp_path):
    first = LesionTrainer(_cfg(dataset, tmp_path, max_iter=3, checkpoint_period=2))
    first.train()
    saved = first.optimizer.state_dict()
    # Adam has moments for every parameter the run trained.
    assert saved["state"] and all(
        {"step", "exp_avg", "exp_avg_sq"} <= set(s) for s in saved["state"].values()
    )
    assert any(s["exp_avg"].abs().sum() > 0 for s in saved["state"].values())
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"

    resumed = LesionTrainer(_cfg(dataset, tmp_path, max_iter=3, checkpoint_period=2))
    assert not resumed.optimizer.state_dict()["state"]  # a new trainer starts without moments
    resumed.resume_or_load(resume=True)
    state = resumed.optimizer.state_dict()
    assert _equal_states(state["state"], saved["state"])
    assert _equal_states(state["param_groups"], saved["param_groups"])
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)  # after the drop at 1
    assert resumed.scheduler.last_epoch == first.scheduler.last_epoch == 3
    assert resumed.start_iter == 3
    model_a, model_b = first.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)

    # The checkpoint holds only tensors, numbers, strings and plain containers.
    checkpoint = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert _equal_states(checkpoint["optimizer"]["state"], saved["state"])
    assert checkpoint["trainer"]["iteration"] == 2


def test_resume_past_a_truncated_last_checkpoint_takes_the_previous_state(dataset, tmp_path):
    LesionTrainer(_cfg(dataset, tmp_path, max_iter=3, checkpoint_period=2)).train()
    previous = torch.load(tmp_path / "model_0000001.pth", weights_only=True)
    final = tmp_path / "model_final.pth"
    final.write_bytes(final.read_bytes()[: final.stat().st_size // 3])  # a kill -9 mid-write
    resumed = LesionTrainer(_cfg(dataset, tmp_path, max_iter=3, checkpoint_period=2))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    assert _equal_states(resumed.optimizer.state_dict(), previous["optimizer"])
    model = resumed.model.state_dict()
    assert all(torch.equal(model[k], previous["model"][k]) for k in model)


def test_amp_gradient_scaler_is_checkpointed_when_enabled(dataset, tmp_path, monkeypatch):
    # AMPTrainer makes torch.cuda.amp.GradScaler(), disabled without CUDA: stand in an enabled
    # CPU scaler so that its state travels through a real save and resume.
    monkeypatch.setattr(torch.cuda.amp, "GradScaler", lambda: torch.amp.GradScaler("cpu"))
    cfg = _cfg(dataset, tmp_path, max_iter=3, checkpoint_period=2)
    cfg.SOLVER.AMP.ENABLED = True
    first = LesionTrainer(cfg)
    assert first.checkpointer.checkpointables["grad_scaler"] is first._trainer.grad_scaler
    first._trainer.grad_scaler.scale(torch.ones(()))  # a scaler's scale exists once it scaled
    first._trainer.grad_scaler.update(new_scale=4096.0)
    first.checkpointer.save("model_0000000", iteration=0)
    resumed = LesionTrainer(cfg)
    assert resumed._trainer.grad_scaler.get_scale() != 4096.0
    resumed.resume_or_load(resume=True)
    assert resumed._trainer.grad_scaler.get_scale() == 4096.0


def _scripted_scores(monkeypatch, scores):
    """LesionTrainer.test returns the next of ``scores`` as the best metric (the evaluation
    itself is other tests' business); returns the list of iterations it was called at."""
    scores = list(scores)

    def test(cls, cfg, model, evaluators=None):
        return {"sem_seg": {"mAUCPR": scores.pop(0)}}

    monkeypatch.setattr(LesionTrainer, "test", classmethod(test))
    return scores


def _best(out: Path):
    data = torch.load(out / "model_best.pth", weights_only=True)
    return data["best_metric_name"], data["best_metric"], data["iteration"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resumed_run_keeps_a_better_model_best(dataset, tmp_path, monkeypatch):
    # Run 1: evaluations after iterations 1 and 3 score 0.8 and 0.6: the best is iteration 1.
    left = _scripted_scores(monkeypatch, [0.8, 0.6])
    run = LesionTrainer(_cfg(dataset, tmp_path, max_iter=4, checkpoint_period=2, eval_period=2))
    assert any(isinstance(h, LesionBestCheckpointer) for h in run._hooks)
    run.train()
    assert not left
    assert _best(tmp_path) == (METRIC, 0.8, 1)
    kept = _digest(tmp_path / "model_best.pth")

    # Run 2 resumes at iteration 4 (model_final.pth): 0.7 after iteration 5 is worse than the
    # best so far and must not replace it; 0.9 at the end is better and must (Detectron2 stores
    # the final evaluation at iteration MAX_ITER, the others at the iteration just run).
    left = _scripted_scores(monkeypatch, [0.7, 0.9])
    resumed = LesionTrainer(_cfg(dataset, tmp_path, max_iter=8, checkpoint_period=2, eval_period=2))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 4
    best_hook = next(h for h in resumed._hooks if isinstance(h, LesionBestCheckpointer))

    replaced_at = []
    real_save = resumed.checkpointer.save

    def save(name, **kwargs):
        if name == "model_best":
            replaced_at.append(kwargs["iteration"])
        real_save(name, **kwargs)

    monkeypatch.setattr(resumed.checkpointer, "save", save)
    resumed.train()
    assert not left
    assert replaced_at == [8]
    assert _best(tmp_path) == (METRIC, 0.9, 8)
    assert (best_hook.best_metric, best_hook.best_iter) == (0.9, 8)
    assert _digest(tmp_path / "model_best.pth") != kept


def test_worse_score_after_resume_leaves_model_best_byte_for_byte(dataset, tmp_path, monkeypatch):
    _scripted_scores(monkeypatch, [0.8, 0.6])
    LesionTrainer(_cfg(dataset, tmp_path, max_iter=4, checkpoint_period=2, eval_period=2)).train()
    kept = _digest(tmp_path / "model_best.pth")
    _scripted_scores(monkeypatch, [0.7])
    resumed = LesionTrainer(_cfg(dataset, tmp_path, max_iter=6, checkpoint_period=2, eval_period=2))
    resumed.resume_or_load(resume=True)
    resumed.train()
    assert _digest(tmp_path / "model_best.pth") == kept
    assert _best(tmp_path) == (METRIC, 0.8, 1)


def test_a_fresh_run_into_the_same_folder_starts_from_no_best(dataset, tmp_path, monkeypatch):
    _scripted_scores(monkeypatch, [0.8, 0.6])
    LesionTrainer(_cfg(dataset, tmp_path, max_iter=4, checkpoint_period=2, eval_period=2)).train()
    _scripted_scores(monkeypatch, [0.3, 0.2])
    fresh = LesionTrainer(_cfg(dataset, tmp_path, max_iter=4, checkpoint_period=2, eval_period=2))
    fresh.resume_or_load(resume=False)
    fresh.train()
    assert _best(tmp_path) == (METRIC, 0.3, 1)


def test_model_best_of_another_metric_is_replaced_after_resume(dataset, tmp_path, monkeypatch):
    _scripted_scores(monkeypatch, [0.8, 0.6])
    LesionTrainer(_cfg(dataset, tmp_path, max_iter=4, checkpoint_period=2, eval_period=2)).train()
    cfg = _cfg(dataset, tmp_path, max_iter=6, checkpoint_period=2, eval_period=2)
    cfg.RETINA.EVAL.BEST_METRIC = "sem_seg/mF1"

    def test(cls, cfg, model, evaluators=None):
        return {"sem_seg": {"mAUCPR": 0.1, "mF1": 0.2}}

    monkeypatch.setattr(LesionTrainer, "test", classmethod(test))
    resumed = LesionTrainer(cfg)
    resumed.resume_or_load(resume=True)
    resumed.train()
    assert _best(tmp_path) == ("sem_seg/mF1", 0.2, 6)
