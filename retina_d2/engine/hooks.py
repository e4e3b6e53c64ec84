"""Training hooks: ``LossSwitchHook`` moves two-stage semantic heads to their second loss;
``LesionBestCheckpointer`` keeps the best checkpoint's score across ``--resume``."""
import logging
import math
import os
import pickle

import torch
from detectron2.engine import HookBase, hooks

from ..modeling.checkpoint import checkpoint_damage

__all__ = ["LesionBestCheckpointer", "LossSwitchHook", "loss_switch_iter"]

logger = logging.getLogger(__name__)


def loss_switch_iter(cfg) -> int:
    """The iteration of ``cfg.MODEL.LESION_SEG.LOSS_SWITCH_ITER``, resolved: -1 becomes the first
    LR drop (``SOLVER.STEPS[0]``; 0 without steps), 0 means never.

    Raises:
        ValueError: a value below -1.
    """
    value = int(cfg.MODEL.LESION_SEG.LOSS_SWITCH_ITER)
    if value < -1:
        raise ValueError(f"MODEL.LESION_SEG.LOSS_SWITCH_ITER must be >= -1, got {value}")
    if value == -1:
        return int(cfg.SOLVER.STEPS[0]) if len(cfg.SOLVER.STEPS) else 0
    return value


class LossSwitchHook(HookBase):
    """Sets ``loss_stage = stage`` on every module of the model that has a ``loss_stage``
    attribute (Red-Seg: top-k balanced BCE -> FN+FP; Lesion-Net: pixel Dice -> dual Dice), from
    iteration ``switch_iter`` on: the step numbered ``switch_iter`` is the first to train with
    the stage-2 loss, which with ``switch_iter = SOLVER.STEPS[0]`` is also the first at the
    dropped learning rate. Checked before every step, so a run resumed past the switch resumes in
    stage 2. Modules without ``loss_stage`` are left alone.
    """

    def __init__(self, switch_iter: int, stage: int = 2):
        """
        Args:
            switch_iter: first iteration of the new stage; 0 (or less): never switch.
            stage: the loss stage set from then on.
        """
        self.switch_iter = int(switch_iter)
        self.stage = int(stage)
        self._switched = False

    @classmethod
    def from_config(cls, cfg) -> "LossSwitchHook":
        return cls(loss_switch_iter(cfg))

    def _staged_modules(self):
        return [m for m in self.trainer.model.modules() if hasattr(m, "loss_stage")]

    def before_train(self):
        if self.switch_iter <= 0:
            return
        names = sorted({type(m).__name__ for m in self._staged_modules()})
        if names:
            logger.info(
                f"Loss stage of {names} switches to {self.stage} at iteration {self.switch_iter}"
            )

    def before_step(self):
        if self._switched or self.switch_iter <= 0 or self.trainer.iter < self.switch_iter:
            return
        modules = self._staged_modules()
        for module in modules:
            module.loss_stage = self.stage
        self._switched = True
        if modules:
            logger.info(
                f"Iteration {self.trainer.iter}: loss stage {self.stage} for "
                f"{sorted({type(m).__name__ for m in modules})}"
            )


class LesionBestCheckpointer(hooks.BestCheckpointer):
    """Detectron2's BestCheckpointer (saves ``model_best.pth`` when the validation metric beats
    the best so far) that remembers the best across ``--resume``.

    ``model_best.pth`` carries its own score (``best_metric``, ``best_metric_name`` and
    ``iteration`` beside the weights, written in the same atomic save, so file and score cannot
    disagree). A resumed run (``start_iter > 0``) reads them back before training: its first
    evaluation replaces ``model_best.pth`` only with a better model. A fresh run starts from no
    best, as Detectron2's does.
    """

    def before_train(self):
        if self.trainer.start_iter > 0:
            self._restore_best()

    def best_file(self) -> str:
        return os.path.join(self._checkpointer.save_dir, f"{self._file_prefix}.pth")

    def _restore_best(self):
        path = self.best_file()
        if not os.path.isfile(path):
            return
        record = _best_record(path)
        if isinstance(record, str):
            self._logger.warning(f"{path}: {record}; the first evaluation replaces it")
            return
        name, value, iteration = record
        if name != self._val_metric:
            self._logger.warning(
                f"{path} is the best by {name}, not {self._val_metric}; "
                "the first evaluation replaces it"
            )
            return
        self.best_metric, self.best_iter = value, iteration
        self._logger.info(
            f"Resumed best checkpoint {path}: {name} = {value:0.5f} @ iteration {iteration}"
        )

    def _best_checking(self):
        latest = self.trainer.storage.latest().get(self._val_metric)
        if latest is None:
            self._logger.warning(
                f"Given val metric {self._val_metric} does not seem to be computed/stored. "
                "Will not be checkpointing based on it."
            )
            return
        value, iteration = float(latest[0]), int(latest[1])
        if not math.isfinite(value):
            self._logger.warning(f"{self._val_metric} is {value} @ {iteration}: not compared")
            return
        if self.best_metric is not None and not self._compare(value, self.best_metric):
            self._logger.info(
                f"Not saving as latest eval score for {self._val_metric} is {value:0.5f}, "
                f"not better than best score {self.best_metric:0.5f} @ iteration {self.best_iter}."
            )
            return
        # Numbers and a string only: model_best.pth stays loadable with weights_only=True.
        self._checkpointer.save(
            self._file_prefix,
            iteration=iteration,
            best_metric=value,
            best_metric_name=self._val_metric,
        )
        self._logger.info(
            f"Saved best model: {self._val_metric} = {value:0.5f} @ iteration {iteration}"
            + ("" if self.best_metric is None else f" (was {self.best_metric:0.5f})")
        )
        self.best_metric, self.best_iter = value, iteration


def _best_record(path: str):
    """``(metric name, score, iteration)`` that ``path`` (a model_best.pth) was saved with, or a
    string saying why there is none (damaged file, saved without a score)."""
    damage = checkpoint_damage(path)
    if damage:
        return f"damaged ({damage})"
    try:  # mmap: only the small pickled record is read, not the weights
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, pickle.UnpicklingError, OSError, EOFError, ValueError) as e:
        return f"unreadable ({e})"
    if not isinstance(data, dict) or "best_metric" not in data:
        return "saved without its score (by an older version?)"
    return str(data["best_metric_name"]), float(data["best_metric"]), int(data["iteration"])
