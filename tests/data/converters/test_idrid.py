"""Tests for the IDRiD converter on tiny fixtures written in the published layout: folder names
with their dots and spaces, RGB-red and grey-76 TIFF masks, a missing SE mask, CSV headers with
trailing spaces, trailing empty columns and rows, and a Thumbs.db among the images."""
import argparse
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from dataset_checks import (
    EIGHT_CONNECTED,
    assert_instances_match_mask,
    decoded_instances,
    image_id_by_name,
    load_checked,
    random_lesion_mask,
    read_json,
    write_image,
    write_mask,
)
from retina_d2.data.converters import get_converter, idrid
from retina_d2.data.converters.base import ConversionError, ConvertOptions
from retina_d2.data.instances import Dilation
from retina_d2.data.lesions import lesion

HEIGHT, WIDTH = 40, 60
SEG = "A. Segmentation"
GRADING = "B. Disease Grading"
LOCALIZATION = "C. Localization"
IMAGES = "1. Original Images"
SEG_TRUTH = "2. All Segmentation Groundtruths"
TRUTH = "2. Groundtruths"
TRAIN, TEST = "a. Training Set", "b. Testing Set"
LESION_FOLDERS = {
    "microaneurysm": "1. Microaneurysms",
    "haemorrhage": "2. Haemorrhages",
    "hard exudate": "3. Hard Exudates",
    "soft exudate": "4. Soft Exudates",
    "optic disc": "5. Optic Disc",
}
SEG_IMAGES = {"train": ("IDRiD_01", "IDRiD_02"), "test": ("IDRiD_55",)}
SPLIT_FOLDERS = {"train": TRAIN, "test": TEST}
# IDRiD_02 has no soft exudate: the dataset then has no SE file at all.
ABSENT = {("IDRiD_02", "soft exudate")}

GRADE_CSV = {
    "train": "a. IDRiD_Disease Grading_Training Labels.csv",
    "test": "b. IDRiD_Disease Grading_Testing Labels.csv",
}
OD_CSV = {
    "train": "a. IDRiD_OD_Center_Training Set_Markups.csv",
    "test": "b. IDRiD_OD_Center_Testing Set_Markups.csv",
}
FOVEA_CSV = {
    "train": "a. IDRiD_Fovea_Center_Training Set_Markups.csv",
    "test": "b. IDRiD_Fovea_Center_Testing Set_Markups.csv",
}
GRADING_IMAGES = {"train": ("IDRiD_001", "IDRiD_002", "IDRiD_003"), "test": ("IDRiD_001",)}
# (dr grade, dme grade); IDRiD_999 has a row but no image.
GRADES = {
    "train": {"IDRiD_001": (2, 1), "IDRiD_002": (0, 0), "IDRiD_003": (4, 2), "IDRiD_999": (1, 1)},
    "test": {"IDRiD_001": (3, 2)},
}
# IDRiD_002 has an optic disc row but no fovea row; IDRiD_003 has neither.
OD_CENTERS = {
    "train": {"IDRiD_001": (30.5, 20.0), "IDRiD_002": (12.0, 18.25)},
    "test": {"IDRiD_001": (40.0, 21.0)},
}
FOVEA_CENTERS = {"train": {"IDRiD_001": (18.0, 22.5)}, "test": {"IDRiD_001": (20.0, 19.0)}}
LANDMARKS = {"optic_disc_center": OD_CENTERS, "fovea_center": FOVEA_CENTERS}
# The published headers, stray spaces and trailing empty columns included.
GRADE_HEADER = "Image name,Retinopathy grade,Risk of macular edema ,,"
LANDMARK_HEADER = "Image No,X- Coordinate,Y - Coordinate,,,"


def _write_csv(path, lines):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The published CSVs come from Windows (CRLF) and carry empty columns and rows at the end.
    path.write_bytes("".join(line + "\r\n" for line in lines).encode())
    return path


