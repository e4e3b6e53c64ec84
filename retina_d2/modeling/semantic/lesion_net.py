"""``LesionNetHead``: Lesion-Net's expansive path (Wei et al., "Learn to segment retinal lesions
and beyond", ICPR 2020), one sigmoid map per lesion.

An encoder (any backbone; its features named in ``MODEL.LESION_NET.IN_FEATURES``) is followed by
a U-Net-style copy-and-merge path whose length sets the variant: Lesion-Net-Ks predicts at stride
K (``MODEL.LESION_NET.OUTPUT_STRIDE``), log2(deepest stride / K) merge stages above the deepest
feature. Every stage (the deepest feature included) ends in ``NUM_CONVS`` 3x3 conv-norm-ReLU
layers; a merge stage first brings the coarser map up by a 1x1 conv and parameter-free bilinear
upsampling to the skip's size, then *concatenates* the encoder feature of that stride (U-Net's
copy and merge; a stride the encoder has no feature at is upsampled without a merge). A 1x1 conv
predicts the C lesion logits at stride K, resized bilinearly to the input.

Loss: soft pixel Dice (:func:`~retina_d2.modeling.losses.sigmoid_dice_loss`) in stage 1 and,
from the first LR drop (``loss_stage`` = 2, set by ``LossSwitchHook``), the dual Dice loss
(:func:`~retina_d2.modeling.losses.dual_dice_loss`, lambda 0.8), whose image term scores
Lesion-Net's image-level lesion classification: the global max of each map
(:func:`image_lesion_scores`).
"""
from typing import Callable, Dict, List, Optional, Tuple, Union

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn

from ..losses import DICE_FORMS, dual_dice_loss, sigmoid_dice_loss
from .common import (
    LesionSemSegHead,
    check_in_features,
    check_sigmoid_head_cfg,
    conv_norm_relu,
    upsample_to_image,
)

__all__ = ["LesionNetHead", "image_lesion_scores"]

LOSS_STAGES = (1, 2)


def image_lesion_scores(sem_seg: torch.Tensor) -> torch.Tensor:
    """Lesion-Net's image-level lesion classification: the global max pool of each lesion map.

    Args:
        sem_seg: (..., C, H, W) probabilities (or logits: the max commutes with the sigmoid).

    Returns:
        (..., C) scores.
    """
    return sem_seg.amax(dim=(-2, -1))


class _ExpansiveStage(nn.Module):
    """One copy-and-merge stage: 1x1 conv, bilinear upsampling, concatenation with the skip
    (when there is one), 3x3 convs."""

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        conv_dims: int,
        num_convs: int,
        norm: Union[str, Callable],
    ):
        super().__init__()
        self.project = Conv2d(in_channels, conv_dims, kernel_size=1)
        weight_init.c2_msra_fill(self.project)
        channels = conv_dims + skip_channels
        convs = []
        for _ in range(num_convs):
            convs.append(conv_norm_relu(channels, conv_dims, 3, norm))
            channels = conv_dims
        self.convs = nn.Sequential(*convs)
        self.out_channels = channels

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.project(x)
        if skip is None:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        else:
            # To the skip's size rather than x2: exact on padded inputs, and still aligned when a
            # backbone does not pad to its deepest stride.
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, skip], dim=1)
        return self.convs(x)


