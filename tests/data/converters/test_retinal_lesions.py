"""Tests for the Retinal-Lesions converter on tiny fixtures in the published layout: 255 lesion and
127 ignore pixels, missing lesion files, an image without a lesion folder, split files and
dr_grades.csv; and a COCOeval run showing that ignore regions neither reward nor punish."""
import copy
import logging

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dataset_checks import (
    assert_instances_match_mask,
    decoded_instances,
    image_id_by_name,
    load_checked,
    random_lesion_mask,
    read_json,
    write_image,
)
from retina_d2.data.converters import retinal_lesions
from retina_d2.data.converters.base import ConversionError, ConvertOptions
from retina_d2.data.instances import encode_rle
from retina_d2.data.lesions import lesion

H, W = 40, 60
FOLDER = "retinal-lesions-v20191227"
ALL_LESION_FILES = tuple(retinal_lesions.LESION_FILES)


def _lesion_values(seed, ignore=True, positive=True):
    """A mask of 255 lesions and (optionally) 127 ignore regions, some touching each other."""
    values = np.zeros((H, W), np.uint8)
    if ignore:
        values[random_lesion_mask(H, W, seed=seed + 100, count=4)] = 127
    if positive:
        values[random_lesion_mask(H, W, seed=seed, count=6)] = 255
    return values


def _write_values(path, values):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values).save(path, format="PNG")


