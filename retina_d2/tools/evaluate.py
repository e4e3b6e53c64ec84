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
"""
import argparse
import logging
import sys
from pathlib import Path

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
        help="predictions scoring >= this give the lesion precision / recall / F1",
    )
    return parser


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
    if args.json:
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            write_metrics_json(metrics, args.json)
        except OSError as e:
            print(f"error: cannot write --json {args.json}: {e.strerror or e}", file=sys.stderr)
            return 2
        print(f"\nwrote {args.json}")
    return 0
