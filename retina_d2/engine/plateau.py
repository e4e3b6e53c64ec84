"""``PlateauHook``: the learning rate reduced on a plateau of the validation metric, and early
stopping, which Detectron2 has neither of (Lesion-Net and CBAM-DeepLab train with both).

Driven by the periodic evaluations (``TEST.EVAL_PERIOD``): after each, the hook reads
``RETINA.PLATEAU.METRIC`` from the trainer's event storage, as ``BestCheckpointer`` does. After
``RETINA.PLATEAU.PATIENCE`` evaluations without improvement the LR is multiplied by
``RETINA.PLATEAU.FACTOR`` (never below ``MIN_LR``), as PyTorch's ``ReduceLROnPlateau``; after
``RETINA.EARLY_STOP.PATIENCE`` evaluations without improvement training ends: ``model_final.pth``
is written and Detectron2's final evaluation runs, as at the last iteration.

The reduction scales the LR scheduler's ``base_lrs``, not the optimizer's LR alone: Detectron2's
``LRScheduler`` hook sets every group's LR to ``base_lr * multiplier(iter)`` after each step and
would undo a change of the optimizer's. With a schedule without steps the multiplier is the
warmup, then 1, so the reduced rate holds. ``base_lrs`` is part of the scheduler's state in every
checkpoint, and the hook's own counters (best value, evaluations without improvement, reductions)
are in the trainer's (``TrainerBase.state_dict`` collects hooks' states): ``--resume`` continues
the plateau where it was.
"""
import logging
import math
from typing import Optional

from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["EarlyStop", "PlateauHook", "plateau_metric", "uses_plateau"]

logger = logging.getLogger(__name__)

# Detectron2's training loop logs any exception that ends it with a traceback; an early stop is
# no failure, so that record is dropped (retina_d2's trainer catches EarlyStop and says why).
_TRAIN_LOOP_LOGGER = "detectron2.engine.train_loop"


class EarlyStop(Exception):
    """Raised by :class:`PlateauHook` to end training; ``LesionTrainer.train`` catches it."""


class _DropEarlyStopRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, EarlyStop)


def plateau_metric(cfg) -> str:
    """``RETINA.PLATEAU.METRIC``, or ``RETINA.EVAL.BEST_METRIC`` when it is empty."""
    return cfg.RETINA.PLATEAU.METRIC or cfg.RETINA.EVAL.BEST_METRIC


