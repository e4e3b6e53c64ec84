"""Self-contained model files: what a retina_d2 checkpoint carries beside its weights.

Training writes, in every checkpoint (``model_final.pth``, ``model_best.pth``, periodic saves),
under the key ``"retina_d2"``:

- ``"class_names"``: the lesion names in the order of the model's outputs (instance class k,
  semantic channel k), from the training datasets' ``thing_classes``;
- ``"lesion_ids"``: their ids in the lesion vocabulary (retina_d2/data/lesions.py), the
  ``category_id`` of COCO results;
- ``"config"``: the run's full config as YAML (``cfg.dump()``);
- ``"version"``: the toolkit's ``retina_d2.__version__``.

Strings, ints, lists and dicts only: ``torch.load(weights_only=True)`` reads them, as
retina_d2/safe_load.py reads every checkpoint. With them, prediction and evaluation need the file
alone: :func:`inference_config` rebuilds the config from it (through the safe YAML loader of
retina_d2/config.py, like any config file) and no dataset has to be converted or registered to
name the classes. A checkpoint written before they were stored still loads with its config given
explicitly; without one, :func:`inference_config` says to pass it.
"""
import logging
import os
import tempfile
from typing import List, NamedTuple, Optional, Sequence

import torch
from detectron2.data import MetadataCatalog

from ..config import ConfigError, get_retina_cfg, merge_config
from ..data.lesions import lesion
from ..safe_load import UnreadableCheckpointError, load_checkpoint

__all__ = [
    "MODEL_INFO_KEY",
    "ModelInfo",
    "check_evaluation_classes",
    "inference_config",
    "model_info_of",
    "opt_value",
    "read_model_info",
    "training_class_names",
]

logger = logging.getLogger(__name__)

# The checkpoint's key for everything this module stores (beside "model", "iteration", ...).
MODEL_INFO_KEY = "retina_d2"


class ModelInfo(NamedTuple):
    """A checkpoint's own description of its model (module docstring)."""

    class_names: List[str]
    lesion_ids: List[int]
    config: str
    version: str


def training_class_names(cfg) -> List[str]:
    """The lesion names of the model's outputs, in order: the ``thing_classes`` of the first
    training dataset that has lesion classes (a grading-only set has none), else those stored in
    ``MODEL.MULTITASK.LESION_WEIGHTS`` (a lesion branch trained elsewhere), else []."""
    for name in cfg.DATASETS.TRAIN:
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes:
            return list(classes)
    lesion_weights = cfg.MODEL.MULTITASK.LESION_WEIGHTS
    if lesion_weights and os.path.isfile(lesion_weights):
        info = read_model_info(lesion_weights, trust=cfg.MODEL.TRUST_CHECKPOINT)
        if info is not None:
            return list(info.class_names)
    return []


def model_info_of(cfg) -> dict:
    """What training stores under :data:`MODEL_INFO_KEY` for the model of ``cfg`` (plain types
    only, for ``torch.load(weights_only=True)``)."""
    from .. import __version__

    names = training_class_names(cfg)
    return {
        "class_names": names,
        "lesion_ids": [lesion(name).id for name in names],
        "config": cfg.dump(),
        "version": __version__,
    }


def _parse_info(stored, path: str) -> ModelInfo:
    """The :class:`ModelInfo` of a checkpoint's stored entry, its types checked."""
    def bad(what):
        return UnreadableCheckpointError(
            f"{path}: its {MODEL_INFO_KEY!r} entry is malformed: {what}"
        )

    if not isinstance(stored, dict):
        raise bad(f"a {type(stored).__name__}, not a dict")
    names, ids = stored.get("class_names"), stored.get("lesion_ids")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise bad("class_names is not a list of names")
    integers = isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    if not integers or len(ids) != len(names):
        raise bad("lesion_ids is not one integer per class name")
    if not isinstance(stored.get("config"), str) or not isinstance(stored.get("version"), str):
        raise bad("config or version is not a string")
    return ModelInfo(list(names), list(ids), stored["config"], stored["version"])


def read_model_info(path: str, trust: bool = False, checkpoint=None) -> Optional[ModelInfo]:
    """The model description stored in the checkpoint ``path``; None for a file without one (an
    older checkpoint, a model-zoo or torchvision file).

    Args:
        trust: read a full pickle anyway (MODEL.TRUST_CHECKPOINT), as loading the weights would.
        checkpoint: the file's contents, when already read.

    Raises:
        FileNotFoundError, CheckpointError: the file cannot be read safely (retina_d2.safe_load);
            a malformed stored entry.
    """
    if checkpoint is None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file")
        checkpoint = load_checkpoint(path, trust=trust)
    if not isinstance(checkpoint, dict) or MODEL_INFO_KEY not in checkpoint:
        return None
    return _parse_info(checkpoint[MODEL_INFO_KEY], path)


