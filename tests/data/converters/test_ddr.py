"""Tests for the DDR converter on tiny fixtures written in the published layout: the valid split's
"segmentation label" folder, all four masks per image (all-zero where a lesion is absent), and a
Thumbs.db among the images."""
import argparse
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset_checks import (
    assert_instances_match_mask,
    image_id_by_name,
    load_checked,
    random_lesion_mask,
    read_json,
    write_image,
    write_mask,
)
from retina_d2.data.converters import ddr, get_converter
from retina_d2.data.converters.base import ConversionError, ConvertOptions
from retina_d2.data.lesions import lesion

HEIGHT, WIDTH = 40, 60
ABBREVS = {"EX": "hard exudate", "HE": "haemorrhage", "MA": "microaneurysm", "SE": "soft exudate"}
IMAGES = {
    "train": ("007-1774-100", "007-1789-100"),
    "valid": ("007-2860-200",),
    "test": ("007-3711-200",),
}
LABEL_FOLDERS = {"train": "label", "valid": "segmentation label", "test": "label"}
# Lesions each image lacks: their masks are published all-zero.
ABSENT = {("007-1789-100", "SE"), ("007-2860-200", "HE"), ("007-2860-200", "SE")}


def make_ddr(parent):
    """DDR-dataset/lesion_segmentation under ``parent``; returns (split, stem, abbrev) -> mask."""
    root = parent / "DDR-dataset" / "lesion_segmentation"
    sources = {}
    seed = 0
    for split, stems in IMAGES.items():
        for stem in stems:
            seed += 1
            write_image(root / split / "image" / f"{stem}.jpg", HEIGHT, WIDTH, seed=seed)
            for abbrev in ABBREVS:
                seed += 1
                mask = random_lesion_mask(HEIGHT, WIDTH, seed=seed)
                if (stem, abbrev) in ABSENT:
                    mask = np.zeros_like(mask)
                write_mask(root / split / LABEL_FOLDERS[split] / abbrev / f"{stem}.tif", mask)
                sources[(split, stem, abbrev)] = mask
    (root / "train" / "image" / "Thumbs.db").write_bytes(b"\x00" * 32)
    return sources


def _options(**kwargs):
    return ConvertOptions(progress=False, **kwargs)


@pytest.fixture
def ddr_parent(tmp_path):
    parent = tmp_path / "raw"
    return parent, make_ddr(parent)


def _lesion_segmentation(parent):
    return parent / "DDR-dataset" / "lesion_segmentation"


def test_module_interface():
    assert get_converter("ddr") is ddr
    assert ddr.DATASET == "ddr"
    assert set(ddr.CATEGORIES) == set(ABBREVS.values())
    ddr.add_arguments(argparse.ArgumentParser())


@pytest.mark.parametrize("level", ["parent", "DDR-dataset", "lesion_segmentation"])
def test_instances_match_masks_from_any_root_level(ddr_parent, tmp_path, caplog, level):
    parent, sources = ddr_parent
    root = {
        "parent": parent,
        "DDR-dataset": parent / "DDR-dataset",
        "lesion_segmentation": _lesion_segmentation(parent),
    }[level]
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        summary = ddr.convert(root, out, _options())
    assert "Thumbs.db" in caplog.text
    assert summary["skipped"] == []
    manifest = read_json(out / "retina_d2.json")
    assert manifest["tasks"] == {
        "seg": {"train": "train.json", "valid": "valid.json", "test": "test.json"}
    }
    assert manifest["options"]["dilation"] == {}
    image_root = Path(manifest["image_root"])
    assert image_root == _lesion_segmentation(parent).resolve()
    for split, stems in IMAGES.items():
        coco = load_checked(out / f"{split}.json", image_root)
        assert {c["name"] for c in coco.dataset["categories"]} == set(ABBREVS.values())
        assert sorted(i["file_name"] for i in coco.dataset["images"]) == sorted(
            f"{split}/image/{stem}.jpg" for stem in stems
        )
        for stem in stems:
            image_id = image_id_by_name(coco, f"{split}/image/{stem}.jpg")
            for abbrev, name in ABBREVS.items():
                source = sources[(split, stem, abbrev)]
                assert_instances_match_mask(coco, image_id, lesion(name).id, source)
    assert summary["tasks"]["seg"]["valid"]["categories"]["haemorrhage"]["instances"] == 0


def test_either_label_folder_spelling_in_any_split(ddr_parent, tmp_path):
    parent, _ = ddr_parent
    train = _lesion_segmentation(parent) / "train"
    (train / "label").rename(train / "segmentation label")
    valid = _lesion_segmentation(parent) / "valid"
    (valid / "segmentation label").rename(valid / "label")
    summary = ddr.convert(parent, tmp_path / "out", _options())
    assert summary["tasks"]["seg"]["train"]["images"] == 2
    assert summary["tasks"]["seg"]["valid"]["images"] == 1


def test_both_label_folder_spellings_are_ambiguous(ddr_parent, tmp_path):
    parent, _ = ddr_parent
    train = _lesion_segmentation(parent) / "train"
    shutil.copytree(train / "label", train / "segmentation label")
    with pytest.raises(ConversionError) as info:
        ddr.convert(parent, tmp_path / "out", _options())
    assert str(train / "label") in str(info.value)
    assert str(train / "segmentation label") in str(info.value)


def test_missing_label_folder_is_named(ddr_parent, tmp_path):
    parent, _ = ddr_parent
    test = _lesion_segmentation(parent) / "test"
    shutil.rmtree(test / "label")
    with pytest.raises(ConversionError, match=re.escape(str(test / "label"))):
        ddr.convert(parent, tmp_path / "out", _options())


