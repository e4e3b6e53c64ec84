"""Tiled (sliding-window) inference: a whole photograph at the network's resolution, one tile at a
time.

A 4288x2848 fundus photograph holds 1-5 px microaneurysms. Resized to 1024 px they fall below a
pixel; fed whole at native resolution, the backbone's feature maps grow with the image.
:class:`TiledInference` wraps a model (LesionRCNN, SemanticLesionNet, or any model with their
input and output contract) so that it sees overlapping tiles of the mapper's ``"image"`` (after the
test-time FOV crop and resize; with ``INPUT.MIN_SIZE_TEST: 0`` the photograph's own pixels):

1. :func:`tile_grid` covers the image with ``tile_size`` tiles that share ``overlap`` pixels with
   their neighbours; the last tile of a row or column lies flush with the border.
2. Each tile goes through the model with its own size as ``"height"``/``"width"``, so the model
   returns its predictions at the tile's pixels. A per-tile budget (``proposals_per_tile``,
   ``detections_per_tile``) replaces the detector's own proposal and detection counts while it
   runs on tiles: those are sized for a whole image, and 25 tiles each keeping a whole image's
   1000 proposals give the RoI heads 25x the boxes.
3. Instances: each keeps its box, score, class and its mask cropped to its box while the tiles are
   merged. Two instances of one class from overlapping tiles are one
   lesion when their masks (their boxes, for a model without masks) have an IoU of at least
   ``merge_iou`` within the area both tiles saw: a duplicate of a lesion that lies in the
   overlap, or the two halves of a lesion cut by the seam. A group becomes one instance: the union
   of the masks, the union of the boxes, the highest score.
4. Semantic maps: the tiles' probabilities are blended with weights that fall linearly to 0 over
   ``overlap`` pixels towards every side a tile shares with another (:func:`seam_weights`), so
   neither tile's border, where its context ends, decides alone. (The blended map is as large as
   the output map the untiled model returns.)
5. The merged results go to the original image's frame as the untiled model's do: boxes through
   Detectron2's ``detector_postprocess`` (scale, clip, drop empty) and LesionRCNN's
   :func:`paste_into_frame` (the FOV shift); masks, already thresholded at the network's
   resolution, by nearest neighbour; semantic maps through ``sem_seg_postprocess`` and the FOV
   padding. Where the image fits one tile the output equals the untiled model's.

   Memory: the network's activations (the GPU's memory) follow the tile, not the image. The
   returned masks do not: Detectron2's Instances hold each mask at the full frame (N x H x W), as
   the untiled model's do, and on the CPU those masks, not the network, set the peak host memory
   of a large photograph (``tools/benchmark.py tiling``: peak RSS about the same tiled and whole).
6. Lesion merging (``MODEL.LESION_MERGE``) is not the tiling's: it is the inference pipeline's
   last step (:class:`~retina_d2.modeling.inference.LesionMerging`), which runs once on the
   assembled image's instances in the original frame, as on an untiled image's. The models
   never merge, so the tiles are unmerged: merged per tile, the two halves of a plaque cut by a
   seam would meet only through step 3's IoU, which pieces that merely touch do not reach.

The wrapper lives beside the meta-architectures because it is one: the same inputs and outputs,
usable wherever the model is (Detectron2's ``inference_on_dataset``, the trainer's ``test``).
"""
import contextlib
import itertools
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling.postprocessing import detector_postprocess, sem_seg_postprocess
from detectron2.modeling.proposal_generator import RPN
from detectron2.modeling.roi_heads import FastRCNNOutputLayers
from detectron2.structures import Boxes, Instances
from torch import nn
from torchvision.ops import box_iou

from .meta_arch.lesion_rcnn import paste_into_frame

__all__ = ["TiledInference", "instances_in_frame", "seam_weights", "tile_budget", "tile_grid"]

# (x0, y0, x1, y1) in pixels, x1 and y1 exclusive.
Rect = Tuple[int, int, int, int]

# The output keys the wrapper knows how to assemble from tiles.
_TILED_OUTPUTS = ("instances", "sem_seg")


