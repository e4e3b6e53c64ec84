"""Which model an evaluation scored: its weights file and training iteration, for
``eval_info.json`` and the report's page.

Two cases, told apart by Detectron2's event storage (present only inside a training loop):

- **during training** (the trainer's periodic and final evaluations): the model in memory after
  iteration ``storage.iter`` (a periodic evaluation runs in that iteration's ``after_step``;
  the final one in ``after_train``, where Detectron2 has moved ``storage.iter`` on to
  ``MAX_ITER``, so it is taken back to ``MAX_ITER - 1``, the iteration ``model_final.pth``
  stores). The file holding those weights is named when the periodic checkpointer wrote one
  at that iteration (``model_<iter:07d>.pth``, or ``model_final.pth`` at the last one), which
  it does before the evaluation hook runs; otherwise there is none, and the record says so.
- **``--eval-only``** (or any evaluation outside training): ``MODEL.WEIGHTS``, and the
  ``iteration`` stored in that checkpoint when it is a local file that holds one (read with the
  same safe loader as the weights).
"""
import logging
import os
from typing import Optional

__all__ = ["scored_model", "checkpoint_iteration"]

logger = logging.getLogger(__name__)


def checkpoint_iteration(path: str, trust: bool = False) -> Optional[int]:
    """The ``iteration`` a trainer checkpoint stores; None for a file without one (a model-zoo
    or torchvision file, a URL, a file that cannot be read safely)."""
    if not path or not os.path.isfile(path):
        return None
    from ..safe_load import CheckpointError, load_checkpoint

    try:
        checkpoint = load_checkpoint(path, trust=trust)
    except (CheckpointError, OSError) as e:
        logger.warning("cannot read the iteration of %s: %s", path, e)
        return None
    iteration = checkpoint.get("iteration") if isinstance(checkpoint, dict) else None
    return int(iteration) if isinstance(iteration, int) else None


def _training_iteration() -> Optional[int]:
    from detectron2.utils.events import get_event_storage

    try:
        return int(get_event_storage().iter)
    except AssertionError:  # no storage: not inside a training loop
        return None


def scored_model(cfg) -> dict:
    """``{"weights": path or None, "iteration": int or None, "during_training": bool}`` of the
    model an evaluation built from ``cfg`` now scores (module docstring)."""
    iteration = _training_iteration()
    if iteration is not None:
        iteration = min(iteration, cfg.SOLVER.MAX_ITER - 1)
        names = [f"model_{iteration:07d}.pth"]
        if iteration >= cfg.SOLVER.MAX_ITER - 1:
            names.insert(0, "model_final.pth")
        saved = [os.path.join(cfg.OUTPUT_DIR, n) for n in names]
        weights = next((os.path.abspath(p) for p in saved if os.path.isfile(p)), None)
        return {"weights": weights, "iteration": iteration, "during_training": True}
    weights = cfg.MODEL.WEIGHTS or None
    local = weights if weights and os.path.isfile(weights) else None
    return {
        "weights": os.path.abspath(local) if local else weights,
        "iteration": checkpoint_iteration(local, cfg.MODEL.TRUST_CHECKPOINT) if local else None,
        "during_training": False,
    }
