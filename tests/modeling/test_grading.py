"""Grading heads: side attention (conv and channel-wise max) against hand computations, the
Lesion-Concat and plain baselines, lesion-map pooling, and the masked grading loss."""
import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec

from retina_d2.config import get_retina_cfg
from retina_d2.modeling.grading import (
    GRADING_HEAD_REGISTRY,
    LesionConcatGradingHead,
    PlainGradingHead,
    SideAttentionGradingHead,
    build_grading_head,
    check_grading_tasks,
    grade_targets,
    grading_loss,
    pool_lesion_maps,
)


def _feature_and_maps(n=2, channels=6, lesions=3, size=4, stride=8):
    torch.manual_seed(0)
    feature = torch.randn(n, channels, size, size)
    maps = torch.rand(n, lesions, size * stride, size * stride)
    return feature, maps


def test_max_pooling_keeps_a_one_pixel_lesion_that_averaging_dilutes():
    maps = torch.zeros(1, 1, 32, 32)
    maps[0, 0, 5, 9] = 0.9  # a microaneurysm: one pixel
    pooled_max = pool_lesion_maps(maps, (4, 4), "max")
    pooled_avg = pool_lesion_maps(maps, (4, 4), "avg")
    assert pooled_max[0, 0, 0, 1] == pytest.approx(0.9)  # cell (5 // 8, 9 // 8)
    assert pooled_max.sum() == pytest.approx(0.9)
    assert pooled_avg.max() == pytest.approx(0.9 / 64)
    with pytest.raises(ValueError, match="lesion pooling"):
        pool_lesion_maps(maps, (4, 4), "median")


def test_side_attention_cw_max_is_the_maps_channel_max_times_the_last_k_channels():
    feature, maps = _feature_and_maps()
    head = SideAttentionGradingHead(
        in_channels=6, num_lesions=3, num_grades=5, attention="cw_max", attention_channels=2
    )
    weights = F.adaptive_max_pool2d(maps, (4, 4)).amax(dim=1, keepdim=True)
    attended = feature.clone()
    attended[:, 4:] = feature[:, 4:] * weights
    expected = head.classifier.fc(attended.mean(dim=(2, 3)))
    assert torch.allclose(head(feature, maps), expected, atol=1e-6)
    assert not any(p.numel() for n, p in head.named_parameters() if "weight_maps" in n)


def test_side_attention_conv_makes_one_weight_map_per_attended_channel():
    feature, maps = _feature_and_maps()
    head = SideAttentionGradingHead(
        in_channels=6, num_lesions=3, num_grades=5, attention="conv", hidden_channels=4
    )
    convs = [m for m in head.weight_maps if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3), (3, 3)]
    assert (convs[0].in_channels, convs[1].out_channels) == (3, 6)  # L maps -> C weights
    pooled = F.adaptive_max_pool2d(maps, (4, 4))
    weights = torch.sigmoid(convs[1](F.relu(convs[0](pooled))))
    expected = head.classifier.fc((feature * weights).mean(dim=(2, 3)))
    assert torch.allclose(head(feature, maps), expected, atol=1e-6)
    # The maps steer the grade: other lesions, other logits.
    assert not torch.allclose(head(feature, maps), head(feature, torch.zeros_like(maps)))


def test_lesion_concat_and_plain_baselines():
    feature, maps = _feature_and_maps()
    concat = LesionConcatGradingHead(in_channels=6, num_lesions=3, num_grades=3)
    pooled = F.adaptive_max_pool2d(maps, (4, 4))
    expected = concat.classifier.fc(torch.cat([feature, pooled], 1).mean(dim=(2, 3)))
    assert torch.allclose(concat(feature, maps), expected, atol=1e-6)
    plain = PlainGradingHead(in_channels=6, num_lesions=3, num_grades=3)
    assert torch.allclose(plain(feature, maps), plain(feature, None))
    assert plain(feature).shape == (2, 3)


def test_heads_build_from_config_and_arguments():
    cfg = get_retina_cfg()
    cfg.MODEL.GRADING.ATTENTION = "cw_max"
    cfg.MODEL.GRADING.ATTENTION_CHANNELS = 4
    shape = ShapeSpec(channels=8, stride=32)
    for name in ("SideAttentionGradingHead", "LesionConcatGradingHead", "PlainGradingHead"):
        cfg.MODEL.GRADING.NAME = name
        head = build_grading_head(cfg, shape, num_lesions=5, num_grades=5)
        assert type(head) is GRADING_HEAD_REGISTRY.get(name)
        assert head(torch.zeros(1, 8, 2, 2), torch.zeros(1, 5, 64, 64)).shape == (1, 5)
    assert head.classifier.fc.in_features == 8
    cfg.MODEL.GRADING.NAME = "SideAttentionGradingHead"
    head = build_grading_head(cfg, shape, num_lesions=5, num_grades=3)
    assert (head.attention, head.attention_channels) == ("cw_max", 4)
    cfg.MODEL.GRADING.NAME = "NoSuchHead"
    with pytest.raises(ValueError, match="MODEL.GRADING.NAME 'NoSuchHead'"):
        build_grading_head(cfg, shape, 5, 5)
    with pytest.raises(ValueError, match="ATTENTION_CHANNELS"):
        SideAttentionGradingHead(in_channels=8, num_lesions=5, num_grades=5, attention_channels=9)


def test_missing_grades_are_masked_out_not_read_as_grade_zero():
    inputs = [{"dr_grade": 3}, {}, {"dr_grade": 0}, {"dr_grade": None}]
    targets = grade_targets(inputs, "dr_grade", 5, "cpu")
    assert targets.tolist() == [3, -1, 0, -1]
    logits = torch.randn(4, 5, requires_grad=True)
    loss = grading_loss(logits, targets)
    expected = F.cross_entropy(logits[[0, 2]], torch.tensor([3, 0]))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert logits.grad[[1, 3]].abs().sum() == 0  # unlabelled images get no gradient
    assert logits.grad[[0, 2]].abs().sum() > 0
    # Reading "no grade" as 0 would give another loss.
    as_zero = F.cross_entropy(logits, torch.tensor([3, 0, 0, 0]))
    assert loss.item() != pytest.approx(as_zero.item())


def test_a_batch_without_any_grade_has_a_zero_loss_that_still_backpropagates():
    logits = torch.randn(2, 3, requires_grad=True)
    loss = grading_loss(logits, torch.tensor([-1, -1]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_grade_and_task_checks():
    with pytest.raises(ValueError, match="dme_grade 3 is not in 0..2"):
        grade_targets([{"file_name": "a.jpg", "dme_grade": 3}], "dme_grade", 3, "cpu")
    with pytest.raises(ValueError, match="not gradable"):
        check_grading_tasks(["dr_grade", "glaucoma"])
    with pytest.raises(ValueError, match="twice"):
        check_grading_tasks(["dr_grade", "dr_grade"])
