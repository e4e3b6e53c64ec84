"""A slim ResNet-18/34 whose res5 can be dilated (output stride 16), for DeepLab-style heads.

Detectron2's ``build_resnet_backbone`` dilates res5 only in bottleneck ResNets (it refuses
``RES5_DILATION = 2`` for R-18/34), and its R-50 is too heavy for the CPU configs. This builder
takes the widths of ``MODEL.LESION_RESNET`` (as ``build_lesion_resnet_backbone``) and the res5
dilation of Detectron2's ``MODEL.RESNETS.RES5_DILATION``; parameter names match Detectron2's
ResNet, so checkpoints of the undilated trunk load.

Besides Detectron2's features it can output ``"conv1"``, the stem convolution's activation
before the max pool (stride 2), the only stride-2 feature a ResNet has (Lesion-Net-2s merges it).
Its ``size_divisibility`` is the deepest stage's stride, so that SemanticLesionNet pads inputs
to sizes where every feature map is exactly input / stride.
"""
from typing import List

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.layers import CNNBlockBase, Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import ResNet
from detectron2.modeling.backbone.resnet import BasicStem

__all__ = ["DilatedBasicBlock", "DilatedLesionResNet", "build_dilated_lesion_resnet_backbone"]

_BLOCKS_PER_STAGE = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}
STEM_CONV_FEATURE = "conv1"


class DilatedBasicBlock(CNNBlockBase):
    """Detectron2's ``BasicBlock`` (two 3x3 convs + projection shortcut when the width changes)
    with both 3x3 convs dilated; same parameter names, so the weights are interchangeable."""

    def __init__(self, in_channels, out_channels, *, stride=1, dilation=1, norm="GN"):
        """
        Args:
            in_channels, out_channels: block widths.
            stride: of the first conv and of the shortcut.
            dilation: of both 3x3 convs (their padding keeps the size).
            norm: normalisation of every conv (see ``detectron2.layers.get_norm``).
        """
        super().__init__(in_channels, out_channels, stride)
        self.shortcut = None
        if in_channels != out_channels or stride != 1:
            self.shortcut = Conv2d(
                in_channels,
                out_channels,
                kernel_size=1,
                stride=stride,
                bias=False,
                norm=get_norm(norm, out_channels),
            )
        self.conv1 = Conv2d(
            in_channels,
            out_channels,
            kernel_size=3,
            stride=stride,
            padding=dilation,
            dilation=dilation,
            bias=False,
            norm=get_norm(norm, out_channels),
        )
        self.conv2 = Conv2d(
            out_channels,
            out_channels,
            kernel_size=3,
            padding=dilation,
            dilation=dilation,
            bias=False,
            norm=get_norm(norm, out_channels),
        )
        for layer in (self.conv1, self.conv2, self.shortcut):
            if layer is not None:
                weight_init.c2_msra_fill(layer)

    def forward(self, x):
        out = self.conv2(F.relu_(self.conv1(x)))
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out + shortcut)


class DilatedLesionResNet(ResNet):
    """Detectron2's ResNet with a ``size_divisibility`` and an optional stride-2 ``"conv1"``
    output (see the module docstring). Needs a :class:`BasicStem`-like stem (``conv1`` then a
    stride-2 max pool)."""

    def __init__(self, stem, stages, out_features: List[str], freeze_at: int = 0):
        """
        Args:
            stem: a :class:`BasicStem`.
            stages: lists of blocks, res2 first.
            out_features: names among "conv1", "stem", "res2".."res5".
            freeze_at: as Detectron2's ResNet.
        """
        self._stem_conv_out = STEM_CONV_FEATURE in out_features
        resnet_features = [f for f in out_features if f != STEM_CONV_FEATURE]
        super().__init__(
            stem, stages, out_features=resnet_features or ["stem"], freeze_at=freeze_at
        )
        self._size_divisibility = max(self._out_feature_strides.values())
        if self._stem_conv_out:
            self._out_feature_strides[STEM_CONV_FEATURE] = self.stem.stride // 2
            self._out_feature_channels[STEM_CONV_FEATURE] = self.stem.out_channels
        self._out_features = list(out_features)

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    def forward(self, x: torch.Tensor):
        if x.dim() != 4:
            raise ValueError(f"ResNet takes an (N, C, H, W) input, got {tuple(x.shape)}")
        outputs = {}
        # BasicStem.forward, split so that the activation before the pool can be returned.
        x = F.relu_(self.stem.conv1(x))
        if self._stem_conv_out:
            outputs[STEM_CONV_FEATURE] = x
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        if "stem" in self._out_features:
            outputs["stem"] = x
        for name, stage in zip(self.stage_names, self.stages):
            x = stage(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs


@BACKBONE_REGISTRY.register()
def build_dilated_lesion_resnet_backbone(cfg, input_shape: ShapeSpec):
    """ResNet-18/34 with the widths, norm and out features of ``cfg.MODEL.LESION_RESNET`` and res5
    dilated by ``cfg.MODEL.RESNETS.RES5_DILATION`` (1: output stride 32; 2: 16, res5's first
    block keeps stride 1 and dilates instead, as in DeepLab). ``LESION_RESNET.OUT_FEATURES`` may
    also name "conv1" (stride 2).

    Returns:
        a :class:`DilatedLesionResNet`.
    """
    r = cfg.MODEL.LESION_RESNET
    res5_dilation = cfg.MODEL.RESNETS.RES5_DILATION
    if r.DEPTH not in _BLOCKS_PER_STAGE:
        raise ValueError(f"MODEL.LESION_RESNET.DEPTH must be 18 or 34, got {r.DEPTH}")
    if res5_dilation not in (1, 2):
        raise ValueError(f"MODEL.RESNETS.RES5_DILATION must be 1 or 2, got {res5_dilation}")
    stem = BasicStem(
        in_channels=input_shape.channels, out_channels=r.STEM_OUT_CHANNELS, norm=r.NORM
    )
    stages = []
    in_channels, out_channels = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    for idx, num_blocks in enumerate(_BLOCKS_PER_STAGE[r.DEPTH]):
        dilation = res5_dilation if idx == 3 else 1
        first_stride = 1 if idx == 0 or dilation > 1 else 2
        stages.append(
            ResNet.make_stage(
                DilatedBasicBlock,
                num_blocks,
                stride_per_block=[first_stride] + [1] * (num_blocks - 1),
                in_channels=in_channels,
                out_channels=out_channels,
                dilation=dilation,
                norm=r.NORM,
            )
        )
        in_channels, out_channels = out_channels, out_channels * 2
    return DilatedLesionResNet(
        stem, stages, out_features=list(r.OUT_FEATURES), freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT
    )
