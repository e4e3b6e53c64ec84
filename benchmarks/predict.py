"""
``tools/benchmark.py predict``: prediction at archive scale (retina_d2/engine/predict_shards.py).

- Throughput: ``tools/predict.py`` on the first ``--images`` HEI-MED photographs with 1 and with
  2 processes (``--num-gpus``: CPU processes with gloo on a machine without CUDA), each run in a
  fresh process: images per second of the command's ``main`` (the model's load, the processes'
  start and the merge included; the interpreter's imports not), and once predicting (from the
  first image's line in the parts to the last, watched by this process).
- Memory: one process on those photographs and on ``--repeat`` times as many (the same files
  under other names, as symlinks): the peak RSS of the two runs, which streaming the results to
  JSON lines should keep flat, beside the results file each run wrote (what a list of results
  would have held in memory).

Model: ``configs/maskrcnn_heimed.yaml`` (the CPU-light Mask R-CNN) with random weights (seed 0;
nothing can be downloaded here, and speed and memory do not need trained ones), stored with the
HEI-MED class names as training stores them, or the checkpoint given by ``--weights``. Random
weights find lesions everywhere: every run keeps all scores (``--score-threshold 0``) up to
``TEST.DETECTIONS_PER_IMAGE`` per image, so each image brings many full-frame masks.

To keep the runs short on a shared 2-core machine, the photographs are copied shrunk to
``--size`` px on their longer side (real photographs, fewer pixels: 2196x1958 -> 256x228 by
default; ``--memory-size``, 128 px, for the memory runs' 10x more inputs) and predicted at that
size; the machine's load average goes into the results. Each process runs ``--threads``
threads (default 1: on a loaded shared machine a process's second OpenMP thread mostly waits).
"""
import csv
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import HEIMED_ROOT, REPO_ROOT, format_table, machine_info, measure_in_subprocess

__all__ = ["add_arguments", "run", "predict_run", "random_model_file", "shrunk_photographs"]

logger = logging.getLogger(__name__)

CONFIG = "configs/maskrcnn_heimed.yaml"
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "predict.json"


