"""
``tools/benchmark.py gpu``: training and inference images per second on a CUDA GPU, with and
without mixed precision, and tiled native-resolution inference on the GPU.

For each config (default: ``maskrcnn_idrid.yaml``, the paper's R50-FPN Mask R-CNN at 1024 px, and
``maskrcnn_heimed.yaml``, the light trunk trained on 512 px native crops) and each precision:

* **train**: Detectron2's trainer as ``tools/train_net.py`` runs it (``LesionTrainer``, the
  lesion mapper with its preprocessing, ``SOLVER.AMP.ENABLED`` picking Detectron2's
  ``AMPTrainer``) on a generated synthetic dataset of 1024 px photographs. Images per second =
  ``IMS_PER_BATCH`` x timed iterations / their wall time (data loading included, as a user waits
  for it), after ``--warmup`` untimed iterations. The loss of the last iteration must be finite.
* **infer**: the evaluation model (``LesionTrainer.build_inference_model``: mixed precision is
  ``RETINA.INFERENCE.AMP``) on the validation photographs, one at a time, after two untimed
  passes; the mapper's preprocessing is done before the clock starts (the GPU's share only).

Then :func:`.tiling.infer_images` on the synthetic 4288x2848 photograph of the tiling benchmark:
whole-image vs tiled inference at native resolution, with and without mixed precision.

Each variant runs in a fresh process (:func:`.measure_in_subprocess`); its peak GPU memory is
``torch.cuda.max_memory_allocated``. Weights are random (the speed of a trained model is the same;
its detections count, capped by ``TEST.DETECTIONS_PER_IMAGE``, is reported beside the speed).
``--device cpu`` runs the same code without a GPU (a smoke test; AMP then means bfloat16).
"""
import logging
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

from . import REPO_ROOT, format_table, machine_info, measure_in_subprocess, run_tool

__all__ = ["add_arguments", "run", "train_speed", "infer_speed"]

logger = logging.getLogger(__name__)

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "gpu.json"
CONFIGS = ("configs/maskrcnn_idrid.yaml", "configs/maskrcnn_heimed.yaml")


def _cfg(config: str, device: str, amp: bool, output_dir: str):
    from retina_d2.config import get_retina_cfg
    from retina_d2.modeling.amp import autocast_dtype_name

    cfg = get_retina_cfg()
    cfg.merge_from_file(str(REPO_ROOT / config))
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 5  # the synthetic dataset's five lesion types
    cfg.DATASETS.TRAIN = ("synthetic_seg_train",)
    cfg.DATASETS.TEST = ()
    cfg.SOLVER.AMP.ENABLED = amp
    cfg.RETINA.INFERENCE.AMP = amp
    cfg.RETINA.INFERENCE.AMP_DTYPE = autocast_dtype_name(device)
    cfg.TEST.EVAL_PERIOD = 0
    cfg.RETINA.EVAL.REPORT = False
    cfg.SOLVER.CHECKPOINT_PERIOD = 10**9
    cfg.DATALOADER.NUM_WORKERS = min(8, os.cpu_count() or 1)
    cfg.OUTPUT_DIR = output_dir
    return cfg


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _gpu_peak(device: str) -> Dict[str, Any]:
    import torch

    if not device.startswith("cuda"):
        return {}
    return {"cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20,
            "gpu": torch.cuda.get_device_name()}


