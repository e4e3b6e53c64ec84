"""LesionPredictor's former home; it lives in retina_d2/predictor.py (``from retina_d2 import
LesionPredictor``), which imports no training or evaluation code."""
from ..predictor import LesionPredictor, load_model  # noqa: F401

__all__ = ["LesionPredictor", "load_model"]
