"""``LesionDatasetMapper``: a converted record -> the model's input (after Detectron2's
``DatasetMapper``).

Training: the image and its lesion instances go through the preprocessing and augmentation of
:func:`retina_d2.data.preprocess.build_preprocess`; crowd annotations (ignore regions) are
dropped, and an image without lesions (a healthy eye, a negative) keeps an empty ``Instances``.
For a model with a semantic head, the record's ``sem_seg_files`` (one 0 / 1 / 255-ignore PNG per
lesion) become ``"sem_seg"``, a uint8 ``(C, H, W)`` tensor in the transformed frame whose channels
follow the dataset's ``thing_classes``; a lesion the image is not annotated for is all 255.

Inference: annotations are dropped, and when the field-of-view crop changed the frame,
``"fov_box" = [x0, y0, x1, y1]`` records the crop in the original image's pixels. The model
post-processes its predictions to the crop's size, shifts boxes by ``(x0, y0)`` and pads masks into
the original ``("height", "width")``, which stay those of the file.
"""
import copy
import logging
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, BoxMode, Instances, PolygonMasks
from fvcore.transforms.transform import BlendTransform, NoOpTransform, TransformList
from scipy import ndimage

from ..config import has_semantic_head
from .instances import decode_segmentation_region
from .preprocess import FieldOfViewCropTransform, PhotometricTransform, build_preprocess

__all__ = ["LesionDatasetMapper", "semantic_classes"]

# Value of the semantic targets' ignore pixels (the converters' SEMANTIC_IGNORE).
SEMANTIC_IGNORE = 255

# Transforms that leave every pixel where it was: a FOV crop after these still crops the file.
_FRAME_PRESERVING = (NoOpTransform, BlendTransform, T.ColorTransform, PhotometricTransform)


