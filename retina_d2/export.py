"""Export a trained model for deployment: TorchScript or ONNX, checked against the eager model.

What is exported is the network, from the test-time mapper's image to its raw outputs in that
image's frame, traced through Detectron2's :class:`~detectron2.export.TracingAdapter` (as
Detectron2's ``tools/deploy/export_model.py`` traces a Mask R-CNN with ``do_postprocess=False``):

* LesionRCNN: ``boxes`` (N, 4) XYXY in input pixels, ``scores`` (N,), ``classes`` (N,) and, with
  masks, ``mask_probs`` (N, 1, M, M) per-box mask probabilities; with MODEL.LESION_SEG also
  ``sem_seg_logits`` (1, C, H', W') at the padded input's size;
* SemanticLesionNet: ``sem_seg_logits`` (1, C, H', W') (C + 1 channels, background first, for a
  softmax head).

The input ``image`` is float32 (3, H, W) in INPUT.FORMAT's channel order, after the mapper's
test-time preprocessing (field-of-view crop, resize, Graham / CLAHE); H and W may vary. What stays
in Python is what the eager model does around the network, by the same functions:
:class:`ExportedLesionModel` runs the mapper of the exported ``config.yaml``, then pastes masks into
the photograph's frame (:func:`~retina_d2.modeling.meta_arch.lesion_rcnn.detections_in_frame`:
rescale, field-of-view offset), merges touching lesions (MODEL.LESION_MERGE, the inference
pipeline's :class:`~retina_d2.modeling.inference.LesionMerging`) and turns semantic logits into
probabilities in the photograph's frame (:func:`semantic_outputs`). The eager model it is checked
against runs through :func:`~retina_d2.modeling.inference.build_inference_model`, as evaluation
and prediction do.

What is exportable is asked of the model's class (:mod:`retina_d2.modeling.outputs`): a model
that follows the lesion-model contract (:mod:`retina_d2.modeling.meta_arch.contract`, whose
``forward_features`` is the traced network) and returns only instances and lesion maps.

Refused with one line naming the key: MultiTaskLesionNet (its grading and landmark outputs are
decoded into per-task Python dicts), RETINA.TILE.ENABLED (tiling is a Python loop of whole-model
calls with seam merging), RETINA.INFERENCE.AMP and TEST.AUG.ENABLED (export the float32,
un-augmented model).

Every export is checked before anything is written: the exported network, loaded back, must give
the eager model's outputs on each sample image within :data:`TOLERANCE` (boxes within 1e-2 px,
scores within 1e-4, each instance's mask IoU >= 0.99, semantic probabilities within 1e-3), else
nothing is written. TorchScript reproduces the eager outputs exactly on the CPU; ONNX (opset
:data:`ONNX_OPSET`, run by onnxruntime) within that tolerance.
"""
import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.structures import Boxes, Instances

from .config import ConfigError, get_retina_cfg, merge_config
from .data.converters.base import atomic_write
from .safe_load import CheckpointError

__all__ = [
    "EXPORT_FORMATS",
    "ExportError",
    "ExportedLesionModel",
    "ONNX_OPSET",
    "TOLERANCE",
    "Tolerance",
    "check_exportable",
    "compare_outputs",
    "export_model",
    "exportable_architectures",
    "load_eager_model",
    "main",
]

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("torchscript", "onnx")
MODEL_FILES = {"torchscript": "model.ts", "onnx": "model.onnx"}
MANIFEST = "export.json"
CONFIG_FILE = "config.yaml"
# The manifest's marker: a folder whose export.json carries it was written by this module.
MANIFEST_MARKER = "retina_d2_export"
# RoIAlign with half-pixel coordinates (Detectron2's aligned=True) needs opset 16.
ONNX_OPSET = 17
# The outputs an exported network carries (what Python code outside the graph can decode).
_EXPORTED_OUTPUT_TYPES = ("instances", "sem_seg")
# The checkpoint key under which training stores class names and config (modeling/model_file.py).
_MODEL_INFO_KEY = "retina_d2"


