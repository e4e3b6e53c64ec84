"""
``tools/benchmark.py tta``: test-time augmentation off and on, on the HEI-MED dev split.

One model (``--weights``, a checkpoint of ``--config-file``; without it the config is trained
from scratch on the 30 dev-train photographs for ``--iterations``, the config's schedule scaled to
them) predicts the 10 dev-val photographs once per variant, each variant in a fresh process,
through ``LesionTrainer.build_inference_model`` (what ``--eval-only`` and ``predict`` run):

- ``off``: the image alone (``TEST.AUG.ENABLED False``),
- ``flip``: the image and its horizontal mirror (``TEST.AUG.ENABLED True``, ``TEST.AUG.FLIP``),
- ``flip+turns``: all 8 mirrors and quarter turns (``RETINA.TTA.ROTATIONS [1, 2, 3]``).

Lesions are a detector's instances, or for a semantic model (the default, the CPU exudate recipe
``configs/exudate_fpnseg_heimed_cpu.yaml``) the connected components of its exudate map
(``RETINA.COMPONENTS``, as ``heimed-exudate-cv`` scores them). Per variant it reports exudate
segm / bbox AP35 / AP50 / AP75, FROC, image AUC (an eye scored as the config's
RETINA.COMPONENTS.IMAGE_SCORE_TOP_K says), seconds per image, peak RSS and the views run,
and each number's difference from ``off``.
"""
import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Sequence

from . import (
    HEIMED_ROOT,
    REPO_ROOT,
    convert_heimed_dev,
    format_table,
    machine_info,
    measure_in_subprocess,
)

__all__ = ["VARIANTS", "add_arguments", "predict_variant", "run"]

logger = logging.getLogger(__name__)

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "tta.json"
DEFAULT_WORK = REPO_ROOT / "output" / "benchmarks" / "tta"
CONFIG = REPO_ROOT / "configs" / "exudate_fpnseg_heimed_cpu.yaml"

# Variant -> config overrides.
VARIANTS: Dict[str, List[str]] = {
    "off": ["TEST.AUG.ENABLED", "False"],
    "flip": ["TEST.AUG.ENABLED", "True", "TEST.AUG.FLIP", "True", "RETINA.TTA.ROTATIONS", "[]"],
    "flip+turns": ["TEST.AUG.ENABLED", "True", "TEST.AUG.FLIP", "True",
                   "RETINA.TTA.ROTATIONS", "[1, 2, 3]"],
}
SCORES = ("segm AP35", "segm AP50", "segm AP75", "bbox AP50", "FROC", "image AUC")


def add_arguments(parser) -> None:
    parser.add_argument("--root", type=Path, default=HEIMED_ROOT, help="HEI-MED folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON file")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK,
                        help="datasets + training run folder")
    parser.add_argument("--config-file", type=Path, default=CONFIG)
    parser.add_argument("--weights", type=Path,
                        help="a trained checkpoint of --config-file (default: train one)")
    parser.add_argument("--iterations", type=int, default=200,
                        help="training iterations without --weights (the schedule scaled)")
    parser.add_argument("--variants", type=_variant_list, default=list(VARIANTS),
                        help=f"comma-separated, among {','.join(VARIANTS)} (default: all)")
    parser.add_argument("--limit", type=int,
                        help="predict only the first N val photographs (a quick run)")
    parser.add_argument("opts", nargs="*", default=[],
                        help="config overrides KEY VALUE ... for training and prediction")


def _variant_list(text: str) -> List[str]:
    import argparse

    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown variant(s) {unknown or text!r}; choose among {', '.join(VARIANTS)}"
        )
    return names


# --- one variant's prediction (runs in its own process) ----------------------------------------


