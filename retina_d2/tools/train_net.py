"""Train and evaluate a retina_d2 model with Detectron2's DefaultTrainer.

Examples:
    python tools/train_net.py --config-file configs/maskrcnn_eophtha.yaml
    python tools/train_net.py --config-file configs/maskrcnn_heimed.yaml --num-gpus 2
    python tools/train_net.py --config-file configs/maskrcnn_idrid.yaml --eval-only \\
        MODEL.WEIGHTS output/maskrcnn_idrid/model_best.pth
    python tools/train_net.py --eval-only MODEL.WEIGHTS output/maskrcnn_idrid/model_best.pth

--eval-only without --config-file evaluates with the config stored in the checkpoint (training
stores it, with the class names, in every checkpoint; OUTPUT_DIR on the command line says where
the metrics go). A checkpoint saved before configs were stored needs --config-file.

--seed N makes a run repeatable: on the CPU two runs with the same seed give the same losses.
On a GPU add --deterministic (RETINA.DETERMINISTIC in retina_d2/config.py: what it costs).

Weights files are read as tensors and NumPy arrays only (--trust-checkpoint for an old full
pickle you trust). --eval-only refuses a checkpoint that sets fewer than all of the model's
parameters (MODEL.ALLOW_PARTIAL_WEIGHTS True to accept one); training from one only warns.
It also refuses, before any inference, a checkpoint whose stored class names differ (in names or
order) from a DATASETS.TEST dataset's lesion classes, since output k is scored as the dataset's
class k; a checkpoint without stored class names is evaluated, with a warning.

Datasets are the conversions found under $RETINA_D2_DATASETS (default ./datasets); see
datasets/README.md. The run's config, environment, checkpoints (the best one as model_best.pth),
metrics, overlay pictures and the HTML report (inference/<dataset>/report/index.html, see
tools/report.py) go to OUTPUT_DIR.
"""
import logging
import os
import sys

from detectron2.engine import default_argument_parser
from detectron2.evaluation import verify_results
from detectron2.utils import comm

from ..config import ConfigError
from ..data.image_io import ImageReadError
# Detectron2's launch, which also runs --num-gpus N as N CPU processes where there is no CUDA.
from ..engine import LesionTrainer, launch, setup_cfg
from ..modeling import LesionCheckpointer
from ..modeling.model_file import check_evaluation_classes, read_model_info
from ..modeling.pretrained import fetch_weights
from ..safe_load import CheckpointError


def main(args):
    if not args.config_file and not args.eval_only:
        raise ConfigError(
            "--config-file is needed to train (only --eval-only can take the config stored in "
            "the MODEL.WEIGHTS checkpoint)"
        )
    cfg = setup_cfg(args.config_file, run_opts(args), args)
    if not (args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))):
        # Pretrained starts are fetched (or found missing: one error line) before anything is
        # built; a resumed run reads its own checkpoint instead.
        fetch_weights(cfg, training=not args.eval_only)
    if args.eval_only:
        model = LesionTrainer.build_model(cfg)
        # Every parameter must come from the file (MODEL.ALLOW_PARTIAL_WEIGHTS says otherwise).
        checkpointer = LesionCheckpointer.for_inference(cfg, model, save_dir=cfg.OUTPUT_DIR)
        stored = checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        check_loaded_classes(cfg, checkpointer, stored)
        results = LesionTrainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
            LesionTrainer.write_reports(cfg)
        return results
    trainer = LesionTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    logging.getLogger("detectron2.engine.train_loop").addFilter(_NoTracebackForUnreadableImages())
    trainer.train()
    # DefaultTrainer.train() returns the final evaluation only with TEST.EXPECTED_RESULTS set.
    results = getattr(trainer, "_last_eval_results", None)
    if results and comm.is_main_process():
        for page in LesionTrainer.write_reports(cfg):
            print(f"\nreport: {page}")
        print(f"\nmetrics, predictions and overlay pictures: {cfg.OUTPUT_DIR}/inference/")
    return results


def check_loaded_classes(cfg, checkpointer, stored) -> None:
    """The checkpoint just loaded names the test datasets' lesion classes, in their order
    (retina_d2.modeling.model_file.check_evaluation_classes), before any inference runs.

    Args:
        stored: what ``resume_or_load`` returned: the file's entries besides the weights.
    """
    report = checkpointer.last_load_report
    # The file read: MODEL.WEIGHTS, or with --resume OUTPUT_DIR's last intact checkpoint.
    weights = report.path if report is not None else cfg.MODEL.WEIGHTS
    if not weights:
        return  # no file read (MODEL.WEIGHTS empty): nothing claims any classes
    info = read_model_info(weights, checkpoint=stored)
    check_evaluation_classes(weights, info, cfg.DATASETS.TEST)


def run_opts(args) -> list:
    """The config overrides of the command line: its KEY VALUE pairs, then what the flags set
    (a flag wins over the same key among the pairs)."""
    opts = list(args.opts)
    if args.trust_checkpoint:
        opts += ["MODEL.TRUST_CHECKPOINT", "True"]
    if args.seed is not None:
        opts += ["SEED", str(args.seed)]
    if args.deterministic:
        opts += ["RETINA.DETERMINISTIC", "True"]
    return opts


def build_parser():
    parser = default_argument_parser(epilog=__doc__)
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="read weights files (MODEL.WEIGHTS, MODEL.MULTITASK.LESION_WEIGHTS, --resume's last "
        "checkpoint) that need full unpickling, which can run any code they carry: only files "
        "you made or trust (sets MODEL.TRUST_CHECKPOINT; a warning names each such file)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        metavar="N",
        help="seed Python, NumPy and torch with N + rank, which fixes the data order, the "
        "augmentation and the initial weights (sets SEED; -1, Detectron2's default, draws a new "
        "seed every run)",
    )
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic torch algorithms and cuDNN, no cuDNN autotuning, a fixed cuBLAS "
        "workspace: what GPU runs need on top of a seed to repeat (sets RETINA.DETERMINISTIC, "
        "whose comment says what it costs and what it cannot fix; needs SEED >= 0)",
    )
    return parser


def cli(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.num_gpus <= 1 and args.num_machines == 1:
            return main(args)  # launch() would drop the results
        return launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except (FileNotFoundError, ConfigError, CheckpointError) as e:
        # Bad config files, keys, datasets or weights: one clear line, not a traceback.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except ImageReadError as e:
        # A truncated or unreadable photograph met during training or evaluation.
        print(f"error: {image_error_line(e)}", file=sys.stderr)
        sys.exit(2)


def image_error_line(error: ImageReadError) -> str:
    """The message naming the file. Raised in a loader worker, PyTorch re-raises it in this
    process with the worker's traceback as its text, whose last line is the original message."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else repr(error)
    # The traceback's last line is "<module path>.ImageReadError: <message>".
    marker = f"{type(error).__name__}: "
    return last.split(marker, 1)[1] if marker in last else last


class _NoTracebackForUnreadableImages(logging.Filter):
    """Detectron2's training loop logs every exception with its traceback before re-raising it;
    for an unreadable photograph the one line ``cli`` prints says all there is to say."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], ImageReadError))
