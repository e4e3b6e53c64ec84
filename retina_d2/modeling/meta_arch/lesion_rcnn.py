"""LesionRCNN: Mask R-CNN that maps predictions back through the field-of-view crop.

The test-time mapper may crop an image to its field of view (FOV) before resizing; it records the
crop as ``fov_box`` (original pixels). Detectron2's postprocessing only rescales, so here results
are first rescaled to the crop, then shifted and pasted into the original frame. The semantic and
grading issues extend this class with extra heads.
"""
from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

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
    """:class:`GeneralizedRCNN` whose outputs honour the mapper's ``fov_box``."""

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
