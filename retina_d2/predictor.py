"""The Python API: a trained model file in, lesions on any photograph out.

Example::

    import retina_d2

    model = retina_d2.load_model("output/maskrcnn_heimed/model_best.pth")
    outputs = model("eye.jpg")                 # a file,
    outputs = model(cv2.imread("eye.jpg"))     # a BGR array (OpenCV's order, the default),
    outputs = model(rgb_array, format="RGB")   # an RGB array,
    outputs = model(PIL.Image.open("eye.jpg")) # or a PIL image (its mode says the order)
    for box, k, score in zip(outputs["instances"].pred_boxes, outputs["instances"].pred_classes,
                             outputs["instances"].scores):
        print(outputs["class_names"][k], float(score), box.tolist())

:class:`LesionPredictor` is Detectron2's ``DefaultPredictor`` with retina_d2's test-time
preprocessing (FOV crop, resize, Graham / CLAHE: the evaluation mapper's), and the model run
through :func:`retina_d2.modeling.inference.build_inference_model` as evaluation runs it (AMP,
tiling, test-time augmentation), so a prediction here equals the one made during evaluation. Like
``DefaultPredictor`` it takes a BGR array by default; ``format="RGB"`` for an RGB one.

:func:`load_model` needs nothing but the checkpoint a training run wrote: its class names and
config are stored in it (retina_d2/modeling/model_file.py); no dataset is converted or registered.
An older checkpoint without them needs its config (``config_file=``).

The outputs are the model's own, in the photograph's pixel frame, on ``MODEL.DEVICE``, plus
``"class_names"`` (the name of instance class / semantic channel k) and ``"height"``/``"width"``:

- detectors (LesionRCNN): ``"instances"`` (``pred_boxes``, ``pred_classes``, ``scores``,
  ``pred_masks``), at ``MODEL.ROI_HEADS.SCORE_THRESH_TEST`` and above;
- semantic models (SemanticLesionNet, LesionRCNN with ``MODEL.LESION_SEG.ENABLED``):
  ``"sem_seg"``, (C, height, width) probabilities, channel k = ``class_names[k]``;
- MultiTaskLesionNet: those of its lesion branch, ``"lesion_presence"`` (C,), ``"dr_grade"`` /
  ``"dme_grade"`` (probabilities over the grades), ``"landmarks"`` {name: (x, y)} and
  ``"landmark_scores"``.
"""
import contextlib
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.modeling import build_model
from PIL import Image, ImageOps

from .data.image_io import to_8bit
from .data.lesions import lesion
from .data.mapper import LesionDatasetMapper
from .modeling import LesionCheckpointer
from .modeling.inference import build_inference_model
from .modeling.model_file import inference_config, read_model_info
from .modeling.outputs import has_detector, has_semantic_head

__all__ = ["LesionPredictor", "load_model"]

# Array channel orders __call__ accepts (what Detectron2's models take).
ARRAY_FORMATS = ("BGR", "RGB")

ImageInput = Union[str, Path, np.ndarray, Image.Image]


