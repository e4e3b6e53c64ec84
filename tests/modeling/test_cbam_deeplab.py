"""CBAMDeepLabHead and the dilated slim ResNet: output stride 16, odd input sizes, CBAM placement,
the paper's loss with ignore pixels, training on CPU, checkpoints, and the configs."""
from pathlib import Path

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model, build_sem_seg_head
from detectron2.structures import ImageList
from detectron2.utils.events import EventStorage
from torch import nn

import retina_d2.modeling  # noqa: F401  (registration)
from retina_d2.config import get_retina_cfg
from retina_d2.modeling import dilated_resnet  # noqa: F401  (registration)
from retina_d2.modeling.cbam import CBAM
from retina_d2.modeling.dilated_resnet import DilatedLesionResNet
from retina_d2.modeling.losses import cbam_deeplab_losses
from retina_d2.modeling.semantic.cbam_deeplab import CBAMDeepLabHead

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = ["cbam_deeplab_ddr.yaml", "cbam_deeplab_heimed.yaml"]
SHAPES = {"res2": ShapeSpec(channels=16, stride=4), "res5": ShapeSpec(channels=64, stride=16)}


def _cfg(name="cbam_deeplab_heimed.yaml"):
    cfg = get_retina_cfg()
    cfg.merge_from_file(str(CONFIG_DIR / name))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def _head(**kwargs):
    kwargs = {
        "num_classes": 4,
        "in_feature": "res5",
        "low_level_feature": "res2",
        "aspp_channels": 32,
        "decoder_channels": 32,
        **kwargs,
    }
    return CBAMDeepLabHead(SHAPES, **kwargs)


