"""The one place that turns a trained model into the model evaluation and prediction run.

Evaluation (``LesionTrainer.test``), ``tools/predict.py``, the Python API
(:class:`retina_d2.LesionPredictor`) and export's check against the eager model all call
:func:`build_inference_model`, so a step added here applies to every one of them alike. It lives in
the modeling package, not the trainer, so that prediction imports no training or evaluation code.

The steps, innermost first, each a module with the model's own inputs and outputs:

1. :class:`~retina_d2.modeling.amp.AutocastInference` (``RETINA.INFERENCE.AMP``): the network
   under autocast, its outputs back in float32;
2. :class:`~retina_d2.modeling.tiling.TiledInference` (``RETINA.TILE.ENABLED``): the image tile by
   tile at native resolution, the tiles' outputs assembled;
3. :class:`~retina_d2.modeling.tta.TestTimeAugmentation` (``TEST.AUG.ENABLED``): mirrored and
   turned views, merged;
4. :class:`LesionMerging` (``MODEL.LESION_MERGE.ENABLED``, for a model that predicts instances):
   touching confident lesions of a class joined into one, once, on the whole photograph's final
   instances. The model itself never merges, so no step has to switch a merge off: merged per tile
   or per view, the halves of a plaque cut by a seam would meet only through the tiles' IoU, and
   pieces would be compared across views as wholes of different shapes.
"""
from typing import List, Mapping, Optional

from detectron2.config import configurable
from torch import nn

from .amp import AutocastInference
from .outputs import has_detector
from .postprocess import merge_connected_lesions
from .tiling import TiledInference
from .tta import TestTimeAugmentation

__all__ = ["LesionMerging", "build_inference_model", "build_lesion_merging"]


class LesionMerging(nn.Module):
    """The last inference step: ``MODEL.LESION_MERGE`` on the ``"instances"`` each image's output
    holds (:func:`~retina_d2.modeling.postprocess.merge_connected_lesions`); every other output
    passes as it is."""

    @configurable
    def __init__(self, model: Optional[nn.Module], *, score_threshold: float,
                 connectivity: int = 8):
        """
        Args:
            model: the model (or inner steps) whose outputs are merged; None for a step used only
                through :meth:`merge_outputs` (an exported network's postprocessing).
            score_threshold: predictions of a class scoring at least this whose masks touch
                become one lesion.
            connectivity: 8 or 4, how masks touch.
        """
        super().__init__()
        if connectivity not in (4, 8):
            raise ValueError(f"MODEL.LESION_MERGE.CONNECTIVITY must be 4 or 8, got {connectivity}")
        self.model = model
        self.score_threshold = float(score_threshold)
        self.connectivity = int(connectivity)

    @classmethod
    def from_config(cls, cfg, model: Optional[nn.Module]):
        merge = cfg.MODEL.LESION_MERGE
        return {"model": model, "score_threshold": merge.SCORE_THRESH,
                "connectivity": merge.CONNECTIVITY}

    def merge_outputs(self, outputs: List[dict]) -> List[dict]:
        """Per-image output dicts with their ``"instances"`` merged (new dicts)."""
        merged = []
        for output in outputs:
            output = dict(output)
            if "instances" in output:
                output["instances"] = merge_connected_lesions(
                    output["instances"], self.score_threshold, self.connectivity
                )
            merged.append(output)
        return merged

    def forward(self, batched_inputs: List[dict]):
        outputs = self.model(batched_inputs)
        # A loss dict: the wrapped model trains (the steps inside pass training through).
        if isinstance(outputs, Mapping):
            return outputs
        return self.merge_outputs(outputs)


def build_lesion_merging(cfg, model: Optional[nn.Module]) -> Optional[LesionMerging]:
    """:class:`LesionMerging` around ``model`` when ``MODEL.LESION_MERGE.ENABLED`` and the model
    of ``cfg`` predicts instances; None otherwise (a semantic model has none to merge)."""
    if not (cfg.MODEL.LESION_MERGE.ENABLED and has_detector(cfg)):
        return None
    return LesionMerging(cfg, model)


def build_inference_model(cfg, model: nn.Module) -> nn.Module:
    """The model that evaluation and prediction run: ``model`` itself, under autocast with
    RETINA.INFERENCE.AMP (:class:`AutocastInference`), run tile by tile at native resolution
    with RETINA.TILE.ENABLED (:class:`TiledInference`), on mirrored / turned views with
    TEST.AUG.ENABLED (:class:`TestTimeAugmentation`), and its instances merged with
    MODEL.LESION_MERGE (:class:`LesionMerging`). Autocast sits inside the tiling, so tiles are
    merged from float32 outputs; the augmentation wraps the tiling, so each view is one whole
    tiled image; lesion merging runs last, once, on the merged views (module docstring).

    A step is a new module in training mode, in which it runs the wrapped model as it is: call
    ``.eval()`` on the result to predict.
    """
    if cfg.RETINA.INFERENCE.AMP:
        model = AutocastInference(cfg, model)
    if cfg.RETINA.TILE.ENABLED:
        model = TiledInference(cfg, model)
    if cfg.TEST.AUG.ENABLED:
        model = TestTimeAugmentation(cfg, model)
    merging = build_lesion_merging(cfg, model)
    return merging if merging is not None else model
