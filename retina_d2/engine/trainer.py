"""LesionTrainer: Detectron2's DefaultTrainer with retina_d2's mapper, evaluators, optimizer and
checkpointing; ``setup_cfg`` builds the config the way every tool does."""
import logging
import os
from pathlib import Path

import torch
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_setup, hooks
from detectron2.evaluation import DatasetEvaluators
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.collect_env import collect_env_info
from detectron2.utils.logger import setup_logger

from detectron2.data import DatasetCatalog, MetadataCatalog

from ..config import ConfigError, get_retina_cfg, merge_config
from ..data.mapper import LesionDatasetMapper
from ..data.register import register_all
from ..evaluation import LesionFROCEvaluator, LesionInstanceEvaluator, OverlayEvaluator
from ..evaluation.grading_eval import LesionGradingEvaluator
from ..evaluation.localization_eval import LandmarkLocalizationEvaluator
from ..evaluation.protocols import build_protocol_evaluators
from ..evaluation.semantic_eval import LesionSemanticEvaluator
from ..modeling import LesionCheckpointer
from ..modeling.inference import build_inference_model
from ..modeling.model_file import inference_config, model_info_of, opt_value
from ..modeling.outputs import (
    GRADES,
    LESION_PRESENCE,
    has_detector,
    has_localization,
    has_semantic_head,
    output_types,
    trains_lesions,
)
from ..modeling.pretrained import part_weights
from .hooks import LesionBestCheckpointer, LossSwitchHook
from .plateau import EarlyStop, PlateauHook, uses_plateau

__all__ = ["LesionTrainer", "setup_cfg"]

logger = logging.getLogger(__name__)


