"""Pretrained starts: where a published weights file is read from, how its tensors are renamed
onto this project's trunks, and what a load actually set.

* **Where** (:func:`resolve_weights`): a local path is used as it is. A ``detectron2://`` or
  ``http(s)://`` URL is read through Detectron2's ``PathManager`` cache (``$FVCORE_CACHE``,
  default ``~/.torch/iopath_cache``, the file Detectron2's checkpointer itself reads); a
  torchvision URL (``https://download.pytorch.org/models/...``) is also found in torch hub's
  cache (``$TORCH_HOME/hub/checkpoints``), where torchvision keeps what it downloaded. A file
  not cached is downloaded there; when it cannot be (no network, or ``RETINA_D2_OFFLINE`` set)
  :class:`WeightsUnavailableError` says in one line which URL, which local file to put it in, and
  the ``MODEL.WEIGHTS`` override to give instead. Nothing ever falls back to training from
  scratch, and an unreachable host is given up on after seconds, not left to hang.
* **Renaming** (:func:`convert_published`): torchvision's published VGG16, ResNet and
  Inception-v3 state dicts onto Red-Seg's VGG16 trunk, Detectron2's ResNet and the Inception-v3
  encoder; classifiers (``fc``, ``classifier``, ``AuxLogits``) are dropped. Detectron2 model-zoo
  ``.pkl`` files need no renaming.
* **What was set** (:func:`report_load`): how many of the trunk's tensors the file set, which it
  did not, and which the file holds in another shape (heads of another class count, left at
  their fresh initialisation), as log lines and a :class:`LoadReport`.
"""
import contextlib
import logging
import os
import re
import socket
import threading
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlparse

import torch

__all__ = [
    "OFFLINE_ENV",
    "PART_KEYS",
    "LoadReport",
    "WeightsUnavailableError",
    "cache_path",
    "convert_published",
    "fetch_weights",
    "is_remote",
    "part_weights",
    "published_format",
    "remote_url",
    "report_load",
    "resolve_weights",
    "torch_hub_path",
    "torchvision_inception_v3_to_encoder",
    "torchvision_vgg16_to_trunk",
    "trunk_prefix",
]

logger = logging.getLogger(__name__)

# Set (to anything but "" or "0") to never download: a weights URL must then be in a cache.
OFFLINE_ENV = "RETINA_D2_OFFLINE"
_DETECTRON2_PREFIX = "detectron2://"
_DETECTRON2_HOST = "https://dl.fbaipublicfiles.com/detectron2/"
_TORCHVISION_MODELS = "https://download.pytorch.org/models/"
# Seconds to reach a weights host, and between two reads of a download, before giving up.
_CONNECT_TIMEOUT = 10.0
_READ_TIMEOUT = 60.0


class WeightsUnavailableError(FileNotFoundError):
    """A weights URL that is neither cached nor downloadable; the message is one line."""


def is_remote(path: str) -> bool:
    """Whether ``path`` is a URL Detectron2's PathManager downloads (``detectron2://``,
    ``http://``, ``https://``)."""
    return path.startswith((_DETECTRON2_PREFIX, "http://", "https://"))


def remote_url(path: str) -> str:
    """The http(s) URL of ``path`` (``detectron2://X`` is Detectron2's model-zoo host + X)."""
    if path.startswith(_DETECTRON2_PREFIX):
        return _DETECTRON2_HOST + path[len(_DETECTRON2_PREFIX):]
    return path


def cache_path(path: str) -> str:
    """The file Detectron2's PathManager keeps the download of ``path`` in (iopath's
    HTTPURLHandler rule: cache dir + the URL's folders + its file name)."""
    from iopath.common.file_io import get_cache_dir

    url = remote_url(path)
    folder = os.path.dirname(urlparse(url).path.lstrip("/"))
    return os.path.join(get_cache_dir(), folder, url.split("/")[-1])


def torch_hub_path(path: str) -> Optional[str]:
    """Where torchvision keeps a published weights file it downloaded (torch hub's
    ``checkpoints`` folder), or None for a URL that is not torchvision's."""
    url = remote_url(path)
    if not url.startswith(_TORCHVISION_MODELS):
        return None
    return os.path.join(torch.hub.get_dir(), "checkpoints", url.split("/")[-1])


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "") not in ("", "0")


