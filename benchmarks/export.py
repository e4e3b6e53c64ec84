"""
``tools/benchmark.py export``: CPU latency of the eager model beside its TorchScript and ONNX
exports (retina_d2/export.py), for the CPU-light LesionRCNN (configs/maskrcnn_heimed.yaml, native
resolution, MODEL.LESION_MERGE) and SemanticLesionNet (configs/exudate_fpnseg_heimed_cpu.yaml,
1400 px field of view), on HEI-MED photographs (``../shared/data/heimed``, the first
``--images`` of the dev split's val list) or, without them, synthetic fundus photographs.

Weights are random (seeded; no trained checkpoint ships with the repository), so a detector's
detection count is whatever random scores let through, and it is reported beside its latency.
Each (config, format) runs in a fresh process (:func:`.measure_in_subprocess`): it exports, which
checks the export against the eager model on the same photographs (the largest differences are
recorded), then times eager and exported inference alternately, each after one warm-up, from the
mapper's output to the outputs in the photograph's frame (same postprocessing for both), so the
difference is the network's.
"""
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

from . import HEIMED_ROOT, HEIMED_SPLIT, REPO_ROOT, format_table, machine_info, measure_in_subprocess

__all__ = ["add_arguments", "run", "export_latency"]

logger = logging.getLogger(__name__)

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "export.json"
MODELS = {
    "maskrcnn_heimed (LesionRCNN, CPU-light)": "configs/maskrcnn_heimed.yaml",
    "exudate_fpnseg_heimed_cpu (SemanticLesionNet)": "configs/exudate_fpnseg_heimed_cpu.yaml",
}


def _photographs(count: int, scratch: Path) -> List[str]:
    """HEI-MED val photographs of the dev split, else synthetic ones written into ``scratch``."""
    if HEIMED_ROOT.is_dir():
        names = json.loads(HEIMED_SPLIT.read_text())["val"][:count]
        return [str(HEIMED_ROOT / f"{name}.jpg") for name in names]
    import cv2

    from retina_d2.data.synthetic import image_rng, render_fundus

    files = []
    for index in range(count):
        path = scratch / f"synthetic_{index}.png"
        cv2.imwrite(str(path), render_fundus(image_rng(0, index), size=1024).image[:, :, ::-1])
        files.append(str(path))
    return files


def _timed(run, repeats: int) -> List[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def export_latency(config: str, fmt: str, photographs: List[str], repeats: int = 3) -> Dict[str, Any]:
    """Export ``config`` with seeded random weights as ``fmt`` and time eager vs exported."""
    import torch
    from detectron2.modeling import build_model

    from retina_d2 import export

    cfg = export.export_config(str(REPO_ROOT / config))
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="retina_d2_export_bench_") as tmp:
        weights = Path(tmp) / "random.pth"
        torch.save({"model": build_model(cfg).state_dict()}, weights)
        start = time.perf_counter()
        manifest = export.export_model(cfg, str(weights), fmt, Path(tmp) / "out", photographs)
        export_seconds = time.perf_counter() - start
        exported = export.ExportedLesionModel(Path(tmp) / "out")
        model, _ = export.load_eager_model(cfg, str(weights))
    eager_times, exported_times, detections, sizes = [], [], [], []
    with torch.no_grad():
        for photo in photographs:
            inputs = exported.mapper({"file_name": photo})
            sizes.append(list(inputs["image"].shape[-2:]))
            model([inputs])  # warm-up: allocator, lazy inits
            exported.predict_mapped(inputs)
            for _ in range(repeats):  # alternated: a load change on a shared box hits both
                eager_times += _timed(lambda: model([inputs]), 1)
                exported_times += _timed(lambda: exported.predict_mapped(inputs), 1)
            outputs = exported.predict_mapped(inputs)
            if "instances" in outputs:
                detections.append(len(outputs["instances"]))
    checks = manifest["checked_on"]
    worst = {
        key: max(c[key] for c in checks)
        for key in ("max_box_diff_px", "max_score_diff", "max_probability_diff")
        if key in checks[0]
    }
    if "min_mask_iou" in checks[0]:
        worst["min_mask_iou"] = min(c["min_mask_iou"] for c in checks)
    eager, ours = statistics.median(eager_times), statistics.median(exported_times)
    return {
        "eager_seconds": eager, "exported_seconds": ours, "exported_x_eager": ours / eager,
        "eager_seconds_all": eager_times, "exported_seconds_all": exported_times,
        "export_seconds": export_seconds, "input_sizes": sizes, "detections": detections or None,
        "threads": torch.get_num_threads(), **worst,
    }


def add_arguments(parser) -> None:
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON file")
    parser.add_argument("--images", type=int, default=2, help="photographs per model")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per photograph")
    parser.add_argument("--formats", nargs="+", default=["torchscript", "onnx"],
                        choices=["torchscript", "onnx"])


def run(args) -> dict:
    from retina_d2.data.converters.base import write_json_atomic

    results = {"benchmark": "export", "machine": machine_info(), "rows": [],
               "weights": "random (seeded 0)", "heimed": HEIMED_ROOT.is_dir()}
    with tempfile.TemporaryDirectory(prefix="retina_d2_export_photos_") as scratch:
        photographs = _photographs(args.images, Path(scratch))
        results["photographs"] = [Path(p).name for p in photographs]
        for name, config in MODELS.items():
            for fmt in args.formats:
                logger.info("export: %s as %s", name, fmt)
                measured = measure_in_subprocess(
                    f"{__name__}:export_latency",
                    {"config": config, "fmt": fmt, "photographs": photographs,
                     "repeats": args.repeats},
                )
                results["rows"].append({"name": name, "config": config, "format": fmt, **measured})
    write_json_atomic(args.out, results, indent=2)
    print(format_table(results["rows"], [
        ("model", "name", ""), ("format", "format", ""), ("eager s", "eager_seconds", ".2f"),
        ("exported s", "exported_seconds", ".2f"), ("x eager", "exported_x_eager", ".2f"),
        ("export s", "export_seconds", ".0f"), ("box px", "max_box_diff_px", ".1e"),
        ("score", "max_score_diff", ".1e"), ("mask IoU", "min_mask_iou", ".4f"),
        ("prob", "max_probability_diff", ".1e"), ("peak RSS MB", "peak_rss_mb", ".0f"),
    ]))
    for row in results["rows"]:
        if row.get("error"):
            print(f"{row['name']} {row['format']}: error: {row['error']}")
    print(f"\nresults: {args.out}")
    return results
