"""
``tools/benchmark.py heimed-exudate-cv``: a CPU exudate recipe cross-validated on the HEI-MED dev
images, beside the training-free floor computed on the same images in the same run.

The 40 dev photographs (``--root``) are dealt into ``--folds`` folds, stratified by whether an
eye has exudates (each fold holds its share of healthy eyes). For each fold the other folds are
converted as ``heimed_seg_train`` and the fold as ``heimed_seg_val``, the config
(``configs/exudate_fpnseg_heimed_cpu.yaml`` by default) is trained from scratch on the training
folds for ``--iterations`` (the config's schedule scaled to them), and the fold's photographs are
predicted (flip TTA, lesions = components of the exudate map, ``RETINA.COMPONENTS``) in a fresh
process. Per fold and as mean and spread over folds it reports:

- exudate instance AP35 / AP50 / AP75 (segm and bbox, COCOeval; ``evaluate_coco_results``),
- lesion FROC (IoU 0.2) and lesion precision / recall / F1 at the operating threshold,
- image-level exudate AUC (an image's score: the mean of its ``RETINA.COMPONENTS.IMAGE_SCORE_TOP_K``
  best lesion scores, ``retina_d2/evaluation/image_scores.py``; 1 = its best lesion's), beside the
  best lesion's and at the k the other folds choose,
- false alarms per healthy eye (exudate predictions on the fold's eyes without exudates),
- training seconds per training image and per iteration, inference seconds per image, and the
  peak RSS of the training and the inference process,

and the floor's AP, FROC and AUC on the fold with every model number's ratio to it.

With ``--diaretdb1-root`` (DIARETDB1 v2.1 as published: ``ddb1_v02_01`` or the folder holding
it), DIARETDB1 is converted into ``--work`` (its official test list, the experts fused by the
dataset's protocol: mean confidence >= 0.75) and every fold's model, trained on HEI-MED alone, is
also scored on it: another camera, never trained on. Per fold and as mean and spread over folds:
hard-exudate segm/bbox AP35 / AP50 / AP75, FROC, image-level AUC, the share of the consensus
exudates found and the false alarms per image (FROC's false positives: predictions matching no
lesion, on any image) at the fold's cross-validated threshold and at the config's, and the share
found at <= 1 false alarm per image (the FROC curve's point); the same for the floor, computed in
the same run on the same images (one row: it does not depend on the fold).

Thresholds are chosen by cross-validation on these images only: each fold's operating threshold
is the one with the best pooled lesion F1 over the *other* folds' out-of-fold predictions (so no
fold is scored at a threshold its own labels chose); the threshold to ship is the best over all
folds' out-of-fold predictions. A screening operating point is chosen the same way: the lowest
threshold whose false alarms per healthy eye on the other folds stay within
``--false-alarm-budget`` (default 0.5), and the one to ship over all folds. Rows at the config's own ``RETINA.COMPONENTS.SCORE_THRESHOLD``
are reported beside them. The image score's k is chosen the same way: fold k is scored with the k
(of ``IMAGE_TOP_KS``) whose image AUC, pooled over the other folds' out-of-fold predictions, is
highest (ties: the smaller k), and the one to ship is chosen over all folds.
"""
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from retina_d2.evaluation.image_scores import check_top_k, image_auc

from . import (
    HEIMED_ROOT,
    REPO_ROOT,
    format_table,
    machine_info,
    measure_in_subprocess,
)

__all__ = [
    "add_arguments",
    "counts_at",
    "cross_dataset_row",
    "diaretdb1_section",
    "select_image_top_k",
    "predict_fold",
    "predict_scored",
    "reliability",
    "prepare_diaretdb1",
    "run",
    "false_alarms_per_healthy_eye",
    "select_screening_threshold",
    "select_threshold",
    "stratified_folds",
]

logger = logging.getLogger(__name__)

DEFAULT_ROOT = HEIMED_ROOT
CONFIG = REPO_ROOT / "configs" / "exudate_fpnseg_heimed_cpu.yaml"
DEFAULT_FOLDS = 4
# Each shipped exudate recipe's results file (its README and config quote it); another config's
# results go to its --work folder unless --out says otherwise.
RESULTS_FILES = {
    "exudate_fpnseg_heimed_cpu.yaml": "heimed_exudate_cv.json",
    "exudate_candidates_heimed_cpu.yaml": "heimed_exudate_candidates_cv.json",
}
WORK_ROOT = REPO_ROOT / "output" / "benchmarks" / "heimed_exudate_cv"


def default_paths(config: Path, recipe_as_shipped: bool) -> tuple:
    """(results file, work folder) of a run of ``config`` when --out / --work are not given:
    one work folder per config, so that --skip-train never scores another config's models; the
    shipped results file only for a shipped recipe run as shipped (``recipe_as_shipped``: all
    images, its own schedule, no overrides), so a quick run never replaces it."""
    config = Path(config)
    work = WORK_ROOT / config.stem
    shipped = RESULTS_FILES.get(config.name)
    if (shipped and recipe_as_shipped
            and config.resolve() == (REPO_ROOT / "configs" / config.name).resolve()):
        return REPO_ROOT / "benchmarks" / "results" / shipped, work
    return work / "results.json", work
EXUDATE = "hard exudate"
# Candidate operating thresholds; the cross-validation picks among them.
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.1, 0.96, 0.05))
# Candidate image-score k (the mean of an eye's k best lesion scores); 1 = the best lesion.
IMAGE_TOP_KS = (1, 2, 3, 4, 5, 6, 8)