def _first_hop(url: str) -> Tuple[str, int]:
    """(host, port) a download of ``url`` connects to: the URL's host, or the proxy urllib
    takes from the environment (``https_proxy`` ...) for it."""
    import urllib.request

    parsed = urlparse(url)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    if proxy and not urllib.request.proxy_bypass(parsed.hostname or ""):
        proxied = urlparse(proxy if "://" in proxy else "http://" + proxy)
        return proxied.hostname or "", proxied.port or 80
    return parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 80)


def _reachable(url: str, timeout: float) -> Optional[str]:
    """None when a TCP connection to the download's first hop (:func:`_first_hop`) opens within
    ``timeout`` seconds, else why not. Run in a thread: a DNS lookup ignores socket timeouts
    and can stall far longer."""
    host, port = _first_hop(url)
    outcome: List[Optional[str]] = [f"cannot reach {host}:{port}: no answer in {timeout:.0f} s"]

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome[0] = None
        except OSError as e:
            outcome[0] = f"cannot reach {host}:{port}: {type(e).__name__}: {e}"

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return outcome[0]


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _unavailable(path: str, key: str, why: str) -> WeightsUnavailableError:
    target = cache_path(path)
    name = os.path.basename(target)
    return WeightsUnavailableError(
        f"{key} {path}: not downloaded and cannot be ({why}): download {remote_url(path)} to "
        f"{target}, or give {key} /path/to/{name}"
    )


def resolve_weights(path: str, key: str = "MODEL.WEIGHTS") -> str:
    """The local file to read the weights ``path`` from, downloading a URL that is not cached.

    Args:
        path: a local path (returned unchanged, "" included) or a ``detectron2://`` /
            ``http(s)://`` URL.
        key: the config key that named ``path``, for the error message.

    Raises:
        WeightsUnavailableError: a URL that is in no cache and cannot be downloaded.
    """
    if not path or not is_remote(path):
        return path
    hub = torch_hub_path(path)
    for candidate in (cache_path(path), hub):
        if candidate and os.path.isfile(candidate):
            logger.info("%s %s: reading the cached %s", key, path, candidate)
            return candidate
    if _offline():
        raise _unavailable(path, key, f"{OFFLINE_ENV} is set")
    unreachable = _reachable(remote_url(path), _CONNECT_TIMEOUT)
    if unreachable:
        raise _unavailable(path, key, f"no network: {' '.join(unreachable.split())}")
    from detectron2.utils.file_io import PathManager

    logger.info("%s %s: downloading to %s", key, path, cache_path(path))
    try:
        with _socket_timeout(_READ_TIMEOUT):
            local = PathManager.get_local_path(path)
    except OSError as e:  # URLError, HTTPError and timeouts are OSErrors
        raise _unavailable(path, key, f"download failed: {' '.join(str(e).split())}") from None
    return local


# --- renaming published state dicts -----------------------------------------------------------

# torchvision's vgg16().features indices of the 13 convs, in order, and the trunk's names.
_VGG16_FEATURE_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_VGG16_TRUNK_CONVS = tuple(
    f"conv{stage}.conv{stage}_{k}" for stage, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
    for k in range(1, n + 1)
)
_VGG16_FEATURE = re.compile(r"^features\.(\d+)\.(weight|bias)$")


def torchvision_vgg16_to_trunk(
    state: Mapping[str, torch.Tensor], prefix: str
) -> Dict[str, torch.Tensor]:
    """torchvision ``vgg16`` (``features.N.weight``/``bias``) -> Red-Seg's VGG16 trunk
    (``conv1.conv1_1.weight`` .. ``conv5.conv5_3.bias``) under ``prefix``. The fully connected
    ``classifier`` is dropped (the trunk ends at conv5_3); a ``features`` entry that is no
    VGG16 conv is kept under its own name, so that the load reports it as unused."""
    names = dict(zip(_VGG16_FEATURE_CONVS, _VGG16_TRUNK_CONVS))
    renamed = {}
    for key, value in state.items():
        if key.startswith("classifier."):
            continue
        match = _VGG16_FEATURE.match(key)
        if match and int(match.group(1)) in names:
            renamed[f"{prefix}{names[int(match.group(1))]}.{match.group(2)}"] = value
        else:
            renamed[prefix + key] = value
    return renamed


