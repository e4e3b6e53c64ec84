"""Convert a public DR lesion dataset's native masks into per-instance COCO JSON.

Examples:
    python tools/convert_dataset.py idrid --root /data/IDRiD --out datasets/idrid
    python tools/convert_dataset.py eophtha --root /data/e_ophtha --out datasets/eophtha --subset MA
    python tools/convert_dataset.py heimed --root ../shared/data/heimed --out datasets/heimed \\
        --split-file configs/splits/heimed_dev.json
    python tools/convert_dataset.py diaretdb1 --root /data/ddb1_v02_01 --out datasets/diaretdb1
    python tools/convert_dataset.py synthetic --out datasets/synthetic --count 24 --size 512

Outputs (see retina_d2/data/converters/base.py): one COCO file per split (train.json, test.json,
valid.json, or all.json), semantic target PNGs, summary.json, and the retina_d2.json manifest that
``retina_d2.data.register`` reads. ``file_name`` is relative to --root (the manifest's image_root).

Bad input (a missing or malformed file, a path leaving its folder, an unwritable --out) is one
``error:`` line naming the file and exit status 2, as with the other tools.
"""
import argparse
import inspect
import logging
import sys
from pathlib import Path

from ..data.converters import (
    CONVERTER_MODULES,
    ConversionError,
    ConvertOptions,
    format_summary,
    get_converter,
)
from ..data.instances import Dilation
from ..data.lesions import LESIONS, lesion, lesion_by_abbrev


def parse_dilation(text):
    """``LESION=KxI`` (e.g. ``MA=5x2`` or ``microaneurysm=3x1``) -> (lesion name, Dilation)."""
    try:
        name, spec = text.split("=")
        kernel, iterations = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--dilate takes LESION=KxI (e.g. MA=5x2), got {text!r}")
    try:
        les = lesion_by_abbrev(name) if name.upper() == name else lesion(name.replace("_", " "))
        return les.name, Dilation(kernel, iterations)
    except (KeyError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e))


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    for dataset in CONVERTER_MODULES:
        module = get_converter(dataset)
        p = sub.add_parser(dataset, help=(module.__doc__ or "").strip().splitlines()[0])
        p.add_argument("--root", type=Path, help="raw dataset folder, as published")
        p.add_argument("--out", type=Path, required=True, help="output folder")
        p.add_argument("--overwrite", action="store_true", help="replace an existing conversion")
        p.add_argument(
            "--on-error",
            choices=("stop", "skip"),
            default=None,
            help="a bad image or mask stops the run (default) or is skipped with a warning; "
            "a HEI-MED blob label or DIARETDB1 marking type that is not known becomes an "
            "ignore region with a warning, unless 'stop' is given",
        )
        p.add_argument("--connectivity", type=int, choices=(4, 8), default=8)
        p.add_argument("--min-area", type=int, default=1, help="drop components smaller than this")
        p.add_argument(
            "--dilate",
            type=parse_dilation,
            action="append",
            default=[],
            metavar="LESION=KxI",
            help="dilate that lesion's instances with a KxK kernel I times (repeatable); "
            f"lesions: {', '.join(les.abbrev for les in LESIONS)}",
        )
        p.add_argument(
            "--polygons",
            action="store_true",
            help="store each lesion as polygons along its pixel corners where they rasterise back "
            "to exactly its pixels (1-px lesions and lines too); a lesion with a hole keeps its "
            "RLE, so no pixel is lost or added",
        )
        p.add_argument("--no-semantic", action="store_true", help="skip the semantic target PNGs")
        module.add_arguments(p)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    module = get_converter(args.dataset)
    options = ConvertOptions(
        connectivity=args.connectivity,
        min_area=args.min_area,
        dilation=dict(args.dilate),
        on_error=args.on_error or "stop",
        overwrite=args.overwrite,
        segmentation_format="polygon" if args.polygons else "rle",
        semantic=not args.no_semantic,
    )
    common = {"dataset", "root", "out", "overwrite", "on_error", "connectivity", "min_area",
              "dilate", "polygons", "no_semantic"}
    flags = {k: v for k, v in vars(args).items() if k not in common}
    if "unknown_labels" in inspect.signature(module.convert).parameters:
        # Unknown labels are a warning by default; only an explicit --on-error stop stops.
        flags["unknown_labels"] = "stop" if args.on_error == "stop" else "ignore"
    if args.root is None and args.dataset != "synthetic":
        print(f"error: {args.dataset} needs --root (the raw dataset folder)", file=sys.stderr)
        return 2
    try:
        summary = module.convert(args.root, args.out, options, **flags)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2  # as the other tools: 2 is bad input, named on the error line
    print(format_summary(summary))
    for key, value in summary.get("notes", {}).items():
        print(f"{key.replace('_', ' ')}: {value}")
    print(f"\nwrote {args.out} (summary: {Path(args.out) / 'summary.json'})")
    return 0
