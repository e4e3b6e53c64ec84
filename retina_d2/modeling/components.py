"""Lesions from a semantic model's probability maps: one lesion per connected component.

The converters make one ground-truth lesion of each connected component of a lesion mask; a
semantic model's map is turned into lesions the same way (``RETINA.COMPONENTS``): the pixels at
or above ``MASK_THRESHOLD`` form the masks, each 8-connected component is a lesion, scored by its
peak probability. :func:`semantic_probabilities` runs a semantic model on one mapped input,
optionally averaged over a horizontal flip (test-time augmentation), in the photograph's frame.

A full-size mask per lesion would cost gigabytes on an eye with hundreds of exudates at native
resolution, so lesions are returned as a label map per lesion type and a list of components, and
:func:`components_to_coco` encodes each as a COCO RLE result one at a time.
"""
from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import torch
from scipy import ndimage

__all__ = [
    "LesionComponent",
    "components_to_coco",
    "lesion_components",
    "semantic_probabilities",
]


class LesionComponent(NamedTuple):
    """One lesion: its type (channel), its label in that channel's label map, its box
    ``[x0, y0, x1, y1]`` (pixels, exclusive ends), its score and its area in pixels."""

    channel: int
    label: int
    box: List[int]
    score: float
    area: int


def lesion_components(
    probs: torch.Tensor, mask_threshold: float, min_area: int = 1,
    channels: Optional[Sequence[int]] = None,
) -> tuple:
    """The connected components of each lesion map.

    Args:
        probs: (C, H, W) probabilities in [0, 1].
        mask_threshold: pixels at or above it belong to lesions.
        min_area: components of fewer pixels are dropped.
        channels: the channels to read (default: all).

    Returns:
        ``(label_maps, lesions)``: ``{channel: int32 (H, W) label map}`` (0 = no lesion) and the
        :class:`LesionComponent` list, highest score first.
    """
    if probs.dim() != 3:
        raise ValueError(f"probs must be (C, H, W), got shape {tuple(probs.shape)}")
    if not 0.0 < mask_threshold <= 1.0:
        raise ValueError(f"mask_threshold must lie in (0, 1], got {mask_threshold}")
    structure = np.ones((3, 3), bool)  # 8-connectivity, as the converters' default
    label_maps: Dict[int, np.ndarray] = {}
    lesions: List[LesionComponent] = []
    for channel in range(probs.shape[0]) if channels is None else channels:
        prob = probs[channel].float().cpu().numpy()
        labels, count = ndimage.label(prob >= mask_threshold, structure)
        label_maps[channel] = labels
        if count == 0:
            continue
        index = np.arange(1, count + 1)
        peaks = ndimage.maximum(prob, labels, index)
        areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        for label, window in enumerate(ndimage.find_objects(labels), start=1):
            area = int(areas[label - 1])
            if window is None or area < min_area:
                continue
            rows, cols = window
            lesions.append(LesionComponent(
                channel, label, [cols.start, rows.start, cols.stop, rows.stop],
                float(peaks[label - 1]), area,
            ))
    lesions.sort(key=lambda c: -c.score)
    return label_maps, lesions


def components_to_coco(
    label_maps: Dict[int, np.ndarray], lesions: Sequence[LesionComponent], image_id,
    category_ids: Sequence[int], max_dets: Optional[int] = None,
) -> List[dict]:
    """COCO results (``image_id``, ``category_id``, XYWH ``bbox``, RLE ``segmentation``,
    ``score``) of ``lesions``, best first, at most ``max_dets`` per lesion type.

    Args:
        category_ids: the category id of each channel.
    """
    from pycocotools import mask as mask_util

    results, per_type = [], {}
    for lesion in lesions:
        kept = per_type.get(lesion.channel, 0)
        if max_dets is not None and kept >= max_dets:
            continue
        per_type[lesion.channel] = kept + 1
        labels = label_maps[lesion.channel]
        x0, y0, x1, y1 = lesion.box
        mask = np.zeros(labels.shape, np.uint8, order="F")
        mask[y0:y1, x0:x1] = labels[y0:y1, x0:x1] == lesion.label
        rle = mask_util.encode(mask)
        rle["counts"] = rle["counts"].decode("ascii")
        results.append({
            "image_id": image_id,
            "category_id": int(category_ids[lesion.channel]),
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            "segmentation": rle,
            "score": lesion.score,
        })
    return results


def semantic_probabilities(model, inputs: dict, flip: bool = False) -> torch.Tensor:
    """A semantic model's (C, height, width) probabilities for one mapped input, in the
    photograph's frame; with ``flip``, the mean of the image's and its horizontal mirror's
    (:class:`~retina_d2.modeling.tta.TestTimeAugmentation`, the code TEST.AUG runs).

    The mirror is taken of the network input (the field-of-view crop, when the mapper cropped),
    so its map is mirrored back in that frame before both are pasted into the photograph.

    Args:
        model: a model returning ``[{"sem_seg": (C, H, W) probabilities}]`` (SemanticLesionNet).
        inputs: the test mapper's dict: "image", "height", "width", optionally "fov_box".
    """
    from .tta import TestTimeAugmentation, tta_views

    return TestTimeAugmentation(model=model, views=tta_views(flip))([inputs])[0]["sem_seg"]