class LesionPredictor:
    """One photograph in, its lesions out (module docstring).

    Attributes:
        cfg: the (frozen) config the model was built from.
        class_names: the lesion names of the model's outputs, in order.
        lesion_ids: their lesion vocabulary ids (the ``category_id`` of COCO results).
    """

    def __init__(self, cfg, class_names: Optional[Sequence[str]] = None):
        """
        Args:
            cfg: the model's config; ``MODEL.WEIGHTS`` the checkpoint (which must set every
                parameter, unless ``MODEL.ALLOW_PARTIAL_WEIGHTS``).
            class_names: the lesion names of the model's outputs. Default: those stored in
                ``MODEL.WEIGHTS``, else the ``thing_classes`` of the config's registered
                datasets.

        Raises:
            ValueError: no class names can be found, or their number is not the model's.
            CheckpointError, FileNotFoundError: the weights cannot be read.
        """
        self.cfg = cfg.clone()
        self.cfg.freeze()
        names = list(class_names) if class_names is not None else _class_names(self.cfg)
        _check_class_count(self.cfg, names)
        self.class_names = names
        self.lesion_ids = [lesion(name).id for name in names]
        with _training_classes_known(self.cfg, names):
            model = build_model(self.cfg)
        if self.cfg.MODEL.WEIGHTS:
            # Into the bare model: a wrapper would prefix the checkpoint's keys.
            LesionCheckpointer.for_inference(self.cfg, model).load(self.cfg.MODEL.WEIGHTS)
        # A wrapper is a new module in training mode, in which it runs the model untiled.
        self.model = build_inference_model(self.cfg, model).eval()
        self.mapper = LesionDatasetMapper(self.cfg, is_train=False)

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], config_file: Optional[str] = None,
                        opts: Sequence[str] = (), trust_checkpoint: bool = False,
                        device: Optional[str] = None) -> "LesionPredictor":
        """The predictor of a checkpoint written by retina_d2's training (:func:`load_model`)."""
        opts = list(opts)
        if trust_checkpoint:
            opts += ["MODEL.TRUST_CHECKPOINT", "True"]
        if device is not None:
            opts += ["MODEL.DEVICE", device]
        cfg, info = inference_config(str(path), config_file, opts)
        return cls(cfg, class_names=info.class_names if info is not None else None)

    def __call__(self, image: ImageInput, format: str = "BGR") -> dict:
        """Predict on one photograph.

        Args:
            image: an image file's path; a uint8 NumPy array, (H, W, 3) in ``format`` or
                (H, W) greyscale; or a PIL image (any mode PIL converts to RGB; EXIF orientation
                applied, as for a file).
            format: the channel order of an array: "BGR" (OpenCV's ``cv2.imread``, Detectron2's
                ``DefaultPredictor``) or "RGB" (PIL, scikit-image, matplotlib). Ignored for
                files and PIL images.

        Returns:
            The model's outputs for the image (module docstring), with ``"class_names"``,
            ``"height"`` and ``"width"``.

        Raises:
            ImageReadError: an unreadable file (named); ValueError: an array of another shape or
            type, an unknown ``format``; TypeError: any other input.
        """
        if isinstance(image, (str, Path)):
            inputs = self.mapper({"file_name": str(image)})
        else:
            array = self._as_model_array(image, format)
            height, width = array.shape[:2]
            record = {"file_name": "<array>", "height": height, "width": width}
            inputs = self.mapper(record, image=array)
        with torch.no_grad():
            outputs = self.model([inputs])[0]
        outputs["height"], outputs["width"] = inputs["height"], inputs["width"]
        outputs["class_names"] = list(self.class_names)
        return outputs

    def _as_model_array(self, image, format: str) -> np.ndarray:
        """``image`` (array or PIL) as a new uint8 HxWx3 array in the model's INPUT.FORMAT."""
        wanted = self.cfg.INPUT.FORMAT
        if isinstance(image, Image.Image):
            image = to_8bit(ImageOps.exif_transpose(image), "the PIL image")
            return utils.convert_PIL_to_numpy(image, wanted).copy()
        if not isinstance(image, np.ndarray):
            raise TypeError(
                f"LesionPredictor takes an image file's path, a NumPy array or a PIL image, not "
                f"a {type(image).__name__}"
            )
        if format not in ARRAY_FORMATS:
            raise ValueError(f"format must be one of {ARRAY_FORMATS}, got {format!r}")
        if image.dtype != np.uint8:
            raise ValueError(
                f"the image array is {image.dtype}; give uint8 (0..255) values, as cv2.imread "
                "and PIL return them"
            )
        if image.ndim == 2:  # greyscale: the same value in every channel
            return np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"the image array has shape {image.shape}; give (H, W, 3) in {format} order or "
                "(H, W) greyscale"
            )
        if wanted not in ARRAY_FORMATS:
            raise ValueError(f"INPUT.FORMAT {wanted!r}: arrays are supported for {ARRAY_FORMATS}")
        if format != wanted:
            image = image[:, :, ::-1]
        return np.ascontiguousarray(image).copy()  # the mapper must not touch the caller's array


