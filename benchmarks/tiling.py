"""
``tools/benchmark.py tiling``: tiled native-resolution inference (``RETINA.TILE``) beside
whole-image inference at the same scale: seconds per image and peak memory, each variant in a
fresh process (:func:`.measure_in_subprocess`). Rows: the whole image; tiles with the model's own
proposal and detection counts; tiles with a per-tile budget (``RETINA.TILE.PROPOSALS_PER_TILE``
/ ``DETECTIONS_PER_TILE``: ``--tile-proposals`` / ``--tile-detections``); and SAHI, the sliced
inference users already use, its slicing and merging around the same model and weights
(:mod:`.sahi_rcnn`; ``--no-sahi`` leaves it out; where SAHI cannot run the row holds the error).

Images: a synthetic 4288x2848 photograph (a rendered eye, upscaled, on a black camera frame) with
a few hundred lesions 1-5 px across, and, where the HEI-MED sample exists (``--heimed-root``,
default ``../shared/data/heimed``), the first ``--heimed-limit`` images of its dev-split
validation set at their full resolution. Model: ``configs/maskrcnn_heimed.yaml`` (the CPU-light
Mask R-CNN) with random weights, or the checkpoint given by ``--weights``.

Finding small lesions needs trained weights. With ``--weights`` each source also gets a row
resized to 1024 px (the paper's scale), and every row reports the recall of the lesions under 10
px across (class-agnostic; a hit is a predicted mask with IoU >= ``RETINA.EVAL.FROC_IOU`` with the
lesion). Without weights the rows give latency and memory only, as the results' ``note`` says;
random weights also decide how many detections (full-image masks) each variant outputs, which is
reported beside the memory.
"""
import logging
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from . import REPO_ROOT, format_table, machine_info, measure_in_subprocess

__all__ = ["add_arguments", "run", "infer_images", "small_lesion_recall", "synthetic_photograph"]

logger = logging.getLogger(__name__)

CONFIG = "configs/maskrcnn_heimed.yaml"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "tiling.json"
DEFAULT_HEIMED = REPO_ROOT.parent / "shared" / "data" / "heimed"
SPLIT = REPO_ROOT / "configs" / "splits" / "heimed_dev.json"
# Lesions smaller than this across (bounding box's longer side, native pixels) are "small".
SMALL_LESION_PX = 10
# --size: the synthetic photograph's (height, width), lesion count, and default tile / overlap.
SIZES = {"full": ((2848, 4288), 300, 512, 64), "small": ((426, 640), 40, 256, 32)}
_LESION_RGB = (95, 25, 12)  # dark red: microaneurysms and dot haemorrhages
# The budgeted tiled row's (proposals, detections) per tile. A 512 px tile is 1/16 of a HEI-MED
# photograph and 1/47 of a 4288x2848 one; the config's whole-image 1000 proposals / 256
# detections scaled by that area would be 20-60 / 5-16, so these leave a tile several times a
# whole image's density (a tile's lesions are not spread evenly: most tiles hold none).
DEFAULT_BUDGET = (100, 50)


