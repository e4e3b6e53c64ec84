"""``RedSegHead``: Red-Seg's lesion branches on a VGG16 trunk, trained in two loss stages.

Each configured lesion (``MODEL.RED_SEG.LESIONS``) has a branch: a 1x1 conv on each of its trunk
features (microaneurysm: conv2-conv4, fine enough for 1-5 px dots; haemorrhage: conv3-conv5, a
larger receptive field) gives side outputs, which are upsampled (bilinear) to the input and fused
by a 1x1 conv over their concatenation into the lesion's logit map.

Channels: the head outputs the C = ``NUM_CLASSES`` channels of the dataset (its ``thing_classes``)
so that it fits the meta-architecture, mapper and evaluator like every other head. Its branches
fill their lesions' channels; every other channel is the constant ``absent_logit`` (-20, a
probability of ~2e-9), is left out of the loss, and so scores ~0 in evaluation: Red-Seg does not
model those lesions.

Loss (on the branch channels only, 255 ignored): ``loss_stage`` 1 (default) trains with the top-k
balanced BCE (every positive + the hardest negatives), ``loss_stage`` 2 with FN+FP =
mean (y - p)^2; ``retina_d2.engine.hooks.LossSwitchHook`` moves the head to stage 2 at
``MODEL.LESION_SEG.LOSS_SWITCH_ITER``.

The paper (papers/red-seg-idrid.txt, an OCR whose formulas are garbled) read as follows; where
the text cannot be read the toolkit's choice is a config key:

- stage 1: ``L = -beta sum_{y=1} log p - (1 - beta) sum_{i in Y_top} log(1 - p)`` over the
  positives and the k hardest negatives ``Y_top``, ``beta = N- / (N+ + N-)`` with N- = k
  (``TOPK_BALANCE`` "beta");
- k follows a step schedule, ``k(r) = k0 (1 - floor(r / S) / M)`` at iteration r: constant for
  S iterations, then lower by k0 / M every S (``TOPK_DECAY_PERIOD`` = S, ``TOPK_DECAY_STEPS`` =
  M, floored at k0 / M); k0 is ``TOPK_NEGATIVE_RATIO`` hard negatives per positive (the paper's k0
  is unreadable);
- each side output is supervised with the stage's loss beside the fused map (its Fig. 7 shows
  the conv1-conv5 side outputs "corresponding to the supervision loss"; HED's deep supervision,
  ``SIDE_SUPERVISION``).
"""
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.utils.events import get_event_storage
from detectron2.data import MetadataCatalog
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from torch import nn

from ..losses import fn_fp_loss, topk_balanced_bce_loss
from .common import LesionSemSegHead, check_sigmoid_head_cfg
from .resunet import fit_to_image_size

__all__ = ["RedSegBranch", "RedSegHead", "red_seg_channels"]

logger = logging.getLogger(__name__)


def red_seg_channels(
    lesions: Sequence[str], num_classes: int, dataset_classes: Optional[Sequence[str]]
) -> List[int]:
    """The output channel of each branch lesion.

    Args:
        lesions: the lesions with a branch.
        num_classes: output channels C.
        dataset_classes: the training dataset's ``thing_classes`` (channel order), or None when it
            is not registered, in which case the branches are taken to be channels 0, 1, ...

    Raises:
        ValueError: a lesion the dataset does not have, a repeated lesion, C that does not
            match the dataset, or more branches than channels.
    """
    if len(set(lesions)) != len(lesions) or not lesions:
        raise ValueError(f"MODEL.RED_SEG.LESIONS must name distinct lesions, got {list(lesions)}")
    if dataset_classes is None:
        if len(lesions) > num_classes:
            raise ValueError(
                f"MODEL.RED_SEG.LESIONS {list(lesions)} has more lesions than "
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES ({num_classes})"
            )
        return list(range(len(lesions)))
    dataset_classes = list(dataset_classes)
    if len(dataset_classes) != num_classes:
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.NUM_CLASSES is {num_classes} but the training dataset has "
            f"{len(dataset_classes)} lesions {dataset_classes}"
        )
    missing = [name for name in lesions if name not in dataset_classes]
    if missing:
        raise ValueError(
            f"MODEL.RED_SEG.LESIONS {missing} are not among the training dataset's lesions "
            f"{dataset_classes}"
        )
    return [dataset_classes.index(name) for name in lesions]


