"""ResUNet: residual U-Net encoder (build_unet_encoder_backbone) + ResUNetHead."""
import math
import os

import pytest
import torch
from detectron2.modeling import build_backbone, build_model, build_sem_seg_head
from torch import nn

import retina_d2.modeling  # noqa: F401  (registration)
import retina_d2.modeling.encoders  # noqa: F401  (registration)
import retina_d2.modeling.semantic.resunet  # noqa: F401  (registration)
from retina_d2.config import get_retina_cfg
from retina_d2.modeling.encoders import ResidualDoubleConv, UNetEncoder
from retina_d2.modeling.losses import IGNORE_VALUE, resunet_losses
from retina_d2.modeling.semantic.resunet import ResUNetHead, softmax_class_targets

CONFIGS = ["configs/resunet_idrid.yaml", "configs/resunet_heimed.yaml"]
NUM_CLASSES = 5


def _model(widths=(4, 8, 16), num_classes=NUM_CLASSES, seed=0):
    torch.manual_seed(seed)
    encoder = UNetEncoder(3, list(widths), dropout=0.3)
    head = ResUNetHead(encoder.output_shape(), num_classes=num_classes)
    return encoder, head


def _square_batch(size=32):
    """Two images whose lesion 0 is a bright square and lesion 2 a dark one."""
    images = torch.zeros(2, 3, size, size)
    targets = torch.zeros(2, NUM_CLASSES, size, size, dtype=torch.uint8)
    images[0, :, 4:12, 6:14] = 1.0
    targets[0, 0, 4:12, 6:14] = 1
    images[1, :, 16:26, 10:20] = -1.0
    targets[1, 2, 16:26, 10:20] = 1
    return images, targets


def test_softmax_class_targets_follow_the_contract():
    targets = torch.zeros(1, 3, 1, 5, dtype=torch.uint8)
    # pixel 0: background; 1: lesion 1; 2: lesions 0 and 2 -> the first; 3: ignore on lesion 1
    # only -> ignore; 4: lesion 2 positive and lesion 0 ignore -> lesion 2.
    targets[0, 1, 0, 1] = 1
    targets[0, 0, 0, 2] = targets[0, 2, 0, 2] = 1
    targets[0, 1, 0, 3] = IGNORE_VALUE
    targets[0, 2, 0, 4], targets[0, 0, 0, 4] = 1, IGNORE_VALUE
    classes = softmax_class_targets(targets)
    assert classes.dtype == torch.int64
    assert classes[0, 0].tolist() == [0, 2, 1, IGNORE_VALUE, 3]


def test_odd_input_sizes_are_padded_by_the_encoder_and_cropped_back():
    encoder, head = _model(widths=(4, 8, 16, 32, 64))
    encoder.eval(), head.eval()  # dropout off: the two forwards below must agree
    assert encoder.size_divisibility == 16
    x = torch.randn(2, 3, 97, 131)
    features = encoder(x)
    # Padded to 112 x 144 inside the encoder: every stride divides it exactly.
    for name, shape in encoder.output_shape().items():
        assert features[name].shape == (2, shape.channels, 112 // shape.stride, 144 // shape.stride)
    logits, losses = head(features, None, (97, 131))
    assert logits.shape == (2, NUM_CLASSES + 1, 97, 131) and losses == {}
    # Without image_size: the padded input's size.
    assert head(features)[0].shape == (2, NUM_CLASSES + 1, 112, 144)
    # With an input the meta-architecture already padded, the crop is a no-op.
    padded = torch.nn.functional.pad(x, (0, 13, 0, 15))
    assert torch.equal(head(encoder(padded), None, (112, 144))[0][..., :97, :131], logits)


def test_head_on_features_of_an_unpadded_odd_input():
    # Features not from the padded encoder (e.g. another backbone's): sizes are reconciled.
    _, head = _model()
    shapes = head.in_features
    features = {
        shapes[0]: torch.randn(1, 4, 25, 33),
        shapes[1]: torch.randn(1, 8, 12, 16),
        shapes[2]: torch.randn(1, 16, 6, 8),
    }
    logits, _ = head.eval()(features, None, (25, 33))
    assert logits.shape == (1, NUM_CLASSES + 1, 25, 33)


def test_kaiming_init_no_normalisation_and_dropout():
    encoder, head = _model(widths=(16, 32, 64))
    modules = list(encoder.modules()) + list(head.modules())
    norms = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d, nn.SyncBatchNorm)
    assert not any(isinstance(m, norms) for m in modules)
    blocks = [m for m in modules if isinstance(m, ResidualDoubleConv)]
    dropouts = [m for m in modules if isinstance(m, nn.Dropout)]
    assert len(blocks) == 3 + 2 and len(dropouts) == len(blocks)
    assert all(d.p == pytest.approx(0.3) for d in dropouts)
    # A 1x1 conv shortcut wherever the block changes the channel count.
    assert all(isinstance(b.shortcut, nn.Conv2d) for b in blocks)
    convs = [m for m in modules if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    for conv in convs:
        if conv is head.predictor or conv.weight.numel() < 4000:
            continue
        fan_in = nn.init._calculate_fan_in_and_fan_out(conv.weight)[0]
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_in), rel=0.1)
        assert torch.count_nonzero(conv.bias) == 0


