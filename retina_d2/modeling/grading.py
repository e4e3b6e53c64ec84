"""Grading heads (``GRADING_HEAD_REGISTRY``): an image-level grade from a backbone feature and,
where the head uses them, the lesion branch's probability maps.

* :class:`SideAttentionGradingHead`: Lesion-Net's side attention (Wei et al., "Learn to segment
  retinal lesions and beyond", ICPR 2020). The lesion maps, brought to the feature's size, become
  k weight maps that multiply the feature's last k channels; then global average pooling and one
  FC layer. The weight maps come from two 3x3 convs (``attention="conv"``, the paper's) or from
  the lesion maps' channel-wise max (``"cw_max"``: one parameter-free map for every channel).
* :class:`LesionConcatGradingHead`: the Lesion-Concat baseline, the lesion maps concatenated to
  the feature as extra channels, then GAP + FC.
* :class:`PlainGradingHead`: the backbone baseline, GAP + FC, lesion maps unused.

Every head is called as ``head(feature, lesion_maps) -> logits (N, num_grades)``; ``lesion_maps``
is (N, L, H, W) probabilities at any size at least the feature's (None for the plain head).
:func:`grading_loss` is the cross-entropy over the images that have a grade.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.utils.registry import Registry
from torch import nn

from ..schema import GRADE_COUNTS  # graded record field -> number of grades (re-exported)

__all__ = [
    "ATTENTIONS",
    "GRADE_COUNTS",
    "GRADING_HEAD_REGISTRY",
    "LESION_POOLS",
    "LesionConcatGradingHead",
    "PlainGradingHead",
    "SideAttentionGradingHead",
    "build_grading_head",
    "check_grading_tasks",
    "grade_targets",
    "grading_loss",
    "pool_lesion_maps",
]

GRADING_HEAD_REGISTRY = Registry("GRADING_HEAD")
GRADING_HEAD_REGISTRY.__doc__ = """
Registry for grading heads: ``cls(cfg, input_shape, num_lesions, num_grades)`` -> a module
called as ``head(feature, lesion_maps)`` that returns (N, num_grades) logits.
"""

ATTENTIONS = ("conv", "cw_max")
LESION_POOLS = ("max", "avg")
# The grade target of an image without that grade: left out of the loss.
MISSING_GRADE = -1


def build_grading_head(cfg, input_shape: ShapeSpec, num_lesions: int, num_grades: int) -> nn.Module:
    """The ``MODEL.GRADING.NAME`` head for a feature of ``input_shape``, ``num_lesions`` lesion
    maps and ``num_grades`` grades."""
    name = cfg.MODEL.GRADING.NAME
    if name not in GRADING_HEAD_REGISTRY:
        raise ValueError(
            f"MODEL.GRADING.NAME {name!r} is not a grading head; registered: "
            f"{sorted(k for k, _ in GRADING_HEAD_REGISTRY)}"
        )
    return GRADING_HEAD_REGISTRY.get(name)(cfg, input_shape, num_lesions, num_grades)


def pool_lesion_maps(lesion_maps: torch.Tensor, size, mode: str = "max") -> torch.Tensor:
    """(N, L, H, W) lesion probabilities -> (N, L, *size) by adaptive max or average pooling.

    Max pooling keeps a lesion a few pixels wide at full strength on a stride-32 grid, where
    averaging (or bilinear resizing) would dilute a microaneurysm to almost nothing.
    """
    if mode not in LESION_POOLS:
        raise ValueError(f"lesion pooling must be one of {LESION_POOLS}, got {mode!r}")
    pool = F.adaptive_max_pool2d if mode == "max" else F.adaptive_avg_pool2d
    return pool(lesion_maps.float(), tuple(size))


def grade_targets(batched_inputs, field_name: str, num_grades: int, device) -> torch.Tensor:
    """The inputs' ``field_name`` grades as an int64 (N,) tensor, -1 where an input has none.

    Raises:
        ValueError: a grade outside ``0 .. num_grades - 1``.
    """
    grades = []
    for x in batched_inputs:
        grade = x.get(field_name)
        if grade is None:
            grades.append(MISSING_GRADE)
            continue
        grade = int(grade)
        if not 0 <= grade < num_grades:
            raise ValueError(
                f"{x.get('file_name', 'an input')}: {field_name} {grade} is not in "
                f"0..{num_grades - 1}"
            )
        grades.append(grade)
    return torch.tensor(grades, dtype=torch.int64, device=device)


def grading_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the images with a grade (target >= 0); the others are masked out, not
    read as grade 0. Zero (still attached to the graph) when no image in the batch has one."""
    known = targets >= 0
    if not known.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[known], targets[known])


class _GapFcClassifier(nn.Module):
    """Global average pooling, dropout, one FC layer."""

    def __init__(self, in_channels: int, num_grades: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_channels, num_grades)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(x.mean(dim=(-2, -1))))


def _common_args(cfg, input_shape: ShapeSpec, num_lesions: int, num_grades: int) -> dict:
    return {
        "in_channels": input_shape.channels,
        "num_lesions": num_lesions,
        "num_grades": num_grades,
        "dropout": cfg.MODEL.GRADING.DROPOUT,
    }


@GRADING_HEAD_REGISTRY.register()
class PlainGradingHead(nn.Module):
    """The backbone baseline: GAP + FC on the feature; lesion maps are ignored."""

    uses_lesion_maps = False

    @configurable
    def __init__(
        self, *, in_channels: int, num_lesions: int, num_grades: int, dropout: float = 0.0
    ):
        """
        Args:
            in_channels: channels of the graded feature.
            num_lesions: lesion maps of the lesion branch (unused; the heads share a signature).
            num_grades: grades predicted.
            dropout: before the FC layer.
        """
        super().__init__()
        self.classifier = _GapFcClassifier(in_channels, num_grades, dropout)

    @classmethod
    def from_config(cls, cfg, input_shape, num_lesions, num_grades):
        return _common_args(cfg, input_shape, num_lesions, num_grades)

    def forward(self, feature: torch.Tensor, lesion_maps: Optional[torch.Tensor] = None):
        return self.classifier(feature)


