"""MultiTaskLesionNet: lesions, DR / macular-oedema grades and optic disc / fovea centres in one
forward pass.

The network of the Lesion-Net paper (Wei et al., ICPR 2020: a lesion-segmentation branch whose
maps attend a grading network) plus the ResUNet report's landmark localization, on top of the
project's lesion models:

* the lesion branch (``MODEL.MULTITASK.LESION_ARCHITECTURE``) is any class registered in
  ``META_ARCH_REGISTRY`` that follows the lesion-model contract
  (:mod:`~retina_d2.modeling.meta_arch.contract`): a LesionRCNN (instances, and lesion maps with
  ``MODEL.LESION_SEG.ENABLED``), a SemanticLesionNet (lesion maps); or nothing. It is built from
  the registry and run only through the contract's calls, so it computes what it computes alone.
  It trains with the other tasks or stays frozen (``LESION_FROZEN``, optionally loaded from a
  lesion-only run's ``LESION_WEIGHTS``);
* one grading head per ``MODEL.GRADING.TASKS`` entry (:mod:`retina_d2.modeling.grading`) on
  ``MODEL.GRADING.IN_FEATURE``, reading the lesion maps where it uses them;
* a :class:`~retina_d2.modeling.localization.LandmarkHeatmapHead` for
  ``MODEL.LOCALIZATION.LANDMARKS``.

Grading and localization read the lesion branch's backbone, or a second backbone of their own
(``MODEL.MULTITASK.TASK_BACKBONE``, the paper's separate grading CNN). A task's loss covers only
the images labelled for it: a missing grade or landmark is masked out, never read as 0.

Training inputs: the mapper's dicts ("image", lesion targets when the branch trains,
"dr_grade" / "dme_grade" from the record, "landmarks" {name: (x, y)} in input pixels). Inference
returns per image "instances" (LesionRCNN), "sem_seg" (C, height, width) and "lesion_presence"
(C,) probabilities (a lesion branch; presence is the maps' global max, Lesion-Net's lesion
classification, or the best instance score per class without maps), "dr_grade" / "dme_grade"
(probabilities over the grades) and "landmarks" {name: (x, y)} in the original image's pixels with
"landmark_scores" {name: score}.
"""
import contextlib
import logging
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.backbone import Backbone
from detectron2.structures import ImageList
from torch import nn

from ...safe_load import CheckpointError, UnreadableCheckpointError, load_checkpoint
from ..grading import (
    GRADE_COUNTS,
    build_grading_head,
    check_grading_tasks,
    grade_targets,
    grading_loss,
)
from ..localization import LandmarkHeatmapHead, to_original_frame
from ..outputs import GRADES, LANDMARKS, LESION_PRESENCE, SEM_SEG, meta_architecture
from .contract import is_lesion_branch, lesion_branch_choices
from .semantic_net import check_activation

__all__ = ["MultiTaskLesionNet", "lesion_branch_class", "load_lesion_weights"]

logger = logging.getLogger(__name__)


def lesion_branch_class(cfg) -> Optional[type]:
    """The class of MultiTaskLesionNet's lesion branch, ``MODEL.MULTITASK.LESION_ARCHITECTURE``
    looked up in ``META_ARCH_REGISTRY`` ("" = no branch: None).

    Raises:
        ValueError: naming the registered classes that follow the lesion-model contract
            (:mod:`~retina_d2.modeling.meta_arch.contract`), when the name is not one of them.
    """
    name = cfg.MODEL.MULTITASK.LESION_ARCHITECTURE
    if not name:
        return None
    choices = lesion_branch_choices()
    if name not in choices:
        raise ValueError(
            f"MODEL.MULTITASK.LESION_ARCHITECTURE must be one of {[''] + choices} (the "
            f"registered lesion models), got {name!r}"
        )
    cls = meta_architecture(cfg, "MODEL.MULTITASK.LESION_ARCHITECTURE", name)
    assert is_lesion_branch(cls)
    return cls