def make_segmentation(root):
    """Part A; returns (split, stem, lesion) -> source mask for every mask file written."""
    sources = {}
    seed = 0
    for split, stems in SEG_IMAGES.items():
        image_dir = root / SEG / IMAGES / SPLIT_FOLDERS[split]
        for stem in stems:
            seed += 1
            write_image(image_dir / f"{stem}.jpg", HEIGHT, WIDTH, seed=seed)
            for name, folder in LESION_FOLDERS.items():
                if (stem, name) in ABSENT:
                    continue
                seed += 1
                mask = random_lesion_mask(HEIGHT, WIDTH, seed=seed)
                path = root / SEG / SEG_TRUTH / SPLIT_FOLDERS[split] / folder
                path = path / f"{stem}_{lesion(name).abbrev}.tif"
                # Both forms occur: RGB with the lesion in red, and the same saved as grey (76).
                if seed % 2:
                    write_mask(path, mask, value=255, rgb_red=True)
                else:
                    write_mask(path, mask, value=76)
                sources[(split, stem, name)] = mask
        (image_dir / "Thumbs.db").write_bytes(b"\x00" * 32)
    return sources


def make_grading(root, parts=(GRADING, LOCALIZATION)):
    """Parts B and/or C with their images and CSVs."""
    for part in parts:
        for split, stems in GRADING_IMAGES.items():
            image_dir = root / part / IMAGES / SPLIT_FOLDERS[split]
            for i, stem in enumerate(stems):
                write_image(image_dir / f"{stem}.jpg", HEIGHT, WIDTH, seed=50 + i)
    for split in SPLIT_FOLDERS:
        if GRADING in parts:
            rows = [f"{stem},{dr},{dme},," for stem, (dr, dme) in GRADES[split].items()]
            _write_csv(root / GRADING / TRUTH / GRADE_CSV[split], [GRADE_HEADER] + rows + [",,,,"])
        if LOCALIZATION in parts:
            for folder, names, centers in (
                ("1. Optic Disc Center Location", OD_CSV, OD_CENTERS),
                ("2. Fovea Center Location", FOVEA_CSV, FOVEA_CENTERS),
            ):
                rows = [f"{stem},{x},{y},,," for stem, (x, y) in centers[split].items()]
                _write_csv(
                    root / LOCALIZATION / TRUTH / folder / names[split],
                    [LANDMARK_HEADER] + rows + [",,,,,", ",,,,,"],
                )


def _options(**kwargs):
    return ConvertOptions(progress=False, **kwargs)


@pytest.fixture
def full_root(tmp_path):
    root = tmp_path / "IDRiD"
    sources = make_segmentation(root)
    make_grading(root)
    return root, sources


def _seg_name(split, stem):
    return f"{SEG}/{IMAGES}/{SPLIT_FOLDERS[split]}/{stem}.jpg"


def test_module_interface():
    assert get_converter("idrid") is idrid
    assert idrid.DATASET == "idrid"
    assert set(idrid.CATEGORIES) == set(LESION_FOLDERS)
    idrid.add_arguments(argparse.ArgumentParser())


def test_segmentation_instances_match_masks(full_root, tmp_path, caplog):
    root, sources = full_root
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        summary = idrid.convert(root, out, _options())
    assert "Thumbs.db" in caplog.text
    manifest = read_json(out / "retina_d2.json")
    assert manifest["tasks"] == {
        "seg": {"train": "train.json", "test": "test.json"},
        "grading": {"train": "grading/train.json", "test": "grading/test.json"},
    }
    # Dilation is off unless asked for.
    assert manifest["options"]["dilation"] == {}
    assert summary["skipped"] == []
    for split, stems in SEG_IMAGES.items():
        coco = load_checked(out / f"{split}.json", root)
        assert sorted(i["file_name"] for i in coco.dataset["images"]) == sorted(
            _seg_name(split, stem) for stem in stems
        )
        assert {c["name"] for c in coco.dataset["categories"]} == set(LESION_FOLDERS)
        for stem in stems:
            image_id = image_id_by_name(coco, _seg_name(split, stem))
            for name in LESION_FOLDERS:
                source = sources.get((split, stem, name), np.zeros((HEIGHT, WIDTH), bool))
                assert_instances_match_mask(coco, image_id, lesion(name).id, source)
    # The absent SE mask gives no instances and an empty semantic target, not an error.
    assert summary["tasks"]["seg"]["train"]["categories"]["soft exudate"]["images"] == 1
    coco = load_checked(out / "train.json", root)
    record = coco.imgs[image_id_by_name(coco, _seg_name("train", "IDRiD_02"))]
    se_target = np.asarray(Image.open(out / record["sem_seg_files"]["soft exudate"]))
    assert se_target.shape == (HEIGHT, WIDTH) and not se_target.any()