def add_arguments(parser) -> None:
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="HEI-MED folder")
    parser.add_argument(
        "--out", type=Path,
        help="results JSON file (default: the shipped recipe's benchmarks/results file, else "
        "results.json in --work)",
    )
    parser.add_argument(
        "--work", type=Path,
        help="datasets + runs folder (default: output/benchmarks/heimed_exudate_cv/<config name>)",
    )
    parser.add_argument("--config-file", type=Path, default=CONFIG)
    parser.add_argument("--folds", type=int, default=DEFAULT_FOLDS,
                        help="cross-validation folds (>= 2)")
    parser.add_argument(
        "--iterations", type=int, help="training iterations per fold (default: the config's)"
    )
    parser.add_argument(
        "--images", type=int,
        help="use only this many photographs, half of them without exudates (a quick run)",
    )
    parser.add_argument(
        "--skip-train", action="store_true", help="predict with the weights already in --work"
    )
    parser.add_argument(
        "--false-alarm-budget", type=float, default=0.5, metavar="PER_HEALTHY_EYE",
        help="also choose, by cross-validation, the lowest threshold whose out-of-fold false "
        "alarms per healthy eye stay within this (the screening operating point; default 0.5)",
    )
    parser.add_argument(
        "--diaretdb1-root", type=Path, metavar="RAW_DIR",
        help="DIARETDB1 v2.1 folder (ddb1_v02_01 or the one holding it): also score every fold's "
        "model on its official test images, never trained on, beside the floor",
    )
    parser.add_argument(
        "opts", nargs="*", default=[], help="config overrides KEY VALUE ... for training"
    )


# --- folds and thresholds ----------------------------------------------------------------------


def stratified_folds(names: Sequence[str], positive: Sequence[bool], k: int) -> List[List[str]]:
    """Deal ``names`` (sorted) into ``k`` folds, positives and negatives each in turn, so that
    every fold holds its share of both; deterministic."""
    if k < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {k}")
    if len(names) < k:
        raise ValueError(f"{len(names)} images cannot fill {k} folds")
    folds: List[List[str]] = [[] for _ in range(k)]
    order = sorted(zip(names, positive), key=lambda x: (not x[1], x[0]))
    for i, (name, _) in enumerate(order):
        folds[i % k].append(name)
    return [sorted(f) for f in folds]


def counts_at(curve: Dict, threshold: float) -> tuple:
    """(hits, false positives, lesions) of an FROC category curve (``froc_curve``'s
    ``categories[name]``) when predictions scoring >= ``threshold`` are kept."""
    thresholds = np.asarray(curve["thresholds"], dtype=np.float64)
    kept = np.flatnonzero(thresholds >= threshold)
    if kept.size == 0:
        return 0, 0, curve["num_lesions"]
    last = kept[-1]  # thresholds descend: the last kept point holds every kept prediction
    hits = int(round(curve["sensitivity"][last] * curve["num_lesions"]))
    fps = int(round(curve["fps_per_image"][last] * curve["num_images"]))
    return hits, fps, curve["num_lesions"]


def select_threshold(curves: Sequence[Dict], thresholds: Sequence[float] = THRESHOLDS) -> float:
    """The threshold with the best lesion F1 pooled over ``curves`` (ties: the higher one, fewer
    false alarms)."""
    best, best_f1 = thresholds[-1], -1.0
    for t in thresholds:
        hits = fps = lesions = 0
        for curve in curves:
            h, f, n = counts_at(curve, t)
            hits, fps, lesions = hits + h, fps + f, lesions + n
        denominator = 2 * hits + fps + (lesions - hits)
        f1 = 2 * hits / denominator if denominator else 0.0
        if f1 >= best_f1:
            best, best_f1 = t, f1
    return float(best)


def false_alarms_per_healthy_eye(folds: Sequence[Dict], threshold: float):
    """Exudate predictions scoring >= ``threshold`` on the eyes without exudates, per such eye,
    pooled over ``folds`` (each ``{"results": COCO results, "gt": COCO GT, "truth": image id ->
    has exudates}``); None without a healthy eye."""
    alarms = eyes = 0
    for fold in folds:
        exudate_id = _exudate_id(fold["gt"])
        healthy = {i for i, has in fold["truth"].items() if not has}
        eyes += len(healthy)
        alarms += sum(1 for r in fold["results"] if r["category_id"] == exudate_id
                      and r["image_id"] in healthy and r["score"] >= threshold)
    return alarms / eyes if eyes else None


def select_screening_threshold(folds: Sequence[Dict], budget: float,
                               thresholds: Sequence[float] = THRESHOLDS) -> float:
    """The lowest threshold (the most lesions found) whose pooled false alarms per healthy eye
    over ``folds`` (:func:`false_alarms_per_healthy_eye`) stay within ``budget``; the highest
    threshold when none does."""
    for t in sorted(thresholds):
        alarms = false_alarms_per_healthy_eye(folds, t)
        if alarms is not None and alarms <= budget:
            return float(t)
    return float(max(thresholds))


CALIBRATION_BINS = 10


