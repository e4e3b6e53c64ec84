"""LesionRCNN: Mask R-CNN that maps predictions back through the field-of-view crop.

The test-time mapper may crop an image to its field of view (FOV) before resizing; it records the
crop as ``fov_box`` (original pixels). Detectron2's postprocessing only rescales, so here results
are first rescaled to the crop, then shifted and pasted into the original frame.

With ``MODEL.LESION_SEG.ENABLED`` a semantic lesion head (``MODEL.SEM_SEG_HEAD.NAME``, the contract
of :mod:`retina_d2.modeling.meta_arch.semantic_net`) runs on the FPN features beside Mask R-CNN:
its losses, times ``MODEL.LESION_SEG.LOSS_WEIGHT``, join the detector's in training, and inference
returns ``"sem_seg"`` (C, height, width) probabilities beside ``"instances"``.

Training and inference run through the two calls of the lesion-model contract
(:mod:`~retina_d2.modeling.meta_arch.contract`), :meth:`LesionRCNN.forward_features` and
:meth:`LesionRCNN.postprocess`, which MultiTaskLesionNet calls on its LesionRCNN branch. The model
returns Detectron2's instances as they are: ``MODEL.LESION_MERGE`` is the last inference step
(:func:`retina_d2.modeling.inference.build_inference_model`).
"""
from typing import Dict, FrozenSet, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, build_sem_seg_head
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import nn

from ..outputs import INSTANCES, SEM_SEG
from .semantic_net import check_activation, padded_semantic_targets, semantic_outputs

__all__ = ["LesionRCNN", "detections_in_frame", "paste_into_frame"]


def paste_into_frame(instances: Instances, fov_box, height: int, width: int) -> Instances:
    """Move instances predicted on a crop ``fov_box = [x0, y0, x1, y1]`` into a (height, width)
    frame: boxes shift by (x0, y0); masks are padded with zeros around the crop."""
    x0, y0, x1, y1 = (int(round(v)) for v in fov_box)
    out = Instances((height, width))
    for name, value in instances.get_fields().items():
        if name == "pred_boxes":
            shift = torch.tensor([x0, y0, x0, y0], dtype=value.tensor.dtype, device=value.device)
            boxes = Boxes(value.tensor + shift)
            boxes.clip((height, width))
            value = boxes
        elif name == "pred_masks":
            # (N, 1?, h, w) bool/float at the crop's size -> zero-padded to the original frame.
            value = F.pad(value, (x0, width - x1, y0, height - y1))
        out.set(name, value)
    return out