class LesionDatasetMapper:
    """A callable: one record of a converted dataset -> a dict that Detectron2's models take.

    Output keys: ``"image"`` (uint8 ``CxHxW`` tensor in ``image_format``), the record's own fields,
    and ``"instances"`` and ``"sem_seg"`` (training, when asked for) or ``"fov_box"`` (inference,
    when the frame was cropped).
    """

    @configurable
    def __init__(
        self,
        *,
        is_train: bool,
        augmentations: List[Union[T.Augmentation, T.Transform]],
        image_format: str,
        use_instance_mask: bool = True,
        instance_mask_format: str = "bitmask",
        recompute_boxes: bool = True,
        instance_targets: bool = True,
        semantic_classes: Optional[Sequence[str]] = None,
    ):
        """
        Args:
            is_train: map for training (targets) or inference (no annotations).
            augmentations: applied in order to the image and every target.
            image_format: an image format of :func:`detectron2.data.detection_utils.read_image`.
            use_instance_mask: keep instance masks ("gt_masks").
            instance_mask_format: "bitmask" or "polygon"; the converters' RLE masks need
                "bitmask".
            recompute_boxes: replace the transformed boxes by the tight boxes of the transformed
                masks. A shift or zoom that pushes a lesion partly out of the image leaves its
                clipped box loose; the mask stays exact.
            instance_targets: build ``"instances"`` in training; a semantic-only model needs
                none (the annotations' boxes still keep the FOV crop from cutting lesions).
            semantic_classes: the lesion names of the ``"sem_seg"`` channels, in order (the
                dataset's ``thing_classes``); None: no semantic targets. Used in training only.
        """
        if instance_mask_format not in ("bitmask", "polygon"):
            raise ValueError(
                f"instance_mask_format must be 'bitmask' or 'polygon', got {instance_mask_format!r}"
            )
        if recompute_boxes and not use_instance_mask:
            raise ValueError("recompute_boxes needs instance masks (use_instance_mask=True)")
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.use_instance_mask = use_instance_mask
        self.instance_mask_format = instance_mask_format
        self.recompute_boxes = recompute_boxes
        self.instance_targets = instance_targets
        self.semantic_classes = list(semantic_classes) if semantic_classes is not None else None
        mode = "training" if is_train else "inference"
        logging.getLogger(__name__).info(f"[LesionDatasetMapper] {mode}: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        semantic_only = cfg.MODEL.META_ARCHITECTURE == "SemanticLesionNet"
        return {
            "is_train": is_train,
            "augmentations": build_preprocess(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "use_instance_mask": cfg.MODEL.MASK_ON and not semantic_only,
            "instance_mask_format": cfg.INPUT.MASK_FORMAT,
            "recompute_boxes": cfg.MODEL.MASK_ON and not semantic_only,
            "instance_targets": not semantic_only,
            "semantic_classes": (
                semantic_classes(cfg.DATASETS.TRAIN)
                if is_train and has_semantic_head(cfg)
                else None
            ),
        }

    def __call__(self, dataset_dict: dict) -> dict:
        """
        Args:
            dataset_dict: one record in Detectron2's dataset format (``load_lesion_json``).

        Returns:
            A new dict; ``dataset_dict`` is not modified.
        """
        dataset_dict = copy.deepcopy(dataset_dict)
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)

        boxes = self._annotation_boxes(dataset_dict) if self.is_train else None
        # Semantic targets are not passed here: AugInput holds one 2-D map, and ours are C maps,
        # transformed one by one below with the transforms this call returns.
        aug_input = T.AugInput(image, boxes=boxes, sem_seg=None)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]
        # Tensors, not numpy arrays: the data loader's workers share them without pickling.
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        if not self.is_train:
            dataset_dict.pop("annotations", None)
            fov_box = _fov_box(transforms)
            if fov_box is not None:
                dataset_dict["fov_box"] = fov_box
            return dataset_dict

        if self.semantic_classes is not None:
            dataset_dict["sem_seg"] = self._semantic_targets(dataset_dict, transforms, image_shape)
        if self.instance_targets:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        else:
            dataset_dict.pop("annotations", None)
        return dataset_dict

    def _semantic_targets(self, dataset_dict: dict, transforms, image_shape) -> torch.Tensor:
        """The record's semantic PNGs, transformed like the image, as a uint8 (C, H, W) tensor.

        Nearest-neighbour resampling keeps the values 0 / 1 / 255; pixels a shift or zoom brings in
        from outside the image are 0, as the image is black there.
        """
        file_name = dataset_dict["file_name"]
        files = dataset_dict.get("sem_seg_files")
        if files is None:
            raise ValueError(
                f"{file_name}: the record has no sem_seg_files, which a semantic head trains on; "
                "convert the dataset with its semantic targets (without --no-semantic)"
            )
        unknown = sorted(set(files) - set(self.semantic_classes))
        if unknown:
            raise ValueError(
                f"{file_name}: semantic targets of {unknown}, which are not among the model's "
                f"lesion channels {self.semantic_classes}"
            )
        file_shape = (dataset_dict["height"], dataset_dict["width"])
        channels = []
        for name in self.semantic_classes:
            if name not in files:
                # Not annotated on this image (e-ophtha grades one lesion type per image).
                channels.append(np.full(image_shape, SEMANTIC_IGNORE, np.uint8))
                continue
            target = utils.read_image(files[name])
            if target.ndim == 3:  # an RGB-saved PNG holds its labels in every channel
                target = target[..., 0]
            if target.shape != file_shape:
                raise ValueError(
                    f"semantic target {files[name]} is {target.shape[1]}x{target.shape[0]} (WxH) "
                    f"but its image {file_name} is {file_shape[1]}x{file_shape[0]}"
                )
            channels.append(transforms.apply_segmentation(target.astype(np.uint8)))
        return torch.as_tensor(np.ascontiguousarray(np.stack(channels)))

    @staticmethod
    def _annotation_boxes(dataset_dict: dict) -> Optional[np.ndarray]:
        """XYXY boxes of every annotation, ignore regions included, for the FOV crop to keep."""
        annos = dataset_dict.get("annotations", [])
        if not annos:
            return None
        return np.array(
            [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annos],
            dtype=np.float32,
        )

    def _check_mask_format(self, annos: List[dict], file_name: str) -> None:
        if self.instance_mask_format == "polygon" and any(
            isinstance(a.get("segmentation"), dict) for a in annos
        ):
            raise ValueError(
                f"{file_name}: its instance masks are RLE, which INPUT.MASK_FORMAT 'polygon' "
                "cannot hold; set INPUT.MASK_FORMAT to 'bitmask' (or convert the dataset with "
                "polygons)."
            )

    def _transform_annotations(self, dataset_dict: dict, transforms, image_shape) -> None:
        annos = dataset_dict.pop("annotations", [])
        for anno in annos:
            if not self.use_instance_mask:
                anno.pop("segmentation", None)
            anno.pop("keypoints", None)
        self._check_mask_format(annos, dataset_dict["file_name"])
        if self.use_instance_mask and self.recompute_boxes and self.instance_mask_format == "bitmask":
            instances = _layered_instances(
                [a for a in annos if a.get("iscrowd", 0) == 0], transforms, image_shape,
                (dataset_dict["height"], dataset_dict["width"]),
            )
            dataset_dict["instances"] = utils.filter_empty_instances(instances)
            return
        annos = [
            utils.transform_instance_annotations(anno, transforms, image_shape)
            for anno in annos
            if anno.get("iscrowd", 0) == 0
        ]
        instances = utils.annotations_to_instances(
            annos, image_shape, mask_format=self.instance_mask_format
        )
        if self.use_instance_mask and not instances.has("gt_masks"):
            # An image without lesions: an empty mask field keeps every image's fields alike.
            instances.gt_masks = _empty_masks(self.instance_mask_format, image_shape)
        if self.recompute_boxes and len(instances):
            instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
        dataset_dict["instances"] = utils.filter_empty_instances(instances)