def train_speed(config: str, datasets: str, amp: bool, iterations: int, warmup: int,
                device: str = "cuda") -> Dict[str, Any]:
    """Images per second of ``iterations`` training steps after ``warmup`` (>= 1) untimed ones."""
    if warmup < 1 or iterations < 1:
        raise ValueError(f"need warmup >= 1 and iterations >= 1, got {warmup} and {iterations}")
    from detectron2.engine import HookBase

    from retina_d2.data.register import register_all
    from retina_d2.engine import LesionTrainer

    class StepClock(HookBase):
        # The wall time between consecutive step ends: data, forward, backward, optimizer.
        def __init__(self):
            self.ends: List[float] = []

        def after_step(self):
            _sync(device)
            self.ends.append(time.perf_counter())

    os.environ["RETINA_D2_DATASETS"] = datasets  # register_all finds the synthetic set there
    with tempfile.TemporaryDirectory(prefix="retina_d2_gpu_train_") as out:
        cfg = _cfg(config, device, amp, out)
        cfg.SOLVER.MAX_ITER = warmup + iterations
        cfg.SOLVER.STEPS = ()
        cfg.SOLVER.WARMUP_ITERS = 0
        cfg.freeze()
        register_all()
        trainer = LesionTrainer(cfg)
        trainer.resume_or_load(resume=False)
        clock = StepClock()
        trainer.register_hooks([clock])
        trainer.train()
        loss = trainer.storage.history("total_loss").latest()
        # Detectron2's data_time: how long each step waited for its batch (the loader's share).
        data_wait = [v for v, it in trainer.storage.history("data_time").values() if it >= warmup]
        trainer_kind = type(trainer._trainer).__name__
    # Each timed step runs from the previous step's end to its own: warmup >= 1 gives the first.
    steps_s = [b - a for a, b in zip(clock.ends[warmup - 1:], clock.ends[warmup:])]
    seconds, steps, batch = sum(steps_s), len(steps_s), cfg.SOLVER.IMS_PER_BATCH
    return {
        "images_per_second": batch * steps / seconds,
        "seconds_per_iteration": statistics.median(steps_s),
        "data_wait_seconds": statistics.median(data_wait) if data_wait else None,
        "batch": batch, "iterations": steps, "trainer": trainer_kind,
        "last_total_loss": loss, "loss_finite": math.isfinite(loss), **_gpu_peak(device),
    }


def infer_speed(config: str, amp: bool, images: List[str], passes: int = 20,
                device: str = "cuda") -> Dict[str, Any]:
    """Images per second of the evaluation model over ``passes`` images taken in turn from
    ``images`` (mapped before the clock)."""
    import torch
    from detectron2.modeling import build_model

    from retina_d2.data.mapper import LesionDatasetMapper
    from retina_d2.engine import LesionTrainer

    cfg = _cfg(config, device, amp, output_dir="")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    runner = LesionTrainer.build_inference_model(cfg, model).eval()
    mapper = LesionDatasetMapper(cfg, is_train=False)
    inputs = [mapper({"file_name": f}) for f in images]
    detections = []
    with torch.no_grad():
        for _ in range(2):  # cuDNN's algorithm choice and the allocator out of the timing
            runner([inputs[0]])
        _sync(device)
        start = time.perf_counter()
        for i in range(passes):
            detections.append(len(runner([inputs[i % len(inputs)]])[0]["instances"]))
        _sync(device)
        seconds = time.perf_counter() - start
    size = tuple(inputs[0]["image"].shape[-2:])
    return {
        "images_per_second": passes / seconds, "images": len(inputs), "passes": passes,
        "network_input": f"{size[1]}x{size[0]}", "detections_per_image": statistics.mean(detections),
        **_gpu_peak(device),
    }


def add_arguments(parser) -> None:
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON file")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), help="configs to time")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--iterations", type=int, default=40, help="timed training iterations")
    parser.add_argument("--warmup", type=int, default=10, help="untimed training iterations")
    parser.add_argument("--passes", type=int, default=20, help="timed inference passes")
    parser.add_argument("--count", type=int, default=16,
                        help="synthetic photographs generated (a quarter are the val images)")
    parser.add_argument("--size", type=int, default=1024, help="synthetic photographs' side")
    parser.add_argument("--tiling", choices=["full", "small", "none"], default="full",
                        help="tiled-vs-whole rows on the tiling benchmark's synthetic photograph "
                        "(full = 4288x2848, small = 640x426, none = skip)")
    parser.add_argument("--tasks", nargs="+", choices=["train", "infer"], default=["train", "infer"])
    parser.add_argument("--timeout", type=float, default=900, help="seconds per variant")