def _axis_starts(length: int, tile: int, overlap: int) -> List[int]:
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = -(-(length - tile) // stride) + 1  # ceil division: the last start reaches the end
    return [min(i * stride, length - tile) for i in range(count)]


def tile_grid(height: int, width: int, tile: int, overlap: int) -> List[Rect]:
    """Tiles that cover every pixel of a ``height x width`` image.

    Neighbouring tiles share at least ``overlap`` pixels; the last tile of a row (column) lies
    flush with the right (bottom) border and may share more. An image side shorter than ``tile``
    gets one tile of its own length.

    Args:
        height, width: the image's size.
        tile: the tiles' side.
        overlap: pixels shared by neighbours, ``0 <= overlap < tile``.

    Returns:
        ``(x0, y0, x1, y1)`` of every tile, row by row.
    """
    if tile < 1:
        raise ValueError(f"tile size (RETINA.TILE.SIZE) must be positive, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(
            f"tile overlap (RETINA.TILE.OVERLAP) must be in [0, tile size {tile}), got {overlap}"
        )
    if height < 1 or width < 1:
        raise ValueError(f"cannot tile an empty image ({width}x{height}, WxH)")
    return [
        (x0, y0, min(x0 + tile, width), min(y0 + tile, height))
        for y0 in _axis_starts(height, tile, overlap)
        for x0 in _axis_starts(width, tile, overlap)
    ]


def _ramp(length: int, rising: bool, falling: bool, ramp: float) -> torch.Tensor:
    centres = torch.arange(length, dtype=torch.float32) + 0.5
    weights = torch.ones(length)
    if rising:
        weights = torch.minimum(weights, centres / ramp)
    if falling:
        weights = torch.minimum(weights, (length - centres) / ramp)
    return weights


def seam_weights(tile: Rect, height: int, width: int, ramp: float) -> torch.Tensor:
    """Blending weights of one tile of a ``height x width`` image.

    1 inside; towards each side the tile shares with another (a side not on the image's border)
    the weight falls linearly, pixel centre by pixel centre, to ``0.5 / ramp`` at its last pixel.
    Two tiles that overlap by ``ramp`` pixels then cross-fade: their weights sum to 1 there.

    Returns:
        float32 ``(y1 - y0, x1 - x0)`` weights.
    """
    x0, y0, x1, y1 = tile
    rows = _ramp(y1 - y0, y0 > 0, y1 < height, ramp)
    cols = _ramp(x1 - x0, x0 > 0, x1 < width, ramp)
    return rows[:, None] * cols[None, :]


def _intersect(a: Rect, b: Rect) -> Optional[Rect]:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None


class _Pieces:
    """Every tile's instances in the network input's frame: boxes, scores, classes, the tile each
    came from, and each mask cropped to the rectangle ``regions[i]`` (None without masks)."""

    def __init__(self):
        self.boxes: List[torch.Tensor] = []
        self.scores: List[torch.Tensor] = []
        self.classes: List[torch.Tensor] = []
        self.tiles: List[int] = []
        self.regions: List[Rect] = []
        self.masks: Optional[List[torch.Tensor]] = None
        self.tiles_added = 0

    def add(self, instances: Instances, tile_index: int, tile: Rect) -> None:
        """Add one tile's instances (at the tile's pixels), moved into the input's frame."""
        instances = instances.to("cpu")
        x0, y0, x1, y1 = tile
        boxes = instances.pred_boxes.tensor
        self.boxes.append(boxes + boxes.new_tensor([x0, y0, x0, y0]))
        self.scores.append(instances.scores)
        self.classes.append(instances.pred_classes)
        self.tiles += [tile_index] * len(instances)
        has_masks = instances.has("pred_masks")
        if self.tiles_added and has_masks != (self.masks is not None):
            raise ValueError("the model returned masks for some tiles and none for others")
        self.tiles_added += 1
        if self.masks is None and has_masks:
            self.masks = []
        # The box's pixel hull, grown to the mask's own extent: a mask pasted by its box stays
        # within it, but a model's masks need not.
        hull = boxes.clone()
        hull[:, :2] = hull[:, :2].floor()
        hull[:, 2:] = hull[:, 2:].ceil()
        hull = hull.to(torch.int64).tolist()
        if has_masks:
            masks = instances.pred_masks.to(torch.bool)
            if masks.dim() == 4:  # (N, 1, h, w)
                masks = masks[:, 0]
            rows_any, cols_any = masks.any(dim=2), masks.any(dim=1)
        for k, (bx0, by0, bx1, by1) in enumerate(hull):
            if has_masks and rows_any[k].any():
                rows, cols = torch.nonzero(rows_any[k])[:, 0], torch.nonzero(cols_any[k])[:, 0]
                bx0, bx1 = min(bx0, int(cols[0])), max(bx1, int(cols[-1]) + 1)
                by0, by1 = min(by0, int(rows[0])), max(by1, int(rows[-1]) + 1)
            bx0, bx1 = min(max(bx0, 0), x1 - x0), min(max(bx1, 0), x1 - x0)
            by0, by1 = min(max(by0, 0), y1 - y0), min(max(by1, 0), y1 - y0)
            bx1, by1 = max(bx1, bx0), max(by1, by0)
            self.regions.append((x0 + bx0, y0 + by0, x0 + bx1, y0 + by1))
            if has_masks:
                # A copy: a view would keep the tile's full-size mask tensor alive.
                self.masks.append(masks[k, by0:by1, bx0:bx1].clone())

    def __len__(self) -> int:
        return len(self.tiles)


def _masks_within(pieces: _Pieces, indices: Sequence[int], rect: Rect) -> torch.Tensor:
    """(len(indices), h, w) bool: the pieces' masks inside ``rect`` (``h x w``). Bounded by the
    tile: ``rect`` is the area two tiles share."""
    x0, y0, x1, y1 = rect
    out = torch.zeros((len(indices), y1 - y0, x1 - x0), dtype=torch.bool)
    for k, i in enumerate(indices):
        part = _intersect(pieces.regions[i], rect)
        if part is None:
            continue
        rx0, ry0 = pieces.regions[i][:2]
        px0, py0, px1, py1 = part
        out[k, py0 - y0 : py1 - y0, px0 - x0 : px1 - x0] = pieces.masks[i][
            py0 - ry0 : py1 - ry0, px0 - rx0 : px1 - rx0
        ]
    return out


def _iou_within(pieces: _Pieces, boxes: torch.Tensor, side_a, side_b, rect: Rect) -> torch.Tensor:
    """(len(side_a), len(side_b)) IoU of the pieces' masks (boxes, without masks) inside
    ``rect``."""
    if pieces.masks is not None:
        a = _masks_within(pieces, side_a, rect).flatten(1).float()
        b = _masks_within(pieces, side_b, rect).flatten(1).float()
        inter = a @ b.T  # pixel counts, exact in float32 for any tile under 4096 x 4096
        union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
        return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))
    x0, y0, x1, y1 = rect
    lo = torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
    hi = torch.tensor([x1, y1, x1, y1], dtype=boxes.dtype)
    clipped = torch.minimum(torch.maximum(boxes, lo), hi)
    return box_iou(clipped[side_a], clipped[side_b])


