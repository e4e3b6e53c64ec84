"""Semantic lesion losses: values worked by hand on tiny tensors, finite gradients on empty and
all-ignore images, and ignore pixels that change neither the loss nor any gradient."""
import math

import pytest
import torch

from retina_d2.modeling.losses import (
    IGNORE_VALUE,
    boundary_loss,
    boundary_weights,
    cbam_deeplab_losses,
    dual_dice_loss,
    fn_fp_loss,
    resunet_class_alpha,
    resunet_losses,
    sigmoid_bce_loss,
    sigmoid_dice_loss,
    sigmoid_focal_loss,
    sobel_magnitude,
    softmax_dice_loss,
    softmax_focal_loss,
    topk_balanced_bce_loss,
)

LN2, LN3 = math.log(2.0), math.log(3.0)
# sigmoid(ln 3) = 0.75, sigmoid(0) = 0.5, sigmoid(-ln 3) = 0.25.


def _t(values, shape=None):
    t = torch.tensor(values, dtype=torch.float64)
    return t.reshape(shape) if shape is not None else t


# --- hand-worked values ------------------------------------------------------------------------


def test_sigmoid_focal_loss_by_hand():
    # Pixel 1: p = 0.75, y = 1 -> p_t = 0.75, BCE = ln(4/3), (1 - p_t)^2 = 1/16, alpha_t = 0.25.
    # Pixel 2: p = 0.25, y = 0 -> p_t = 0.75, BCE = ln(4/3), (1 - p_t)^2 = 1/16, alpha_t = 0.75.
    # Pixel 3: ignored (255), logit 5 must not count, nor its place in the normaliser.
    # Mean over the 2 valid pixels: (0.25 + 0.75) / 16 * ln(4/3) / 2 = ln(4/3) / 32.
    logits = _t([LN3, -LN3, 5.0], (1, 1, 1, 3))
    targets = _t([1, 0, IGNORE_VALUE], (1, 1, 1, 3))
    assert sigmoid_focal_loss(logits, targets).item() == pytest.approx(math.log(4 / 3) / 32)
    # gamma 0 and no alpha: plain BCE, ln(4/3) on both pixels.
    assert sigmoid_focal_loss(logits, targets, alpha=-1, gamma=0).item() == pytest.approx(
        math.log(4 / 3)
    )
    assert sigmoid_bce_loss(logits, targets).item() == pytest.approx(math.log(4 / 3))


def test_softmax_focal_loss_by_hand():
    # Logits [0, 0, ln 2] -> softmax [1/4, 1/4, 1/2] on both pixels; alpha = [0.25, 0.75, 0.75].
    # Pixel A, class 2: p_t = 1/2, (1 - p_t)^2 = 1/4, -ln p_t = ln 2, alpha 0.75 -> 3 ln2 / 16.
    # Pixel B, class 0: p_t = 1/4, (3/4)^2 = 9/16, -ln p_t = 2 ln 2, alpha 0.25 -> 9 ln2 / 32.
    # Pixel C: ignored. Mean over 2: (6 + 9) ln2 / 32 / 2 = 15 ln2 / 64.
    pixel = [0.0, 0.0, LN2]
    logits = _t([pixel, pixel, [9.0, -9.0, 0.0]]).t().reshape(1, 3, 1, 3)
    targets = torch.tensor([[[2, 0, IGNORE_VALUE]]])
    alpha = resunet_class_alpha(3)
    assert alpha == [0.25, 0.75, 0.75]
    loss = softmax_focal_loss(logits, targets, alpha=alpha)
    assert loss.item() == pytest.approx(15 * LN2 / 64)
    # No alpha, gamma 0: cross-entropy (ln 2 + 2 ln 2) / 2.
    assert softmax_focal_loss(logits, targets, gamma=0).item() == pytest.approx(1.5 * LN2)


def test_sigmoid_dice_loss_by_hand():
    # Lesion 0: p = [0.75, 0.25, 0.5, 0.5], y = [1, 0, 1, 0]: sum p y = 1.25, sum p = 2, sum y = 2,
    #   Dice = (2 * 1.25 + 1) / (2 + 2 + 1) = 0.7.
    # Lesion 1 (empty target), same p: Dice = (0 + 1) / (2 + 0 + 1) = 1/3.
    # Loss = 1 - (0.7 + 1/3) / 2 = 29/60.
    row = [LN3, -LN3, 0.0, 0.0]
    logits = _t([row, row], (1, 2, 1, 4))
    targets = _t([[1, 0, 1, 0], [0, 0, 0, 0]], (1, 2, 1, 4))
    assert sigmoid_dice_loss(logits, targets).item() == pytest.approx(29 / 60)


