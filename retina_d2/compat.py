"""Bridges Detectron2 0.6 to today's NumPy, Pillow, setuptools and torch, and to a missing ``_C``;
closes its loaders that run code from a file (YAML's unsafe loader, pickle).

This is the only module that knows about those differences. It must run before anything imports
Detectron2, which ``retina_d2/__init__.py`` guarantees. Every patch is a no-op when the library
already provides the name, so an upstream Detectron2 built from source keeps working unchanged.
"""
import importlib.util
import sys
import types

import numpy as np
import PIL.Image

__all__ = ["HAS_D2_EXTENSION", "MissingExtensionError", "apply", "patch_cpu_ddp"]

# Filled by apply(): True when a compiled detectron2._C is importable.
HAS_D2_EXTENSION = False


class MissingExtensionError(RuntimeError):
    """A Detectron2 feature that exists only in its C++ extension was asked for."""


def _patch_numpy():
    # Detectron2 0.6 uses the aliases removed in NumPy 1.24 (np.bool in structures/masks.py,
    # np.int in data/build.py, np.float in sem_seg_evaluation.py, np.str in pascal_voc.py).
    for alias, builtin in (("bool", bool), ("int", int), ("float", float), ("object", object),
                           ("str", str)):
        if alias not in np.__dict__:
            setattr(np, alias, builtin)


def _patch_pillow():
    # Pillow 10 removed these constants; Detectron2 0.6 uses Image.LINEAR as a default argument,
    # i.e. at import time of detectron2.data.transforms.
    for old, new in (("LINEAR", "BILINEAR"), ("CUBIC", "BICUBIC"), ("ANTIALIAS", "LANCZOS")):
        if not hasattr(PIL.Image, old):
            setattr(PIL.Image, old, getattr(PIL.Image.Resampling, new))


def _patch_pkg_resources():
    # detectron2.model_zoo imports pkg_resources only for resource_filename(); setuptools >= 81
    # no longer ships pkg_resources.
    try:
        import pkg_resources  # noqa: F401

        return
    except ImportError:
        pass

    def resource_filename(package, resource):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"package {package!r} not found for resource {resource!r}")
        import os

        return os.path.join(list(spec.submodule_search_locations)[0], resource)

    shim = types.ModuleType("pkg_resources")
    shim.resource_filename = resource_filename
    shim.__doc__ = "retina_d2.compat stand-in providing resource_filename() only"
    sys.modules["pkg_resources"] = shim


# Which Detectron2 feature each symbol of the extension serves, for the error message.
_EXTENSION_FEATURES = {
    "box_iou_rotated": "rotated-box IoU (RRPN / rotated Fast R-CNN)",
    "nms_rotated": "rotated-box NMS",
    "roi_align_rotated_forward": "ROIAlignRotated",
    "roi_align_rotated_backward": "ROIAlignRotated",
    "deform_conv_forward": "deformable convolution (DeformConv)",
    "deform_conv_backward_input": "deformable convolution (DeformConv)",
    "deform_conv_backward_filter": "deformable convolution (DeformConv)",
    "modulated_deform_conv_forward": "modulated deformable convolution",
    "modulated_deform_conv_backward": "modulated deformable convolution",
    "InstanceAnnotation": "the fast COCO evaluator (COCOEvaluator(use_fast_impl=True))",
    "COCOevalEvaluateImages": "the fast COCO evaluator (COCOEvaluator(use_fast_impl=True))",
    "COCOevalAccumulate": "the fast COCO evaluator (COCOEvaluator(use_fast_impl=True))",
}


def _extension_stub():
    """A stand-in for ``detectron2._C`` whose every kernel raises a clear error when called."""
    stub = types.ModuleType("detectron2._C")
    stub.__file__ = __file__
    reason = "not built (Detectron2 installed from Python sources; see retina_d2/compat.py)"
    # detectron2.utils.collect_env asks these when it finds an extension.
    stub.get_compiler_version = lambda: reason
    stub.get_cuda_version = lambda: reason
    stub.has_cuda = lambda: False

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        feature = _EXTENSION_FEATURES.get(name, f"detectron2._C.{name}")

        def unavailable(*args, **kwargs):
            raise MissingExtensionError(
                f"{feature} needs Detectron2's C++ extension (detectron2._C), which this "
                "installation lacks. Mask R-CNN, RoIAlign and NMS do not need it; for this "
                "feature install Detectron2 from source (python -m pip install "
                "'git+https://github.com/facebookresearch/detectron2.git')."
            )

        return unavailable

    stub.__getattr__ = __getattr__
    return stub