def _group_pieces(pieces: _Pieces, tiles: Sequence[Rect], merge_iou: float) -> List[List[int]]:
    """Groups of piece indices that are one lesion (module docstring, step 3), each sorted, in the
    order of their first piece."""
    parent = list(range(len(pieces)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    boxes = torch.cat(pieces.boxes) if len(pieces) else torch.zeros((0, 4))
    classes = torch.cat(pieces.classes) if len(pieces) else torch.zeros((0,), dtype=torch.int64)
    regions = np.array(pieces.regions, dtype=np.int64).reshape(-1, 4)
    tile_of = np.array(pieces.tiles, dtype=np.int64)
    for ta, tb in itertools.combinations(range(len(tiles)), 2):
        shared = _intersect(tiles[ta], tiles[tb])
        if shared is None:
            continue
        # Only the pieces that reach the shared area can be the same lesion.
        reach = (
            (regions[:, 0] < shared[2]) & (regions[:, 2] > shared[0])
            & (regions[:, 1] < shared[3]) & (regions[:, 3] > shared[1])
        )
        side_a = np.flatnonzero(reach & (tile_of == ta)).tolist()
        side_b = np.flatnonzero(reach & (tile_of == tb)).tolist()
        if not side_a or not side_b:
            continue
        iou = _iou_within(pieces, boxes, side_a, side_b, shared)
        same = classes[side_a][:, None] == classes[side_b][None, :]
        for i, j in torch.nonzero((iou >= merge_iou) & same).tolist():
            parent[root(side_b[j])] = root(side_a[i])
    groups: Dict[int, List[int]] = {}
    for i in range(len(pieces)):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def _frame(inputs: dict, net_size: Tuple[int, int]):
    """(height, width) of the original image and the FOV crop's box in it (the whole image
    without a crop)."""
    height = int(inputs.get("height", net_size[0]))
    width = int(inputs.get("width", net_size[1]))
    fov_box = inputs.get("fov_box")
    box = (0, 0, width, height) if fov_box is None else tuple(int(round(v)) for v in fov_box)
    return height, width, box


def instances_in_frame(
    instances: Instances, regions: Sequence[Rect], masks: Optional[Sequence[torch.Tensor]],
    inputs: dict,
) -> Instances:
    """Instances found at the network input's pixels, moved to the original image's frame as the
    untiled model returns them (module docstring, step 5).

    Args:
        instances: ``pred_boxes``, ``scores``, ``pred_classes``, with ``image_size`` the network
            input's.
        regions: per instance, the rectangle of the input its mask covers.
        masks: per instance, its bool mask cropped to its region; None for a model without masks.
        inputs: the mapper's dict of the image (``"height"``, ``"width"``, ``"fov_box"``).

    Returns:
        Instances in the frame of ``inputs``, with full-frame ``pred_masks`` when there are masks;
        boxes left empty by the rescale are dropped with their masks.
    """
    net_h, net_w = instances.image_size
    height, width, (fx0, fy0, fx1, fy1) = _frame(inputs, (net_h, net_w))
    instances = Instances(instances.image_size, **instances.get_fields())
    instances.frame_index = torch.arange(len(instances))
    # The untiled model's path for boxes: rescale to the crop, clip, drop empty boxes...
    result = detector_postprocess(instances, fy1 - fy0, fx1 - fx0)
    kept = result.frame_index.tolist()
    result.remove("frame_index")
    # ...then shift into the original frame.
    if inputs.get("fov_box") is not None:
        result = paste_into_frame(result, inputs["fov_box"], height, width)
    if masks is None:
        return result
    scale_x, scale_y = (fx1 - fx0) / net_w, (fy1 - fy0) / net_h
    frame = torch.zeros((len(kept), height, width), dtype=torch.bool)
    for k, index in enumerate(kept):
        (rx0, ry0, rx1, ry1), mask = regions[index], masks[index]
        rows = _nearest_span(ry0, ry1 - ry0, scale_y, fy1 - fy0)
        cols = _nearest_span(rx0, rx1 - rx0, scale_x, fx1 - fx0)
        if rows is None or cols is None:
            continue
        frame[k, fy0 + rows[0] : fy0 + rows[1], fx0 + cols[0] : fx0 + cols[1]] = mask[
            rows[2]
        ][:, cols[2]]
    result.pred_masks = frame
    return result


def _nearest_span(origin: int, length: int, scale: float, limit: int):
    """Output pixels ``[start, stop)`` that source pixels ``[origin, origin + length)`` cover
    after scaling by ``scale`` (nearest neighbour on pixel centres), and the source index, from
    ``origin``, of each output pixel. None when they cover none."""
    start = max(int(math.floor(origin * scale)), 0)
    stop = min(int(math.ceil((origin + length) * scale)), limit)
    out = np.arange(start, stop)
    source = np.floor((out + 0.5) / scale).astype(np.int64) - origin
    keep = (source >= 0) & (source < length)
    if not keep.any():
        return None
    out, source = out[keep], source[keep]  # contiguous: source grows with out
    return int(out[0]), int(out[-1]) + 1, torch.from_numpy(source)


@contextlib.contextmanager
def tile_budget(model: nn.Module, proposals: Optional[int], detections: Optional[int]):
    """Replace, while the block runs, the test-time proposal count of every Detectron2 RPN in
    ``model`` (``post_nms_topk``, ``MODEL.RPN.POST_NMS_TOPK_TEST``) by ``proposals`` and the
    detection count of every box predictor (``test_topk_per_image``,
    ``TEST.DETECTIONS_PER_IMAGE``) by ``detections``; None or 0 leaves that count as it is.
    Restored on exit, also after an error."""
    saved = []
    for module in model.modules():
        if proposals and isinstance(module, RPN):
            saved.append((module.post_nms_topk, False, module.post_nms_topk[False]))
            module.post_nms_topk[False] = int(proposals)
        if detections and isinstance(module, FastRCNNOutputLayers):
            saved.append((module, "test_topk_per_image", module.test_topk_per_image))
            module.test_topk_per_image = int(detections)
    try:
        yield
    finally:
        for owner, key, value in reversed(saved):
            if isinstance(owner, dict):
                owner[key] = value
            else:
                setattr(owner, key, value)


class TiledInference(nn.Module):
    """A model run tile by tile at inference, with the model's own inputs and outputs (see the
    module docstring). In training mode it is the model itself."""

    @configurable
    def __init__(
        self,
        *,
        model: nn.Module,
        tile_size: int,
        overlap: int,
        merge_iou: float = 0.5,
        batch_size: int = 1,
        max_detections: Optional[int] = None,
        proposals_per_tile: int = 0,
        detections_per_tile: int = 0,
    ):
        """
        Args:
            model: a model taking the mapper's list of dicts and returning, per image, a dict of
                ``"instances"`` and/or ``"sem_seg"`` in the frame of ``"height"``/``"width"``.
            tile_size: tile side in network-input pixels.
            overlap: pixels neighbouring tiles share, ``1 <= overlap < tile_size``.
            merge_iou: IoU, within two tiles' shared area, from which two instances are one.
            batch_size: tiles per forward pass.
            max_detections: keep at most this many merged instances per image (highest scores);
                None or 0: all.
            proposals_per_tile: RPN proposals each tile keeps (:func:`tile_budget`); 0: the
                model's own ``POST_NMS_TOPK_TEST``.
            detections_per_tile: detections each tile's box predictor keeps; 0: the model's own
                ``TEST.DETECTIONS_PER_IMAGE``. The merged image is still capped at
                ``max_detections``.
        """
        super().__init__()
        tile_grid(1, 1, tile_size, overlap)  # the grid's own checks
        if overlap < 1:
            raise ValueError(
                "tile overlap (RETINA.TILE.OVERLAP) must be at least 1: instances are matched "
                "across a seam where both tiles see the image"
            )
        if not 0.0 < merge_iou <= 1.0:
            raise ValueError(f"RETINA.TILE.MERGE_IOU must be in (0, 1], got {merge_iou}")
        if batch_size < 1:
            raise ValueError(f"RETINA.TILE.BATCH_SIZE must be positive, got {batch_size}")
        for key, value in (("PROPOSALS_PER_TILE", proposals_per_tile),
                           ("DETECTIONS_PER_TILE", detections_per_tile)):
            if value < 0:
                raise ValueError(f"RETINA.TILE.{key} must be 0 (the model's own) or positive, "
                                 f"got {value}")
        self.model = model
        self.tile_size = int(tile_size)
        self.overlap = int(overlap)
        self.merge_iou = float(merge_iou)
        self.batch_size = int(batch_size)
        self.max_detections = max_detections or None
        self.proposals_per_tile = int(proposals_per_tile)
        self.detections_per_tile = int(detections_per_tile)

    @classmethod
    def from_config(cls, cfg, model: nn.Module):
        tile = cfg.RETINA.TILE
        return {
            "model": model,
            "tile_size": tile.SIZE,
            "overlap": tile.OVERLAP,
            "merge_iou": tile.MERGE_IOU,
            "batch_size": tile.BATCH_SIZE,
            "max_detections": cfg.TEST.DETECTIONS_PER_IMAGE,
            "proposals_per_tile": tile.PROPOSALS_PER_TILE,
            "detections_per_tile": tile.DETECTIONS_PER_TILE,
        }

    def forward(self, batched_inputs: List[dict]):
        """
        Args:
            batched_inputs: the mapper's dicts: ``"image"`` (C, H, W), and optionally
                ``"height"``, ``"width"`` (the original image) and ``"fov_box"``.

        Returns:
            Per image, the model's outputs in the original frame (``"instances"`` and/or
            ``"sem_seg"``), on the CPU. Training mode: the model's own return value.
        """
        if self.training:
            return self.model(batched_inputs)
        budget = tile_budget(self.model, self.proposals_per_tile, self.detections_per_tile)
        with torch.no_grad(), budget:
            return [self._infer_one(inputs) for inputs in batched_inputs]

    def _infer_one(self, inputs: dict) -> dict:
        image = inputs["image"]
        net_h, net_w = image.shape[-2:]
        tiles = tile_grid(net_h, net_w, self.tile_size, self.overlap)
        pieces, semantic, weights = None, None, None
        for start in range(0, len(tiles), self.batch_size):
            batch = tiles[start : start + self.batch_size]
            outputs = self.model(
                [
                    {"image": image[:, y0:y1, x0:x1], "height": y1 - y0, "width": x1 - x0}
                    for x0, y0, x1, y1 in batch
                ]
            )
            for index, (tile, output) in enumerate(zip(batch, outputs), start=start):
                unknown = sorted(set(output) - set(_TILED_OUTPUTS))
                if unknown:
                    raise NotImplementedError(
                        f"tiled inference (RETINA.TILE.ENABLED) assembles {_TILED_OUTPUTS} from "
                        f"tiles; the model also returns {unknown}, which has no tiled form"
                    )
                x0, y0, x1, y1 = tile
                if "instances" in output:
                    pieces = pieces or _Pieces()
                    pieces.add(output["instances"], index, tile)
                if "sem_seg" in output:
                    probs = output["sem_seg"].to("cpu", torch.float32)
                    if semantic is None:
                        semantic = torch.zeros((probs.shape[0], net_h, net_w))
                        weights = torch.zeros((net_h, net_w))
                    w = seam_weights(tile, net_h, net_w, self.overlap)
                    semantic[:, y0:y1, x0:x1] += probs * w
                    weights[y0:y1, x0:x1] += w
        result = {}
        if pieces is not None:
            result["instances"] = self._merged_instances(pieces, tiles, (net_h, net_w), inputs)
        if semantic is not None:
            result["sem_seg"] = self._semantic_in_frame(semantic / weights, (net_h, net_w), inputs)
        return result

    def _merged_instances(
        self, pieces: _Pieces, tiles: List[Rect], net_size: Tuple[int, int], inputs: dict
    ) -> Instances:
        groups = _group_pieces(pieces, tiles, self.merge_iou)
        boxes_all = torch.cat(pieces.boxes) if len(pieces) else torch.zeros((0, 4))
        scores_all = torch.cat(pieces.scores) if len(pieces) else torch.zeros((0,))
        classes_all = (
            torch.cat(pieces.classes) if len(pieces) else torch.zeros((0,), dtype=torch.int64)
        )
        boxes, scores, classes, regions, masks = [], [], [], [], []
        for group in groups:
            members = boxes_all[group]
            boxes.append(
                torch.cat([members[:, :2].min(dim=0).values, members[:, 2:].max(dim=0).values])
            )
            scores.append(scores_all[group].max())
            classes.append(classes_all[group[0]])
            region, mask = self._union_mask(pieces, group)
            regions.append(region)
            masks.append(mask)
        scores_t = torch.stack(scores) if scores else scores_all
        # Highest score first, ties in tile order: the order the untiled model returns.
        order = torch.sort(scores_t, descending=True, stable=True).indices
        if self.max_detections:
            order = order[: self.max_detections]
        net_h, net_w = net_size
        merged = Instances(
            (net_h, net_w),
            pred_boxes=Boxes(torch.stack(boxes)[order] if boxes else boxes_all),
            scores=scores_t[order],
            pred_classes=torch.stack(classes)[order] if classes else classes_all,
        )
        order_list = order.tolist()
        return instances_in_frame(
            merged,
            [regions[i] for i in order_list],
            [masks[i] for i in order_list] if pieces.masks is not None else None,
            inputs,
        )

    @staticmethod
    def _union_mask(pieces: _Pieces, group: List[int]):
        regions = [pieces.regions[i] for i in group]
        region = (
            min(r[0] for r in regions), min(r[1] for r in regions),
            max(r[2] for r in regions), max(r[3] for r in regions),
        )
        if pieces.masks is None:
            return region, None
        if len(group) == 1:
            return region, pieces.masks[group[0]]
        x0, y0, x1, y1 = region
        mask = torch.zeros((y1 - y0, x1 - x0), dtype=torch.bool)
        for i, (rx0, ry0, rx1, ry1) in zip(group, regions):
            mask[ry0 - y0 : ry1 - y0, rx0 - x0 : rx1 - x0] |= pieces.masks[i]
        return region, mask

    def _semantic_in_frame(
        self, probs: torch.Tensor, net_size: Tuple[int, int], inputs: dict
    ) -> torch.Tensor:
        height, width, (fx0, fy0, fx1, fy1) = _frame(inputs, net_size)
        # As semantic_postprocess does for logits, on probabilities: resize to the crop, pad.
        probs = sem_seg_postprocess(probs, net_size, fy1 - fy0, fx1 - fx0)
        if inputs.get("fov_box") is not None:
            probs = F.pad(probs, (fx0, width - fx1, fy0, height - fy1))
        return probs