def reliability(curves: Sequence[Dict], bins: int = CALIBRATION_BINS) -> dict:
    """How far lesion scores are from probabilities, pooled over ``curves`` (FROC category
    curves): per score bin, the predictions that found a lesion or were false alarms (FROC's
    matching; duplicates of a found lesion and predictions on ignore regions count as neither),
    their mean score and the share that found a lesion, and the expected calibration error (the
    bins' |share - mean score| weighted by their predictions). Each operating point of a curve is
    one distinct score; the predictions tied at it share it."""
    counts, hits, score_sums = np.zeros(bins), np.zeros(bins), np.zeros(bins)
    for curve in curves:
        scores = np.asarray(curve["thresholds"], dtype=np.float64)
        if scores.size == 0:
            continue
        found = np.nan_to_num(np.asarray(curve["sensitivity"], dtype=np.float64))
        found = np.round(found * curve["num_lesions"])
        alarms = np.round(np.asarray(curve["fps_per_image"], dtype=np.float64) * curve["num_images"])
        new_hits, new_alarms = np.diff(found, prepend=0.0), np.diff(alarms, prepend=0.0)
        which = np.clip((scores * bins).astype(int), 0, bins - 1)
        np.add.at(counts, which, new_hits + new_alarms)
        np.add.at(hits, which, new_hits)
        np.add.at(score_sums, which, scores * (new_hits + new_alarms))
    table = [
        {"scores": [i / bins, (i + 1) / bins], "predictions": int(counts[i]),
         "mean score": score_sums[i] / counts[i], "share found a lesion": hits[i] / counts[i]}
        for i in range(bins) if counts[i]
    ]
    total = counts.sum()
    error = (sum(row["predictions"] / total * abs(row["share found a lesion"] - row["mean score"])
                 for row in table) if total else None)
    return {"bins": table, "expected calibration error": error}


def _pooled_image_auc(scored: Sequence[Dict], top_k: int):
    """Image AUC of one ranking over the eyes of every :func:`score_results` in ``scored``, an
    eye scored by the mean of its ``top_k`` best lesion scores."""
    from retina_d2.evaluation.image_scores import image_score

    scores, labels = [], []
    for fold in scored:
        for image_id, has in fold["truth"].items():
            scores.append(image_score(fold["lesion_scores"][image_id], top_k))
            labels.append(has)
    return image_auc(scores, labels)


def select_image_top_k(scored: Sequence[Dict], top_ks: Sequence[int] = IMAGE_TOP_KS) -> int:
    """The image-score k with the highest image AUC pooled over ``scored`` (ties: the smaller k;
    1 when no AUC exists, e.g. no healthy eye)."""
    best, best_auc = 1, -1.0
    for k in top_ks:
        auc = _pooled_image_auc(scored, k)
        if auc is not None and auc > best_auc:
            best, best_auc = k, auc
    return int(best)


# --- one fold's prediction (runs in its own process) -------------------------------------------


def predict_fold(config: str, weights: str, datasets: str, gt_file: str, image_root: str,
                 out_file: str, opts: Sequence[str] = ()) -> dict:
    """Predict every photograph of ``gt_file`` with the trained model and write COCO results.

    Runs in a fresh process (``measure_in_subprocess``), so its peak RSS is inference's own.

    Returns:
        ``{"seconds": inference seconds (all images), "num_images": ...}``
    """
    import torch
    from detectron2.modeling import build_model

    os.environ["RETINA_D2_DATASETS"] = datasets
    from retina_d2.data.mapper import LesionDatasetMapper
    from retina_d2.engine.trainer import setup_cfg
    from retina_d2.modeling import LesionCheckpointer
    from retina_d2.modeling.components import (
        components_to_coco,
        lesion_components,
        semantic_probabilities,
    )

    cfg = setup_cfg(config, list(opts) + ["MODEL.WEIGHTS", weights])
    model = build_model(cfg)
    LesionCheckpointer(model).load(weights)
    model.eval()
    mapper = LesionDatasetMapper(cfg, is_train=False)
    gt = json.loads(Path(gt_file).read_text())
    # Channel c of the maps is the c-th category in the training set's (= this GT's) id order.
    category_ids = [c["id"] for c in sorted(gt["categories"], key=lambda c: c["id"])]
    exudate = next(i for i, c in enumerate(sorted(gt["categories"], key=lambda c: c["id"]))
                   if c["name"] == EXUDATE)
    components = cfg.RETINA.COMPONENTS
    results, seconds = [], 0.0
    for entry in gt["images"]:
        record = {
            "file_name": str(Path(image_root) / entry["file_name"]),
            "height": entry["height"], "width": entry["width"], "image_id": entry["id"],
        }
        start = time.perf_counter()
        inputs = mapper(record)
        with torch.no_grad():
            probs = semantic_probabilities(model, inputs, flip=components.FLIP_TTA)
        label_maps, lesions = lesion_components(
            probs, components.MASK_THRESHOLD, components.MIN_AREA, channels=[exudate]
        )
        seconds += time.perf_counter() - start
        results += components_to_coco(
            label_maps, lesions, entry["id"], category_ids, cfg.RETINA.EVAL.MAX_DETS
        )
    from retina_d2.data.converters.base import write_json_atomic

    write_json_atomic(Path(out_file), results)
    return {"seconds": seconds, "num_images": len(gt["images"])}


# --- training ----------------------------------------------------------------------------------


def _train(config: Path, opts: Sequence[str], env: Dict[str, str]) -> dict:
    """Train in a child process; its wall seconds and peak RSS (os.wait4 on that child)."""
    command = [sys.executable, str(REPO_ROOT / "tools" / "train_net.py"), "--config-file",
               str(config), *opts]
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env)
    _, status, usage = os.wait4(child.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"training failed (exit status {code}): {' '.join(command)}")
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": usage.ru_maxrss / 1024}


def _scaled_schedule(config: Path, iterations: int) -> list:
    """The config's schedule scaled to ``iterations`` (heimed-semantic's rule); LR steps that a
    very short run would reach at its last iteration or later are dropped."""
    from .heimed_semantic import scaled_schedule

    opts = scaled_schedule(config, iterations)
    at = opts.index("SOLVER.STEPS") + 1
    steps = tuple(s for s in eval(opts[at]) if s < iterations)  # a tuple literal written above
    opts[at] = str(steps) if steps else "()"
    return opts