class RedSegBranch(nn.Module):
    """One lesion's map: 1x1-conv side outputs of its trunk features, upsampled and fused."""

    def __init__(self, input_shape: Dict[str, ShapeSpec], side_channels: int = 1):
        """
        Args:
            input_shape: the trunk features the branch fuses.
            side_channels: channels of each side output.
        """
        super().__init__()
        self.in_features = sorted(input_shape, key=lambda f: input_shape[f].stride)
        self.strides = {f: input_shape[f].stride for f in self.in_features}
        self.sides = nn.ModuleDict(
            {
                f: nn.Conv2d(input_shape[f].channels, side_channels, kernel_size=1)
                for f in self.in_features
            }
        )
        self.fuse = nn.Conv2d(side_channels * len(self.in_features), 1, kernel_size=1)
        for side in self.sides.values():
            nn.init.normal_(side.weight, std=0.01)
            nn.init.zeros_(side.bias)
        # HED's fusion starts as the mean of the side outputs.
        nn.init.constant_(self.fuse.weight, 1.0 / self.fuse.in_channels)
        nn.init.zeros_(self.fuse.bias)

    def forward(
        self, features: Dict[str, torch.Tensor], image_size: Tuple[int, int], with_sides=False
    ):
        """(N, 1, H, W) fused logits at ``image_size``; with ``with_sides``, also the side
        outputs' (N, side_channels, H, W) logits, one per feature, finest first."""
        sides = [
            fit_to_image_size(self.sides[f](features[f]).float(), self.strides[f], image_size)
            for f in self.in_features
        ]
        fused = self.fuse(torch.cat(sides, dim=1))
        return (fused, sides) if with_sides else fused


