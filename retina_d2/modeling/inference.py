"""The one place that turns a trained model into the model evaluation and prediction run.

Evaluation (``LesionTrainer.test``), ``tools/predict.py`` and the Python API
(:class:`retina_d2.LesionPredictor`) all call :func:`build_inference_model`, so a wrapper added
here (autocast, tiling, test-time augmentation) applies to every one of them alike. It lives in
the modeling package, not the trainer, so that prediction imports no training or evaluation code.
"""
from torch import nn

from .amp import AutocastInference
from .tiling import TiledInference
from .tta import TestTimeAugmentation

__all__ = ["build_inference_model"]


def build_inference_model(cfg, model: nn.Module) -> nn.Module:
    """The model that evaluation and prediction run: ``model`` itself, under autocast with
    RETINA.INFERENCE.AMP (:class:`AutocastInference`), run tile by tile at native resolution
    with RETINA.TILE.ENABLED (:class:`TiledInference`), and on mirrored / turned views with
    TEST.AUG.ENABLED (:class:`TestTimeAugmentation`). Autocast sits inside the tiling, so tiles
    are merged from float32 outputs; the augmentation wraps the tiling, so each view is one whole
    tiled image and lesion merging runs once, on the merged views.

    A wrapper is a new module in training mode, in which it runs the wrapped model as it is:
    call ``.eval()`` on the result to predict.
    """
    if cfg.RETINA.INFERENCE.AMP:
        model = AutocastInference(cfg, model)
    if cfg.RETINA.TILE.ENABLED:
        model = TiledInference(cfg, model)
    if cfg.TEST.AUG.ENABLED:
        model = TestTimeAugmentation(cfg, model)
    return model