def torchvision_inception_v3_to_encoder(
    state: Mapping[str, torch.Tensor], prefix: str
) -> Dict[str, torch.Tensor]:
    """torchvision ``inception_v3`` -> :class:`~retina_d2.modeling.inception.InceptionV3Encoder`
    under ``prefix``: the encoder keeps torchvision's module names, so only the classifier
    (``fc``), the auxiliary classifier (``AuxLogits``) and BN's ``num_batches_tracked`` go."""
    return {
        prefix + key: value
        for key, value in state.items()
        if not key.startswith(("fc.", "AuxLogits.")) and not key.endswith("num_batches_tracked")
    }


def _torchvision_resnet(state, prefix):
    from .checkpoint import torchvision_resnet_to_detectron2

    return torchvision_resnet_to_detectron2(state, prefix)


def published_format(state: Mapping[str, object]) -> Optional[str]:
    """"torchvision_resnet", "torchvision_vgg16" or "torchvision_inception_v3" when ``state``
    has that published state dict's key layout, else None (a Detectron2 checkpoint)."""
    keys = set(state)
    if "Conv2d_1a_3x3.conv.weight" in keys and "Mixed_7c.branch_pool.conv.weight" in keys:
        return "torchvision_inception_v3"
    vgg_parts = ("features.", "classifier.")
    if "features.0.weight" in keys and all(k.startswith(vgg_parts) for k in keys):
        return "torchvision_vgg16"
    if "conv1.weight" in keys and any(k.startswith("layer1.0.") for k in keys):
        return "torchvision_resnet"
    return None


_CONVERTERS = {
    "torchvision_resnet": _torchvision_resnet,
    "torchvision_vgg16": torchvision_vgg16_to_trunk,
    "torchvision_inception_v3": torchvision_inception_v3_to_encoder,
}


def convert_published(
    state: Mapping[str, torch.Tensor], prefix: str
) -> Optional[Tuple[str, Dict[str, torch.Tensor]]]:
    """(format, state renamed onto the trunk under ``prefix``) for a published torchvision
    state dict (:func:`published_format`), or None for any other checkpoint."""
    kind = published_format(state)
    if kind is None:
        return None
    return kind, _CONVERTERS[kind](state, prefix)


def trunk_prefix(model_keys: Iterable[str]) -> str:
    """The name prefix of a model's pretrained trunk: a Mask R-CNN's ResNet under its FPN
    (``backbone.bottom_up.``), else the backbone (``backbone.``); "" when it has neither."""
    keys = list(model_keys)
    for prefix in ("backbone.bottom_up.", "backbone.", "lesion_model.backbone.bottom_up.",
                   "lesion_model.backbone."):
        if any(k.startswith(prefix) for k in keys):
            return prefix
    return ""


# --- what a load set --------------------------------------------------------------------------

@dataclass
class LoadReport:
    """What one weights file set in a model.

    Attributes:
        path: the file read.
        trunk_prefix: the trunk's name prefix ("" = the whole model).
        trunk_total: the trunk's tensors (parameters and BN statistics).
        trunk_loaded: those the file set.
        trunk_missing: the trunk's tensors the file did not set, by name.
        reinitialised: model tensors the file holds in another shape (heads of another class
            count), left at their initial values.
        other_loaded: tensors set outside the trunk (FPN, RPN and heads of a zoo Mask R-CNN).
        unused: the file's tensors the model has no place for (after renaming).
    """

    path: str
    trunk_prefix: str
    trunk_total: int
    trunk_loaded: int
    trunk_missing: List[str] = field(default_factory=list)
    reinitialised: List[str] = field(default_factory=list)
    other_loaded: int = 0
    unused: List[str] = field(default_factory=list)


def _counted(key: str) -> bool:
    # BN's step counter is no weight; Detectron2's FrozenBN has none.
    return not key.endswith("num_batches_tracked")


