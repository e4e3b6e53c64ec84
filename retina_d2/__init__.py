"""retina_d2: diabetic-retinopathy lesion detection and segmentation on Detectron2.

``import retina_d2`` is enough to build any of its configs: it bridges Detectron2 0.6 to today's
NumPy / Pillow first, then registers every backbone, meta-architecture and semantic head, as
Detectron2's projects register theirs on import.

The Python API: ``retina_d2.load_model("model_final.pth")`` (or ``retina_d2.LesionPredictor``)
predicts on an image file, a NumPy array or a PIL image (retina_d2/predictor.py).
"""
# Stored in every checkpoint a training run writes (retina_d2/modeling/model_file.py).
__version__ = "0.1.0"

from . import compat  # noqa: E402

# Before anything else touches Detectron2: its 0.6 sources need today's NumPy/Pillow bridged.
compat.apply()

from . import modeling as _modeling  # noqa: E402,F401  (registration only)

# Imported on first use (PEP 562): the predictor imports the data and modeling packages, which
# import this package first; an import here would be a cycle.
_LAZY = {"LesionPredictor": "predictor", "load_model": "predictor"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
