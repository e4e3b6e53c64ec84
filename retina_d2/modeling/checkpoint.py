"""Loading weights: Detectron2 ``.pkl`` / ``.pth`` checkpoints and torchvision's published
VGG16 / ResNet / Inception-v3 ``.pth`` state dicts, from a local path or a ``detectron2://`` /
``https://`` URL read through Detectron2's PathManager cache (retina_d2/modeling/pretrained.py:
a URL that is not cached and cannot be downloaded is one error line naming the file to fetch).

Saving is crash-safe: every checkpoint (and ``last_checkpoint``) is written to a temporary file,
fsynced and renamed into place, and ``--resume`` falls back past a damaged last checkpoint.
"""
import contextlib
import logging
import os
import re
import secrets
import zipfile
from typing import BinaryIO, Callable, List, Optional
from typing import Dict

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..safe_load import CheckpointError, IncompleteCheckpointError, UnreadableCheckpointError
from .pretrained import (
    PART_KEYS,
    convert_published,
    report_load,
    resolve_weights,
    trunk_prefix,
)

__all__ = [
    "LesionCheckpointer",
    "NoIntactCheckpointError",
    "checkpoint_damage",
    "remove_partial_saves",
    "torchvision_resnet_to_detectron2",
]

logger = logging.getLogger(__name__)

_TV_LAYER = re.compile(r"^layer(\d)\.(\d+)\.(conv\d|bn\d|downsample\.0|downsample\.1)\.(.+)$")


