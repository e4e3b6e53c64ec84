"""Tests for the e-ophtha converter on tiny fixtures in the published layout: e_optha_EX and
e_optha_MA with patient folders, .jpg/.JPG images, ``Thumbs.db``, annotations named with and
without the lesion suffix, healthy images, the microaneurysm dilation preset, equal file names in
different patient folders, and split files."""
import argparse
import json
import logging

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
from retina_d2.data.converters import eophtha
from retina_d2.data.converters.base import ConversionError, ConvertOptions
from retina_d2.data.instances import EOPHTHA_MA_DILATION, Dilation
from retina_d2.data.lesions import lesion

H, W = 40, 60
EX_ID = lesion("hard exudate").id
MA_ID = lesion("microaneurysm").id
# Two microaneurysms with a 2-pixel gap: a 5x5 dilation makes them touch.
CLOSE_PAIR = ((20, 30), (20, 33))


def _ma_mask(seed):
    """Single-pixel and small microaneurysms, plus the close pair."""
    mask = random_lesion_mask(H, W, seed=seed, count=4, max_radius=2)
    mask[14:27, 26:38] = False
    for y, x in CLOSE_PAIR:
        mask[y, x] = True
    return mask


def _write_thumbs_db(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0 not an image")


def make_eophtha(root, subsets=("EX", "MA")):
    """Write a tiny e-ophtha in the published layout under ``root``.

    Returns:
        file_name (relative to root) -> (lesion name, source mask or None for healthy images).
    """
    truth = {}
    if "EX" in subsets:
        ex = root / "e_optha_EX"
        # Published suffix form, lower-case image extension.
        write_image(ex / "EX/E0000404/C0001885.jpg", H, W, seed=1)
        mask = random_lesion_mask(H, W, seed=1, count=5)
        write_mask(ex / "Annotation_EX/E0000404/C0001885_EX.png", mask)
        truth["e_optha_EX/EX/E0000404/C0001885.jpg"] = ("hard exudate", mask)
        # Upper-case .JPG, annotation without the suffix.
        write_image(ex / "EX/E0000404/C0001886.JPG", H, W, seed=2)
        mask = random_lesion_mask(H, W, seed=2, count=7)
        write_mask(ex / "Annotation_EX/E0000404/C0001886.png", mask)
        truth["e_optha_EX/EX/E0000404/C0001886.JPG"] = ("hard exudate", mask)
        _write_thumbs_db(ex / "EX/E0000404")
        # .jpeg image, upper-case .PNG annotation.
        write_image(ex / "EX/E0012345/DS000ABC.jpeg", H, W, seed=3)
        mask = random_lesion_mask(H, W, seed=3, count=3)
        write_mask(ex / "Annotation_EX/E0012345/DS000ABC_EX.PNG", mask)
        truth["e_optha_EX/EX/E0012345/DS000ABC.jpeg"] = ("hard exudate", mask)
        write_image(ex / "healthy/E0000100/C0002000.jpg", H, W, seed=4)
        _write_thumbs_db(ex / "healthy/E0000100")
        truth["e_optha_EX/healthy/E0000100/C0002000.jpg"] = ("hard exudate", None)
    if "MA" in subsets:
        ma = root / "e_optha_MA"
        write_image(ma / "MA/E0000500/C0003000.JPG", H, W, seed=5)
        mask = _ma_mask(5)
        write_mask(ma / "Annotation_MA/E0000500/C0003000.png", mask)
        truth["e_optha_MA/MA/E0000500/C0003000.JPG"] = ("microaneurysm", mask)
        write_image(ma / "MA/E0000500/C0003001.jpg", H, W, seed=6)
        mask = _ma_mask(6)
        write_mask(ma / "Annotation_MA/E0000500/C0003001_MA.png", mask)
        truth["e_optha_MA/MA/E0000500/C0003001.jpg"] = ("microaneurysm", mask)
        _write_thumbs_db(ma / "MA/E0000500")
        write_image(ma / "healthy/E0000600/C0004000.JPG", H, W, seed=7)
        truth["e_optha_MA/healthy/E0000600/C0004000.JPG"] = ("microaneurysm", None)
    return truth


def _options(**kwargs):
    return ConvertOptions(progress=False, **kwargs)


def _semantic(out, coco, image_id, name):
    record = coco.loadImgs([image_id])[0]
    return np.asarray(Image.open(out / record["sem_seg_files"][name]))


def test_both_subsets_in_one_file(tmp_path, caplog):
    truth = make_eophtha(tmp_path / "raw")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        summary = eophtha.convert(tmp_path / "raw", out, _options(), ma_dilation=False)

    manifest = read_json(out / "retina_d2.json")
    assert manifest["tasks"] == {"seg": {"all": "all.json"}}
    assert manifest["options"]["dilation"] == {}
    coco = load_checked(out / "all.json", manifest["image_root"])
    assert {c["name"] for c in coco.dataset["categories"]} == {"hard exudate", "microaneurysm"}
    assert len(coco.dataset["images"]) == len(truth) == summary["tasks"]["seg"]["all"]["images"]
    assert summary["skipped"] == []
    thumbs = [r.getMessage() for r in caplog.records if "Thumbs.db" in r.getMessage()]
    assert len(thumbs) == 3

    for file_name, (name, mask) in truth.items():
        image_id = image_id_by_name(coco, file_name)
        other = MA_ID if name == "hard exudate" else EX_ID
        record = coco.loadImgs([image_id])[0]
        # Graded for one lesion type only: the other is neither annotated nor given a target.
        assert record["annotated_category_ids"] == [lesion(name).id]
        assert list(record["sem_seg_files"]) == [name]
        assert coco.getAnnIds(imgIds=[image_id], catIds=[other]) == []
        source = mask if mask is not None else np.zeros((H, W), bool)
        assert_instances_match_mask(coco, image_id, lesion(name).id, source)
        np.testing.assert_array_equal(_semantic(out, coco, image_id, name), source.astype(np.uint8))


@pytest.mark.parametrize("subset", ["EX", "MA"])
@pytest.mark.parametrize("root_is_subset", [False, True])
def test_single_subset(tmp_path, subset, root_is_subset):
    truth = make_eophtha(tmp_path / "raw")
    folder = eophtha.SUBSETS[subset].folder
    root = tmp_path / "raw" / folder if root_is_subset else tmp_path / "raw"
    out = tmp_path / "out"
    eophtha.convert(root, out, _options(), subset=subset)

    coco = load_checked(out / "all.json", read_json(out / "retina_d2.json")["image_root"])
    name = eophtha.SUBSETS[subset].lesion
    assert [c["name"] for c in coco.dataset["categories"]] == [name]
    expected = {f for f in truth if f.startswith(folder)}
    prefix = f"{folder}/" if root_is_subset else ""
    assert {prefix + i["file_name"] for i in coco.dataset["images"]} == expected
    dilation = read_json(out / "retina_d2.json")["options"]["dilation"]
    assert dilation == ({"microaneurysm": vars(EOPHTHA_MA_DILATION)} if subset == "MA" else {})


def test_both_with_one_subset_present_converts_it(tmp_path, caplog):
    make_eophtha(tmp_path / "raw", subsets=("EX",))
    with caplog.at_level(logging.WARNING):
        eophtha.convert(tmp_path / "raw", tmp_path / "out", _options())
    assert "e_optha_MA" in caplog.text
    coco = load_checked(tmp_path / "out/all.json", tmp_path / "raw")
    assert [c["name"] for c in coco.dataset["categories"]] == ["hard exudate"]


def _ma_sources(truth):
    return {f: m for f, (name, m) in truth.items() if name == "microaneurysm" and m is not None}


def test_ma_dilation_preset_by_default(tmp_path):
    truth = make_eophtha(tmp_path / "raw")
    out = tmp_path / "out"
    eophtha.convert(tmp_path / "raw", out, _options())
    manifest = read_json(out / "retina_d2.json")
    assert manifest["options"]["dilation"] == {"microaneurysm": vars(EOPHTHA_MA_DILATION)}
    coco = load_checked(out / "all.json", manifest["image_root"])

    for file_name, source in _ma_sources(truth).items():
        image_id = image_id_by_name(coco, file_name)
        instances = decoded_instances(coco, image_id, MA_ID)
        components, count = ndimage.label(source, structure=EIGHT_CONNECTED)
        assert len(instances) == count
        for k in range(1, count + 1):
            # Each source component lies inside exactly one instance, and that one grew.
            holders = [m for m in instances if (m & (components == k)).any()]
            assert len(holders) == 1
            assert (holders[0] >= (components == k)).all()
            assert holders[0].sum() > (components == k).sum()
        holding = [
            [i for i, m in enumerate(instances) if m[y, x]][0] for y, x in CLOSE_PAIR
        ]
        assert holding[0] != holding[1]
        touching = ndimage.binary_dilation(instances[holding[0]], EIGHT_CONNECTED)
        assert (touching & instances[holding[1]]).any(), "the pair should touch after dilation"
        # Semantic targets stay undilated.
        np.testing.assert_array_equal(
            _semantic(out, coco, image_id, "microaneurysm"), source.astype(np.uint8)
        )

    # Hard exudates are not dilated.
    for file_name, (name, mask) in truth.items():
        if name == "hard exudate" and mask is not None:
            assert_instances_match_mask(coco, image_id_by_name(coco, file_name), EX_ID, mask)


def test_user_dilation_wins_over_preset(tmp_path):
    truth = make_eophtha(tmp_path / "raw", subsets=("MA",))
    out = tmp_path / "out"
    options = _options(dilation={"microaneurysm": Dilation(3, 1)})
    eophtha.convert(tmp_path / "raw", out, options)
    assert options.dilation == {"microaneurysm": Dilation(3, 1)}
    manifest = read_json(out / "retina_d2.json")
    assert manifest["options"]["dilation"] == {"microaneurysm": {"kernel": 3, "iterations": 1}}
    coco = load_checked(out / "all.json", manifest["image_root"])
    for file_name, source in _ma_sources(truth).items():
        image_id = image_id_by_name(coco, file_name)
        (y, x) = CLOSE_PAIR[0]
        instance = [m for m in decoded_instances(coco, image_id, MA_ID) if m[y, x]][0]
        assert instance.sum() == 9  # one pixel grown by 3x3 once


def test_command_line_flags():
    parser = argparse.ArgumentParser()
    eophtha.add_arguments(parser)
    assert vars(parser.parse_args([])) == {
        "subset": "both", "ma_dilation": True, "split_file": None,
        "ma_dilation_scale": "native", "paper_split": False,
    }
    args = parser.parse_args(["--subset", "MA", "--no-ma-dilation", "--split-file", "s.json"])
    assert (args.subset, args.ma_dilation, str(args.split_file)) == ("MA", False, "s.json")
    with pytest.raises(SystemExit):
        parser.parse_args(["--subset", "HE"])


def test_equal_stems_in_two_patient_folders(tmp_path):
    """Published e-ophtha reuses file names across patients: both images convert, each with its
    own semantic target."""
    truth = make_eophtha(tmp_path / "raw", subsets=("EX",))
    ex = tmp_path / "raw/e_optha_EX"
    write_image(ex / "EX/E0012345/C0001885.jpg", H, W, seed=8)
    mask = random_lesion_mask(H, W, seed=8, count=4)
    write_mask(ex / "Annotation_EX/E0012345/C0001885_EX.png", mask)
    truth["e_optha_EX/EX/E0012345/C0001885.jpg"] = ("hard exudate", mask)
    out = tmp_path / "out"
    summary = eophtha.convert(tmp_path / "raw", out, _options())
    assert summary["skipped"] == []

    coco = load_checked(out / "all.json", tmp_path / "raw")
    assert len(coco.dataset["images"]) == len(truth)
    targets = set()
    for file_name in ("e_optha_EX/EX/E0000404/C0001885.jpg", "e_optha_EX/EX/E0012345/C0001885.jpg"):
        image_id = image_id_by_name(coco, file_name)
        source = truth[file_name][1]
        assert_instances_match_mask(coco, image_id, EX_ID, source)
        np.testing.assert_array_equal(
            _semantic(out, coco, image_id, "hard exudate"), source.astype(np.uint8)
        )
        targets.add(coco.loadImgs([image_id])[0]["sem_seg_files"]["hard exudate"])
    assert len(targets) == 2


# ---------------------------------------------------------------- split files


def _write_splits(path, splits):
    path.write_text(json.dumps(splits))
    return path


def _file_names(path, root):
    return sorted(i["file_name"] for i in load_checked(path, root).dataset["images"])


def test_split_file(tmp_path):
    truth = make_eophtha(tmp_path / "raw")
    split_file = _write_splits(
        tmp_path / "split.json",
        {
            # Paths inside the subset folder, with or without it, and unique stems.
            "train": ["EX/E0000404/C0001885", "C0001886", "MA/E0000500/C0003000"],
            "val": ["e_optha_EX/healthy/E0000100/C0002000", "C0003001", "C0004000"],
        },
    )
    out = tmp_path / "out"
    summary = eophtha.convert(tmp_path / "raw", out, _options(), split_file=split_file)

    assert not (out / "all.json").exists()
    assert read_json(out / "retina_d2.json")["tasks"] == {
        "seg": {"train": "train.json", "val": "val.json"}
    }
    assert _file_names(out / "train.json", tmp_path / "raw") == [
        "e_optha_EX/EX/E0000404/C0001885.jpg",
        "e_optha_EX/EX/E0000404/C0001886.JPG",
        "e_optha_MA/MA/E0000500/C0003000.JPG",
    ]
    assert _file_names(out / "val.json", tmp_path / "raw") == [
        "e_optha_EX/healthy/E0000100/C0002000.jpg",
        "e_optha_MA/MA/E0000500/C0003001.jpg",
        "e_optha_MA/healthy/E0000600/C0004000.JPG",
    ]
    assert summary["tasks"]["seg"]["train"]["images"] == 3
    assert summary["tasks"]["seg"]["val"]["images"] == 3
    # Images in no split (DS000ABC) are not converted.
    coco = load_checked(out / "train.json", tmp_path / "raw")
    for file_name in ("e_optha_EX/EX/E0000404/C0001885.jpg", "e_optha_EX/EX/E0000404/C0001886.JPG"):
        image_id = image_id_by_name(coco, file_name)
        assert_instances_match_mask(coco, image_id, EX_ID, truth[file_name][1])


def test_split_file_unknown_names(tmp_path):
    make_eophtha(tmp_path / "raw")
    split_file = _write_splits(
        tmp_path / "split.json",
        {"train": ["C0001885", "C9999999"], "val": ["EX/E0000404/C0001886.JPG"]},
    )
    with pytest.raises(ConversionError) as err:
        eophtha.convert(tmp_path / "raw", tmp_path / "out", _options(), split_file=split_file)
    message = str(err.value)
    assert "C9999999" in message and "EX/E0000404/C0001886.JPG" in message
    assert "split.json" in message and "'C0001885'" not in message


def test_split_file_name_in_two_splits(tmp_path):
    make_eophtha(tmp_path / "raw")
    split_file = _write_splits(
        tmp_path / "split.json", {"train": ["C0001885"], "val": ["C0001885"]}
    )
    with pytest.raises(ConversionError, match="listed in split 'train' and again in 'val'"):
        eophtha.convert(tmp_path / "raw", tmp_path / "out", _options(), split_file=split_file)

    # One image under two of its names is caught too.
    _write_splits(split_file, {"train": ["C0001885"], "val": ["EX/E0000404/C0001885"]})
    with pytest.raises(ConversionError, match="same image") as err:
        eophtha.convert(tmp_path / "raw", tmp_path / "out", _options(), split_file=split_file)
    assert "C0001885.jpg" in str(err.value)
    assert not (tmp_path / "out/train.json").exists()


def test_split_file_ambiguous_stem(tmp_path):
    make_eophtha(tmp_path / "raw", subsets=("EX",))
    ex = tmp_path / "raw/e_optha_EX"
    write_image(ex / "healthy/E0000101/C0001885.jpg", H, W, seed=9)
    split_file = _write_splits(tmp_path / "split.json", {"train": ["C0001885"], "val": []})
    with pytest.raises(ConversionError) as err:
        eophtha.convert(tmp_path / "raw", tmp_path / "out", _options(), split_file=split_file)
    message = str(err.value)
    assert "'C0001885'" in message
    assert "e_optha_EX/EX/E0000404/C0001885" in message
    assert "e_optha_EX/healthy/E0000101/C0001885" in message

    # The paths name each image.
    _write_splits(
        split_file, {"train": ["EX/E0000404/C0001885"], "val": ["healthy/E0000101/C0001885"]}
    )
    eophtha.convert(tmp_path / "raw", tmp_path / "out", _options(), split_file=split_file)
    assert _file_names(tmp_path / "out/val.json", tmp_path / "raw") == [
        "e_optha_EX/healthy/E0000101/C0001885.jpg"
    ]


def test_split_file_skips_image_without_annotation(tmp_path):
    make_eophtha(tmp_path / "raw", subsets=("EX",))
    (tmp_path / "raw/e_optha_EX/Annotation_EX/E0000404/C0001886.png").unlink()
    split_file = _write_splits(
        tmp_path / "split.json", {"train": ["C0001885", "C0001886"], "val": ["DS000ABC"]}
    )
    options = _options(on_error="skip")
    summary = eophtha.convert(tmp_path / "raw", tmp_path / "out", options, split_file=split_file)
    assert [s["file"].rsplit("/", 1)[-1] for s in summary["skipped"]] == ["C0001886.JPG"]
    assert _file_names(tmp_path / "out/train.json", tmp_path / "raw") == [
        "e_optha_EX/EX/E0000404/C0001885.jpg"
    ]


# ---------------------------------------------------------------- bad layouts and files


def test_missing_root(tmp_path):
    with pytest.raises(ConversionError, match="no_such_folder"):
        eophtha.convert(tmp_path / "no_such_folder", tmp_path / "out", _options())


def test_wrong_layout_names_expected_folders(tmp_path):
    (tmp_path / "raw/e_ophtha_EX").mkdir(parents=True)  # misspelt
    with pytest.raises(ConversionError) as err:
        eophtha.convert(tmp_path / "raw", tmp_path / "out", _options())
    assert "e_optha_EX" in str(err.value) and "e_optha_MA" in str(err.value)


def test_requested_subset_missing(tmp_path):
    make_eophtha(tmp_path / "raw", subsets=("MA",))
    with pytest.raises(ConversionError, match="e_optha_EX"):
        eophtha.convert(tmp_path / "raw", tmp_path / "out", _options(), subset="EX")


def test_missing_annotation_folder(tmp_path):
    make_eophtha(tmp_path / "raw", subsets=("EX",))
    (tmp_path / "raw/e_optha_EX/Annotation_EX").rename(tmp_path / "raw/e_optha_EX/annotations")
    with pytest.raises(ConversionError, match="Annotation_EX"):
        eophtha.convert(tmp_path / "raw", tmp_path / "out", _options())


def test_missing_annotation_names_image_and_paths_tried(tmp_path):
    truth = make_eophtha(tmp_path / "raw")
    missing = tmp_path / "raw/e_optha_EX/Annotation_EX/E0000404/C0001886.png"
    missing.unlink()
    with pytest.raises(ConversionError) as err:
        eophtha.convert(tmp_path / "raw", tmp_path / "out", _options())
    message = str(err.value)
    assert "C0001886.JPG" in message
    assert str(missing.parent / "C0001886_EX.png") in message and str(missing) in message
    assert not (tmp_path / "out/all.json").exists()

    summary = eophtha.convert(tmp_path / "raw", tmp_path / "out", _options(on_error="skip"))
    assert [s["file"] for s in summary["skipped"]] == [
        str(tmp_path / "raw/e_optha_EX/EX/E0000404/C0001886.JPG")
    ]
    assert read_json(tmp_path / "out/summary.json")["skipped"] == summary["skipped"]
    coco = load_checked(tmp_path / "out/all.json", tmp_path / "raw")
    names = {i["file_name"] for i in coco.dataset["images"]}
    assert names == set(truth) - {"e_optha_EX/EX/E0000404/C0001886.JPG"}


def test_two_matching_annotations_are_ambiguous(tmp_path):
    make_eophtha(tmp_path / "raw", subsets=("EX",))
    write_mask(tmp_path / "raw/e_optha_EX/Annotation_EX/E0000404/C0001885.png", np.ones((H, W)))
    with pytest.raises(ConversionError, match="C0001885_EX.png"):
        eophtha.convert(tmp_path / "raw", tmp_path / "out", _options())


def test_mask_size_mismatch(tmp_path):
    truth = make_eophtha(tmp_path / "raw")
    bad = tmp_path / "raw/e_optha_MA/Annotation_MA/E0000500/C0003001_MA.png"
    write_mask(bad, np.ones((H + 2, W), bool))
    with pytest.raises(ConversionError, match="C0003001_MA.png"):
        eophtha.convert(tmp_path / "raw", tmp_path / "out", _options())

    summary = eophtha.convert(tmp_path / "raw", tmp_path / "out", _options(on_error="skip"))
    assert len(summary["skipped"]) == 1
    assert summary["skipped"][0]["file"].endswith("C0003001.jpg")
    assert "C0003001_MA.png" in summary["skipped"][0]["reason"]
    coco = load_checked(tmp_path / "out/all.json", tmp_path / "raw")
    assert len(coco.dataset["images"]) == len(truth) - 1


def test_unexpected_mask_values(tmp_path):
    make_eophtha(tmp_path / "raw")
    bad = tmp_path / "raw/e_optha_EX/Annotation_EX/E0012345/DS000ABC_EX.PNG"
    values = np.zeros((H, W), np.uint8)
    values[5:10, 5:10] = 100
    values[20:25, 20:25] = 200
    Image.fromarray(values).save(bad, format="PNG")
    with pytest.raises(ConversionError, match="DS000ABC_EX.PNG"):
        eophtha.convert(tmp_path / "raw", tmp_path / "out", _options())

    summary = eophtha.convert(tmp_path / "raw", tmp_path / "out", _options(on_error="skip"))
    assert [s["file"].rsplit("/", 1)[-1] for s in summary["skipped"]] == ["DS000ABC.jpeg"]
    assert json.loads((tmp_path / "out/summary.json").read_text())["skipped"] == summary["skipped"]


def test_existing_output_refused(tmp_path):
    make_eophtha(tmp_path / "raw", subsets=("EX",))
    eophtha.convert(tmp_path / "raw", tmp_path / "out", _options())
    with pytest.raises(ConversionError, match="overwrite"):
        eophtha.convert(tmp_path / "raw", tmp_path / "out", _options())
    eophtha.convert(tmp_path / "raw", tmp_path / "out", _options(overwrite=True))