class ExportError(ValueError):
    """A model or folder that cannot be exported or loaded (one line, for ``error:``)."""


@dataclass(frozen=True)
class Tolerance:
    """How far an exported model's outputs may be from the eager model's on the same image."""

    # Per box coordinate, in the photograph's pixels. float32 resolves 2.4e-4 px at 2000 px and
    # ONNX reorders float sums: its boxes were measured 8.5e-4 px off at HEI-MED's native 2194 px
    # (tools/benchmark.py export), so 1e-3 would fail exports that are right.
    box_px: float = 1e-2
    score: float = 1e-4
    mask_iou: float = 0.99  # per instance, full-resolution masks
    # Per pixel of the semantic maps: ONNX's were 2.4e-4 off at a 1400 px field of view.
    probability: float = 1e-3


TOLERANCE = Tolerance()


def export_config(config_file: str, opts: Sequence[str] = ()):
    """The frozen config of an export: the file and overrides, on the CPU. No dataset needs to be
    registered (the model is built, not trained or evaluated)."""
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"--config-file {config_file}: no such file")
    cfg = get_retina_cfg()
    merge_config(cfg, config_file, list(opts))
    cfg.MODEL.DEVICE = "cpu"  # traced on the CPU; the exported file runs on the CPU
    cfg.freeze()
    return cfg


def check_exportable(cfg) -> None:
    """Raise ExportError naming the reason when the config's model cannot be exported as-is."""
    from .modeling.meta_arch.contract import is_lesion_branch
    from .modeling.outputs import meta_architecture, output_types

    arch = cfg.MODEL.META_ARCHITECTURE
    try:
        cls = meta_architecture(cfg)
    except ConfigError as e:
        raise ExportError(str(e)) from None
    decoded = sorted(output_types(cfg) - set(_EXPORTED_OUTPUT_TYPES))
    if decoded:
        raise ExportError(
            f"MODEL.META_ARCHITECTURE {arch}: not exported (its outputs {decoded} are decoded "
            "into per-task Python dicts); export its lesion branch's own config and weights"
        )
    if not is_lesion_branch(cls):
        raise ExportError(
            f"MODEL.META_ARCHITECTURE {arch}: not exported; exportable: "
            f"{', '.join(exportable_architectures())}"
        )
    refused = {
        "RETINA.TILE.ENABLED": (cfg.RETINA.TILE.ENABLED, "tiled inference is a Python loop of "
                                "whole-model calls with seam merging, not one graph"),
        "RETINA.INFERENCE.AMP": (cfg.RETINA.INFERENCE.AMP, "the exported model is float32"),
        "TEST.AUG.ENABLED": (cfg.TEST.AUG.ENABLED, "test-time augmentation runs the model on "
                             "several views in Python"),
    }
    for key, (enabled, why) in refused.items():
        if enabled:
            raise ExportError(f"{key} True: not exported ({why}); export with {key} False")


def load_eager_model(cfg, weights: str):
    """The config's model in eval mode with ``weights`` loaded through the safe checkpointer
    (every parameter must be set, unless MODEL.ALLOW_PARTIAL_WEIGHTS).

    Returns:
        (model, class_names or None): the names the checkpoint carries, if it does.
    """
    from detectron2.modeling import build_model

    from .modeling import LesionCheckpointer

    if not os.path.isfile(weights):
        raise FileNotFoundError(f"--weights {weights}: no such file")
    model = build_model(cfg).eval()
    extra = LesionCheckpointer.for_inference(cfg, model).load(weights, checkpointables=[])
    info = (extra or {}).get(_MODEL_INFO_KEY)
    names = info.get("class_names") if isinstance(info, dict) else None
    return model, (list(names) if names else None)


def exportable_architectures() -> List[str]:
    """The registered meta-architectures that can be exported: those that follow the lesion-model
    contract, whose raw outputs are instances and lesion maps."""
    from .modeling.meta_arch.contract import lesion_branch_choices

    return lesion_branch_choices()


# --- the traced network ---------------------------------------------------------------------


