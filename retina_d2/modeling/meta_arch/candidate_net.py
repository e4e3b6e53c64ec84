"""BrightCandidateNet: bright lesions found without training, told apart by a small classifier.

The training-free floor (:func:`~retina_d2.modeling.bright_lesions.bright_lesion_candidates`)
already outlines most exudates a model can match: they are the components of the green channel's
contrast over its background. What it cannot do is rank them: drusen, the vessels' light reflex,
the nerve-fibre sheen and the rim's glare are as bright. This model keeps the floor's candidates
and learns, from each candidate's colour, contrast, shape, surround and position
(:data:`~retina_d2.modeling.bright_lesions.FEATURE_NAMES`), the probability that it is a lesion.

Why: on 2 CPU cores and 40 annotated photographs a network that must also learn where lesions
begin and end learns slowly (the dense exudate model reached a fifth of the floor's AP after 100
iterations), while a classifier of a few thousand parameters learns from every candidate of every
training image at each step, healthy eyes' candidates being its hard negatives.

Training reads the semantic target of its lesion channel (``sem_seg``, 255 = ignore): a candidate
is a lesion when its IoU with a ground-truth lesion (a connected component of the target, as the
converters make instances) reaches ``POSITIVE_IOU``; a candidate mostly inside an ignore region
trains nothing. Inference returns ``[{"sem_seg": (C, height, width)}]``: each candidate's pixels
hold its probability in its lesion channel, 0 elsewhere, so the components path
(``RETINA.COMPONENTS``, MASK_THRESHOLD below every score) gives back exactly the candidates as
lesions scored by the classifier, and the semantic evaluators apply unchanged.
"""
from typing import Dict, FrozenSet, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from scipy import ndimage
from torch import nn

from ..bright_lesions import (
    FEATURE_NAMES,
    BrightLesionParams,
    bright_lesion_candidates,
    bright_lesion_maps,
    candidate_features,
    label_overlap_ious,
)
from ...schema import IGNORE_VALUE
from ..outputs import SEM_SEG

__all__ = ["BrightCandidateNet", "candidate_targets"]


def candidate_targets(
    labels: np.ndarray, index: np.ndarray, target: np.ndarray, positive_iou: float
) -> Tuple[np.ndarray, np.ndarray]:
    """Which candidates are lesions, and which train at all.

    Args:
        labels: int (H, W) candidate label map (0: none).
        index: the candidates' labels, in the order of the returned arrays.
        target: uint8 (H, W) lesion target: 1 lesion, 0 not, 255 ignore.
        positive_iou: IoU with a ground-truth lesion (an 8-connected component of target == 1)
            from which a candidate is a lesion.

    Returns:
        (is_lesion, trains): bool arrays over ``index``. A candidate with more than half of its
        pixels in the ignore region trains only if it is a lesion.
    """
    lesions, _ = ndimage.label(target == 1, np.ones((3, 3), bool))
    top = int(max(labels.max(), index.max() if index.size else 0)) + 1
    cand_area = np.bincount(labels.ravel(), minlength=top)
    best_iou = np.zeros(top)
    cand, _, iou = label_overlap_ious(labels, lesions)
    np.maximum.at(best_iou, cand, iou)
    ignored = np.bincount(labels[target == IGNORE_VALUE].ravel(), minlength=top)
    is_lesion = best_iou[index] >= positive_iou
    mostly_ignored = ignored[index] * 2 > cand_area[index]
    return is_lesion, is_lesion | ~mostly_ignored