def _features(padded_size, batch=2):
    h, w = padded_size
    return {
        name: torch.randn(batch, s.channels, -(-h // s.stride), -(-w // s.stride))
        for name, s in SHAPES.items()
    }


def test_head_alone_gives_input_sized_maps_padded_or_not():
    torch.manual_seed(0)
    head = _head().eval()
    logits, losses = head(_features((112, 144)), None, (112, 144))
    assert logits.shape == (2, 4, 112, 144) and losses == {}
    logits, _ = head(_features((97, 131)), None, (97, 131))
    assert logits.shape == (2, 4, 97, 131)


def test_architecture_follows_deeplabv3plus_with_cbam():
    head = _head()
    rates = [conv.dilation for conv in head.aspp.convs[1:4]]
    assert rates == [(6, 6), (12, 12), (18, 18)]
    assert isinstance(head.aspp.convs[4][0], nn.AdaptiveAvgPool2d)  # image pooling
    assert isinstance(head.aspp_attention, CBAM) and isinstance(head.low_level_attention, CBAM)
    assert head.low_level_reduce.out_channels == 48 and head.low_level_reduce.kernel_size == (1, 1)
    # 48 channels do not split into Detectron2's 32 GroupNorm groups: 16 groups.
    assert isinstance(head.low_level_reduce.norm, nn.GroupNorm)
    assert head.low_level_reduce.norm.num_groups == 16
    assert [c.kernel_size for c in head.decoder] == [(3, 3), (3, 3)]
    assert head.decoder[0].in_channels == 32 + 48


def test_dilated_backbone_has_output_stride_16_and_pads_odd_inputs():
    cfg = _cfg()
    backbone = build_backbone(cfg)
    assert isinstance(backbone, DilatedLesionResNet)
    shapes = backbone.output_shape()
    assert shapes["res2"].stride == 4 and shapes["res5"].stride == 16
    assert backbone.size_divisibility == 16
    assert backbone.res5[0].conv1.dilation == (2, 2) and backbone.res5[0].conv1.stride == (1, 1)
    head = build_sem_seg_head(cfg, shapes).eval()
    images = ImageList.from_tensors([torch.randn(3, 97, 131)], backbone.size_divisibility)
    padded = tuple(images.tensor.shape[-2:])
    assert padded == (112, 144)
    with torch.no_grad():
        features = backbone(images.tensor)
        assert features["res5"].shape[-2:] == (7, 9) and features["res2"].shape[-2:] == (28, 36)
        logits, _ = head(features, None, padded)
    assert logits.shape == (1, 5, 112, 144)


def test_undilated_backbone_pads_to_32_and_exposes_the_stem_conv():
    cfg = _cfg()
    cfg.MODEL.RESNETS.RES5_DILATION = 1
    cfg.MODEL.LESION_RESNET.OUT_FEATURES = ["conv1", "res2", "res5"]
    backbone = build_backbone(cfg)
    assert backbone.size_divisibility == 32
    assert backbone.output_shape()["conv1"] == ShapeSpec(channels=32, stride=2)
    features = backbone(torch.randn(1, 3, 64, 96))
    assert features["conv1"].shape == (1, 32, 32, 48) and features["res5"].shape[-2:] == (2, 3)


def _targets(size, batch=2, num_classes=4):
    targets = torch.zeros(batch, num_classes, *size, dtype=torch.uint8)
    targets[:, 0, 8:20, 10:30] = 1
    targets[0, 1, 30:34, 4:8] = 1
    targets[1, 3] = 255
    targets[:, :, -4:] = 255
    return targets


def test_loss_is_the_papers_and_ignores_255():
    torch.manual_seed(0)
    head = _head().train()
    head.aspp.dropout = 0.0  # the same logits on both calls
    features = _features((64, 64))
    targets = _targets((64, 64))
    logits, losses = head(features, targets, (64, 64))
    expected = cbam_deeplab_losses(logits, targets)
    assert set(losses) == {"loss_dice", "loss_bce", "loss_focal", "loss_boundary"}
    for key, value in expected.items():
        torch.testing.assert_close(losses[key], value)
    # Ignore pixels take no gradient: no change of their logits moves the loss.
    shifted = logits.detach().clone()
    shifted[targets == 255] += 5.0
    for key, value in cbam_deeplab_losses(shifted, targets).items():
        torch.testing.assert_close(value, expected[key].detach())
    head.loss_stage = 2  # no two-stage loss: ignored
    _, again = head(features, targets, (64, 64))
    torch.testing.assert_close(sum(again.values()), sum(losses.values()))


def test_a_few_adam_iterations_lower_the_loss():
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = []
    for offset in (8, 28):
        image = torch.full((3, 64, 64), 60, dtype=torch.uint8)
        image[:, offset : offset + 16, offset : offset + 20] = 220
        sem_seg = torch.zeros(5, 64, 64, dtype=torch.uint8)
        sem_seg[0, offset : offset + 16, offset : offset + 20] = 1
        sem_seg[4] = 255
        batch.append({"image": image, "sem_seg": sem_seg})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = []
    with EventStorage(0):
        for _ in range(5):
            loss = sum(model(batch).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(history)))
    assert history[-1] < history[0] - 0.01


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    head = _head().eval()
    path = tmp_path / "head.pth"
    torch.save(head.state_dict(), path)
    torch.manual_seed(1)
    restored = _head().eval()
    features = _features((64, 96))
    expected, _ = head(features, None, (64, 96))
    assert not torch.allclose(restored(features, None, (64, 96))[0], expected)
    restored.load_state_dict(torch.load(path))
    torch.testing.assert_close(restored(features, None, (64, 96))[0], expected)


def test_built_from_config_and_from_arguments_alike():
    cfg = _cfg()
    shapes = build_backbone(cfg).output_shape()
    from_cfg = CBAMDeepLabHead(cfg, shapes)
    from_args = CBAMDeepLabHead(
        shapes,
        num_classes=5,
        in_feature="res5",
        low_level_feature="res2",
        aspp_channels=64,
        decoder_channels=64,
    )
    names = [n for n, _ in from_cfg.named_parameters()]
    assert names == [n for n, _ in from_args.named_parameters()]
    assert from_cfg.loss_weights["boundary_weight"] == 0.5
    assert from_cfg.loss_weights["focal_alpha"] == 0.25


@pytest.mark.parametrize(
    "kwargs",
    [{"in_feature": "res4"}, {"in_feature": "res2", "low_level_feature": "res5"}],
)
def test_bad_features_raise(kwargs):
    with pytest.raises(ValueError):
        _head(**kwargs)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_merges_and_builds(name):
    cfg = _cfg(name)
    backbone = build_backbone(cfg)
    assert backbone.output_shape()["res5"].stride == 16
    head = build_sem_seg_head(cfg, backbone.output_shape())
    assert isinstance(head, CBAMDeepLabHead)
    model = build_model(cfg).eval()
    assert type(model).__name__ == "SemanticLesionNet"
    image = torch.randint(0, 255, (3, 97, 131), dtype=torch.uint8)
    with torch.no_grad():
        (out,) = model([{"image": image, "height": 97, "width": 131}])
    assert out["sem_seg"].shape == (cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 97, 131)
