"""``retina-d2``: one command for the toolkit's tools (``pip install -e .`` installs it).

Each subcommand is the tool script of the checkout it wraps, with the same flags and help:
``retina-d2 train ...`` is ``python tools/train_net.py ...``. The scripts stay the reference
(Detectron2's projects ship thin ``tools/``), so the tools folder of the checkout must be
there: an editable install, which is what the setup command makes.
"""
import importlib.util
import sys
from collections import OrderedDict
from pathlib import Path
from typing import List, Optional

__all__ = ["SUBCOMMANDS", "main"]

TOOLS_DIR = Path(__file__).resolve().parents[1] / "tools"

# subcommand -> (tool script, its entry function, what it does, an example)
SUBCOMMANDS = OrderedDict(
    convert=(
        "convert_dataset.py", "main", "a dataset's native masks -> per-instance COCO JSON",
        "retina-d2 convert heimed --root ../shared/data/heimed --out datasets/heimed",
    ),
    train=(
        "train_net.py", "cli", "train and evaluate a model (Detectron2's DefaultTrainer)",
        "retina-d2 train --config-file configs/maskrcnn_eophtha.yaml",
    ),
    evaluate=(
        "evaluate.py", "main", "mAP35/50/75 (and FROC) of a COCO results file",
        "retina-d2 evaluate --gt datasets/idrid/test.json --predictions dt.json --froc",
    ),
    predict=(
        "predict.py", "main", "lesions on new images: COCO results, overlays, counts",
        "retina-d2 predict --config-file C.yaml --weights model_best.pth --input photos/ "
        "--output out/",
    ),
    report=(
        "report.py", "main", "the HTML report of an evaluation folder",
        "retina-d2 report --eval-dir output/maskrcnn_synthetic/inference/synthetic_seg_val",
    ),
)


def _usage() -> str:
    lines = ["usage: retina-d2 <command> [options]   (retina-d2 <command> --help for its options)",
             "", "commands:"]
    for name, (_, _, what, _) in SUBCOMMANDS.items():
        lines.append(f"  {name:<10}{what}")
    lines += ["", "examples:"]
    lines += [f"  {example}" for *_, example in SUBCOMMANDS.values()]
    return "\n".join(lines)


def _load_tool(script: str):
    path = TOOLS_DIR / script
    if not path.is_file():
        raise SystemExit(
            f"error: retina-d2 runs the tool scripts of a retina_d2 checkout, and {path} is "
            "missing; install the checkout with `pip install -e .` (or `make env`)"
        )
    spec = importlib.util.spec_from_file_location(f"retina_d2_tools.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"error: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    script, entry, _, _ = SUBCOMMANDS[command]
    tool = _load_tool(script)
    # argparse names the program after argv[0]: usage lines then read "retina-d2 train ...".
    program, sys.argv = sys.argv, [f"retina-d2 {command}", *rest]
    try:
        status = getattr(tool, entry)(rest)
    finally:
        sys.argv = program
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
