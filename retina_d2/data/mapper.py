"""``LesionDatasetMapper``: a converted record -> the model's input (after Detectron2's
``DatasetMapper``).

Training: the image and its lesion instances go through the preprocessing and augmentation of
:func:`retina_d2.data.preprocess.build_preprocess`; crowd annotations (ignore regions) are
dropped, and an image without lesions (a healthy eye, a negative) keeps an empty ``Instances``.
For a model with a semantic head, the record's ``sem_seg_files`` (one 0 / 1 / 255-ignore PNG per
lesion) become ``"sem_seg"``, a uint8 ``(C, H, W)`` tensor in the transformed frame whose channels
follow the dataset's ``thing_classes``; a lesion the image is not annotated for is all 255.

Every lesion survives the resampling: a nearest-neighbour shrink (the paper configs' 1024 px is a
4.2x shrink of IDRiD) misses most 1-pixel microaneurysms and thin lines, so a lesion the
resampling misses entirely, though it maps inside the image, keeps one pixel: the output pixel on
which most of its pixel centres land (:func:`landing_pixel`). This holds for instance masks (each
annotation) and for semantic targets (each 8-connected lesion of a channel) alike; lesions that
survive are left exactly as the resampling made them.

Inference: annotations are dropped, and when the field-of-view crop changed the frame,
``"fov_box" = [x0, y0, x1, y1]`` records the crop in the original image's pixels. The model
post-processes its predictions to the crop's size, shifts boxes by ``(x0, y0)`` and pads masks into
the original ``("height", "width")``, which stay those of the file.
"""
import copy
import logging
from typing import Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, BoxMode, Instances, PolygonMasks
from fvcore.transforms.transform import (
    BlendTransform,
    CropTransform,
    NoOpTransform,
    TransformList,
)
from scipy import ndimage

# What the model outputs and trains on is asked of its registered class (retina_d2/modeling/
# outputs.py imports Detectron2's registry only, nothing of this package's data code).
from ..modeling.outputs import INSTANCES, LANDMARKS, SEM_SEG, output_types, training_targets
# The semantic targets' ignore value; landmark name -> its record field (re-exported).
from ..schema import IGNORE_VALUE as SEMANTIC_IGNORE
from ..schema import LANDMARK_FIELDS
from .image_io import read_image
from .instances import decode_segmentation_region
from .preprocess import FieldOfViewCropTransform, PhotometricTransform, build_preprocess