def test_dilation_keeps_count_and_contains_sources(full_root, tmp_path):
    root, sources = full_root
    out = tmp_path / "out"
    idrid.convert(root, out, _options(dilation={"microaneurysm": Dilation(3, 1)}))
    coco = load_checked(out / "train.json", root)
    category = lesion("microaneurysm").id
    for stem in SEG_IMAGES["train"]:
        source = sources[("train", stem, "microaneurysm")]
        image_id = image_id_by_name(coco, _seg_name("train", stem))
        instances = decoded_instances(coco, image_id, category)
        labels, count = ndimage.label(source, structure=EIGHT_CONNECTED)
        assert len(instances) == count
        for component in range(1, count + 1):
            piece = labels == component
            assert sum((m & piece).sum() == piece.sum() for m in instances) == 1
        assert sum(m.sum() for m in instances) > source.sum()


def test_grading_json_holds_grades_and_landmarks(full_root, tmp_path, caplog):
    root, _ = full_root
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        idrid.convert(root, out, _options())
    # A CSV row naming an image that does not exist is a warning, not an error.
    assert "IDRiD_999" in caplog.text
    for split, stems in GRADING_IMAGES.items():
        coco = load_checked(out / "grading" / f"{split}.json", root)
        assert coco.dataset["annotations"] == []
        records = {Path(i["file_name"]).stem: i for i in coco.dataset["images"]}
        assert sorted(records) == sorted(stems)
        for stem, record in records.items():
            assert record["file_name"] == f"{GRADING}/{IMAGES}/{SPLIT_FOLDERS[split]}/{stem}.jpg"
            assert (record["height"], record["width"]) == (HEIGHT, WIDTH)
            dr, dme = GRADES[split][stem]
            assert record["dr_grade"] == dr and isinstance(record["dr_grade"], int)
            assert record["dme_grade"] == dme and isinstance(record["dme_grade"], int)
            for field, centers in LANDMARKS.items():
                if stem in centers[split]:
                    assert record[field] == list(centers[split][stem])
                else:
                    # No row: the field is absent, never a made-up 0.
                    assert field not in record


def test_localization_only_takes_its_own_images(tmp_path):
    root = tmp_path / "IDRiD"
    make_grading(root, parts=(LOCALIZATION,))
    out = tmp_path / "out"
    idrid.convert(root, out, _options())
    assert set(read_json(out / "retina_d2.json")["tasks"]) == {"grading"}
    assert not (out / "train.json").exists()
    coco = load_checked(out / "grading" / "train.json", root)
    records = {Path(i["file_name"]).stem: i for i in coco.dataset["images"]}
    assert all(r["file_name"].startswith(f"{LOCALIZATION}/{IMAGES}/") for r in records.values())
    assert records["IDRiD_001"]["optic_disc_center"] == [30.5, 20.0]
    assert records["IDRiD_001"]["fovea_center"] == [18.0, 22.5]
    assert all("dr_grade" not in r and "dme_grade" not in r for r in records.values())


def test_segmentation_only(tmp_path):
    root = tmp_path / "IDRiD"
    make_segmentation(root)
    out = tmp_path / "out"
    idrid.convert(root, out, _options())
    assert set(read_json(out / "retina_d2.json")["tasks"]) == {"seg"}
    assert not (out / "grading").exists()