@GRADING_HEAD_REGISTRY.register()
class LesionConcatGradingHead(nn.Module):
    """The Lesion-Concat baseline: the lesion maps pooled to the feature's size and concatenated
    to it as L extra channels, then GAP + FC."""

    uses_lesion_maps = True

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        num_lesions: int,
        num_grades: int,
        dropout: float = 0.0,
        lesion_pool: str = "max",
    ):
        """
        Args:
            in_channels: channels of the graded feature.
            num_lesions: lesion maps concatenated.
            num_grades: grades predicted.
            dropout: before the FC layer.
            lesion_pool: "max" or "avg" (:func:`pool_lesion_maps`).
        """
        super().__init__()
        if lesion_pool not in LESION_POOLS:
            raise ValueError(f"lesion_pool must be one of {LESION_POOLS}, got {lesion_pool!r}")
        self.lesion_pool = lesion_pool
        self.classifier = _GapFcClassifier(in_channels + num_lesions, num_grades, dropout)

    @classmethod
    def from_config(cls, cfg, input_shape, num_lesions, num_grades):
        ret = _common_args(cfg, input_shape, num_lesions, num_grades)
        ret["lesion_pool"] = cfg.MODEL.GRADING.LESION_POOL
        return ret

    def forward(self, feature: torch.Tensor, lesion_maps: torch.Tensor):
        maps = pool_lesion_maps(lesion_maps, feature.shape[-2:], self.lesion_pool)
        return self.classifier(torch.cat([feature, maps.to(feature.dtype)], dim=1))


@GRADING_HEAD_REGISTRY.register()
class SideAttentionGradingHead(nn.Module):
    """Lesion-Net's side attention: lesion maps -> k weight maps that multiply the feature's last
    k channels, then GAP + FC (module docstring)."""

    uses_lesion_maps = True

    @configurable
    def __init__(
        self,
        *,
        in_channels: int,
        num_lesions: int,
        num_grades: int,
        dropout: float = 0.0,
        attention: str = "conv",
        attention_channels: int = 0,
        hidden_channels: int = 64,
        lesion_pool: str = "max",
    ):
        """
        Args:
            in_channels: channels C of the graded feature.
            num_lesions: lesion maps L.
            num_grades: grades predicted.
            dropout: before the FC layer.
            attention: "conv" (two 3x3 convs L -> hidden -> k, sigmoid) or "cw_max" (the maps'
                channel-wise max, one weight map shared by the k channels).
            attention_channels: k, the last k channels are weighted; 0 = all C.
            hidden_channels: between the two 3x3 convs.
            lesion_pool: "max" or "avg" (:func:`pool_lesion_maps`).
        """
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if lesion_pool not in LESION_POOLS:
            raise ValueError(f"lesion_pool must be one of {LESION_POOLS}, got {lesion_pool!r}")
        k = attention_channels or in_channels
        if not 0 < k <= in_channels:
            raise ValueError(
                f"attention_channels (MODEL.GRADING.ATTENTION_CHANNELS) must be in 0..{in_channels}"
                f" (the feature's channels), got {attention_channels}"
            )
        self.attention = attention
        self.attention_channels = k
        self.lesion_pool = lesion_pool
        self.weight_maps = None
        if attention == "conv":
            self.weight_maps = nn.Sequential(
                nn.Conv2d(num_lesions, hidden_channels, kernel_size=3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden_channels, k, kernel_size=3, padding=1),
            )
            for layer in self.weight_maps:
                if isinstance(layer, nn.Conv2d):
                    nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.zeros_(layer.bias)
        self.classifier = _GapFcClassifier(in_channels, num_grades, dropout)

    @classmethod
    def from_config(cls, cfg, input_shape, num_lesions, num_grades):
        node = cfg.MODEL.GRADING
        ret = _common_args(cfg, input_shape, num_lesions, num_grades)
        ret.update(
            attention=node.ATTENTION,
            attention_channels=node.ATTENTION_CHANNELS,
            hidden_channels=node.ATTENTION_HIDDEN,
            lesion_pool=node.LESION_POOL,
        )
        return ret

    def attention_weights(self, lesion_maps: torch.Tensor, size) -> torch.Tensor:
        """(N, k, *size) weights in [0, 1] (``"cw_max"``: (N, 1, *size), shared by the k)."""
        maps = pool_lesion_maps(lesion_maps, size, self.lesion_pool)
        if self.attention == "cw_max":
            return maps.amax(dim=1, keepdim=True)
        return torch.sigmoid(self.weight_maps(maps))

    def forward(self, feature: torch.Tensor, lesion_maps: torch.Tensor):
        weights = self.attention_weights(lesion_maps, feature.shape[-2:]).to(feature.dtype)
        split = feature.shape[1] - self.attention_channels
        attended = torch.cat([feature[:, :split], feature[:, split:] * weights], dim=1)
        return self.classifier(attended)


def check_grading_tasks(tasks: Sequence[str]) -> None:
    """Raise ValueError naming ``MODEL.GRADING.TASKS`` entries that are not graded fields."""
    unknown = [t for t in tasks if t not in GRADE_COUNTS]
    if unknown:
        raise ValueError(
            f"MODEL.GRADING.TASKS {list(tasks)}: {unknown} not gradable; choose from "
            f"{sorted(GRADE_COUNTS)}"
        )
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"MODEL.GRADING.TASKS {list(tasks)} names a task twice")