def test_softmax_dice_loss_by_hand():
    # Pixel A: logits [0, 0, ln 2] -> p = [1/4, 1/4, 1/2], class 2.
    # Pixel B: logits [ln 2, 0, 0] -> p = [1/2, 1/4, 1/4], class 0.
    # Class 0: sum p y = 1/2, sum p = 3/4, sum y = 1 -> (1 + 1) / (7/4 + 1) = 8/11.
    # Class 1: 0, 1/2, 0 -> 1 / (1/2 + 1) = 2/3.       Class 2: like class 0 -> 8/11.
    # Without background: 1 - (2/3 + 8/11) / 2 = 10/33; with: 1 - (8/11 + 2/3 + 8/11) / 3 = 29/99.
    logits = _t([[0.0, 0.0, LN2], [LN2, 0.0, 0.0]]).t().reshape(1, 3, 1, 2)
    targets = torch.tensor([[[2, 0]]])
    loss = softmax_dice_loss(logits, targets, exclude_background=True)
    assert loss.item() == pytest.approx(10 / 33)
    assert softmax_dice_loss(logits, targets).item() == pytest.approx(29 / 99)


def test_dual_dice_loss_by_hand():
    # Image 0: p = [0.75, 0.25], y = [1, 0].  Image 1: p = [0.5, 0.25], y = [0, 0].
    # Pixel Dice: sum p y = 0.75, sum p = 1.75, sum y = 1 -> (1.5 + 1) / (2.75 + 1) = 2/3.
    # Image level: max p = [0.75, 0.5], y = [1, 0]: (1.5 + 1) / (1.25 + 1 + 1) = 10/13.
    # Loss = 0.8 (1 - 2/3) + 0.2 (1 - 10/13) = 4/15 + 3/65 = 61/195.
    logits = _t([[LN3, -LN3], [0.0, -LN3]], (2, 1, 1, 2))
    targets = _t([[1, 0], [0, 0]], (2, 1, 1, 2))
    assert dual_dice_loss(logits, targets).item() == pytest.approx(61 / 195)
    # lambda = 1 is the pixel Dice loss alone.
    assert dual_dice_loss(logits, targets, pixel_weight=1.0).item() == pytest.approx(
        sigmoid_dice_loss(logits, targets).item()
    )