def load_lesion_weights(lesion_model: nn.Module, path: str, trust: bool = False) -> None:
    """Load a lesion-only checkpoint (``{"model": state_dict}`` or a bare state dict; keys of a
    MultiTaskLesionNet checkpoint lose their ``lesion_model.`` prefix) into the lesion branch.

    The file is read as tensors, NumPy arrays and containers only (retina_d2/safe_load.py)
    unless ``trust`` (MODEL.TRUST_CHECKPOINT).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError (a ValueError): unreadable, refused as a full pickle, not a state dict,
            or none of its weights fits the branch.
    """
    try:
        checkpoint = load_checkpoint(path, trust=trust)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"MODEL.MULTITASK.LESION_WEIGHTS = {path!r}: no such file (train the lesion branch "
            "first, e.g. with the lesion-only config, or leave the key empty)"
        ) from None
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state, dict) or not all(
        isinstance(v, (torch.Tensor, np.ndarray)) for v in state.values()
    ):
        raise UnreadableCheckpointError(
            f"MODEL.MULTITASK.LESION_WEIGHTS = {path!r}: not a state dict of tensors or arrays"
        )
    state = {k: torch.as_tensor(v) for k, v in state.items()}  # a .pkl holds NumPy arrays
    prefix = "lesion_model."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    own = lesion_model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fitting:
        raise CheckpointError(
            f"MODEL.MULTITASK.LESION_WEIGHTS = {path!r}: none of its weights fits the lesion "
            f"branch ({type(lesion_model).__name__}); is it a checkpoint of the same lesion model?"
        )
    lesion_model.load_state_dict(fitting, strict=False)
    missing = sorted(set(own) - set(fitting))
    logger.info(
        "lesion branch: %d tensors loaded from %s%s", len(fitting), path,
        f"; {len(missing)} left as built, e.g. {missing[:3]}" if missing else "",
    )


