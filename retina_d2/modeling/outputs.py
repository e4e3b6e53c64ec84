"""What the model of a config outputs and what its training reads, asked of its meta-architecture.

Detectron2 switches a detector's parts with explicit keys (``MODEL.MASK_ON``,
``MODEL.KEYPOINT_ON``). retina_d2's meta-architectures combine parts more freely (a LesionRCNN
with a semantic head, a MultiTaskLesionNet whose lesion branch is any registered lesion model), so
each registered class answers for its own config:

* ``output_types(cfg)``: the per-image results its inference returns (:data:`INSTANCES`,
  :data:`SEM_SEG`, :data:`LESION_PRESENCE`, :data:`GRADES`, :data:`LANDMARKS`), which decide the
  evaluators that run and what the predictor writes;
* ``training_targets(cfg)``: the targets its training reads, which decide what the mapper loads
  (:data:`INSTANCES`, :data:`SEM_SEG`, :data:`LANDMARKS`; grades are record fields the mapper
  passes through).

The functions here look the class up in ``META_ARCH_REGISTRY`` by ``MODEL.META_ARCHITECTURE``, so
nothing else compares architecture names. Detectron2's own meta-architectures (GeneralizedRCNN, the
default config's, and the rest) declare nothing and are read as the detectors they are: instances
out, instances in.
"""
from typing import FrozenSet

from detectron2.modeling import META_ARCH_REGISTRY

from ..config import ConfigError

__all__ = [
    "GRADES",
    "INSTANCES",
    "LANDMARKS",
    "LESION_PRESENCE",
    "SEM_SEG",
    "has_detector",
    "has_grading",
    "has_localization",
    "has_semantic_head",
    "meta_architecture",
    "output_types",
    "trains_lesions",
    "training_targets",
]

# Lesion instances ("instances": Detectron2 Instances in the photograph's frame).
INSTANCES = "instances"
# Semantic lesion maps ("sem_seg": (C, height, width) probabilities).
SEM_SEG = "sem_seg"
# Image-level lesion presence ("lesion_presence": (C,) probabilities), MultiTaskLesionNet's.
LESION_PRESENCE = "lesion_presence"
# DR / macular-oedema grades ("dr_grade", "dme_grade": probabilities over the grades).
GRADES = "grades"
# Optic disc / fovea centres ("landmarks" {name: (x, y)}, "landmark_scores").
LANDMARKS = "landmarks"

# What a Detectron2 meta-architecture without the declarations returns and trains on.
_DETECTRON2_DETECTOR = frozenset({INSTANCES})


def meta_architecture(cfg, key: str = "MODEL.META_ARCHITECTURE", name: str = None) -> type:
    """The class registered in ``META_ARCH_REGISTRY`` as ``cfg.MODEL.META_ARCHITECTURE`` (or as
    ``name``, read from the config key ``key``).

    Raises:
        ConfigError: naming the key and the registered choices, when nothing is registered so.
    """
    name = cfg.MODEL.META_ARCHITECTURE if name is None else name
    if name not in META_ARCH_REGISTRY:
        raise ConfigError(
            f"{key} {name!r} is not a registered meta-architecture (registered: "
            f"{sorted(n for n, _ in META_ARCH_REGISTRY)}; import retina_d2 registers its own)"
        )
    return META_ARCH_REGISTRY.get(name)


def output_types(cfg) -> FrozenSet[str]:
    """What the model of ``cfg`` returns per image (module docstring)."""
    cls = meta_architecture(cfg)
    declared = getattr(cls, "output_types", None)
    return frozenset(declared(cfg)) if declared is not None else _DETECTRON2_DETECTOR


def training_targets(cfg) -> FrozenSet[str]:
    """The targets the training of the model of ``cfg`` reads (module docstring)."""
    cls = meta_architecture(cfg)
    declared = getattr(cls, "training_targets", None)
    return frozenset(declared(cfg)) if declared is not None else _DETECTRON2_DETECTOR


def has_detector(cfg) -> bool:
    """Whether the model of ``cfg`` predicts lesion instances."""
    return INSTANCES in output_types(cfg)


def has_semantic_head(cfg) -> bool:
    """Whether the model of ``cfg`` predicts semantic lesion maps."""
    return SEM_SEG in output_types(cfg)


def has_grading(cfg) -> bool:
    """Whether the model of ``cfg`` grades the image."""
    return GRADES in output_types(cfg)


def has_localization(cfg) -> bool:
    """Whether the model of ``cfg`` finds landmarks."""
    return LANDMARKS in output_types(cfg)


def trains_lesions(cfg) -> bool:
    """Whether the training of the model of ``cfg`` reads lesion targets (instances or maps): a
    frozen lesion branch reads none, so grading-only datasets can train the other tasks."""
    return bool(training_targets(cfg) & {INSTANCES, SEM_SEG})
