"""``--polygons`` end to end: a converted dataset whose annotations are polygons where they are
exact and RLE elsewhere holds every lesion pixel for pixel, as the RLE conversion does."""
import json

import numpy as np
import pytest
from PIL import Image

from dataset_checks import assert_instances_match_mask, load_checked, rle_area
from retina_d2.data.converters import ConvertOptions, synthetic
from retina_d2.data.instances import decode_segmentation
from retina_d2.data.lesions import lesion


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("polygons")
    out = {}
    for fmt in ("rle", "polygon"):
        options = ConvertOptions(progress=False, semantic=False, segmentation_format=fmt)
        synthetic.convert(None, root / fmt, options, count=4, size=192, seed=5)
        out[fmt] = root / fmt
    return out


def test_polygon_conversion_stores_the_same_lesions_as_rle(converted):
    rle_coco = json.loads((converted["rle"] / "train.json").read_text())
    poly_coco = json.loads((converted["polygon"] / "train.json").read_text())
    sizes = {i["id"]: (i["height"], i["width"]) for i in poly_coco["images"]}
    assert len(poly_coco["annotations"]) == len(rle_coco["annotations"]) > 10
    kinds = set()
    for by_rle, by_polygon in zip(rle_coco["annotations"], poly_coco["annotations"]):
        height, width = sizes[by_polygon["image_id"]]
        stored = by_polygon["segmentation"]
        kinds.add(type(stored))
        np.testing.assert_array_equal(
            decode_segmentation(stored, height, width),
            decode_segmentation(by_rle["segmentation"], height, width),
        )
        assert by_polygon["area"] == rle_area(stored, height, width) == by_rle["area"]
        assert by_polygon["bbox"] == by_rle["bbox"]
    assert list in kinds, "no lesion was stored as polygons"


def test_polygon_conversion_reproduces_the_source_masks(converted):
    out = converted["polygon"]
    coco = load_checked(out / "train.json", out / "raw")
    for image in coco.dataset["images"]:
        stem = image["file_name"].split("/")[-1][:-4]
        for cat in coco.dataset["categories"]:
            mask_file = out / "raw" / "masks" / lesion(cat["name"]).abbrev / f"{stem}.png"
            source = np.asarray(Image.open(mask_file)) > 0
            assert_instances_match_mask(coco, image["id"], cat["id"], source)
