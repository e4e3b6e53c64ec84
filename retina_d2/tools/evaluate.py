"""Instance AP of a COCO results file against a COCO GT file, at the lesion papers' IoU thresholds.

Examples:
    python tools/evaluate.py --gt datasets/idrid/test.json \\
        --predictions output/inference/coco_instances_results.json --json metrics.json
    python tools/evaluate.py --gt datasets/eophtha/all.json --predictions dt.json --annotated-only
    python tools/evaluate.py --gt datasets/eophtha/all.json --predictions dt.json --froc \\
        --froc-match center

Prints the tables of ``retina_d2.evaluation.format_instance_metrics``. ``--json`` writes
``{"bbox": {"AP35": .., "AP50": .., "AP75": .., "AP": .., ...}, "segm": {...}}`` in percent, NaN
(a category or size without GT) as null. Numbers equal pycocotools' COCOeval with
``iouThrs = --iou`` and ``maxDets = [1, 10, --max-dets]`` (AP, APs/m/l, AR: IoU 0.50:0.95).

``--froc`` adds lesion-level FROC (sensitivity at 1/8..8 false positives per image, each lesion
counted once; ``retina_d2.evaluation.froc_curve``) and lesion precision / recall / F1 at
``--froc-score-threshold``, masks matched (boxes with ``--tasks bbox`` or box-only results): a
table after the others, and ``"froc": {"FROC": .., "sens@1/8": .., "F1": .., "FROC-<category>":
.., ...}`` (percent; means over the categories with lesions unless suffixed) in --json.

A results file without any ``segmentation`` (a box detector's) is scored for bbox only, with a
warning, and --json then has no "segm". Exit code 2, with a message naming the file, for a missing
or malformed JSON file, a results file whose image_ids are not in the GT (a results file for
another GT), one where only some detections carry a mask or a box, or a --json that is a folder
or cannot be written. A detection with a NaN,
infinite or non-numeric score, a bbox that is not 4 finite numbers (or has a negative size), an
id that is neither an integer nor a string, or a mask whose size differs from its GT image's is
refused the same way, the message naming the entry's index and image_id; so is a GT file with a
value of the wrong type (an image size that is not a positive integer, a bbox or area that is not
finite numbers, iscrowd not 0/1) or an annotation of an image or category it does not list.

``--protocol per_image_map`` adds the e-ophtha paper's mAP (Matterport's per-image mask AP at
each --iou, averaged over the images with lesions; images without lesions apart, as false alarms
per healthy image; ``retina_d2.evaluation.protocols.per_image_map``): a table after the others,
and ``"per_image_map": {"mAP35": .., "mAP35-<category>": .., "images": .., "healthy_images": ..,
"false_alarms_per_healthy_image": ..}`` in --json. The semantic protocols (argmax_dice,
pr_operating_point, component_ap) score probability maps: run them with
``RETINA.EVAL.PROTOCOLS`` (tools/train_net.py --eval-only).

``--image-level`` adds the screening numbers, per lesion type with lesions in the GT: the image
AUC (an image is positive when the GT has a non-crowd annotation of that type on it; its score is
the mean of its ``--image-top-k`` best detection scores of the type, missing ones counting 0,
``retina_d2.evaluation.image_scores``) and the false alarms per healthy image (detections scoring
>= ``--froc-score-threshold`` on the images without any annotation of the type, over their
number; an image with only crowd annotations is negative for the AUC and left out of this).
``--image-scores image_predictions.json`` (tools/predict.py's) ranks the images by its
``"image_scores"`` instead, which must give every image it scores a finite score for every such
type (one entry per image, none of another GT). With
``--annotated-only`` each type counts only the images annotated for it. A table after the others,
and ``"image_level": {"top_k": .., "score_threshold": .., "images": .., "images-<category>": ..,
"images_with-<category>": .., "healthy_images-<category>": .., "AUC-<category>": ..,
"false_alarms_per_healthy_image-<category>": ..}`` in --json (AUC in percent; null where only one
class of image is present or no image is healthy; top_k null with --image-scores).
"""
import argparse
import json
import logging
import math
import numbers
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
from tabulate import tabulate

