from .lesion_rcnn import LesionRCNN  # noqa: F401  (registers it)
