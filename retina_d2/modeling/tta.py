"""Test-time augmentation (TTA): a model run on mirrored and quarter-turned views of each image, its
predictions turned back and merged.

Fundus photographs have no preferred orientation at the scale of a lesion, and the training
augmentation already mirrors and turns them (``RETINA.AUG.HFLIP`` / ``VFLIP`` / ``ROT90``), so a
model's errors on one view of an image are partly independent of its errors on another.
:class:`TestTimeAugmentation` wraps a model (LesionRCNN, SemanticLesionNet, :class:`TiledInference`
or :class:`AutocastInference` around either) with the same inputs and outputs:

1. The views (:func:`tta_views`): the image itself, its horizontal mirror (Detectron2's
   ``TEST.AUG.FLIP``), and with ``RETINA.TTA.ROTATIONS`` quarter turns of both. A view is taken of
   the network input (the mapper's ``"image"``, after the field-of-view crop and resize), one view
   per forward pass (a batch would pad the turned views to one size, which changes a detector's
   output at the padded borders).
2. Each view's predictions are asked for in the frame of the field-of-view crop, turned as the
   view is (``"height"``/``"width"`` swapped by an odd number of quarter turns; no ``"fov_box"``),
   and turned back into that crop's frame: boxes by their corners, masks and probability maps by
   the inverse flip / rotation of their pixels, which is exact.
3. Semantic maps (``"sem_seg"``): the mean of the views' maps, summed in float64, so views that
   agree give exactly their common map.
4. Instances are merged by mask, as Detectron2's ``GeneralizedRCNNWithTTA`` merges detections across
   its augmented passes (it merges boxes by NMS and averages masks predicted on the merged boxes;
   here the wrapped model is a black box, so merging goes by the masks the views returned). Highest
   score first, each instance not yet merged leads a lesion and takes, from every other view, the
   not yet merged instance of its class with the highest mask IoU (box IoU for a model without
   masks) of at least ``merge_iou``. A view contributes at most one instance per lesion: instances
   of one view are lesions the model itself kept apart. The lesion keeps its leader's box and class
   (as NMS keeps its top box); its mask is the pixels more than half of its instances cover, the
   leader breaking a tie; its score is the mean over *all* views with 0 for a view that missed it
   (``score="mean"``: a lesion every view finds keeps its score, one found by one view of four
   drops to a quarter of it) or the leader's (``"max"``, Detectron2's NMS). At most
   ``max_detections`` lesions are kept, best first.
5. The lesions are pasted into the original frame (the field-of-view shift). Lesion merging
   (``MODEL.LESION_MERGE``) is the inference pipeline's last step
   (:class:`~retina_d2.modeling.inference.LesionMerging`), after this one, so it runs once, on the
   merged lesions; the views are unmerged (merged per view, the pieces of a plaque would be
   compared across views as wholes of different shapes).

Order with tiling (:func:`~retina_d2.modeling.inference.build_inference_model`): the augmentation
wraps the tiled model, so each view is one whole tiled inference at native resolution and the
views are merged in the photograph's frame, where a lesion split by a tile seam is already whole.
Masks are kept cropped to their lesion between the views, so memory grows with one view's output
plus the lesions, not with the number of views.
"""
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.structures import Boxes, Instances
from torch import nn
from torchvision.ops import box_iou

from ..config import ConfigError
from .meta_arch.lesion_rcnn import paste_into_frame
from .outputs import output_types

__all__ = ["TestTimeAugmentation", "View", "tta_views", "undo_view_boxes", "undo_view_map",
           "view_image"]

# The output keys the wrapper knows how to merge across views.
_MERGED_OUTPUTS = ("instances", "sem_seg")
_SCORE_MODES = ("mean", "max")

# (x0, y0, x1, y1) in pixels, x1 and y1 exclusive.
Rect = Tuple[int, int, int, int]


class View(NamedTuple):
    """One augmented view: the horizontal mirror (when ``flip``) and then ``quarter_turns`` turns
    of 90 degrees counter-clockwise (``torch.rot90`` over the last two dimensions)."""

    flip: bool
    quarter_turns: int