@META_ARCH_REGISTRY.register()
class BrightCandidateNet(nn.Module):
    """Training-free bright candidates scored by a small learned classifier (module docstring)."""

    @configurable
    def __init__(
        self,
        *,
        params: BrightLesionParams,
        num_classes: int,
        lesion_channel: int,
        hidden_dim: int = 32,
        dropout: float = 0.1,
        positive_iou: float = 0.2,
        max_candidates: int = 3000,
        input_format: str = "RGB",
    ):
        """
        Args:
            params: the candidates' settings.
            num_classes: channels of the returned maps (the dataset's lesion types).
            lesion_channel: the channel the candidates are scored for.
            hidden_dim, dropout: the classifier's hidden width and dropout.
            positive_iou: IoU with a ground-truth lesion that makes a candidate a lesion.
            max_candidates: most candidates per image, the most contrasted first.
            input_format: "RGB" or "BGR", the mapper's channel order.
        """
        super().__init__()
        if not 0 <= lesion_channel < num_classes:
            raise ValueError(
                f"lesion_channel {lesion_channel} is not one of the {num_classes} classes"
            )
        if input_format not in ("RGB", "BGR"):
            raise ValueError(f"BrightCandidateNet reads RGB or BGR images, not {input_format!r}")
        self.params = params
        self.num_classes = num_classes
        self.lesion_channel = lesion_channel
        self.positive_iou = positive_iou
        self.max_candidates = max_candidates
        self.input_format = input_format
        features = len(FEATURE_NAMES)
        # The features differ in scale by orders of magnitude (log areas, 0-1 colours, contrast
        # ratios): a normalisation without parameters standardises them from the data seen.
        self.classifier = nn.Sequential(
            nn.BatchNorm1d(features, affine=False),
            nn.Linear(features, hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, 1),
        )

    @classmethod
    def from_config(cls, cfg) -> Dict:
        c = cfg.MODEL.BRIGHT_CANDIDATES
        return {
            "params": BrightLesionParams(
                background_sigma=c.BACKGROUND_SIGMA, min_contrast=c.MIN_CONTRAST,
                disc_radius=c.DISC_RADIUS, rim=c.RIM, min_area=c.MIN_AREA, ring=c.RING,
            ),
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "lesion_channel": c.LESION_CHANNEL,
            "hidden_dim": c.HIDDEN_DIM,
            "dropout": c.DROPOUT,
            "positive_iou": c.POSITIVE_IOU,
            "max_candidates": c.MAX_CANDIDATES,
            "input_format": cfg.INPUT.FORMAT,
        }

    @classmethod
    def output_types(cls, cfg) -> FrozenSet[str]:
        """Lesion maps (each candidate's pixels hold its probability)."""
        return frozenset({SEM_SEG})

    @classmethod
    def training_targets(cls, cfg) -> FrozenSet[str]:
        """Semantic targets (a candidate's label is its IoU with their components)."""
        return frozenset({SEM_SEG})

    @property
    def device(self) -> torch.device:
        return self.classifier[1].weight.device

    def _candidates(self, image: torch.Tensor):
        """An input image (C, H, W, 0-255) -> (RGB uint8 array, label map, labels, features)."""
        rgb = image.detach().permute(1, 2, 0).clamp(0, 255).to(torch.uint8).cpu().numpy()
        if self.input_format == "BGR":
            rgb = np.ascontiguousarray(rgb[..., ::-1])
        maps = bright_lesion_maps(rgb, self.params)
        labels, candidates = bright_lesion_candidates(rgb, self.params, maps)
        candidates = candidates[: self.max_candidates]
        features = candidate_features(rgb, labels, candidates, maps, self.params)
        index = np.array([c[0] for c in candidates], np.int64)
        return labels, index, torch.from_numpy(features).to(self.device)

    def forward(self, batched_inputs: List[dict]):
        """
        Args:
            batched_inputs: the mapper's dicts: "image", and in training "sem_seg" (uint8
                (C, H, W), 255 = ignore); at inference optionally "height", "width" and
                "fov_box".

        Returns:
            Training: ``{"loss_candidates": BCE over the batch's candidates}``. Inference: one
            {"sem_seg": (C, height, width) probabilities} per image.
        """
        if self.training:
            return self._losses(batched_inputs)
        return [self._inference(inputs) for inputs in batched_inputs]

    def _losses(self, batched_inputs: List[dict]) -> Dict[str, torch.Tensor]:
        features, is_lesion, trains = [], [], []
        for inputs in batched_inputs:
            if "sem_seg" not in inputs:
                raise ValueError(
                    f"{inputs.get('file_name', 'a training input')}: no 'sem_seg' target; "
                    "BrightCandidateNet trains on the lesion channel's semantic target"
                )
            labels, index, feats = self._candidates(inputs["image"])
            target = inputs["sem_seg"][self.lesion_channel].cpu().numpy()
            positive, kept = candidate_targets(labels, index, target, self.positive_iou)
            features.append(feats)
            is_lesion.append(torch.from_numpy(positive))
            trains.append(torch.from_numpy(kept))
        features = torch.cat(features)
        kept = torch.cat(trains).to(self.device)
        if int(kept.sum()) < 2:  # batch normalisation needs two samples; nothing to learn
            return {"loss_candidates": sum(p.sum() for p in self.parameters()) * 0.0}
        logits = self.classifier(features[kept])[:, 0]
        labels = torch.cat(is_lesion).to(self.device)[kept].float()
        return {"loss_candidates": F.binary_cross_entropy_with_logits(logits, labels)}

    def _inference(self, inputs: dict) -> Dict[str, torch.Tensor]:
        labels, index, features = self._candidates(inputs["image"])
        lookup = np.zeros(int(labels.max()) + 1, np.float32)
        if len(index):
            with torch.no_grad():
                lookup[index] = torch.sigmoid(self.classifier(features)[:, 0]).cpu().numpy()
        probs = torch.zeros((self.num_classes,) + labels.shape, dtype=torch.float32)
        probs[self.lesion_channel] = torch.from_numpy(lookup[labels])
        return {"sem_seg": _to_photograph(probs, inputs).to(self.device)}


def _to_photograph(probs: torch.Tensor, inputs: dict) -> torch.Tensor:
    """The map (C, h, w) of the network's input in the photograph's frame: resized to the
    mapper's field-of-view crop (or the whole photograph) by nearest neighbour, so candidates keep
    their own probability, then padded with 0 to ``height x width``."""
    height = int(inputs.get("height", probs.shape[1]))
    width = int(inputs.get("width", probs.shape[2]))
    x0, y0, x1, y1 = (0, 0, width, height) if inputs.get("fov_box") is None else (
        int(round(v)) for v in inputs["fov_box"])
    probs = F.interpolate(probs[None], size=(y1 - y0, x1 - x0), mode="nearest")[0]
    return F.pad(probs, (x0, width - x1, y0, height - y1))