def predict_variant(config: str, weights: str, datasets: str, gt_file: str, image_root: str,
                    out_file: str, opts: Sequence[str] = ()) -> dict:
    """Predict every photograph of ``gt_file`` through the inference model ``opts`` configure
    and write COCO results to ``out_file``.

    Returns:
        ``{"seconds": inference seconds (all images, reading excluded), "num_images": ...,
        "views": views per image}``
    """
    import os

    import torch
    from detectron2.evaluation.coco_evaluation import instances_to_coco_json
    from detectron2.modeling import build_model

    os.environ["RETINA_D2_DATASETS"] = datasets
    from retina_d2.modeling.outputs import has_detector
    from retina_d2.data.converters.base import write_json_atomic
    from retina_d2.data.mapper import LesionDatasetMapper
    from retina_d2.engine.trainer import LesionTrainer, setup_cfg
    from retina_d2.modeling import LesionCheckpointer
    from retina_d2.modeling.components import components_to_coco, lesion_components

    from .heimed_exudate_cv import EXUDATE

    cfg = setup_cfg(config, list(opts) + ["MODEL.WEIGHTS", weights])
    model = build_model(cfg)
    LesionCheckpointer(model).load(weights)
    model.eval()
    runner = LesionTrainer.build_inference_model(cfg, model).eval()
    views = len(getattr(runner, "views", [None]))
    mapper = LesionDatasetMapper(cfg, is_train=False)
    gt = json.loads(Path(gt_file).read_text())
    # Class c of the model is the c-th category in the training set's (= this GT's) id order.
    categories = sorted(gt["categories"], key=lambda c: c["id"])
    category_ids = [c["id"] for c in categories]
    exudate = next(i for i, c in enumerate(categories) if c["name"] == EXUDATE)
    components = cfg.RETINA.COMPONENTS
    results, seconds = [], 0.0
    for entry in gt["images"]:
        inputs = mapper({
            "file_name": str(Path(image_root) / entry["file_name"]),
            "height": entry["height"], "width": entry["width"], "image_id": entry["id"],
        })
        start = time.perf_counter()
        with torch.no_grad():
            output = runner([inputs])[0]
        if has_detector(cfg):
            found = instances_to_coco_json(output["instances"].to("cpu"), entry["id"])
            for r in found:
                r["category_id"] = category_ids[r["category_id"]]
            seconds += time.perf_counter() - start
        else:
            label_maps, lesions = lesion_components(
                output["sem_seg"], components.MASK_THRESHOLD, components.MIN_AREA,
                channels=[exudate],
            )
            seconds += time.perf_counter() - start
            found = components_to_coco(
                label_maps, lesions, entry["id"], category_ids, cfg.RETINA.EVAL.MAX_DETS
            )
        results += found
    write_json_atomic(Path(out_file), results)
    return {"seconds": seconds, "num_images": len(gt["images"]), "views": views}


# --- the run -----------------------------------------------------------------------------------


def _val_subset(gt_file: Path, limit, work: Path) -> Path:
    """``gt_file`` cut to its first ``limit`` images (all without a limit)."""
    if not limit:
        return gt_file
    from retina_d2.data.converters.base import write_json_atomic

    gt = json.loads(gt_file.read_text())
    images = sorted(gt["images"], key=lambda e: e["file_name"])[:limit]
    ids = {e["id"] for e in images}
    gt = {**gt, "images": images,
          "annotations": [a for a in gt["annotations"] if a["image_id"] in ids]}
    out = work / f"val_first{limit}.json"
    write_json_atomic(out, gt)
    return out


