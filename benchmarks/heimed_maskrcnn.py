"""
``tools/benchmark.py heimed-maskrcnn``: Mask R-CNN trained and scored on real HEI-MED exudates.

Converts the 40-image HEI-MED sample with the fixed dev split (``configs/splits/heimed_dev.json``:
30 train, 10 val), trains ``configs/maskrcnn_heimed.yaml`` with ``tools/train_net.py`` within a
CPU budget, evaluates the best and the final checkpoint on the 10 val images, and writes the
metrics (exudate AP at IoU 0.35 / 0.5 / 0.75, bbox and segm), the wall time, the checkpoints
and overlay pictures. The training-free floor of DESIGN.md (green-channel background
subtraction, optic disc suppressed, components as instances; :mod:`.exudate_floor`) is run on the
same 10 images in the same run, and every checkpoint's row carries its ratio to it.
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
    run_tool,
)

__all__ = ["add_arguments", "run"]

logger = logging.getLogger(__name__)

DEFAULT_ROOT = HEIMED_ROOT
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "heimed_maskrcnn.json"
DEFAULT_WORK = REPO_ROOT / "output" / "benchmarks" / "heimed_maskrcnn"
CONFIG = REPO_ROOT / "configs" / "maskrcnn_heimed.yaml"
SPLIT = HEIMED_SPLIT
EXUDATE = "hard exudate"
# The metrics whose ratio to the training-free floor every row carries.
RATIO_KEYS = ("segm AP35", "segm AP50")


def add_arguments(parser) -> None:
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="HEI-MED folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON file")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="dataset + run folder")
    parser.add_argument("--config-file", type=Path, default=CONFIG)
    parser.add_argument(
        "--skip-train", action="store_true",
        help="reuse the checkpoints already in --work/run (re-evaluate them only)",
    )
    parser.add_argument(
        "opts", nargs="*", default=[], help="config overrides KEY VALUE ... (e.g. SOLVER.MAX_ITER 2000)"
    )



def _checkpoint_iteration(path: Path) -> int:
    from retina_d2.safe_load import load_checkpoint

    return int(load_checkpoint(str(path)).get("iteration", -1))


def _exudate_row(name, metrics):
    row = {"name": name}
    for task in ("segm", "bbox"):
        for iou in ("AP35", "AP50", "AP75"):
            row[f"{task} {iou}"] = metrics[task].get(f"{iou}-{EXUDATE}")
        row[f"{task} AP"] = metrics[task].get(f"AP-{EXUDATE}")
    return row


def run(args) -> dict:
    from retina_d2.data.converters.base import write_json_atomic
    from retina_d2.data.register import read_manifest

    from .exudate_floor import add_floor_ratios, floor_row

    work = args.work.resolve()
    datasets, run_dir = work / "datasets", work / "run"
    convert_s, env = convert_heimed_dev(args.root, datasets, semantic=False)
    opts = ["OUTPUT_DIR", str(run_dir), *args.opts]
    train_s = None
    if not args.skip_train:
        # No periodic evaluation while training: every checkpoint is scored below anyway.
        train_s = run_tool(
            "train_net.py", "--config-file", str(args.config_file), "TEST.EVAL_PERIOD", "0", *opts,
            env=env,
        )
    # Every checkpoint is scored by its own --eval-only run, so the numbers come from the code
    # as it is now, whatever the training run's periodic evaluations reported.
    rows = []
    eval_s = {}
    checkpoints = sorted(run_dir.glob("model_[0-9]*.pth"))
    final = run_dir / "model_final.pth"
    if final.is_file():
        # The periodic checkpoint of the last iteration holds model_final's weights: score once.
        last_iter = _checkpoint_iteration(final)
        checkpoints = [c for c in checkpoints if _checkpoint_iteration(c) != last_iter] + [final]
    for ckpt in checkpoints:
        if not ckpt.is_file():
            continue
        out = work / "eval" / ckpt.stem
        eval_s[ckpt.name] = run_tool(
            "train_net.py", "--config-file", str(args.config_file), "--eval-only", *args.opts,
            "MODEL.WEIGHTS", str(ckpt), "OUTPUT_DIR", str(out), env=env,
        )
        metrics = json.loads((out / "inference" / "heimed_seg_val" / "instance_metrics.json").read_text())
        rows.append(_exudate_row(ckpt.name, metrics))
    floor = floor_row(datasets / "heimed" / "val.json", read_manifest(datasets / "heimed")[1])
    add_floor_ratios(rows, floor, RATIO_KEYS)
    rows.append(floor)
    results = {
        "benchmark": "heimed-maskrcnn",
        "config": str(args.config_file.relative_to(REPO_ROOT) if args.config_file.is_absolute() else args.config_file),
        "overrides": args.opts,
        "split": str(SPLIT.relative_to(REPO_ROOT)),
        "convert_seconds": convert_s,
        "train_and_eval_seconds": train_s,
        "eval_seconds": eval_s,
        "note": "every row is a checkpoint of one training run, scored on the same 10 val "
                "images; choosing among them by these numbers would tune on val",
        "machine": machine_info(),
        "rows": rows,
        "run_dir": str(run_dir),
    }
    write_json_atomic(args.out, results, indent=2)
    columns = [("checkpoint", "name", "")] + [
        (f"{task} {m}", f"{task} {m}", ".1f")
        for task in ("segm", "bbox") for m in ("AP35", "AP50", "AP75", "AP")
    ] + [(f"{key} x floor", f"{key} x floor", ".2f") for key in RATIO_KEYS]
    took = f"train+eval {train_s / 60:.1f} min" if train_s else "re-evaluated existing checkpoints"
    print(f"\nHEI-MED exudates, 10 val images; {took} on {os.cpu_count()} CPUs")
    print(format_table(rows, columns))
    print(f"\nresults: {args.out}; overlays: {work}/eval/<checkpoint>/inference/heimed_seg_val/overlays")
    return results
