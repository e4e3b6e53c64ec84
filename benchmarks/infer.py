"""
``tools/benchmark.py infer``: CPU latency and peak memory of one forward pass at 1024 px, and
training iterations per second, for retina_d2's configs beside Detectron2's stock
``mask_rcnn_R_50_FPN_3x``, each in a fresh process (see :func:`.measure_in_subprocess`).

Weights are random (nothing can be downloaded here), so the number of detections that reach the
mask head differs between models; it is reported beside each latency. The input is a synthetic
fundus photograph of 1024x1024 px, preprocessed by each config's own test-time mapper outside the
timed region.
"""
import logging
import statistics
import time
from pathlib import Path
from typing import Any, Dict

from . import REPO_ROOT, format_table, machine_info, measure_in_subprocess

__all__ = ["add_arguments", "run", "infer_latency", "train_speed"]

logger = logging.getLogger(__name__)

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "infer.json"
STOCK = "detectron2://COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
MODELS = {
    "maskrcnn_eophtha (paper settings, R-50 GN)": "configs/maskrcnn_eophtha.yaml",
    "stock mask_rcnn_R_50_FPN_3x": STOCK,
    "maskrcnn_heimed (CPU-light)": "configs/maskrcnn_heimed.yaml",
}


def _cfg(config: str, size: int):
    from retina_d2.config import get_retina_cfg

    cfg = get_retina_cfg()
    if config == STOCK:
        from detectron2.model_zoo import get_config_file

        cfg.merge_from_file(get_config_file(config.split("://", 1)[1]))
        cfg.MODEL.WEIGHTS = ""
    else:
        cfg.merge_from_file(str(REPO_ROOT / config))
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.MIN_SIZE_TEST = cfg.INPUT.MAX_SIZE_TEST = size
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (size,), size
    cfg.INPUT.CROP.ENABLED = False
    return cfg


def _fundus(size: int):
    import numpy as np

    from retina_d2.data.synthetic import image_rng, render_fundus

    return render_fundus(image_rng(0, 0), size=size).image.astype(np.uint8)


def infer_latency(config: str, size: int = 1024, repeats: int = 3) -> Dict[str, Any]:
    """Median seconds of one forward pass (batch 1, no grad) after one warm-up pass."""
    import torch
    from detectron2.modeling import build_model

    import retina_d2.modeling  # noqa: F401  (registration)

    torch.manual_seed(0)
    cfg = _cfg(config, size)
    model = build_model(cfg).eval()
    image = torch.as_tensor(_fundus(size).transpose(2, 0, 1).copy())
    if cfg.INPUT.FORMAT == "BGR":
        image = image.flip(0)
    inputs = [{"image": image, "height": size, "width": size}]
    times, detections = [], 0
    with torch.no_grad():
        model(inputs)  # warm-up: allocator, lazy inits
        for _ in range(repeats):
            start = time.perf_counter()
            outputs = model(inputs)
            times.append(time.perf_counter() - start)
            # A semantic head returns maps, not instances.
            detections = len(outputs[0]["instances"]) if "instances" in outputs[0] else None
    return {"seconds": statistics.median(times), "seconds_all": times, "detections": detections,
            "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "threads": torch.get_num_threads()}


def train_speed(config: str, size: int = 1024, iterations: int = 3) -> Dict[str, Any]:
    """Iterations per second of training steps (batch 2, Adam/SGD as configured) after a warm-up
    step, on synthetic fundus images with their real lesion masks."""
    import numpy as np
    import torch
    from detectron2.modeling import build_model
    from detectron2.structures import BitMasks, Instances
    from detectron2.utils.events import EventStorage

    import retina_d2.modeling  # noqa: F401
    from retina_d2.data.synthetic import LESION_ABBREVS, image_rng, render_fundus
    from retina_d2.engine.trainer import LesionTrainer
    from retina_d2.data.instances import label_components

    torch.manual_seed(0)
    cfg = _cfg(config, size)
    model = build_model(cfg).train()
    optimizer = LesionTrainer.build_optimizer(cfg, model)
    batch = []
    for index in range(2):
        fundus = render_fundus(image_rng(1, index), size=size)
        masks, classes = [], []
        for k, abbrev in enumerate(LESION_ABBREVS[: cfg.MODEL.ROI_HEADS.NUM_CLASSES]):
            labels = label_components(fundus.masks[abbrev])
            masks += [labels == i for i in range(1, labels.max() + 1)]
            classes += [k] * int(labels.max())
        inst = Instances((size, size))
        inst.gt_masks = BitMasks(torch.from_numpy(np.stack(masks)))
        inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
        inst.gt_classes = torch.tensor(classes)
        image = torch.as_tensor(fundus.image.transpose(2, 0, 1).copy())
        batch.append({"image": image, "instances": inst})
    times = []
    with EventStorage(0):
        for step in range(iterations + 1):
            start = time.perf_counter()
            losses = sum(model(batch).values())
            optimizer.zero_grad()
            losses.backward()
            optimizer.step()
            if step:  # the first step warms up
                times.append(time.perf_counter() - start)
    return {"seconds_per_iter": statistics.median(times), "iter_per_s": 1 / statistics.median(times),
            "instances_per_image": [len(b["instances"]) for b in batch]}


def add_arguments(parser) -> None:
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON file")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3, help="timed forward passes per model")
    parser.add_argument("--train-iterations", type=int, default=2, help="timed training steps")
    parser.add_argument("--no-train", action="store_true", help="skip the training rows")


def run(args) -> dict:
    from retina_d2.data.converters.base import write_json_atomic

    results = {"benchmark": "infer", "size": args.size, "machine": machine_info(), "rows": []}
    for name, config in MODELS.items():
        row = {"name": name, "config": config}
        logger.info("inference: %s", name)
        infer = measure_in_subprocess(
            f"{__name__}:infer_latency", {"config": config, "size": args.size, "repeats": args.repeats}
        )
        row.update({f"infer_{k}": v for k, v in infer.items()})
        if not args.no_train:
            logger.info("training: %s", name)
            train = measure_in_subprocess(
                f"{__name__}:train_speed",
                {"config": config, "size": args.size, "iterations": args.train_iterations},
            )
            row.update({f"train_{k}": v for k, v in train.items()})
        results["rows"].append(row)
    stock = next(r for r in results["rows"] if r["config"] == STOCK)
    for row in results["rows"]:
        if row.get("infer_seconds") and stock.get("infer_seconds"):
            row["infer_x_stock"] = row["infer_seconds"] / stock["infer_seconds"]
    write_json_atomic(args.out, results, indent=2)
    print(format_table(results["rows"], [
        ("model", "name", ""), ("forward s", "infer_seconds", ".2f"),
        ("x stock", "infer_x_stock", ".2f"), ("detections", "infer_detections", "d"),
        ("peak RSS MB", "infer_peak_rss_mb", ".0f"), ("params M", "infer_parameters_m", ".1f"),
        ("train s/iter", "train_seconds_per_iter", ".2f"), ("train it/s", "train_iter_per_s", ".3f"),
        ("train peak MB", "train_peak_rss_mb", ".0f"),
    ]))
    for row in results["rows"]:
        for key in ("infer_error", "train_error"):
            if row.get(key):
                print(f"{row['name']}: {key}: {row[key]}")
    print(f"\nresults: {args.out}")
    return results
