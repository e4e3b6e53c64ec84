"""``LandmarkHeatmapHead``: optic disc and fovea centres as one heatmap per landmark.

A few backbone features (``MODEL.LOCALIZATION.IN_FEATURES``) are projected by 1x1 convs,
upsampled to the finest one's stride and summed; 3x3 conv-norm-ReLU layers and a 1x1 conv give
one logit map per landmark. A map is a distribution over its cells (softmax over the cells whose
centre lies inside the image, padding excluded); its target is a Gaussian of ``SIGMA`` input pixels
around the landmark, normalised the same way, and the loss is their KL divergence, averaged over
the (image, landmark) pairs that have the landmark: a landmark the record lacks, or that a crop
moved out of the image, is masked out, never read as (0, 0). At inference the position is the
probability-weighted mean of the cells within ``REFINE_RADIUS`` of the map's peak (sub-cell
precision without the bias a whole-map soft-argmax takes from a second bright spot), and its
score the probability mass there.

Why heatmaps rather than regressing (x, y) from pooled features: a conv heatmap is translation
equivariant, so it learns what a disc looks like, not where discs usually sit, which tens of
training images (HEI-MED's 30) cannot teach a regressor; crops, flips and rotations move the
target with the image and a landmark cropped away simply drops out of the loss, where a regressor
would have to point outside its input; and two candidates (a disc and a bright exudate cluster)
stay two peaks, of which the decoder takes one, instead of being averaged to a point between them.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec
from torch import nn

from .semantic.common import check_in_features, conv_norm_relu

__all__ = [
    "LANDMARKS",
    "LandmarkHeatmapHead",
    "decode_heatmaps",
    "gaussian_heatmaps",
    "heatmap_loss",
    "landmark_targets",
    "to_original_frame",
    "valid_cells",
]

# The landmarks a head may find (the mapper's "landmarks" names).
LANDMARKS = ("optic_disc", "fovea")
# Logit of the cells outside the image: finite, so that 0 * log p stays 0, and far below any
# logit a head produces.
_OUTSIDE_LOGIT = -1e4


def _cell_centres(length: int, stride: int, device) -> torch.Tensor:
    """Centres of a map's cells along one axis, in input pixels: cell j spans [j*s, (j+1)*s)."""
    return (torch.arange(length, device=device, dtype=torch.float32) + 0.5) * stride


def valid_cells(image_sizes: Sequence[Tuple[int, int]], map_size, stride: int, device):
    """(N, 1, H, W) bool: the map cells whose centre lies inside each image (not its padding)."""
    height, width = map_size
    ys = _cell_centres(height, stride, device)
    xs = _cell_centres(width, stride, device)
    sizes = torch.tensor([list(s) for s in image_sizes], dtype=torch.float32, device=device)
    inside_y = ys[None, :] < sizes[:, :1]  # (N, H)
    inside_x = xs[None, :] < sizes[:, 1:]  # (N, W)
    return (inside_y[:, :, None] & inside_x[:, None, :])[:, None]