def add_arguments(parser) -> None:
    parser.add_argument("--heimed-root", type=Path, default=HEIMED_ROOT,
                        help="the HEI-MED sample (its .jpg photographs)")
    parser.add_argument("--images", type=int, default=40, help="photographs (the first, sorted)")
    parser.add_argument("--size", type=int, default=256,
                        help="longer side, px, the photographs are shrunk to for the throughput "
                        "runs (0: as they are)")
    parser.add_argument("--memory-size", type=int, default=128,
                        help="the same for the memory runs")
    parser.add_argument("--repeat", type=int, default=10,
                        help="the memory run's inputs: --images x this (symlinks)")
    parser.add_argument("--detections", type=int, default=50,
                        help="TEST.DETECTIONS_PER_IMAGE (all scores kept)")
    parser.add_argument("--weights", type=Path,
                        help="a retina_d2 checkpoint (default: random weights of " + CONFIG + ")")
    parser.add_argument("--threads", type=int, default=1,
                        help="OpenMP / torch threads per process (OMP_NUM_THREADS; 0: torch's "
                        "default)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)


def random_model_file(path: Path) -> Path:
    """A checkpoint of ``CONFIG``'s model with random weights (seed 0), carrying the HEI-MED
    class names and the config, as a training run's would."""
    import torch
    from detectron2.modeling import build_model

    import retina_d2.modeling  # noqa: F401  (registration)
    from retina_d2 import __version__
    from retina_d2.config import get_retina_cfg
    from retina_d2.data.converters.heimed_io import HEIMED_CATEGORIES
    from retina_d2.data.lesions import lesion

    cfg = get_retina_cfg()
    cfg.merge_from_file(str(REPO_ROOT / CONFIG))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    model = build_model(cfg)
    names = list(HEIMED_CATEGORIES)
    info = {"class_names": names, "lesion_ids": [lesion(n).id for n in names],
            "config": cfg.dump(), "version": __version__}
    torch.save({"model": model.state_dict(), "retina_d2": info}, path)
    return path


def shrunk_photographs(root: Path, folder: Path, count: int, size: int) -> List[Path]:
    """The first ``count`` HEI-MED .jpg photographs (sorted), shrunk to ``size`` px on their
    longer side (0: copied as they are) into ``folder``."""
    from PIL import Image

    sources = sorted(Path(root).glob("*.jpg"))[:count]
    if len(sources) < count:
        raise SystemExit(f"error: {root}: {len(sources)} .jpg photographs, {count} wanted")
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for source in sources:
        image = Image.open(source).convert("RGB")
        if size:
            image.thumbnail((size, size), Image.BILINEAR)
        target = folder / source.name
        image.save(target, quality=95)
        made.append(target)
    return made


def _repeated(photos: List[Path], folder: Path, times: int) -> int:
    """``times`` symlinks to each photograph in ``folder`` (r<k>_<name>); how many."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(times):
        for photo in photos:
            (folder / f"r{k:03d}_{photo.name}").symlink_to(photo)
    return times * len(photos)


def predict_run(weights: str, photos: str, output: str, processes: int,
                detections: int) -> Dict[str, Any]:
    """``tools/predict.py``'s ``main`` (retina_d2.tools.predict) on ``photos`` (runs in the
    measured process)."""
    import os

    from retina_d2.tools import predict as tool
    argv = ["--weights", weights, "--input", photos, "--output", output,
            "--num-gpus", str(processes), "--score-threshold", "0.0",
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
            "TEST.DETECTIONS_PER_IMAGE", str(detections)]
    start = time.perf_counter()
    status = tool.main(argv)
    seconds = time.perf_counter() - start
    if status:
        raise RuntimeError(f"predict exited with {status}")
    with open(Path(output) / "lesion_counts.csv") as f:  # small: the results file is not read
        rows = list(csv.DictReader(f))
    lesions = sum(int(v) for row in rows for k, v in row.items() if k not in ("file", "image_id"))
    return {
        "processes": processes,
        "images": len(rows),
        "seconds": seconds,
        "images_per_s": len(rows) / seconds,
        "lesions": lesions,
        "results_mb": os.path.getsize(Path(output) / "coco_instances_results.json") / 2**20,
        "parts_mb": sum(p.stat().st_size for p in (Path(output) / "parts").glob("*.jsonl"))
        / 2**20,
    }


class _LineWatch:
    """Watches a predict output's parts from this process while predict runs: when each image's
    line appeared (polled every ``period`` s, reading only what was appended)."""

    def __init__(self, output: Path, period: float = 0.05):
        import threading

        self.parts, self.period = Path(output) / "parts", period
        self.times: List[float] = []  # one per line seen, in order
        self._read: Dict[Path, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(self.period):
            self._poll()

    def _poll(self) -> None:
        now = time.perf_counter()
        for part in sorted(self.parts.glob("rank*.jsonl")) if self.parts.is_dir() else []:
            with open(part, "rb") as f:
                f.seek(self._read.get(part, 0))
                new = f.read()
            self._read[part] = self._read.get(part, 0) + len(new)
            self.times += [now] * new.count(b"\n")

    def __enter__(self) -> "_LineWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def steady_rate(self) -> Optional[float]:
        """Images/s from the first line to the last (the processes' start and the model loads
        left out); None with under 2 lines apart in time."""
        if len(self.times) < 2 or self.times[-1] <= self.times[0]:
            return None
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


def _measure(weights: Path, photos: Path, output: Path, processes: int, detections: int):
    logger.info("predict: %s, %d process(es)", photos, processes)
    with _LineWatch(output) as lines:
        row = measure_in_subprocess(
            "benchmarks.predict:predict_run",
            {"weights": str(weights), "photos": str(photos), "output": str(output),
             "processes": processes, "detections": detections},
        )
    if "error" in row:
        raise RuntimeError(f"predict run failed: {row['error']}")
    row["steady_images_per_s"] = lines.steady_rate()
    return row


def run(args) -> Dict[str, Any]:
    import json

    from retina_d2.data.converters.base import atomic_write

    import os

    load_before = machine_info()["load_average"]
    if args.threads:  # read by the measured processes' torch (and by launch's workers)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="retina_d2_bench_predict_") as tmp:
        tmp = Path(tmp)
        weights = args.weights or random_model_file(tmp / "random_maskrcnn_heimed.pth")
        photos = shrunk_photographs(args.heimed_root, tmp / "photos", args.images, args.size)
        throughput = [_measure(weights, tmp / "photos", tmp / f"out_{n}", n, args.detections)
                      for n in (1, 2)]
        small = shrunk_photographs(args.heimed_root, tmp / "small", args.images, args.memory_size)
        few = _repeated(small, tmp / "few", 1)
        many = _repeated(small, tmp / "many", args.repeat)
        memory = [_measure(weights, tmp / name, tmp / f"out_{name}", 1, args.detections)
                  for name in ("few", "many")]
    for row in throughput + memory:
        row["lesions_per_image"] = row["lesions"] / row["images"]
    results = {
        "benchmark": "predict",
        "model": str(args.weights) if args.weights else f"{CONFIG}, random weights (seed 0)",
        "photographs": f"the first {args.images} HEI-MED .jpg, longer side shrunk to "
        f"{args.size or 'native'} px ({args.memory_size or 'native'} px for the memory runs)",
        "detections_per_image": args.detections,
        "threads_per_process": args.threads or "torch's default",
        "throughput": throughput,
        "memory": {"inputs": [few, many], "runs": memory,
                   "peak_rss_growth_mb": memory[1]["peak_rss_mb"] - memory[0]["peak_rss_mb"]},
        "machine": {**machine_info(), "load_average_before": load_before},
        "note": "images_per_s: predict's main (model load, process start and merge included); "
        "steady_images_per_s: from the first image's line in the parts to the last (polled "
        "every 0.05 s by the benchmark). "
        "The machine is shared: its load average (before and after) says how much of its CPUs "
        "these runs had; one thread per process, as a second OpenMP thread mostly waits for a "
        "core there. Memory: one process, the same photographs repeated as symlinks; parts_mb "
        "and results_mb are what a results list held in memory would have grown with.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out) as f:
        json.dump(results, f, indent=1)
    print(format_table(throughput + memory, [
        ("processes", "processes", "d"), ("images", "images", "d"),
        ("images/s", "images_per_s", ".2f"), ("steady images/s", "steady_images_per_s", ".2f"),
        ("s", "seconds", ".1f"),
        ("lesions/image", "lesions_per_image", ".1f"), ("results MB", "results_mb", ".1f"),
        ("peak RSS MB", "peak_rss_mb", ".0f"),
    ]))
    print(f"results: {args.out}")
    return results
