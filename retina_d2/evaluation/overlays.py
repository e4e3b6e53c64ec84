"""An evaluator that writes overlay pictures (ground truth | predictions) of the first images."""
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from PIL import Image

from ..data.image_io import read_image
from ..visualize import draw_ground_truth_overlay, draw_prediction_overlay, side_by_side

__all__ = ["OverlayEvaluator"]


class OverlayEvaluator(DatasetEvaluator):
    """Saves ``overlays/<image>.png`` for the first ``num_images`` images: ground truth on the left,
    predictions scoring at least ``score_threshold`` on the right."""

    def __init__(self, dataset_name: str, output_dir: str, num_images: int = 8, score_threshold: float = 0.35):
        self._dataset_name = dataset_name
        self._metadata = MetadataCatalog.get(dataset_name)
        self._output_dir = os.path.join(output_dir, "overlays")
        self._num_images = num_images
        self._score_threshold = score_threshold
        self._gt = None

    @classmethod
    def from_config(cls, cfg, dataset_name, output_dir):
        return cls(
            dataset_name,
            output_dir,
            num_images=cfg.RETINA.EVAL.NUM_OVERLAYS,
            score_threshold=cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
        )

    def reset(self):
        self._written = 0

    def process(self, inputs, outputs):
        if not comm.is_main_process():
            return
        for inp, out in zip(inputs, outputs):
            if self._written >= self._num_images or "instances" not in out:
                return
            if self._gt is None:
                self._gt = {d["file_name"]: d for d in DatasetCatalog.get(self._dataset_name)}
            image = read_image(inp["file_name"], format="RGB")
            gt = draw_ground_truth_overlay(image, self._gt.get(inp["file_name"], {}), self._metadata)
            pred = draw_prediction_overlay(image, out["instances"], self._metadata, self._score_threshold)
            os.makedirs(self._output_dir, exist_ok=True)
            name = os.path.splitext(os.path.basename(inp["file_name"]))[0]
            Image.fromarray(side_by_side(gt, pred)).save(os.path.join(self._output_dir, f"{name}.png"))
            self._written += 1

    def evaluate(self):
        return {}
