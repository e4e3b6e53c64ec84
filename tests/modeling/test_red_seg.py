"""Red-Seg: VGG16 trunk (build_vgg16_backbone) + RedSegHead and its two loss stages."""
import os
from types import SimpleNamespace

import pytest
import torch
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_backbone, build_model, build_sem_seg_head
from torch import nn

import retina_d2.modeling  # noqa: F401  (registration)
import retina_d2.modeling.encoders  # noqa: F401  (registration)
import retina_d2.modeling.semantic.red_seg  # noqa: F401  (registration)
from retina_d2.config import get_retina_cfg
from retina_d2.engine.hooks import LossSwitchHook
from retina_d2.modeling.encoders import VGG16Backbone
from retina_d2.modeling.losses import IGNORE_VALUE, fn_fp_loss, topk_balanced_bce_loss
from retina_d2.modeling.semantic.red_seg import RedSegHead, red_seg_channels

CONFIGS = ["configs/redseg_idrid.yaml", "configs/redseg_heimed.yaml"]
IDRID = ["microaneurysm", "haemorrhage", "hard exudate", "soft exudate", "optic disc"]
MA_HE_FEATURES = [["conv2", "conv3", "conv4"], ["conv3", "conv4", "conv5"]]


def _model(branch_channels=(0, 1), num_classes=5, seed=0, norm="GN"):
    torch.manual_seed(seed)
    trunk = VGG16Backbone(3, width_mult=1 / 16, norm=norm)
    head = RedSegHead(
        trunk.output_shape(),
        num_classes=num_classes,
        lesions=["microaneurysm", "haemorrhage"],
        branch_features=MA_HE_FEATURES,
        branch_channels=list(branch_channels),
        topk_min_negatives=16,
    )
    return trunk, head


def _dot_batch(size=32):
    """Two images with bright dots (lesion channel 0) and a dark blob (channel 1)."""
    images = torch.zeros(2, 3, size, size)
    targets = torch.zeros(2, 5, size, size, dtype=torch.uint8)
    for n, (y, x) in enumerate([(6, 9), (20, 14)]):
        images[n, :, y : y + 3, x : x + 3] = 1.0
        targets[n, 0, y : y + 3, x : x + 3] = 1
    images[1, :, 4:12, 18:28] = -1.0
    targets[1, 1, 4:12, 18:28] = 1
    return images, targets


