"""Encoders of the semantic lesion heads, trained from scratch: ResUNet's residual U-Net encoder
and Red-Seg's VGG16 trunk.

Both pad their input on the bottom and right to a multiple of their total stride
(``size_divisibility``, which also tells ``ImageList.from_tensors`` in the meta-architecture to
pad the batch so), so that any image size works and every feature of stride s is exactly
``padded size / s``; the heads crop their logits back to the size they are given.
"""
import math
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import Backbone
from torch import nn

__all__ = [
    "ResidualDoubleConv",
    "UNetEncoder",
    "VGG16Backbone",
    "build_unet_encoder_backbone",
    "build_vgg16_backbone",
    "kaiming_init",
    "pad_to_divisible",
]


def kaiming_init(module: nn.Module) -> None:
    """He-normal weights (fan-in, ReLU gain: Keras' ``he_normal``, which keeps activations at a
    steady scale through layers without normalisation) and zero biases for every conv in
    ``module``."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def pad_to_divisible(x: torch.Tensor, divisor: int) -> torch.Tensor:
    """Zero-pad an (N, C, H, W) tensor on the bottom and right to multiples of ``divisor`` (the
    value ``ImageList`` pads normalised images with)."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % divisor, (-w) % divisor
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return x


class ResidualDoubleConv(nn.Module):
    """ResUNet's block: ``relu(conv3x3(dropout(relu(conv3x3(x)))) + shortcut(x))``, where the
    shortcut is the identity, or a 1x1 conv when the channel count changes. No normalisation: the
    ResUNet report trains without batch norm."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.3):
        """
        Args:
            in_channels, out_channels: channels of the block's input and output.
            dropout: probability of the dropout between the two convs (0: none).
        """
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.dropout(F.relu(self.conv1(x))))
        return F.relu(y + self.shortcut(x))


class _PaddedStagesBackbone(Backbone):
    """A plain chain of stages at strides 1, 2, 4, ...: the input is padded to the deepest
    built stage's stride, run through the first ``_num_stages`` of ``stage_names`` (modules of
    those names), and the stages in ``_out_features`` are returned."""

    @property
    def size_divisibility(self) -> int:
        return 2 ** (self._num_stages - 1)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = pad_to_divisible(x, self.size_divisibility)
        outputs = {}
        for name in self.stage_names[: self._num_stages]:
            x = getattr(self, name)(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs


class UNetEncoder(_PaddedStagesBackbone):
    """U-Net's contracting path with :class:`ResidualDoubleConv` blocks: stage ``encK`` is a 2x2
    max pool (except ``enc1``) and one block of ``widths[K - 1]`` channels, at stride 2^(K-1)."""

    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int],
        dropout: float = 0.3,
        out_features: Optional[Sequence[str]] = None,
    ):
        """
        Args:
            in_channels: image channels.
            widths: channels of each stage, shallowest first (U-Net: 64, 128, 256, 512, 1024).
            dropout: of every block.
            out_features: the stages to return ("enc1".. "encN"); default all.
        """
        super().__init__()
        if not widths:
            raise ValueError("UNetEncoder needs at least one stage width")
        self.stage_names = [f"enc{i + 1}" for i in range(len(widths))]
        out_features = list(out_features or self.stage_names)
        unknown = [f for f in out_features if f not in self.stage_names]
        if unknown:
            raise ValueError(f"UNetEncoder has no stage {unknown}; it has {self.stage_names}")
        self._out_features = out_features
        self._out_feature_channels = {}
        self._out_feature_strides = {}
        previous = in_channels
        for idx, (name, width) in enumerate(zip(self.stage_names, widths)):
            layers = [] if idx == 0 else [nn.MaxPool2d(kernel_size=2)]
            layers.append(ResidualDoubleConv(previous, width, dropout))
            self.add_module(name, nn.Sequential(*layers))
            self._out_feature_channels[name] = width
            self._out_feature_strides[name] = 2**idx
            previous = width
        # Stages past the deepest requested output would be computed for nothing.
        self._num_stages = max(self.stage_names.index(f) for f in out_features) + 1
        kaiming_init(self)


def _group_norm(channels: int) -> nn.GroupNorm:
    # 32 groups as Detectron2's "GN", fewer when a slim width is not a multiple of 32.
    return nn.GroupNorm(math.gcd(32, channels), channels)


# VGG16's convolutional part: (stage, convs, channels at width 1).
_VGG16_STAGES = (
    ("conv1", 2, 64),
    ("conv2", 2, 128),
    ("conv3", 3, 256),
    ("conv4", 3, 512),
    ("conv5", 3, 512),
)


class VGG16Backbone(_PaddedStagesBackbone):
    """VGG16's conv1_1 .. conv5_3 (3x3 convs + ReLU, a 2x2 max pool before each stage after the
    first; no pool5 and no fully connected layers). Output ``convK`` is the ReLU of ``convK_last``
    (conv1_2, conv2_2, conv3_3, conv4_3, conv5_3), at stride 1, 2, 4, 8, 16. Parameters are
    ``convK.convK_i.weight`` (and ``.norm.*`` with GroupNorm)."""

    def __init__(
        self,
        in_channels: int = 3,
        width_mult: float = 1.0,
        norm: str = "",
        out_features: Sequence[str] = ("conv1", "conv2", "conv3", "conv4", "conv5"),
    ):
        """
        Args:
            in_channels: image channels.
            width_mult: multiplies every stage's channels (1.0 = VGG16's 64 .. 512).
            norm: "" (VGG16 as published) or "GN" (GroupNorm after every conv, which trains a
                randomly initialised 13-conv trunk far more reliably).
            out_features: the stages to return.
        """
        super().__init__()
        if norm not in ("", "GN"):
            raise ValueError(f"VGG16Backbone norm must be '' or 'GN', got {norm!r}")
        if width_mult <= 0:
            raise ValueError(f"VGG16Backbone width_mult must be > 0, got {width_mult}")
        names = [name for name, _, _ in _VGG16_STAGES]
        unknown = [f for f in out_features if f not in names]
        if unknown or not out_features:
            raise ValueError(
                f"VGG16Backbone out_features {list(out_features)}: choose among {names}"
            )
        self._out_features = list(out_features)
        self._num_stages = max(names.index(f) for f in out_features) + 1
        self.stage_names = names[: self._num_stages]
        self._out_feature_channels = {}
        self._out_feature_strides = {}
        previous = in_channels
        for idx, (name, num_convs, channels) in enumerate(_VGG16_STAGES[: self._num_stages]):
            width = max(1, int(round(channels * width_mult)))
            stage = nn.Sequential()
            if idx > 0:
                stage.add_module("pool", nn.MaxPool2d(kernel_size=2))
            for k in range(num_convs):
                conv = Conv2d(
                    previous,
                    width,
                    kernel_size=3,
                    padding=1,
                    bias=not norm,
                    norm=_group_norm(width) if norm else None,
                    activation=F.relu,
                )
                stage.add_module(f"{name}_{k + 1}", conv)
                previous = width
            self.add_module(name, stage)
            self._out_feature_channels[name] = width
            self._out_feature_strides[name] = 2**idx
        kaiming_init(self)


def _check_trainable_from_scratch(cfg, name: str) -> None:
    if cfg.MODEL.BACKBONE.FREEZE_AT > 0:
        raise ValueError(
            f"{name} trains from scratch and has nothing to freeze; set MODEL.BACKBONE.FREEZE_AT "
            f"to 0 (got {cfg.MODEL.BACKBONE.FREEZE_AT})"
        )


@BACKBONE_REGISTRY.register()
def build_unet_encoder_backbone(cfg, input_shape: ShapeSpec) -> UNetEncoder:
    """ResUNet's encoder from ``cfg.MODEL.UNET_ENCODER``."""
    _check_trainable_from_scratch(cfg, "build_unet_encoder_backbone")
    e = cfg.MODEL.UNET_ENCODER
    return UNetEncoder(input_shape.channels, list(e.WIDTHS), e.DROPOUT, list(e.OUT_FEATURES))


@BACKBONE_REGISTRY.register()
def build_vgg16_backbone(cfg, input_shape: ShapeSpec) -> VGG16Backbone:
    """Red-Seg's VGG16 trunk from ``cfg.MODEL.VGG``."""
    _check_trainable_from_scratch(cfg, "build_vgg16_backbone")
    v = cfg.MODEL.VGG
    return VGG16Backbone(input_shape.channels, v.WIDTH_MULT, v.NORM, list(v.OUT_FEATURES))