def output_names(cfg) -> List[str]:
    """The exported network's outputs, in order (module docstring), from what the model of
    ``cfg`` returns."""
    from .modeling.outputs import INSTANCES, SEM_SEG, output_types

    types = output_types(cfg)
    names = []
    if INSTANCES in types:
        names += ["boxes", "scores", "classes"] + (["mask_probs"] if cfg.MODEL.MASK_ON else [])
    if SEM_SEG in types:
        names.append("sem_seg_logits")
    return names


def _network_outputs(model, batched_inputs) -> Tuple[torch.Tensor, ...]:
    """The model's inference up to (not including) its postprocessing, as a tuple of tensors in
    :func:`output_names` order: the function TracingAdapter traces. The network is the model's
    ``forward_features`` (the lesion-model contract) after its backbone."""
    images = model.preprocess_image(batched_inputs)
    features = model.backbone(images.tensor)
    raw, _ = model.forward_features(
        batched_inputs, images, features, with_losses=False, with_predictions=True
    )
    outputs = []
    if "instances" in raw:
        instances = raw["instances"][0]
        outputs += [instances.pred_boxes.tensor, instances.scores, instances.pred_classes]
        if instances.has("pred_masks"):
            outputs.append(instances.pred_masks)
    if "sem_seg" in raw:
        outputs.append(raw["sem_seg"])
    return tuple(outputs)


def _adapter(model, image: torch.Tensor):
    from detectron2.export import TracingAdapter  # retina_d2.compat makes it importable

    # eval(): torch.onnx.export leaves the module it exports in its own training mode.
    return TracingAdapter(model, [{"image": image}], _network_outputs).eval()


@contextlib.contextmanager
def _quiet_tracer():
    # The tracer warns at every Python branch on a tensor's size (Detectron2 has many); whether
    # the graph holds for other sizes is checked by running it on the sample images instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        # torch 2.9+ marks torch.jit deprecated in favour of torch.export, whose graphs Detectron2
        # 0.6's data-dependent detection code does not yet go through; it still works.
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _torchscript_bytes(model, image: torch.Tensor) -> bytes:
    adapter = _adapter(model, image)
    buffer = io.BytesIO()
    with _quiet_tracer():
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


def onnx_missing() -> Optional[str]:
    """None when ONNX export and its check can run, else which packages are missing."""
    import importlib.util

    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (
        f"--format onnx needs the Python package(s) {' and '.join(missing)} (torch.onnx writes "
        "through onnx; onnxruntime checks the file against the eager model): pip install "
        f"{' '.join(missing)} (both are in requirements.lock)"
    )


def _onnx_bytes(model, image: torch.Tensor, names: Sequence[str]) -> bytes:
    missing = onnx_missing()
    if missing:
        raise ExportError(missing)
    adapter = _adapter(model, image)
    buffer = io.BytesIO()
    with _quiet_tracer():
        try:
            torch.onnx.export(
                adapter, adapter.flattened_inputs, buffer, dynamo=False,
                opset_version=ONNX_OPSET, input_names=["image"], output_names=list(names),
                dynamic_axes={"image": {1: "height", 2: "width"}},
            )
        except Exception as e:  # torch.onnx raises many types; the message names the op
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(
                f"ONNX export (opset {ONNX_OPSET}) failed: {first_line}; use --format torchscript"
            ) from e
    return buffer.getvalue()


