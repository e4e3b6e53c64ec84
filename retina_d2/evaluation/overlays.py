"""An evaluator that writes overlay pictures (ground truth | prediction) of the first images,
and a full-resolution crop of each one's densest region."""
import os

from detectron2.config import configurable
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from PIL import Image

from ..data.converters.base import atomic_write
from ..data.image_io import read_image
from ..schema import OVERLAYS_DIR
from ..visualize import (
    crop_marks,
    densest_region,
    draw_marks,
    ground_truth_marks,
    line_width,
    overlay_names,
    prediction_marks,
    ring_radius,
    side_by_side,
)

__all__ = ["OverlayEvaluator", "CROP_SIZE", "write_overlay"]

CROP_SIZE = 512  # pixels of the photograph, shown 1:1: a 2-pixel lesion is 2 screen pixels


def write_overlay(image, gt_marks, pred_marks, class_order, out_path, crop_path,
                  *, show_scores: bool = False, crop_size: int = CROP_SIZE) -> tuple:
    """Save ``out_path`` (ground truth | prediction, titled, each with a legend band of its
    lesion types below it) and ``crop_path`` (the same panels cut to the ``crop_size`` window with the most
    lesions, at full resolution). Returns the crop's box (x0, y0, x1, y1)."""
    height, width = image.shape[:2]
    options = dict(show_scores=show_scores, class_order=class_order,
                   line=line_width(height, width), ring=ring_radius(height, width))
    gt = draw_marks(image, gt_marks, **options)
    pred = draw_marks(image, pred_marks, **options)
    _save(side_by_side(gt, pred, titles=("ground truth", "prediction")), out_path)
    box = densest_region((gt_marks, pred_marks), height, width, crop_size)
    x0, y0, x1, y1 = box
    crop = image[y0:y1, x0:x1]
    # The full picture's line width and rings: the crop shows the same outlines, only larger.
    panels = [
        draw_marks(crop, crop_marks(marks, box), **options)
        for marks in (gt_marks, pred_marks)
    ]
    where = f"x {x0}-{x1}, y {y0}-{y1}"
    _save(side_by_side(*panels, titles=(f"ground truth, 1:1 at {where}", "prediction")),
          crop_path)
    return box


def _save(picture, path) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_write(path, "wb") as f:
        Image.fromarray(picture).save(f, format="PNG")


class OverlayEvaluator(DatasetEvaluator):
    """Saves ``overlays/<image>.png`` for the first ``num_images`` images: ground truth on the left,
    predictions scoring at least ``score_threshold`` on the right, lesions outlined in their
    type's colour with a legend; and ``overlays/crops/<image>.png``, the region with the most
    lesions at full resolution. Images sharing a stem (``eye.jpg``, ``eye.png``) are named as
    ``tools/predict.py`` names them (:func:`~retina_d2.visualize.overlay_names`), so none
    replaces another."""

    @configurable
    def __init__(self, dataset_name: str, output_dir: str, num_images: int = 8,
                 score_threshold: float = 0.35, show_scores: bool = False):
        self._dataset_name = dataset_name
        self._metadata = MetadataCatalog.get(dataset_name)
        self._output_dir = os.path.join(output_dir, OVERLAYS_DIR)
        self._num_images = num_images
        self._score_threshold = score_threshold
        self._show_scores = show_scores
        self._gt = None
        self._names = None

    @classmethod
    def from_config(cls, cfg, dataset_name, output_dir):
        """The arguments of ``RETINA.EVAL.NUM_OVERLAYS`` pictures showing the predictions the
        model keeps (``MODEL.ROI_HEADS.SCORE_THRESH_TEST``)."""
        return {
            "dataset_name": dataset_name,
            "output_dir": output_dir,
            "num_images": cfg.RETINA.EVAL.NUM_OVERLAYS,
            "score_threshold": cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
            "show_scores": cfg.RETINA.EVAL.OVERLAY_SCORES,
        }

    def reset(self):
        self._written = 0

    def _load_dataset(self):
        dicts = DatasetCatalog.get(self._dataset_name)
        self._gt = {d["file_name"]: d for d in dicts}
        # Named over the whole dataset: eye.jpg and eye.png both get their own file.
        self._names = overlay_names([d["file_name"] for d in dicts])

    def process(self, inputs, outputs):
        if not comm.is_main_process():
            return
        for inp, out in zip(inputs, outputs):
            if self._written >= self._num_images or "instances" not in out:
                return
            if self._gt is None:
                self._load_dataset()
            file_name = inp["file_name"]
            image = read_image(file_name, format="RGB")
            classes = list(self._metadata.get("thing_classes", []))
            gt = ground_truth_marks(self._gt.get(file_name, {}), self._metadata, *image.shape[:2])
            pred = prediction_marks(out["instances"], self._metadata, self._score_threshold)
            name = self._names.get(file_name) or overlay_names([file_name])[file_name]
            write_overlay(
                image, gt, pred, classes,
                os.path.join(self._output_dir, name),
                os.path.join(self._output_dir, "crops", name),
                show_scores=self._show_scores,
            )
            self._written += 1

    def evaluate(self):
        return {}
