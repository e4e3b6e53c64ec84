"""SemanticLesionNet: a backbone and a semantic lesion head, nothing else.

The head is any ``SEM_SEG_HEADS_REGISTRY`` entry (``MODEL.SEM_SEG_HEAD.NAME``) that follows the
semantic head contract: ``head(features, targets, image_size) -> (logits, losses)``, with logits
(N, C, H, W) for per-lesion sigmoid heads or (N, C + 1, H, W), background first, for softmax heads
(``MODEL.LESION_SEG.ACTIVATION``), at the padded input's size. Training returns the head's losses;
inference returns ``[{"sem_seg": (C, height, width) float probabilities}]`` in the original
image's frame, honouring the mapper's ``fov_box`` as LesionRCNN does.
"""
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_sem_seg_head
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList
from torch import nn

from ..outputs import SEM_SEG

__all__ = [
    "ACTIVATIONS",
    "check_activation",
    "SemanticLesionNet",
    "batch_semantic_targets",
    "padded_semantic_targets",
    "semantic_outputs",
    "semantic_postprocess",
]

ACTIVATIONS = ("sigmoid", "softmax")


def check_activation(activation: str, name: str = "activation") -> None:
    """Raise ValueError unless ``activation`` (the argument called ``name``) is in ACTIVATIONS."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name} must be one of {ACTIVATIONS}, got {activation!r}")
# Padding of the targets to the batch's size: ignored by every loss.
_TARGET_PAD_VALUE = 255


def semantic_postprocess(
    logits: torch.Tensor,
    image_size: Tuple[int, int],
    height: int,
    width: int,
    fov_box: Optional[Sequence[float]] = None,
    activation: str = "sigmoid",
) -> torch.Tensor:
    """One image's logits at the padded input size -> probabilities in the original frame.

    The padding is cropped off and the logits resized (bilinear) to the original image, or, when
    the mapper cropped the field of view, to the crop ``fov_box = [x0, y0, x1, y1]``, whose
    probabilities are then padded with 0 into the ``height x width`` frame.

    Args:
        logits: (C, H, W) for sigmoid, (C + 1, H, W) with background first for softmax.
        image_size: (h, w) of the image inside the padded input.
        height, width: the original image's size.
        fov_box: the mapper's field-of-view crop in original pixels, or None.
        activation: "sigmoid" or "softmax" (whose background channel is dropped).

    Returns:
        (C, height, width) float probabilities.
    """
    check_activation(activation)
    if fov_box is None:
        x0, y0, x1, y1 = 0, 0, width, height
    else:
        x0, y0, x1, y1 = (int(round(v)) for v in fov_box)
    # Resized as logits, as Detectron2's SemanticSegmentor does: sharper edges than resizing
    # probabilities, and the activation's output stays exactly in [0, 1].
    logits = sem_seg_postprocess(logits.float(), image_size, y1 - y0, x1 - x0)
    if activation == "sigmoid":
        probs = torch.sigmoid(logits)
    else:
        probs = torch.softmax(logits, dim=0)[1:]
    if fov_box is not None:
        probs = F.pad(probs, (x0, width - x1, y0, height - y1))
    return probs


def semantic_outputs(
    logits: torch.Tensor,
    batched_inputs: List[Dict],
    image_sizes: Sequence[Tuple[int, int]],
    activation: str = "sigmoid",
) -> List[torch.Tensor]:
    """:func:`semantic_postprocess` of a batch, with the size and crop each input dict records
    ("height", "width", "fov_box"; the network input's size when absent).

    Returns:
        one (C, height, width) probability tensor per image.
    """
    return [
        semantic_postprocess(
            logit,
            image_size,
            inputs.get("height", image_size[0]),
            inputs.get("width", image_size[1]),
            inputs.get("fov_box"),
            activation,
        )
        for logit, inputs, image_size in zip(logits, batched_inputs, image_sizes)
    ]


def batch_semantic_targets(
    batched_inputs: List[dict], device: torch.device, size_divisibility: int
) -> torch.Tensor:
    """The inputs' ``"sem_seg"`` (uint8 (C, H, W) each) padded like the images, with 255 (ignore).

    Returns:
        uint8 (N, C, H, W) on ``device``.

    Raises:
        ValueError: an input without ``"sem_seg"`` (a mapper built without semantic targets).
    """
    missing = [x.get("file_name", i) for i, x in enumerate(batched_inputs) if "sem_seg" not in x]
    if missing:
        raise ValueError(
            f"training inputs without 'sem_seg' targets ({missing[:3]}): build the mapper with "
            "semantic_classes (LesionDatasetMapper.from_config does so for semantic models)"
        )
    targets = [x["sem_seg"].to(device) for x in batched_inputs]
    return ImageList.from_tensors(targets, size_divisibility, _TARGET_PAD_VALUE).tensor


def padded_semantic_targets(
    batched_inputs: List[dict], images: ImageList, device: torch.device
) -> torch.Tensor:
    """:func:`batch_semantic_targets` padded (with 255, ignore) to the batch of ``images``: the
    input images are as large as their targets, and a composite model pads its images to the
    largest divisibility of its backbones, which a branch's targets must follow.

    Returns:
        uint8 (N, C, H, W) on ``device``, (H, W) that of ``images.tensor``.
    """
    targets = batch_semantic_targets(batched_inputs, device, 0)
    pad_h = images.tensor.shape[-2] - targets.shape[-2]
    pad_w = images.tensor.shape[-1] - targets.shape[-1]
    if pad_h or pad_w:
        targets = F.pad(targets, (0, pad_w, 0, pad_h), value=_TARGET_PAD_VALUE)
    return targets


@META_ARCH_REGISTRY.register()
class SemanticLesionNet(nn.Module):
    """Backbone + semantic lesion head; see the module docstring."""

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        sem_seg_head: nn.Module,
        pixel_mean: Tuple[float],
        pixel_std: Tuple[float],
        activation: str = "sigmoid",
    ):
        """
        Args:
            backbone: a Detectron2 backbone.
            sem_seg_head: a head following the semantic head contract (module docstring).
            pixel_mean, pixel_std: per-channel normalisation of the input images.
            activation: "sigmoid" (C outputs) or "softmax" (C + 1 outputs, background first).
        """
        super().__init__()
        check_activation(activation)
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.activation = activation
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        return {
            "backbone": backbone,
            "sem_seg_head": build_sem_seg_head(cfg, backbone.output_shape()),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "activation": cfg.MODEL.LESION_SEG.ACTIVATION,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess_image(self, batched_inputs: List[dict]) -> ImageList:
        """Normalise, pad and batch the input images."""
        images = [x["image"].to(self.device) for x in batched_inputs]
        images = [(x - self.pixel_mean) / self.pixel_std for x in images]
        return ImageList.from_tensors(images, self.backbone.size_divisibility)

    @classmethod
    def output_types(cls, cfg) -> FrozenSet[str]:
        """Lesion maps."""
        return frozenset({SEM_SEG})

    @classmethod
    def training_targets(cls, cfg) -> FrozenSet[str]:
        """Semantic targets."""
        return frozenset({SEM_SEG})

    def forward(self, batched_inputs: List[dict]):
        """
        Args:
            batched_inputs: the mapper's dicts: "image", and in training "sem_seg" (uint8
                (C, H, W), 255 = ignore); at inference optionally "height", "width" and
                "fov_box".

        Returns:
            Training: the head's loss dict. Inference: one {"sem_seg": (C, height, width)
            probabilities} per image.
        """
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        raw, losses = self.forward_features(
            batched_inputs, images, features, with_losses=self.training,
            with_predictions=not self.training,
        )
        if self.training:
            return losses
        return self.postprocess(raw, batched_inputs, images.image_sizes)

    def forward_features(
        self,
        batched_inputs: List[dict],
        images: ImageList,
        features: Dict[str, torch.Tensor],
        *,
        with_losses: bool,
        with_predictions: bool,
    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """The head on the backbone's features (the lesion-model contract,
        :mod:`~retina_d2.modeling.meta_arch.contract`).

        Returns:
            (raw, losses): ``raw["sem_seg"]``, the logits at the padded size (always: the maps
            are the model's only output); the head's losses with ``with_losses``.
        """
        targets = None
        if with_losses:
            targets = padded_semantic_targets(batched_inputs, images, self.device)
        logits, losses = self.sem_seg_head(features, targets, tuple(images.tensor.shape[-2:]))
        return {"sem_seg": logits}, (losses if with_losses else {})

    def postprocess(
        self, raw: Dict[str, torch.Tensor], batched_inputs: List[dict], image_sizes
    ) -> List[Dict[str, torch.Tensor]]:
        """``raw`` of :meth:`forward_features` to one {"sem_seg": (C, height, width)
        probabilities} per image in the original frame (the lesion-model contract)."""
        probs = semantic_outputs(raw["sem_seg"], batched_inputs, image_sizes, self.activation)
        return [{"sem_seg": p} for p in probs]
