"""retina_d2: diabetic-retinopathy lesion detection and segmentation on Detectron2.

``import retina_d2`` is enough to build any of its configs: it bridges Detectron2 0.6 to today's
NumPy / Pillow first, then registers every backbone, meta-architecture and semantic head, as
Detectron2's projects register theirs on import.
"""
from . import compat

# Before anything else touches Detectron2: its 0.6 sources need today's NumPy/Pillow bridged.
compat.apply()

from . import modeling as _modeling  # noqa: E402,F401  (registration only)

__version__ = "0.1.0"