# --- scoring -----------------------------------------------------------------------------------


def _exudate_id(gt: dict) -> int:
    ids = [c["id"] for c in gt["categories"] if c["name"] == EXUDATE]
    if not ids:
        raise ValueError(f"the ground truth has no {EXUDATE!r} category")
    return ids[0]


def _image_truth(gt: dict, exudate_id: int) -> Dict[int, bool]:
    with_exudates = {a["image_id"] for a in gt["annotations"]
                     if a["category_id"] == exudate_id and not a.get("iscrowd", 0)}
    return {img["id"]: img["id"] in with_exudates for img in gt["images"]}


def score_results(gt: dict, results: List[dict], top_k: int = 1, centre: bool = False) -> dict:
    """AP35/50/75 (segm, bbox), FROC curve and image AUC (an eye scored by the mean of its
    ``top_k`` best lesion scores, and by its best one) of one fold's exudate results;
    ``lesion_scores`` keeps every eye's lesion scores for other k. With ``centre``, also
    ``centre_curve``: the FROC curve with a lesion found by a prediction whose centre lies inside
    it."""
    from retina_d2.evaluation.froc import froc_curve
    from retina_d2.evaluation.instance_eval import evaluate_coco_results

    exudate_id = _exudate_id(gt)
    results = [r for r in results if r["category_id"] == exudate_id]
    metrics = evaluate_coco_results(gt, results)
    row = {}
    for task in ("segm", "bbox"):
        for iou in ("AP35", "AP50", "AP75"):
            row[f"{task} {iou}"] = metrics[task].get(f"{iou}-{EXUDATE}")
    curve = froc_curve(gt, results)["categories"][EXUDATE]
    row["FROC"] = 100 * curve["froc"]
    truth = _image_truth(gt, exudate_id)
    lesion_scores = {image_id: [] for image_id in truth}
    for r in results:
        lesion_scores[r["image_id"]].append(r["score"])
    scored = {"row": row, "curve": curve, "truth": truth, "lesion_scores": lesion_scores}
    for key, k in (("image AUC", top_k), ("best-lesion image AUC", 1)):
        auc = _pooled_image_auc([scored], k)
        row[key] = None if auc is None else 100 * auc
    if centre:
        scored["centre_curve"] = froc_curve(gt, results, match="center")["categories"][EXUDATE]
    return scored


def at_threshold(scored: dict, results: List[dict], gt: dict, threshold: float) -> dict:
    """Lesion precision / recall / F1 and false alarms per healthy eye at ``threshold``."""
    hits, fps, lesions = counts_at(scored["curve"], threshold)
    alarms = false_alarms_per_healthy_eye(
        [{"results": results, "gt": gt, "truth": scored["truth"]}], threshold
    )
    return {
        "threshold": threshold,
        "precision": 100 * hits / (hits + fps) if hits + fps else None,
        "recall": 100 * hits / lesions if lesions else None,
        "F1": 100 * 2 * hits / (hits + fps + lesions) if hits + fps + lesions else None,
        "false alarms / healthy eye": alarms,
    }


# --- another camera: DIARETDB1, never trained on ---------------------------------------------

DIARETDB1_FOLDER = "diaretdb1"  # under --work: the conversion and the floor's inputs
AT_ONE_FALSE_ALARM = "recall at <= 1 false alarm / image"
# The same with a lesion found when a prediction's centre lies inside it: DIARETDB1's consensus
# regions are the experts' coarse circles, ellipses and polygons, often around a cluster of
# exudates that a model outlines one by one (IoU 0.2 would count those as misses).
AT_ONE_FALSE_ALARM_CENTRE = "recall at <= 1 false alarm / image (centre inside)"


def cross_dataset_at(scored: dict, threshold: float) -> dict:
    """Share of the lesions found (percent) and false alarms per image when predictions scoring
    >= ``threshold`` are kept; false alarms are the FROC curve's false positives (predictions
    matching no lesion, on any image: on another dataset every image counts, not only healthy
    eyes)."""
    hits, fps, lesions = counts_at(scored["curve"], threshold)
    images = scored["curve"]["num_images"]
    return {
        "threshold": threshold,
        "recall": 100 * hits / lesions if lesions else None,
        "false alarms / image": fps / images if images else None,
    }


def cross_dataset_row(scored: dict, thresholds: Sequence[tuple]) -> dict:
    """A scored result set (:func:`score_results`) as a cross-dataset row: its AP / FROC / image
    AUC, :func:`cross_dataset_at` at each ``(prefix, threshold)``, and the share of lesions found
    at <= 1 false alarm per image (the FROC curve's highest point within that budget)."""
    row = dict(scored["row"])
    for prefix, threshold in thresholds:
        for key, value in cross_dataset_at(scored, threshold).items():
            row[f"{prefix} {key}"] = value
    for key, curve in ((AT_ONE_FALSE_ALARM, scored["curve"]),
                       (AT_ONE_FALSE_ALARM_CENTRE, scored.get("centre_curve"))):
        if curve is not None:
            at_one = curve["sensitivity_at"]["1"]
            row[key] = None if at_one is None or np.isnan(at_one) else 100 * at_one
    return row