def _measure(args, task: str, config: str, amp: bool, datasets: str, images: List[str]):
    if task == "train" and amp and not args.device.startswith("cuda"):
        return {"error": "not run: Detectron2's AMPTrainer needs CUDA"}
    if task == "train":
        kwargs = {"datasets": datasets, "iterations": args.iterations, "warmup": args.warmup}
    else:
        kwargs = {"images": images, "passes": args.passes}
    return measure_in_subprocess(
        f"{__name__}:{task}_speed",
        {"config": config, "amp": amp, "device": args.device, **kwargs},
        timeout=args.timeout,
    )


def _tiling_rows(args, tmp: Path) -> List[Dict[str, Any]]:
    import numpy as np
    from PIL import Image

    from .tiling import SIZES, synthetic_photograph

    (height, width), lesions, tile, overlap = SIZES[args.tiling]
    image, labels = synthetic_photograph(height, width, lesions)
    Image.fromarray(image).save(tmp / "tiling.png")
    np.save(tmp / "tiling.npy", labels)
    images = [{"file": str(tmp / "tiling.png"), "truth": {"kind": "npy", "path": str(tmp / "tiling.npy")}}]
    rows = []
    for amp in (False, True):
        for name, tiled in (("whole image, native", False), (f"tiled {tile}/{overlap}, native", True)):
            logger.info("tiling %dx%d: %s, amp=%s", width, height, name, amp)
            row = {"task": "infer", "config": "configs/maskrcnn_heimed.yaml", "amp": amp,
                   "source": f"synthetic {width}x{height}", "variant": name}
            row.update(measure_in_subprocess(
                "benchmarks.tiling:infer_images",
                {"images": images, "tiled": tiled, "tile": tile, "overlap": overlap,
                 "device": args.device, "amp": amp, "repeats": 3},
                timeout=args.timeout,
            ))
            if row.get("seconds_per_image"):
                row["images_per_second"] = 1 / row["seconds_per_image"]
            rows.append(row)
    return rows


def run(args) -> dict:
    import json

    from retina_d2.data.converters.base import write_json_atomic

    results = {"benchmark": "gpu", "device": args.device, "machine": machine_info(), "rows": [],
               "note": "random weights; train rows include data loading (DATALOADER.NUM_WORKERS "
                       "= min(8, CPUs)); infer rows time the model on preprocessed images"}
    with tempfile.TemporaryDirectory(prefix="retina_d2_gpu_") as tmp:
        datasets = Path(tmp) / "datasets"
        env = dict(os.environ, RETINA_D2_DATASETS=str(datasets))
        run_tool("convert_dataset.py", "synthetic", "--out", str(datasets / "synthetic"),
                 "--count", str(args.count), "--size", str(args.size), "--overwrite", env=env)
        val = json.loads((datasets / "synthetic" / "val.json").read_text())
        images = [str(datasets / "synthetic" / "raw" / r["file_name"]) for r in val["images"]]
        for config in args.configs:
            for amp in (False, True):
                for task in args.tasks:
                    logger.info("%s: %s, amp=%s", config, task, amp)
                    row = {"task": task, "config": config, "amp": amp,
                           "source": f"synthetic {args.size} px"}
                    row.update(_measure(args, task, config, amp, str(datasets), images))
                    results["rows"].append(row)
                write_json_atomic(args.out, results, indent=2)  # a later failure keeps these rows
        if args.tiling != "none":
            results["rows"] += _tiling_rows(args, Path(tmp))
    write_json_atomic(args.out, results, indent=2)
    print(format_table(results["rows"], [
        ("task", "task", ""), ("config", "config", ""), ("source", "source", ""),
        ("variant", "variant", ""), ("AMP", "amp", ""), ("images/s", "images_per_second", ".2f"),
        ("GPU peak MB", "cuda_peak_mb", ".0f"), ("detections", "detections_per_image", ".0f"),
        ("s / iter", "seconds_per_iteration", ".3f"), ("data wait s", "data_wait_seconds", ".3f"),
        ("last loss", "last_total_loss", ".3f"),
    ]))
    for row in results["rows"]:
        if row.get("error"):
            print(f"{row['task']} {row['config']} amp={row['amp']}: {row['error']}")
    print(f"\nresults: {args.out}")
    return results