def test_vgg16_layout_width_and_norm():
    trunk = VGG16Backbone(3, width_mult=0.25, norm="GN")
    shapes = trunk.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        "conv1": (16, 1),
        "conv2": (32, 2),
        "conv3": (64, 4),
        "conv4": (128, 8),
        "conv5": (128, 16),
    }
    convs = [m for m in trunk.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13  # conv1_1 .. conv5_3
    assert all(isinstance(c.norm, nn.GroupNorm) for c in convs)
    assert trunk.size_divisibility == 16
    plain = VGG16Backbone(3, width_mult=0.25, norm="", out_features=["conv2", "conv3"])
    assert not any(isinstance(m, nn.GroupNorm) for m in plain.modules())
    # Stages past the deepest output are not built.
    assert not hasattr(plain, "conv4") and plain.size_divisibility == 4
    features = plain(torch.randn(1, 3, 37, 41))
    assert sorted(features) == ["conv2", "conv3"] and features["conv3"].shape[-2:] == (10, 11)


def test_odd_input_sizes_and_channel_placement():
    trunk, head = _model(branch_channels=(3, 1))
    trunk.eval(), head.eval()
    features = trunk(torch.randn(2, 3, 97, 131))
    assert features["conv5"].shape[-2:] == (7, 9)  # padded to 112 x 144
    logits, losses = head(features, None, (97, 131))
    assert logits.shape == (2, 5, 97, 131) and losses == {}
    # Channels 0, 2, 4 have no branch: the constant absent logit.
    for channel in (0, 2, 4):
        assert torch.all(logits[:, channel] == -20.0)
    branch = head.branch_logits(features, (97, 131))
    assert torch.equal(logits[:, 3], branch[:, 0]) and torch.equal(logits[:, 1], branch[:, 1])
    assert head(features)[0].shape == (2, 5, 112, 144)


def test_channels_follow_the_training_datasets_thing_classes():
    name = "red_seg_test_channels_train"
    MetadataCatalog.get(name).set(thing_classes=["hard exudate", "haemorrhage", "microaneurysm"])
    try:
        cfg = _cfg(CONFIGS[0])
        cfg.DATASETS.TRAIN = (name,)
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 3
        cfg.MODEL.VGG.WIDTH_MULT = 1 / 16
        backbone = build_backbone(cfg)
        head = build_sem_seg_head(cfg, backbone.output_shape())
        assert head.branch_channels == [2, 1]
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 5
        with pytest.raises(ValueError, match="NUM_CLASSES is 5"):
            build_sem_seg_head(cfg, backbone.output_shape())
    finally:
        MetadataCatalog.remove(name)
    with pytest.raises(ValueError, match="optic disc"):
        red_seg_channels(["optic disc"], 2, ["microaneurysm", "haemorrhage"])
    # An unregistered dataset: the branches are the first channels.
    assert red_seg_channels(["hard exudate"], 5, None) == [0]


def test_loss_covers_the_branch_channels_only():
    trunk, head = _model()
    images, targets = _dot_batch()
    head.train()
    features = trunk.eval()(images)
    torch.manual_seed(0)
    _, losses = head(features, targets, (32, 32))
    other = targets.clone()
    other[:, 2:] = torch.randint(0, 2, other[:, 2:].shape, dtype=torch.uint8)
    other[0, 3] = IGNORE_VALUE
    _, other_losses = head(features, other, (32, 32))
    assert losses["loss_topk_bce"].item() == other_losses["loss_topk_bce"].item()


def test_loss_stage_switch_changes_the_loss_function():
    trunk, head = _model()
    images, targets = _dot_batch()
    trunk.eval(), head.train()
    features = trunk(images)
    logits, losses = head(features, targets, (32, 32))
    branch_logits, branch_targets = logits[:, :2], targets[:, :2]
    expected = topk_balanced_bce_loss(branch_logits, branch_targets, min_negatives=16)
    assert set(losses) == {"loss_topk_bce"}
    assert losses["loss_topk_bce"].item() == pytest.approx(expected.item(), rel=1e-6)

    # LossSwitchHook moves every module with a loss_stage to stage 2 at its iteration.
    hook = LossSwitchHook(switch_iter=10)
    hook.trainer = SimpleNamespace(model=nn.Sequential(trunk, head), iter=9)
    hook.before_step()
    assert head.loss_stage == 1
    hook.trainer.iter = 10
    hook.before_step()
    assert head.loss_stage == 2
    logits, losses = head(features, targets, (32, 32))
    assert set(losses) == {"loss_fn_fp"}
    expected = fn_fp_loss(logits[:, :2], branch_targets)
    assert losses["loss_fn_fp"].item() == pytest.approx(expected.item(), rel=1e-6)

    head.loss_stage = 3
    with pytest.raises(ValueError, match="loss_stage"):
        head(features, targets, (32, 32))


@pytest.mark.parametrize("stage", [1, 2])
def test_a_few_adam_iterations_lower_the_loss(stage):
    trunk, head = _model()
    head.loss_stage = stage
    images, targets = _dot_batch()
    trunk.train(), head.train()
    # The side outputs start near zero (logits ~0, loss ~log 2); a high rate shows the descent
    # within a dozen steps.
    optimizer = torch.optim.Adam(list(trunk.parameters()) + list(head.parameters()), lr=1e-2)
    history = []
    for _ in range(12):
        _, losses = head(trunk(images), targets, (32, 32))
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.9 * history[0]


def test_checkpoint_round_trip(tmp_path):
    trunk, head = _model(seed=0)
    path = tmp_path / "red_seg.pth"
    torch.save({"trunk": trunk.state_dict(), "head": head.state_dict()}, path)
    other_trunk, other_head = _model(seed=1)
    state = torch.load(path)
    other_trunk.load_state_dict(state["trunk"])
    other_head.load_state_dict(state["head"])
    x = torch.randn(1, 3, 21, 30)
    with torch.no_grad():
        expected = head.eval()(trunk.eval()(x), None, (21, 30))[0]
        restored = other_head.eval()(other_trunk.eval()(x), None, (21, 30))[0]
    assert torch.equal(expected, restored)


def _cfg(path):
    cfg = get_retina_cfg()
    cfg.merge_from_file(path)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


@pytest.mark.parametrize("path", CONFIGS)
def test_config_builds_backbone_and_head(path):
    cfg = _cfg(path)
    assert cfg.MODEL.LESION_SEG.ACTIVATION == "sigmoid"
    assert 0 < cfg.MODEL.LESION_SEG.LOSS_SWITCH_ITER < cfg.SOLVER.MAX_ITER
    backbone = build_backbone(cfg)
    head = build_sem_seg_head(cfg, backbone.output_shape())
    assert isinstance(head, RedSegHead) and head.loss_stage == 1
    assert head.lesions == list(cfg.MODEL.RED_SEG.LESIONS)
    for branch, names in zip(head.branches, cfg.MODEL.RED_SEG.BRANCH_FEATURES):
        assert branch.in_features == list(names)


@pytest.mark.skipif(
    not os.path.exists("retina_d2/modeling/meta_arch/semantic_net.py"),
    reason="SemanticLesionNet not written yet",
)
@pytest.mark.parametrize("path", CONFIGS)
def test_config_builds_a_model_that_trains_and_infers(path):
    cfg = _cfg(path)
    cfg.MODEL.VGG.WIDTH_MULT = 1 / 16  # the forward only checks shapes
    model = build_model(cfg)
    image = torch.randint(0, 256, (3, 45, 61)).float()
    sem_seg = torch.zeros(5, 45, 61, dtype=torch.uint8)
    sem_seg[0, 10:14, 10:14] = 1
    losses = model([{"image": image, "sem_seg": sem_seg}])
    # redseg_idrid.yaml supervises the side outputs too (MODEL.RED_SEG.SIDE_SUPERVISION).
    side = {"loss_side_topk_bce"} if cfg.MODEL.RED_SEG.SIDE_SUPERVISION else set()
    assert set(losses) == {"loss_topk_bce"} | side
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        (output,) = model([{"image": image, "height": 90, "width": 122}])
    assert output["sem_seg"].shape == (5, 90, 122)