def load_model(path: Union[str, Path], config_file: Optional[str] = None, opts: Sequence[str] = (),
               trust_checkpoint: bool = False, device: Optional[str] = None) -> LesionPredictor:
    """A :class:`LesionPredictor` for the checkpoint ``path`` alone.

    Args:
        path: a checkpoint written by retina_d2's training (``model_final.pth``,
            ``model_best.pth``), which carries its config and class names.
        config_file: the config to build the model from instead of the stored one; needed for a
            checkpoint saved before configs were stored in them.
        opts: config overrides, KEY VALUE ... (e.g. ``["RETINA.TILE.ENABLED", "True"]``).
        trust_checkpoint: read a full pickle, which can run any code it carries (only a file
            you made or trust; MODEL.TRUST_CHECKPOINT).
        device: "cpu", "cuda", ... (default: the stored config's MODEL.DEVICE, the CPU where it
            names CUDA and there is none).

    Raises:
        ConfigError: an older checkpoint without a stored config and no ``config_file``.
        FileNotFoundError, CheckpointError: ``path`` cannot be read (safely).
    """
    return LesionPredictor.from_checkpoint(path, config_file, opts, trust_checkpoint, device)


def _class_names(cfg) -> List[str]:
    """The class names stored in MODEL.WEIGHTS, else the config's registered datasets'."""
    if cfg.MODEL.WEIGHTS and Path(cfg.MODEL.WEIGHTS).is_file():
        info = read_model_info(cfg.MODEL.WEIGHTS, trust=cfg.MODEL.TRUST_CHECKPOINT)
        if info is not None:
            return list(info.class_names)
    if not _lesion_outputs(cfg):
        return []
    datasets = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)  # training order first
    for name in datasets:
        if name not in DatasetCatalog.list():
            from .data.register import register_all

            register_all()  # an older checkpoint: its datasets name its classes
            break
    for name in datasets:
        if name in DatasetCatalog.list():
            classes = MetadataCatalog.get(name).get("thing_classes", None)
            if classes:
                return list(classes)
    raise ValueError(
        f"{cfg.MODEL.WEIGHTS or 'the model'}: no class names: the checkpoint does not store them "
        f"(saved before retina_d2 did) and none of the config's datasets {datasets} is "
        "registered (convert it and point RETINA_D2_DATASETS at the folder holding the "
        "conversion), or pass class_names"
    )


def _lesion_outputs(cfg) -> int:
    """How many lesion classes the model of ``cfg`` outputs (0: grades / landmarks only)."""
    if has_detector(cfg):
        return cfg.MODEL.ROI_HEADS.NUM_CLASSES
    if has_semantic_head(cfg):
        return cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    return 0


def _check_class_count(cfg, names: Sequence[str]) -> None:
    """A name per lesion class of the model (a semantic-only model's channels, a detector's
    classes), each a vocabulary lesion."""
    for name in names:
        lesion(name)  # KeyError naming the unknown lesion
    count = _lesion_outputs(cfg)
    if count and len(names) != count:
        raise ValueError(
            f"{cfg.MODEL.WEIGHTS or 'the model'}: {len(names)} class names {list(names)} for a "
            f"model of {count} lesion classes"
        )


@contextlib.contextmanager
def _training_classes_known(cfg, names: Sequence[str]):
    """While the model is built, the training datasets' ``thing_classes`` are the checkpoint's
    class names where no dataset of that name is registered: a head that maps its channels by
    them (RedSegHead) then maps them as in training. The entries made here are removed after."""
    made = []
    for dataset in cfg.DATASETS.TRAIN if names else ():
        if dataset not in DatasetCatalog.list() and dataset not in MetadataCatalog.list():
            MetadataCatalog.get(dataset).set(thing_classes=list(names))
            made.append(dataset)
    try:
        yield
    finally:
        for dataset in made:
            MetadataCatalog.remove(dataset)
