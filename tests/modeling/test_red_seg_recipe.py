"""Red-Seg's stage-1 recipe as read from the paper (retina_d2/modeling/semantic/red_seg.py): the
balancing weight beta = k / (N+ + k) over the positives and the k hardest negatives, the k step
schedule k(r) = k0 (1 - floor(r / S) / M), and side outputs supervised beside the fused map."""
import math

import pytest
import torch
from detectron2.utils.events import EventStorage

from retina_d2.modeling.encoders import VGG16Backbone
from retina_d2.modeling.losses import topk_balanced_bce_loss
from retina_d2.modeling.semantic.red_seg import RedSegHead

MA_HE_FEATURES = [["conv2", "conv3", "conv4"], ["conv3", "conv4", "conv5"]]


def _bce(logit, target):
    p = 1 / (1 + math.exp(-logit))
    return -math.log(p) if target else -math.log(1 - p)


def test_beta_balance_by_hand():
    # One image, one lesion, 2 positives and 6 negatives; ratio 1 -> k = 2 hardest negatives.
    logits = torch.tensor([2.0, -1.0, 3.0, 0.5, -2.0, 1.0, -4.0, 0.0]).view(1, 1, 2, 4)
    targets = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.uint8).view(1, 1, 2, 4)
    pos = _bce(2.0, 1) + _bce(-1.0, 1)
    hardest = _bce(3.0, 0) + _bce(1.0, 0)  # the two highest negative BCEs
    beta = 2 / (2 + 2)
    expected = (beta * pos + (1 - beta) * hardest) / (beta * 2 + (1 - beta) * 2)
    got = topk_balanced_bce_loss(logits, targets, negative_ratio=1.0, min_negatives=1,
                                 balance="beta")
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # With 3 hard negatives (ratio 1.5) the weights differ: beta = 3 / 5 on the 2 positives.
    third = _bce(0.5, 0)
    beta = 3 / 5
    expected = (beta * pos + (1 - beta) * (hardest + third)) / (beta * 2 + (1 - beta) * 3)
    got = topk_balanced_bce_loss(logits, targets, negative_ratio=1.5, min_negatives=1,
                                 balance="beta")
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_beta_balance_without_positives_trains_the_hard_negatives():
    logits = torch.tensor([3.0, 1.0, -2.0, 0.0]).view(1, 1, 2, 2)
    targets = torch.zeros(1, 1, 2, 2, dtype=torch.uint8)
    got = topk_balanced_bce_loss(logits, targets, min_negatives=2, balance="beta")
    assert got.item() == pytest.approx((_bce(3.0, 0) + _bce(1.0, 0)) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="balance"):
        topk_balanced_bce_loss(logits, targets, balance="alpha")


def _head(**kwargs):
    torch.manual_seed(0)
    trunk = VGG16Backbone(3, width_mult=1 / 16, norm="GN")
    head = RedSegHead(
        trunk.output_shape(), num_classes=5, lesions=["microaneurysm", "haemorrhage"],
        branch_features=MA_HE_FEATURES, branch_channels=[0, 1], topk_min_negatives=16, **kwargs,
    )
    return trunk, head


def test_k_schedule_steps_down_and_floors():
    _, head = _head(topk_negative_ratio=2.0, topk_decay_period=100, topk_decay_steps=4)
    ratios = [head.topk_ratio(r) for r in (0, 99, 100, 250, 300, 399, 10_000)]
    assert ratios == pytest.approx([2.0, 2.0, 1.5, 1.0, 0.5, 0.5, 0.5])
    _, fixed = _head(topk_negative_ratio=2.0)
    assert fixed.topk_ratio(10_000) == 2.0


def _batch():
    images = torch.zeros(2, 3, 32, 32)
    targets = torch.zeros(2, 5, 32, 32, dtype=torch.uint8)
    images[0, :, 6:9, 9:12] = 1.0
    targets[0, 0, 6:9, 9:12] = 1
    images[1, :, 4:12, 18:28] = -1.0
    targets[1, 1, 4:12, 18:28] = 1
    return images, targets


def test_the_training_iteration_sets_k():
    trunk, head = _head(topk_negative_ratio=4.0, topk_decay_period=100, topk_decay_steps=4)
    images, targets = _batch()
    features = trunk.eval()(images)
    head.train()
    with EventStorage(250):  # the trainer's iteration 250: k0 (1 - 2 / 4)
        logits, losses = head(features, targets, (32, 32))
    expected = topk_balanced_bce_loss(logits[:, :2], targets[:, :2], negative_ratio=2.0,
                                      min_negatives=16)
    assert losses["loss_topk_bce"].item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("stage", [1, 2])
def test_side_outputs_are_supervised_beside_the_fused_map(stage):
    trunk, head = _head(side_supervision=True, topk_balance="beta")
    _, plain = _head(topk_balance="beta")
    plain.load_state_dict(head.state_dict())
    head.loss_stage = plain.loss_stage = stage
    images, targets = _batch()
    features = trunk.eval()(images)
    head.train(), plain.train()
    logits, losses = head(features, targets, (32, 32))
    plain_logits, plain_losses = plain(features, targets, (32, 32))
    name = "loss_topk_bce" if stage == 1 else "loss_fn_fp"
    assert set(losses) == {name, name.replace("loss_", "loss_side_")}
    assert torch.equal(logits, plain_logits)
    assert losses[name].item() == pytest.approx(plain_losses[name].item(), rel=1e-6)
    # The side term: the stage's loss of every side output against its lesion's target, summed.
    expected = 0.0
    for channel, branch in zip(head.branch_channels, head.branches):
        _, sides = branch(features, (32, 32), with_sides=True)
        for side in sides:
            expected += head._stage_loss(side, targets[:, channel : channel + 1])[name].item()
    assert losses[name.replace("loss_", "loss_side_")].item() == pytest.approx(expected, rel=1e-5)
    # The side convs get a gradient from their own loss even where the fused one gives none.
    head.zero_grad()
    losses[name.replace("loss_", "loss_side_")].backward()
    assert all(conv.weight.grad.abs().sum() > 0 for b in head.branches for conv in b.sides.values())
    # Inference is unchanged.
    head.eval()
    assert torch.equal(head(features)[0], plain.eval()(features)[0])
