"""``LesionFPNSemHead``: Panoptic FPN's semantic branch with one sigmoid map per lesion.

A light head on any FPN (Detectron2's ``SemSegFPNHead`` design): every level in
``MODEL.SEM_SEG_HEAD.IN_FEATURES`` is brought to ``COMMON_STRIDE`` by 3x3 convs and 2x bilinear
upsamplings, the levels are summed, and a 1x1 conv predicts ``NUM_CLASSES`` lesion logits, which
are upsampled to the input. Trained with BCE + soft Dice (retina_d2.modeling.losses), 255 ignored.
It is the baseline semantic head of SemanticLesionNet and of LesionRCNN with
``MODEL.LESION_SEG.ENABLED``.
"""
from typing import Callable, Dict, Optional, Tuple, Union

import fvcore.nn.weight_init as weight_init
import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn

from ..losses import sigmoid_bce_loss, sigmoid_dice_loss
from .common import (
    LesionSemSegHead,
    check_in_features,
    check_sigmoid_head_cfg,
    upsample_to_image,
)

__all__ = ["LesionFPNSemHead"]


@SEM_SEG_HEADS_REGISTRY.register()
class LesionFPNSemHead(LesionSemSegHead):
    """Per-lesion sigmoid logits from FPN features; see the module docstring."""

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        conv_dims: int,
        common_stride: int,
        norm: Optional[Union[str, Callable]] = None,
        dice_weight: float = 1.0,
    ):
        """
        Args:
            input_shape: channels and stride of each input feature; all of them are used.
            num_classes: lesion channels C (no background).
            conv_dims: channels of the intermediate convs (a multiple of 32 with "GN").
            common_stride: stride at which the levels are summed: a power of 2, no larger than
                the finest input's stride.
            norm: normalisation of the convs ("GN", "" for none, ...).
            dice_weight: weight of the soft Dice loss beside BCE (0: BCE alone).
        """
        super().__init__()
        if not input_shape:
            raise ValueError("LesionFPNSemHead needs at least one input feature")
        shapes = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        if shapes[0][1].stride < common_stride:
            raise ValueError(
                f"common_stride {common_stride} is coarser than feature {shapes[0][0]!r} (stride "
                f"{shapes[0][1].stride}); the head only upsamples"
            )
        self.in_features = [k for k, _ in shapes]
        self.common_stride = common_stride
        self.num_classes = num_classes
        self.dice_weight = dice_weight
        self.scale_heads = nn.ModuleList()
        for _, shape in shapes:
            ops = []
            length = max(1, int(np.log2(shape.stride) - np.log2(common_stride)))
            for k in range(length):
                conv = Conv2d(
                    shape.channels if k == 0 else conv_dims,
                    conv_dims,
                    kernel_size=3,
                    padding=1,
                    bias=not norm,
                    norm=get_norm(norm, conv_dims),
                    activation=F.relu,
                )
                weight_init.c2_msra_fill(conv)
                ops.append(conv)
                if shape.stride > common_stride:
                    ops.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            self.scale_heads.append(nn.Sequential(*ops))
        self.predictor = Conv2d(conv_dims, num_classes, kernel_size=1)
        weight_init.c2_msra_fill(self.predictor)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        check_in_features("MODEL.SEM_SEG_HEAD.IN_FEATURES", head.IN_FEATURES, input_shape)
        check_sigmoid_head_cfg(cfg, cls.__name__)
        return {
            "input_shape": {k: input_shape[k] for k in head.IN_FEATURES},
            "num_classes": head.NUM_CLASSES,
            "conv_dims": head.CONVS_DIM,
            "common_stride": head.COMMON_STRIDE,
            "norm": head.NORM,
        }

    def predict(
        self, features: Dict[str, torch.Tensor], image_size: Optional[Tuple[int, int]] = None
    ) -> torch.Tensor:
        """(N, C, H, W) logits at ``image_size``, by default the finest feature times its
        stride."""
        x = None
        for name, head in zip(self.in_features, self.scale_heads):
            y = head(features[name])
            x = y if x is None else x + y
        return upsample_to_image(self.predictor(x), self.common_stride, image_size)

    def losses(self, logits: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        """BCE and soft Dice ({"loss_sem_seg_bce", "loss_sem_seg_dice"}) over the valid (non-255)
        pixels of every lesion map."""
        losses = {"loss_sem_seg_bce": sigmoid_bce_loss(logits, targets)}
        if self.dice_weight > 0:
            losses["loss_sem_seg_dice"] = self.dice_weight * sigmoid_dice_loss(logits, targets)
        return losses