def test_topk_balanced_bce_by_hand():
    # Image 0: one positive (logit 0: BCE ln 2); negatives with logits [ln3, 0, -ln3, -ln3, 0]
    #   have BCE -ln(1 - p) = [ln 4, ln 2, ln 4/3, ln 4/3, ln 2].
    #   k = max(ceil(2 * 1), 1) = 2 hardest negatives: ln 4 + ln 2.
    #   Sum = ln 2 + 2 ln 2 + ln 2 = 4 ln 2 over 3 pixels.
    # Image 1: no positive, so k = min_negatives; its negatives' BCE: [ln 4, ln 2, ln 4/3 x 4].
    logits = _t(
        [[0.0, LN3, 0.0, -LN3, -LN3, 0.0], [LN3, 0.0, -LN3, -LN3, -LN3, -LN3]], (2, 1, 1, 6)
    )
    targets = _t([[1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], (2, 1, 1, 6))
    one = topk_balanced_bce_loss(logits[:1], targets[:1], negative_ratio=2, min_negatives=1)
    assert one.item() == pytest.approx(4 * LN2 / 3)
    # Image 1 alone with min_negatives 2: (ln 4 + ln 2) / 2 = 3 ln 2 / 2.
    empty = topk_balanced_bce_loss(logits[1:], targets[1:], negative_ratio=2, min_negatives=2)
    assert empty.item() == pytest.approx(1.5 * LN2)
    # Both (image 0 now takes k = max(2, 2) = 2 as well): (4 ln 2 + 3 ln 2) / (3 + 2) = 7 ln2 / 5.
    both = topk_balanced_bce_loss(logits, targets, negative_ratio=2, min_negatives=2)
    assert both.item() == pytest.approx(7 * LN2 / 5)
    # k is capped by the negatives there are: all 5 negatives of image 0.
    # (ln 2 + ln 4 + ln 2 + 2 ln 4/3 + ln 2) / 6.
    capped = topk_balanced_bce_loss(logits[:1], targets[:1], negative_ratio=10, min_negatives=1)
    assert capped.item() == pytest.approx((5 * LN2 + 2 * math.log(4 / 3)) / 6)


def test_topk_selects_the_hardest_negatives_gradient():
    logits = _t([0.0, LN3, 0.0, -LN3, -LN3, 0.0], (1, 1, 1, 6)).requires_grad_()
    targets = _t([1, 0, 0, 0, 0, 0], (1, 1, 1, 6))
    topk_balanced_bce_loss(logits, targets, negative_ratio=1, min_negatives=1).backward()
    # k = 1: only the positive and the logit-ln3 negative get a gradient.
    assert (logits.grad.flatten() != 0).tolist() == [True, True, False, False, False, False]


def test_fn_fp_loss_by_hand():
    # p = [0.75, 0.25, 0.5], y = [1, 1, 0]: (1/4)^2 + (3/4)^2 + (1/2)^2 = 14/16, / 3 = 7/24.
    logits = _t([LN3, -LN3, 0.0, 3.0], (1, 1, 2, 2))
    targets = _t([1, 1, 0, IGNORE_VALUE], (1, 1, 2, 2))
    assert fn_fp_loss(logits, targets).item() == pytest.approx(7 / 24)


def test_sobel_magnitude_of_a_one_pixel_lesion():
    # 3x3 with the centre set; replicate padding. Left-middle pixel: gx = 2 * (1 - 0) = 2 (the
    # centre weighs 2), gy = 0. Top-left corner: gx = 1 (centre in the lower row, weight 1),
    # gy = 1 -> sqrt 2. Centre: symmetric -> 0.
    target = _t([[0, 0, 0], [0, 1, 0], [0, 0, 0]], (1, 1, 3, 3))
    r2 = math.sqrt(2)
    expected = _t([[r2, 2, r2], [2, 0, 2], [r2, 2, r2]], (1, 1, 3, 3))
    torch.testing.assert_close(sobel_magnitude(target), expected)


def test_boundary_loss_by_hand():
    # y = [0, 0, 1, 1] on 3 rows. Replicate padding: gx = (1 + 2 + 1) * (y[j+1] - y[j-1]) =
    # [0, 4, 4, 0], gy = 0 -> weights [1, e^-6, e^-6, 1]. Logits 0: BCE = ln 2 everywhere.
    # Mean over 12 pixels: ln 2 * (6 + 6 e^-6) / 12 = ln 2 (1 + e^-6) / 2.
    targets = _t([[0, 0, 1, 1]] * 3, (1, 1, 3, 4))
    weights = boundary_weights(targets)
    e6 = math.exp(-6)
    torch.testing.assert_close(weights, _t([[1, e6, e6, 1]] * 3, (1, 1, 3, 4)))
    loss = boundary_loss(torch.zeros_like(targets), targets)
    assert loss.item() == pytest.approx(LN2 * (1 + e6) / 2)


def test_combined_losses_are_the_weighted_terms():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    targets = (torch.rand(2, 3, 8, 8, generator=g) > 0.8).double()
    parts = cbam_deeplab_losses(logits, targets)
    expected = {
        "loss_dice": 1.0 * sigmoid_dice_loss(logits, targets),
        "loss_bce": 0.5 * sigmoid_bce_loss(logits, targets),
        "loss_focal": 1.0 * sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2),
        "loss_boundary": 0.5 * boundary_loss(logits, targets, beta=1.5),
    }
    assert parts.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(parts[name], expected[name])

    classes = torch.randint(0, 6, (2, 8, 8), generator=g)
    logits6 = torch.randn(2, 6, 8, 8, generator=g, dtype=torch.float64)
    parts = resunet_losses(logits6, classes)
    alpha = [0.25, 0.75, 0.75, 0.75, 0.75, 0.75]
    focal = softmax_focal_loss(logits6, classes, alpha=alpha)
    torch.testing.assert_close(parts["loss_focal"], focal)
    torch.testing.assert_close(
        parts["loss_dice"], softmax_dice_loss(logits6, classes, exclude_background=True)
    )


# --- properties shared by every loss -----------------------------------------------------------


def _total(result):
    return sum(result.values()) if isinstance(result, dict) else result


SIGMOID_LOSSES = {
    "focal": sigmoid_focal_loss,
    "bce": sigmoid_bce_loss,
    "dice": sigmoid_dice_loss,
    "dual_dice": dual_dice_loss,
    "topk_bce": lambda x, y, ignore=None: topk_balanced_bce_loss(x, y, ignore, min_negatives=5),
    "fn_fp": fn_fp_loss,
    "boundary": boundary_loss,
    "cbam_deeplab": cbam_deeplab_losses,
}
SOFTMAX_LOSSES = {
    "softmax_focal": lambda x, y, ignore=None: softmax_focal_loss(
        x, y, ignore, alpha=[0.25, 0.75, 0.75]
    ),
    "softmax_dice": softmax_dice_loss,
    "softmax_dice_no_bg": lambda x, y, ignore=None: softmax_dice_loss(
        x, y, ignore, exclude_background=True
    ),
    "resunet": resunet_losses,
}
ALL_LOSSES = [(name, fn, "sigmoid") for name, fn in SIGMOID_LOSSES.items()] + [
    (name, fn, "softmax") for name, fn in SOFTMAX_LOSSES.items()
]


