"""
``tools/benchmark.py heimed-localization``: optic-nerve localization on real HEI-MED images.

Converts the 40-image HEI-MED sample with the dev split (``configs/splits/heimed_dev.json``: 30
train, 10 val; the optic-nerve centre of every image from its ``.meta`` ``ONrow`` / ``ONcol``),
trains ``configs/multitask_heimed.yaml`` (MultiTaskLesionNet: slim Lesion-Net lesion branch +
optic-disc heatmap, 512 px) for a fixed number of iterations on the CPU (default: the config's
schedule, about ten minutes on two cores), and scores the final weights on the 10 val images:
mean and median Euclidean distance in pixels of the 2196 x 1958 originals and the share within
1/8, 1/4 and 1/2 of a disc diameter (~300 px). Beside it, two training-free rows on the same
images: the centre of the brightest disc-sized region (the disc is the brightest large structure
of a fundus photograph; a learned model that does not beat it has not learned) and the image
centre (the scale of the numbers).
"""
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from retina_d2.modeling.bright_lesions import brightest_region_center

from . import (
    HEIMED_ROOT,
    HEIMED_SPLIT,
    REPO_ROOT,
    convert_heimed_dev,
    format_table,
    machine_info,
    train_or_score,
)

__all__ = [
    "add_arguments",
    "brightest_region_center",
    "floor_rows",
    "run",
]

logger = logging.getLogger(__name__)

DEFAULT_ROOT = HEIMED_ROOT
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "heimed_localization.json"
DEFAULT_WORK = REPO_ROOT / "output" / "benchmarks" / "heimed_localization"
CONFIG = REPO_ROOT / "configs" / "multitask_heimed.yaml"
SPLIT = HEIMED_SPLIT
LANDMARK = "optic_disc"
VAL_DATASET = "heimed_seg_val"


def add_arguments(parser) -> None:
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="HEI-MED folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON file")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="dataset + run folder")
    parser.add_argument("--config-file", type=Path, default=CONFIG)
    parser.add_argument(
        "--iterations", type=int, help="training iterations (default: the config's schedule)"
    )
    parser.add_argument(
        "--skip-train", action="store_true", help="score the final weights already in --work/run"
    )


def floor_rows(records: Sequence[dict], image_root: Path, radii: Sequence[float]) -> list:
    """The training-free rows (brightest region, image centre) over the records that have an
    ``optic_disc_center``: name and :func:`localization_metrics` of each."""
    import cv2

    from retina_d2.evaluation.localization_eval import localization_metrics

    distances = {"brightest region (no training)": [], "image centre (no training)": []}
    for record in records:
        truth = record.get("optic_disc_center")
        if truth is None:
            continue
        path = Path(image_root) / record["file_name"]
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise OSError(f"cannot read {path}")
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        guesses = {
            "brightest region (no training)": brightest_region_center(image),
            "image centre (no training)": (image.shape[1] / 2.0, image.shape[0] / 2.0),
        }
        for name, (x, y) in guesses.items():
            distances[name].append(float(np.hypot(x - truth[0], y - truth[1])))
    return [{"name": name, **localization_metrics(d, radii)} for name, d in distances.items()]



def run(args) -> dict:
    from retina_d2.config import get_retina_cfg
    from retina_d2.data.converters.base import write_json_atomic
    from retina_d2.data.register import read_manifest
    from retina_d2.evaluation.localization_eval import radius_name

    from .heimed_semantic import scaled_schedule

    work = args.work.resolve()
    datasets = work / "datasets"
    run_dir = work / "run"
    convert_s, env = convert_heimed_dev(args.root, datasets, semantic=True)
    cfg = get_retina_cfg()
    cfg.merge_from_file(str(args.config_file))
    iterations = args.iterations or cfg.SOLVER.MAX_ITER
    radii = list(cfg.RETINA.EVAL.LANDMARK_RADII)
    opts = scaled_schedule(args.config_file, iterations) + ["OUTPUT_DIR", str(run_dir)]
    if not args.skip_train:
        logger.info("training %s for %d iterations", args.config_file, iterations)
    train_s = train_or_score(args.config_file, opts, run_dir, args.skip_train, env)
    eval_dir = run_dir / "inference" / VAL_DATASET
    metrics = json.loads((eval_dir / "localization_metrics.json").read_text())[LANDMARK]
    model_row = {
        "name": "MultiTaskLesionNet (" + Path(args.config_file).name + ")",
        "iterations": iterations,
        "train_minutes": None if train_s is None else train_s / 60,
        **metrics,
    }
    val = json.loads((datasets / "heimed" / "val.json").read_text())
    _, image_root = read_manifest(datasets / "heimed")
    rows = [model_row] + floor_rows(val["images"], image_root, radii)
    results = {
        "benchmark": "heimed-localization",
        "split": str(SPLIT.relative_to(REPO_ROOT)),
        "config": str(Path(args.config_file).resolve().relative_to(REPO_ROOT)),
        "convert_seconds": convert_s,
        "note": "optic-nerve centre (the .meta ONrow / ONcol) on the 10 val images; distances in "
                "pixels of the 2196 x 1958 originals; radii 1/8, 1/4, 1/2 of a ~300 px disc "
                "diameter; final weights, CPU training",
        "radii_px": radii,
        "machine": machine_info(),
        "rows": rows,
    }
    write_json_atomic(args.out, results, indent=2)
    columns = [
        ("method", "name", ""), ("iters", "iterations", "d"), ("train min", "train_minutes", ".1f"),
        ("mean px", "distance", ".1f"), ("median px", "median_distance", ".1f"),
    ] + [(f"<= {r:g} px %", radius_name(r), ".0f") for r in radii]
    print(f"\nHEI-MED optic-nerve localization, 10 val images, {os.cpu_count()} CPUs")
    print(format_table(rows, columns))
    print(f"\nresults: {args.out}")
    return results