def _patch_extension():
    global HAS_D2_EXTENSION
    import detectron2

    if "detectron2._C" in sys.modules:
        HAS_D2_EXTENSION = not getattr(sys.modules["detectron2._C"], "_retina_d2_stub", False)
        return
    try:
        importlib.import_module("detectron2._C")
        HAS_D2_EXTENSION = True
    except ImportError:
        stub = _extension_stub()
        stub._retina_d2_stub = True
        sys.modules["detectron2._C"] = stub
        detectron2._C = stub
        HAS_D2_EXTENSION = False
        # Rotated NMS goes through torch.ops.detectron2, which only the extension registers.
        import detectron2.layers as d2_layers
        import detectron2.layers.nms as d2_nms

        def nms_rotated(boxes, scores, iou_threshold):
            return stub.nms_rotated(boxes, scores, iou_threshold)

        d2_nms.nms_rotated = nms_rotated
        d2_layers.nms_rotated = nms_rotated


def _model_zoo_checkpoint(filename, data):
    """Detectron2 0.6's reading of an unpickled ``.pkl``: its model zoo's format as it is, else
    Caffe2 / Detectron1 blobs (momenta dropped) matched to the model by name heuristics."""
    from .safe_load import UnreadableCheckpointError

    if not isinstance(data, dict):
        raise UnreadableCheckpointError(
            f"{filename}: holds a {type(data).__name__}, not a dict of weights"
        )
    if "model" in data and "__author__" in data:
        return data
    blobs = data.get("blobs", data)  # detection models keep them under "blobs"
    if not isinstance(blobs, dict):
        raise UnreadableCheckpointError(f"{filename}: its \"blobs\" are not a dict of weights")
    blobs = {k: v for k, v in blobs.items() if not str(k).endswith("_momentum")}
    return {"model": blobs, "__author__": "Caffe2", "matching_heuristics": True}


def _patch_checkpoint_loading():
    # Detectron2 0.6 unpickles a .pkl with pickle.load and fvcore a .pth with torch.load: either
    # runs whatever code a hostile file carries. Both read through retina_d2.safe_load instead:
    # weights, NumPy arrays and containers only, unless the checkpointer's trust_checkpoint is
    # True (LesionCheckpointer with MODEL.TRUST_CHECKPOINT), which reads old full pickles with a
    # warning naming the file. (.pyth goes to torch.load, whose default is weights_only=True.)
    import fvcore.common.checkpoint as fv_checkpoint
    from detectron2.checkpoint import DetectionCheckpointer

    from .safe_load import UnreadableCheckpointError, load_checkpoint

    if getattr(fv_checkpoint.Checkpointer._load_file, "_retina_d2_patched", False):
        return

    def _load_file(self, f):
        loaded = load_checkpoint(f, trust=getattr(self, "trust_checkpoint", False))
        if not isinstance(loaded, dict):
            raise UnreadableCheckpointError(
                f"{f}: holds a {type(loaded).__name__}, not a checkpoint (a dict of weights)"
            )
        return loaded

    original_d2 = DetectionCheckpointer._load_file

    def _load_d2_file(self, filename):
        if not filename.endswith(".pkl"):
            return original_d2(self, filename)  # .pth: fvcore's, patched above
        data = load_checkpoint(filename, trust=getattr(self, "trust_checkpoint", False))
        return _model_zoo_checkpoint(filename, data)

    _load_file._retina_d2_patched = _load_d2_file._retina_d2_patched = True
    fv_checkpoint.Checkpointer._load_file = _load_file
    DetectionCheckpointer._load_file = _load_d2_file