def test_missing_root(tmp_path):
    missing = tmp_path / "no_such_idrid"
    with pytest.raises(ConversionError, match="no_such_idrid"):
        idrid.convert(missing, tmp_path / "out", _options())


def test_root_without_parts_lists_expected_folders(tmp_path):
    root = tmp_path / "IDRiD"
    (root / "Segmentation").mkdir(parents=True)
    with pytest.raises(ConversionError) as info:
        idrid.convert(root, tmp_path / "out", _options())
    for part in (SEG, GRADING, LOCALIZATION):
        assert part in str(info.value)
    assert str(root) in str(info.value)


def test_missing_grade_csv_is_named(full_root, tmp_path):
    root, _ = full_root
    csv_path = root / GRADING / TRUTH / GRADE_CSV["test"]
    csv_path.unlink()
    with pytest.raises(ConversionError, match="Testing Labels.csv"):
        idrid.convert(root, tmp_path / "out", _options())


@pytest.mark.parametrize("cell", ["two", "2.5", "7", ""])
def test_bad_grade_names_csv_and_row(full_root, tmp_path, cell):
    root, _ = full_root
    csv_path = root / GRADING / TRUTH / GRADE_CSV["train"]
    _write_csv(csv_path, [GRADE_HEADER, "IDRiD_001,2,1,,", f"IDRiD_002,{cell},0,,"])
    with pytest.raises(ConversionError) as info:
        idrid.convert(root, tmp_path / "out", _options())
    assert GRADE_CSV["train"] in str(info.value)
    assert "row 3" in str(info.value)


def test_bad_coordinate_names_csv_and_row(full_root, tmp_path):
    root, _ = full_root
    csv_path = root / LOCALIZATION / TRUTH / "2. Fovea Center Location" / FOVEA_CSV["train"]
    _write_csv(csv_path, [LANDMARK_HEADER, "IDRiD_001,12,abc,,,"])
    with pytest.raises(ConversionError) as info:
        idrid.convert(root, tmp_path / "out", _options())
    assert FOVEA_CSV["train"] in str(info.value) and "row 2" in str(info.value)


def _truncate_image(root):
    path = root / SEG / IMAGES / TRAIN / "IDRiD_02.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path.name


def _mask_of_wrong_size(root):
    path = root / SEG / SEG_TRUTH / TRAIN / "2. Haemorrhages" / "IDRiD_02_HE.tif"
    write_mask(path, random_lesion_mask(HEIGHT - 10, WIDTH, seed=7), rgb_red=True)
    return path.name


def _mask_with_unexpected_values(root):
    path = root / SEG / SEG_TRUTH / TRAIN / "3. Hard Exudates" / "IDRiD_02_EX.tif"
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
def test_bad_file_stops_the_run_naming_it(full_root, tmp_path, defect):
    root, _ = full_root
    bad_name = DEFECTS[defect](root)
    with pytest.raises(ConversionError, match=re.escape(bad_name)):
        idrid.convert(root, tmp_path / "out", _options())
    assert not (tmp_path / "out" / "retina_d2.json").exists()


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_skip_mode_skips_only_the_bad_image(full_root, tmp_path, defect):
    root, sources = full_root
    bad_name = DEFECTS[defect](root)
    out = tmp_path / "out"
    summary = idrid.convert(root, out, _options(on_error="skip"))
    assert len(summary["skipped"]) == 1
    skipped = summary["skipped"][0]
    assert Path(skipped["file"]).name == "IDRiD_02.jpg"
    assert bad_name in skipped["reason"]
    assert read_json(out / "summary.json")["skipped"] == summary["skipped"]
    train = load_checked(out / "train.json", root)
    assert [i["file_name"] for i in train.dataset["images"]] == [_seg_name("train", "IDRiD_01")]
    image_id = image_id_by_name(train, _seg_name("train", "IDRiD_01"))
    for name in LESION_FOLDERS:
        source = sources[("train", "IDRiD_01", name)]
        assert_instances_match_mask(train, image_id, lesion(name).id, source)
    test = load_checked(out / "test.json", root)
    assert len(test.dataset["images"]) == 1