@SEM_SEG_HEADS_REGISTRY.register()
class LesionNetHead(LesionSemSegHead):
    """Lesion-Net-Ks: copy-and-merge expansive path to stride K, per-lesion sigmoid logits, pixel
    Dice then dual Dice loss; see the module docstring."""

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        output_stride: int,
        conv_dims: int,
        num_convs: int = 2,
        norm: Union[str, Callable] = "GN",
        dual_dice_lambda: float = 0.8,
        dice: str = "per_lesion",
    ):
        """
        Args:
            input_shape: the encoder features the path may use, by name; one per stride, all
                strides powers of 2. Features finer than ``output_stride`` are left unused.
            num_classes: lesion channels C (no background).
            output_stride: K of Lesion-Net-Ks, a power of 2 no larger than the deepest stride.
            conv_dims: channels of the path's convs.
            num_convs: 3x3 convs closing every stage (the deepest included); 0 leaves only the
                1x1 projections.
            norm: of the 3x3 convs ("GN", "" for none, ...).
            dual_dice_lambda: weight of the pixel term in the stage-2 dual Dice loss.
            dice: the Dice of both losses, "per_lesion" or "squared_pooled" (the paper's:
                squared denominators, pooled over pixels and lesions; see losses.DICE_FORMS).
        """
        super().__init__()
        if not input_shape:
            raise ValueError("LesionNetHead needs at least one encoder feature")
        by_stride = {}
        for name, shape in input_shape.items():
            if shape.stride & (shape.stride - 1):
                raise ValueError(f"feature {name!r} has stride {shape.stride}, not a power of 2")
            if shape.stride in by_stride:
                raise ValueError(
                    f"features {by_stride[shape.stride]!r} and {name!r} share stride "
                    f"{shape.stride} (a dilated stage?); give LesionNetHead one feature per stride"
                )
            by_stride[shape.stride] = name
        deepest_stride = max(by_stride)
        power_of_two = output_stride >= 1 and not output_stride & (output_stride - 1)
        if not power_of_two or output_stride > deepest_stride:
            raise ValueError(
                f"output_stride must be a power of 2 no larger than the deepest feature's stride "
                f"{deepest_stride}, got {output_stride}"
            )
        self.num_classes = num_classes
        self.output_stride = output_stride
        self.dual_dice_lambda = dual_dice_lambda
        if dice not in DICE_FORMS:
            raise ValueError(f"MODEL.LESION_NET.DICE must be one of {DICE_FORMS}, got {dice!r}")
        self.dice = dice
        self.loss_stage = 1

        deepest = by_stride[deepest_stride]
        self.deepest_feature = deepest
        # The deepest stage merges nothing: only its convs.
        channels = input_shape[deepest].channels
        bottom = []
        for _ in range(num_convs):
            bottom.append(conv_norm_relu(channels, conv_dims, 3, norm))
            channels = conv_dims
        self.bottom = nn.Sequential(*bottom)
        self.skip_features: List[Optional[str]] = []
        stages = []
        stride = deepest_stride
        while stride > output_stride:
            stride //= 2
            skip = by_stride.get(stride)
            skip_channels = input_shape[skip].channels if skip else 0
            stages.append(_ExpansiveStage(channels, skip_channels, conv_dims, num_convs, norm))
            channels = stages[-1].out_channels
            self.skip_features.append(skip)
        self.stages = nn.ModuleList(stages)
        self.predictor = Conv2d(channels, num_classes, kernel_size=1)
        weight_init.c2_msra_fill(self.predictor)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        check_sigmoid_head_cfg(cfg, cls.__name__)
        node = cfg.MODEL.LESION_NET
        check_in_features("MODEL.LESION_NET.IN_FEATURES", node.IN_FEATURES, input_shape)
        return {
            "input_shape": {f: input_shape[f] for f in node.IN_FEATURES},
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "output_stride": node.OUTPUT_STRIDE,
            "conv_dims": node.CONVS_DIM,
            "num_convs": node.NUM_CONVS,
            "norm": cfg.MODEL.SEM_SEG_HEAD.NORM,
            "dual_dice_lambda": node.DUAL_DICE_LAMBDA,
            "dice": node.DICE,
        }

    @property
    def in_features(self) -> List[str]:
        """The encoder features the path uses, deepest first."""
        return [self.deepest_feature] + [f for f in self.skip_features if f is not None]

    def predict(
        self, features: Dict[str, torch.Tensor], image_size: Optional[Tuple[int, int]] = None
    ) -> torch.Tensor:
        """(N, C, H, W) logits at ``image_size``, by default the prediction's size times the
        output stride."""
        x = self.bottom(features[self.deepest_feature])
        for stage, skip in zip(self.stages, self.skip_features):
            x = stage(x, features[skip] if skip is not None else None)
        return upsample_to_image(self.predictor(x), self.output_stride, image_size)

    def losses(self, logits: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Stage 1: soft pixel Dice ({"loss_pixel_dice"}); stage 2: dual Dice, pixel +
        image-level ({"loss_dual_dice"}); 255 ignored."""
        if self.loss_stage not in LOSS_STAGES:
            raise ValueError(f"LesionNetHead.loss_stage must be 1 or 2, got {self.loss_stage}")
        if self.loss_stage == 1:
            return {"loss_pixel_dice": sigmoid_dice_loss(logits, targets, form=self.dice)}
        dual = dual_dice_loss(
            logits, targets, pixel_weight=self.dual_dice_lambda, form=self.dice
        )
        return {"loss_dual_dice": dual}
