"""Lesion-Net's Dice forms (its eq. 3 and 4): one fraction pooled over every pixel and lesion of
the batch, squared denominators, for the pixel Dice and the image-level term of the dual Dice;
checked against the formulas computed by hand with NumPy."""
import numpy as np
import pytest
import torch

from retina_d2.modeling.losses import dual_dice_loss, sigmoid_dice_loss

TINY = 1e-9  # the smoothing term, negligible: the paper's formulas have none


def _batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 4, generator=g)
    targets = (torch.rand(2, 3, 5, 4, generator=g) > 0.7).to(torch.uint8)
    targets[1, 2] = 0  # a lesion absent from an image
    targets[0, 1, 0, :] = 255  # ignore pixels
    return logits, targets


def test_pixel_dice_squared_pooled_is_eq_3():
    logits, targets = _batch()
    p = torch.sigmoid(logits).numpy()
    t = targets.numpy().astype(float)
    valid = t != 255
    p, t = p[valid], t[valid]
    expected = 1 - 2 * (p * t).sum() / ((p**2).sum() + (t**2).sum())
    got = sigmoid_dice_loss(logits, targets, smooth=TINY, form="squared_pooled")
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # Not the per-lesion mean of linear-denominator Dice.
    per_lesion = sigmoid_dice_loss(logits, targets, smooth=TINY).item()
    assert per_lesion != pytest.approx(expected, rel=1e-3)


def test_dual_dice_squared_pooled_is_eq_2_with_eq_3_and_4():
    logits, targets = _batch()
    p = torch.sigmoid(logits).numpy()
    t = targets.numpy().astype(float)
    valid = t != 255
    pixel = 1 - 2 * (p[valid] * t[valid]).sum() / ((p[valid] ** 2).sum() + (t[valid] ** 2).sum())
    # Image level: global max over valid pixels, per image and lesion.
    big_p = np.where(valid, p, -np.inf).reshape(2, 3, -1).max(-1)
    big_t = np.where(valid, t, 0).reshape(2, 3, -1).max(-1)
    image = 1 - 2 * (big_p * big_t).sum() / ((big_p**2).sum() + (big_t**2).sum())
    got = dual_dice_loss(logits, targets, smooth=TINY, form="squared_pooled", pixel_weight=0.8)
    assert got.item() == pytest.approx(0.8 * pixel + 0.2 * image, rel=1e-6)


def test_squared_pooled_gradient_is_zero_on_ignore_pixels_and_finite():
    logits, targets = _batch()
    logits.requires_grad_(True)
    dual_dice_loss(logits, targets, form="squared_pooled").backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[0, 1, 0, :] == 0).all()


def test_an_unknown_form_is_refused():
    logits, targets = _batch()
    with pytest.raises(ValueError, match="squared_pooled"):
        sigmoid_dice_loss(logits, targets, form="squared")