def synthetic_photograph(height: int, width: int, lesions: int, seed: int = 0):
    """A fundus photograph at a camera's frame size with ``lesions`` dark discs 1-5 px across.

    The eye is :func:`retina_d2.data.synthetic.render_fundus` (healthy) rendered at a quarter of
    the frame's height and upscaled (a smooth background costs nothing to render that way),
    centred on a black frame. The discs lie inside the field of view, at least 8 px apart.

    Returns:
        ``(image, labels)``: ``height x width x 3`` uint8 RGB and an int32 map of lesion ids
        (0 = background, 1..lesions).
    """
    import cv2

    from retina_d2.data.synthetic import image_rng, render_fundus

    rng = np.random.default_rng(seed)
    eye = render_fundus(image_rng(seed, 0), size=max(128, height // 4), healthy=True).image
    eye = cv2.resize(eye, (height, height), interpolation=cv2.INTER_LINEAR)
    image = np.zeros((height, width, 3), np.uint8)
    left = (width - height) // 2
    image[:, left : left + height] = eye
    labels = np.zeros((height, width), np.int32)
    centre, radius = ((height - 1) / 2, left + (height - 1) / 2), 0.42 * height
    placed: List[tuple] = []
    while len(placed) < lesions:
        r, angle = radius * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
        y, x = int(centre[0] + r * np.sin(angle)), int(centre[1] + r * np.cos(angle))
        if any(abs(y - py) < 8 and abs(x - px) < 8 for py, px in placed):
            continue
        placed.append((y, x))
        diameter = int(rng.integers(1, 6))
        yy, xx = np.mgrid[0:diameter, 0:diameter]
        half = (diameter - 1) / 2
        disc = (yy - half) ** 2 + (xx - half) ** 2 <= (diameter / 2) ** 2
        rows, cols = np.nonzero(disc)
        labels[y + rows, x + cols] = len(placed)
        image[y + rows, x + cols] = _LESION_RGB
    return image, labels


def small_lesion_recall(labels: np.ndarray, pred_masks, iou_threshold: float,
                        max_side: int = SMALL_LESION_PX) -> Dict[str, int]:
    """How many lesions of ``labels`` under ``max_side`` px across a prediction finds.

    Args:
        labels: int map of lesion ids (0 = background) in the image's pixels.
        pred_masks: (N, H, W) bool tensor of predicted masks, any class.
        iou_threshold: a lesion is found by a mask with at least this IoU with it.

    Returns:
        ``{"small_lesions": total, "small_found": found}``.
    """
    import torch
    from scipy import ndimage

    # numpy's count: torch sums a bool tensor through an int64 copy of it (8x the masks' memory,
    # ~10 GB for 100 masks at 4288x2848), which the peak RSS of the variant would then report.
    areas = torch.from_numpy(np.count_nonzero(pred_masks.numpy(), axis=(1, 2)))
    total = found = 0
    for lesion_id, where in enumerate(ndimage.find_objects(labels), start=1):
        if where is None:
            continue
        rows, cols = where
        if max(rows.stop - rows.start, cols.stop - cols.start) >= max_side:
            continue
        total += 1
        lesion = torch.from_numpy(labels[where] == lesion_id)
        inter = (pred_masks[:, rows, cols] & lesion).flatten(1).sum(1)
        iou = inter.double() / (int(lesion.sum()) + areas - inter).clamp(min=1)
        found += bool((iou >= iou_threshold).any())
    return {"small_lesions": total, "small_found": found}


def _cfg(tiled: bool, tile: int, overlap: int, min_size: int, detections: Optional[int],
         device: str, weights: Optional[str], amp: bool = False, proposals_per_tile: int = 0,
         detections_per_tile: int = 0):
    from retina_d2.config import get_retina_cfg
    from retina_d2.modeling.amp import autocast_dtype_name

    cfg = get_retina_cfg()
    cfg.merge_from_file(str(REPO_ROOT / CONFIG))
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = weights or ""
    cfg.INPUT.MIN_SIZE_TEST = min_size
    cfg.INPUT.MAX_SIZE_TEST = max(min_size, cfg.INPUT.MAX_SIZE_TEST)
    if detections:
        cfg.TEST.DETECTIONS_PER_IMAGE = detections
    cfg.RETINA.TILE.ENABLED = tiled
    cfg.RETINA.TILE.SIZE, cfg.RETINA.TILE.OVERLAP = tile, overlap
    cfg.RETINA.TILE.PROPOSALS_PER_TILE = proposals_per_tile
    cfg.RETINA.TILE.DETECTIONS_PER_TILE = detections_per_tile
    cfg.RETINA.INFERENCE.AMP = amp
    cfg.RETINA.INFERENCE.AMP_DTYPE = autocast_dtype_name(device)
    return cfg


def _labels(truth: Optional[Dict[str, str]]) -> Optional[np.ndarray]:
    if truth is None:
        return None
    if truth["kind"] == "npy":
        return np.load(truth["path"])
    from retina_d2.data.converters.heimed import load_blobs

    return load_blobs(Path(truth["path"]))[0]


class _SahiRunner:
    """SAHI's sliced prediction (:mod:`.sahi_rcnn`) with the inference model's list-in,
    list-out contract."""

    def __init__(self, cfg, model, tile: int, overlap: int):
        from .sahi_rcnn import LesionSahiModel, SlicePredictor

        classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
        self.detection_model = LesionSahiModel(
            model=SlicePredictor(model, cfg.INPUT.FORMAT), device=cfg.MODEL.DEVICE,
            # SAHI keeps what the model keeps: its default 0.3 would cut the model's 0.05.
            confidence_threshold=cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
            category_mapping={str(i): str(i) for i in range(classes)},
        )
        self.tile, self.overlap = tile, overlap
        self.max_detections = cfg.TEST.DETECTIONS_PER_IMAGE
        self.mask_on = cfg.MODEL.MASK_ON

    def __call__(self, batched_inputs: List[dict]) -> List[dict]:
        from .sahi_rcnn import sliced_instances

        return [{"instances": sliced_instances(self.detection_model, inputs, self.tile,
                                               self.overlap, self.max_detections, self.mask_on)}
                for inputs in batched_inputs]


def infer_images(images: List[Dict[str, Any]], tiled: bool, tile: int, overlap: int,
                 min_size: int = 0, detections: Optional[int] = None, device: str = "cpu",
                 weights: Optional[str] = None, repeats: int = 1, amp: bool = False,
                 proposals_per_tile: int = 0, detections_per_tile: int = 0,
                 sahi: bool = False) -> Dict[str, Any]:
    """Seconds per image of one variant over ``images`` (``{"file": path, "truth": ...}``), and
    the recall of small lesions when weights are given. Runs in its own process. ``amp``: under
    autocast (RETINA.INFERENCE.AMP). ``proposals_per_tile``, ``detections_per_tile``: the tiles'
    budget (RETINA.TILE, 0 = the model's own). ``sahi``: SAHI slices and merges (``tile`` /
    ``overlap`` its slices) around the untiled inference model, instead of RETINA.TILE."""
    import torch
    from detectron2.modeling import build_model

    import retina_d2.modeling  # noqa: F401  (registration)
    from retina_d2.data.mapper import LesionDatasetMapper
    from retina_d2.engine import LesionTrainer
    from retina_d2.modeling import LesionCheckpointer

    if sahi:  # first: where SAHI cannot be imported the row says so before any model is built
        from . import sahi_rcnn  # noqa: F401
    torch.manual_seed(0)
    cfg = _cfg(tiled and not sahi, tile, overlap, min_size, detections, device, weights, amp,
               proposals_per_tile, detections_per_tile)
    model = build_model(cfg).eval()
    if weights:
        LesionCheckpointer(model).load(weights)
    runner = LesionTrainer.build_inference_model(cfg, model).eval()
    if sahi:
        runner = _SahiRunner(cfg, runner, tile, overlap)
    mapper = LesionDatasetMapper(cfg, is_train=False)
    with torch.no_grad():  # warm-up on a small input: allocator and lazy inits out of the timing
        runner([{"image": torch.zeros((3, 128, 128), dtype=torch.uint8), "height": 128, "width": 128}])
    seconds, detections_out, found, total = [], [], 0, 0
    pre_infer_rss = 0.0
    for item in images:
        inputs = mapper({"file_name": item["file"]})
        pre_infer_rss = max(pre_infer_rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            with torch.no_grad():
                output = runner([inputs])[0]
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        seconds.append(statistics.median(times))
        instances = output["instances"].to("cpu")
        detections_out.append(len(instances))
        labels = _labels(item.get("truth")) if weights else None
        if labels is not None:
            counts = small_lesion_recall(labels, instances.pred_masks, cfg.RETINA.EVAL.FROC_IOU)
            total += counts["small_lesions"]
            found += counts["small_found"]
        del output, instances, inputs
    result = {
        "seconds_per_image": statistics.mean(seconds),
        "seconds_all": seconds,
        "detections_per_image": statistics.mean(detections_out),
        "network_input": "native" if min_size == 0 else f"{min_size} px",
        "pre_infer_rss_mb": pre_infer_rss / 1024,
        "threads": torch.get_num_threads(),
    }
    if sahi:
        import sahi as sahi_package

        from .sahi_rcnn import sahi_settings

        result["sahi"] = {"version": sahi_package.__version__, **sahi_settings(tile, overlap)}
    if weights:
        result.update(small_lesions=total, small_found=found,
                      small_recall=found / total if total else None)
    if device.startswith("cuda"):
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def _heimed_images(root: Path, limit: int) -> List[Dict[str, Any]]:
    import json

    if limit <= 0 or not root.is_dir():
        return []
    names = json.loads(SPLIT.read_text())["val"][:limit]
    files = [root / f"{name}.jpg" for name in names]
    return [{"file": str(f), "truth": {"kind": "heimed", "path": str(f)}}
            for f in files if f.is_file()]


def add_arguments(parser) -> None:
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON file")
    parser.add_argument("--size", choices=list(SIZES), default="full",
                        help="synthetic photograph: full = 4288x2848, small = 640x426 (a smoke "
                        "test; HEI-MED is skipped)")
    parser.add_argument("--tile", type=int, help="tile side (default: 512 full, 256 small)")
    parser.add_argument("--overlap", type=int, help="tile overlap (default: 64 full, 32 small)")
    parser.add_argument("--weights", help="a trained checkpoint: adds recall and the 1024 px rows")
    parser.add_argument("--heimed-root", type=Path, default=DEFAULT_HEIMED)
    parser.add_argument("--heimed-limit", type=int, default=3,
                        help="HEI-MED validation images (0: none)")
    parser.add_argument("--detections", type=int,
                        help="TEST.DETECTIONS_PER_IMAGE (default: the config's)")
    parser.add_argument("--tile-proposals", type=int, default=DEFAULT_BUDGET[0],
                        help="the budgeted tiled row's RETINA.TILE.PROPOSALS_PER_TILE")
    parser.add_argument("--tile-detections", type=int, default=DEFAULT_BUDGET[1],
                        help="the budgeted tiled row's RETINA.TILE.DETECTIONS_PER_TILE")
    parser.add_argument("--no-sahi", action="store_true", help="leave out the SAHI row")
    parser.add_argument("--no-synthetic", action="store_true",
                        help="leave out the synthetic photograph (HEI-MED only)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes per image")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per variant")


def _iteration(weights: Optional[str]) -> Optional[int]:
    """The training iteration a checkpoint was saved at (None: no weights or none recorded)."""
    if not weights:
        return None
    from retina_d2.safe_load import load_checkpoint

    iteration = load_checkpoint(weights).get("iteration")
    return None if iteration is None else int(iteration)


def _variants(args) -> List[tuple]:
    """(row name, infer_images options) of every variant the arguments ask for."""
    budget = (args.tile_proposals, args.tile_detections)
    variants = [
        ("whole image, native", {"tiled": False}),
        ("tiled, native", {"tiled": True}),
        (f"tiled, native, {budget[0]} proposals / {budget[1]} detections per tile",
         {"tiled": True, "proposals_per_tile": budget[0], "detections_per_tile": budget[1]}),
    ]
    if not args.no_sahi:
        variants.append(("SAHI slices (Detectron2 adapter), native", {"tiled": True, "sahi": True}))
    if args.weights:
        variants.append(("whole image, 1024 px", {"tiled": False, "min_size": 1024}))
    return variants


def run(args) -> dict:
    from PIL import Image

    from retina_d2.data.converters.base import write_json_atomic

    (height, width), lesions, tile, overlap = SIZES[args.size]
    tile, overlap = args.tile or tile, args.overlap or overlap
    results = {
        "benchmark": "tiling", "config": CONFIG, "size": args.size, "tile": tile,
        "overlap": overlap, "weights": args.weights, "device": args.device,
        "machine": machine_info(), "rows": [],
        "note": (
            f"recall of lesions < {SMALL_LESION_PX} px across with the given weights"
            if args.weights else
            "random weights: latency and memory only (recall of small lesions needs --weights)"
        ),
        "weights_iteration": _iteration(args.weights),
        "tile_budget": {"proposals_per_tile": args.tile_proposals,
                        "detections_per_tile": args.tile_detections},
    }
    if not args.no_sahi:
        results["sahi_note"] = (
            "SAHI row: SAHI's get_sliced_prediction and its Detectron2 adapter given our built "
            "model (benchmarks/sahi_rcnn.py) on the mapper's network input, slices of "
            "the tile size and overlap, no extra whole-image pass, SAHI's GREEDYNMM / IOS 0.5 "
            "merge (forced: SAHI switches to NMS under a 0.1 model threshold), the model's own "
            "per-image settings on each slice (its 1000 proposals and lesion merge), the merged "
            "predictions capped at TEST.DETECTIONS_PER_IMAGE by score. SAHI turns masks into "
            "polygons of at least 3 contour points: a prediction whose mask is 1-2 px in a line "
            "is dropped")
    with tempfile.TemporaryDirectory(prefix="retina_d2_tiling_") as tmp:
        sources = {}
        if not args.no_synthetic:
            image, labels = synthetic_photograph(height, width, lesions)
            Image.fromarray(image).save(Path(tmp) / "synthetic.png")
            np.save(Path(tmp) / "synthetic.npy", labels)
            sources[f"synthetic {width}x{height}"] = [{
                "file": str(Path(tmp) / "synthetic.png"),
                "truth": {"kind": "npy", "path": str(Path(tmp) / "synthetic.npy")},
            }]
        heimed = [] if args.size == "small" else _heimed_images(args.heimed_root, args.heimed_limit)
        if heimed:
            sources[f"HEI-MED val ({len(heimed)} images, native)"] = heimed
        if not sources:
            raise SystemExit("error: no images: --no-synthetic and no HEI-MED images at "
                             f"{args.heimed_root} (--heimed-limit {args.heimed_limit})")
        for source, images in sources.items():
            for name, options in _variants(args):
                logger.info("%s: %s", source, name)
                row = {"source": source, "variant": name, "images": len(images)}
                row.update(measure_in_subprocess(
                    f"{__name__}:infer_images",
                    {"images": images, "tile": tile, "overlap": overlap,
                     "detections": args.detections, "device": args.device,
                     "weights": args.weights, "repeats": args.repeats, **options},
                    timeout=args.timeout,
                ))
                results["rows"].append(row)
    write_json_atomic(args.out, results, indent=2)
    print(format_table(results["rows"], [
        ("images", "source", ""), ("variant", "variant", ""),
        ("s / image", "seconds_per_image", ".2f"), ("peak RSS MB", "peak_rss_mb", ".0f"),
        ("RSS before inference MB", "pre_infer_rss_mb", ".0f"),
        ("detections", "detections_per_image", ".0f"), ("small recall", "small_recall", ".3f"),
    ]))
    for row in results["rows"]:
        if row.get("error"):
            print(f"{row['source']} / {row['variant']}: {row['error']}")
    print(f"\n{results['note']}\nresults: {args.out}")
    return results