def _random_case(kind, seed=0, n=2, c=3, h=9, w=11):
    """Logits (requires_grad), targets with lesions and ~20% ignore (255) pixels."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 2
    ignore = torch.rand(n, h, w, generator=g) < 0.2
    if kind == "sigmoid":
        targets = (torch.rand(n, c, h, w, generator=g) < 0.25).double()
        targets[ignore[:, None].expand_as(targets)] = IGNORE_VALUE
    else:
        targets = torch.randint(0, c, (n, h, w), generator=g)
        targets[ignore] = IGNORE_VALUE
    return logits.requires_grad_(), targets, ignore


def _loss_and_grad(fn, logits, targets, ignore=None):
    logits = logits.detach().clone().requires_grad_()
    loss = _total(fn(logits, targets, ignore))
    loss.backward()
    return loss.detach(), logits.grad


@pytest.mark.parametrize("name,fn,kind", ALL_LOSSES, ids=[n for n, _, _ in ALL_LOSSES])
def test_ignore_pixels_change_neither_loss_nor_gradient(name, fn, kind):
    logits, targets, ignore = _random_case(kind)
    loss, grad = _loss_and_grad(fn, logits, targets)
    assert torch.isfinite(loss) and loss > 0
    pixel_ignore = ignore[:, None].expand_as(logits)
    # Any value at ignore pixels, even huge or non-finite ones, is invisible.
    wild = logits.detach().clone()
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(wild.shape, generator=g, dtype=torch.float64) * 1e6
    wild[pixel_ignore] = noise[pixel_ignore]
    wild[0, 0][ignore[0]] = float("inf")
    wild[1, -1][ignore[1]] = float("nan")
    wild_loss, wild_grad = _loss_and_grad(fn, wild, targets)
    torch.testing.assert_close(wild_loss, loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(wild_grad, grad, rtol=1e-12, atol=1e-12)
    assert (grad[pixel_ignore] == 0).all()


@pytest.mark.parametrize("name,fn,kind", ALL_LOSSES, ids=[n for n, _, _ in ALL_LOSSES])
def test_ignore_mask_equals_ignore_value(name, fn, kind):
    logits, targets, ignore = _random_case(kind)
    loss, grad = _loss_and_grad(fn, logits, targets)
    # The same pixels as an ignore mask on targets that hold a (meaningless) class there.
    plain = targets.clone()
    plain[plain == IGNORE_VALUE] = 0
    mask_loss, mask_grad = _loss_and_grad(fn, logits, plain, ignore)
    torch.testing.assert_close(mask_loss, loss)
    torch.testing.assert_close(mask_grad, grad)


@pytest.mark.parametrize("name,fn,kind", ALL_LOSSES, ids=[n for n, _, _ in ALL_LOSSES])
def test_empty_masks_give_finite_gradients(name, fn, kind):
    logits, targets, _ = _random_case(kind)
    empty = torch.zeros_like(targets)
    loss, grad = _loss_and_grad(fn, logits, empty)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # Confident empty predictions on an empty mask: still finite (no 0 / 0, no log 0).
    confident = torch.full_like(logits, -50.0)
    if kind == "softmax":
        confident[:, 0] = 50.0
    loss, grad = _loss_and_grad(fn, confident, empty)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("name,fn,kind", ALL_LOSSES, ids=[n for n, _, _ in ALL_LOSSES])
def test_all_ignore_images(name, fn, kind):
    logits, targets, _ = _random_case(kind)
    # A batch where image 1 is entirely ignored is image 0 alone, and image 1 gets no gradient.
    partly = targets.clone()
    partly[1] = IGNORE_VALUE
    loss, grad = _loss_and_grad(fn, logits, partly)
    alone_loss, alone_grad = _loss_and_grad(fn, logits[:1], targets[:1])
    torch.testing.assert_close(loss, alone_loss)
    torch.testing.assert_close(grad[:1], alone_grad)
    assert (grad[1] == 0).all()
    # Nothing valid at all: loss 0, gradient 0, nothing NaN.
    loss, grad = _loss_and_grad(fn, logits, torch.full_like(targets, IGNORE_VALUE))
    assert loss.item() == 0 and (grad == 0).all()


def test_bad_shapes_and_classes_are_refused():
    with pytest.raises(ValueError, match="same shape|one shape"):
        sigmoid_dice_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="class targets"):
        softmax_focal_loss(torch.zeros(1, 3, 2, 2), torch.full((1, 2, 2), 3))
    with pytest.raises(ValueError, match="alpha"):
        classes = torch.zeros(1, 2, 2, dtype=torch.long)
        softmax_focal_loss(torch.zeros(1, 3, 2, 2), classes, alpha=[1, 1])
    with pytest.raises(ValueError, match="smooth"):
        sigmoid_dice_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), smooth=0)