class PlateauHook(HookBase):
    """Reduce the LR on a plateau of a validation metric and stop training early; see the module
    docstring. Put it after the ``EvalHook`` (and the best checkpointer), so that it reads the
    evaluation of the same iteration and the best model is saved before training stops."""

    def __init__(
        self,
        *,
        metric: str,
        mode: str = "max",
        factor: float = 0.1,
        patience: int = 10,
        min_lr: float = 0.0,
        base_lr: float,
        reduce_lr: bool = True,
        early_stop_patience: int = 0,
        switch_loss_stage: bool = False,
    ):
        """
        Args:
            metric: the evaluation result read (e.g. "sem_seg/mAUCPR").
            mode: "max" (higher is better) or "min".
            factor: the LR multiplier of a reduction, in (0, 1).
            patience: evaluations without improvement before a reduction.
            min_lr: the reduced SOLVER.BASE_LR never goes below this.
            base_lr: SOLVER.BASE_LR, what ``min_lr`` is compared with.
            reduce_lr: False: early stopping only.
            early_stop_patience: evaluations without improvement that end training; 0 = never.
            switch_loss_stage: at the first reduction, set ``loss_stage = 2`` on every module
                having one (Lesion-Net: dual Dice once the LR is reduced).
        """
        if not metric:
            raise ValueError("RETINA.PLATEAU needs a metric (RETINA.PLATEAU.METRIC or "
                             "RETINA.EVAL.BEST_METRIC)")
        if mode not in ("max", "min"):
            raise ValueError(f"RETINA.PLATEAU.MODE must be 'max' or 'min', got {mode!r}")
        if not 0.0 < factor < 1.0:
            raise ValueError(f"RETINA.PLATEAU.FACTOR must be in (0, 1), got {factor}")
        if patience < 1 or early_stop_patience < 0:
            raise ValueError(
                f"RETINA.PLATEAU.PATIENCE must be >= 1 and RETINA.EARLY_STOP.PATIENCE >= 0, got "
                f"{patience} and {early_stop_patience}"
            )
        self.metric, self.mode = metric, mode
        self.factor, self.patience, self.min_lr = float(factor), int(patience), float(min_lr)
        self.base_lr = float(base_lr)
        self.reduce_lr = bool(reduce_lr)
        self.early_stop_patience = int(early_stop_patience)
        self.switch_loss_stage = bool(switch_loss_stage)
        # The state that checkpoints carry.
        self.best: Optional[float] = None
        self.evals_since_best = 0  # evaluations without improvement, for early stopping
        self.evals_since_reduction = 0  # ... since the best or the last reduction
        self.reductions = 0
        self.lr_scale = 1.0  # the current LR / SOLVER.BASE_LR (warmup aside)
        self._last_seen = -1  # iteration of the last evaluation read
        self._filter = _DropEarlyStopRecords()

    @classmethod
    def from_config(cls, cfg) -> "PlateauHook":
        p = cfg.RETINA.PLATEAU
        return cls(
            metric=plateau_metric(cfg),
            mode=p.MODE,
            factor=p.FACTOR,
            patience=p.PATIENCE,
            min_lr=p.MIN_LR,
            base_lr=cfg.SOLVER.BASE_LR,
            reduce_lr=p.ENABLED,
            early_stop_patience=cfg.RETINA.EARLY_STOP.PATIENCE,
            switch_loss_stage=int(cfg.MODEL.LESION_SEG.LOSS_SWITCH_ITER) == -1,
        )

    # ---------------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        # Numbers only: checkpoints stay loadable with weights_only=True.
        return {
            "best": self.best,
            "evals_since_best": self.evals_since_best,
            "evals_since_reduction": self.evals_since_reduction,
            "reductions": self.reductions,
            "lr_scale": self.lr_scale,
            "last_seen": self._last_seen,
        }

    def load_state_dict(self, state: dict) -> None:
        # The LR itself comes back with the scheduler's base_lrs (its own state).
        self.best = state["best"]
        self.evals_since_best = int(state["evals_since_best"])
        self.evals_since_reduction = int(state["evals_since_reduction"])
        self.reductions = int(state["reductions"])
        self.lr_scale = float(state["lr_scale"])
        self._last_seen = int(state["last_seen"])

    # ---------------------------------------------------------------------------------- hooks

    def before_train(self):
        logging.getLogger(_TRAIN_LOOP_LOGGER).addFilter(self._filter)
        if self.reductions and self.switch_loss_stage:
            self._set_loss_stage(2)  # a run resumed after the first reduction

    def after_train(self):
        logging.getLogger(_TRAIN_LOOP_LOGGER).removeFilter(self._filter)

    def after_step(self):
        latest = self.trainer.storage.latest().get(self.metric)
        fresh = latest is not None and int(latest[1]) != self._last_seen
        # Only the main process has the evaluation's numbers: it decides, every rank follows.
        decision = self._observe(latest) if fresh and comm.is_main_process() else None
        if comm.get_world_size() > 1:
            decision = comm.all_gather(decision)[0]
        if decision is None:
            return
        self._last_seen = decision["iteration"]
        if decision["reduce"]:
            self._reduce()
        if decision["stop"]:
            self._stop()

    # ---------------------------------------------------------------------------------- logic

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def _observe(self, latest) -> Optional[dict]:
        """Update the counters with one evaluation; what to do about it (None: nothing)."""
        value, iteration = float(latest[0]), int(latest[1])
        if not math.isfinite(value):
            logger.warning(f"{self.metric} is {value} @ {iteration}: not compared")
            self._last_seen = iteration
            return {"iteration": iteration, "reduce": False, "stop": False}
        if self._improved(value):
            self.best, self.evals_since_best, self.evals_since_reduction = value, 0, 0
        else:
            self.evals_since_best += 1
            self.evals_since_reduction += 1
        reduce = self.reduce_lr and self.evals_since_reduction >= self.patience
        if reduce:
            self.evals_since_reduction = 0
        stop = 0 < self.early_stop_patience <= self.evals_since_best
        return {"iteration": iteration, "reduce": reduce, "stop": stop}

    def _reduce(self):
        floor = self.min_lr / self.base_lr if self.base_lr > 0 else 0.0
        new_scale = max(self.lr_scale * self.factor, floor)
        if new_scale >= self.lr_scale:
            logger.info(f"{self.metric} on a plateau; the LR is already at its floor {self.min_lr}")
            return
        ratio = new_scale / self.lr_scale
        scheduler = self.trainer.scheduler
        scheduler.base_lrs = [lr * ratio for lr in scheduler.base_lrs]
        for group in self.trainer.optimizer.param_groups:  # the next step's LR, at once
            group["lr"] *= ratio
        self.lr_scale = new_scale
        self.reductions += 1
        logger.info(
            f"Iteration {self.trainer.iter}: {self.metric} has not improved on {self.best} for "
            f"{self.patience} evaluations; LR reduced to {self.base_lr * new_scale:g}"
        )
        if self.reductions == 1 and self.switch_loss_stage:
            self._set_loss_stage(2)

    def _set_loss_stage(self, stage: int):
        modules = [m for m in self.trainer.model.modules() if hasattr(m, "loss_stage")]
        for module in modules:
            module.loss_stage = stage
        if modules:
            logger.info(f"Loss stage {stage} for {sorted({type(m).__name__ for m in modules})}")

    def _stop(self):
        trainer = self.trainer
        message = (
            f"Early stop at iteration {trainer.iter}: {self.metric} has not improved on "
            f"{self.best} for {self.evals_since_best} evaluations"
        )
        logger.info(message)
        # The loop ends here: this iteration is the last. EvalHook's final evaluation runs
        # (iter + 1 >= max_iter), and model_final.pth is written as at a full run's end.
        trainer.max_iter = trainer.iter + 1
        checkpointer = getattr(trainer, "checkpointer", None)
        if checkpointer is not None:
            checkpointer.save("model_final", iteration=trainer.iter)
        raise EarlyStop(message)


def uses_plateau(cfg) -> bool:
    """Whether ``cfg`` asks for :class:`PlateauHook` (a plateau schedule or early stopping).

    Raises:
        ValueError: asked for without periodic evaluation (``TEST.EVAL_PERIOD`` 0), which is
            what drives it.
    """
    wanted = cfg.RETINA.PLATEAU.ENABLED or cfg.RETINA.EARLY_STOP.PATIENCE > 0
    if wanted and cfg.TEST.EVAL_PERIOD <= 0:
        raise ValueError(
            "RETINA.PLATEAU / RETINA.EARLY_STOP are driven by the periodic evaluation: set "
            "TEST.EVAL_PERIOD > 0"
        )
    return bool(wanted)