__all__ = [
    "LANDMARK_FIELDS",
    "LesionDatasetMapper",
    "landing_pixel",
    "semantic_classes",
    "transform_landmarks",
]


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
        landmark_targets: bool = False,
        crop_min_visible: float = 0.0,
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
            landmark_targets: in training, add ``"landmarks"``: the record's landmarks moved with
                the image (:func:`transform_landmarks`).
            crop_min_visible: drop a lesion that the training crop (``INPUT.CROP``) cuts when
                less than this fraction of its area, in the frame just before the crop, lies
                inside the crop. 0 keeps every visible part (Detectron2's behaviour). Needs
                bitmask instance masks with ``recompute_boxes``.
        """
        if instance_mask_format not in ("bitmask", "polygon"):
            raise ValueError(
                f"instance_mask_format must be 'bitmask' or 'polygon', got {instance_mask_format!r}"
            )
        if recompute_boxes and not use_instance_mask:
            raise ValueError("recompute_boxes needs instance masks (use_instance_mask=True)")
        if not 0.0 <= crop_min_visible <= 1.0:
            raise ValueError(
                f"crop_min_visible (RETINA.AUG.CROP_MIN_VISIBLE) must be in [0, 1], got "
                f"{crop_min_visible}"
            )
        if crop_min_visible > 0 and instance_targets and not (
            use_instance_mask and recompute_boxes and instance_mask_format == "bitmask"
        ):
            raise ValueError(
                "crop_min_visible (RETINA.AUG.CROP_MIN_VISIBLE) measures lesions by their masks: "
                "it needs MODEL.MASK_ON with INPUT.MASK_FORMAT 'bitmask'"
            )
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.use_instance_mask = use_instance_mask
        self.instance_mask_format = instance_mask_format
        self.recompute_boxes = recompute_boxes
        self.instance_targets = instance_targets
        self.semantic_classes = list(semantic_classes) if semantic_classes is not None else None
        self.landmark_targets = landmark_targets
        self.crop_min_visible = float(crop_min_visible)
        mode = "training" if is_train else "inference"
        logging.getLogger(__name__).info(f"[LesionDatasetMapper] {mode}: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        # The model's class decides the targets (retina_d2/modeling/outputs.py); a frozen lesion
        # branch (MultiTaskLesionNet) takes none, so grading-only datasets can train the other
        # tasks. Instance masks are read only for a model that predicts instances.
        targets = training_targets(cfg)
        masks = cfg.MODEL.MASK_ON and INSTANCES in output_types(cfg)
        return {
            "is_train": is_train,
            "augmentations": build_preprocess(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
            "use_instance_mask": masks,
            "instance_mask_format": cfg.INPUT.MASK_FORMAT,
            "recompute_boxes": masks,
            "instance_targets": INSTANCES in targets,
            "semantic_classes": (
                semantic_classes(cfg.DATASETS.TRAIN) if is_train and SEM_SEG in targets else None
            ),
            "landmark_targets": is_train and LANDMARKS in targets,
            "crop_min_visible": cfg.RETINA.AUG.CROP_MIN_VISIBLE,
        }

    def __call__(self, dataset_dict: dict, image: Optional[np.ndarray] = None) -> dict:
        """
        Args:
            dataset_dict: one record in Detectron2's dataset format (``load_lesion_json``).
            image: the record's photograph already in memory (uint8 HxWx3 in ``image_format``,
                as :func:`read_image` returns it), which is then used instead of reading
                ``file_name`` (LesionPredictor's arrays and PIL images).

        Returns:
            A new dict; ``dataset_dict`` is not modified.
        """
        dataset_dict = copy.deepcopy(dataset_dict)
        if image is None:
            # Ours, not Detectron2's: 16-bit greyscale is scaled (not clipped to 0/255), and a
            # truncated or unreadable file is named in the error.
            image = read_image(dataset_dict["file_name"], format=self.image_format)
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

        if self.landmark_targets:
            dataset_dict["landmarks"] = transform_landmarks(dataset_dict, transforms, image_shape)
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
        from outside the image are 0, as the image is black there. A lesion (8-connected 1s) that
        the resampling misses entirely keeps its landing pixel (:func:`landing_pixel`) as 1.
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
            target = target.astype(np.uint8)
            moved = transforms.apply_segmentation(target)
            channels.append(_keep_missed_lesions(target, moved, transforms))
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
                "cannot hold; set INPUT.MASK_FORMAT to 'bitmask' (a conversion with --polygons "
                "keeps RLE for lesions with holes, so it needs 'bitmask' too)."
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
                min_visible=self.crop_min_visible,
            )
            dataset_dict["instances"] = utils.filter_empty_instances(instances)
            return
        annos = [anno for anno in annos if anno.get("iscrowd", 0) == 0]
        keeps_pixels = self.use_instance_mask and self.instance_mask_format == "bitmask"
        file_shape = (dataset_dict["height"], dataset_dict["width"])
        sources = [_source_pixels(a, file_shape) for a in annos] if keeps_pixels else []
        annos = [utils.transform_instance_annotations(a, transforms, image_shape) for a in annos]
        instances = utils.annotations_to_instances(
            annos, image_shape, mask_format=self.instance_mask_format
        )
        if self.use_instance_mask and not instances.has("gt_masks"):
            # An image without lesions: an empty mask field keeps every image's fields alike.
            instances.gt_masks = _empty_masks(self.instance_mask_format, image_shape)
        if keeps_pixels:
            masks = instances.gt_masks.tensor
            for i, source in enumerate(sources):
                pixel = None if masks[i].any() else landing_pixel(*source, transforms, image_shape)
                if pixel is not None:
                    masks[i][pixel] = True
        if self.recompute_boxes and len(instances):
            instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
        dataset_dict["instances"] = utils.filter_empty_instances(instances)


def transform_landmarks(record: dict, transforms, image_shape) -> Dict[str, Tuple[float, float]]:
    """The record's landmarks (:data:`LANDMARK_FIELDS`, ``[x, y]`` in the file's pixels) moved by
    the image's ``transforms``, as ``{name: (x, y)}`` in the transformed image's pixels.

    A landmark the record lacks, or that the transforms move out of the ``image_shape`` (a crop),
    is left out: absent, never (0, 0), so a model masks it out of its loss.
    """
    height, width = image_shape
    moved = {}
    for name, field_name in LANDMARK_FIELDS.items():
        xy = record.get(field_name)
        if xy is None:
            continue
        x, y = transforms.apply_coords(np.array([xy], dtype=np.float64))[0]
        if 0 <= x < width and 0 <= y < height:
            moved[name] = (float(x), float(y))
    return moved


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


def _split_at_crop(transforms: TransformList):
    """``(before, crop, after)`` around the training crop (``RandomCrop`` / ``RandomLesionCrop``;
    the field-of-view crop never cuts a lesion), or None when there is none."""
    items = transforms.transforms
    for i, tfm in enumerate(items):
        if isinstance(tfm, CropTransform) and not isinstance(tfm, FieldOfViewCropTransform):
            return TransformList(items[:i]), tfm, TransformList(items[i + 1 :])
    return None


def _layered_instances(
    annos: List[dict], transforms, image_shape, file_shape, min_visible: float = 0.0
) -> Instances:
    """Transformed instances of ``annos``, built by transforming label maps, not masks.

    Detectron2 transforms every instance mask on its own at the file's resolution: hundreds of
    full-size resizes for an eye full of exudates. Instances that do not overlap can share one
    uint8 label map (up to 255 per map), and a nearest-neighbour transform of a label map picks
    the same source pixel for every output pixel as it does for each instance's own mask, so the
    result is identical to Detectron2's per-mask path at a fraction of the cost. Boxes are the
    tight boxes of the transformed masks.

    With ``min_visible > 0``, a lesion whose area inside the training crop is below
    ``min_visible`` times its area in the frame just before the crop is dropped.

    A lesion the resampling misses entirely keeps its :func:`landing_pixel` (where the crop is
    measured for ``min_visible`` before the resampling saw it, by its pixel centres instead).
    """
    height, width = file_shape
    layers: List[np.ndarray] = []
    used: List[int] = []  # labels taken in each layer
    placed = []  # (layer index, label) per annotation
    regions = []
    for anno in annos:
        region = decode_segmentation_region(anno["segmentation"], height, width)
        regions.append(region)
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
    split = _split_at_crop(transforms) if min_visible > 0 else None
    dropped = set()  # (layer index, label) of lesions the crop cut too much
    measured = set()  # (layer index, label) of lesions seen in the frame before the crop
    frame_shape = None  # (height, width) of that frame
    if split is None:
        moved = [transforms.apply_segmentation(layer) for layer in layers]
    else:
        before, crop, after = split
        moved = []
        for index, layer in enumerate(layers):
            framed = before.apply_segmentation(layer)
            frame_shape = framed.shape[:2]
            cropped = crop.apply_segmentation(framed)
            whole = np.bincount(framed.ravel(), minlength=256)
            inside = np.bincount(cropped.ravel(), minlength=256)
            # A ratio, not inside < min_visible * whole: 0.3 * 100 is a hair above 30.
            fraction = inside / np.maximum(whole, 1)
            cut = np.flatnonzero((whole > 0) & (fraction < min_visible))
            dropped.update((index, int(label)) for label in cut if label > 0)
            measured.update((index, int(label)) for label in np.flatnonzero(whole[1:]) + 1)
            moved.append(after.apply_segmentation(cropped))
    masks, classes = [], []
    found = [ndimage.find_objects(m) for m in moved]
    for anno, where, source in zip(annos, placed, regions):
        if where is None:
            continue
        index, label = where
        if where in dropped:
            continue
        region = found[index][label - 1] if label <= len(found[index]) else None
        mask = np.zeros(image_shape, dtype=bool)
        if region is not None:
            mask[region] = moved[index][region] == label
        else:
            pixels = _region_pixels(source)
            if split is not None and where not in measured:
                if _visible_fraction(*pixels, split[0], split[1], frame_shape) < min_visible:
                    continue
            pixel = landing_pixel(*pixels, transforms, image_shape)
            if pixel is None:
                continue  # transformed out of the image
            mask[pixel] = True
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


def landing_pixel(
    rows: np.ndarray, cols: np.ndarray, transforms, image_shape
) -> Optional[Tuple[int, int]]:
    """``(row, col)`` of the output pixel on which most of a lesion's pixel centres land through
    ``transforms`` (the lowest such index on a tie), or None when none lands inside the image.

    Each source pixel's area goes about where its centre goes, so this is the output pixel that
    takes the largest share of the lesion's area: for a 1-pixel microaneurysm, the pixel its
    centre falls in.

    Args:
        rows, cols: the lesion's pixels in the source image.
        transforms: the image's transforms (any with ``apply_coords``).
        image_shape: ``(height, width)`` of the transformed image.
    """
    centres = np.stack([cols + 0.5, rows + 0.5], axis=1).astype(np.float64)
    moved = np.floor(transforms.apply_coords(centres)).astype(np.int64)
    width = image_shape[1]
    x, y = moved[:, 0], moved[:, 1]
    inside = _inside(moved, image_shape)
    if not inside.any():
        return None
    values, counts = np.unique(y[inside] * width + x[inside], return_counts=True)
    row, col = divmod(int(values[np.argmax(counts)]), width)
    return row, col


def _region_pixels(region: Tuple[slice, slice, np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Rows and columns, in the image, of a :func:`decode_segmentation_region` patch's pixels."""
    rows, cols, patch = region
    r, c = np.nonzero(patch)
    return r + rows.start, c + cols.start