def tta_views(flip: bool, rotations: Sequence[int] = ()) -> List[View]:
    """The views of ``TEST.AUG.FLIP`` and ``RETINA.TTA.ROTATIONS``: the image itself first, then
    each quarter turn, each also mirrored with ``flip``.

    Args:
        flip: add the horizontal mirror of every turn (of the image itself, without turns).
        rotations: quarter turns to add, each 1, 2 or 3 (90, 180, 270 degrees counter-clockwise).

    Returns:
        distinct views, the identity first.
    """
    bad = [r for r in rotations if isinstance(r, bool) or r not in (1, 2, 3)]
    if bad:
        raise ConfigError(
            f"RETINA.TTA.ROTATIONS: quarter turns must be 1, 2 or 3 (90, 180, 270 degrees), got "
            f"{list(rotations)}"
        )
    turns = [0] + sorted({int(r) for r in rotations})
    return [View(mirrored, k) for k in turns for mirrored in ((False, True) if flip else (False,))]


def view_image(image: torch.Tensor, view: View) -> torch.Tensor:
    """``image`` (..., H, W) as ``view`` shows it."""
    if view.flip:
        image = image.flip(-1)
    return torch.rot90(image, view.quarter_turns, dims=(-2, -1)) if view.quarter_turns else image


def undo_view_map(tensor: torch.Tensor, view: View) -> torch.Tensor:
    """A (..., h, w) map predicted on ``view`` turned back into the unaugmented frame."""
    if view.quarter_turns:
        tensor = torch.rot90(tensor, -view.quarter_turns, dims=(-2, -1))
    return tensor.flip(-1) if view.flip else tensor


def undo_view_boxes(
    boxes: torch.Tensor, view: View, view_size: Tuple[int, int]
) -> torch.Tensor:
    """(N, 4) ``x0, y0, x1, y1`` boxes in the frame of ``view`` (``view_size`` = its height,
    width) turned back into the unaugmented frame.

    One quarter turn counter-clockwise maps the point ``(x, y)`` of a ``h x w`` frame to
    ``(y, w - x)`` of a ``w x h`` frame, so undoing it maps ``(x', y')`` of the turned frame
    (``h' x w'``) to ``(h' - y', x')``; the mirror maps ``x`` to ``w - x``.
    """
    height, width = view_size
    out = boxes.clone()
    for _ in range(view.quarter_turns % 4):
        x0, y0, x1, y1 = out.unbind(-1)
        out = torch.stack([height - y1, x0, height - y0, x1], dim=-1)
        height, width = width, height
    if view.flip:
        x0, y0, x1, y1 = out.unbind(-1)
        out = torch.stack([width - x1, y0, width - x0, y1], dim=-1)
    return out


def _intersect(a: Rect, b: Rect) -> Optional[Rect]:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None


