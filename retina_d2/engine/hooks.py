"""Training hooks: ``LossSwitchHook`` moves two-stage semantic heads to their second loss."""
import logging

from detectron2.engine import HookBase

__all__ = ["LossSwitchHook", "loss_switch_iter"]

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