def torchvision_resnet_to_detectron2(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """Rename a torchvision ResNet state dict to Detectron2's ResNet names under ``prefix``.

    ``layer1`` is Detectron2's ``res2``, ``bnK`` the norm of ``convK``, ``downsample`` the
    ``shortcut``; the classifier (``fc``) and BN's ``num_batches_tracked`` are dropped.
    """
    renamed = {}
    for key, value in state.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        if key == "conv1.weight":
            new = "stem.conv1.weight"
        elif key.startswith("bn1."):
            new = "stem.conv1.norm." + key[len("bn1."):]
        else:
            m = _TV_LAYER.match(key)
            if m is None:
                logger.warning("torchvision weight %s has no Detectron2 counterpart; skipped", key)
                continue
            stage, block, part, param = m.groups()
            part = {
                "downsample.0": "shortcut",
                "downsample.1": "shortcut.norm",
            }.get(part, part if part.startswith("conv") else f"conv{part[2:]}.norm")
            new = f"res{int(stage) + 1}.{block}.{part}.{param}"
        renamed[prefix + new] = value
    return renamed


# An unfinished save's temporary file: ".<final name>.<8 hex digits>.retina_d2-partial" beside the
# final file. Only names of exactly this form are ever cleaned up: nothing the toolkit did not
# write is deleted.
_PARTIAL_SUFFIX = ".retina_d2-partial"
_PARTIAL_NAME = re.compile(r"^\..+\.[0-9a-f]{8}" + re.escape(_PARTIAL_SUFFIX) + "$")
# The checkpoints a trainer writes (model_0000999.pth, model_final.pth, model_best.pth): where a
# damaged resume point falls back to.
_SAVED_NAME = re.compile(r"^model_.*\.pth$")


class NoIntactCheckpointError(CheckpointError):
    """``--resume`` found ``last_checkpoint`` but no intact checkpoint to resume from (a
    CheckpointError: the tools print its message as one ``error:`` line)."""


def _fsync_folder(folder: str) -> None:
    """Make a rename inside ``folder`` durable (a power cut after it cannot undo it)."""
    fd = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: str, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through a temporary file beside it, flushed and fsynced before it is renamed
    over ``path``: a crash at any moment leaves the old file or the complete new one under that
    name, never a partial one. The file is created 0666 less the umask, as ``open`` would."""
    folder, name = os.path.split(path)
    partial = os.path.join(folder, f".{name}.{secrets.token_hex(4)}{_PARTIAL_SUFFIX}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise
    _fsync_folder(folder)


def remove_partial_saves(folder: str) -> List[str]:
    """Delete the temporary files that interrupted saves (a kill during ``torch.save``) left in
    ``folder``; only names of the toolkit's own temporary pattern are touched.

    Returns:
        the paths removed.
    """
    removed = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if _PARTIAL_NAME.match(name) and os.path.isfile(path) and not os.path.islink(path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
    if removed:
        logger.info("Removed %d unfinished checkpoint save(s): %s", len(removed), removed)
    return removed


def checkpoint_damage(path: str) -> Optional[str]:
    """Why the checkpoint ``path`` cannot be resumed from, or None when it is a complete file.

    ``torch.save`` writes a zip archive whose directory sits at its very end and whose members
    carry CRC-32s: a truncated file (a kill during a save in place) has no directory, and a
    corrupted one fails a CRC (``torch.load`` itself does not check them).
    """
    if not os.path.isfile(path):
        return "no such file"
    if os.path.getsize(path) == 0:
        return "empty file"
    if not zipfile.is_zipfile(path):
        return "not a complete torch.save archive (truncated?)"
    try:
        with zipfile.ZipFile(path) as archive:
            corrupt = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"unreadable archive ({e})"
    return f"{corrupt} fails its CRC check" if corrupt else None


class LesionCheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` that also reads torchvision's published weights, reports
    what each load set (``last_load_report``) and names a missing weights file clearly; it saves
    atomically and resumes past a damaged last checkpoint (see :meth:`save` and
    :meth:`resume_or_load`).

    Loading never runs code from the file (retina_d2/safe_load.py, installed by retina_d2.compat):
    tensors, NumPy arrays and containers only, unless ``trust_checkpoint``. With
    ``require_all_weights`` (evaluation, prediction) a file that sets fewer than all of the
    model's parameters is refused rather than leaving some at their random initial values.
    """

    def __init__(self, model, save_dir="", *, trust_checkpoint: bool = False,
                 require_all_weights: bool = False,
                 part_weights: Optional[Dict[str, str]] = None,
                 model_info: Optional[dict] = None, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        # Saved in every checkpoint under "retina_d2" (class names, config, version: plain types,
        # see retina_d2/modeling/model_file.py), so the file alone can predict.
        self.model_info = dict(model_info or {})
        # {name prefix: weights path or URL} read into those parts on a fresh start, before the
        # whole-model weights (retina_d2.modeling.pretrained: the grading CNN's ImageNet start).
        self.part_weights = dict(part_weights or {})
        self._target_prefix = ""  # the part a load_part is filling
        self._file_shapes = {}
        self._names_match = True
        self.last_load_report = None  # pretrained.LoadReport of the last load
        # Read by retina_d2.compat's _load_file: unpickle old full pickles (MODEL.TRUST_CHECKPOINT).
        self.trust_checkpoint = trust_checkpoint
        self.require_all_weights = require_all_weights
        self._incompatible = None

    @classmethod
    def for_inference(cls, cfg, model, save_dir: str = ""):
        """The checkpointer of evaluation and prediction: trusts full pickles with
        MODEL.TRUST_CHECKPOINT and needs every parameter unless MODEL.ALLOW_PARTIAL_WEIGHTS."""
        return cls(
            model, save_dir, trust_checkpoint=cfg.MODEL.TRUST_CHECKPOINT,
            require_all_weights=not cfg.MODEL.ALLOW_PARTIAL_WEIGHTS,
        )

    def save(self, name: str, **kwargs) -> None:
        """Write the model, its ``model_info`` (under "retina_d2"), the checkpointables and
        ``kwargs`` to ``<save_dir>/<name>.pth`` atomically, then point ``last_checkpoint`` at
        it. Temporary files of earlier interrupted saves are removed first."""
        if not self.save_dir or not self.save_to_disk:
            return
        basename = f"{name}.pth"
        if os.path.basename(basename) != basename or basename.startswith("."):
            raise ValueError(f"checkpoint name {name!r} must be a plain file name")
        data = {"model": self.model.state_dict()}
        if self.model_info:
            data["retina_d2"] = self.model_info  # model_file.MODEL_INFO_KEY
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        os.makedirs(self.save_dir, exist_ok=True)
        remove_partial_saves(self.save_dir)
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)
        _write_atomically(path, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Point ``last_checkpoint`` at a complete file, atomically (called after its save)."""
        _write_atomically(
            os.path.join(self.save_dir, "last_checkpoint"),
            lambda f: f.write(last_filename_basename.encode("utf-8")),
        )

    def get_checkpoint_file(self) -> str:
        """The file ``last_checkpoint`` names inside ``save_dir``; "" when it is missing or names
        anything but a plain file name there (a path elsewhere is never followed)."""
        try:
            with open(os.path.join(self.save_dir, "last_checkpoint")) as f:
                name = f.read().strip()
        except (OSError, UnicodeDecodeError):
            return ""
        if not name or os.path.basename(name) != name or name in (".", ".."):
            logger.warning(
                "%s names %r, not a file in %s; ignored",
                os.path.join(self.save_dir, "last_checkpoint"), name, self.save_dir,
            )
            return ""
        return os.path.join(self.save_dir, name)

    def resume_or_load(self, path: str, *, resume: bool = True):
        """Detectron2's resume_or_load, resuming from the newest intact checkpoint: when the one
        ``last_checkpoint`` names is damaged (truncated, corrupt, missing), a warning names it and
        the most recently written other ``model_*.pth`` in ``save_dir`` that is intact is used.

        Raises:
            NoIntactCheckpointError: ``last_checkpoint`` exists but no checkpoint is intact.
        """
        if resume and self.has_checkpoint():
            return self.load(self._resume_point())
        for prefix, part_path in self.part_weights.items():
            if part_path:
                self.load_part(part_path, prefix)
        return self.load(path, checkpointables=[])

    def load_part(self, path: str, prefix: str):
        """Load ``path`` into the model's tensors under ``prefix`` only: a published
        torchvision file renamed onto that part, or the part's own state dict.

        Raises:
            UnreadableCheckpointError: none of the file's tensors fits the part.
        """
        path = resolve_weights(path, PART_KEYS.get(prefix, f"the weights of {prefix}*"))
        self._target_prefix = prefix
        try:
            loaded = self.load(path, checkpointables=[])
        finally:
            self._target_prefix = ""
        if self.last_load_report is not None and self.last_load_report.trunk_loaded == 0:
            raise UnreadableCheckpointError(
                f"{path}: none of its tensors fits the model's {prefix}* (another network?)"
            )
        return loaded

    def _resume_point(self) -> str:
        named = self.get_checkpoint_file()
        for candidate in ([named] if named else []) + self._earlier_checkpoints(named):
            damage = checkpoint_damage(candidate)
            if damage is None:
                if candidate != named:
                    logger.warning(
                        "Resuming from %s instead of the damaged last checkpoint %s",
                        candidate, named or os.path.join(self.save_dir, "last_checkpoint"),
                    )
                return candidate
            logger.warning("Checkpoint %s is damaged (%s); not resuming from it", candidate, damage)
        raise NoIntactCheckpointError(
            f"{os.path.join(self.save_dir, 'last_checkpoint')}: no intact checkpoint to resume "
            f"from in {self.save_dir} (see the warnings above); start without --resume or into "
            "another OUTPUT_DIR"
        )

    def _earlier_checkpoints(self, named: str) -> List[str]:
        """The trainer's other checkpoints in ``save_dir``, most recently written first."""
        paths = [
            os.path.join(self.save_dir, name)
            for name in os.listdir(self.save_dir)
            if _SAVED_NAME.match(name) and os.path.join(self.save_dir, name) != named
        ]
        files = [p for p in paths if os.path.isfile(p)]
        return sorted(files, key=lambda p: os.stat(p).st_mtime_ns, reverse=True)

    def load(self, path, *args, **kwargs):
        # A URL is read from Detectron2's PathManager cache (downloaded when there is a network),
        # else fails at once naming the file to fetch (retina_d2.modeling.pretrained).
        path = resolve_weights(path)
        if path and not os.path.isfile(path):
            raise FileNotFoundError(
                f"MODEL.WEIGHTS = {path!r}: no such file. Give a local Detectron2 .pkl/.pth "
                "checkpoint, a torchvision VGG16 / ResNet / Inception-v3 .pth, or a "
                "detectron2:// or https:// URL; leave MODEL.WEIGHTS empty to train from scratch."
            )
        self._incompatible = None
        self.last_load_report = None
        loaded = super().load(path, *args, **kwargs)
        if path and self._incompatible is not None:
            self.last_load_report = report_load(
                path, self.model.state_dict(), self._file_shapes,
                self._incompatible.missing_keys, self._incompatible.unexpected_keys,
                prefix=self._target_prefix or trunk_prefix(self.model.state_dict()),
                names_match=self._names_match,
            )
        if path and self.require_all_weights:
            self._check_all_weights_set(path)
        return loaded

    def _load_model(self, checkpoint):
        # The file's shapes, for the load report's re-initialised heads.
        self._file_shapes = {k: tuple(v.shape) for k, v in checkpoint.get("model", {}).items()}
        self._names_match = checkpoint.get("__author__") != "Caffe2"  # else matched heuristically
        # Kept for _check_all_weights_set: fvcore only logs what did not load.
        self._incompatible = super()._load_model(checkpoint)
        return self._incompatible

    def _check_all_weights_set(self, path: str) -> None:
        """Raise IncompleteCheckpointError when the last load left any parameter unset."""
        if self._incompatible is None:
            return
        parameters = [name for name, _ in self.model.named_parameters()]
        unset = set(self._incompatible.missing_keys) & set(parameters)
        if not unset:
            return
        reshaped = [
            (k, tuple(a), tuple(b)) for k, a, b in self._incompatible.incorrect_shapes if k in unset
        ]
        absent = sorted(unset - {k for k, _, _ in reshaped})
        parts = []
        if reshaped:
            key, in_file, in_model = reshaped[0]
            parts.append(
                f"{len(reshaped)} differ in shape (e.g. {key}: {in_file} in the file, {in_model} "
                "in the model: another class count?)"
            )
        if absent:
            parts.append(f"{len(absent)} are not in it (e.g. {', '.join(absent[:3])})")
        raise IncompleteCheckpointError(
            f"{path}: sets {len(parameters) - len(unset)} of the model's {len(parameters)} "
            f"parameters; {' and '.join(parts)}. The model would predict with those left at "
            "random initial values; set MODEL.ALLOW_PARTIAL_WEIGHTS True if that is intended"
        )

    def _load_file(self, filename):
        loaded = super()._load_file(filename)
        model_state = loaded.get("model", loaded)
        if not isinstance(model_state, dict) or not all(
            isinstance(v, (torch.Tensor, np.ndarray)) for v in model_state.values()
        ):
            raise UnreadableCheckpointError(
                f"{filename}: its \"model\" is not a dict of tensors or arrays (not a checkpoint)"
            )
        prefix = self._target_prefix or trunk_prefix(self.model.state_dict())
        converted = convert_published(model_state, prefix) if filename.endswith(".pth") else None
        if converted is not None:
            kind, state = converted
            logger.info("Reading %s as %s weights for %s*", filename, kind, prefix)
            return {"model": state, "__author__": "torchvision"}
        if self._target_prefix:  # a part's own state dict
            return {"model": {prefix + k: v for k, v in model_state.items()}}
        return loaded
