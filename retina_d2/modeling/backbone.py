"""Backbones trainable from scratch on a CPU: a ResNet of basic blocks with free widths, + FPN."""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN, ResNet
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem

__all__ = ["build_lesion_resnet_backbone", "build_lesion_resnet_fpn_backbone"]

_BLOCKS_PER_STAGE = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


@BACKBONE_REGISTRY.register()
def build_lesion_resnet_backbone(cfg, input_shape: ShapeSpec):
    """ResNet-18/34 from ``cfg.MODEL.LESION_RESNET`` with any stem / res2 width.

    Parameter names match Detectron2's ResNet (``stem.conv1``, ``res2.0.conv1``, ...), so
    Detectron2 and torchvision ResNet-18/34 weights load when the widths are the stock 64.
    """
    r = cfg.MODEL.LESION_RESNET
    if r.DEPTH not in _BLOCKS_PER_STAGE:
        raise ValueError(f"MODEL.LESION_RESNET.DEPTH must be 18 or 34, got {r.DEPTH}")
    stem = BasicStem(in_channels=input_shape.channels, out_channels=r.STEM_OUT_CHANNELS, norm=r.NORM)
    stages = []
    in_channels, out_channels = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    for idx, num_blocks in enumerate(_BLOCKS_PER_STAGE[r.DEPTH]):
        stages.append(
            ResNet.make_stage(
                BasicBlock,
                num_blocks,
                stride_per_block=[1 if idx == 0 else 2] + [1] * (num_blocks - 1),
                in_channels=in_channels,
                out_channels=out_channels,
                norm=r.NORM,
            )
        )
        in_channels, out_channels = out_channels, out_channels * 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


@BACKBONE_REGISTRY.register()
def build_lesion_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """:func:`build_lesion_resnet_backbone` with an FPN on top (P2-P6, as Detectron2's R-FPN)."""
    bottom_up = build_lesion_resnet_backbone(cfg, input_shape)
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