def prepare_diaretdb1(raw_root: Path, work: Path, top_k: int = 1) -> dict:
    """Convert DIARETDB1 at ``raw_root`` into ``work/diaretdb1`` (official lists, the dataset's
    default fusion) and run the floor on its test images (image score: the mean of ``top_k`` best
    lesions).

    Returns:
        ``root``, ``gt_file`` and ``gt`` (the test split), ``image_root``, ``fusion`` (the
        converter's words), ``floor`` (:func:`score_results` of the floor), ``floor_results``
        and ``floor_seconds``.
    """
    from retina_d2.data.converters.base import require_dir
    from retina_d2.data.register import read_manifest

    from . import run_tool
    from .exudate_floor import floor_coco_results

    raw_root = require_dir(Path(raw_root).resolve(), "the DIARETDB1 folder")
    conversion = work / DIARETDB1_FOLDER / "diaretdb1"
    run_tool("convert_dataset.py", "diaretdb1", "--root", str(raw_root), "--out",
             str(conversion), "--no-semantic", "--overwrite")
    gt_file = conversion / "test.json"
    gt = json.loads(gt_file.read_text())
    image_root = read_manifest(conversion)[1]
    start = time.perf_counter()
    floor_results = floor_coco_results(gt["images"], image_root, _exudate_id(gt))
    floor_seconds = time.perf_counter() - start
    fusion = json.loads((conversion / "summary.json").read_text())["notes"]["fusion"]
    return {
        "root": str(raw_root), "gt_file": gt_file, "gt": gt, "image_root": image_root,
        "fusion": fusion, "floor": score_results(gt, floor_results, top_k, centre=True),
        "floor_results": floor_results, "floor_seconds": floor_seconds,
    }


def _check_same_categories(model_gt: dict, other_gt: dict, other: str) -> None:
    """predict_fold reads channel c as the c-th category of the GT it predicts: the model's
    training categories and the other dataset's must be the same, in the same id order."""
    def names(gt):
        return [(c["id"], c["name"]) for c in sorted(gt["categories"], key=lambda c: c["id"])]

    if names(model_gt) != names(other_gt):
        raise ValueError(f"{other}: categories {names(other_gt)} are not the model's "
                         f"{names(model_gt)}")


def diaretdb1_section(prepared: dict, folds: Sequence[dict], config_threshold: float) -> dict:
    """The DIARETDB1 results: one row per fold's model (``folds``: ``fold``, ``scored``,
    ``inference`` and the fold's cross-validated ``cv threshold`` or None), their summary over
    folds, and the floor's row, with every model row's ratio to it."""
    from .exudate_floor import FLOOR_NAME, add_floor_ratios

    gt = prepared["gt"]
    truth = prepared["floor"]["truth"]
    floor = {**cross_dataset_row(prepared["floor"], [("config", config_threshold)]),
             "seconds / image": prepared["floor_seconds"] / max(len(gt["images"]), 1)}
    rows = []
    for fold in folds:
        thresholds = [("config", config_threshold)]
        if fold["cv threshold"] is not None:
            thresholds.insert(0, ("cv", fold["cv threshold"]))
        row = {"fold": fold["fold"], **cross_dataset_row(fold["scored"], thresholds)}
        inference = fold["inference"]
        row["infer s / image"] = inference["seconds"] / max(inference["num_images"], 1)
        row["infer peak RSS MB"] = inference["peak_rss_mb"]
        add_floor_ratios([row], floor,
                         RATIO_KEYS + (AT_ONE_FALSE_ALARM, AT_ONE_FALSE_ALARM_CENTRE))
        rows.append(row)
    return {
        "root": prepared["root"],
        "split": "test (ddb1_v02_01_test.txt)",
        "fusion": prepared["fusion"],
        "images": len(gt["images"]),
        "images with hard exudates": sum(truth.values()),
        "hard exudates": prepared["floor"]["curve"]["num_lesions"],
        "note": "every fold's model trained on HEI-MED only, never on DIARETDB1; percent except "
                "thresholds, times and false alarms; false alarms / image = FROC false positives "
                "(IoU 0.2) over all images; 'centre inside': a lesion found by a prediction whose "
                "centre lies inside it (the experts' regions are coarse); 'cv' columns use the "
                "fold's threshold chosen on "
                "HEI-MED out-of-fold predictions, 'config' the config's; the floor row is "
                f"'{FLOOR_NAME}' on the same images (the same for every fold)",
        "model_folds": rows,
        "model_summary": _summary(rows) if rows else {},
        "floor": floor,
    }


def predict_scored(config: Path, weights: Path, datasets: Path, gt_file: Path, image_root,
                   out_file: Path, opts: Sequence[str], what: str, top_k: int = 1,
                   centre: bool = False) -> dict:
    """Predict ``gt_file``'s images with ``weights`` in a fresh process (:func:`predict_fold`)
    and score them: ``results``, ``inference`` (seconds, images, peak RSS) and ``scored``
    (:func:`score_results`)."""
    inference = measure_in_subprocess(
        "benchmarks.heimed_exudate_cv:predict_fold",
        {"config": str(config), "weights": str(weights), "datasets": str(datasets),
         "gt_file": str(gt_file), "image_root": str(image_root), "out_file": str(out_file),
         "opts": list(opts)},
    )
    if "error" in inference:
        raise RuntimeError(f"{what}: prediction failed: {inference['error']}")
    gt = json.loads(Path(gt_file).read_text())
    results = json.loads(Path(out_file).read_text())
    return {"results": results, "inference": inference,
            "scored": score_results(gt, results, top_k, centre)}


# --- the run -----------------------------------------------------------------------------------