def run(args) -> dict:
    from retina_d2.config import get_retina_cfg
    from retina_d2.data.converters.base import write_json_atomic
    from retina_d2.data.register import read_manifest
    from retina_d2.evaluation.image_scores import check_top_k

    from .heimed_exudate_cv import _scaled_schedule, _train, score_results

    work = args.work.resolve()
    config = args.config_file.resolve()
    cfg = get_retina_cfg()
    cfg.merge_from_file(str(config))
    cfg.merge_from_list(list(args.opts))
    # An eye's score as the config ships it, checked before training.
    top_k = check_top_k(cfg.RETINA.COMPONENTS.IMAGE_SCORE_TOP_K,
                        f"RETINA.COMPONENTS.IMAGE_SCORE_TOP_K of {config}")
    datasets = work / "datasets"
    _, env = convert_heimed_dev(args.root, datasets)
    conversion = datasets / "heimed"
    training = None
    if args.weights:
        weights = args.weights.resolve()
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: no such weights file (--weights)")
    else:
        run_dir = work / "run"
        opts = _scaled_schedule(config, args.iterations) + [
            "OUTPUT_DIR", str(run_dir), "DATASETS.TEST", "()", "RETINA.EVAL.REPORT", "False",
            *args.opts,
        ]
        logger.info("training %s for %d iterations", config.name, args.iterations)
        training = _train(config, opts, env)
        weights = run_dir / "model_final.pth"
    gt_file = _val_subset(conversion / "val.json", args.limit, work)
    gt = json.loads(gt_file.read_text())
    image_root = read_manifest(conversion)[1]

    rows = []
    for name in args.variants:
        predictions = work / f"predictions_{name.replace('+', '_')}.json"
        logger.info("predicting %d images with TTA %s", len(gt["images"]), name)
        inference = measure_in_subprocess(
            "benchmarks.tta:predict_variant",
            {"config": str(config), "weights": str(weights), "datasets": str(datasets),
             "gt_file": str(gt_file), "image_root": str(image_root),
             "out_file": str(predictions), "opts": [*args.opts, *VARIANTS[name]]},
        )
        if "error" in inference:
            raise RuntimeError(f"TTA {name}: prediction failed: {inference['error']}")
        scored = score_results(gt, json.loads(predictions.read_text()), top_k)
        rows.append({
            "variant": name, "views": inference["views"],
            **{key: scored["row"].get(key) for key in SCORES},
            "infer s / image": inference["seconds"] / inference["num_images"],
            "infer peak RSS MB": inference["peak_rss_mb"],
        })
    _add_differences(rows)
    results = {
        "benchmark": "tta",
        "config": str(
            config.relative_to(REPO_ROOT) if config.is_relative_to(REPO_ROOT) else config
        ),
        "overrides": list(args.opts),
        "weights": "trained by this run" if training else str(args.weights),
        "iterations": None if args.weights else args.iterations,
        "training": training,
        "images": len(gt["images"]),
        "note": "HEI-MED dev split (configs/splits/heimed_dev.json): trained on its 30 train "
                "photographs, scored on its val photographs; exudates only; percent except "
                "times; 'd ...' = the variant's value minus 'off'; inference seconds exclude "
                "reading and mapping the photograph, include TTA's merging and the lesion "
                "components",
        "machine": machine_info(),
        "variants": rows,
    }
    write_json_atomic(args.out, results, indent=2)
    _print(results)
    return results


def _add_differences(rows: List[dict]) -> None:
    """'d <key>': each variant's score minus the 'off' row's (when 'off' was run)."""
    off = next((r for r in rows if r["variant"] == "off"), None)
    if off is None:
        return
    for row in rows:
        for key in (*SCORES, "infer s / image"):
            if isinstance(row.get(key), (int, float)) and isinstance(off.get(key), (int, float)):
                row[f"d {key}"] = row[key] - off[key]


def _print(results: dict) -> None:
    columns = [
        ("TTA", "variant", "s"), ("views", "views", "d"), ("segm AP35", "segm AP35", ".1f"),
        ("AP50", "segm AP50", ".1f"), ("AP75", "segm AP75", ".1f"),
        ("bbox AP50", "bbox AP50", ".1f"), ("FROC", "FROC", ".1f"),
        ("img AUC", "image AUC", ".1f"), ("d AP50", "d segm AP50", "+.1f"),
        ("s/img", "infer s / image", ".2f"), ("MB", "infer peak RSS MB", ".0f"),
    ]
    print(f"\nHEI-MED dev-val exudates ({results['images']} images), {results['config']}, "
          f"weights: {results['weights']}")
    print(format_table(results["variants"], columns))
