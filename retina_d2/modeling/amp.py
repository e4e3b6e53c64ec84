"""Mixed-precision inference: the test-time counterpart of Detectron2's ``SOLVER.AMP.ENABLED``.

Detectron2's ``AMPTrainer`` runs training steps under ``torch.autocast``; evaluation and
prediction run in float32. :class:`AutocastInference` wraps any retina_d2 model (LesionRCNN,
SemanticLesionNet, MultiTaskLesionNet) so its forward pass runs under autocast too
(``RETINA.INFERENCE.AMP``). Convolutions and matrix products then run in half precision, which on
a GPU's tensor cores is where the time goes; everything the model returns is cast back to float32,
so the tiling merge, the evaluators and the JSON writers see the types they see without it.
"""
from typing import Any

import torch
from detectron2.config import configurable
from detectron2.structures import Boxes, Instances
from torch import nn

__all__ = ["AutocastInference", "autocast_dtype_name", "outputs_to_float32"]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def autocast_dtype_name(device: str) -> str:
    """The RETINA.INFERENCE.AMP_DTYPE that suits ``device``: CUDA's tensor cores take float16,
    CPU autocast is built for bfloat16."""
    return "float16" if device.startswith("cuda") else "bfloat16"


def outputs_to_float32(value: Any) -> Any:
    """``value`` with every half-precision tensor in it (inside Instances, Boxes, dicts, lists and
    tuples too) cast to float32; integer, boolean and float32 tensors are returned as they are."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() and value.dtype != torch.float32 else value
    if isinstance(value, Boxes):
        return Boxes(outputs_to_float32(value.tensor))
    if isinstance(value, Instances):
        out = Instances(value.image_size)
        for name, field in value.get_fields().items():
            out.set(name, outputs_to_float32(field))
        return out
    if isinstance(value, dict):
        return {k: outputs_to_float32(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(outputs_to_float32(v) for v in value)
    return value


class AutocastInference(nn.Module):
    """Runs ``model``'s inference under ``torch.autocast`` on the model's device type and returns
    its outputs in float32. While the wrapped model trains it is the model itself (AMPTrainer owns
    autocast then); the model's mode, not the wrapper's, decides, as the wrapper is built around
    a model already in eval mode."""

    @configurable
    def __init__(self, model: nn.Module, *, dtype: torch.dtype = torch.float16):
        super().__init__()
        self.model = model
        self.dtype = dtype

    @classmethod
    def from_config(cls, cfg, model: nn.Module):
        name = cfg.RETINA.INFERENCE.AMP_DTYPE
        if name not in _DTYPES:
            raise ValueError(
                f"RETINA.INFERENCE.AMP_DTYPE must be one of {sorted(_DTYPES)}, got {name!r}"
            )
        return {"model": model, "dtype": _DTYPES[name]}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, batched_inputs):
        if self.model.training:
            return self.model(batched_inputs)
        with torch.autocast(self.device.type, dtype=self.dtype):
            outputs = self.model(batched_inputs)
        return outputs_to_float32(outputs)
