"""LesionPredictor: one image in, lesion instances in the image's own pixel frame out."""
import torch
from detectron2.modeling import build_model

from ..data.mapper import LesionDatasetMapper
from ..modeling import LesionCheckpointer

__all__ = ["LesionPredictor"]


class LesionPredictor:
    """Like Detectron2's DefaultPredictor, but with retina_d2's test-time preprocessing (FOV
    crop, resize, Graham/CLAHE) from the same mapper the evaluator uses, so a prediction here
    equals the one made during evaluation."""

    def __init__(self, cfg):
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg)
        self.model.eval()
        if cfg.MODEL.WEIGHTS:
            LesionCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        self.mapper = LesionDatasetMapper(self.cfg, is_train=False)

    def __call__(self, file_name: str):
        """Predict on an image file.

        Returns:
            dict with "instances" (Instances on the original image) and the mapped input's
            "height" and "width".
        """
        inputs = self.mapper({"file_name": str(file_name)})
        with torch.no_grad():
            outputs = self.model([inputs])[0]
        outputs["height"], outputs["width"] = inputs["height"], inputs["width"]
        return outputs
