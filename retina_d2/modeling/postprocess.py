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
    masks = masks.bool()
    height, width = masks.shape[-2:]
    # float(): under autocast (RETINA.INFERENCE.AMP) they arrive in half precision, which numpy
    # lacks for bfloat16.
    scores = instances.scores.float().cpu().numpy()
    classes = instances.pred_classes.cpu().numpy()
    boxes_np = instances.pred_boxes.tensor.float().cpu().numpy()
    confident = np.flatnonzero(scores >= score_threshold)
    # Only the confident masks come to the CPU (the rest stay where they are, on the GPU say), and
    # the per-mask work below touches only each mask's window, found for all in one pass. A
    # full-frame pass per prediction made this the slowest step of inference (256 predictions at
    # HEI-MED's 2196x1958: ~5 s on a CPU).
    confident_np = masks[torch.as_tensor(confident, dtype=torch.long, device=masks.device)]
    confident_np = confident_np.cpu().numpy()
    rows_hit = confident_np.any(axis=2)  # numpy's: ~10x faster than torch's bool any on a CPU
    cols_hit = confident_np.any(axis=1)
    # What each output instance is, written into one preallocated stack in score order, so no
    # full-frame mask is copied twice: ("component", labels, k, window) for a merged region,
    # ("empty",) for a confident prediction with an empty mask, ("kept", i) for a prediction below
    # the threshold, which stays as it was.
    parts, out_scores, out_classes, out_boxes = [], [], [], []
    for cls in np.unique(classes[confident]):
        members = np.flatnonzero(classes[confident] == cls)  # positions in confident_np
        best = np.zeros((height, width), np.float32)  # per pixel: the best score covering it
        empty = []
        for m in members:
            rows, cols = np.flatnonzero(rows_hit[m]), np.flatnonzero(cols_hit[m])
            if rows.size == 0:
                empty.append(confident[m])
                continue
            win = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
            score = scores[confident[m]]
            np.maximum(best[win], np.where(confident_np[m][win], score, 0), out=best[win])
        labels, _ = ndimage.label(best > 0, structure=structure)
        for k, (rows, cols) in enumerate(ndimage.find_objects(labels), start=1):
            parts.append(("component", labels, k, (rows, cols)))
            out_scores.append(float(best[rows, cols][labels[rows, cols] == k].max()))
            out_classes.append(int(cls))
            out_boxes.append([cols.start, rows.start, cols.stop, rows.stop])
        for i in empty:
            parts.append(("empty",))
            out_scores.append(float(scores[i]))
            out_classes.append(int(cls))
            out_boxes.append(boxes_np[i].tolist())
    rest = np.setdiff1d(np.arange(len(scores)), confident)
    parts += [("kept", i) for i in rest]
    out_scores += scores[rest].tolist()
    out_classes += classes[rest].tolist()
    out_boxes += boxes_np[rest].tolist()

    device = masks.device
    score_tensor = torch.tensor(out_scores, dtype=instances.scores.dtype)
    order = torch.argsort(score_tensor, descending=True)
    stack = torch.zeros((len(parts), height, width), dtype=torch.bool, device=device)
    for slot, index in enumerate(order.tolist()):
        part = parts[index]
        if part[0] == "component":
            _, labels, k, (rows, cols) = part
            stack[slot, rows, cols] = torch.from_numpy(labels[rows, cols] == k).to(device)
        elif part[0] == "kept":
            stack[slot] = masks[part[1]]
    merged = Instances(instances.image_size)
    merged.pred_masks = stack
    merged.scores = score_tensor[order].to(device)
    merged.pred_classes = torch.tensor(out_classes, dtype=torch.int64)[order].to(device)
    merged.pred_boxes = Boxes(
        torch.tensor(out_boxes, dtype=torch.float32).reshape(-1, 4)[order].to(device)
    )
    return merged