def _dev_images(root: Path, work: Path, limit) -> tuple:
    """Names (without .jpg) of the photographs (the first ``limit`` in name order, or all), and
    whether each has exudates (from one conversion of them)."""
    from . import run_tool

    names = sorted(p.name[: -len(".jpg")] for p in root.glob("*.jpg"))
    if not names:
        raise ValueError(f"{root}: no .jpg photographs")
    datasets = work / "all"
    datasets.mkdir(parents=True, exist_ok=True)
    split = work / "all_split.json"
    split.write_text(json.dumps({"val": names}, indent=2))
    run_tool("convert_dataset.py", "heimed", "--root", str(root), "--out", str(datasets),
             "--split-file", str(split), "--no-semantic", "--overwrite")
    gt = json.loads((datasets / "val.json").read_text())
    truth = _image_truth(gt, _exudate_id(gt))
    by_name = {Path(e["file_name"]).name[: -len(".jpg")]: truth[e["id"]] for e in gt["images"]}
    if limit:
        # Half with exudates, half without, so that a quick run's folds hold both.
        with_ex = [n for n in names if by_name[n]]
        without = [n for n in names if not by_name[n]]
        names = sorted(with_ex[: limit - min(limit // 2, len(without))] + without[: limit // 2])
    return names, [by_name[n] for n in names]


def _convert_fold(root: Path, fold_dir: Path, train: List[str], val: List[str]) -> Dict[str, str]:
    from . import run_tool

    split = fold_dir / "split.json"
    fold_dir.mkdir(parents=True, exist_ok=True)
    split.write_text(json.dumps({"train": train, "val": val}, indent=2))
    datasets = fold_dir / "datasets"
    run_tool("convert_dataset.py", "heimed", "--root", str(root), "--out",
             str(datasets / "heimed"), "--split-file", str(split), "--overwrite")
    return dict(os.environ, RETINA_D2_DATASETS=str(datasets))


def _summary(rows: List[dict]) -> dict:
    """Mean and spread (sample standard deviation, min, max) of every numeric key over folds."""
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float)) and k != "fold"]
    out = {}
    for key in keys:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if values:
            out[key] = {
                "mean": float(np.mean(values)),
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                "min": float(np.min(values)),
                "max": float(np.max(values)),
            }
    return out


RATIO_KEYS = ("segm AP35", "segm AP50", "FROC", "image AUC")


def run(args) -> dict:
    from retina_d2.config import get_retina_cfg
    from retina_d2.data.converters.base import require_dir, write_json_atomic
    from retina_d2.data.register import read_manifest

    from .exudate_floor import floor_coco_results

    root = require_dir(args.root.resolve(), "the HEI-MED folder")
    config = args.config_file.resolve()
    cfg = get_retina_cfg()
    cfg.merge_from_file(str(config))
    cfg.merge_from_list(list(args.opts))
    iterations = args.iterations or cfg.SOLVER.MAX_ITER
    as_shipped = (not args.images and not args.opts and not args.skip_train
                  and args.folds == DEFAULT_FOLDS and iterations == cfg.SOLVER.MAX_ITER
                  and args.root.resolve() == Path(DEFAULT_ROOT).resolve())
    default_out, default_work = default_paths(args.config_file, as_shipped)
    args.out = args.out or default_out
    work = (args.work or default_work).resolve()
    logger.info("results: %s; work folder: %s", args.out, work)
    config_threshold = float(cfg.RETINA.COMPONENTS.SCORE_THRESHOLD)
    # Checked before any training: a bad k would otherwise stop the run after the first fold.
    top_k = check_top_k(cfg.RETINA.COMPONENTS.IMAGE_SCORE_TOP_K,
                        f"RETINA.COMPONENTS.IMAGE_SCORE_TOP_K of {config}")

    names, positive = _dev_images(root, work, args.images)
    folds = stratified_folds(names, positive, args.folds)
    # Before any training: a bad DIARETDB1 folder stops the run at once.
    diaretdb1 = prepare_diaretdb1(args.diaretdb1_root, work, top_k) if args.diaretdb1_root else None
    per_fold = []
    for k, val in enumerate(folds):
        train = [n for n in names if n not in val]
        fold_dir = work / f"fold{k}"
        env = _convert_fold(root, fold_dir, train, val)
        conversion = fold_dir / "datasets" / "heimed"
        run_dir = fold_dir / "run"
        opts = _scaled_schedule(config, iterations) + [
            "OUTPUT_DIR", str(run_dir), "DATASETS.TEST", "()", "RETINA.EVAL.REPORT", "False",
            *args.opts,
        ]
        training = None
        if not args.skip_train:
            logger.info("fold %d/%d: training on %d images for %d iterations",
                        k + 1, args.folds, len(train), iterations)
            training = _train(config, opts, env)
        gt_file = conversion / "val.json"
        image_root = read_manifest(conversion)[1]
        weights = run_dir / "model_final.pth"
        predicted = predict_scored(config, weights, fold_dir / "datasets", gt_file, image_root,
                                   fold_dir / "predictions.json", args.opts, f"fold {k}", top_k)
        gt = json.loads(gt_file.read_text())
        start = time.perf_counter()
        floor_results = floor_coco_results(gt["images"], image_root, _exudate_id(gt))
        floor_seconds = time.perf_counter() - start
        per_fold.append({
            "fold": k, "train": train, "val": val, "gt": gt, "results": predicted["results"],
            "model": predicted["scored"], "floor": score_results(gt, floor_results, top_k),
            "floor_results": floor_results, "floor_seconds": floor_seconds,
            "training": training, "inference": predicted["inference"], "num_train": len(train),
        })
        if diaretdb1:
            _check_same_categories(gt, diaretdb1["gt"], str(diaretdb1["gt_file"]))
            per_fold[-1]["diaretdb1"] = predict_scored(
                config, weights, fold_dir / "datasets", diaretdb1["gt_file"],
                diaretdb1["image_root"], fold_dir / "diaretdb1_predictions.json", args.opts,
                f"fold {k} on DIARETDB1", top_k, centre=True,
            )

        # Written after every fold: a run stopped early still leaves what it measured.
        summary = _assemble(per_fold, folds, names, iterations, config_threshold, config, args,
                            config_top_k=top_k)
        if diaretdb1:
            summary["diaretdb1"] = diaretdb1_section(
                diaretdb1, _diaretdb1_folds(per_fold, summary["model_folds"]), config_threshold
            )
        write_json_atomic(args.out, summary, indent=2)
    _print(summary)
    return summary