def semantic_classes(dataset_names: Sequence[str]) -> List[str]:
    """The lesion names of the semantic channels: the ``thing_classes`` that every dataset in
    ``dataset_names`` shares.

    Raises:
        ValueError: no dataset given, one without ``thing_classes``, or datasets whose lesion
            lists differ (one channel would mean two lesions).
    """
    if not dataset_names:
        raise ValueError("semantic targets need a training dataset (DATASETS.TRAIN is empty)")
    classes = {}
    for name in dataset_names:
        things = MetadataCatalog.get(name).get("thing_classes", None)
        if things is None:
            raise ValueError(f"dataset {name!r} has no thing_classes to order semantic channels by")
        classes[name] = list(things)
    first = next(iter(classes.values()))
    if any(c != first for c in classes.values()):
        raise ValueError(f"semantic targets need datasets with one lesion list, got {classes}")
    return first


def _layered_instances(annos: List[dict], transforms, image_shape, file_shape) -> Instances:
    """Transformed instances of ``annos``, built by transforming label maps, not masks.

    Detectron2 transforms every instance mask on its own at the file's resolution: hundreds of
    full-size resizes for an eye full of exudates. Instances that do not overlap can share one
    uint8 label map (up to 255 per map), and a nearest-neighbour transform of a label map picks
    the same source pixel for every output pixel as it does for each instance's own mask, so the
    result is identical to Detectron2's per-mask path at a fraction of the cost. Boxes are the
    tight boxes of the transformed masks.
    """
    height, width = file_shape
    layers: List[np.ndarray] = []
    used: List[int] = []  # labels taken in each layer
    placed = []  # (layer index, label) per annotation
    for anno in annos:
        region = decode_segmentation_region(anno["segmentation"], height, width)
        if region is None:
            placed.append(None)
            continue
        rows, cols, inside = region
        index = next(
            (i for i, layer in enumerate(layers) if used[i] < 255 and not layer[rows, cols][inside].any()),
            None,
        )
        if index is None:
            layers.append(np.zeros((height, width), np.uint8))
            used.append(0)
            index = len(layers) - 1
        used[index] += 1
        layers[index][rows, cols][inside] = used[index]
        placed.append((index, used[index]))
    moved = [transforms.apply_segmentation(layer) for layer in layers]
    masks, classes = [], []
    found = [ndimage.find_objects(m) for m in moved]
    for anno, where in zip(annos, placed):
        if where is None:
            continue
        index, label = where
        region = found[index][label - 1] if label <= len(found[index]) else None
        if region is None:
            continue  # transformed out of the image
        mask = np.zeros(image_shape, dtype=bool)
        mask[region] = moved[index][region] == label
        masks.append(mask)
        classes.append(anno["category_id"])
    instances = Instances(image_shape)
    instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
    bitmasks = BitMasks(
        torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, *image_shape), dtype=torch.bool)
    )
    instances.gt_masks = bitmasks
    instances.gt_boxes = bitmasks.get_bounding_boxes()
    return instances


def _empty_masks(mask_format: str, image_shape) -> Union[BitMasks, PolygonMasks]:
    if mask_format == "polygon":
        return PolygonMasks([])
    return BitMasks(torch.zeros((0, *image_shape), dtype=torch.bool))


def _fov_box(transforms: TransformList) -> Optional[List[int]]:
    """``[x0, y0, x1, y1]`` of the FOV crop in the original image, or None without a crop.

    Raises:
        ValueError: if a geometric transform precedes the crop, whose box is then not in the
            original image's pixels.
    """
    for tfm in transforms.transforms:
        if isinstance(tfm, FieldOfViewCropTransform):
            return [int(v) for v in tfm.box]
        if not isinstance(tfm, _FRAME_PRESERVING):
            if any(isinstance(t, FieldOfViewCropTransform) for t in transforms.transforms):
                raise ValueError(
                    f"FieldOfViewCrop must come before every geometric augmentation ({tfm} "
                    "precedes it): predictions are pasted back through the crop's box alone."
                )
            return None
    return None
