"""Reading weights files without running code from them.

A ``.pth`` is read with ``torch.load(weights_only=True)``, which builds tensors and plain
containers only, with NumPy arrays, scalars and dtypes added to its allow-list (old Detectron2
checkpoints keep e.g. ``iteration`` as a NumPy integer). A ``.pkl`` (Detectron2's model zoo:
``{"model": {name: ndarray}, "__author__": ..}``, or Caffe2 blobs) is read by an unpickler that
admits NumPy arrays and ``OrderedDict`` and nothing else, where Detectron2 0.6 calls
``pickle.load``. Either kind of full pickle could run any command while it is read, so one that
needs more is refused unless the caller trusts the file (``MODEL.TRUST_CHECKPOINT``,
``--trust-checkpoint``), and then read with a warning naming it.

Every failure is a :class:`CheckpointError` naming the file, in one line.
"""
import codecs
import collections
import logging
import pickle
import re

import numpy as np

__all__ = [
    "CheckpointError",
    "IncompleteCheckpointError",
    "UnreadableCheckpointError",
    "UntrustedCheckpointError",
    "load_checkpoint",
]

logger = logging.getLogger(__name__)

try:
    from numpy._core import multiarray as _multiarray, numeric as _numeric
except ImportError:  # NumPy < 2
    from numpy.core import multiarray as _multiarray, numeric as _numeric


class CheckpointError(ValueError):
    """A weights file that cannot be used; the message names the file."""


class UnreadableCheckpointError(CheckpointError):
    """Empty, truncated, corrupt, or not a checkpoint at all (text, a folder, a bare tensor)."""


class UntrustedCheckpointError(CheckpointError):
    """Holds Python objects beyond tensors, arrays and containers; reading it could run code."""


class IncompleteCheckpointError(CheckpointError):
    """Sets fewer than all of a model's parameters where all are needed (evaluation, prediction)."""


def _numpy_globals():
    """qualified name -> object, for what pickling NumPy arrays, scalars and dtypes refers to.
    NumPy 2 moved ``numpy.core`` to ``numpy._core``; files written by NumPy 1 name the old one."""
    found = {}
    for module in ("numpy._core", "numpy.core"):
        found[f"{module}.multiarray._reconstruct"] = _multiarray._reconstruct
        found[f"{module}.multiarray.scalar"] = _multiarray.scalar
        found[f"{module}.numeric._frombuffer"] = _numeric._frombuffer  # pickle protocol 5
    found["numpy.ndarray"] = np.ndarray
    found["numpy.dtype"] = np.dtype
    # Number, bool and time dtypes; object, string and void dtypes would carry arbitrary objects.
    for name, cls in vars(getattr(np, "dtypes", object)).items():
        if name.endswith("DType") and isinstance(cls, type) and name not in (
            "ObjectDType", "StringDType", "StrDType", "BytesDType", "VoidDType"
        ):
            found[f"numpy.dtypes.{name}"] = cls
    return found


_NUMPY_GLOBALS = _numpy_globals()
# The plain unpickler's whole world: NumPy, OrderedDict, and the bytes of a protocol-2 pickle
# written by Python 3 (``_codecs.encode(text, "latin1")``).
_PICKLE_GLOBALS = dict(
    _NUMPY_GLOBALS,
    **{"collections.OrderedDict": collections.OrderedDict, "_codecs.encode": codecs.encode},
)


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds NumPy arrays and containers only."""

    def find_class(self, module, name):
        found = _PICKLE_GLOBALS.get(f"{module}.{name}")
        if found is None:
            raise _RefusedGlobal(f"{module}.{name}")
        return found


def _one_line(error: BaseException, limit: int = 200) -> str:
    text = f"{type(error).__name__}: {' '.join(str(error).split())}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_pkl(path: str, safe: bool):
    with open(path, "rb") as f:
        # Detectron2's model zoo files were pickled by Python 2: latin1 keeps their bytes.
        if safe:
            return _ArrayUnpickler(f, encoding="latin1").load()
        return pickle.load(f, encoding="latin1")


def _read_pth(path: str, safe: bool):
    import torch

    if not safe:
        return torch.load(path, map_location="cpu", weights_only=False)
    allowed = [(obj, name) for name, obj in _NUMPY_GLOBALS.items()]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def _weights_only_reason(text: str) -> str:
    """What torch's page-long weights-only refusal is about: the global it met, else its cause."""
    named = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"got <class '([\w.]+)'>", text)
    if named:
        return f"it refers to {named.group(1)}"
    text = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else ""
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    causes = [p for p in paragraphs if not p.strip().startswith("Check the documentation")]
    return " ".join(causes[0].split())[:200] if causes else "not plain weights"


def _refusal(path: str, error: BaseException):
    """The UntrustedCheckpointError for a weights-only refusal, or None for any other error."""
    if isinstance(error, _RefusedGlobal):
        detail = f"it refers to {error.args[0]}"
    elif isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error):
        detail = _weights_only_reason(str(error))
    else:
        return None
    return UntrustedCheckpointError(
        f"{path}: refused: not plain weights ({detail}); unpickling it in full could run any "
        "code. Only if you made the file or trust its source, pass --trust-checkpoint "
        "(MODEL.TRUST_CHECKPOINT True)"
    )


def load_checkpoint(path: str, trust: bool = False):
    """The object a ``.pth`` (torch.save) or ``.pkl`` (pickle) weights file holds, read safely.

    Args:
        path: the file; ``.pkl`` is read as a pickle, anything else with ``torch.load``.
        trust: read a file that needs full unpickling anyway (with a warning naming it).

    Raises:
        FileNotFoundError: no file at ``path``.
        UntrustedCheckpointError: it needs full unpickling and ``trust`` is False.
        UnreadableCheckpointError: empty, truncated, corrupt or not a weights file.
    """
    read = _read_pkl if path.endswith(".pkl") else _read_pth
    try:
        return read(path, safe=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch.load and pickle fail on a damaged file in a dozen ways
        refusal = _refusal(path, e)
        if refusal is None:
            raise _unreadable(path, e) from None
        if not trust:
            raise refusal from None
    logger.warning(
        "%s: unpickled in full (MODEL.TRUST_CHECKPOINT / --trust-checkpoint): a full pickle can "
        "run any code while it is read; use this only for files you made or trust", path,
    )
    try:
        return read(path, safe=False)
    except Exception as e:
        raise _unreadable(path, e) from None


def _unreadable(path: str, error: BaseException) -> UnreadableCheckpointError:
    if isinstance(error, IsADirectoryError):
        return UnreadableCheckpointError(f"{path}: is a folder, not a weights file")
    reason = "the file is empty or ends early" if isinstance(error, EOFError) else _one_line(error)
    return UnreadableCheckpointError(
        f"{path}: not a readable weights file (empty, truncated, or not written by torch.save or "
        f"pickle): {reason}"
    )