class _ViewInstances:
    """Every view's instances turned back into the crop's frame: boxes, scores, classes, the view
    each came from, and each mask cropped to the rectangle of its pixels (None without masks)."""

    def __init__(self):
        self.boxes: List[torch.Tensor] = []
        self.scores: List[torch.Tensor] = []
        self.classes: List[torch.Tensor] = []
        self.views: List[int] = []
        self.regions: List[Rect] = []
        self.masks: Optional[List[torch.Tensor]] = None
        self.views_added = 0

    def __len__(self) -> int:
        return len(self.views)

    def add(self, instances: Instances, view_index: int, view: View) -> None:
        """Add the instances one view returned (in its own frame, ``instances.image_size``)."""
        view_size = tuple(instances.image_size)
        has_masks = instances.has("pred_masks")
        if self.views_added and has_masks != (self.masks is not None):
            raise ValueError("the model returned masks for some views and none for others")
        self.views_added += 1
        if has_masks and self.masks is None:
            self.masks = []
        self.boxes.append(undo_view_boxes(instances.pred_boxes.tensor.cpu(), view, view_size))
        self.scores.append(instances.scores.cpu())
        self.classes.append(instances.pred_classes.cpu())
        self.views += [view_index] * len(instances)
        if not has_masks:
            self.regions += [(0, 0, 0, 0)] * len(instances)
            return
        masks = instances.pred_masks
        if masks.dim() == 4:  # (N, 1, h, w)
            masks = masks[:, 0]
        masks = masks.to(torch.bool)
        if masks.device.type == "cpu":
            # NumPy's any over a full-frame bool stack is ~10x torch's on a CPU, where this was
            # most of the wrapper's own time.
            stack = masks.numpy()
            rows_any = torch.from_numpy(stack.any(axis=2))
            cols_any = torch.from_numpy(stack.any(axis=1))
        else:
            rows_any, cols_any = masks.any(dim=2).cpu(), masks.any(dim=1).cpu()
        for k in range(len(instances)):
            rows = torch.nonzero(rows_any[k])[:, 0]
            cols = torch.nonzero(cols_any[k])[:, 0]
            if len(rows) == 0:
                self.regions.append((0, 0, 0, 0))
                self.masks.append(torch.zeros((0, 0), dtype=torch.bool))
                continue
            rx0, rx1, ry0, ry1 = int(cols[0]), int(cols[-1]) + 1, int(rows[0]), int(rows[-1]) + 1
            # The rectangle turns back as a box does, its pixels as a map does.
            rect = undo_view_boxes(torch.tensor([[rx0, ry0, rx1, ry1]]), view, view_size)[0]
            self.regions.append(tuple(int(v) for v in rect.tolist()))
            # A copy: a view of the slice would keep the full-frame mask tensor alive.
            self.masks.append(undo_view_map(masks[k, ry0:ry1, rx0:rx1].cpu(), view).clone())

    def mask_iou(self, leader: int, others: Sequence[int]) -> torch.Tensor:
        """Mask IoU of piece ``leader`` with each of ``others``, over their rectangles."""
        ious = torch.zeros(len(others))
        a_rect, a_mask = self.regions[leader], self.masks[leader]
        a_area = int(a_mask.sum())
        for n, j in enumerate(others):
            b_rect, b_mask = self.regions[j], self.masks[j]
            shared = _intersect(a_rect, b_rect)
            inter = 0
            if shared is not None:
                x0, y0, x1, y1 = shared
                inter = int((
                    a_mask[y0 - a_rect[1] : y1 - a_rect[1], x0 - a_rect[0] : x1 - a_rect[0]]
                    & b_mask[y0 - b_rect[1] : y1 - b_rect[1], x0 - b_rect[0] : x1 - b_rect[0]]
                ).sum())
            union = a_area + int(b_mask.sum()) - inter
            ious[n] = inter / union if union > 0 else 0.0
        return ious


