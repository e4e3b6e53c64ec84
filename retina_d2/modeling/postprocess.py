"""Predicted lesions as the datasets define them: connected regions of one lesion type.

The converters make one ground-truth instance of each connected component of a lesion mask, so an
exudate plaque is one lesion however lumpy it is. A detector proposes such a plaque as many small
overlapping boxes, each scored as a lesion of its own, and each a false positive against the one
ground-truth region. :func:`merge_connected_lesions` joins the confident predictions of a class
whose masks touch into the component they form, scored by its most confident part.
"""
import numpy as np
import torch
from detectron2.structures import Boxes, Instances
from scipy import ndimage

__all__ = ["merge_connected_lesions"]


def merge_connected_lesions(
    instances: Instances, score_threshold: float, connectivity: int = 8
) -> Instances:
    """Merge predictions (scoring >= ``score_threshold``) of a class whose masks touch.

    Args:
        instances: predictions in the image's frame with ``pred_masks`` (N, H, W), ``scores``,
            ``pred_classes`` and ``pred_boxes``.
        score_threshold: predictions below it are kept as they are (they only extend the ranking
            down; merging them would let noise grow the confident regions).
        connectivity: 8 or 4, as the converters' ``--connectivity``.

    Returns:
        New instances, sorted by score: one per connected component of the union of a class's
        confident masks (score: the highest among its parts; box: the component's), then the
        predictions below the threshold.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    if len(instances) == 0 or not instances.has("pred_masks"):
        return instances
    structure = ndimage.generate_binary_structure(2, 2 if connectivity == 8 else 1)
    masks = instances.pred_masks
    if masks.dim() == 4:  # (N, 1, H, W) before paste
        masks = masks[:, 0]
    masks_np = masks.cpu().numpy().astype(bool)
    # float(): under autocast (RETINA.INFERENCE.AMP) they arrive in half precision, which numpy
    # lacks for bfloat16.
    scores = instances.scores.float().cpu().numpy()
    classes = instances.pred_classes.cpu().numpy()
    boxes_np = instances.pred_boxes.tensor.float().cpu().numpy()
    confident = scores >= score_threshold
    out_masks, out_scores, out_classes, out_boxes = [], [], [], []
    for cls in np.unique(classes[confident]):
        members = np.flatnonzero(confident & (classes == cls))
        best = np.zeros(masks_np.shape[1:], np.float32)  # per pixel: the best score covering it
        for i in members:
            np.maximum(best, np.where(masks_np[i], scores[i], 0), out=best)
        labels, _ = ndimage.label(best > 0, structure=structure)
        for k, (rows, cols) in enumerate(ndimage.find_objects(labels), start=1):
            component = np.zeros(masks_np.shape[1:], bool)
            component[rows, cols] = labels[rows, cols] == k
            out_masks.append(component)
            out_scores.append(float(best[rows, cols][labels[rows, cols] == k].max()))
            out_classes.append(int(cls))
            out_boxes.append([cols.start, rows.start, cols.stop, rows.stop])
        for i in members:  # a confident prediction with an empty mask stays as it was
            if not masks_np[i].any():
                out_masks.append(masks_np[i])
                out_scores.append(float(scores[i]))
                out_classes.append(int(cls))
                out_boxes.append(boxes_np[i].tolist())
    device = instances.scores.device
    merged = Instances(instances.image_size)
    merged.pred_masks = (
        torch.from_numpy(np.stack(out_masks)) if out_masks else masks[:0].cpu()
    ).to(device)
    merged.scores = torch.tensor(out_scores, dtype=instances.scores.dtype, device=device)
    merged.pred_classes = torch.tensor(out_classes, dtype=torch.int64, device=device)
    merged.pred_boxes = Boxes(
        torch.tensor(out_boxes, dtype=torch.float32, device=device).reshape(-1, 4)
    )
    rest = torch.as_tensor(np.flatnonzero(~confident), device=device)
    if len(rest):
        low = Instances(
            instances.image_size,
            pred_masks=masks[rest],
            scores=instances.scores[rest],
            pred_classes=instances.pred_classes[rest],
            pred_boxes=instances.pred_boxes[rest],
        )
        merged = Instances.cat([merged, low])
    return merged[torch.argsort(merged.scores, descending=True)]
