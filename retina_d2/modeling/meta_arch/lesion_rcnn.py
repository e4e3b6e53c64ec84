"""LesionRCNN: Mask R-CNN that maps predictions back through the field-of-view crop.

The test-time mapper may crop an image to its field of view (FOV) before resizing; it records the
crop as ``fov_box`` (original pixels). Detectron2's postprocessing only rescales, so here results
are first rescaled to the crop, then shifted and pasted into the original frame.

With ``MODEL.LESION_SEG.ENABLED`` a semantic lesion head (``MODEL.SEM_SEG_HEAD.NAME``, the contract
of :mod:`retina_d2.modeling.meta_arch.semantic_net`) runs on the FPN features beside Mask R-CNN:
its losses, times ``MODEL.LESION_SEG.LOSS_WEIGHT``, join the detector's in training, and inference
returns ``"sem_seg"`` (C, height, width) probabilities beside ``"instances"``.
"""
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, build_sem_seg_head
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage
from torch import nn

from ..postprocess import merge_connected_lesions
from .semantic_net import batch_semantic_targets, check_activation, semantic_outputs

__all__ = ["LesionRCNN", "paste_into_frame"]


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
        merge_score_threshold: Optional[float] = None,
        merge_connectivity: int = 8,
        **kwargs,
    ):
        """
        Args:
            sem_seg_head: a semantic lesion head on the backbone's features, or None.
            sem_seg_loss_weight: factor of the semantic head's losses.
            sem_seg_activation: "sigmoid" or "softmax" (the head's output layout).
            merge_score_threshold: with a value, predictions of a class scoring at least this
                whose masks touch are returned as one lesion (:func:`merge_connected_lesions`);
                None returns Detectron2's instances as they are.
            merge_connectivity: 8 or 4, how masks touch.
            kwargs: :class:`GeneralizedRCNN`'s arguments.
        """
        super().__init__(**kwargs)
        check_activation(sem_seg_activation, "sem_seg_activation")
        self.sem_seg_head = sem_seg_head
        self.sem_seg_loss_weight = sem_seg_loss_weight
        self.sem_seg_activation = sem_seg_activation
        self.merge_score_threshold = merge_score_threshold
        self.merge_connectivity = merge_connectivity

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        if cfg.MODEL.LESION_SEG.ENABLED:
            ret["sem_seg_head"] = build_sem_seg_head(cfg, ret["backbone"].output_shape())
            ret["sem_seg_loss_weight"] = cfg.MODEL.LESION_SEG.LOSS_WEIGHT
            ret["sem_seg_activation"] = cfg.MODEL.LESION_SEG.ACTIVATION
        if cfg.MODEL.LESION_MERGE.ENABLED:
            ret["merge_score_threshold"] = cfg.MODEL.LESION_MERGE.SCORE_THRESH
            ret["merge_connectivity"] = cfg.MODEL.LESION_MERGE.CONNECTIVITY
        return ret

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """:meth:`GeneralizedRCNN.forward`; with a semantic head, training inputs also need
        "sem_seg" (uint8 (C, H, W), 255 = ignore) and its weighted losses are added."""
        if not self.training:
            return self.inference(batched_inputs)
        if self.sem_seg_head is None:
            return super().forward(batched_inputs)
        # GeneralizedRCNN.forward with the semantic head on the same features (one backbone pass).
        images = self.preprocess_image(batched_inputs)
        if "instances" in batched_inputs[0]:
            gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        else:
            gt_instances = None
        features = self.backbone(images.tensor)
        if self.proposal_generator is not None:
            proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        else:
            proposals = [x["proposals"].to(self.device) for x in batched_inputs]
            proposal_losses = {}
        _, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
        if self.vis_period > 0 and get_event_storage().iter % self.vis_period == 0:
            self.visualize_training(batched_inputs, proposals)
        targets = batch_semantic_targets(
            batched_inputs, self.device, self.backbone.size_divisibility
        )
        _, sem_seg_losses = self.sem_seg_head(features, targets, tuple(images.tensor.shape[-2:]))
        losses = {}
        losses.update(detector_losses)
        losses.update(proposal_losses)
        losses.update({k: v * self.sem_seg_loss_weight for k, v in sem_seg_losses.items()})
        return losses

    def inference(
        self,
        batched_inputs: List[Dict[str, torch.Tensor]],
        detected_instances: Optional[List[Instances]] = None,
        do_postprocess: bool = True,
    ):
        """:meth:`GeneralizedRCNN.inference`, postprocessed through :meth:`_postprocess` (which
        honours ``fov_box``; Detectron2 calls its own by class name), with ``"sem_seg"`` beside
        ``"instances"`` when the model has a semantic head. ``do_postprocess=False`` returns the
        raw instances only, as Detectron2 does."""
        assert not self.training
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        if detected_instances is None:
            if self.proposal_generator is not None:
                proposals, _ = self.proposal_generator(images, features, None)
            else:
                proposals = [x["proposals"].to(self.device) for x in batched_inputs]
            results, _ = self.roi_heads(images, features, proposals, None)
        else:
            detected_instances = [x.to(self.device) for x in detected_instances]
            results = self.roi_heads.forward_with_given_boxes(features, detected_instances)
        if not do_postprocess:
            return results
        processed = self._postprocess(results, batched_inputs, images.image_sizes)
        if self.merge_score_threshold is not None:
            for output in processed:
                output["instances"] = merge_connected_lesions(
                    output["instances"], self.merge_score_threshold, self.merge_connectivity
                )
        if self.sem_seg_head is not None:
            logits, _ = self.sem_seg_head(features, None, tuple(images.tensor.shape[-2:]))
            probs = semantic_outputs(
                logits, batched_inputs, images.image_sizes, self.sem_seg_activation
            )
            for output, prob in zip(processed, probs):
                output["sem_seg"] = prob
        return processed

    @staticmethod
    def _postprocess(instances, batched_inputs: List[Dict[str, torch.Tensor]], image_sizes):
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
