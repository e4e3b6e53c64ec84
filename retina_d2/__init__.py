"""retina_d2: diabetic-retinopathy lesion detection and segmentation on Detectron2."""
from . import compat

# Before anything else touches Detectron2: its 0.6 sources need today's NumPy/Pillow bridged.
compat.apply()

__version__ = "0.1.0"
