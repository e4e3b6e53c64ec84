"""Checks shared by the converter tests: every output must be plain COCO that pycocotools and
Detectron2 open, and the instances must reproduce the source masks exactly."""
import json
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

import retina_d2  # noqa: F401  (Detectron2 compat before detectron2 imports)
from detectron2.data.datasets import load_coco_json
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


def write_image(path, height, width, seed=0, mode="RGB"):
    """A noisy fundus-coloured image of the given size, in the format the suffix says."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    arr[..., 0] = np.maximum(arr[..., 0], 120)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF"}[
        path.suffix.lower()
    ]
    Image.fromarray(arr).convert(mode).save(path, format=fmt)
    return path


def random_lesion_mask(height, width, seed=0, count=6, max_radius=4):
    """A boolean mask of ``count`` blobs of random size, some of them single pixels."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), bool)
    yy, xx = np.mgrid[:height, :width]
    for i in range(count):
        cy, cx = rng.integers(2, height - 2), rng.integers(2, width - 2)
        if i % 3 == 0:
            mask[cy, cx] = True  # a 1-pixel microaneurysm
        else:
            r = rng.uniform(1, max_radius)
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return mask


def write_mask(path, mask, value=255, rgb_red=False):
    """Write a mask file: grey ``value`` on 0, or (value, 0, 0) on black when ``rgb_red``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.where(mask, value, 0).astype(np.uint8)
    if rgb_red:
        arr = np.stack([arr, np.zeros_like(arr), np.zeros_like(arr)], axis=-1)
    fmt = {".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF"}[path.suffix.lower()]
    Image.fromarray(arr).save(path, format=fmt)
    return path


def load_checked(json_file, image_root):
    """Load a converted file with pycocotools and with Detectron2; return the COCO object."""
    coco = COCO(str(json_file))
    dicts = load_coco_json(str(json_file), str(image_root))
    assert len(dicts) == len(coco.getImgIds())
    for record in dicts:
        assert Path(record["file_name"]).is_file(), record["file_name"]
    return coco


def image_id_by_name(coco, file_name):
    matches = [i["id"] for i in coco.dataset["images"] if i["file_name"] == file_name]
    assert len(matches) == 1, f"{file_name} appears {len(matches)} times"
    return matches[0]


def decoded_instances(coco, image_id, category_id, iscrowd=0):
    """Boolean masks of an image's annotations of one category."""
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], catIds=[category_id], iscrowd=None))
    return [
        coco.annToMask(a).astype(bool) for a in anns if int(a.get("iscrowd", 0)) == iscrowd
    ]


def assert_instances_match_mask(coco, image_id, category_id, source_mask):
    """Union of decoded instances == source mask, and instance count == 8-connected components
    counted by scipy (independent of the converter's OpenCV path)."""
    masks = decoded_instances(coco, image_id, category_id)
    union = np.zeros(source_mask.shape, bool)
    for m in masks:
        assert not (union & m).any(), "instances overlap"
        union |= m
    assert np.array_equal(union, source_mask.astype(bool))
    _, expected = ndimage.label(source_mask, structure=EIGHT_CONNECTED)
    assert len(masks) == expected


def read_json(path):
    with open(path) as f:
        return json.load(f)


def rle_area(segmentation, height, width):
    if isinstance(segmentation, list):
        segmentation = mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    return int(mask_util.area(segmentation))