def test_forward_losses_match_resunet_losses():
    encoder, head = _model()
    images, targets = _square_batch()
    head.train()
    torch.manual_seed(3)
    logits, losses = head(encoder.train()(images), targets, (32, 32))
    assert set(losses) == {"loss_focal", "loss_dice"}
    expected = resunet_losses(logits, softmax_class_targets(targets))
    for key, value in expected.items():
        assert losses[key].item() == pytest.approx(value.item(), rel=1e-5)


def test_a_few_adam_iterations_lower_the_loss():
    encoder, head = _model()
    images, targets = _square_batch()
    params = list(encoder.parameters()) + list(head.parameters())
    # The paper's 1e-3 needs more steps than a unit test should take to move the loss clearly.
    optimizer = torch.optim.Adam(params, lr=3e-3)

    def eval_loss():
        with torch.no_grad():
            logits, _ = head.eval()(encoder.eval()(images), None, (32, 32))
            return sum(head.losses(logits, targets).values()).item()

    before = eval_loss()
    for _ in range(20):
        encoder.train(), head.train()
        _, losses = head(encoder(images), targets, (32, 32))
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert eval_loss() < 0.9 * before


def test_checkpoint_round_trip(tmp_path):
    encoder, head = _model(seed=0)
    path = tmp_path / "resunet.pth"
    torch.save({"encoder": encoder.state_dict(), "head": head.state_dict()}, path)
    other_encoder, other_head = _model(seed=1)
    state = torch.load(path)
    other_encoder.load_state_dict(state["encoder"])
    other_head.load_state_dict(state["head"])
    x = torch.randn(1, 3, 20, 28)
    with torch.no_grad():
        expected = head.eval()(encoder.eval()(x), None, (20, 28))[0]
        restored = other_head.eval()(other_encoder.eval()(x), None, (20, 28))[0]
    assert torch.equal(expected, restored)


def _cfg(path):
    cfg = get_retina_cfg()
    cfg.merge_from_file(path)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


@pytest.mark.parametrize("path", CONFIGS)
def test_config_builds_backbone_and_head(path):
    cfg = _cfg(path)
    assert cfg.MODEL.LESION_SEG.ACTIVATION == "softmax"
    assert cfg.SOLVER.OPTIMIZER == "ADAM" and cfg.SOLVER.BASE_LR == pytest.approx(1e-3)
    assert cfg.SOLVER.CLIP_GRADIENTS.ENABLED and cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE == 2.0
    backbone = build_backbone(cfg)
    assert backbone.size_divisibility == 16
    head = build_sem_seg_head(cfg, backbone.output_shape())
    assert isinstance(head, ResUNetHead)
    assert head.predictor.out_channels == cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES + 1
    assert head.class_alpha == [0.25] + [0.75] * cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES


@pytest.mark.skipif(
    not os.path.exists("retina_d2/modeling/meta_arch/semantic_net.py"),
    reason="SemanticLesionNet not written yet",
)
@pytest.mark.parametrize("path", CONFIGS)
def test_config_builds_a_model_that_trains_and_infers(path):
    cfg = _cfg(path)
    cfg.MODEL.UNET_ENCODER.WIDTHS = [4, 8, 16, 32, 64]  # the forward only checks shapes
    model = build_model(cfg)
    image = torch.randint(0, 256, (3, 45, 61)).float()
    sem_seg = torch.zeros(NUM_CLASSES, 45, 61, dtype=torch.uint8)
    sem_seg[1, 10:20, 10:30] = 1
    losses = model([{"image": image, "sem_seg": sem_seg}])
    assert set(losses) == {"loss_focal", "loss_dice"}
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        (output,) = model([{"image": image, "height": 90, "width": 122}])
    assert output["sem_seg"].shape == (NUM_CLASSES, 90, 122)


def test_from_config_requires_softmax():
    cfg = _cfg(CONFIGS[1])
    cfg.MODEL.LESION_SEG.ACTIVATION = "sigmoid"
    backbone = build_backbone(cfg)
    with pytest.raises(ValueError, match="softmax"):
        build_sem_seg_head(cfg, backbone.output_shape())