from ..evaluation import (
    BACKENDS,
    MATCHES,
    TASKS,
    InstanceEvalError,
    evaluate_coco_results,
    format_froc,
    format_instance_metrics,
    froc_curve,
    froc_metrics,
    write_metrics_json,
)
from ..evaluation.coco_io import (
    annotated_types,
    check_results,
    load_coco_gt,
    load_coco_results,
)
from ..evaluation.image_scores import image_auc, image_scores
from ..evaluation.protocols import (
    INSTANCE_PROTOCOLS,
    format_per_image_map,
    per_image_map,
)
from ..schema import FROC_IOU, FROC_MATCH, FROC_SCORE_THRESHOLD, IOU_THRESHOLDS


def iou_threshold(text):
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"an IoU threshold lies in (0, 1), got {text}")
    return value


def score(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a score threshold lies in [0, 1], got {text}")
    return value


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gt", type=Path, required=True, help="COCO instances JSON (ground truth)")
    parser.add_argument("--predictions", type=Path, required=True, help="COCO results JSON")
    parser.add_argument(
        "--iou", type=iou_threshold, nargs="+", default=list(IOU_THRESHOLDS), help="IoU thresholds"
    )
    parser.add_argument(
        "--max-dets", type=positive_int, default=256, help="detections scored per image"
    )
    parser.add_argument(
        "--annotated-only",
        action="store_true",
        help="keep only predictions of the lesion types each image is annotated for (e-ophtha)",
    )
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--backend", choices=BACKENDS, default="pycocotools")
    parser.add_argument("--json", type=Path, help="write the metrics here")
    parser.add_argument(
        "--froc",
        action="store_true",
        help="add lesion-level FROC (sensitivity at 1/8..8 FPs per image) and lesion F1",
    )
    parser.add_argument(
        "--froc-match",
        choices=MATCHES,
        default=FROC_MATCH,
        help="FROC hit: IoU >= --froc-iou, or the prediction's centre inside the lesion",
    )
    parser.add_argument("--froc-iou", type=iou_threshold, default=FROC_IOU, help="FROC hit IoU")
    parser.add_argument(
        "--protocol",
        action="append",
        choices=sorted(INSTANCE_PROTOCOLS),
        default=[],
        help="add a paper's own protocol (repeatable): per_image_map = the e-ophtha paper's "
        "per-image mAP at each --iou",
    )
    parser.add_argument(
        "--froc-score-threshold",
        type=score,
        default=FROC_SCORE_THRESHOLD,
        help="predictions scoring >= this give the lesion precision / recall / F1 and, with "
        "--image-level, the false alarms",
    )
    parser.add_argument(
        "--image-level",
        action="store_true",
        help="add the screening numbers per lesion type: image AUC and false alarms per healthy "
        "image (implied by --image-top-k and --image-scores)",
    )
    ranking = parser.add_mutually_exclusive_group()
    ranking.add_argument(
        "--image-top-k",
        type=positive_int,
        help="an image's score for the AUC: the mean of its K best detection scores of the "
        "type, missing ones counting 0 (default 1: the best lesion)",
    )
    ranking.add_argument(
        "--image-scores",
        type=Path,
        help="rank the images by this image_predictions.json of tools/predict.py instead",
    )
    return parser


def read_image_scores(path: Path, coco_gt, gt_source: str) -> dict:
    """image id -> its ``"image_scores"`` (lesion name -> score) from tools/predict.py's
    ``image_predictions.json``; an InstanceEvalError naming the file when it is missing,
    malformed, gives an image twice, or gives images the GT does not list."""
    if not path.is_file():
        raise InstanceEvalError(f"image scores file not found: {path}")
    try:
        with open(path) as f:
            entries = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InstanceEvalError(f"image scores file {path} is not valid JSON: {e}") from e
    if not isinstance(entries, dict):
        raise InstanceEvalError(
            f"image scores file {path} is not tools/predict.py's image_predictions.json (not an "
            "object keyed by image path)"
        )
    by_image = {}
    for image, entry in entries.items():
        if not isinstance(entry, dict) or "image_id" not in entry:
            raise InstanceEvalError(f"image scores file {path}: entry {image!r} has no image_id")
        image_id = entry["image_id"]
        if not isinstance(image_id, (numbers.Real, str)) or isinstance(image_id, bool):
            raise InstanceEvalError(
                f"image scores file {path}: entry {image!r} has image_id {image_id!r}: not an "
                "integer or string"
            )
        if image_id in by_image:
            raise InstanceEvalError(f"image scores file {path} gives image id {image_id} twice")
        by_image[image_id] = entry.get("image_scores")
    foreign = sorted(set(by_image) - set(coco_gt.getImgIds()), key=str)
    if foreign:
        raise InstanceEvalError(
            f"image scores file {path} has image ids that are not in GT {gt_source} "
            f"({len(foreign)} ids, e.g. {foreign[:5]}): scores for another GT?"
        )
    return by_image


def given_image_score(by_image: dict, image_id, lesion: str, path: Path) -> float:
    """One image's score for ``lesion`` from :func:`read_image_scores`; an InstanceEvalError
    naming the file and the image id when it has none or it is not a finite number."""
    if image_id not in by_image:
        raise InstanceEvalError(f"image scores file {path} has no entry for image id {image_id}")
    scores = by_image[image_id]
    if not isinstance(scores, dict) or lesion not in scores:
        raise InstanceEvalError(
            f"image scores file {path}: image id {image_id} has no image score for {lesion!r}"
        )
    value = scores[lesion]
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise InstanceEvalError(
            f"image scores file {path}: image id {image_id} has score {value!r} for {lesion!r}: "
            "not a finite number"
        )
    return float(value)


def image_level_metrics(gt, results, top_k=1, score_threshold=FROC_SCORE_THRESHOLD,
                        image_scores_file=None, annotated_only=False):
    """The ``--image-level`` numbers (see the module docstring) as an ordered dict."""
    coco_gt, gt_source = load_coco_gt(gt)
    results, source = load_coco_results(results)
    check_results(results, coco_gt, source, gt_source, ("bbox",))
    given = read_image_scores(image_scores_file, coco_gt, gt_source) if image_scores_file else None
    # With annotated_only an image counts only for the types it was graded for: an image graded
    # for microaneurysms alone says nothing about exudates, healthy or not.
    annotated = annotated_types(coco_gt) if annotated_only else {}
    metrics = OrderedDict(
        top_k=None if given is not None else int(top_k),
        score_threshold=float(score_threshold),
        images=len(coco_gt.getImgIds()),
    )
    for category_id in sorted(coco_gt.getCatIds()):
        name = coco_gt.cats[category_id]["name"]
        graded = [
            i for i in coco_gt.getImgIds() if i not in annotated or category_id in annotated[i]
        ]
        anns = [a for i in graded for a in coco_gt.imgToAnns.get(i, [])
                if a["category_id"] == category_id]
        with_lesion = {a["image_id"] for a in anns if not a.get("iscrowd", 0)}
        if not with_lesion:
            continue
        # Crowd (ignore) regions are not lesions for the AUC, but a detection on one is no
        # false alarm either: such images are not healthy.
        annotated_with = {a["image_id"] for a in anns}
        healthy = [i for i in graded if i not in annotated_with]
        if given is None:
            scores = image_scores(results, graded, category_id, top_k)
        else:
            scores = {i: given_image_score(given, i, name, image_scores_file) for i in graded}
        healthy_set = set(healthy)
        alarms = sum(
            1 for r in results
            if r["category_id"] == category_id and r["image_id"] in healthy_set
            and r["score"] >= score_threshold
        )
        metrics[f"images-{name}"] = len(graded)
        metrics[f"images_with-{name}"] = len(with_lesion)
        metrics[f"healthy_images-{name}"] = len(healthy)
        auc = image_auc([scores[i] for i in graded], [i in with_lesion for i in graded])
        metrics[f"AUC-{name}"] = None if auc is None else 100 * auc
        metrics[f"false_alarms_per_healthy_image-{name}"] = (
            alarms / len(healthy) if healthy else None
        )
    return metrics


def format_image_level(metrics, image_scores_file=None) -> str:
    """The ``--image-level`` numbers as a pipe table, one row per lesion type, headed by how the
    images were scored."""
    ranked_by = (
        f"the image_scores of {image_scores_file}" if image_scores_file
        else f"the mean of its {metrics['top_k']} best detection score(s) (missing = 0)"
    )
    prefix = "images_with-"
    names = [k[len(prefix):] for k in metrics if k.startswith(prefix)]
    rows = [
        [name, metrics[f"images-{name}"], metrics[f"images_with-{name}"],
         metrics[f"healthy_images-{name}"], metrics[f"AUC-{name}"],
         metrics[f"false_alarms_per_healthy_image-{name}"]]
        for name in names
    ]
    headers = ["lesion", "images", "with lesion", "healthy", "AUC",
               "false alarms / healthy image"]
    head = (
        f"Image-level screening ({metrics['images']} images): an image is positive when the GT "
        f"has a lesion of the type on it,\nscored by {ranked_by}; false alarms = detections "
        f"scoring >= {metrics['score_threshold']} on images without any.\nAUC in %, - = "
        "undefined (one class of image only, or no healthy image).\n"
    )
    return head + tabulate(rows, headers=headers, tablefmt="pipe", floatfmt=".2f",
                           missingval="-")


def check_json_target(path: Path):
    """The reason ``--json`` cannot be written there, or None; checked before the evaluation
    runs so that a typo does not cost its time."""
    if path.is_dir():
        return f"--json {path} is a folder; give the name of the file to write"
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else f"--json {path}: {parent} is not a folder"
    return None


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    problem = check_json_target(args.json) if args.json else None
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        metrics = evaluate_coco_results(
            args.gt,
            args.predictions,
            iou_thresholds=args.iou,
            max_dets=args.max_dets,
            annotated_only=args.annotated_only,
            tasks=args.tasks,
            backend=args.backend,
        )
        protocols = {
            name: per_image_map(
                args.gt, args.predictions, args.iou, max_dets=args.max_dets,
                annotated_only=args.annotated_only,
            )
            for name in dict.fromkeys(args.protocol)
        }
        froc = None
        if args.froc:
            froc = froc_curve(
                args.gt,
                args.predictions,
                match=args.froc_match,
                iou_threshold=args.froc_iou,
                use_masks="segm" in args.tasks,
                annotated_only=args.annotated_only,
                score_threshold=args.froc_score_threshold,
            )
        image_level = None
        if args.image_level or args.image_top_k or args.image_scores:
            image_level = image_level_metrics(
                args.gt,
                args.predictions,
                top_k=args.image_top_k or 1,
                score_threshold=args.froc_score_threshold,
                image_scores_file=args.image_scores,
                annotated_only=args.annotated_only,
            )
    except InstanceEvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_instance_metrics(metrics, args.iou, args.max_dets, args.annotated_only))
    if froc is not None:
        print("\n" + format_froc(froc))
        metrics["froc"] = froc_metrics(froc)
    for name, values in protocols.items():
        print(f"\n{name} (Matterport's per-image mask AP, %):\n" + format_per_image_map(values))
        metrics[name] = values
    if image_level is not None:
        print("\n" + format_image_level(image_level, args.image_scores))
        metrics["image_level"] = image_level
    if args.json:
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            write_metrics_json(metrics, args.json)
        except OSError as e:
            print(f"error: cannot write --json {args.json}: {e.strerror or e}", file=sys.stderr)
            return 2
        print(f"\nwrote {args.json}")
    return 0
