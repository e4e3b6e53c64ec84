"""Inception-v3 as a multi-scale encoder: Lesion-Net's contracting path and its grading CNN
(Wei et al., ICPR 2020, both "Inception-v3 pre-trained on ImageNet").

The layers are torchvision's own (``torchvision.models.inception_v3``), under their torchvision
names, so torchvision's published ImageNet weights load without renaming beyond dropping the
classifiers (:func:`retina_d2.modeling.pretrained.torchvision_inception_v3_to_encoder`).

Padding: torchvision's Inception-v3 pads none of its 3x3 reductions ("valid"), so a 896 px input
leaves a 26 px stride-32 map. Lesion-Net's is 28 (= 896 / 32, the paper's "28 x 28"), so here
every stride-1 3x3 conv that torchvision leaves unpadded gets a padding of 1, and every stride-2
3x3 window (the stem conv, both max pools, Mixed_6a and Mixed_7a) sees its input padded by one
row and column at the bottom and right (TensorFlow's "SAME" for an even size). Weights are
untouched by padding; with the input padded to a multiple of 32 every feature of stride s is
exactly ``padded size / s``.

Features (channels): ``Conv2d_2b_3x3`` at stride 2 (64), ``Conv2d_4a_3x3`` at 4 (192),
``Mixed_5d`` at 8 (288), ``Mixed_6e`` at 16 (768), ``Mixed_7c`` at 32 (2048, the grading
features the side attention weights).
"""
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import Backbone
from torch import nn

from .encoders import pad_to_divisible

__all__ = ["INCEPTION_FEATURES", "InceptionV3Encoder", "build_inception_v3_backbone"]

# (torchvision module, stride-2 window that needs the "SAME" pad, output stride, channels or
# None when the module is no output).
_LAYERS = (
    ("Conv2d_1a_3x3", True, 2, None),
    ("Conv2d_2a_3x3", False, 2, None),
    ("Conv2d_2b_3x3", False, 2, 64),
    ("maxpool1", True, 4, None),
    ("Conv2d_3b_1x1", False, 4, None),
    ("Conv2d_4a_3x3", False, 4, 192),
    ("maxpool2", True, 8, None),
    ("Mixed_5b", False, 8, None),
    ("Mixed_5c", False, 8, None),
    ("Mixed_5d", False, 8, 288),
    ("Mixed_6a", True, 16, None),
    ("Mixed_6b", False, 16, None),
    ("Mixed_6c", False, 16, None),
    ("Mixed_6d", False, 16, None),
    ("Mixed_6e", False, 16, 768),
    ("Mixed_7a", True, 32, None),
    ("Mixed_7b", False, 32, None),
    ("Mixed_7c", False, 32, 2048),
)
INCEPTION_FEATURES = tuple(name for name, _, _, channels in _LAYERS if channels)
# torchvision's unpadded stride-1 3x3 convs, padded here to keep their input's size.
_UNPADDED_3X3 = ("Conv2d_2a_3x3", "Conv2d_4a_3x3")
NORMS = ("FrozenBN", "BN")


class InceptionV3Encoder(Backbone):
    """torchvision's Inception-v3 up to ``Mixed_7c`` (no pooling, dropout or classifier),
    padded so every stride is exact; see the module docstring."""

    def __init__(
        self,
        out_features: Sequence[str] = INCEPTION_FEATURES,
        norm: str = "FrozenBN",
        init_weights: bool = True,
    ):
        """
        Args:
            out_features: the features to return, among :data:`INCEPTION_FEATURES`.
            norm: "FrozenBN" (BN statistics and affine fixed at the loaded weights', as
                Detectron2 fine-tunes a pretrained trunk at small batch sizes) or "BN" (trained,
                batch statistics).
            init_weights: torchvision's initialisation (truncated normal); False leaves
                PyTorch's defaults (a pretrained start overwrites either).
        """
        super().__init__()
        from torchvision.models import inception_v3

        unknown = [f for f in out_features if f not in INCEPTION_FEATURES]
        if unknown or not out_features:
            raise ValueError(
                f"InceptionV3Encoder out_features {list(out_features)}: choose among "
                f"{list(INCEPTION_FEATURES)}"
            )
        if norm not in NORMS:
            raise ValueError(f"InceptionV3Encoder norm must be one of {NORMS}, got {norm!r}")
        net = inception_v3(weights=None, aux_logits=False, init_weights=init_weights)
        names = [name for name, _, _, _ in _LAYERS]
        last = max(names.index(f) for f in out_features)
        self._layers = _LAYERS[: last + 1]
        for name, _, _, _ in self._layers:
            self.add_module(name, getattr(net, name))
        for name in _UNPADDED_3X3:
            if hasattr(self, name):
                getattr(self, name).conv.padding = (1, 1)
        if norm == "FrozenBN":
            FrozenBatchNorm2d.convert_frozen_batchnorm(self)
        self._out_features = list(out_features)
        self._out_feature_strides = {n: s for n, _, s, c in _LAYERS if c}
        self._out_feature_channels = {n: c for n, _, _, c in _LAYERS if c}

    @property
    def size_divisibility(self) -> int:
        return 32

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = pad_to_divisible(x, self.size_divisibility)
        outputs = {}
        for name, same_pad, _, _ in self._layers:
            if same_pad:
                # Stride-2 3x3 window on an even size: one extra row and column at the bottom
                # and right give exactly half the size (zeros: the mean colour at the stem, and
                # no larger than the post-ReLU maps' minimum for the max pools).
                x = F.pad(x, (0, 1, 0, 1))
            x = getattr(self, name)(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }


@BACKBONE_REGISTRY.register()
def build_inception_v3_backbone(cfg, input_shape: ShapeSpec) -> InceptionV3Encoder:
    """Lesion-Net's Inception-v3 encoder from ``cfg.MODEL.INCEPTION``."""
    if input_shape.channels != 3:
        raise ValueError(
            f"build_inception_v3_backbone takes 3-channel images (ImageNet's), got "
            f"{input_shape.channels}"
        )
    if cfg.MODEL.BACKBONE.FREEZE_AT > 0:
        raise ValueError(
            "build_inception_v3_backbone has no stages to freeze; set MODEL.BACKBONE.FREEZE_AT "
            f"to 0 (got {cfg.MODEL.BACKBONE.FREEZE_AT}) and MODEL.INCEPTION.NORM to fix BN"
        )
    node = cfg.MODEL.INCEPTION
    return InceptionV3Encoder(list(node.OUT_FEATURES), node.NORM)