def check_evaluation_classes(weights: str, info: Optional[ModelInfo],
                             dataset_names: Sequence[str]) -> None:
    """Refuse to evaluate the checkpoint ``weights`` on a dataset whose lesion classes are not
    the model's, in the model's order. Evaluation reads the model's output k (instance class k,
    semantic channel k, lesion presence k) as the dataset's ``thing_classes[k]``: another order
    or another set would score each lesion type's predictions as another type's, silently.

    Args:
        info: the checkpoint's :class:`ModelInfo` (:func:`read_model_info`); None for a file
            saved before class names were stored: a warning says the classes go unchecked.
        dataset_names: the registered datasets to evaluate on (``DATASETS.TEST``). One without
            lesion classes (a grading or localization set) has no lesion truth to misread; a
            model storing no class names outputs no lesions. Neither is compared.

    Raises:
        ConfigError: a dataset's ``thing_classes`` differ from the checkpoint's ``class_names``,
            naming the file, the dataset and both lists.
    """
    lesion_sets = [
        (name, list(MetadataCatalog.get(name).get("thing_classes", None) or []))
        for name in dataset_names
    ]
    lesion_sets = [(name, classes) for name, classes in lesion_sets if classes]
    if not lesion_sets:
        return
    if info is None:
        logger.warning(
            "%s holds no class names (saved before retina_d2 stored them): its outputs are read "
            "as the classes of %s in that order, unchecked",
            weights, ", ".join(name for name, _ in lesion_sets),
        )
        return
    model_classes = list(info.class_names)
    if not model_classes:
        return
    for name, classes in lesion_sets:
        if classes == model_classes:
            continue
        how = "the same lesions in another order" if sorted(classes) == sorted(model_classes) \
            else "other lesion types"
        raise ConfigError(
            f"{weights}: the model's classes {model_classes} are not those of dataset {name!r}, "
            f"{classes} ({how}); evaluation reads output k as the dataset's class k, so the "
            "scores would go to the wrong lesion types. Evaluate on a dataset converted with "
            "the model's lesion types in its order (DATASETS.TEST), or train on this one's"
        )


def opt_value(opts: Sequence[str], key: str) -> Optional[str]:
    """The last value given to ``key`` in command-line ``opts`` (KEY VALUE ...), or None."""
    pairs = list(opts)
    values = [pairs[i + 1] for i in range(0, len(pairs) - 1, 2) if pairs[i] == key]
    return values[-1] if values else None


def _merge_stored_config(cfg, info: ModelInfo, path: str, opts: Sequence[str]) -> None:
    """Merge the checkpoint's stored YAML, then ``opts``, into ``cfg`` through the same safe
    path as a config file (retina_d2.config.merge_config reads files, so the YAML is written to a
    private temporary one); errors name the checkpoint, not the temporary file."""
    from .. import __version__

    with tempfile.TemporaryDirectory(prefix="retina_d2_cfg_") as folder:
        stored = os.path.join(folder, "config.yaml")
        with open(stored, "w", encoding="utf-8") as f:
            f.write(info.config)
        try:
            merge_config(cfg, stored, opts)
        except ConfigError as e:
            message = str(e).replace(stored, f"{path} (its stored config)")
            if info.version != __version__:
                message += (
                    f" (the checkpoint was saved by retina_d2 {info.version}, this is "
                    f"{__version__})"
                )
            raise ConfigError(message) from None


def inference_config(weights: str, config_file: Optional[str] = None, opts: Sequence[str] = (),
                     trust: Optional[bool] = None):
    """The frozen config to predict or evaluate with the checkpoint ``weights``, and its
    :class:`ModelInfo` (None for an older checkpoint).

    The config is ``config_file`` when one is given (an older checkpoint, or a deliberate
    change), else the one the checkpoint carries; then ``opts`` (KEY VALUE ...); MODEL.WEIGHTS is
    ``weights``. No dataset is registered or checked: nothing here needs one. A config asking
    for CUDA where there is none falls back to the CPU, as ``setup_cfg`` does.

    Args:
        trust: read a full pickle (default: ``MODEL.TRUST_CHECKPOINT True`` in ``opts``).

    Raises:
        FileNotFoundError: no file ``weights`` or ``config_file``.
        ConfigError: a checkpoint without a stored config and no ``config_file``; any config
            error, naming the file.
        CheckpointError: ``weights`` cannot be read safely.
    """
    weights = str(weights)
    cfg = get_retina_cfg()
    if config_file:  # its errors first: the file given is what the user is looking at
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"config file {config_file!r} not found")
        merge_config(cfg, config_file, opts)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{weights}: no such file (the checkpoint to run)")
    if trust is None:
        trust = str(opt_value(opts, "MODEL.TRUST_CHECKPOINT")).lower() in ("true", "1")
    info = read_model_info(weights, trust=trust)
    if not config_file:
        if info is None:
            raise ConfigError(
                f"{weights}: the checkpoint holds no config (saved before retina_d2 stored one, "
                "or not by its trainer): pass --config-file with the config it was trained with"
            )
        _merge_stored_config(cfg, info, weights, opts)
    cfg.MODEL.WEIGHTS = weights
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE=%s but no GPU is available: using the CPU", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg, info
