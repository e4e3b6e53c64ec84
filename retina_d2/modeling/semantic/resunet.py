"""``ResUNetHead``: the ResUNet report's decoder, one softmax over background and the lesions.

The expansive path of a U-Net over the encoder's features (``build_unet_encoder_backbone``):
from the coarsest feature up, a transposed conv (kernel = stride = the stride ratio, 2 in U-Net)
brings the map to the next finer feature's resolution and width, the skip feature is
concatenated, and a :class:`~retina_d2.modeling.encoders.ResidualDoubleConv` (dropout 0.3, no
normalisation) merges them; a 1x1 conv predicts background + C lesion logits. Kaiming init
for every conv but that classifier, which starts near zero (see ``__init__``).

The (N, C, H, W) uint8 per-lesion targets become one class per pixel
(:func:`softmax_class_targets`), trained with :func:`~retina_d2.modeling.losses.resunet_losses`:
softmax focal (gamma 2, alpha 0.25 background / 0.75 lesions) + soft Dice without background.
"""
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn

from ..encoders import ResidualDoubleConv, kaiming_init
from ..losses import IGNORE_VALUE, resunet_class_alpha, resunet_losses
from .common import LesionSemSegHead, check_ignore_value_cfg, check_in_features

__all__ = ["ResUNetHead", "softmax_class_targets", "fit_to_image_size"]


def softmax_class_targets(targets: torch.Tensor) -> torch.Tensor:
    """Per-lesion targets -> softmax class indices.

    A pixel is class ``1 + k`` for the first lesion channel k (thing_classes order) that is 1
    there; background (0) where every channel is 0; :data:`IGNORE_VALUE` where no channel is
    positive and at least one is ignore (the pixel might hold that lesion).

    Args:
        targets: uint8 (N, C, H, W) with 0 / 1 / 255.

    Returns:
        int64 (N, H, W).
    """
    positive = (targets > 0) & (targets != IGNORE_VALUE)
    any_positive = positive.any(dim=1)
    # argmax returns the first maximal index: the first positive lesion in thing order.
    first = positive.to(torch.uint8).argmax(dim=1) + 1
    ignore = (targets == IGNORE_VALUE).any(dim=1)
    background = torch.where(ignore, IGNORE_VALUE, 0)
    return torch.where(any_positive, first, background).long()


def fit_to_image_size(
    logits: torch.Tensor, stride: int, image_size: Optional[Tuple[int, int]] = None
) -> torch.Tensor:
    """Logits of a stride-``stride`` map -> logits at ``image_size`` (default: the map's size
    times ``stride``).

    Upsampled (bilinear) by ``stride`` to the size the encoder padded its input to, then cropped
    to ``image_size`` (the pad lies bottom and right); a map that would not cover ``image_size``
    (features not from this toolkit's padded encoders) is resized to it instead.
    """
    if image_size is None:
        image_size = tuple(s * stride for s in logits.shape[-2:])
    if stride > 1:
        logits = F.interpolate(logits, scale_factor=stride, mode="bilinear", align_corners=False)
    h, w = image_size
    if logits.shape[-2] >= h and logits.shape[-1] >= w:
        return logits[..., :h, :w]
    return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)


