"""LesionNetHead: every expansive-path length, odd input sizes, the pixel -> dual Dice switch,
training on CPU, checkpoints, and the configs that use it."""
from pathlib import Path

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model, build_sem_seg_head
from detectron2.structures import ImageList
from detectron2.utils.events import EventStorage

import retina_d2.modeling  # noqa: F401  (registration)
from retina_d2.config import get_retina_cfg
from retina_d2.modeling import dilated_resnet  # noqa: F401  (registration)
from retina_d2.modeling.dilated_resnet import DilatedLesionResNet
from retina_d2.modeling.losses import dual_dice_loss, sigmoid_dice_loss
from retina_d2.modeling.semantic.lesion_net import LesionNetHead, image_lesion_scores

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = ["lesionnet16s_retinal_lesions.yaml", "lesionnet16s_heimed.yaml"]
# A slim encoder's features: one per stride, the stem conv's (stride 2) included.
SHAPES = {
    "conv1": ShapeSpec(channels=8, stride=2),
    "res2": ShapeSpec(channels=8, stride=4),
    "res3": ShapeSpec(channels=16, stride=8),
    "res4": ShapeSpec(channels=24, stride=16),
    "res5": ShapeSpec(channels=32, stride=32),
}


def _cfg(name="lesionnet16s_heimed.yaml"):
    cfg = get_retina_cfg()
    cfg.merge_from_file(str(CONFIG_DIR / name))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def _features(padded_size, shapes=SHAPES, batch=2):
    h, w = padded_size
    return {
        name: torch.randn(batch, s.channels, -(-h // s.stride), -(-w // s.stride))
        for name, s in shapes.items()
    }


def _head(output_stride=8, shapes=SHAPES, **kwargs):
    kwargs = {"num_classes": 3, "conv_dims": 8, "num_convs": 1, "norm": "GN", **kwargs}
    return LesionNetHead(shapes, output_stride=output_stride, **kwargs)


def _targets(size, num_classes=3, batch=2):
    targets = torch.zeros(batch, num_classes, *size, dtype=torch.uint8)
    targets[:, 0, 10:20, 12:30] = 1
    targets[0, 1, 40:50, 5:9] = 1
    targets[1, 2] = 255  # lesion not annotated on this image
    targets[:, :, :3] = 255
    return targets


@pytest.mark.parametrize("output_stride", [2, 4, 8, 16, 32])
def test_every_path_length_gives_input_sized_maps(output_stride):
    torch.manual_seed(0)
    head = _head(output_stride).eval()
    merges = {32: 0, 16: 1, 8: 2, 4: 3, 2: 4}[output_stride]
    assert len(head.stages) == merges
    skips = ["res4", "res3", "res2", "conv1"][:merges]
    assert head.skip_features == skips
    assert head.in_features == ["res5"] + skips
    # Padded to the deepest stride (SemanticLesionNet pads to size_divisibility).
    logits, losses = head(_features((128, 160)), None, (128, 160))
    assert logits.shape == (2, 3, 128, 160) and losses == {}
    # Unpadded odd sizes (a backbone without size_divisibility): still the input's size.
    logits, _ = head(_features((97, 131)), None, (97, 131))
    assert logits.shape == (2, 3, 97, 131)


def test_stride_without_encoder_feature_is_upsampled_without_merge():
    # Detectron2's ResNet has no stride-2 feature.
    shapes = {k: v for k, v in SHAPES.items() if k != "conv1"}
    head = _head(2, shapes=shapes)
    assert head.skip_features == ["res4", "res3", "res2", None]
    logits, _ = head(_features((64, 96), shapes), None, (64, 96))
    assert logits.shape == (2, 3, 64, 96)


def test_finer_features_than_the_output_stride_are_unused():
    head = _head(16)
    assert head.in_features == ["res5", "res4"]
    assert sum(p.numel() for p in head.parameters()) < sum(p.numel() for p in _head(4).parameters())


@pytest.mark.parametrize(
    "output_stride, shapes",
    [
        (64, SHAPES),
        (12, SHAPES),
        (8, {**SHAPES, "res5": ShapeSpec(channels=32, stride=16)}),  # dilated res5
    ],
)
def test_bad_strides_raise(output_stride, shapes):
    with pytest.raises(ValueError):
        _head(output_stride, shapes=shapes)


def test_odd_input_through_the_padding_backbone():
    cfg = _cfg()
    backbone = build_backbone(cfg)
    assert isinstance(backbone, DilatedLesionResNet) and backbone.size_divisibility == 32
    head = build_sem_seg_head(cfg, backbone.output_shape()).eval()
    images = ImageList.from_tensors([torch.randn(3, 97, 131)], backbone.size_divisibility)
    assert tuple(images.tensor.shape[-2:]) == (128, 160)
    with torch.no_grad():
        features = backbone(images.tensor)
        assert features["res5"].shape[-2:] == (4, 5)
        logits, _ = head(features, None, tuple(images.tensor.shape[-2:]))
    assert logits.shape == (1, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 128, 160)


def test_loss_stage_switches_pixel_dice_to_dual_dice():
    torch.manual_seed(0)
    head = _head(4).train()
    features = _features((64, 64))
    targets = _targets((64, 64))
    assert head.loss_stage == 1
    logits, losses = head(features, targets, (64, 64))
    assert set(losses) == {"loss_pixel_dice"}
    torch.testing.assert_close(losses["loss_pixel_dice"], sigmoid_dice_loss(logits, targets))
    head.loss_stage = 2
    logits2, losses2 = head(features, targets, (64, 64))
    torch.testing.assert_close(logits2, logits)
    assert set(losses2) == {"loss_dual_dice"}
    expected = dual_dice_loss(logits, targets, pixel_weight=0.8)
    torch.testing.assert_close(losses2["loss_dual_dice"], expected)
    assert not torch.isclose(losses2["loss_dual_dice"], losses["loss_pixel_dice"])
    head.loss_stage = 3
    with pytest.raises(ValueError):
        head(features, targets, (64, 64))


def test_image_lesion_scores_are_the_global_max():
    maps = torch.rand(2, 3, 7, 9)
    scores = image_lesion_scores(maps)
    assert scores.shape == (2, 3)
    torch.testing.assert_close(scores, maps.flatten(2).max(dim=2).values)
    assert image_lesion_scores(maps[0]).shape == (3,)


def _training_batch(num_classes, size=64):
    torch.manual_seed(0)
    batch = []
    for offset in (8, 30):
        image = torch.full((3, size, size), 60, dtype=torch.uint8)
        image[:, offset : offset + 16, offset : offset + 20] = 220  # a bright "exudate"
        sem_seg = torch.zeros(num_classes, size, size, dtype=torch.uint8)
        sem_seg[0, offset : offset + 16, offset : offset + 20] = 1
        sem_seg[num_classes - 1] = 255  # not annotated
        batch.append({"image": image, "sem_seg": sem_seg})
    return batch


def test_a_few_adam_iterations_lower_the_loss():
    cfg = _cfg()
    cfg.MODEL.LESION_NET.OUTPUT_STRIDE = 4
    torch.manual_seed(0)
    model = build_model(cfg).train()
    batch = _training_batch(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
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
    head = _head(4).eval()
    path = tmp_path / "head.pth"
    torch.save(head.state_dict(), path)
    torch.manual_seed(1)
    restored = _head(4).eval()
    features = _features((64, 96))
    expected, _ = head(features, None, (64, 96))
    assert not torch.allclose(restored(features, None, (64, 96))[0], expected)
    restored.load_state_dict(torch.load(path))
    torch.testing.assert_close(restored(features, None, (64, 96))[0], expected)


def test_built_from_config_and_from_arguments_alike():
    cfg = _cfg()
    cfg.MODEL.LESION_NET.OUTPUT_STRIDE = 8
    shapes = build_backbone(cfg).output_shape()
    from_cfg = LesionNetHead(cfg, shapes)
    from_args = LesionNetHead(
        {k: shapes[k] for k in cfg.MODEL.LESION_NET.IN_FEATURES},
        num_classes=5,
        output_stride=8,
        conv_dims=32,
        num_convs=2,
    )
    names = [n for n, _ in from_cfg.named_parameters()]
    assert names == [n for n, _ in from_args.named_parameters()]
    assert from_cfg.dual_dice_lambda == 0.8


def test_softmax_activation_is_refused():
    cfg = _cfg()
    cfg.MODEL.LESION_SEG.ACTIVATION = "softmax"
    with pytest.raises(ValueError, match="sigmoid"):
        build_sem_seg_head(cfg, build_backbone(cfg).output_shape())


@pytest.mark.parametrize("name", CONFIGS)
def test_config_merges_and_builds(name):
    cfg = _cfg(name)
    backbone = build_backbone(cfg)
    head = build_sem_seg_head(cfg, backbone.output_shape())
    assert isinstance(head, LesionNetHead) and head.output_stride == 16
    assert cfg.MODEL.LESION_SEG.LOSS_SWITCH_ITER == -1
    model = build_model(cfg).eval()
    classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    assert type(model).__name__ == "SemanticLesionNet"
    image = torch.randint(0, 255, (3, 97, 131), dtype=torch.uint8)
    with torch.no_grad():
        (out,) = model([{"image": image, "height": 97, "width": 131}])
    assert out["sem_seg"].shape == (classes, 97, 131)