def make_retinal_lesions(root, splits=True, grades=True):
    """Write a tiny Retinal-Lesions under ``root/retinal-lesions-v20191227``.

    Returns:
        image id -> lesion file stem -> mask values (absent lesions are left out).
    """
    base = root / FOLDER
    layout = {
        # Ignore regions beside lesions; hard exudates only as an ignore region.
        "10_left": {
            "microaneurysm": _lesion_values(1),
            "retinal_hemorrhage": _lesion_values(2, ignore=False),
            "hard_exudate": _lesion_values(3, positive=False),
        },
        # Most lesion files missing.
        "10_right": {
            "cotton_wool_spots": _lesion_values(4),
            "neovascularization": _lesion_values(5),
        },
        # No folder at all.
        "22_left": None,
        "35_right": {name: _lesion_values(10 + i) for i, name in enumerate(ALL_LESION_FILES)},
    }
    truth = {}
    for seed, (image_id, masks) in enumerate(layout.items()):
        write_image(base / f"images_896x896/{image_id}.jpg", H, W, seed=seed)
        truth[image_id] = masks or {}
        for name, values in (masks or {}).items():
            _write_values(base / f"lesion_segs_896x896/{image_id}/{name}.png", values)
    (base / "lesion_segs_896x896/10_right/Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    if splits:
        (base / "train.txt").write_text("10_left\n10_right.jpg\n")
        (base / "val.txt").write_text("22_left\n99_right\n\n")
        (base / "test.txt").write_text("35_right\n")
    if grades:
        (base / "dr_grades.csv").write_text(
            "Image ID,meta DR grade\n10_left.jpg,2\n10_right.jpg,0\n22_left.jpg,4\n35_right.jpg,3\n"
        )
    return truth


def _options(**kwargs):
    return ConvertOptions(progress=False, **kwargs)


def _load_all(out):
    manifest = read_json(out / "retina_d2.json")
    return manifest, {
        split: load_checked(out / rel, manifest["image_root"])
        for split, rel in manifest["tasks"]["seg"].items()
    }


def _coco_of(cocos, image_id):
    for coco in cocos.values():
        matches = [i for i in coco.dataset["images"] if i["file_name"].endswith(f"/{image_id}.jpg")]
        if matches:
            return coco, matches[0]
    raise AssertionError(f"{image_id} not converted")


def test_layout_splits_and_grades(tmp_path, caplog):
    make_retinal_lesions(tmp_path / "raw")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        summary = retinal_lesions.convert(tmp_path / "raw", out, _options())

    manifest, cocos = _load_all(out)
    assert manifest["image_root"] == str((tmp_path / "raw" / FOLDER).resolve())
    splits = {"train": "train.json", "val": "val.json", "test": "test.json"}
    assert manifest["tasks"]["seg"] == splits
    names = {split: [i["file_name"] for i in c.dataset["images"]] for split, c in cocos.items()}
    assert names == {
        "train": ["images_896x896/10_left.jpg", "images_896x896/10_right.jpg"],
        "val": ["images_896x896/22_left.jpg"],
        "test": ["images_896x896/35_right.jpg"],
    }
    assert "99_right" in caplog.text  # listed in val.txt, no image
    assert "Thumbs.db" in caplog.text
    grades = {i["file_name"]: i["dr_grade"] for c in cocos.values() for i in c.dataset["images"]}
    assert grades == {
        "images_896x896/10_left.jpg": 2,
        "images_896x896/10_right.jpg": 0,
        "images_896x896/22_left.jpg": 4,
        "images_896x896/35_right.jpg": 3,
    }
    assert all(type(g) is int for g in grades.values())
    every_id = sorted(lesion(n).id for n in retinal_lesions.CATEGORIES)
    for coco in cocos.values():
        assert [c["id"] for c in coco.dataset["categories"]] == every_id
        assert all(i["annotated_category_ids"] == every_id for i in coco.dataset["images"])
    assert cocos["val"].dataset["annotations"] == []  # no lesion folder: all absent
    assert summary["skipped"] == []
    hard_exudate = summary["tasks"]["seg"]["train"]["categories"]["hard exudate"]
    assert hard_exudate["instances"] == 0 and hard_exudate["ignore_regions"] > 0


def test_ignore_regions_are_crowd_annotations(tmp_path):
    truth = make_retinal_lesions(tmp_path / "raw")
    out = tmp_path / "out"
    retinal_lesions.convert(tmp_path / "raw" / FOLDER, out, _options())
    _, cocos = _load_all(out)
    checked_ignore = 0
    for image_id, masks in truth.items():
        coco, record = _coco_of(cocos, image_id)
        for file_stem, name in retinal_lesions.LESION_FILES.items():
            values = masks.get(file_stem, np.zeros((H, W), np.uint8))
            category_id = lesion(name).id
            assert_instances_match_mask(coco, record["id"], category_id, values == 255)
            for instance in decoded_instances(coco, record["id"], category_id):
                assert not (instance & (values == 127)).any()
            crowd = decoded_instances(coco, record["id"], category_id, iscrowd=1)
            union = np.zeros((H, W), bool)
            for region in crowd:
                assert not (union & region).any()
                union |= region
            np.testing.assert_array_equal(union, values == 127)
            checked_ignore += bool(crowd)
            semantic = np.asarray(Image.open(out / record["sem_seg_files"][name]))
            expected = np.select([values == 255, values == 127], [1, 255], 0).astype(np.uint8)
            np.testing.assert_array_equal(semantic, expected)
    assert checked_ignore >= 10


def _ap50(gt: COCO, image_id, category_id, detections):
    evaluator = COCOeval(gt, gt.loadRes(detections), iouType="segm")
    evaluator.params.imgIds = [image_id]
    evaluator.params.catIds = [category_id]
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats[1]


def test_cocoeval_ignores_detections_on_ignore_regions(tmp_path):
    base = tmp_path / "raw" / FOLDER
    write_image(base / "images_896x896/7_left.jpg", H, W)
    values = np.zeros((H, W), np.uint8)
    values[5:15, 5:15] = 255  # the lesion
    values[22:34, 35:50] = 127  # the region graders excluded
    _write_values(base / "lesion_segs_896x896/7_left/microaneurysm.png", values)
    retinal_lesions.convert(base, tmp_path / "out", _options())

    gt = load_checked(tmp_path / "out/all.json", base)
    image_id = image_id_by_name(gt, "images_896x896/7_left.jpg")
    category_id = lesion("microaneurysm").id
    assert len(decoded_instances(gt, image_id, category_id, iscrowd=1)) == 1
    detections = [
        # The detection on the ignore region scores highest: counted as a FP it would come first.
        {"image_id": image_id, "category_id": category_id, "segmentation": encode_rle(values == v),
         "score": score}
        for v, score in ((255, 0.9), (127, 0.95))
    ]
    assert _ap50(gt, image_id, category_id, copy.deepcopy(detections)) == pytest.approx(1.0)

    without_crowd = copy.deepcopy(gt.dataset)
    without_crowd["annotations"] = [a for a in without_crowd["annotations"] if not a["iscrowd"]]
    plain = COCO()
    plain.dataset = without_crowd
    plain.createIndex()
    assert _ap50(plain, image_id, category_id, copy.deepcopy(detections)) < 0.6


def test_no_split_files_and_no_grades(tmp_path):
    make_retinal_lesions(tmp_path / "raw", splits=False, grades=False)
    out = tmp_path / "out"
    retinal_lesions.convert(tmp_path / "raw", out, _options())
    manifest, cocos = _load_all(out)
    assert manifest["tasks"]["seg"] == {"all": "all.json"}
    assert len(cocos["all"].dataset["images"]) == 4
    assert all("dr_grade" not in i for i in cocos["all"].dataset["images"])


def test_read_dr_grades_headers(tmp_path):
    path = tmp_path / "dr_grades.csv"
    path.write_text("image,dme_grade,DR_Grade\n3_left.jpg,1,4\n4_right,0,1.0\n")
    assert retinal_lesions.read_dr_grades(path) == {"3_left": 4, "4_right": 1}
    path.write_text("name,level\n3_left.jpg,1\n")
    with pytest.raises(ConversionError, match="dr_grades.csv"):
        retinal_lesions.read_dr_grades(path)
    path.write_text("image_id,grade\n3_left.jpg,severe\n")
    with pytest.raises(ConversionError, match="dr_grades.csv, line 2"):
        retinal_lesions.read_dr_grades(path)


def test_bad_grades_file_stops_the_run(tmp_path):
    make_retinal_lesions(tmp_path / "raw")
    (tmp_path / "raw" / FOLDER / "dr_grades.csv").write_text("file;level\n10_left;2\n")
    with pytest.raises(ConversionError, match="dr_grades.csv"):
        retinal_lesions.convert(tmp_path / "raw", tmp_path / "out", _options())


def test_id_in_two_split_files(tmp_path):
    make_retinal_lesions(tmp_path / "raw")
    (tmp_path / "raw" / FOLDER / "test.txt").write_text("35_right\n10_left.jpg\n")
    with pytest.raises(ConversionError, match="10_left") as err:
        retinal_lesions.convert(tmp_path / "raw", tmp_path / "out", _options())
    assert "train.txt" in str(err.value) and "test.txt" in str(err.value)


# ---------------------------------------------------------------- bad layouts and files


def test_missing_root(tmp_path):
    with pytest.raises(ConversionError, match="no_such_folder"):
        retinal_lesions.convert(tmp_path / "no_such_folder", tmp_path / "out", _options())


def test_wrong_layout_names_expected_folder(tmp_path):
    (tmp_path / "raw" / FOLDER / "images").mkdir(parents=True)
    with pytest.raises(ConversionError) as err:
        retinal_lesions.convert(tmp_path / "raw", tmp_path / "out", _options())
    assert "images_896x896" in str(err.value) and FOLDER in str(err.value)


def test_missing_lesion_folder(tmp_path):
    make_retinal_lesions(tmp_path / "raw")
    (tmp_path / "raw" / FOLDER / "lesion_segs_896x896").rename(tmp_path / "raw" / FOLDER / "segs")
    with pytest.raises(ConversionError, match="lesion_segs_896x896"):
        retinal_lesions.convert(tmp_path / "raw", tmp_path / "out", _options())


def test_mask_size_mismatch(tmp_path):
    make_retinal_lesions(tmp_path / "raw")
    bad = tmp_path / "raw" / FOLDER / "lesion_segs_896x896/10_right/neovascularization.png"
    _write_values(bad, np.full((H, W + 4), 255, np.uint8))
    with pytest.raises(ConversionError, match="neovascularization.png"):
        retinal_lesions.convert(tmp_path / "raw", tmp_path / "stopped", _options())

    summary = retinal_lesions.convert(tmp_path / "raw", tmp_path / "out", _options(on_error="skip"))
    assert [s["file"].rsplit("/", 1)[-1] for s in summary["skipped"]] == ["10_right.jpg"]
    assert "neovascularization.png" in summary["skipped"][0]["reason"]
    _, cocos = _load_all(tmp_path / "out")
    assert [i["file_name"] for i in cocos["train"].dataset["images"]] == [
        "images_896x896/10_left.jpg"
    ]


def test_unexpected_mask_values(tmp_path):
    make_retinal_lesions(tmp_path / "raw")
    bad = tmp_path / "raw" / FOLDER / "lesion_segs_896x896/35_right/fibrous_proliferation.png"
    values = np.zeros((H, W), np.uint8)
    values[2:6, 2:6] = 60
    values[20:30, 20:30] = 255
    _write_values(bad, values)
    with pytest.raises(ConversionError, match="fibrous_proliferation.png"):
        retinal_lesions.convert(tmp_path / "raw", tmp_path / "stopped", _options())
    assert not (tmp_path / "stopped/retina_d2.json").exists()

    out = tmp_path / "out"
    summary = retinal_lesions.convert(tmp_path / "raw", out, _options(on_error="skip"))
    assert [s["file"].rsplit("/", 1)[-1] for s in summary["skipped"]] == ["35_right.jpg"]
    assert read_json(out / "summary.json")["skipped"] == summary["skipped"]
    _, cocos = _load_all(out)
    assert cocos["test"].dataset["images"] == []
    assert len(cocos["train"].dataset["images"]) == 2