def _se_mask(parent, stem="007-1789-100"):
    return _lesion_segmentation(parent) / "train" / "label" / "SE" / f"{stem}.tif"


def test_missing_mask_file_names_the_expected_path(ddr_parent, tmp_path):
    parent, _ = ddr_parent
    expected = _se_mask(parent)
    expected.unlink()
    with pytest.raises(ConversionError) as info:
        ddr.convert(parent, tmp_path / "out", _options())
    assert str(expected) in str(info.value) and "missing" in str(info.value)
    # Found while listing the dataset, before anything was written.
    assert not (tmp_path / "out").exists()


def test_missing_mask_file_skips_its_image(ddr_parent, tmp_path):
    parent, sources = ddr_parent
    _se_mask(parent).unlink()
    out = tmp_path / "out"
    summary = ddr.convert(parent, out, _options(on_error="skip"))
    assert [Path(s["file"]).name for s in summary["skipped"]] == ["007-1789-100.jpg"]
    assert _se_mask(parent).name in summary["skipped"][0]["reason"]
    coco = load_checked(out / "train.json", _lesion_segmentation(parent))
    assert [i["file_name"] for i in coco.dataset["images"]] == ["train/image/007-1774-100.jpg"]


@pytest.mark.parametrize("how", ["folder missing", "no masks in folder"])
def test_lesion_missing_for_whole_split_is_a_layout_error(ddr_parent, tmp_path, how):
    parent, _ = ddr_parent
    folder = _lesion_segmentation(parent) / "valid" / "segmentation label" / "MA"
    shutil.rmtree(folder)
    if how == "no masks in folder":
        folder.mkdir()
    with pytest.raises(ConversionError) as info:
        ddr.convert(parent, tmp_path / "out", _options())
    # One error for the folder, not one per image's mask file.
    assert str(folder) in str(info.value) and ".tif" not in str(info.value)


def test_missing_split_folder_is_named(ddr_parent, tmp_path):
    parent, _ = ddr_parent
    shutil.rmtree(_lesion_segmentation(parent) / "valid")
    with pytest.raises(ConversionError, match="valid"):
        ddr.convert(parent, tmp_path / "out", _options())


def test_missing_root(tmp_path):
    with pytest.raises(ConversionError, match="no_such_ddr"):
        ddr.convert(tmp_path / "no_such_ddr", tmp_path / "out", _options())


def test_folder_without_ddr_layout(tmp_path):
    root = tmp_path / "downloads"
    (root / "DDR-dataset" / "DR_grading").mkdir(parents=True)
    with pytest.raises(ConversionError) as info:
        ddr.convert(root, tmp_path / "out", _options())
    assert str(root / "DDR-dataset" / "lesion_segmentation") in str(info.value)


def _truncate_image(parent):
    path = _lesion_segmentation(parent) / "train" / "image" / "007-1789-100.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path.name


def _mask_of_wrong_size(parent):
    path = _lesion_segmentation(parent) / "train" / "label" / "HE" / "007-1789-100.tif"
    write_mask(path, random_lesion_mask(HEIGHT, WIDTH + 8, seed=3))
    return path.name


def _mask_with_unexpected_values(parent):
    path = _lesion_segmentation(parent) / "train" / "label" / "EX" / "007-1789-100.tif"
    values = np.zeros((HEIGHT, WIDTH), np.uint8)
    values[5:10, 5:10] = 100
    values[20:25, 30:35] = 200
    Image.fromarray(values).save(path, format="TIFF")
    return path.name


DEFECTS = {
    "truncated jpeg": _truncate_image,
    "mask size": _mask_of_wrong_size,
    "mask values": _mask_with_unexpected_values,
}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_bad_file_stops_the_run_naming_it(ddr_parent, tmp_path, defect):
    parent, _ = ddr_parent
    bad_name = DEFECTS[defect](parent)
    with pytest.raises(ConversionError, match=re.escape(bad_name)):
        ddr.convert(parent, tmp_path / "out", _options())


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_skip_mode_skips_only_the_bad_image(ddr_parent, tmp_path, defect):
    parent, sources = ddr_parent
    bad_name = DEFECTS[defect](parent)
    out = tmp_path / "out"
    summary = ddr.convert(parent, out, _options(on_error="skip"))
    assert len(summary["skipped"]) == 1
    assert Path(summary["skipped"][0]["file"]).name == "007-1789-100.jpg"
    assert bad_name in summary["skipped"][0]["reason"]
    image_root = _lesion_segmentation(parent)
    train = load_checked(out / "train.json", image_root)
    assert [i["file_name"] for i in train.dataset["images"]] == ["train/image/007-1774-100.jpg"]
    image_id = image_id_by_name(train, "train/image/007-1774-100.jpg")
    for abbrev, name in ABBREVS.items():
        source = sources[("train", "007-1774-100", abbrev)]
        assert_instances_match_mask(train, image_id, lesion(name).id, source)
    for split in ("valid", "test"):
        assert len(load_checked(out / f"{split}.json", image_root).dataset["images"]) == 1


def test_existing_output_is_refused_unless_overwrite(ddr_parent, tmp_path):
    parent, _ = ddr_parent
    out = tmp_path / "out"
    ddr.convert(parent, out, _options())
    with pytest.raises(ConversionError, match="overwrite"):
        ddr.convert(parent, out, _options())
    summary = ddr.convert(parent, out, _options(overwrite=True))
    assert summary["tasks"]["seg"]["train"]["images"] == 2