@SEM_SEG_HEADS_REGISTRY.register()
class RedSegHead(LesionSemSegHead):
    """Red-Seg's per-lesion branches with a two-stage loss; see the module docstring."""

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        lesions: Sequence[str],
        branch_features: Sequence[Sequence[str]],
        branch_channels: Sequence[int],
        side_channels: int = 1,
        absent_logit: float = -20.0,
        topk_negative_ratio: float = 1.0,
        topk_min_negatives: int = 256,
        topk_balance: str = "none",
        topk_decay_period: int = 0,
        topk_decay_steps: int = 1,
        side_supervision: bool = False,
    ):
        """
        Args:
            input_shape: the trunk's features (at least those the branches use).
            num_classes: output channels C (the dataset's lesions).
            lesions: the lesion of each branch (names, for logs and errors).
            branch_features: each branch's trunk features.
            branch_channels: each branch's output channel, distinct, in [0, C).
            side_channels: channels of each 1x1-conv side output.
            absent_logit: the logit of channels no branch predicts.
            topk_negative_ratio, topk_min_negatives: of the stage-1 top-k balanced BCE;
                the ratio is k0 of the k schedule.
            topk_balance: "none" or "beta" (the paper's balancing weight).
            topk_decay_period, topk_decay_steps: S and M of the k schedule (period 0: k fixed).
            side_supervision: train every side output with the stage's loss too.
        """
        super().__init__()
        if not (len(lesions) == len(branch_features) == len(branch_channels)) or not lesions:
            raise ValueError(
                f"RedSegHead needs one feature list and one channel per lesion: lesions "
                f"{list(lesions)}, branch_features {list(branch_features)}, branch_channels "
                f"{list(branch_channels)}"
            )
        if len(set(branch_channels)) != len(branch_channels) or not all(
            0 <= c < num_classes for c in branch_channels
        ):
            raise ValueError(
                f"branch_channels {list(branch_channels)} must be distinct channels of 0.."
                f"{num_classes - 1}"
            )
        for lesion_name, names in zip(lesions, branch_features):
            missing = [f for f in names if f not in input_shape]
            if missing or not names:
                raise ValueError(
                    f"Red-Seg branch {lesion_name!r}: features {list(names)}, of which the trunk "
                    f"lacks {missing} (it gives {sorted(input_shape)})"
                )
        self.num_classes = num_classes
        self.lesions = list(lesions)
        self.branch_channels = list(branch_channels)
        self.absent_logit = absent_logit
        self.topk_negative_ratio = topk_negative_ratio
        self.topk_min_negatives = topk_min_negatives
        if topk_balance not in ("none", "beta"):
            raise ValueError(
                f"MODEL.RED_SEG.TOPK_BALANCE must be 'none' or 'beta', got {topk_balance!r}"
            )
        if topk_decay_period < 0 or topk_decay_steps < 1:
            raise ValueError(
                f"MODEL.RED_SEG.TOPK_DECAY_PERIOD must be >= 0 and TOPK_DECAY_STEPS >= 1, got "
                f"{topk_decay_period} and {topk_decay_steps}"
            )
        self.topk_balance = topk_balance
        self.topk_decay_period = int(topk_decay_period)
        self.topk_decay_steps = int(topk_decay_steps)
        self.side_supervision = bool(side_supervision)
        # Set to 2 by LossSwitchHook: FN+FP instead of the top-k balanced BCE.
        self.loss_stage = 1
        self.branches = nn.ModuleList(
            RedSegBranch({f: input_shape[f] for f in names}, side_channels)
            for names in branch_features
        )

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        r = cfg.MODEL.RED_SEG
        check_sigmoid_head_cfg(cfg, cls.__name__)
        if len(r.BRANCH_FEATURES) != len(r.LESIONS):
            raise ValueError(
                f"MODEL.RED_SEG.BRANCH_FEATURES needs one feature list per lesion of "
                f"MODEL.RED_SEG.LESIONS {list(r.LESIONS)}, got {list(r.BRANCH_FEATURES)}"
            )
        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        dataset_classes = None
        if len(cfg.DATASETS.TRAIN):
            dataset_classes = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("thing_classes", None)
        if dataset_classes is None:
            logger.warning(
                f"RedSegHead: no thing_classes for {list(cfg.DATASETS.TRAIN)} (not registered); "
                f"taking {list(r.LESIONS)} to be channels 0..{len(r.LESIONS) - 1}"
            )
        return {
            "input_shape": input_shape,
            "num_classes": num_classes,
            "lesions": list(r.LESIONS),
            "branch_features": [list(names) for names in r.BRANCH_FEATURES],
            "branch_channels": red_seg_channels(r.LESIONS, num_classes, dataset_classes),
            "side_channels": r.SIDE_CHANNELS,
            "absent_logit": r.ABSENT_LOGIT,
            "topk_negative_ratio": r.TOPK_NEGATIVE_RATIO,
            "topk_min_negatives": r.TOPK_MIN_NEGATIVES,
            "topk_balance": r.TOPK_BALANCE,
            "topk_decay_period": r.TOPK_DECAY_PERIOD,
            "topk_decay_steps": r.TOPK_DECAY_STEPS,
            "side_supervision": r.SIDE_SUPERVISION,
        }

    def topk_ratio(self, iteration: int) -> float:
        """k0 (1 - floor(r / S) / M) at iteration r, floored at k0 / M; k0 without a schedule."""
        if self.topk_decay_period <= 0:
            return self.topk_negative_ratio
        drops = min(iteration // self.topk_decay_period, self.topk_decay_steps - 1)
        return self.topk_negative_ratio * (1.0 - drops / self.topk_decay_steps)

    def forward(
        self,
        features: Dict[str, torch.Tensor],
        targets: Optional[torch.Tensor] = None,
        image_size: Optional[Tuple[int, int]] = None,
    ):
        """The head contract's forward; with ``side_supervision`` in training, the side outputs'
        losses ("loss_side_<stage loss>", summed over sides and branches, as HED) join the
        fused map's."""
        if not (self.training and targets is not None and self.side_supervision):
            return super().forward(features, targets, image_size)
        image_size = tuple(image_size) if image_size is not None else self._default_size(features)
        fused, sides = zip(*(b(features, image_size, with_sides=True) for b in self.branches))
        logits = self._placed(torch.cat(fused, dim=1))
        losses = self.losses(logits, targets)
        side_losses = []
        for channel, branch_sides in zip(self.branch_channels, sides):
            target = targets[:, channel : channel + 1]
            for side in branch_sides:
                side_losses += list(self._stage_loss(side, target.expand_as(side)).values())
        (name,) = losses
        losses[name.replace("loss_", "loss_side_", 1)] = torch.stack(side_losses).sum()
        return logits, losses

    def branch_logits(
        self, features: Dict[str, torch.Tensor], image_size: Tuple[int, int]
    ) -> torch.Tensor:
        """(N, number of branches, H, W) logits, in ``lesions`` order."""
        return torch.cat([branch(features, image_size) for branch in self.branches], dim=1)

    def predict(
        self, features: Dict[str, torch.Tensor], image_size: Optional[Tuple[int, int]] = None
    ) -> torch.Tensor:
        """(N, C, H, W) logits at ``image_size``, ``absent_logit`` on channels without a branch;
        ``image_size`` by default the finest branch feature's size times its stride."""
        image_size = tuple(image_size) if image_size is not None else self._default_size(features)
        return self._placed(self.branch_logits(features, image_size))

    def _default_size(self, features: Dict[str, torch.Tensor]) -> Tuple[int, int]:
        stride, name = min((s, f) for b in self.branches for f, s in b.strides.items())
        return tuple(s * stride for s in features[name].shape[-2:])

    def _placed(self, branch_logits: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W): the branches' logits in their channels, ``absent_logit`` elsewhere."""
        n, _, height, width = branch_logits.shape
        logits = branch_logits.new_full((n, self.num_classes, height, width), self.absent_logit)
        logits[:, self.branch_channels] = branch_logits
        return logits

    def losses(self, logits: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The current stage's loss of the branch channels (the others are not trained):
        {"loss_topk_bce"} in stage 1, {"loss_fn_fp"} in stage 2."""
        if targets.shape[1] != self.num_classes:
            raise ValueError(
                f"RedSegHead has {self.num_classes} channels but the targets have "
                f"{targets.shape[1]}"
            )
        return self._stage_loss(logits[:, self.branch_channels], targets[:, self.branch_channels])

    def _stage_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.loss_stage == 1:
            loss = topk_balanced_bce_loss(
                logits,
                targets,
                negative_ratio=self.topk_ratio(_current_iteration()),
                min_negatives=self.topk_min_negatives,
                balance=self.topk_balance,
            )
            return {"loss_topk_bce": loss}
        if self.loss_stage == 2:
            return {"loss_fn_fp": fn_fp_loss(logits, targets)}
        raise ValueError(f"RedSegHead.loss_stage must be 1 or 2, got {self.loss_stage}")


def _current_iteration() -> int:
    """The trainer's iteration (Detectron2's event storage), 0 outside training."""
    try:
        return int(get_event_storage().iter)
    except AssertionError:  # no storage: not inside a trainer
        return 0
