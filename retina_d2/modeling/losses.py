"""Losses of the semantic lesion heads, as the papers behind DESIGN.md define them.

Two target layouts:

- per-lesion sigmoid (Lesion-Net, CBAM-DeepLab, Red-Seg): ``logits`` (N, C, H, W) and ``targets``
  (N, C, H, W) holding 0 / 1 (soft values in [0, 1] are accepted where a loss says so) and
  :data:`IGNORE_VALUE` (255, as in the converters' semantic PNGs) for ignore pixels;
- softmax (ResUNet): ``logits`` (N, C, H, W) and ``targets`` (N, H, W) int64 class indices
  (0 = background) with :data:`IGNORE_VALUE` for ignore pixels.

Every loss also takes ``ignore``, an optional bool tensor (True = ignore) of the targets' shape;
for the sigmoid layout an (N, H, W) mask applies to every lesion. Ignore pixels are left out of
every sum and of every normaliser. Their logits are swapped for a constant (``torch.where``)
before any arithmetic, so their gradient is exactly zero and even inf / NaN logits there cannot
leak into the loss (multiplying a per-pixel loss by a 0/1 mask would turn inf into NaN).

Reduction: every function returns a scalar; its docstring says what the sum is divided by. With
no valid pixel at all a loss is 0 with a zero gradient, never NaN.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..schema import IGNORE_VALUE  # the semantic targets' ignore value (re-exported)

__all__ = [
    "DICE_FORMS",
    "IGNORE_VALUE",
    "sigmoid_focal_loss",
    "softmax_focal_loss",
    "sigmoid_bce_loss",
    "sigmoid_dice_loss",
    "softmax_dice_loss",
    "dual_dice_loss",
    "topk_balanced_bce_loss",
    "fn_fp_loss",
    "sobel_magnitude",
    "boundary_weights",
    "boundary_loss",
    "cbam_deeplab_losses",
    "resunet_class_alpha",
    "resunet_losses",
]



def _sigmoid_inputs(
    logits: torch.Tensor, targets: torch.Tensor, ignore: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits and float targets with ignore pixels set to 0, and the 0/1 float valid mask, all
    (N, C, H, W)."""
    if logits.dim() != 4 or targets.shape != logits.shape:
        raise ValueError(
            f"per-lesion sigmoid losses expect logits and targets of one shape (N, C, H, W), "
            f"got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    valid = targets != IGNORE_VALUE
    if ignore is not None:
        ignore = ignore.bool()
        if ignore.dim() == 3:
            ignore = ignore[:, None]
        valid = valid & ~ignore
    valid = valid.expand_as(logits)
    targets = torch.where(valid, targets.to(logits.dtype), 0.0)
    logits = torch.where(valid, logits, 0.0)
    return logits, targets, valid.to(logits.dtype)


def _softmax_inputs(
    logits: torch.Tensor, targets: torch.Tensor, ignore: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (N, C, H, W) and int64 class targets (N, H, W) with ignore pixels set to 0 (logits
    and class), and the (N, H, W) 0/1 float valid mask."""
    if logits.dim() != 4 or targets.shape != (logits.shape[0],) + tuple(logits.shape[2:]):
        raise ValueError(
            f"softmax losses expect logits (N, C, H, W) and class targets (N, H, W), "
            f"got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    valid = targets != IGNORE_VALUE
    if ignore is not None:
        valid = valid & ~ignore.bool()
    num_classes = logits.shape[1]
    if bool(((targets < 0) | (targets >= num_classes))[valid].any()):
        raise ValueError(f"class targets outside 0..{num_classes - 1} (and {IGNORE_VALUE})")
    targets = torch.where(valid, targets.long(), 0)
    logits = torch.where(valid[:, None], logits, 0.0)
    return logits, targets, valid.to(logits.dtype)


def _masked_mean(per_pixel: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sum over valid entries / their number (0 when there is none)."""
    return (per_pixel * valid).sum() / valid.sum().clamp(min=1.0)


def _focal_terms(logits: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-pixel ``(1 - p_t)^gamma * BCE`` without alpha."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    return ce * (1 - p_t) ** gamma


def sigmoid_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore: Optional[torch.Tensor] = None,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Focal loss per lesion map (Lin et al.; CBAM-DeepLab uses alpha 0.25, gamma 2):
    ``-alpha_t (1 - p_t)^gamma log(p_t)``, alpha_t = alpha on positives, 1 - alpha on negatives.

    Args:
        logits: (N, C, H, W).
        targets: (N, C, H, W), values in [0, 1] or 255 (ignore).
        ignore: optional bool mask, (N, C, H, W) or (N, H, W).
        alpha: weight of the positives; a negative value disables the alpha weighting.
        gamma: focusing exponent.

    Returns:
        scalar: the sum over valid (pixel, lesion) entries divided by their number.
    """
    logits, targets, valid = _sigmoid_inputs(logits, targets, ignore)
    loss = _focal_terms(logits, targets, gamma)
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return _masked_mean(loss, valid)


def softmax_focal_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore: Optional[torch.Tensor] = None,
    *,
    alpha: Optional[Sequence[float]] = None,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Multi-class focal loss ``-alpha[y] (1 - p_y)^gamma log(p_y)`` over a softmax.

    Args:
        logits: (N, C, H, W).
        targets: (N, H, W) class indices, 255 = ignore.
        ignore: optional (N, H, W) bool mask.
        alpha: per-class weights (length C), e.g. :func:`resunet_class_alpha`; None = all 1.
        gamma: focusing exponent.

    Returns:
        scalar: the sum over valid pixels divided by their number (not by the sum of alphas).
    """
    logits, targets, valid = _softmax_inputs(logits, targets, ignore)
    log_p = F.log_softmax(logits, dim=1).gather(1, targets[:, None])[:, 0]
    loss = -((1 - log_p.exp()) ** gamma) * log_p
    if alpha is not None:
        alpha = torch.as_tensor(alpha, dtype=logits.dtype, device=logits.device)
        if alpha.shape != (logits.shape[1],):
            raise ValueError(f"alpha needs one weight per class ({logits.shape[1]}), got {alpha}")
        loss = loss * alpha[targets]
    return _masked_mean(loss, valid)


def sigmoid_bce_loss(
    logits: torch.Tensor, targets: torch.Tensor, ignore: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Binary cross-entropy per lesion map.

    Args:
        logits: (N, C, H, W).
        targets: (N, C, H, W), values in [0, 1] or 255 (ignore).
        ignore: optional bool mask, (N, C, H, W) or (N, H, W).

    Returns:
        scalar: the sum over valid (pixel, lesion) entries divided by their number.
    """
    logits, targets, valid = _sigmoid_inputs(logits, targets, ignore)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return _masked_mean(bce, valid)


def _soft_dice(
    probs: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, smooth: float, dims: Tuple
) -> torch.Tensor:
    """Per-class soft Dice ``(2 sum p y + smooth) / (sum p + sum y + smooth)``, summed over
    ``dims`` (everything but the class dimension)."""
    if smooth <= 0:
        # smooth > 0 is what keeps an empty class (no target, no prediction) from giving 0 / 0.
        raise ValueError(f"smooth must be > 0, got {smooth}")
    probs = probs * valid
    targets = targets * valid
    intersection = (probs * targets).sum(dims)
    total = probs.sum(dims) + targets.sum(dims)
    return (2 * intersection + smooth) / (total + smooth)


# Forms of the soft Dice: "per_lesion" = 1 - mean over lesions of (2 sum py + s) / (sum p + sum y
# + s), each lesion's sums over the batch; "squared_pooled" = Lesion-Net's (its eq. 3 and 4): one
# fraction whose sums run over every (pixel, lesion) of the batch, with squared denominators,
# 1 - (2 sum py + s) / (sum p^2 + sum y^2 + s).
DICE_FORMS = ("per_lesion", "squared_pooled")


def _dice_of_form(
    probs: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, smooth: float, form: str,
    dims: Tuple,
) -> torch.Tensor:
    """The Dice (not its loss) of ``form`` over ``dims`` (per-lesion form: the class dimension
    is 1 and left out)."""
    if form == "per_lesion":
        return _soft_dice(probs, targets, valid, smooth, dims).mean()
    if form != "squared_pooled":
        raise ValueError(f"Dice form must be one of {DICE_FORMS}, got {form!r}")
    if smooth <= 0:
        raise ValueError(f"smooth must be > 0, got {smooth}")
    probs, targets = probs * valid, targets * valid
    intersection = (probs * targets).sum()
    return (2 * intersection + smooth) / ((probs**2).sum() + (targets**2).sum() + smooth)


def sigmoid_dice_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore: Optional[torch.Tensor] = None,
    *,
    smooth: float = 1.0,
    form: str = "per_lesion",
) -> torch.Tensor:
    """Soft Dice loss per lesion map: ``1 - mean_c Dice_c``, each Dice_c summed over the whole
    batch and image (N, H, W) so that a lesion absent from one image still has a denominator.

    ``smooth`` is added to numerator and denominator: a lesion absent from the batch and predicted
    with total probability mass P scores Dice 1 / (P + 1) (1 when nothing is predicted), which
    keeps values and gradients finite on empty masks and pulls P towards 0.

    Args:
        logits: (N, C, H, W).
        targets: (N, C, H, W), values in [0, 1] or 255 (ignore).
        ignore: optional bool mask, (N, C, H, W) or (N, H, W).
        smooth: the smoothing term (> 0).
        form: "per_lesion" (above) or "squared_pooled" (Lesion-Net's: ``1 - (2 sum p y + s) /
            (sum p^2 + sum y^2 + s)``, every sum over all pixels and lesions of the batch).

    Returns:
        scalar in [0, 1): one minus the mean over lesions of the batch Dice (per_lesion), or one
        minus the pooled Dice.
    """
    logits, targets, valid = _sigmoid_inputs(logits, targets, ignore)
    return 1 - _dice_of_form(torch.sigmoid(logits), targets, valid, smooth, form, (0, 2, 3))


def softmax_dice_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore: Optional[torch.Tensor] = None,
    *,
    smooth: float = 1.0,
    exclude_background: bool = False,
) -> torch.Tensor:
    """Soft Dice loss on softmax probabilities against one-hot class targets: ``1 - mean_c
    Dice_c`` with Dice_c summed over (N, H, W) and ``smooth`` as in :func:`sigmoid_dice_loss`.

    Args:
        logits: (N, C, H, W).
        targets: (N, H, W) class indices, 255 = ignore.
        ignore: optional (N, H, W) bool mask.
        smooth: the smoothing term (> 0).
        exclude_background: leave class 0 out of the mean (ResUNet does); its probability still
            takes part in the softmax.

    Returns:
        scalar in [0, 1).
    """
    logits, targets, valid = _softmax_inputs(logits, targets, ignore)
    num_classes = logits.shape[1]
    one_hot = F.one_hot(targets, num_classes).permute(0, 3, 1, 2).to(logits.dtype)
    probs = F.softmax(logits, dim=1)
    dice = _soft_dice(probs, one_hot, valid[:, None], smooth, (0, 2, 3))
    if exclude_background:
        dice = dice[1:]
    return 1 - dice.mean()


def dual_dice_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore: Optional[torch.Tensor] = None,
    *,
    pixel_weight: float = 0.8,
    smooth: float = 1.0,
    form: str = "per_lesion",
) -> torch.Tensor:
    """Lesion-Net's dual Dice loss: ``pixel_weight * pixel Dice loss + (1 - pixel_weight) *
    image Dice loss``.

    The pixel term is :func:`sigmoid_dice_loss`. The image term is the same soft Dice over the
    batch's images, per lesion, between the global max of the probability map over valid pixels
    (Lesion-Net's lesion classification) and the max of the target over valid pixels (1 when the
    image holds the lesion). An image with no valid pixel for a lesion is left out of that lesion's
    image term. Lesion-Net switches this loss on after the first learning-rate drop; that schedule
    belongs to the trainer.

    Args:
        logits: (N, C, H, W).
        targets: (N, C, H, W), values in [0, 1] or 255 (ignore).
        ignore: optional bool mask, (N, C, H, W) or (N, H, W).
        pixel_weight: lambda, 0.8 in the paper.
        smooth: the smoothing term of both Dice terms (> 0).
        form: the Dice of both terms, as :func:`sigmoid_dice_loss`'s ("squared_pooled": the
            paper's eq. 3 for pixels, eq. 4 for images, each pooled over the batch's lesions).

    Returns:
        scalar.
    """
    logits, targets, valid = _sigmoid_inputs(logits, targets, ignore)
    pixel = 1 - _dice_of_form(torch.sigmoid(logits), targets, valid, smooth, form, (0, 2, 3))
    # Ignore pixels must not win the max: give them the lowest logit there is.
    lowest = torch.finfo(logits.dtype).min
    image_logit = torch.where(valid.bool(), logits, lowest).amax(dim=(2, 3))
    image_valid = valid.amax(dim=(2, 3))
    image_prob = torch.sigmoid(image_logit)
    image_target = (targets * valid).amax(dim=(2, 3))
    image = 1 - _dice_of_form(image_prob, image_target, image_valid, smooth, form, (0,))
    return pixel_weight * pixel + (1 - pixel_weight) * image


def topk_balanced_bce_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore: Optional[torch.Tensor] = None,
    *,
    negative_ratio: float = 1.0,
    min_negatives: int = 256,
    balance: str = "none",
) -> torch.Tensor:
    """Red-Seg's stage-1 loss: BCE on every positive pixel plus the k hardest negatives (highest
    BCE), chosen per image and lesion, so that the millions of easy background pixels do not drown
    the few lesion pixels.

    ``balance`` "beta" is the paper's balancing weight (HED's class balance over the selected
    pixels): per image and lesion, positives weigh ``beta = k / (positives + k)`` and the k hard
    negatives ``1 - beta``, so both sides weigh alike; an image without the lesion trains its k
    negatives at weight 1. The sum is divided by the sum of the weights. "none": every selected
    pixel weighs 1.

    ``k = max(ceil(negative_ratio * positives), min_negatives)``, capped by the number of valid
    negatives; ``min_negatives`` is what an image without the lesion trains on (its hardest
    false alarms). ``negative_ratio`` 1 balances positives and negatives one to one; both numbers
    are this toolkit's choice where the paper gives none.

    Args:
        logits: (N, C, H, W).
        targets: (N, C, H, W), binary (0 / 1) or 255 (ignore).
        ignore: optional bool mask, (N, C, H, W) or (N, H, W).
        negative_ratio: hard negatives per positive.
        min_negatives: the fewest hard negatives per image and lesion.
        balance: "none" or "beta" (above).

    Returns:
        scalar: the (weighted) BCE of the selected pixels divided by their (weighted) number
        over the batch.
    """
    if balance not in ("none", "beta"):
        raise ValueError(f"balance must be 'none' or 'beta', got {balance!r}")
    logits, targets, valid = _sigmoid_inputs(logits, targets, ignore)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    valid = valid.bool()
    positive = valid & (targets > 0.5)
    negative = valid & ~(targets > 0.5)
    num_positive = positive.sum(dim=(2, 3))
    num_negative = negative.sum(dim=(2, 3))
    k = torch.ceil(negative_ratio * num_positive.to(bce.dtype)).long()
    k = torch.minimum(k.clamp(min=min_negatives), num_negative)
    # BCE >= 0, so -1 ranks every non-negative pixel after all negatives; k never reaches it.
    negative_bce = torch.where(negative, bce, -1.0).flatten(2)
    max_k = int(k.max()) if k.numel() else 0
    hardest = torch.topk(negative_bce, max_k, dim=-1).values
    chosen = torch.arange(max_k, device=k.device) < k[..., None]
    positive_sum = (bce * positive).sum(dim=(2, 3))  # (N, C)
    negative_sum = (hardest * chosen).sum(dim=-1)
    if balance == "none":
        selected = positive_sum.sum() + negative_sum.sum()
        return selected / (num_positive.sum() + k.sum()).clamp(min=1)
    positives, k = num_positive.to(bce.dtype), k.to(bce.dtype)
    beta = torch.where(positives > 0, k / (positives + k).clamp(min=1), torch.zeros_like(k))
    weighted = beta * positive_sum + (1 - beta) * negative_sum
    weights = beta * positives + (1 - beta) * k
    return weighted.sum() / weights.sum().clamp(min=1)


def fn_fp_loss(
    logits: torch.Tensor, targets: torch.Tensor, ignore: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Red-Seg's stage-2 loss ``sum (y - p)^2``: on a positive the term is (1 - p)^2 (a soft false
    negative), on a negative p^2 (a soft false positive).

    Args:
        logits: (N, C, H, W).
        targets: (N, C, H, W), values in [0, 1] or 255 (ignore).
        ignore: optional bool mask, (N, C, H, W) or (N, H, W).

    Returns:
        scalar: the sum divided by the number of valid (pixel, lesion) entries, so that its scale
        does not depend on image size.
    """
    logits, targets, valid = _sigmoid_inputs(logits, targets, ignore)
    return _masked_mean((targets - torch.sigmoid(logits)) ** 2, valid)


def sobel_magnitude(maps: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude ``sqrt(gx^2 + gy^2)`` of each (N, C, H, W) map with the unnormalised 3x3
    Sobel kernels (as ``cv2.Sobel(ksize=3)``: a straight 0 -> 1 edge gives 4 on both sides) and
    replicate padding, so that image borders are not edges."""
    kernel_x = torch.tensor(
        [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=maps.dtype, device=maps.device
    )
    kernels = torch.stack([kernel_x, kernel_x.t()])[:, None]  # (2, 1, 3, 3)
    n, c, h, w = maps.shape
    padded = F.pad(maps.reshape(n * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    gradients = F.conv2d(padded, kernels)
    return gradients.pow(2).sum(dim=1).sqrt().reshape(n, c, h, w)


def boundary_weights(targets: torch.Tensor, beta: float = 1.5) -> torch.Tensor:
    """CBAM-DeepLab's per-pixel weights ``exp(-beta * |Sobel(target)|)``: 1 where the target is
    flat, exp(-4 beta) beside a straight lesion edge.

    Args:
        targets: (N, C, H, W) float targets, ignore pixels already set to background.
        beta: decay (1.5 in the paper).
    """
    return torch.exp(-beta * sobel_magnitude(targets.detach()))


def boundary_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore: Optional[torch.Tensor] = None,
    *,
    beta: float = 1.5,
) -> torch.Tensor:
    """CBAM-DeepLab's boundary loss: BCE weighted per pixel by :func:`boundary_weights` of the
    target. Ignore pixels count as background when the Sobel filter runs.

    Note: as published (and in DESIGN.md) the weight is smallest on lesion edges, so this term
    stresses region interiors and background rather than boundaries.

    Args:
        logits: (N, C, H, W).
        targets: (N, C, H, W), values in [0, 1] or 255 (ignore).
        ignore: optional bool mask, (N, C, H, W) or (N, H, W).
        beta: decay of the weight with the gradient magnitude.

    Returns:
        scalar: the weighted sum divided by the number of valid (pixel, lesion) entries (the
        weights are not renormalised, so the loss equals BCE where the target is flat).
    """
    logits, targets, valid = _sigmoid_inputs(logits, targets, ignore)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return _masked_mean(boundary_weights(targets, beta) * bce, valid)


def cbam_deeplab_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore: Optional[torch.Tensor] = None,
    *,
    dice_weight: float = 1.0,
    bce_weight: float = 0.5,
    focal_weight: float = 1.0,
    boundary_weight: float = 0.5,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    boundary_beta: float = 1.5,
    smooth: float = 1.0,
) -> Dict[str, torch.Tensor]:
    """CBAM-DeepLab's loss, 1.0 Dice + 0.5 BCE + 1.0 focal(0.25, 2) + 0.5 boundary, as a
    Detectron2 loss dict whose values are already weighted (their sum is the loss).

    Args:
        logits, targets, ignore: as :func:`sigmoid_dice_loss`.
        dice_weight, bce_weight, focal_weight, boundary_weight: the term weights.
        focal_alpha, focal_gamma: of :func:`sigmoid_focal_loss`.
        boundary_beta: of :func:`boundary_loss`.
        smooth: of :func:`sigmoid_dice_loss`.

    Returns:
        dict with "loss_dice", "loss_bce", "loss_focal", "loss_boundary".
    """
    focal = sigmoid_focal_loss(logits, targets, ignore, alpha=focal_alpha, gamma=focal_gamma)
    boundary = boundary_loss(logits, targets, ignore, beta=boundary_beta)
    return {
        "loss_dice": dice_weight * sigmoid_dice_loss(logits, targets, ignore, smooth=smooth),
        "loss_bce": bce_weight * sigmoid_bce_loss(logits, targets, ignore),
        "loss_focal": focal_weight * focal,
        "loss_boundary": boundary_weight * boundary,
    }


def resunet_class_alpha(
    num_classes: int, background: float = 0.25, lesion: float = 0.75
) -> List[float]:
    """ResUNet's focal alpha "0.25 / 0.75", read as 0.25 for the background class 0 and 0.75 for
    every lesion / optic-disc class (the rare classes get the larger weight)."""
    return [background] + [lesion] * (num_classes - 1)


def resunet_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore: Optional[torch.Tensor] = None,
    *,
    focal_weight: float = 1.0,
    dice_weight: float = 1.0,
    alpha: Optional[Sequence[float]] = None,
    gamma: float = 2.0,
    smooth: float = 1.0,
) -> Dict[str, torch.Tensor]:
    """ResUNet's loss: softmax focal (gamma 2, alpha :func:`resunet_class_alpha`) + soft Dice
    without the background class, as a weighted Detectron2 loss dict.

    Args:
        logits: (N, C, H, W).
        targets: (N, H, W) class indices, 255 = ignore.
        ignore: optional (N, H, W) bool mask.
        focal_weight, dice_weight: the term weights.
        alpha: per-class focal weights; None = ``resunet_class_alpha(C)``.
        gamma: focal exponent.
        smooth: Dice smoothing term.

    Returns:
        dict with "loss_focal" and "loss_dice".
    """
    if alpha is None:
        alpha = resunet_class_alpha(logits.shape[1])
    focal = softmax_focal_loss(logits, targets, ignore, alpha=alpha, gamma=gamma)
    dice = softmax_dice_loss(logits, targets, ignore, smooth=smooth, exclude_background=True)
    return {"loss_focal": focal_weight * focal, "loss_dice": dice_weight * dice}
