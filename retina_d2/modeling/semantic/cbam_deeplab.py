"""``CBAMDeepLabHead``: DeepLabV3+ with CBAM attention, one sigmoid map per lesion (the DDR
CBAM-DeepLab of DESIGN.md).

DeepLabV3+ (Chen et al., ECCV 2018) on a ResNet at output stride 16 (res5 dilated):

- ASPP on the deep feature (``MODEL.CBAM_DEEPLAB.IN_FEATURE``): a 1x1 conv, three 3x3 atrous
  convs (rates 6 / 12 / 18) and image pooling, ``ASPP_CHANNELS`` each, concatenated and projected
  (Detectron2's :class:`~detectron2.layers.ASPP`), then :class:`~retina_d2.modeling.cbam.CBAM`;
- the low-level feature (``LOW_LEVEL_FEATURE``, res2 at stride 4) reduced to 48 channels by a 1x1
  conv, then CBAM;
- the decoder: the ASPP output upsampled bilinearly to the low-level size, concatenated, two 3x3
  convs (``DECODER_CHANNELS``), a 1x1 conv to C lesion logits, upsampled bilinearly (x4) to the
  input.

Every conv is followed by GroupNorm (trained from scratch, no frozen BN). Loss:
:func:`~retina_d2.modeling.losses.cbam_deeplab_losses`, 1.0 Dice + 0.5 BCE + 1.0 focal(0.25, 2) +
0.5 boundary, 255 ignored.
"""
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ASPP, Conv2d, ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn

from ..cbam import CBAM
from ..losses import cbam_deeplab_losses
from .common import (
    LesionSemSegHead,
    any_width_norm,
    check_sigmoid_head_cfg,
    conv_norm_relu,
    upsample_to_image,
)

__all__ = ["CBAMDeepLabHead"]


@SEM_SEG_HEADS_REGISTRY.register()
class CBAMDeepLabHead(LesionSemSegHead):
    """DeepLabV3+ decoder with CBAM after ASPP and after the low-level reduction; see the module
    docstring."""

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        in_feature: str,
        low_level_feature: str,
        aspp_channels: int = 256,
        aspp_dilations: Sequence[int] = (6, 12, 18),
        aspp_dropout: float = 0.1,
        low_level_channels: int = 48,
        decoder_channels: int = 256,
        cbam_reduction: int = 16,
        norm: Union[str, Callable] = "GN",
        loss_weights: Optional[Dict[str, float]] = None,
    ):
        """
        Args:
            input_shape: must hold ``in_feature`` and ``low_level_feature``.
            num_classes: lesion channels C (no background).
            in_feature: the ASPP's input (res5, stride 16 when res5 is dilated: the rates 6 / 12
                / 18 are DeepLab's for output stride 16).
            low_level_feature: the decoder's skip (res2), finer than ``in_feature``.
            aspp_channels: width of every ASPP branch and of its projection.
            aspp_dilations: the three atrous rates.
            aspp_dropout: on the ASPP output during training (DeepLab's 0.1).
            low_level_channels: width of the low-level 1x1 reduction (DeepLabV3+'s 48).
            decoder_channels: width of the two 3x3 decoder convs.
            cbam_reduction: r of both CBAM channel MLPs.
            norm: of every conv but the image pooling's and the predictor ("GN", "" for none).
            loss_weights: keyword arguments of :func:`cbam_deeplab_losses` (term weights, focal
                alpha / gamma, boundary beta); None = the paper's.
        """
        super().__init__()
        for name in (in_feature, low_level_feature):
            if name not in input_shape:
                raise ValueError(f"CBAMDeepLabHead: no feature {name!r} in {sorted(input_shape)}")
        if input_shape[low_level_feature].stride >= input_shape[in_feature].stride:
            raise ValueError(
                f"the low-level feature {low_level_feature!r} must be finer than {in_feature!r}"
            )
        self.in_feature = in_feature
        self.low_level_feature = low_level_feature
        self.num_classes = num_classes
        self.loss_weights = dict(loss_weights or {})
        self.aspp = ASPP(
            input_shape[in_feature].channels,
            aspp_channels,
            list(aspp_dilations),
            norm=any_width_norm(norm),
            activation=nn.ReLU(),
            dropout=aspp_dropout,
        )
        self.aspp_attention = CBAM(aspp_channels, cbam_reduction)
        self.low_level_reduce = conv_norm_relu(
            input_shape[low_level_feature].channels, low_level_channels, 1, norm
        )
        self.low_level_attention = CBAM(low_level_channels, cbam_reduction)
        self.decoder = nn.Sequential(
            conv_norm_relu(aspp_channels + low_level_channels, decoder_channels, 3, norm),
            conv_norm_relu(decoder_channels, decoder_channels, 3, norm),
        )
        self.predictor = Conv2d(decoder_channels, num_classes, kernel_size=1)
        weight_init.c2_msra_fill(self.predictor)
        self.output_stride = input_shape[low_level_feature].stride

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        check_sigmoid_head_cfg(cfg, cls.__name__)
        node = cfg.MODEL.CBAM_DEEPLAB
        for key in ("IN_FEATURE", "LOW_LEVEL_FEATURE"):
            if node[key] not in input_shape:
                raise ValueError(
                    f"MODEL.CBAM_DEEPLAB.{key} {node[key]!r}: the backbone has no such feature "
                    f"(it gives {sorted(input_shape)})"
                )
        return {
            "input_shape": {k: input_shape[k] for k in (node.IN_FEATURE, node.LOW_LEVEL_FEATURE)},
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "in_feature": node.IN_FEATURE,
            "low_level_feature": node.LOW_LEVEL_FEATURE,
            "aspp_channels": node.ASPP_CHANNELS,
            "aspp_dilations": tuple(node.ASPP_DILATIONS),
            "aspp_dropout": node.ASPP_DROPOUT,
            "low_level_channels": node.LOW_LEVEL_CHANNELS,
            "decoder_channels": node.DECODER_CHANNELS,
            "cbam_reduction": node.CBAM_REDUCTION,
            "norm": cfg.MODEL.SEM_SEG_HEAD.NORM,
            "loss_weights": {
                "dice_weight": node.DICE_WEIGHT,
                "bce_weight": node.BCE_WEIGHT,
                "focal_weight": node.FOCAL_WEIGHT,
                "boundary_weight": node.BOUNDARY_WEIGHT,
                "focal_alpha": node.FOCAL_ALPHA,
                "focal_gamma": node.FOCAL_GAMMA,
                "boundary_beta": node.BOUNDARY_BETA,
            },
        }

    def predict(
        self, features: Dict[str, torch.Tensor], image_size: Optional[Tuple[int, int]] = None
    ) -> torch.Tensor:
        """(N, C, H, W) logits at ``image_size``, by default the low-level feature's size times
        its stride."""
        context = self.aspp_attention(self.aspp(features[self.in_feature]))
        low_level = self.low_level_attention(
            self.low_level_reduce(features[self.low_level_feature])
        )
        context = F.interpolate(
            context, size=low_level.shape[-2:], mode="bilinear", align_corners=False
        )
        logits = self.predictor(self.decoder(torch.cat([context, low_level], dim=1)))
        return upsample_to_image(logits, self.output_stride, image_size)

    def losses(self, logits: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        """{"loss_dice", "loss_bce", "loss_focal", "loss_boundary"}, already weighted."""
        return cbam_deeplab_losses(logits, targets, **self.loss_weights)