def landmark_targets(
    batched_inputs: List[dict], landmarks: Sequence[str], device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The inputs' ``"landmarks"`` ({name: (x, y)} in input pixels, from the mapper) as
    (N, L, 2) float positions and an (N, L) bool mask of the ones present."""
    points = torch.zeros((len(batched_inputs), len(landmarks), 2), dtype=torch.float32)
    present = torch.zeros((len(batched_inputs), len(landmarks)), dtype=torch.bool)
    for i, inputs in enumerate(batched_inputs):
        found = inputs.get("landmarks") or {}
        for j, name in enumerate(landmarks):
            if name in found:
                points[i, j] = torch.as_tensor(found[name], dtype=torch.float32)
                present[i, j] = True
    return points.to(device), present.to(device)


def gaussian_heatmaps(
    points: torch.Tensor, present: torch.Tensor, valid: torch.Tensor, stride: int, sigma: float
) -> torch.Tensor:
    """Target distributions: for each present landmark, a Gaussian of ``sigma`` input pixels
    around ``points`` sampled at the valid cells' centres and normalised to sum 1; all zero for
    an absent one.

    Args:
        points: (N, L, 2) x, y in input pixels.
        present: (N, L) bool.
        valid: (N, 1, H, W) bool (:func:`valid_cells`).
        stride: input pixels per cell.
        sigma: in input pixels.

    Returns:
        (N, L, H, W) float.
    """
    height, width = valid.shape[-2:]
    ys = _cell_centres(height, stride, points.device)
    xs = _cell_centres(width, stride, points.device)
    dx2 = (xs[None, None, :] - points[..., :1]) ** 2  # (N, L, W)
    dy2 = (ys[None, None, :] - points[..., 1:]) ** 2  # (N, L, H)
    # Subtract each point's nearest squared distance so that a landmark far from every cell
    # centre (a coarse map) still gets a finite, normalisable target.
    d2 = dy2[..., :, None] + dx2[..., None, :]
    d2 = d2 - d2.flatten(2).amin(dim=2)[..., None, None]
    heat = torch.exp(-d2 / (2.0 * sigma**2)) * valid
    heat = heat * present[..., None, None]
    total = heat.flatten(2).sum(dim=2).clamp_min(1e-12)
    return heat / total[..., None, None]


def _masked_log_softmax(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log_softmax over each map's valid cells; invalid cells get a very low log-probability."""
    masked = logits.float().masked_fill(~valid, _OUTSIDE_LOGIT)
    return F.log_softmax(masked.flatten(2), dim=2).view_as(masked)


def heatmap_loss(
    logits: torch.Tensor, targets: torch.Tensor, present: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Mean KL(target || softmax(logits)) over the present (image, landmark) pairs; absent ones
    are masked out. Zero (still attached to the graph) when no landmark is present.

    Args:
        logits: (N, L, H, W).
        targets: (N, L, H, W) distributions (:func:`gaussian_heatmaps`).
        present: (N, L) bool.
        valid: (N, 1, H, W) bool.
    """
    if not present.any():
        return logits.sum() * 0.0
    log_probs = _masked_log_softmax(logits, valid)
    log_targets = torch.log(targets.clamp_min(1e-12))
    kl = (targets * (log_targets - log_probs)).flatten(2).sum(dim=2)  # (N, L)
    return kl[present].mean()


def decode_heatmaps(
    logits: torch.Tensor, valid: torch.Tensor, stride: int, radius: int = 2
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Positions and scores of the maps' peaks.

    Args:
        logits: (N, L, H, W).
        valid: (N, 1, H, W) bool.
        stride: input pixels per cell.
        radius: cells on each side of the peak in the weighted mean (0: the peak cell's centre).

    Returns:
        (N, L, 2) x, y in input pixels and (N, L) scores: the probability mass within the window.
    """
    probs = _masked_log_softmax(logits, valid).exp() * valid
    n, num, height, width = probs.shape
    peak = probs.flatten(2).argmax(dim=2)  # (N, L)
    rows, cols = peak // width, peak % width
    ys = _cell_centres(height, stride, logits.device)
    xs = _cell_centres(width, stride, logits.device)
    points = torch.zeros((n, num, 2), dtype=torch.float32, device=logits.device)
    scores = torch.zeros((n, num), dtype=torch.float32, device=logits.device)
    for i in range(n):
        for j in range(num):
            r, c = int(rows[i, j]), int(cols[i, j])
            r0, r1 = max(0, r - radius), min(height, r + radius + 1)
            c0, c1 = max(0, c - radius), min(width, c + radius + 1)
            window = probs[i, j, r0:r1, c0:c1]
            mass = window.sum()
            points[i, j, 0] = (window.sum(dim=0) * xs[c0:c1]).sum() / mass
            points[i, j, 1] = (window.sum(dim=1) * ys[r0:r1]).sum() / mass
            scores[i, j] = mass
    return points, scores


def to_original_frame(
    points: torch.Tensor,
    image_size: Tuple[int, int],
    height: int,
    width: int,
    fov_box: Optional[Sequence[float]] = None,
) -> torch.Tensor:
    """(..., 2) x, y in the network input -> the original image's pixels.

    The test-time mapper only crops the field of view (``fov_box = [x0, y0, x1, y1]``, original
    pixels) and resizes, both linear in coordinates (Detectron2's ``apply_coords``), so the
    inverse is a scale to the crop's size and a shift by its corner.

    Args:
        points: in input pixels of an image of ``image_size`` (h, w), padding excluded.
        height, width: the original image's size.
        fov_box: the mapper's crop, or None for the whole image.
    """
    if fov_box is None:
        x0, y0, x1, y1 = 0, 0, width, height
    else:
        x0, y0, x1, y1 = (int(round(v)) for v in fov_box)
    scale = points.new_tensor([(x1 - x0) / image_size[1], (y1 - y0) / image_size[0]])
    return points * scale + points.new_tensor([x0, y0])


class LandmarkHeatmapHead(nn.Module):
    """One heatmap per landmark from summed backbone features; see the module docstring."""

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        landmarks: Sequence[str],
        conv_dims: int = 64,
        num_convs: int = 2,
        norm: str = "GN",
        sigma: float = 12.0,
        refine_radius: int = 2,
    ):
        """
        Args:
            input_shape: the features summed, by name (the finest stride is the heatmap's).
            landmarks: names of the landmarks, one map each (:data:`LANDMARKS`).
            conv_dims: channels of the projections and convs.
            num_convs: 3x3 conv-norm-ReLU layers after the sum.
            norm: their normalisation ("GN", "" for none, ...).
            sigma: of the Gaussian targets, in input pixels.
            refine_radius: cells around the peak averaged at inference.
        """
        super().__init__()
        unknown = [name for name in landmarks if name not in LANDMARKS]
        if not landmarks or unknown or len(set(landmarks)) != len(landmarks):
            raise ValueError(
                f"MODEL.LOCALIZATION.LANDMARKS {list(landmarks)}: name each of {LANDMARKS} at "
                "most once, at least one"
            )
        if not input_shape:
            raise ValueError("LandmarkHeatmapHead needs at least one feature")
        if sigma <= 0 or refine_radius < 0:
            raise ValueError(
                f"MODEL.LOCALIZATION.SIGMA must be > 0 and REFINE_RADIUS >= 0, got {sigma}, "
                f"{refine_radius}"
            )
        self.landmarks = list(landmarks)
        self.in_features = sorted(input_shape, key=lambda f: input_shape[f].stride)
        self.stride = input_shape[self.in_features[0]].stride
        self.sigma = float(sigma)
        self.refine_radius = int(refine_radius)
        self.lateral = nn.ModuleDict()
        for name in self.in_features:
            conv = Conv2d(input_shape[name].channels, conv_dims, kernel_size=1)
            weight_init.c2_xavier_fill(conv)
            self.lateral[name] = conv
        self.convs = nn.Sequential(
            *[conv_norm_relu(conv_dims, conv_dims, 3, norm) for _ in range(num_convs)]
        )
        self.predictor = Conv2d(conv_dims, len(self.landmarks), kernel_size=1)
        nn.init.normal_(self.predictor.weight, std=0.01)
        nn.init.zeros_(self.predictor.bias)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        node = cfg.MODEL.LOCALIZATION
        check_in_features("MODEL.LOCALIZATION.IN_FEATURES", node.IN_FEATURES, input_shape)
        return {
            "input_shape": {f: input_shape[f] for f in node.IN_FEATURES},
            "landmarks": list(node.LANDMARKS),
            "conv_dims": node.CONVS_DIM,
            "num_convs": node.NUM_CONVS,
            "norm": node.NORM,
            "sigma": node.SIGMA,
            "refine_radius": node.REFINE_RADIUS,
        }

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, L, H, W) logits at the finest feature's stride."""
        finest = features[self.in_features[0]]
        size = finest.shape[-2:]
        x = self.lateral[self.in_features[0]](finest)
        for name in self.in_features[1:]:
            coarse = self.lateral[name](features[name])
            x = x + F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
        return self.predictor(self.convs(x))

    def losses(
        self, logits: torch.Tensor, batched_inputs: List[dict], image_sizes
    ) -> Dict[str, torch.Tensor]:
        """{"loss_landmarks"}: :func:`heatmap_loss` against the inputs' ``"landmarks"``."""
        valid = valid_cells(image_sizes, logits.shape[-2:], self.stride, logits.device)
        points, present = landmark_targets(batched_inputs, self.landmarks, logits.device)
        targets = gaussian_heatmaps(points, present, valid, self.stride, self.sigma)
        return {"loss_landmarks": heatmap_loss(logits, targets, present, valid)}

    def inference(self, logits: torch.Tensor, image_sizes) -> Tuple[torch.Tensor, torch.Tensor]:
        """(N, L, 2) positions in input pixels and (N, L) scores (:func:`decode_heatmaps`)."""
        valid = valid_cells(image_sizes, logits.shape[-2:], self.stride, logits.device)
        return decode_heatmaps(logits, valid, self.stride, self.refine_radius)
