"""``retina-d2``: one command for the toolkit's tools (``pip install -e .`` installs it).

Each subcommand runs a tool module of the package (retina_d2/tools/), with the same flags and
help as the checkout's thin script for it: ``retina-d2 train ...`` is
``python tools/train_net.py ...``. The modules are imported by name, never loaded from tools/ by
path, so the processes that ``--num-gpus N`` / ``--num-machines N`` start (train, predict) can
import the function they are handed.
"""
import importlib
import sys
from collections import OrderedDict
from typing import List, Optional

__all__ = ["SUBCOMMANDS", "main"]

# subcommand -> (tool script, its entry function, what it does, an example); the script
# tools/<name>.py runs the module retina_d2.tools.<name>, and so does the subcommand.
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
        "evaluate.py", "main", "mAP35/50/75 (and FROC, image AUC) of a COCO results file",
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
    reproduce=(
        "reproduce.py", "main", "a paper's system: convert, train, test, paper-vs-ours table",
        "retina-d2 reproduce idrid-resunet --data-root /data/IDRiD --output runs/resunet",
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


def tool_module(script: str) -> str:
    """The package module holding the logic of the tool script ``script`` (``train_net.py``)."""
    return f"retina_d2.tools.{script[: -len('.py')]}"


def _load_tool(script: str):
    """The tool's module, imported by name from the package (never loaded from tools/ by file
    path): the processes of --num-gpus / --num-machines import the functions they are handed
    (``train_net.main``, ``predict.predict_shard``) by module and name."""
    return importlib.import_module(tool_module(script))


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