@META_ARCH_REGISTRY.register()
class MultiTaskLesionNet(nn.Module):
    """A lesion branch, grading heads and a landmark head on shared or own features; see the
    module docstring."""

    @configurable
    def __init__(
        self,
        *,
        lesion_model: Optional[nn.Module],
        lesion_outputs: Sequence[str] = (),
        lesion_classes: int = 0,
        backbone: Optional[Backbone] = None,
        task_backbone: Optional[Backbone] = None,
        grading_heads: Optional[Dict[str, nn.Module]] = None,
        grading_feature: str = "res5",
        landmark_head: Optional[LandmarkHeatmapHead] = None,
        lesion_frozen: bool = False,
        grading_loss_weight: float = 1.0,
        landmark_loss_weight: float = 1.0,
        sem_seg_activation: str = "sigmoid",
        pixel_mean: Tuple[float, ...],
        pixel_std: Tuple[float, ...],
    ):
        """
        Args:
            lesion_model: the lesion branch, a model following the lesion-model contract
                (:mod:`~retina_d2.modeling.meta_arch.contract`: LesionRCNN, SemanticLesionNet),
                or None.
            lesion_outputs: what the branch returns (its class's ``output_types``):
                :data:`~retina_d2.modeling.outputs.SEM_SEG` makes lesion maps for the grading
                heads; :data:`~retina_d2.modeling.outputs.INSTANCES` alone gives lesion presence
                from the instances.
            lesion_classes: the branch's lesion classes (the length of "lesion_presence").
            backbone: the shared backbone when there is no lesion branch (else the branch's).
            task_backbone: a backbone of grading and localization's own, or None (shared).
            grading_heads: graded record field ("dr_grade", "dme_grade") -> grading head.
            grading_feature: the feature the grading heads read.
            landmark_head: the localization head, or None.
            lesion_frozen: keep the lesion branch (and a shared backbone) fixed: no lesion losses,
                no gradients into it.
            grading_loss_weight, landmark_loss_weight: factors of those losses.
            sem_seg_activation: "sigmoid" or "softmax", the lesion maps' layout.
            pixel_mean, pixel_std: per-channel input normalisation.
        """
        super().__init__()
        if (lesion_model is None) == (backbone is None):
            raise ValueError(
                "give exactly one of lesion_model (its backbone is shared) or backbone"
            )
        check_activation(sem_seg_activation, "sem_seg_activation")
        self.lesion_model = lesion_model
        self.lesion_outputs = frozenset(lesion_outputs if lesion_model is not None else ())
        self.lesion_classes = int(lesion_classes)
        self.backbone = backbone
        self.task_backbone = task_backbone
        self.grading_heads = nn.ModuleDict(grading_heads or {})
        check_grading_tasks(list(self.grading_heads))
        self.grading_feature = grading_feature
        self.landmark_head = landmark_head
        self.lesion_frozen = lesion_frozen
        self.grading_loss_weight = grading_loss_weight
        self.landmark_loss_weight = landmark_loss_weight
        self.sem_seg_activation = sem_seg_activation
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        if self.grading_heads and SEM_SEG not in self.lesion_outputs:
            needing = [
                t for t, h in self.grading_heads.items() if getattr(h, "uses_lesion_maps", True)
            ]
            if needing:
                raise ValueError(
                    f"the grading heads of {needing} read lesion maps, which this lesion branch "
                    "does not make: use SemanticLesionNet, or LesionRCNN with "
                    "MODEL.LESION_SEG.ENABLED, or MODEL.GRADING.NAME 'PlainGradingHead'"
                )
        if lesion_frozen and lesion_model is not None:
            for p in lesion_model.parameters():
                p.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg):
        node = cfg.MODEL.MULTITASK
        lesion_class = lesion_branch_class(cfg)
        lesion_model = backbone = None
        lesion_outputs = frozenset()
        if lesion_class is not None:
            lesion_outputs = frozenset(lesion_class.output_types(cfg))
            lesion_model = lesion_class(cfg)
            if node.LESION_WEIGHTS and not cfg.MODEL.WEIGHTS:
                # With MODEL.WEIGHTS (a multi-task checkpoint: --eval-only, fine-tuning) the
                # branch is overwritten anyway; the lesion-only run need not be at hand.
                load_lesion_weights(
                    lesion_model, node.LESION_WEIGHTS, trust=cfg.MODEL.TRUST_CHECKPOINT
                )
            shared = lesion_model.backbone
        else:
            backbone = shared = build_backbone(cfg)
        task_backbone = None
        if node.TASK_BACKBONE:
            if node.TASK_BACKBONE not in BACKBONE_REGISTRY:
                raise ValueError(
                    f"MODEL.MULTITASK.TASK_BACKBONE {node.TASK_BACKBONE!r} is not a registered "
                    "backbone"
                )
            input_shape = ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN))
            task_backbone = BACKBONE_REGISTRY.get(node.TASK_BACKBONE)(cfg, input_shape)
        task_shapes = (task_backbone or shared).output_shape()

        tasks = list(cfg.MODEL.GRADING.TASKS)
        check_grading_tasks(tasks)
        grading_heads = {}
        if tasks:
            feature = cfg.MODEL.GRADING.IN_FEATURE
            if feature not in task_shapes:
                raise ValueError(
                    f"MODEL.GRADING.IN_FEATURE {feature!r}: the backbone gives "
                    f"{sorted(task_shapes)}"
                )
            num_lesions = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
            for task in tasks:
                grading_heads[task] = build_grading_head(
                    cfg, task_shapes[feature], num_lesions, GRADE_COUNTS[task]
                )
        landmark_head = None
        if cfg.MODEL.LOCALIZATION.LANDMARKS:
            landmark_head = LandmarkHeatmapHead(cfg, task_shapes)
        # Lesion presence has a channel per lesion map, or per detected class without maps.
        lesion_classes = (
            cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES if SEM_SEG in lesion_outputs
            else cfg.MODEL.ROI_HEADS.NUM_CLASSES
        )
        return {
            "lesion_model": lesion_model,
            "lesion_outputs": lesion_outputs,
            "lesion_classes": lesion_classes,
            "backbone": backbone,
            "task_backbone": task_backbone,
            "grading_heads": grading_heads,
            "grading_feature": cfg.MODEL.GRADING.IN_FEATURE,
            "landmark_head": landmark_head,
            "lesion_frozen": node.LESION_FROZEN,
            "grading_loss_weight": cfg.MODEL.GRADING.LOSS_WEIGHT,
            "landmark_loss_weight": cfg.MODEL.LOCALIZATION.LOSS_WEIGHT,
            "sem_seg_activation": cfg.MODEL.LESION_SEG.ACTIVATION,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
        }

    @classmethod
    def output_types(cls, cfg) -> FrozenSet[str]:
        """The lesion branch's outputs and lesion presence (with a branch), grades (with
        ``MODEL.GRADING.TASKS``), landmarks (with ``MODEL.LOCALIZATION.LANDMARKS``)."""
        branch = lesion_branch_class(cfg)
        types = set()
        if branch is not None:
            types |= set(branch.output_types(cfg)) | {LESION_PRESENCE}
        if cfg.MODEL.GRADING.TASKS:
            types.add(GRADES)
        if cfg.MODEL.LOCALIZATION.LANDMARKS:
            types.add(LANDMARKS)
        return frozenset(types)

    @classmethod
    def training_targets(cls, cfg) -> FrozenSet[str]:
        """The lesion branch's targets unless it is frozen (``MODEL.MULTITASK.LESION_FROZEN``),
        grades and landmarks for those tasks."""
        branch = lesion_branch_class(cfg)
        targets = set()
        if branch is not None and not cfg.MODEL.MULTITASK.LESION_FROZEN:
            targets |= set(branch.training_targets(cfg))
        return frozenset(targets | (set(cls.output_types(cfg)) & {GRADES, LANDMARKS}))

    @classmethod
    def part_weights(cls, cfg) -> Dict[str, str]:
        """{name prefix: weights} of the parts that start from weights of their own: the task
        backbone (``MODEL.MULTITASK.TASK_BACKBONE_WEIGHTS``)."""
        node = cfg.MODEL.MULTITASK
        if node.TASK_BACKBONE and node.TASK_BACKBONE_WEIGHTS:
            return {"task_backbone.": node.TASK_BACKBONE_WEIGHTS}
        return {}

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def shared_backbone(self) -> Backbone:
        """The lesion branch's backbone, or the model's own when there is no branch."""
        return self.lesion_model.backbone if self.lesion_model is not None else self.backbone

    def train(self, mode: bool = True):
        # A frozen branch stays in eval mode: dropout off, detector in inference mode.
        super().train(mode)
        if self.lesion_frozen and self.lesion_model is not None:
            self.lesion_model.eval()
        return self

    def preprocess_image(self, batched_inputs: List[dict]) -> ImageList:
        """Normalise, pad (to every backbone's divisibility) and batch the input images."""
        divisibility = max(
            b.size_divisibility for b in (self.shared_backbone, self.task_backbone) if b is not None
        )
        images = [x["image"].to(self.device) for x in batched_inputs]
        images = [(x - self.pixel_mean) / self.pixel_std for x in images]
        return ImageList.from_tensors(images, divisibility)

    def _lesion_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) lesion probabilities from the semantic head's logits."""
        if self.sem_seg_activation == "sigmoid":
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=1)[:, 1:]

    def forward(self, batched_inputs: List[dict]):
        """
        Args:
            batched_inputs: the mapper's dicts (module docstring).

        Returns:
            Training: the loss dict of every task (lesion losses under their own names,
            "loss_dr_grade", "loss_dme_grade", "loss_landmarks"). Inference: one output dict per
            image (module docstring).
        """
        images = self.preprocess_image(batched_inputs)
        train_lesions = self.training and not self.lesion_frozen and self.lesion_model is not None
        frozen = contextlib.nullcontext() if not self.lesion_frozen else torch.no_grad()
        with frozen:
            features = self.shared_backbone(images.tensor)
            raw, losses = {}, {}
            if self.lesion_model is not None:
                # The branch's own network after the shared backbone (the lesion-model contract);
                # detections only at inference, where they are returned.
                raw, losses = self.lesion_model.forward_features(
                    batched_inputs, images, features, with_losses=train_lesions,
                    with_predictions=not self.training,
                )
        logits = raw.get("sem_seg")
        task_features = features
        if self.task_backbone is not None:
            task_features = self.task_backbone(images.tensor)
        lesion_maps = self._lesion_probabilities(logits) if logits is not None else None

        grades = {
            task: head(task_features[self.grading_feature], lesion_maps)
            for task, head in self.grading_heads.items()
        }
        heatmaps = self.landmark_head(task_features) if self.landmark_head is not None else None
        if self.training:
            for task, grade_logits in grades.items():
                targets = grade_targets(batched_inputs, task, GRADE_COUNTS[task], self.device)
                loss = grading_loss(grade_logits, targets)
                losses[f"loss_{task}"] = loss * self.grading_loss_weight
            if heatmaps is not None:
                landmark_losses = self.landmark_head.losses(
                    heatmaps, batched_inputs, images.image_sizes
                )
                weight = self.landmark_loss_weight
                losses.update({k: v * weight for k, v in landmark_losses.items()})
            return losses
        return self._outputs(batched_inputs, images, raw, lesion_maps, grades, heatmaps)

    def _outputs(self, batched_inputs, images, raw, lesion_maps, grades, heatmaps):
        """The per-image inference dicts (module docstring)."""
        outputs = [{} for _ in batched_inputs]
        if self.lesion_model is not None:
            outputs = self.lesion_model.postprocess(raw, batched_inputs, images.image_sizes)
        if lesion_maps is not None:
            for output, maps, (h, w) in zip(outputs, lesion_maps, images.image_sizes):
                # Lesion-Net's lesion classification: each map's global max (padding excluded).
                output["lesion_presence"] = maps[:, :h, :w].amax(dim=(-2, -1))
        elif "instances" in raw:
            num_classes = self.lesion_classes
            for output in outputs:
                instances = output["instances"]
                presence = torch.zeros(num_classes, device=self.device)
                if len(instances):
                    presence = presence.scatter_reduce(
                        0, instances.pred_classes, instances.scores, reduce="amax"
                    )
                output["lesion_presence"] = presence
        for task, grade_logits in grades.items():
            for output, row in zip(outputs, torch.softmax(grade_logits.float(), dim=1)):
                output[task] = row
        if heatmaps is not None:
            points, scores = self.landmark_head.inference(heatmaps, images.image_sizes)
            for i, (inputs, image_size) in enumerate(zip(batched_inputs, images.image_sizes)):
                original = to_original_frame(
                    points[i], image_size, inputs.get("height", image_size[0]),
                    inputs.get("width", image_size[1]), inputs.get("fov_box"),
                )
                names = self.landmark_head.landmarks
                outputs[i]["landmarks"] = {
                    name: (float(original[j, 0]), float(original[j, 1]))
                    for j, name in enumerate(names)
                }
                outputs[i]["landmark_scores"] = {
                    name: float(scores[i, j]) for j, name in enumerate(names)
                }
        return outputs
