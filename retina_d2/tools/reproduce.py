"""Reproduce a paper's system: convert its raw dataset, train its paper config, select the
checkpoint on validation, score the test split once under the paper's protocol and the toolkit's
standard one, and write "metric | paper's figure (source) | ours | difference".

Examples:
    python tools/reproduce.py idrid-resunet --data-root /data/IDRiD
    python tools/reproduce.py eophtha-maskrcnn --data-root /data/e_ophtha --output runs/eophtha \\
        MODEL.WEIGHTS /models/model_final_a3ec72.pkl
    python tools/reproduce.py eophtha-maskrcnn --data-root /data/e_ophtha --output runs/eophtha \\
        --resume MODEL.WEIGHTS /models/model_final_a3ec72.pkl

Systems (their figures: retina_d2/evaluation/published_figures.yaml):
{systems}

OUTPUT holds reproduce_state.json (the stages done), datasets/ (the conversion), train/ (the
training run; lesion_train/ first for the two-step grading systems), test/ (the test split's
evaluation and report) and the table, reproduce.json and reproduce.md. An interrupted run goes on
with --resume and the same arguments: finished stages are skipped and training resumes from its
last checkpoint. opts (KEY VALUE ...) override every stage's config (OUTPUT_DIR and DATASETS are
reproduce's own); a pretrained start that cannot be downloaded is one error line naming the
MODEL.WEIGHTS override.
"""
import argparse
import sys

from ..config import ConfigError
from ..data.converters import ConversionError
from ..evaluation.published import PublishedFiguresError
from ..reproduce import DEFAULT_CONFIGS, SYSTEMS, ReproduceError, reproduce
from ..safe_load import CheckpointError


def _systems_help() -> str:
    lines = []
    for name, system in SYSTEMS.items():
        then = f" (after {system.lesion_system})" if system.lesion_system else ""
        lines.append(f"    {name:<35}{system.config}{then}")
    return "\n".join(lines)


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__.format(systems=_systems_help()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("system", choices=list(SYSTEMS), metavar="SYSTEM",
                        help=f"one of: {', '.join(SYSTEMS)}")
    parser.add_argument("--data-root", required=True, metavar="RAW_DIR",
                        help="the system's raw dataset folder, as published")
    parser.add_argument("--output", metavar="DIR",
                        help="the run's folder, new or empty (default: output/reproduce/SYSTEM)")
    parser.add_argument("--configs", metavar="DIR", default=DEFAULT_CONFIGS,
                        help="the folder of the paper configs (default: %(default)s, in the "
                        "current folder: run from a retina_d2 checkout's root)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output: skip its finished stages, resume "
                        "training from its last checkpoint")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE",
                        help="config overrides for every stage, e.g. MODEL.DEVICE cpu")
    return parser


def main(argv=None) -> int:
    # Intermixed: the flags may come before or after SYSTEM and the KEY VALUE pairs.
    args = build_parser().parse_intermixed_args(argv)
    output = args.output or f"output/reproduce/{args.system}"
    try:
        json_path, md_path = reproduce(args.system, args.data_root, output, args.opts,
                                       resume=args.resume, configs=args.configs)
    except (ReproduceError, ConversionError, ConfigError, CheckpointError,
            PublishedFiguresError, FileNotFoundError) as e:
        # A bad argument, dataset, config or weights file: one line, not a traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\nwrote {json_path} and {md_path}")
    return 0