def _source_pixels(anno: dict, file_shape) -> Tuple[np.ndarray, np.ndarray]:
    region = decode_segmentation_region(anno["segmentation"], *file_shape)
    if region is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return _region_pixels(region)


def _visible_fraction(rows, cols, before, crop: CropTransform, frame_shape) -> float:
    """The share of a lesion's pixel centres that the crop keeps, of those inside the frame
    (``frame_shape``) that ``before`` makes: for a lesion the resampling before the crop missed."""
    centres = before.apply_coords(np.stack([cols + 0.5, rows + 0.5], axis=1).astype(np.float64))
    in_frame = _inside(centres, frame_shape)
    kept = _inside(crop.apply_coords(centres[in_frame]), (crop.h, crop.w))
    return float(kept.sum()) / max(int(in_frame.sum()), 1)


def _inside(coords: np.ndarray, shape) -> np.ndarray:
    """Which ``(x, y)`` points lie inside an image of ``shape`` (height, width)."""
    height, width = shape
    x, y = coords[:, 0], coords[:, 1]
    return (x >= 0) & (x < width) & (y >= 0) & (y < height)


def _keep_missed_lesions(target: np.ndarray, moved: np.ndarray, transforms) -> np.ndarray:
    """``moved`` (the transformed 0 / 1 / 255 ``target``) with every lesion (8-connected 1s) that
    the resampling missed entirely set to 1 at its :func:`landing_pixel`."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        (target == 1).view(np.uint8), connectivity=8, ltype=cv2.CV_32S
    )
    count -= 1  # label 0 is the background
    if count == 0:
        return moved
    survived = np.zeros(count + 1, bool)
    # uint8 layers of 255 lesions each: resampled like the target itself, so they pick exactly
    # the pixels the target's resampling picked.
    for first in range(0, count, 255):
        lut = np.zeros(count + 1, np.uint8)
        last = min(first + 255, count)
        lut[first + 1 : last + 1] = np.arange(1, last - first + 1)
        present = np.flatnonzero(np.bincount(transforms.apply_segmentation(lut[labels]).ravel()))
        survived[first + present[present > 0]] = True
    missed = np.flatnonzero(~survived[1:]) + 1
    if not len(missed):
        return moved
    moved = moved.copy()
    for label in missed:
        x, y, w, h = stats[label, :4]
        rows, cols = np.nonzero(labels[y : y + h, x : x + w] == label)
        pixel = landing_pixel(rows + y, cols + x, transforms, moved.shape[:2])
        if pixel is not None:
            moved[pixel] = 1
    return moved


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