class LesionTrainer(DefaultTrainer):
    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=LesionDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=LesionDatasetMapper(cfg, is_train=False)
        )

    @classmethod
    def build_inference_model(cls, cfg, model):
        """The model that evaluation and prediction run (autocast, tiling, test-time
        augmentation): :func:`retina_d2.modeling.inference.build_inference_model`, which the
        predictor calls too. Add inference wrappers there, not here."""
        return build_inference_model(cfg, model)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """DefaultTrainer.test through :meth:`build_inference_model`."""
        return super().test(cfg, cls.build_inference_model(cfg, model), evaluators)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """The evaluators of what the model outputs: instance AP (and FROC with
        RETINA.EVAL.FROC_ENABLED) and overlays for a detector (LesionRCNN), semantic metrics for a semantic head (SemanticLesionNet, or LesionRCNN with
        MODEL.LESION_SEG.ENABLED); for MultiTaskLesionNet also grading / lesion classification
        and landmark distances. Lesion evaluators need a dataset with lesion classes."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluators = []
        # A dataset without lesion classes (a grading / localization set) has no lesion truth.
        lesion_truth = bool(MetadataCatalog.get(dataset_name).get("thing_classes", None))
        if has_detector(cfg) and lesion_truth:
            evaluators.append(LesionInstanceEvaluator(cfg, dataset_name, output_folder))
            if cfg.RETINA.EVAL.FROC_ENABLED:
                evaluators.append(LesionFROCEvaluator(cfg, dataset_name, output_folder))
            if cfg.RETINA.EVAL.NUM_OVERLAYS > 0:
                evaluators.append(OverlayEvaluator(cfg, dataset_name, output_folder))
        if has_semantic_head(cfg) and lesion_truth:
            evaluators.append(LesionSemanticEvaluator(cfg, dataset_name, output_folder))
        if lesion_truth:  # each paper's own protocol (RETINA.EVAL.PROTOCOLS), beside ours
            evaluators += build_protocol_evaluators(cfg, dataset_name, output_folder)
        evaluators += _task_evaluators(cfg, dataset_name, output_folder, lesion_truth)
        return DatasetEvaluators(evaluators)

    @classmethod
    def write_reports(cls, cfg):
        """The HTML report of each test set's evaluation folder (RETINA.EVAL.REPORT).

        A report that cannot be written is logged, not raised: the metrics it would show are
        already saved, and a run of hours must not end in a traceback for a picture.
        """
        if not cfg.RETINA.EVAL.REPORT or not comm.is_main_process():
            return []
        from ..report import ReportError, build_report

        pages = []
        for dataset_name in cfg.DATASETS.TEST:
            eval_dir = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
            if not os.path.isdir(eval_dir):
                continue
            try:
                pages.append(build_report(eval_dir, gallery_size=cfg.RETINA.EVAL.REPORT_GALLERY))
            except (ReportError, OSError) as e:
                logger.warning("no report for %s: %s", dataset_name, e)
        return pages

    @classmethod
    def build_optimizer(cls, cfg, model):
        if cfg.SOLVER.OPTIMIZER.upper() == "SGD":
            return super().build_optimizer(cfg, model)
        if cfg.SOLVER.OPTIMIZER.upper() != "ADAM":
            raise ValueError(f"SOLVER.OPTIMIZER must be 'SGD' or 'ADAM', got {cfg.SOLVER.OPTIMIZER!r}")
        params = get_default_optimizer_params(
            model,
            base_lr=cfg.SOLVER.BASE_LR,
            weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
            weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        )
        return maybe_add_gradient_clipping(cfg, torch.optim.Adam)(
            params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY
        )

    def training_state(self):
        """What Detectron2 0.6's DefaultTrainer leaves out of its checkpoints and ``--resume``
        must restore: the optimizer (Adam's moments, SGD's momentum) and, with AMP, the
        gradient scaler. Their state dicts hold tensors, numbers and plain containers only."""
        state = {"optimizer": self.optimizer}
        scaler = getattr(self._trainer, "grad_scaler", None)
        # A disabled scaler (no CUDA) has an empty state that it refuses to load back.
        if scaler is not None and scaler.is_enabled():
            state["grad_scaler"] = scaler
        return state

    def build_hooks(self):
        # DefaultTrainer made a DetectionCheckpointer of the model and the trainer (iteration,
        # LR scheduler); ours also reads torchvision weights, saves atomically, resumes past a
        # damaged checkpoint, and carries the optimizer.
        old = self.checkpointer
        self.checkpointer = LesionCheckpointer(
            old.model,
            old.save_dir,
            save_to_disk=old.save_to_disk,
            trust_checkpoint=self.cfg.MODEL.TRUST_CHECKPOINT,
            part_weights=part_weights(self.cfg),  # the grading CNN's own pretrained start
            # Class names, config and version in every checkpoint: the file alone can predict.
            model_info=model_info_of(self.cfg),
            **old.checkpointables,
            **self.training_state(),
        )
        hook_list = super().build_hooks()
        # Right after the LR scheduler: a switch at SOLVER.STEPS[0] lands on the LR drop's step.
        index = next(
            (i + 1 for i, h in enumerate(hook_list) if isinstance(h, hooks.LRScheduler)), 0
        )
        hook_list.insert(index, LossSwitchHook.from_config(self.cfg))
        metric = self.cfg.RETINA.EVAL.BEST_METRIC
        if metric and self.cfg.TEST.EVAL_PERIOD > 0 and comm.is_main_process():
            index = next(i for i, h in enumerate(hook_list) if isinstance(h, hooks.EvalHook))
            hook_list.insert(
                index + 1,
                LesionBestCheckpointer(self.cfg.TEST.EVAL_PERIOD, self.checkpointer, metric),
            )
        if uses_plateau(self.cfg):
            # Last: it reads this iteration's evaluation, after the best model is saved.
            hook_list.append(PlateauHook.from_config(self.cfg))
        return hook_list

    def train(self):
        """DefaultTrainer.train; an early stop (RETINA.EARLY_STOP) ends it like the last
        iteration, returning the final evaluation's results."""
        try:
            return super().train()
        except EarlyStop as stop:
            logger.info("%s", stop)
            return getattr(self, "_last_eval_results", None)


def _task_evaluators(cfg, dataset_name, output_folder, lesion_truth: bool):
    """MultiTaskLesionNet's evaluators: grades and lesion classification (image-level lesion
    presence, where the dataset has lesion truth), and landmark distances."""
    evaluators = []
    outputs = output_types(cfg)
    if GRADES in outputs or (LESION_PRESENCE in outputs and lesion_truth):
        evaluators.append(LesionGradingEvaluator(cfg, dataset_name, output_folder))
    if has_localization(cfg):
        evaluators.append(
            LandmarkLocalizationEvaluator(cfg, dataset_name, output_folder)
        )
    return evaluators


