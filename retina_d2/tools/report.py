"""Write the HTML evaluation report of an evaluation folder.

Examples:
    python tools/report.py --eval-dir output/maskrcnn_synthetic/inference/synthetic_seg_val
    python tools/report.py --eval-dir out/eval --gt datasets/idrid/test.json \\
        --image-root datasets/idrid/raw --gallery 6 --score-threshold 0.5

The folder is the one ``tools/train_net.py`` evaluates into (``OUTPUT_DIR/inference/<dataset>``;
it writes the report itself after ``--eval-only`` and after training). The page,
``<eval-dir>/report/index.html``, holds the tables of every metrics file there (mAP35/50/75,
FROC, AUC-PR and F1, and any other ``*_metrics.json``), PR and FROC curves per lesion, the worst
and best images with hits, misses and false alarms outlined, and the config and environment
found beside the folder. It opens from disk in a browser; no server.

``--out`` must be a new or empty folder or an earlier report (it holds a ``.retina_d2_report``
file), which is replaced whole; nothing else is deleted. Exit code 2, with a message naming the
file, for a missing folder, a folder without metrics, an unreadable file or one that is not a JSON
object, predictions made for another ground truth, or an --out that is not empty and no earlier
report (the evaluation folder itself, say) or cannot be written.
"""
import argparse
import logging
import sys
from pathlib import Path

from ..report import ReportError, build_report


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--eval-dir", type=Path, required=True, help="an evaluation folder")
    parser.add_argument(
        "--out", type=Path,
        help="report folder: new, empty or an earlier report (default: <eval-dir>/report)",
    )
    parser.add_argument("--gt", type=Path, help="COCO GT file, if eval_info.json is absent")
    parser.add_argument("--image-root", type=Path, help="folder the GT's file names are under")
    parser.add_argument("--gallery", type=int, default=4, help="worst and best images shown (each)")
    parser.add_argument(
        "--score-threshold", type=float, help="predictions shown (default: the FROC table's)"
    )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        page = build_report(
            args.eval_dir, args.out, gt=args.gt, image_root=args.image_root,
            gallery_size=args.gallery, score_threshold=args.score_threshold,
        )
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    del page  # build_report logs where it is
    return 0