def test_existing_output_is_refused_unless_overwrite(full_root, tmp_path):
    root, _ = full_root
    out = tmp_path / "out"
    idrid.convert(root, out, _options())
    with pytest.raises(ConversionError, match="overwrite"):
        idrid.convert(root, out, _options())
    summary = idrid.convert(root, out, _options(overwrite=True))
    assert summary["tasks"]["seg"]["train"]["images"] == 2
    load_checked(out / "train.json", root)


def test_validation_is_carved_from_training_never_from_test(full_root, tmp_path, caplog):
    """Checkpoints are selected on ``val``: it must hold training images only, and none twice."""
    root, _ = full_root
    split_file = tmp_path / "val.json"
    split_file.write_text('{"seg": ["IDRiD_02", "IDRiD_77"], "grading": ["IDRiD_003"]}')
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        idrid.convert(root, out, _options(), val_split=split_file)
    # IDRiD_77 is not in this copy's training set: named, not silently dropped.
    assert "IDRiD_77" in caplog.text
    assert read_json(out / "retina_d2.json")["tasks"]["seg"] == {
        "train": "train.json", "val": "val.json", "test": "test.json"
    }
    stems = {
        split: sorted(Path(i["file_name"]).stem for i in read_json(out / f"{split}.json")["images"])
        for split in ("train", "val", "test")
    }
    assert stems == {"train": ["IDRiD_01"], "val": ["IDRiD_02"], "test": ["IDRiD_55"]}
    grading = {
        split: sorted(Path(i["file_name"]).stem for i in read_json(out / "grading" / f"{split}.json")["images"])
        for split in ("train", "val", "test")
    }
    assert grading == {"train": ["IDRiD_001", "IDRiD_002"], "val": ["IDRiD_003"], "test": ["IDRiD_001"]}
    # The carved image keeps its training-set path and labels.
    val_record = read_json(out / "grading" / "val.json")["images"][0]
    assert val_record["file_name"].startswith(f"{GRADING}/{IMAGES}/{TRAIN}/")
    assert val_record["dr_grade"] == GRADES["train"]["IDRiD_003"][0]


def test_val_split_none_keeps_the_official_splits(full_root, tmp_path):
    root, _ = full_root
    out = tmp_path / "out"
    idrid.convert(root, out, _options(), val_split=None)
    assert set(read_json(out / "retina_d2.json")["tasks"]["seg"]) == {"train", "test"}


def test_committed_val_split_is_training_images_only():
    doc = idrid.read_val_split(idrid.DEFAULT_VAL_SPLIT)
    # IDRiD's training sets: segmentation IDRiD_01..54, grading IDRiD_001..413.
    assert doc["seg"] and all(1 <= int(n.split("_")[1]) <= 54 for n in doc["seg"])
    assert doc["grading"] and all(1 <= int(n.split("_")[1]) <= 413 for n in doc["grading"])
    assert len(set(doc["seg"])) == len(doc["seg"]) and len(set(doc["grading"])) == len(doc["grading"])


@pytest.mark.parametrize("text", ["[1, 2]", '{"segmentation": []}', '{"seg": [5]}', "{oops"])
def test_bad_val_split_names_the_file(full_root, tmp_path, text):
    root, _ = full_root
    split_file = tmp_path / "bad_val.json"
    split_file.write_text(text)
    with pytest.raises(ConversionError, match="bad_val.json"):
        idrid.convert(root, tmp_path / "out", _options(), val_split=split_file)


def test_convert_tool_takes_val_split_none(full_root, tmp_path):
    root, _ = full_root
    out = tmp_path / "out"
    tool = Path(__file__).resolve().parents[3] / "tools" / "convert_dataset.py"
    done = subprocess.run(
        [sys.executable, str(tool), "idrid", "--root", str(root), "--out", str(out), "--val-split", "none"],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert set(read_json(out / "retina_d2.json")["tasks"]["seg"]) == {"train", "test"}