def setup_cfg(config_file: str, opts=(), args=None):
    """Config of a run: defaults + retina_d2 keys + file + command-line overrides, frozen.

    Without ``config_file`` ("" or None), the file is the config stored in the checkpoint that
    ``opts`` gives as MODEL.WEIGHTS (retina_d2/modeling/model_file.py: evaluation from the
    checkpoint alone). Falls back to the CPU when the config asks for CUDA and none is present,
    registers the converted datasets, and (with ``args``) runs Detectron2's default_setup, which
    writes the config into OUTPUT_DIR; the environment goes beside it.
    """
    cfg = get_retina_cfg()
    if not config_file:
        weights = opt_value(opts, "MODEL.WEIGHTS")
        if not weights:
            raise ConfigError(
                "no config file: pass --config-file, or MODEL.WEIGHTS <checkpoint> to use the "
                "config stored in a checkpoint that retina_d2's training wrote"
            )
        cfg, _ = inference_config(weights, None, opts)  # safe YAML, as for a file
        cfg.defrost()
        config_file = weights  # what errors below name
    elif not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file {config_file!r} not found")
    else:
        merge_config(cfg, config_file, opts)  # safe YAML only; bad file / key / value: ConfigError
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE=%s but no GPU is available: using the CPU", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    if cfg.RETINA.DETERMINISTIC and cfg.SEED < 0:
        raise ConfigError(
            f"{config_file}: RETINA.DETERMINISTIC (--deterministic) needs a seed: SEED is "
            f"{cfg.SEED}, which draws a new one every run; pass --seed N (or SEED N)"
        )
    cfg.freeze()
    register_all()
    _check_datasets(cfg, config_file)
    if args is not None:
        default_setup(cfg, args)
        # default_setup configures Detectron2's and fvcore's loggers; ours print beside them.
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="retina_d2")
        if comm.is_main_process() and cfg.OUTPUT_DIR:
            with open(os.path.join(cfg.OUTPUT_DIR, "env.txt"), "w") as f:
                f.write(collect_env_info())
        # After default_setup, which seeded Python, NumPy and torch with SEED + rank and set
        # cudnn.benchmark from CUDNN_BENCHMARK.
        if cfg.RETINA.DETERMINISTIC:
            make_deterministic()
    return cfg


def make_deterministic() -> None:
    """The switches RETINA.DETERMINISTIC stands for (retina_d2/config.py says what they cost).
    cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it makes its first handle, which is later than
    this: the model and optimizer are built after setup_cfg."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # warn_only: ops without a deterministic CUDA kernel warn (naming themselves) and run.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def _not_converted(name: str) -> str:
    """Why ``name`` is not registered when no conversion under the datasets root provides it:
    where the root is (and where that came from), what it must hold, and the converted datasets
    that are there (only retina_d2's: Detectron2 registers COCO, Cityscapes, ... by itself)."""
    from ..data.register import converted_datasets, datasets_root

    root = datasets_root().resolve()
    source = next(
        (f"${v}" for v in ("RETINA_D2_DATASETS", "DETECTRON2_DATASETS") if os.environ.get(v)),
        "the default, RETINA_D2_DATASETS being unset",
    )
    where = f"{root} ({source}{'' if root.is_dir() else ', which does not exist'})"
    dataset = name.rsplit("_", 2)[0] if name.count("_") >= 2 else name
    found = [  # registered from this root (a process may have registered others before)
        n for n in converted_datasets()
        if Path(MetadataCatalog.get(n).json_file).resolve().is_relative_to(root)
    ]
    return (
        f"dataset {name!r} is not registered: no conversion under the datasets root {where} "
        f"provides it. RETINA_D2_DATASETS must point at the folder holding the converted "
        f"datasets, each in a folder of its own with its retina_d2.json (e.g. "
        f"{root / dataset}/retina_d2.json, written by tools/convert_dataset.py ... --out "
        f"{root / dataset}); converted datasets found there: "
        f"{', '.join(found) or 'none'}"
    )


def _check_datasets(cfg, config_file):
    """Every dataset the config names is registered and has MODEL.ROI_HEADS.NUM_CLASSES classes
    (a detector's) and MODEL.SEM_SEG_HEAD.NUM_CLASSES lesions (a semantic head's)."""
    from ..data.register import explain_unregistered

    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        if name not in DatasetCatalog.list():
            why = explain_unregistered(name)  # two conversions provide it, or a corrupt manifest
            if why:
                raise ConfigError(f"{config_file}: dataset {name!r} is not registered: {why}")
            raise ConfigError(f"{config_file}: {_not_converted(name)}")
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if not classes and not trains_lesions(cfg):
            continue  # a grading / localization set for a model that trains no lesions
        detector = has_detector(cfg)
        if (
            has_semantic_head(cfg)
            and classes is not None
            and len(classes) != cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        ):
            raise ConfigError(
                f"{config_file}: MODEL.SEM_SEG_HEAD.NUM_CLASSES is "
                f"{cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES} but {name} has {len(classes)} lesions "
                f"{classes} (one semantic channel each, background not counted)"
            )
        if (
            detector
            and cfg.MODEL.MASK_ON
            and classes is not None
            and len(classes) != cfg.MODEL.ROI_HEADS.NUM_CLASSES
        ):
            raise ConfigError(
                f"{config_file}: MODEL.ROI_HEADS.NUM_CLASSES is {cfg.MODEL.ROI_HEADS.NUM_CLASSES} "
                f"but {name} has {len(classes)} categories {classes}"
            )