class TestTimeAugmentation(nn.Module):
    """A model run on augmented views of each image at inference, with the model's own inputs and
    outputs (see the module docstring). While the wrapped model trains it is the model itself."""

    @configurable
    def __init__(
        self,
        *,
        model: nn.Module,
        views: Sequence[View],
        merge_iou: float = 0.5,
        score: str = "mean",
        max_detections: Optional[int] = None,
    ):
        """
        Args:
            model: a model taking the mapper's list of dicts and returning, per image, a dict of
                ``"instances"`` and/or ``"sem_seg"`` in the frame of ``"height"``/``"width"``.
            views: the views to run (:func:`tta_views`); the first leads ties.
            merge_iou: mask (box) IoU from which instances of two views are one lesion.
            score: a merged lesion's score, "mean" over all views or "max" (module docstring).
            max_detections: keep at most this many merged lesions per image (highest scores);
                None or 0: all.
        """
        super().__init__()
        if not views:
            raise ValueError("test-time augmentation needs at least one view")
        if not 0.0 < merge_iou <= 1.0:
            raise ConfigError(f"RETINA.TTA.MERGE_IOU must be in (0, 1], got {merge_iou}")
        if score not in _SCORE_MODES:
            raise ConfigError(f"RETINA.TTA.SCORE must be one of {_SCORE_MODES}, got {score!r}")
        self.model = model
        self.views = [View(bool(v[0]), int(v[1]) % 4) for v in views]
        self.merge_iou = float(merge_iou)
        self.score = score
        self.max_detections = max_detections or None

    @classmethod
    def from_config(cls, cfg, model: nn.Module):
        unmerged = sorted(output_types(cfg) - set(_MERGED_OUTPUTS))
        if unmerged:
            # Grades, lesion presence and landmarks would need merges of their own (a landmark
            # turns with the view); averaging them is not what a user asked for by a flip.
            raise ConfigError(
                f"TEST.AUG.ENABLED: test-time augmentation merges {list(_MERGED_OUTPUTS)} across "
                f"views; {cfg.MODEL.META_ARCHITECTURE} also returns {unmerged}, which is not "
                "supported: set TEST.AUG.ENABLED False"
            )
        return {
            "model": model,
            "views": tta_views(cfg.TEST.AUG.FLIP, list(cfg.RETINA.TTA.ROTATIONS)),
            "merge_iou": cfg.RETINA.TTA.MERGE_IOU,
            "score": cfg.RETINA.TTA.SCORE,
            "max_detections": cfg.TEST.DETECTIONS_PER_IMAGE,
        }

    def forward(self, batched_inputs: List[dict]):
        """
        Args:
            batched_inputs: the mapper's dicts: ``"image"`` (C, H, W), and optionally
                ``"height"``, ``"width"`` (the original image) and ``"fov_box"``.

        Returns:
            Per image, the merged outputs in the original frame (``"instances"``, on the CPU,
            and/or ``"sem_seg"``). While the wrapped model trains: its own return value (its
            mode, not the wrapper's, decides, as for :class:`AutocastInference`).
        """
        if self.model.training:
            return self.model(batched_inputs)
        with torch.no_grad():
            return [self._infer_one(inputs) for inputs in batched_inputs]

    def _infer_one(self, inputs: dict) -> dict:
        image = inputs["image"]
        net_size = tuple(image.shape[-2:])
        height = int(inputs.get("height", net_size[0]))
        width = int(inputs.get("width", net_size[1]))
        fov_box = inputs.get("fov_box")
        x0, y0, x1, y1 = (
            (0, 0, width, height) if fov_box is None else (int(round(v)) for v in fov_box)
        )
        crop_h, crop_w = y1 - y0, x1 - x0
        pieces, total, map_dtype = None, None, None
        for index, view in enumerate(self.views):
            turned = view.quarter_turns % 2 == 1
            output = self.model([{
                "image": view_image(image, view),
                "height": crop_w if turned else crop_h,
                "width": crop_h if turned else crop_w,
            }])[0]
            unknown = sorted(set(output) - set(_MERGED_OUTPUTS))
            if unknown:
                raise NotImplementedError(
                    f"test-time augmentation (TEST.AUG.ENABLED) merges {_MERGED_OUTPUTS} across "
                    f"views; the model also returns {unknown}, which has no merged form"
                )
            if "instances" in output:
                pieces = pieces or _ViewInstances()
                pieces.add(output["instances"], index, view)
            if "sem_seg" in output:
                probs = undo_view_map(output["sem_seg"], view)
                map_dtype = probs.dtype
                total = probs.to(torch.float64, copy=True) if total is None else total.add_(probs)
            del output
        result = {}
        if pieces is not None:
            instances = self._merged_instances(pieces, (crop_h, crop_w))
            if fov_box is not None:
                instances = paste_into_frame(instances, (x0, y0, x1, y1), height, width)
            result["instances"] = instances
        if total is not None:
            probs = (total / len(self.views)).to(map_dtype)
            if fov_box is not None:
                probs = F.pad(probs, (x0, width - x1, y0, height - y1))
            result["sem_seg"] = probs
        return result

    # --- instances --------------------------------------------------------------------------------

    def _lesions(self, pieces: _ViewInstances, scores, classes) -> List[List[int]]:
        """Pieces grouped into lesions (module docstring, step 4): each group's leader first,
        then one piece of each other view that joined it; groups in their leaders' score order."""
        boxes = torch.cat(pieces.boxes).float()
        views = torch.tensor(pieces.views, dtype=torch.int64)
        # Where a piece lies (its mask's rectangle, or its box): only pieces whose extents
        # overlap can reach any IoU, so only those are compared.
        extents = (
            torch.tensor(pieces.regions, dtype=torch.float32).reshape(-1, 4)
            if pieces.masks is not None else boxes
        )
        # Highest score first; ties in view order (the identity view first), as pieces were added.
        order = torch.sort(scores, descending=True, stable=True).indices.tolist()
        free = torch.ones(len(pieces), dtype=torch.bool)
        groups = []
        for leader in order:
            if not free[leader]:
                continue
            free[leader] = False
            group = [leader]
            x0, y0, x1, y1 = extents[leader].tolist()
            overlaps = (
                (extents[:, 0] < x1) & (extents[:, 2] > x0)
                & (extents[:, 1] < y1) & (extents[:, 3] > y0)
            )
            candidates = torch.nonzero(
                free & overlaps & (classes == classes[leader]) & (views != views[leader])
            )[:, 0]
            if len(candidates):
                if pieces.masks is not None:
                    ious = pieces.mask_iou(leader, candidates.tolist())
                else:
                    ious = box_iou(boxes[leader : leader + 1], boxes[candidates])[0]
                best: Dict[int, Tuple[float, int]] = {}  # view -> (IoU, piece)
                for iou, j in zip(ious.tolist(), candidates.tolist()):
                    view = int(views[j])
                    # Strictly higher wins: on a tie the higher-scoring piece (earlier) stays.
                    if iou >= self.merge_iou and iou > best.get(view, (-1.0, -1))[0]:
                        best[view] = (iou, j)
                for view in sorted(best):
                    group.append(best[view][1])
                    free[best[view][1]] = False
            groups.append(group)
        return groups

    def _merged_instances(self, pieces: _ViewInstances, frame: Tuple[int, int]) -> Instances:
        scores = torch.cat(pieces.scores) if len(pieces) else torch.zeros((0,))
        classes = torch.cat(pieces.classes) if len(pieces) else torch.zeros((0,), dtype=torch.int64)
        boxes = torch.cat(pieces.boxes) if len(pieces) else torch.zeros((0, 4))
        groups = self._lesions(pieces, scores, classes) if len(pieces) else []
        leaders = [g[0] for g in groups]
        if self.score == "mean":
            # float64: the mean of equal scores is exactly that score, for any number of views.
            merged_scores = torch.tensor(
                [float(scores[g].double().sum()) / len(self.views) for g in groups],
                dtype=torch.float64,
            ).to(scores.dtype)
        else:
            merged_scores = scores[leaders]
        # Highest score first, ties in the leaders' order (the identity view's first).
        order = torch.sort(merged_scores, descending=True, stable=True).indices
        if self.max_detections:
            order = order[: self.max_detections]
        kept = [groups[i] for i in order.tolist()]
        kept_leaders = torch.tensor([g[0] for g in kept], dtype=torch.int64)
        merged = Instances(frame)
        merged.pred_boxes = Boxes(boxes[kept_leaders].reshape(-1, 4))
        merged.scores = merged_scores[order]
        merged.pred_classes = classes[kept_leaders]
        if pieces.masks is not None:
            masks = torch.zeros((len(kept), *frame), dtype=torch.bool)
            for k, group in enumerate(kept):
                rect, mask = self._voted_mask(pieces, group)
                rx0, ry0, rx1, ry1 = rect
                # Clipped to the frame as a mask pasted by the model is (it never leaves it).
                masks[k, ry0:ry1, rx0:rx1] = mask[: frame[0] - ry0, : frame[1] - rx0]
            merged.pred_masks = masks
        return merged

    @staticmethod
    def _voted_mask(pieces: _ViewInstances, group: List[int]) -> Tuple[Rect, torch.Tensor]:
        """The pixels more than half of the group's masks cover, and those exactly half cover
        where the leader (``group[0]``) covers them, in the rectangle of all of them."""
        if len(group) == 1:
            return pieces.regions[group[0]], pieces.masks[group[0]]
        rects = [pieces.regions[i] for i in group if pieces.masks[i].numel()]
        if not rects:
            return pieces.regions[group[0]], pieces.masks[group[0]]
        x0, y0 = min(r[0] for r in rects), min(r[1] for r in rects)
        x1, y1 = max(r[2] for r in rects), max(r[3] for r in rects)
        votes = torch.zeros((y1 - y0, x1 - x0), dtype=torch.int32)
        leader = torch.zeros((y1 - y0, x1 - x0), dtype=torch.bool)
        for n, i in enumerate(group):
            if not pieces.masks[i].numel():
                continue
            rx0, ry0, rx1, ry1 = pieces.regions[i]
            votes[ry0 - y0 : ry1 - y0, rx0 - x0 : rx1 - x0] += pieces.masks[i]
            if n == 0:
                leader[ry0 - y0 : ry1 - y0, rx0 - x0 : rx1 - x0] = pieces.masks[i]
        count = len(group)
        return (x0, y0, x1, y1), (2 * votes > count) | ((2 * votes == count) & leader)