@SEM_SEG_HEADS_REGISTRY.register()
class ResUNetHead(LesionSemSegHead):
    """U-Net decoder with residual blocks and a background + C class softmax; see the module
    docstring."""

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        dropout: float = 0.3,
        focal_alpha: Sequence[float] = (0.25, 0.75),
        focal_gamma: float = 2.0,
        focal_weight: float = 1.0,
        dice_weight: float = 1.0,
    ):
        """
        Args:
            input_shape: the encoder features to merge; each stride must be an integer multiple
                of the next finer one's.
            num_classes: lesion channels C; the head outputs C + 1 logits, background first.
            dropout: of the decoder's residual blocks.
            focal_alpha: (background, lesion) focal weights.
            focal_gamma: focal exponent.
            focal_weight, dice_weight: weights of the two loss terms.
        """
        super().__init__()
        if not input_shape:
            raise ValueError("ResUNetHead needs at least one input feature")
        if len(focal_alpha) != 2:
            raise ValueError(f"focal_alpha is (background, lesion), got {list(focal_alpha)}")
        shapes = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [name for name, _ in shapes]
        self.strides = [shape.stride for _, shape in shapes]
        for fine, coarse in zip(self.strides, self.strides[1:]):
            if coarse % fine or coarse == fine:
                raise ValueError(
                    f"ResUNetHead needs strides that grow by integer factors, got {self.strides} "
                    f"for {self.in_features}"
                )
        self.num_classes = num_classes
        self.class_alpha = resunet_class_alpha(num_classes + 1, *focal_alpha)
        self.focal_gamma = focal_gamma
        self.focal_weight = focal_weight
        self.dice_weight = dice_weight

        # Decoder step i brings the map from feature i + 1's resolution to feature i's.
        self.upsamplers = nn.ModuleList()
        self.blocks = nn.ModuleList()
        channels = shapes[-1][1].channels
        for i in range(len(shapes) - 2, -1, -1):
            skip_channels = shapes[i][1].channels
            ratio = self.strides[i + 1] // self.strides[i]
            self.upsamplers.append(
                nn.ConvTranspose2d(channels, skip_channels, kernel_size=ratio, stride=ratio)
            )
            self.blocks.append(ResidualDoubleConv(2 * skip_channels, skip_channels, dropout))
            channels = skip_channels
        self.predictor = nn.Conv2d(channels, num_classes + 1, kernel_size=1)
        kaiming_init(self)
        # Without normalisation the residual sums grow the features' scale block by block; a
        # Kaiming classifier would start with logits of std ~20, a saturated softmax. Starting it
        # near zero gives a uniform softmax and gradients to every class.
        nn.init.normal_(self.predictor.weight, std=0.01)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        r = cfg.MODEL.RESUNET
        check_in_features("MODEL.RESUNET.IN_FEATURES", r.IN_FEATURES, input_shape)
        activation = cfg.MODEL.LESION_SEG.ACTIVATION
        if activation != "softmax":
            raise ValueError(
                "ResUNetHead predicts one softmax over background and lesions; set "
                f"MODEL.LESION_SEG.ACTIVATION to 'softmax' (got {activation!r})"
            )
        check_ignore_value_cfg(cfg)
        return {
            "input_shape": {f: input_shape[f] for f in r.IN_FEATURES},
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "dropout": r.DROPOUT,
            "focal_alpha": list(r.FOCAL_ALPHA),
            "focal_gamma": r.FOCAL_GAMMA,
            "focal_weight": r.FOCAL_WEIGHT,
            "dice_weight": r.DICE_WEIGHT,
        }

    def layers(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The decoder: (N, C + 1) logits at the finest input feature's resolution."""
        x = features[self.in_features[-1]]
        skips = reversed(self.in_features[:-1])
        for skip_name, upsample, block in zip(skips, self.upsamplers, self.blocks):
            skip = features[skip_name]
            x = upsample(x)
            if x.shape[-2:] != skip.shape[-2:]:
                # Only features of an unpadded odd-sized input differ (U-Net crops; we resize).
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([skip, x], dim=1))
        return self.predictor(x)

    def predict(
        self, features: Dict[str, torch.Tensor], image_size: Optional[Tuple[int, int]] = None
    ) -> torch.Tensor:
        """(N, C + 1, H, W) logits at ``image_size``, background first; by default the finest
        feature's size times its stride."""
        return fit_to_image_size(self.layers(features).float(), self.strides[0], image_size)

    def losses(self, logits: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        """ResUNet's focal + Dice loss ({"loss_focal", "loss_dice"}) of (N, C + 1, H, W) logits
        against per-lesion targets."""
        if targets.shape[1] != self.num_classes:
            raise ValueError(
                f"ResUNetHead has {self.num_classes} lesion classes but the targets have "
                f"{targets.shape[1]} channels"
            )
        return resunet_losses(
            logits,
            softmax_class_targets(targets),
            focal_weight=self.focal_weight,
            dice_weight=self.dice_weight,
            alpha=self.class_alpha,
            gamma=self.focal_gamma,
        )
