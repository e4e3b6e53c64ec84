"""Loading user-supplied weights from local files: Detectron2 ``.pkl`` / ``.pth`` checkpoints and
torchvision ResNet ``.pth`` state dicts. Nothing is ever fetched: these machines have no model hub.
"""
import logging
import os
import re
from typing import Dict

import torch
from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["LesionCheckpointer", "torchvision_resnet_to_detectron2"]

logger = logging.getLogger(__name__)

_TV_LAYER = re.compile(r"^layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.0|downsample\.1)\.(.+)$")


def _is_torchvision_resnet(state: Dict[str, torch.Tensor]) -> bool:
    return "conv1.weight" in state and any(k.startswith("layer1.0.") for k in state)


def torchvision_resnet_to_detectron2(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """Rename a torchvision ResNet state dict to Detectron2's ResNet names under ``prefix``.

    ``layer1`` is Detectron2's ``res2``, ``bnK`` the norm of ``convK``, ``downsample`` the
    ``shortcut``; the classifier (``fc``) and BN's ``num_batches_tracked`` are dropped.
    """
    renamed = {}
    for key, value in state.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        if key == "conv1.weight":
            new = "stem.conv1.weight"
        elif key.startswith("bn1."):
            new = "stem.conv1.norm." + key[len("bn1."):]
        else:
            m = _TV_LAYER.match(key)
            if m is None:
                logger.warning("torchvision weight %s has no Detectron2 counterpart; skipped", key)
                continue
            stage, block, part, param = m.groups()
            part = {
                "downsample.0": "shortcut",
                "downsample.1": "shortcut.norm",
            }.get(part, part if part.startswith("conv") else f"conv{part[2:]}.norm")
            new = f"res{int(stage) + 1}.{block}.{part}.{param}"
        renamed[prefix + new] = value
    return renamed


class LesionCheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` that also reads torchvision ResNet weights and names a
    missing weights file clearly."""

    def load(self, path, *args, **kwargs):
        if path and not os.path.isfile(path):
            raise FileNotFoundError(
                f"MODEL.WEIGHTS = {path!r}: no such file. Weights are read from local disk only "
                "(a Detectron2 .pkl/.pth checkpoint or a torchvision ResNet .pth); leave "
                "MODEL.WEIGHTS empty to train from scratch."
            )
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename):
        loaded = super()._load_file(filename)
        model_state = loaded.get("model", loaded)
        if filename.endswith(".pth") and _is_torchvision_resnet(model_state):
            keys = self.model.state_dict().keys()
            prefix = "backbone.bottom_up." if any(k.startswith("backbone.bottom_up.") for k in keys) else "backbone."
            logger.info("Reading %s as torchvision ResNet weights for %s*", filename, prefix)
            return {"model": torchvision_resnet_to_detectron2(model_state, prefix), "__author__": "torchvision"}
        return loaded
