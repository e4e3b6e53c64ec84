"""The lesion-model contract: what a composite model asks of the lesion model it runs as a branch.

MultiTaskLesionNet runs a lesion model (``MODEL.MULTITASK.LESION_ARCHITECTURE``, any class in
``META_ARCH_REGISTRY`` that follows this contract) on a backbone it shares with its other tasks.
It never reaches into the branch's parts; it uses:

* ``branch.backbone``: the Detectron2 backbone the branch reads (the composite runs it once and
  shares its features);
* ``cls.output_types(cfg)`` / ``cls.training_targets(cfg)``: what the branch returns and what its
  training reads (:mod:`retina_d2.modeling.outputs`);
* ``branch.forward_features(batched_inputs, images, features, *, with_losses, with_predictions)
  -> (raw, losses)``: the branch's network after the backbone. ``images`` is the normalised,
  padded :class:`~detectron2.structures.ImageList` the features were computed from (padded to at
  least the branch backbone's divisibility). ``losses`` (with ``with_losses``, in training mode):
  the branch's weighted loss dict. ``raw``: ``"sem_seg"``, the lesion logits at the padded size
  ((N, C, H, W) sigmoid, (N, C + 1, H, W) softmax), whenever the branch has a semantic head;
  ``"instances"``, per image the detections in the network input's frame, with
  ``with_predictions`` (in eval mode);
* ``branch.postprocess(raw, batched_inputs, image_sizes) -> [dict]``: ``raw`` of
  ``forward_features`` to per-image results in the original frame (``"instances"``,
  ``"sem_seg"`` probabilities), honouring the mapper's ``"height"``, ``"width"`` and
  ``"fov_box"``.

LesionRCNN and SemanticLesionNet run their own ``forward`` through the same two calls, so a branch
computes exactly what the model does alone.
"""
from typing import List

from detectron2.modeling import META_ARCH_REGISTRY

__all__ = ["LESION_BRANCH_CALLS", "is_lesion_branch", "lesion_branch_choices"]

# The class members the contract names (``backbone`` is an attribute of the built model).
LESION_BRANCH_CALLS = ("output_types", "training_targets", "forward_features", "postprocess")


def is_lesion_branch(cls: type) -> bool:
    """Whether ``cls`` has every call of the contract."""
    return all(callable(getattr(cls, name, None)) for name in LESION_BRANCH_CALLS)


def lesion_branch_choices() -> List[str]:
    """The registered meta-architectures that can be a lesion branch, sorted."""
    return sorted(name for name, cls in META_ARCH_REGISTRY if is_lesion_branch(cls))
