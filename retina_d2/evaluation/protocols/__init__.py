"""Each paper's own evaluation protocol, as evaluators any config can add
(``RETINA.EVAL.PROTOCOLS``) and ``tools/evaluate.py --protocol`` can run."""
from .per_image_map import PER_IMAGE_MAP, PerImageMAPEvaluator, format_per_image_map, per_image_map

__all__ = ["PER_IMAGE_MAP", "PerImageMAPEvaluator", "format_per_image_map", "per_image_map"]
