"""What the semantic lesion heads share: the head contract's ``forward``, the resize of a map's
logits to the input, the conv-norm-ReLU block and the config checks."""
import math
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from torch import nn

from ..losses import IGNORE_VALUE

__all__ = [
    "LesionSemSegHead",
    "any_width_norm",
    "check_ignore_value_cfg",
    "check_in_features",
    "check_sigmoid_head_cfg",
    "conv_norm_relu",
    "upsample_to_image",
]


class LesionSemSegHead(nn.Module):
    """Base of the semantic lesion heads: the call SemanticLesionNet and LesionRCNN make,
    ``head(features, targets, image_size) -> (logits, losses)``.

    A subclass gives :meth:`predict` (the logits at the input's size) and :meth:`losses`.
    """

    def forward(
        self,
        features: Dict[str, torch.Tensor],
        targets: Optional[torch.Tensor] = None,
        image_size: Optional[Tuple[int, int]] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """
        Args:
            features: the backbone's features, by name.
            targets: uint8 (N, C, H, W) at ``image_size``: 0 / 1 / 255 (ignore); None at
                inference.
            image_size: (H, W) of the (padded) input; default: the head's output map size times
                its stride (see the subclass's :meth:`predict`).

        Returns:
            (logits at ``image_size``, (N, C, H, W) per lesion for sigmoid heads or
            (N, C + 1, H, W) background first for softmax heads; :meth:`losses` of them in
            training with targets, else empty).
        """
        logits = self.predict(features, image_size)
        if not self.training or targets is None:
            return logits, {}
        return logits, self.losses(logits, targets)

    def predict(
        self, features: Dict[str, torch.Tensor], image_size: Optional[Tuple[int, int]] = None
    ) -> torch.Tensor:
        """The head's float logits at ``image_size``; see :meth:`forward`."""
        raise NotImplementedError

    def losses(self, logits: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The training losses of :meth:`predict`'s logits against the per-lesion targets."""
        raise NotImplementedError


def upsample_to_image(
    logits: torch.Tensor, stride: int, image_size: Optional[Tuple[int, int]] = None
) -> torch.Tensor:
    """Logits of a stride-``stride`` map -> float logits resized (bilinear) to ``image_size``,
    by default the map's size times ``stride``."""
    if image_size is None:
        image_size = tuple(s * stride for s in logits.shape[-2:])
    return F.interpolate(
        logits.float(), size=tuple(image_size), mode="bilinear", align_corners=False
    )


def any_width_norm(norm: Union[str, Callable]) -> Union[str, Callable]:
    """``norm`` for ``detectron2.layers.get_norm``, with "GN" turned into GroupNorm of
    gcd(32, channels) groups: Detectron2's "GN" is 32 groups, which DeepLabV3+'s 48-channel
    low-level reduction and slim CPU widths do not divide into."""
    if norm == "GN":
        return lambda channels: nn.GroupNorm(math.gcd(32, channels), channels)
    return norm


def conv_norm_relu(
    in_channels: int, out_channels: int, kernel_size: int, norm: Union[str, Callable]
) -> Conv2d:
    """A size-keeping conv + norm + ReLU with MSRA init (bias only without norm)."""
    conv = Conv2d(
        in_channels,
        out_channels,
        kernel_size=kernel_size,
        padding=kernel_size // 2,
        bias=not norm,
        norm=get_norm(any_width_norm(norm), out_channels),
        activation=F.relu,
    )
    weight_init.c2_msra_fill(conv)
    return conv


def check_ignore_value_cfg(cfg) -> None:
    """Raise ValueError unless ``MODEL.SEM_SEG_HEAD.IGNORE_VALUE`` is the targets' 255."""
    if cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE != IGNORE_VALUE:
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.IGNORE_VALUE must be {IGNORE_VALUE}, the semantic targets' ignore "
            f"value (got {cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE})"
        )


def check_in_features(
    key: str, in_features: Sequence[str], input_shape: Mapping[str, ShapeSpec]
) -> None:
    """Raise ValueError naming the features of config ``key`` (e.g. "MODEL.RESUNET.IN_FEATURES")
    that the backbone's ``input_shape`` does not give."""
    missing = [f for f in in_features if f not in input_shape]
    if missing:
        raise ValueError(
            f"{key} {list(in_features)}: the backbone has no {missing} (it gives "
            f"{sorted(input_shape)})"
        )


def check_sigmoid_head_cfg(cfg, head_name: str) -> None:
    """Raise ValueError unless ``cfg`` asks for per-lesion sigmoid maps with ignore value 255."""
    if cfg.MODEL.LESION_SEG.ACTIVATION != "sigmoid":
        raise ValueError(
            f"{head_name} predicts one sigmoid map per lesion; set MODEL.LESION_SEG.ACTIVATION to "
            f"'sigmoid' (got {cfg.MODEL.LESION_SEG.ACTIVATION!r})"
        )
    check_ignore_value_cfg(cfg)
