"""Each paper's own evaluation protocol, as evaluators any config can add
(``RETINA.EVAL.PROTOCOLS``) beside the toolkit's standard ones, and ``tools/evaluate.py
--protocol`` can run on saved predictions:

- ``per_image_map`` (the e-ophtha Mask R-CNN paper): Matterport's per-image mask AP at IoU
  0.35 / 0.5 / 0.75, averaged over the images with lesions; scores a detector's instances;
- ``argmax_dice`` (ResUNet): argmax class maps at 256 px, Dice / IoU per class without
  background, pixel accuracy;
- ``pr_operating_point`` (Red-Seg): pixel precision / recall per lesion at the break-even point
  (or a given threshold) beside pixel AUC-PR;
- ``component_ap`` (CBAM-DeepLab): AP@[.50:.95] of connected components, pixel AUC-PR and IoU
  at 512 px.

The last three score a semantic head's ``"sem_seg"`` maps. Each module's docstring says how its
paper's text was read where the paper is ambiguous.
"""
from .argmax import ARGMAX_DICE, ArgmaxDiceEvaluator, ArgmaxSegmentationMetrics
from .component_ap import COMPONENT_AP, ComponentAPEvaluator, ComponentAPMetrics
from .operating_point import PR_OPERATING_POINT, OperatingPointEvaluator, OperatingPointMetrics
from .per_image_map import PER_IMAGE_MAP, PerImageMAPEvaluator, format_per_image_map, per_image_map

__all__ = [
    "ARGMAX_DICE",
    "COMPONENT_AP",
    "INSTANCE_PROTOCOLS",
    "PER_IMAGE_MAP",
    "PROTOCOLS",
    "PR_OPERATING_POINT",
    "SEMANTIC_PROTOCOLS",
    "ArgmaxDiceEvaluator",
    "ArgmaxSegmentationMetrics",
    "ComponentAPEvaluator",
    "ComponentAPMetrics",
    "OperatingPointEvaluator",
    "OperatingPointMetrics",
    "PerImageMAPEvaluator",
    "build_protocol_evaluators",
    "check_protocols",
    "format_per_image_map",
    "per_image_map",
]

# Protocol name -> its evaluator; a detector's instances or a semantic head's maps.
INSTANCE_PROTOCOLS = {PER_IMAGE_MAP: PerImageMAPEvaluator}
SEMANTIC_PROTOCOLS = {
    ARGMAX_DICE: ArgmaxDiceEvaluator,
    PR_OPERATING_POINT: OperatingPointEvaluator,
    COMPONENT_AP: ComponentAPEvaluator,
}
PROTOCOLS = {**INSTANCE_PROTOCOLS, **SEMANTIC_PROTOCOLS}


def check_protocols(names, *, detector: bool, semantic: bool, where: str = "") -> None:
    """Raise ValueError, naming ``where`` (e.g. the config key), for an unknown protocol or one
    that scores an output the model does not have."""
    prefix = f"{where}: " if where else ""
    for name in names:
        if name not in PROTOCOLS:
            raise ValueError(f"{prefix}unknown protocol {name!r}; known: {sorted(PROTOCOLS)}")
        if name in INSTANCE_PROTOCOLS and not detector:
            raise ValueError(f"{prefix}protocol {name!r} scores lesion instances, which this "
                             "model does not predict")
        if name in SEMANTIC_PROTOCOLS and not semantic:
            raise ValueError(f"{prefix}protocol {name!r} scores semantic lesion maps, which "
                             "this model does not predict")


def build_protocol_evaluators(cfg, dataset_name: str, output_folder=None) -> list:
    """The evaluators of ``cfg.RETINA.EVAL.PROTOCOLS``, built from ``cfg``.

    Raises:
        ValueError: an unknown protocol, or one the model's outputs cannot feed.
    """
    from ...modeling.outputs import has_detector, has_semantic_head

    names = list(cfg.RETINA.EVAL.PROTOCOLS)
    check_protocols(
        names, detector=has_detector(cfg), semantic=has_semantic_head(cfg),
        where="RETINA.EVAL.PROTOCOLS",
    )
    return [PROTOCOLS[name](cfg, dataset_name, output_folder) for name in names]
