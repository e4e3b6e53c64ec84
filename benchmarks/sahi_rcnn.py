"""
SAHI (Slicing Aided Hyper Inference, PyPI ``sahi``) around this toolkit's detectors: the tiling
benchmark's row for what users of sliced inference already use.

SAHI's Detectron2 adapter (``sahi.models.detectron2.Detectron2DetectionModel``) builds its model
itself, from a model-zoo name or an upstream Detectron2 config file, through Detectron2's
``DefaultPredictor``: it cannot read this toolkit's configs (``RETINA`` keys, LesionRCNN) nor its
mapper's preprocessing. :class:`LesionSahiModel` is that adapter given our built model (weights
loaded) through SAHI's own ``set_model`` hook; everything else is SAHI's: the slicing of the
image, the adapter's inference and conversion of each slice's instances (masks to polygons), the
shift into the image and the merging of predictions across slices.

The image SAHI slices is the mapper's network input (after the test-time FOV crop, Graham
normalisation and resize), as :class:`~retina_d2.modeling.tiling.TiledInference` tiles it, so
both see the same pixels; SAHI's merged predictions are moved to the photograph's frame by the
same :func:`~retina_d2.modeling.tiling.instances_in_frame`.
"""
from typing import Dict, List, Optional

import numpy as np
import torch
from detectron2.structures import Boxes, Instances
from sahi.models.detectron2 import Detectron2DetectionModel
from sahi.predict import get_sliced_prediction

from retina_d2.modeling.tiling import instances_in_frame

__all__ = ["LesionSahiModel", "SlicePredictor", "sahi_settings", "sliced_instances"]

# SAHI's documented defaults for merging predictions across slices (get_sliced_prediction):
# greedy non-maximum merging of predictions whose intersection over the smaller one is >= 0.5.
# SAHI switches to NMS / IoU when the model's confidence threshold is under 0.1 (ours is 0.05:
# Detectron2's, for AP); forcing the documented merge keeps SAHI's seam handling in the row.
POSTPROCESS = {"postprocess_type": "GREEDYNMM", "postprocess_match_metric": "IOS",
               "postprocess_match_threshold": 0.5, "force_postprocess_type": True}


class SlicePredictor:
    """Detectron2's ``DefaultPredictor`` contract, which SAHI's adapter calls: an ``H x W x 3``
    uint8 array in ``input_format`` in, the model's output dict at the array's pixels out. The
    slice is the network's input as it is (no resize: it is already at the network's scale)."""

    def __init__(self, model: torch.nn.Module, input_format: str):
        self.model = model
        self.input_format = input_format

    def __call__(self, image: np.ndarray) -> dict:
        height, width = image.shape[:2]
        tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        with torch.no_grad():
            return self.model([{"image": tensor, "height": height, "width": width}])[0]


class LesionSahiModel(Detectron2DetectionModel):
    """SAHI's Detectron2 adapter around a model built by this toolkit (see the module
    docstring). Give ``model`` (a :class:`SlicePredictor`) and ``category_mapping``."""

    def load_model(self) -> None:
        raise NotImplementedError(
            "LesionSahiModel takes a built model (model=SlicePredictor(...)); SAHI's own loader "
            "reads upstream Detectron2 configs, not retina_d2's"
        )

    def set_model(self, model, **kwargs) -> None:
        if self.category_mapping is None:
            raise ValueError("LesionSahiModel needs category_mapping (class id -> name)")
        self.model = model
        self.category_names = list(self.category_mapping.values())


def sahi_settings(tile: int, overlap: int) -> Dict[str, object]:
    """The keyword arguments of SAHI's ``get_sliced_prediction`` the benchmark uses: slices of
    ``tile`` pixels sharing ``overlap`` with their neighbours, as RETINA.TILE's, no extra
    whole-image pass (``perform_standard_pred``: the row compares slicing, not slicing plus a
    whole-image run), and :data:`POSTPROCESS`."""
    return {"slice_height": tile, "slice_width": tile,
            "overlap_height_ratio": overlap / tile, "overlap_width_ratio": overlap / tile,
            "perform_standard_pred": False, **POSTPROCESS}


def _prediction_region(prediction, height: int, width: int):
    """(region, cropped bool mask or None) of one SAHI prediction in the sliced image."""
    x0, y0, x1, y1 = prediction.bbox.to_xyxy()
    region = [int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)), int(np.ceil(y1))]
    if prediction.mask is None:
        return tuple(region), None
    full = prediction.mask.bool_mask  # SAHI renders its polygons at the sliced image's size
    rows, cols = np.nonzero(full.any(axis=1))[0], np.nonzero(full.any(axis=0))[0]
    if len(rows):  # grow to the mask's own extent, as TiledInference does for its pieces
        region = [min(region[0], cols[0]), min(region[1], rows[0]),
                  max(region[2], cols[-1] + 1), max(region[3], rows[-1] + 1)]
    rx0, ry0 = min(max(region[0], 0), width), min(max(region[1], 0), height)
    rx1, ry1 = min(max(region[2], rx0), width), min(max(region[3], ry0), height)
    return (rx0, ry0, rx1, ry1), torch.from_numpy(full[ry0:ry1, rx0:rx1].copy())


def sliced_instances(detection_model: LesionSahiModel, inputs: dict, tile: int, overlap: int,
                     max_detections: Optional[int], mask_on: bool = True) -> Instances:
    """SAHI's sliced prediction of one image, as the toolkit's models return it.

    Args:
        detection_model: the adapter around the model.
        inputs: the mapper's dict (``"image"`` C x H x W in the model's input format, and the
            original frame's ``"height"``, ``"width"``, ``"fov_box"``).
        tile, overlap: slice side and the pixels neighbouring slices share.
        max_detections: keep the highest-scoring this many merged predictions (the untiled
            model's ``TEST.DETECTIONS_PER_IMAGE``); None or 0: all.
        mask_on: the model predicts masks (``MODEL.MASK_ON``).

    Returns:
        Instances in the original frame with full-frame ``pred_masks`` when the model has masks.
    """
    image = inputs["image"].permute(1, 2, 0).numpy()
    if detection_model.model.input_format == "BGR":
        image = image[:, :, ::-1]  # SAHI hands slices over as RGB and flips them back for BGR
    height, width = image.shape[:2]
    result = get_sliced_prediction(np.ascontiguousarray(image), detection_model, verbose=0,
                                   **sahi_settings(tile, overlap))
    predictions = sorted(result.object_prediction_list, key=lambda p: -p.score.value)
    if max_detections:
        predictions = predictions[:max_detections]
    regions: List[tuple] = []
    masks: List[torch.Tensor] = []
    for prediction in predictions:
        region, mask = _prediction_region(prediction, height, width)
        regions.append(region)
        masks.append(mask)
    instances = Instances(
        (height, width),
        pred_boxes=Boxes(torch.tensor([p.bbox.to_xyxy() for p in predictions],
                                      dtype=torch.float32).reshape(-1, 4)),
        scores=torch.tensor([p.score.value for p in predictions], dtype=torch.float32),
        pred_classes=torch.tensor([p.category.id for p in predictions], dtype=torch.int64),
    )
    return instances_in_frame(instances, regions, masks if mask_on else None, inputs)