def _diaretdb1_folds(per_fold: List[dict], model_rows: List[dict]) -> List[dict]:
    """Each fold's DIARETDB1 scoring with the threshold its HEI-MED row was scored at by
    cross-validation (None until another fold is done)."""
    return [{"fold": fold["fold"], "cv threshold": row.get("cv threshold"),
             **{key: fold["diaretdb1"][key] for key in ("scored", "inference")}}
            for fold, row in zip(per_fold, model_rows)]


def _predicted(fold: dict) -> dict:
    """A fold's predictions as :func:`false_alarms_per_healthy_eye` reads them."""
    return {"results": fold["results"], "gt": fold["gt"], "truth": fold["model"]["truth"]}


def _assemble(per_fold: List[dict], folds, names, iterations: int, config_threshold: float,
              config: Path, args, config_top_k: int = 1) -> dict:
    """The results of the folds done so far (``folds_completed`` of ``folds``); image scores
    were computed with the config's ``config_top_k``."""
    from .exudate_floor import FLOOR_NAME, add_floor_ratios

    budget = args.false_alarm_budget
    # Thresholds by cross-validation: fold k's from the other folds' out-of-fold predictions.
    model_rows, floor_rows = [], []
    for k, fold in enumerate(per_fold):
        others = [f["model"]["curve"] for j, f in enumerate(per_fold) if j != k]
        row = {"fold": k, "images": len(fold["val"]),
               "healthy eyes": sum(not v for v in fold["model"]["truth"].values()),
               **fold["model"]["row"]}
        # Until another fold is done there is nothing to choose fold k's threshold on.
        operating = [("cv", select_threshold(others))] if others else []
        other_folds = [_predicted(f) for j, f in enumerate(per_fold) if j != k]
        if other_folds:
            operating.append(("screening", select_screening_threshold(other_folds, budget)))
        for prefix, t in operating + [("config", config_threshold)]:
            for key, value in at_threshold(fold["model"], fold["results"], fold["gt"], t).items():
                row[f"{prefix} {key}"] = value
        if other_folds:  # the image score's k, chosen on the other folds' eyes
            top_k = select_image_top_k([f["model"] for j, f in enumerate(per_fold) if j != k])
            auc = _pooled_image_auc([fold["model"]], top_k)
            row["cv image score top k"] = top_k
            row["cv image AUC"] = None if auc is None else 100 * auc
        training, inference = fold["training"], fold["inference"]
        if training:
            row["train s / image"] = training["seconds"] / fold["num_train"]
            row["train s / iteration"] = training["seconds"] / iterations
            row["train peak RSS MB"] = training["peak_rss_mb"]
        row["infer s / image"] = inference["seconds"] / inference["num_images"]
        row["infer peak RSS MB"] = inference["peak_rss_mb"]
        floor = {"fold": k, **fold["floor"]["row"],
                 "seconds / image": fold["floor_seconds"] / len(fold["val"])}
        for key, value in at_threshold(
            fold["floor"], fold["floor_results"], fold["gt"], config_threshold
        ).items():
            floor[f"config {key}"] = value
        add_floor_ratios([row], floor, RATIO_KEYS)
        model_rows.append(row)
        floor_rows.append(floor)
    ship_threshold = select_threshold([f["model"]["curve"] for f in per_fold])
    screening_threshold = select_screening_threshold([_predicted(f) for f in per_fold], budget)

    # Pooled out-of-fold image AUC: one ranking over all folds' eyes.
    scored = [f["model"] for f in per_fold]
    pooled_auc = _pooled_image_auc(scored, config_top_k)
    pooled_best_lesion = _pooled_image_auc(scored, 1)
    calibration = reliability([f["model"]["curve"] for f in per_fold])

    results = {
        "benchmark": "heimed-exudate-cv",
        "config": str(config.relative_to(REPO_ROOT) if config.is_relative_to(REPO_ROOT) else config),
        "overrides": list(args.opts),
        "folds": args.folds,
        "folds_completed": len(per_fold),
        "images": len(names),
        "iterations": iterations,
        "fold_images": folds,
        "config_threshold": config_threshold,
        "cv_threshold_to_ship": ship_threshold,
        "false_alarm_budget_per_healthy_eye": budget,
        "screening_threshold_to_ship": screening_threshold,
        "config_image_score_top_k": config_top_k,
        "image_score_top_k_to_ship": select_image_top_k(scored),
        "pooled_out_of_fold_image_AUC": None if pooled_auc is None else 100 * pooled_auc,
        "pooled_out_of_fold_best_lesion_image_AUC": (
            None if pooled_best_lesion is None else 100 * pooled_best_lesion
        ),
        "pooled_out_of_fold_lesion_calibration": calibration,
        "note": "percent except thresholds, times and false alarms; every fold's model trained "
                "from scratch on the other folds; 'cv' columns use the threshold chosen on the "
                "other folds' out-of-fold predictions (best pooled lesion F1), 'screening' "
                "columns the lowest threshold whose false alarms per healthy eye on the other "
                "folds stay within false_alarm_budget_per_healthy_eye, 'config' columns the config's "
                "RETINA.COMPONENTS.SCORE_THRESHOLD; image AUC: an eye scored by the mean of its "
                "config_image_score_top_k best lesion scores (RETINA.COMPONENTS."
                "IMAGE_SCORE_TOP_K), 'best-lesion' by its best one, 'cv image AUC' by the k the "
                "other folds choose (best pooled image AUC); healthy eye = no exudate annotated; "
                "the "
                f"floor row is '{FLOOR_NAME}' on the same fold",
        "machine": machine_info(),
        "model_folds": model_rows,
        "model_summary": _summary(model_rows),
        "floor_folds": floor_rows,
        "floor_summary": _summary(floor_rows),
    }
    return results