@META_ARCH_REGISTRY.register()
class LesionRCNN(GeneralizedRCNN):
    """:class:`GeneralizedRCNN` whose outputs honour the mapper's ``fov_box``, with an optional
    semantic lesion head (module docstring)."""

    @configurable
    def __init__(
        self,
        *,
        sem_seg_head: Optional[nn.Module] = None,
        sem_seg_loss_weight: float = 1.0,
        sem_seg_activation: str = "sigmoid",
        **kwargs,
    ):
        """
        Args:
            sem_seg_head: a semantic lesion head on the backbone's features, or None.
            sem_seg_loss_weight: factor of the semantic head's losses.
            sem_seg_activation: "sigmoid" or "softmax" (the head's output layout).
            kwargs: :class:`GeneralizedRCNN`'s arguments.
        """
        super().__init__(**kwargs)
        check_activation(sem_seg_activation, "sem_seg_activation")
        self.sem_seg_head = sem_seg_head
        self.sem_seg_loss_weight = sem_seg_loss_weight
        self.sem_seg_activation = sem_seg_activation

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        if cfg.MODEL.LESION_SEG.ENABLED:
            ret["sem_seg_head"] = build_sem_seg_head(cfg, ret["backbone"].output_shape())
            ret["sem_seg_loss_weight"] = cfg.MODEL.LESION_SEG.LOSS_WEIGHT
            ret["sem_seg_activation"] = cfg.MODEL.LESION_SEG.ACTIVATION
        return ret

    @classmethod
    def output_types(cls, cfg) -> FrozenSet[str]:
        """Instances, and lesion maps with ``MODEL.LESION_SEG.ENABLED``."""
        return frozenset({INSTANCES} | ({SEM_SEG} if cfg.MODEL.LESION_SEG.ENABLED else set()))

    @classmethod
    def training_targets(cls, cfg) -> FrozenSet[str]:
        """Instance targets, and semantic targets for the semantic head."""
        return cls.output_types(cfg)

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """:meth:`GeneralizedRCNN.forward`; with a semantic head, training inputs also need
        "sem_seg" (uint8 (C, H, W), 255 = ignore) and its weighted losses are added."""
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        _, losses = self.forward_features(
            batched_inputs, images, features, with_losses=True, with_predictions=False
        )
        return losses

    def forward_features(
        self,
        batched_inputs: List[Dict[str, torch.Tensor]],
        images: ImageList,
        features: Dict[str, torch.Tensor],
        *,
        with_losses: bool,
        with_predictions: bool,
    ) -> Tuple[Dict[str, object], Dict[str, torch.Tensor]]:
        """The network after the backbone (the lesion-model contract,
        :mod:`~retina_d2.modeling.meta_arch.contract`).

        Returns:
            (raw, losses): ``raw["instances"]``, the detections in the network input's frame
            (``with_predictions``), ``raw["sem_seg"]``, the semantic head's logits at the padded
            size (with a head); ``losses``, Detectron2's detector and proposal losses and the
            head's, times ``sem_seg_loss_weight`` (``with_losses``).
        """
        raw: Dict[str, object] = {}
        losses: Dict[str, torch.Tensor] = {}
        if with_losses:
            # GeneralizedRCNN.forward's steps on the given features.
            if "instances" in batched_inputs[0]:
                gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
            else:
                gt_instances = None
            proposals, proposal_losses = self._proposals(batched_inputs, images, features,
                                                         gt_instances)
            _, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
            if self.vis_period > 0 and get_event_storage().iter % self.vis_period == 0:
                self.visualize_training(batched_inputs, proposals)
            losses.update(detector_losses)
            losses.update(proposal_losses)
        elif with_predictions:
            proposals, _ = self._proposals(batched_inputs, images, features, None)
            raw["instances"], _ = self.roi_heads(images, features, proposals, None)
        if self.sem_seg_head is not None:
            targets = None
            if with_losses:
                targets = padded_semantic_targets(batched_inputs, images, self.device)
            logits, sem_seg_losses = self.sem_seg_head(
                features, targets, tuple(images.tensor.shape[-2:])
            )
            raw["sem_seg"] = logits
            losses.update({k: v * self.sem_seg_loss_weight for k, v in sem_seg_losses.items()})
        return raw, losses

    def _proposals(self, batched_inputs, images, features, gt_instances):
        if self.proposal_generator is not None:
            return self.proposal_generator(images, features, gt_instances)
        return [x["proposals"].to(self.device) for x in batched_inputs], {}

    def postprocess(
        self, raw: Dict[str, object], batched_inputs: List[Dict[str, torch.Tensor]], image_sizes
    ) -> List[Dict[str, object]]:
        """``raw`` of :meth:`forward_features` to per-image ``"instances"`` (and ``"sem_seg"``
        probabilities) in the original frame (the lesion-model contract)."""
        processed = [{} for _ in batched_inputs]
        if "instances" in raw:
            processed = detections_in_frame(raw["instances"], batched_inputs, image_sizes)
        if "sem_seg" in raw:
            probs = semantic_outputs(
                raw["sem_seg"], batched_inputs, image_sizes, self.sem_seg_activation
            )
            for output, prob in zip(processed, probs):
                output["sem_seg"] = prob
        return processed

    def inference(
        self,
        batched_inputs: List[Dict[str, torch.Tensor]],
        detected_instances: Optional[List[Instances]] = None,
        do_postprocess: bool = True,
    ):
        """:meth:`GeneralizedRCNN.inference` through :meth:`forward_features` and
        :meth:`postprocess` (which honours ``fov_box``), with ``"sem_seg"`` beside
        ``"instances"`` when the model has a semantic head. ``do_postprocess=False`` returns the
        raw instances only, as Detectron2 does."""
        assert not self.training
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        if detected_instances is None:
            raw, _ = self.forward_features(
                batched_inputs, images, features, with_losses=False, with_predictions=True
            )
        else:
            detected_instances = [x.to(self.device) for x in detected_instances]
            raw = {"instances": self.roi_heads.forward_with_given_boxes(features,
                                                                        detected_instances)}
            if self.sem_seg_head is not None:
                raw["sem_seg"], _ = self.sem_seg_head(
                    features, None, tuple(images.tensor.shape[-2:])
                )
        if not do_postprocess:
            return raw["instances"]
        return self.postprocess(raw, batched_inputs, images.image_sizes)


def detections_in_frame(
    instances: List[Instances], batched_inputs: List[Dict[str, torch.Tensor]], image_sizes
) -> List[Dict[str, Instances]]:
    """Per image ``{"instances": ...}``: detections at the network input's pixels rescaled to the
    original ``("height", "width")`` (Detectron2's ``detector_postprocess``), or, when the mapper
    cropped the field of view, to the crop ``"fov_box"`` and then pasted into the frame."""
    processed = []
    for result, inputs, image_size in zip(instances, batched_inputs, image_sizes):
        height = inputs.get("height", image_size[0])
        width = inputs.get("width", image_size[1])
        fov_box = inputs.get("fov_box")
        if fov_box is None:
            processed.append({"instances": detector_postprocess(result, height, width)})
            continue
        x0, y0, x1, y1 = (int(round(v)) for v in fov_box)
        on_crop = detector_postprocess(result, y1 - y0, x1 - x0)
        processed.append({"instances": paste_into_frame(on_crop, fov_box, height, width)})
    return processed
