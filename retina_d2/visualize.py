"""Pictures a person checks a lesion detector with: ground truth and predictions side by side."""
from typing import List

import numpy as np
from detectron2.structures import BoxMode, Instances
from detectron2.utils.visualizer import ColorMode, Visualizer

from .data.instances import decode_segmentation

__all__ = ["draw_prediction_overlay", "draw_ground_truth_overlay", "side_by_side"]


def _colors(metadata, classes) -> List[tuple]:
    colors = getattr(metadata, "thing_colors", None)
    if not colors:
        return None
    return [tuple(c / 255.0 for c in colors[int(k)]) for k in classes]


def draw_prediction_overlay(
    image: np.ndarray, instances: Instances, metadata, score_threshold: float = 0.0
) -> np.ndarray:
    """RGB image with predicted masks, boxes and ``name score`` labels, one colour per lesion."""
    instances = instances.to("cpu")
    if instances.has("scores"):
        instances = instances[instances.scores >= score_threshold]
    vis = Visualizer(image, metadata, instance_mode=ColorMode.IMAGE)
    classes = instances.pred_classes.tolist() if instances.has("pred_classes") else []
    names = metadata.get("thing_classes", None)
    labels = [
        f"{names[c] if names else c} {s:.2f}"
        for c, s in zip(classes, instances.scores.tolist() if instances.has("scores") else [1.0] * len(classes))
    ]
    out = vis.overlay_instances(
        masks=instances.pred_masks.numpy() if instances.has("pred_masks") else None,
        boxes=instances.pred_boxes if instances.has("pred_boxes") else None,
        labels=labels,
        assigned_colors=_colors(metadata, classes),
        alpha=0.4,
    )
    return out.get_image()


def draw_ground_truth_overlay(image: np.ndarray, dataset_dict: dict, metadata) -> np.ndarray:
    """RGB image with the dataset dict's annotations (ignore regions in grey)."""
    vis = Visualizer(image, metadata, instance_mode=ColorMode.IMAGE)
    anns = dataset_dict.get("annotations", [])
    masks, boxes, labels, colors = [], [], [], []
    names = metadata.get("thing_classes", [])
    height, width = image.shape[:2]
    for ann in anns:
        masks.append(decode_segmentation(ann["segmentation"], height, width))
        boxes.append(BoxMode.convert(ann["bbox"], ann["bbox_mode"], BoxMode.XYXY_ABS))
        crowd = ann.get("iscrowd", 0)
        labels.append("ignore" if crowd else (names[ann["category_id"]] if names else str(ann["category_id"])))
        colors.append((0.6, 0.6, 0.6) if crowd else _colors(metadata, [ann["category_id"]])[0])
    out = vis.overlay_instances(
        masks=masks or None, boxes=boxes or None, labels=labels or None,
        assigned_colors=colors or None, alpha=0.4,
    )
    return out.get_image()


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 8) -> np.ndarray:
    """Two RGB images of equal height next to each other with a black gap."""
    height = max(left.shape[0], right.shape[0])
    canvas = np.zeros((height, left.shape[1] + gap + right.shape[1], 3), dtype=np.uint8)
    canvas[: left.shape[0], : left.shape[1]] = left
    canvas[: right.shape[0], left.shape[1] + gap :] = right
    return canvas