class _TorchScriptNetwork:
    def __init__(self, data: bytes):
        with _quiet_tracer():
            self.module = torch.jit.load(io.BytesIO(data), map_location="cpu")

    def __call__(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return tuple(self.module(image))


class _OnnxNetwork:
    def __init__(self, data: bytes):
        missing = onnx_missing()
        if missing:
            raise ExportError(missing)
        import onnxruntime

        self.session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])

    def __call__(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        outputs = self.session.run(None, {"image": image.numpy()})
        return tuple(torch.from_numpy(np.asarray(o)) for o in outputs)


_NETWORKS = {"torchscript": _TorchScriptNetwork, "onnx": _OnnxNetwork}


# --- postprocessing: the eager model's own functions ------------------------------------------


def postprocess(cfg, raw: Sequence[torch.Tensor], inputs: dict) -> dict:
    """The exported network's raw outputs for the mapped ``inputs`` -> what the eager model
    returns for them: "instances" in the photograph's frame and / or "sem_seg" probabilities."""
    from .modeling.inference import build_lesion_merging
    from .modeling.meta_arch.lesion_rcnn import detections_in_frame
    from .modeling.meta_arch.semantic_net import semantic_outputs

    named = dict(zip(output_names(cfg), raw))
    image_size = tuple(inputs["image"].shape[-2:])
    output = {}
    if "boxes" in named:
        instances = Instances(image_size)
        instances.pred_boxes = Boxes(named["boxes"])
        instances.scores = named["scores"]
        instances.pred_classes = named["classes"]
        if "mask_probs" in named:
            instances.pred_masks = named["mask_probs"]
        output = detections_in_frame([instances], [inputs], [image_size])[0]
        merging = build_lesion_merging(cfg, None)  # the inference pipeline's last step
        if merging is not None:
            output = merging.merge_outputs([output])[0]
    if "sem_seg_logits" in named:
        output["sem_seg"] = semantic_outputs(
            named["sem_seg_logits"], [inputs], [image_size], cfg.MODEL.LESION_SEG.ACTIVATION
        )[0]
    return output


def _mapper(cfg):
    from .data.mapper import LesionDatasetMapper

    return LesionDatasetMapper(cfg, is_train=False)


class ExportedLesionModel:
    """An export folder as a predictor: the exported network between the eager model's test-time
    preprocessing and postprocessing (module docstring), returning what the eager model returns.

    Example::

        model = ExportedLesionModel("export/")
        outputs = model("photo.jpg")  # {"instances": ..., "sem_seg": ...} as the eager model's

    A TorchScript file is a program (``torch.jit.load`` runs its graph): load only exports you
    made or trust. An ONNX file is run by onnxruntime.
    """

    def __init__(self, folder):
        folder = Path(folder)
        self.manifest = read_manifest(folder)
        config = folder / CONFIG_FILE
        self.cfg = export_config(str(config))
        path = folder / self.manifest["model_file"]
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ExportError(f"{path}: cannot be read ({e.strerror or e})") from e
        if hashlib.sha256(data).hexdigest() != self.manifest["model_sha256"]:
            raise ExportError(
                f"{path}: does not match the sha256 in {folder / MANIFEST} (an interrupted or "
                "altered export); export again"
            )
        self.format = self.manifest["format"]
        self.network = _NETWORKS[self.format](data)
        self.mapper = _mapper(self.cfg)
        self.class_names = self.manifest.get("class_names")

    def predict_mapped(self, inputs: dict) -> dict:
        """Outputs for a mapper's dict (its "image" and the "height" / "width" / "fov_box" it
        recorded), in the photograph's frame."""
        raw = self.network(inputs["image"].float())
        return postprocess(self.cfg, raw, inputs)

    def __call__(self, file_name) -> dict:
        """Predict on an image file: the eager model's outputs (module docstring)."""
        return self.predict_mapped(self.mapper({"file_name": str(file_name)}))


def read_manifest(folder: Path) -> dict:
    """The export.json of ``folder``; ExportError when it is missing or not an export's."""
    path = Path(folder) / MANIFEST
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ExportError(f"{path}: no such file (not an export folder)") from None
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: unreadable ({e})") from e
    if not isinstance(manifest, dict) or manifest.get(MANIFEST_MARKER) != 1:
        raise ExportError(f"{path}: not written by retina_d2's export")
    if manifest.get("format") not in EXPORT_FORMATS:
        raise ExportError(f"{path}: unknown format {manifest.get('format')!r}")
    return manifest


# --- the check against the eager model --------------------------------------------------------


def _mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row IoU of two (N, ...) boolean mask stacks; two empty masks agree (IoU 1)."""
    a, b = a.flatten(1).bool(), b.flatten(1).bool()
    inter = (a & b).sum(1).double()
    union = (a | b).sum(1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def _pair_instances(eager: Instances, exported: Instances) -> torch.Tensor:
    """For each eager instance, the index of the exported one of its class whose box is nearest
    (largest coordinate difference), each used once; -1 where none is left. The two lists
    normally come in the same order, but a tie in score may sort differently in ONNX."""
    match = torch.full((len(eager),), -1, dtype=torch.long)
    if len(eager) == 0 or len(exported) == 0:
        return match
    cost = (eager.pred_boxes.tensor[:, None, :] - exported.pred_boxes.tensor[None, :, :]).abs()
    cost = cost.amax(dim=2)
    cost[eager.pred_classes[:, None] != exported.pred_classes[None, :]] = float("inf")
    for i in range(len(eager)):
        j = int(cost[i].argmin())
        if torch.isfinite(cost[i, j]):
            match[i] = j
            cost[:, j] = float("inf")
    return match


def compare_outputs(eager: dict, exported: dict, tolerance: Tolerance = TOLERANCE) -> dict:
    """How far ``exported`` is from ``eager`` (two output dicts of one image).

    Returns:
        dict with "instances" (eager count), "exported_instances", "max_box_diff_px",
        "max_score_diff", "min_mask_iou", "max_probability_diff" (those that apply) and
        "problems": a list of sentences, empty when every difference is within ``tolerance``.
    """
    result, problems = {}, []
    if "instances" in eager:
        a, b = eager["instances"].to("cpu"), exported["instances"].to("cpu")
        result.update(instances=len(a), exported_instances=len(b))
        if len(a) != len(b):
            problems.append(f"{len(b)} instances instead of the eager model's {len(a)}")
        match = _pair_instances(a, b)
        if (match < 0).any():
            problems.append(f"{int((match < 0).sum())} eager instances have no exported match")
        paired = match >= 0
        a, b = a[paired], b[match[paired]]
        box = (a.pred_boxes.tensor - b.pred_boxes.tensor).abs().max().item() if len(a) else 0.0
        score = (a.scores - b.scores).abs().max().item() if len(a) else 0.0
        result.update(max_box_diff_px=box, max_score_diff=score)
        if box > tolerance.box_px:
            problems.append(f"a box differs by {box:.3g} px (tolerance {tolerance.box_px})")
        if score > tolerance.score:
            problems.append(f"a score differs by {score:.3g} (tolerance {tolerance.score})")
        if a.has("pred_masks"):
            iou = _mask_iou(a.pred_masks, b.pred_masks).min().item() if len(a) else 1.0
            result["min_mask_iou"] = iou
            if iou < tolerance.mask_iou:
                problems.append(f"a mask has IoU {iou:.4f} (tolerance {tolerance.mask_iou})")
    if "sem_seg" in eager:
        a, b = eager["sem_seg"].cpu(), exported["sem_seg"].cpu()
        if a.shape != b.shape:
            problems.append(f"semantic maps of shape {tuple(b.shape)}, not {tuple(a.shape)}")
            diff = float("inf")
        else:
            diff = (a - b).abs().max().item() if a.numel() else 0.0
        result["max_probability_diff"] = diff
        if diff > tolerance.probability:
            problems.append(f"a probability differs by {diff:.3g} (tolerance {tolerance.probability})")
    result["problems"] = problems
    return result


# --- writing an export ------------------------------------------------------------------------


def _sample_files(sample_images: Sequence[str], scratch: Path) -> List[Path]:
    """The images the export is traced and checked on: the given files, else two synthetic
    fundus photographs of different sizes (one healthy) written into ``scratch``."""
    if sample_images:
        files = [Path(p) for p in sample_images]
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"--sample-image {path}: no such file")
        return files
    import cv2

    from .data.synthetic import image_rng, render_fundus

    files = []
    for index, (size, healthy) in enumerate(((512, False), (384, True))):
        fundus = render_fundus(image_rng(0, index), size=size, healthy=healthy)
        path = scratch / f"synthetic_{index}.png"
        cv2.imwrite(str(path), fundus.image[:, :, ::-1])  # RGB -> BGR for OpenCV
        files.append(path)
    return files


def _prepare_folder(output: Path, model_file: str) -> None:
    """Create ``output``; refuse it when it holds an export's file names that an earlier export
    of ours did not write (nothing the toolkit did not create is overwritten)."""
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"--output {output} cannot be created: {e.strerror or e}") from e
    if not output.is_dir():
        raise ExportError(f"--output {output}: not a folder")
    ours = (output / MANIFEST).exists()
    if ours:
        read_manifest(output)  # an export.json of anyone else's is refused
    else:
        taken = [n for n in (model_file, CONFIG_FILE) if (output / n).exists()]
        if taken:
            raise ExportError(
                f"--output {output}: already holds {', '.join(taken)} not written by an export; "
                "choose an empty or new folder"
            )


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def export_model(cfg, weights: str, fmt: str, output: Path,
                 sample_images: Sequence[str] = (), tolerance: Tolerance = TOLERANCE) -> dict:
    """Export the model of ``cfg`` with ``weights`` as ``fmt`` into the folder ``output``:
    ``model.ts`` / ``model.onnx``, ``config.yaml`` and ``export.json`` (the outputs' meaning, the
    tolerance and the differences measured on each sample image). Nothing is written unless the
    exported network matches the eager model on every sample image.

    Returns:
        the manifest written to export.json.

    Raises:
        ExportError: a model that is not exported, an ONNX op that cannot be exported, an export
            that differs from the eager model, an unusable ``output``.
    """
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"--format {fmt}: one of {', '.join(EXPORT_FORMATS)}")
    check_exportable(cfg)
    if fmt == "onnx" and onnx_missing():
        raise ExportError(onnx_missing())
    output = Path(output)
    model_file = MODEL_FILES[fmt]
    model, class_names = load_eager_model(cfg, weights)  # a bad file creates no folder
    _prepare_folder(output, model_file)
    mapper = _mapper(cfg)
    names = output_names(cfg)
    with tempfile.TemporaryDirectory(prefix="retina_d2_export_") as scratch:
        files = _sample_files(sample_images, Path(scratch))
        mapped = [mapper({"file_name": str(p)}) for p in files]
        sample_names = [p.name if sample_images else f"synthetic fundus {p.stem[-1]}" for p in files]
    image = mapped[0]["image"].float()
    # The eager reference: what evaluation and prediction run (check_exportable leaves only the
    # lesion merge of the inference pipeline's steps).
    from .modeling.inference import build_inference_model

    eager_model = build_inference_model(cfg, model).eval()
    with torch.no_grad():
        data = _torchscript_bytes(model, image) if fmt == "torchscript" else _onnx_bytes(
            model, image, names
        )
        network = _NETWORKS[fmt](data)
        checks = []
        for name, inputs in zip(sample_names, mapped):
            eager = eager_model([inputs])[0]
            exported = postprocess(cfg, network(inputs["image"].float()), inputs)
            check = compare_outputs(eager, exported, tolerance)
            check.update(image=name, input_size=list(inputs["image"].shape[-2:]))
            checks.append(check)
    failed = [c for c in checks if c["problems"]]
    if failed:
        raise ExportError(
            f"the {fmt} model differs from the eager model on {failed[0]['image']}: "
            f"{'; '.join(failed[0]['problems'])}; nothing written to {output}"
        )
    manifest = _manifest(cfg, weights, fmt, data, names, class_names, tolerance, checks)
    _write_bytes(output / model_file, data)
    with atomic_write(output / CONFIG_FILE) as f:
        f.write(cfg.dump())
    # Last: export.json names the model file's sha256, so a crash before this line leaves a
    # folder that ExportedLesionModel refuses, never a model paired with another's config.
    with atomic_write(output / MANIFEST) as f:
        json.dump(manifest, f, indent=2)
    return manifest


_OUTPUT_MEANINGS = {
    "boxes": ("N x 4", "XYXY boxes in the input image's pixels"),
    "scores": ("N", "detection scores, sorted per class as Detectron2's NMS leaves them"),
    "classes": ("N", "class index k into class_names"),
    "mask_probs": ("N x 1 x M x M", "mask probabilities inside each box (paste into the "
                   "photograph's frame as Detectron2's paste_masks_in_image does, threshold 0.5)"),
    "sem_seg_logits": ("1 x C x H' x W'", "semantic logits at the input padded to "
                       "size_divisibility (crop to H x W, resize, sigmoid or softmax)"),
}


def _manifest(cfg, weights, fmt, data, names, class_names, tolerance, checks) -> dict:
    import retina_d2

    return {
        MANIFEST_MARKER: 1,
        "format": fmt,
        "model_file": MODEL_FILES[fmt],
        "model_sha256": hashlib.sha256(data).hexdigest(),
        "config_file": CONFIG_FILE,
        "architecture": cfg.MODEL.META_ARCHITECTURE,
        "weights": str(weights),
        "class_names": class_names,
        "retina_d2_version": retina_d2.__version__,
        "torch_version": torch.__version__,
        "onnx_opset": ONNX_OPSET if fmt == "onnx" else None,
        "input": {
            "name": "image",
            "dtype": "float32",
            "shape": "3 x H x W",
            "channel_order": cfg.INPUT.FORMAT,
            "preprocessing": "retina_d2.data.mapper.LesionDatasetMapper(config.yaml, "
                             "is_train=False): field-of-view crop, resize, Graham / CLAHE",
        },
        "outputs": [
            {"name": n, "shape": _OUTPUT_MEANINGS[n][0], "meaning": _OUTPUT_MEANINGS[n][1]}
            for n in names
        ],
        "postprocessing": _postprocessing_steps(cfg, names),
        "tolerance": asdict(tolerance),
        "checked_on": checks,
    }


def _postprocessing_steps(cfg, names) -> List[str]:
    steps = []
    if "boxes" in names:
        steps.append("rescale to the field-of-view crop and paste into the photograph's frame "
                     "(retina_d2.modeling.meta_arch.lesion_rcnn.detections_in_frame)")
        if cfg.MODEL.LESION_MERGE.ENABLED:
            steps.append(f"merge touching lesions scoring >= {cfg.MODEL.LESION_MERGE.SCORE_THRESH} "
                         "(MODEL.LESION_MERGE, retina_d2.modeling.inference.LesionMerging)")
    if "sem_seg_logits" in names:
        steps.append(f"semantic logits -> {cfg.MODEL.LESION_SEG.ACTIVATION} probabilities in the "
                     "photograph's frame (semantic_outputs)")
    return steps


# --- command line -----------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Export a LesionRCNN or SemanticLesionNet to TorchScript or ONNX, checked "
        "against the eager model on sample images (see retina_d2/export.py)."
    )
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", required=True, help="a checkpoint that sets every parameter")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="torchscript")
    p.add_argument("--output", required=True, type=Path,
                   help="folder for model.ts / model.onnx, config.yaml and export.json")
    p.add_argument(
        "--sample-image", action="append", default=[],
        help="an image to trace on and check against the eager model (repeatable; the first is "
        "traced); default: two synthetic fundus photographs of different sizes",
    )
    p.add_argument(
        "--trust-checkpoint", action="store_true",
        help="read --weights even if it needs full unpickling, which can run any code it "
        "carries: only a file you made or trust (sets MODEL.TRUST_CHECKPOINT; warns)",
    )
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    opts = list(args.opts)
    if args.trust_checkpoint:
        opts += ["MODEL.TRUST_CHECKPOINT", "True"]
    try:
        cfg = export_config(args.config_file, opts)
        manifest = export_model(cfg, str(args.weights), args.format, args.output, args.sample_image)
    except (FileNotFoundError, ValueError, ConfigError, CheckpointError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {getattr(e, 'filename', None) or args.output}: {e.strerror or e}",
              file=sys.stderr)
        return 2
    for check in manifest["checked_on"]:
        shown = {k: v for k, v in check.items() if k not in ("problems", "image")}
        print(f"checked on {check['image']}: {shown}")
    print(f"exported {manifest['architecture']} as {args.format}: "
          f"{args.output / manifest['model_file']}")
    return 0
