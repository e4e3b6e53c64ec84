"""
``tools/benchmark.py heimed-semantic``: the four semantic heads trained and scored on real HEI-MED
exudates, one table.

Converts the 40-image HEI-MED sample with the dev split of the Mask R-CNN benchmark
(``configs/splits/heimed_dev.json``: 30 train, 10 val) and semantic targets, then for each head
(ResUNet, Lesion-Net 16s, CBAM-DeepLab, Red-Seg; their ``configs/*_heimed.yaml``) trains for a
fixed number of iterations (the config's schedule, loss switches included, scaled to it), scores
the final weights on the 10 val images (exudate pixel AUC-PR at the original resolution, pixel F1
at 0.5, image-level F1) and measures, each in a fresh process, the forward latency at 1024 px on
the CPU, peak memory and the parameter count. Each head's training budget is stated in the table
(iterations and the minutes they took).
"""
import json
import logging
import os
from pathlib import Path

from . import (
    HEIMED_ROOT,
    HEIMED_SPLIT,
    REPO_ROOT,
    convert_heimed_dev,
    format_table,
    machine_info,
    measure_in_subprocess,
    train_or_score,
)

__all__ = ["add_arguments", "run", "HEADS", "scaled_schedule"]

logger = logging.getLogger(__name__)

DEFAULT_ROOT = HEIMED_ROOT
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "heimed_semantic.json"
DEFAULT_WORK = REPO_ROOT / "output" / "benchmarks" / "heimed_semantic"
SPLIT = HEIMED_SPLIT
EXUDATE = "hard exudate"
# name -> (config, default iterations). Iterations are sized to about ten CPU minutes each on
# this project's 2-core machines when the machine is shared (seconds per iteration differ by head).
HEADS = {
    "ResUNet": ("configs/resunet_heimed.yaml", 150),
    "Lesion-Net 16s": ("configs/lesionnet16s_heimed.yaml", 150),
    "CBAM-DeepLab": ("configs/cbam_deeplab_heimed.yaml", 150),
    "Red-Seg": ("configs/redseg_heimed.yaml", 150),
}


def add_arguments(parser) -> None:
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="HEI-MED folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON file")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="dataset + runs folder")
    parser.add_argument(
        "--heads", nargs="+", choices=list(HEADS), default=list(HEADS), help="heads to run"
    )
    parser.add_argument(
        "--iterations", type=int, help="training iterations of every head (default: per head)"
    )
    parser.add_argument("--latency-repeats", type=int, default=3)
    parser.add_argument(
        "--skip-train", action="store_true", help="score the final weights already in --work"
    )


def scaled_schedule(config: Path, iterations: int) -> list:
    """Overrides that run ``config``'s schedule in ``iterations``: LR steps, warm-up and the loss
    switch keep their share of the run; one checkpoint at the end, evaluated once."""
    from retina_d2.config import get_retina_cfg

    cfg = get_retina_cfg()
    cfg.merge_from_file(str(config))
    scale = iterations / cfg.SOLVER.MAX_ITER
    steps = tuple(max(1, round(s * scale)) for s in cfg.SOLVER.STEPS)
    opts = [
        "SOLVER.MAX_ITER", str(iterations),
        "SOLVER.STEPS", str(steps),
        "SOLVER.WARMUP_ITERS", str(round(cfg.SOLVER.WARMUP_ITERS * scale)),
        "SOLVER.CHECKPOINT_PERIOD", str(iterations),
        "TEST.EVAL_PERIOD", "0",
    ]
    if cfg.MODEL.LESION_SEG.LOSS_SWITCH_ITER > 0:
        switch = round(cfg.MODEL.LESION_SEG.LOSS_SWITCH_ITER * scale)
        opts += ["MODEL.LESION_SEG.LOSS_SWITCH_ITER", str(switch)]
    return opts



def run(args) -> dict:
    from retina_d2.data.converters.base import write_json_atomic

    work = args.work.resolve()
    datasets = work / "datasets"
    convert_s, env = convert_heimed_dev(args.root, datasets, semantic=True)
    rows = []
    for name in args.heads:
        config, default_iterations = HEADS[name]
        iterations = args.iterations or default_iterations
        run_dir = work / config.split("/")[-1].replace(".yaml", "")
        opts = scaled_schedule(REPO_ROOT / config, iterations) + ["OUTPUT_DIR", str(run_dir)]
        if not args.skip_train:
            logger.info("training %s for %d iterations", name, iterations)
        train_s = train_or_score(REPO_ROOT / config, opts, run_dir, args.skip_train, env)
        metrics_file = run_dir / "inference" / "heimed_seg_val" / "semantic_metrics.json"
        metrics = json.loads(metrics_file.read_text())["sem_seg"]
        speed = measure_in_subprocess(
            "benchmarks.infer:infer_latency",
            {"config": config, "size": 1024, "repeats": args.latency_repeats},
        )
        rows.append({
            "name": name,
            "config": config,
            "iterations": iterations,
            "train_minutes": None if train_s is None else train_s / 60,
            "AUCPR": metrics.get(f"AUCPR-{EXUDATE}"),
            "F1": metrics.get(f"F1-{EXUDATE}"),
            "Dice": metrics.get(f"Dice-{EXUDATE}"),
            "imageF1": metrics.get(f"imageF1-{EXUDATE}"),
            "parameters_m": speed.get("parameters_m"),
            "latency_s": speed.get("seconds"),
            "peak_rss_mb": speed.get("peak_rss_mb"),
            "error": speed.get("error"),
        })
    results = {
        "benchmark": "heimed-semantic",
        "split": str(SPLIT.relative_to(REPO_ROOT)),
        "convert_seconds": convert_s,
        "note": "exudate metrics in percent on the 10 val images, pixels scored at the images' "
                "original size; latency: one forward pass at 1024x1024 on the CPU, batch 1",
        "machine": machine_info(),
        "rows": rows,
    }
    write_json_atomic(args.out, results, indent=2)
    columns = [
        ("head", "name", ""), ("iters", "iterations", "d"), ("train min", "train_minutes", ".1f"),
        ("EX AUC-PR", "AUCPR", ".1f"), ("EX F1", "F1", ".1f"), ("EX image F1", "imageF1", ".1f"),
        ("params M", "parameters_m", ".2f"), ("s @1024", "latency_s", ".2f"),
        ("peak MB", "peak_rss_mb", ".0f"),
    ]
    print(f"\nHEI-MED exudates, 10 val images, {os.cpu_count()} CPUs")
    print(format_table(rows, columns))
    print(f"\nresults: {args.out}")
    return results