def _patch_config_loading():
    # Detectron2 0.6's CfgNode.merge_from_file passes allow_unsafe=True, with which fvcore
    # retries a file YAML's safe loader refuses with yaml.unsafe_load: a config holding
    # !!python/object/apply:os.system [...] runs the command. Configs are data: every merge,
    # _BASE_ files included, goes through retina_d2.config.read_config_yaml (safe loader only).
    from detectron2.config import CfgNode

    from .config import read_config_yaml

    if getattr(CfgNode.load_yaml_with_base, "_retina_d2_patched", False):
        return

    def load_yaml_with_base(cls, filename, allow_unsafe=False):
        return read_config_yaml(filename)

    load_yaml_with_base._retina_d2_patched = True
    CfgNode.load_yaml_with_base = classmethod(load_yaml_with_base)


def _patch_export_package():
    # Detectron2 0.6's detectron2/export/__init__.py imports its Caffe2 exporter first, which needs
    # caffe2 (gone from torch since 1.x), so `import detectron2.export` fails before TracingAdapter
    # is reached; upstream imports the Caffe2 part only when caffe2 is present. Here the package
    # is registered without running that __init__, and its TorchScript names load on first use.
    if "detectron2.export" in sys.modules or importlib.util.find_spec("caffe2") is not None:
        return
    import detectron2

    spec = importlib.util.find_spec("detectron2.export")
    if spec is None:
        return
    package = types.ModuleType("detectron2.export")
    package.__spec__, package.__file__ = spec, spec.origin
    package.__path__ = list(spec.submodule_search_locations)
    package.__package__ = "detectron2.export"
    lazy = {"TracingAdapter": "flatten", "flatten_to_tuple": "flatten",
            "scripting_with_instances": "torchscript", "dump_torchscript_IR": "torchscript"}

    def __getattr__(name):
        if name not in lazy:
            raise AttributeError(
                f"detectron2.export.{name}: not available (Detectron2 0.6's Caffe2 exporter needs "
                "caffe2; only TracingAdapter and scripting_with_instances are provided)"
            )
        return getattr(importlib.import_module(f"detectron2.export.{lazy[name]}"), name)

    package.__getattr__ = __getattr__
    sys.modules["detectron2.export"] = package
    detectron2.export = package


def _quiet_import_warnings():
    # Detectron2 0.6 scripts a few helpers with torch.jit.script at import time; current torch
    # warns about every one, on every tool's start, about code the user does not own.
    import warnings

    warnings.filterwarnings(
        "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
    )


def patch_cpu_ddp():
    """Let Detectron2 0.6 wrap a model on the CPU in ``DistributedDataParallel``.

    Its ``create_ddp_model`` passes ``device_ids=[local rank]`` whatever the model's device, and
    torch refuses device ids for a CPU module. Here a model without CUDA parameters gets none; a
    CUDA model is wrapped exactly as before. Not part of :func:`apply` (it needs Detectron2's
    engine imported): ``retina_d2.engine.launch`` calls it in each CPU worker process.
    """
    import detectron2.engine as d2_engine
    import detectron2.engine.defaults as d2_defaults

    original = d2_defaults.create_ddp_model
    if getattr(original, "_retina_d2_patched", False):
        return

    def create_ddp_model(model, *, fp16_compression=False, **kwargs):
        if "device_ids" not in kwargs and not any(p.is_cuda for p in model.parameters()):
            kwargs["device_ids"] = None
        return original(model, fp16_compression=fp16_compression, **kwargs)

    create_ddp_model._retina_d2_patched = True
    create_ddp_model.__doc__ = original.__doc__
    # DefaultTrainer calls the name in its own module; users may call the re-exported one.
    d2_defaults.create_ddp_model = create_ddp_model
    d2_engine.create_ddp_model = create_ddp_model


_applied = False


def apply():
    """Apply every patch once. Called by ``import retina_d2``; safe to call again."""
    global _applied
    if _applied:
        return
    _quiet_import_warnings()
    _patch_numpy()
    _patch_pillow()
    _patch_pkg_resources()
    _patch_extension()
    _patch_checkpoint_loading()
    _patch_config_loading()
    _patch_export_package()
    _applied = True
