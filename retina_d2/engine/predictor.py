"""LesionPredictor: one image in, lesion instances in the image's own pixel frame out."""
import torch
from detectron2.modeling import build_model

from ..data.mapper import LesionDatasetMapper
from ..modeling import LesionCheckpointer
from .trainer import LesionTrainer

__all__ = ["LesionPredictor"]


class LesionPredictor:
    """Like Detectron2's DefaultPredictor, but with retina_d2's test-time preprocessing (FOV
    crop, resize, Graham/CLAHE) from the same mapper the evaluator uses, so a prediction here
    equals the one made during evaluation: the model runs through the trainer's
    :meth:`LesionTrainer.build_inference_model`, so RETINA.TILE.ENABLED tiles here too."""

    def __init__(self, cfg):
        self.cfg = cfg.clone()
        model = build_model(self.cfg)
        if cfg.MODEL.WEIGHTS:
            # Into the bare model: a wrapper would prefix the checkpoint's keys. Every parameter
            # must come from the file unless MODEL.ALLOW_PARTIAL_WEIGHTS.
            LesionCheckpointer.for_inference(cfg, model).load(cfg.MODEL.WEIGHTS)
        # A wrapper is a new module in training mode, in which it runs the model untiled.
        self.model = LesionTrainer.build_inference_model(self.cfg, model).eval()
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