def _print(results: dict) -> None:
    model_rows, floor_rows = results["model_folds"], results["floor_folds"]
    columns = [
        ("fold", "fold", "d"), ("segm AP35", "segm AP35", ".1f"), ("AP50", "segm AP50", ".1f"),
        ("AP75", "segm AP75", ".1f"), ("FROC", "FROC", ".1f"), ("img AUC", "image AUC", ".1f"),
        ("best-lesion AUC", "best-lesion image AUC", ".1f"), ("cv k", "cv image score top k", "g"),
        ("cv AUC", "cv image AUC", ".1f"), ("cv thr", "cv threshold", ".2f"),
        ("cv F1", "cv F1", ".1f"),
        ("cv FA/healthy", "cv false alarms / healthy eye", ".2f"),
        ("scr thr", "screening threshold", ".2f"), ("scr recall", "screening recall", ".1f"),
        ("scr FA/healthy", "screening false alarms / healthy eye", ".2f"),
        ("cfg FA/healthy", "config false alarms / healthy eye", ".2f"),
        ("AP35 x floor", "segm AP35 x floor", ".2f"), ("AP50 x floor", "segm AP50 x floor", ".2f"),
        ("train s/img", "train s / image", ".1f"), ("infer s/img", "infer s / image", ".1f"),
        ("train MB", "train peak RSS MB", ".0f"), ("infer MB", "infer peak RSS MB", ".0f"),
    ]
    summary = results["model_summary"]
    mean = {"fold": -1, **{k: v["mean"] for k, v in summary.items()}}
    print(f"\nHEI-MED exudates, {results['folds']}-fold CV over {results['images']} images, "
          f"{results['iterations']} iterations per fold, {os.cpu_count()} CPUs (fold -1: mean)")
    print(format_table(model_rows + [mean], columns))
    floor_columns = [
        ("fold", "fold", "d"), ("segm AP35", "segm AP35", ".1f"), ("AP50", "segm AP50", ".1f"),
        ("AP75", "segm AP75", ".1f"), ("FROC", "FROC", ".1f"), ("img AUC", "image AUC", ".1f"),
        ("cfg FA/healthy", "config false alarms / healthy eye", ".2f"),
    ]
    fmean = {"fold": -1, **{k: v["mean"] for k, v in results["floor_summary"].items()}}
    print("\ntraining-free floor on the same folds")
    print(format_table(floor_rows + [fmean], floor_columns))
    print(f"\nthreshold to ship (best pooled out-of-fold lesion F1): "
          f"{results['cv_threshold_to_ship']:.2f}; pooled out-of-fold image AUC (an eye's "
          f"{results['config_image_score_top_k']} best lesions): "
          f"{results['pooled_out_of_fold_image_AUC']}, best lesion: "
          f"{results['pooled_out_of_fold_best_lesion_image_AUC']}; image score k to ship: "
          f"{results['image_score_top_k_to_ship']}")
    if "screening_threshold_to_ship" in results:
        print(f"screening threshold to ship (lowest with <= "
              f"{results['false_alarm_budget_per_healthy_eye']} out-of-fold false alarms per "
              f"healthy eye): {results['screening_threshold_to_ship']:.2f}")
    calibration = results.get("pooled_out_of_fold_lesion_calibration")
    if calibration and calibration["bins"]:
        print("\nlesion scores against what they found (pooled out-of-fold; expected calibration "
              f"error {calibration['expected calibration error']:.3f})")
        print(format_table(calibration["bins"], [
            ("scores", "scores", ""), ("predictions", "predictions", "d"),
            ("mean score", "mean score", ".2f"), ("share found", "share found a lesion", ".2f"),
        ]))
    if "diaretdb1" in results:
        _print_diaretdb1(results["diaretdb1"])


def _print_diaretdb1(section: dict) -> None:
    columns = [
        ("fold", "fold", "d"), ("segm AP35", "segm AP35", ".1f"), ("AP50", "segm AP50", ".1f"),
        ("img AUC", "image AUC", ".1f"), ("cv thr", "cv threshold", ".2f"),
        ("cv recall", "cv recall", ".1f"), ("cv FA/img", "cv false alarms / image", ".2f"),
        ("cfg recall", "config recall", ".1f"),
        ("cfg FA/img", "config false alarms / image", ".2f"),
        ("recall@1FA", AT_ONE_FALSE_ALARM, ".1f"),
        ("centre recall@1FA", AT_ONE_FALSE_ALARM_CENTRE, ".1f"),
        ("infer s/img", "infer s / image", ".1f"),
    ]
    mean = {"fold": -1, **{k: v["mean"] for k, v in section["model_summary"].items()}}
    floor = {"fold": -2, **section["floor"]}
    print(f"\nDIARETDB1 {section['split']}, never trained on: {section['images']} images "
          f"({section['images with hard exudates']} with hard exudates, "
          f"{section['hard exudates']} consensus exudates; {section['fusion']}); "
          f"fold -1: mean, fold -2: the floor")
    print(format_table(section["model_folds"] + [mean, floor], columns))