def report_load(
    path: str,
    model_state: Mapping[str, torch.Tensor],
    file_shapes: Mapping[str, Sequence[int]],
    missing_keys: Iterable[str],
    unexpected_keys: Iterable[str] = (),
    prefix: str = "",
    skip: Sequence[str] = ("pixel_mean", "pixel_std"),
    names_match: bool = True,
) -> LoadReport:
    """Log and return what loading ``path`` set in a model.

    Args:
        path: the file.
        model_state: the model's state dict (names and shapes).
        file_shapes: the (renamed) file's tensor names and shapes.
        missing_keys: model tensors the load did not set (fvcore's, incorrect shapes included).
        unexpected_keys: file tensors the model has no place for.
        prefix: the trunk's name prefix.
        skip: model buffers set from the config, never from a file.
        names_match: the file's names are the model's (False for Caffe2 blobs, which Detectron2
            matches by heuristics): a tensor then counts as loaded only when the file holds it
            by that name and shape. fvcore's missing keys alone miss what Detectron2's FrozenBN
            fills in silently (running statistics absent from a file are set to 0 and 1).
    """
    missing = set(missing_keys)
    counted = [k for k in model_state if _counted(k) and k not in skip]
    if names_match:
        missing |= {
            k for k in counted
            if k not in file_shapes or tuple(file_shapes[k]) != tuple(model_state[k].shape)
        }
    trunk = [k for k in counted if k.startswith(prefix)]
    reshaped = sorted(
        k for k in counted
        if k in missing and k in file_shapes
        and tuple(file_shapes[k]) != tuple(model_state[k].shape)
    )
    report = LoadReport(
        path=path,
        trunk_prefix=prefix,
        trunk_total=len(trunk),
        trunk_loaded=sum(k not in missing for k in trunk),
        trunk_missing=sorted(k for k in trunk if k in missing),
        reinitialised=reshaped,
        other_loaded=sum(k not in missing for k in counted if not k.startswith(prefix)),
        unused=sorted(k for k in unexpected_keys if _counted(k)),
    )
    trunk_name = f"{prefix}*" if prefix else "model"
    logger.info(
        "%s: loaded %d of the %d %s tensors%s", path, report.trunk_loaded, report.trunk_total,
        trunk_name, f" and {report.other_loaded} others" if report.other_loaded else "",
    )
    if report.trunk_missing:
        logger.warning(
            "%s: %d %s tensors were not set from it (not in it, or in another shape): %s", path,
            len(report.trunk_missing), trunk_name, ", ".join(report.trunk_missing),
        )
    if report.reinitialised:
        logger.warning(
            "%s: re-initialised (the file's shape differs, e.g. another class count): %s",
            path, ", ".join(report.reinitialised),
        )
    if report.unused:
        logger.warning(
            "%s: %d of its tensors have no place in the model: %s", path, len(report.unused),
            ", ".join(report.unused[:10]) + (" ..." if len(report.unused) > 10 else ""),
        )
    return report


# --- the weights a config names ---------------------------------------------------------------

# The config key of each part's own start, by the part's name prefix.
PART_KEYS = {"task_backbone.": "MODEL.MULTITASK.TASK_BACKBONE_WEIGHTS"}


def part_weights(cfg) -> Dict[str, str]:
    """{name prefix: weights} of the model parts that start from weights of their own, as the
    model's class gives them (``part_weights(cfg)``: MultiTaskLesionNet's grading CNN,
    ``MODEL.MULTITASK.TASK_BACKBONE_WEIGHTS``); {} for a class without parts of its own."""
    from .outputs import meta_architecture

    parts = getattr(meta_architecture(cfg), "part_weights", None)
    return dict(parts(cfg)) if parts is not None else {}


def fetch_weights(cfg, training: bool = True) -> Dict[str, str]:
    """Resolve every weights file the config names for a run (:func:`resolve_weights`: cached,
    downloaded, or one error line), before anything is built: an unavailable start stops a run
    at once instead of after the model and data are set up.

    Args:
        cfg: the run's config.
        training: whether the run trains (the parts' starts are read only then).

    Returns:
        {config key: local file}.

    Raises:
        WeightsUnavailableError: a URL that is in no cache and cannot be downloaded.
    """
    named = [("MODEL.WEIGHTS", cfg.MODEL.WEIGHTS)]
    if training:
        named += [(PART_KEYS[prefix], path) for prefix, path in part_weights(cfg).items()]
    return {key: resolve_weights(path, key) for key, path in named if path}
