from .lesion_rcnn import LesionRCNN  # noqa: F401  (registers it)
from .semantic_net import SemanticLesionNet  # noqa: F401  (registers it)
from .multitask import MultiTaskLesionNet  # noqa: F401  (registers it)
from .candidate_net import BrightCandidateNet  # noqa: F401  (registers it)
