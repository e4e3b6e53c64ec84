"""
Tests for the HEI-MED converter: the real 40-image sample (every blob of every image checked
against its label map) and small fixtures in the published layout for each documented rule.
"""
import gzip
import json
import logging
import struct
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pytest
from dataset_checks import (
    decoded_instances,
    image_id_by_name,
    load_checked,
    read_json,
    write_image,
)
from PIL import Image
from pycocotools import mask as mask_util
from scipy import ndimage

from retina_d2.data.converters import ConversionError, ConvertOptions, get_converter
from retina_d2.data.converters import heimed
from retina_d2.data.converters.heimed_io import (
    optic_nerve_center,
    read_blob_categories,
    read_label_map,
    read_meta,
)
from retina_d2.data.lesions import lesion

REPO = Path(__file__).resolve().parents[3]
HEIMED_DIR = REPO.parent / "shared" / "data" / "heimed"
DEV_SPLIT = REPO / "configs" / "splits" / "heimed_dev.json"
requires_sample = pytest.mark.skipif(
    not HEIMED_DIR.is_dir(),
    reason=f"real HEI-MED sample not found at {HEIMED_DIR} (it sits beside the CI checkout only)",
)


def _real_names() -> List[str]:
    if not HEIMED_DIR.is_dir():
        return []
    return sorted(p.name[: -len(".jpg")] for p in HEIMED_DIR.glob("*.jpg"))


REAL_NAMES = _real_names()


# ---------------------------------------------------------------- real sample


@pytest.fixture(scope="module")
def real_conversion(tmp_path_factory):
    if not HEIMED_DIR.is_dir():
        pytest.skip(f"real HEI-MED sample not found at {HEIMED_DIR}")
    out = tmp_path_factory.mktemp("heimed_all")
    summary = heimed.convert(HEIMED_DIR, out, ConvertOptions(progress=False))
    coco = load_checked(out / "all.json", HEIMED_DIR)
    return {"out": out, "summary": summary, "coco": coco}


@requires_sample
def test_real_converts_every_image(real_conversion):
    coco = real_conversion["coco"]
    assert len(REAL_NAMES) == 40
    assert real_conversion["summary"]["skipped"] == []
    assert sorted(i["file_name"] for i in coco.dataset["images"]) == sorted(
        f"{n}.jpg" for n in REAL_NAMES
    )
    # NAME_vess.png, .map.gz, .GND, .meta and the stray .map are not images.
    assert not any(i["file_name"].endswith(".png") for i in coco.dataset["images"])
    assert {c["name"] for c in coco.dataset["categories"]} == set(heimed.CATEGORIES)
    manifest = read_json(real_conversion["out"] / "retina_d2.json")
    assert manifest["tasks"] == {"seg": {"all": "all.json"}}


def _area_and_box(area: int, box) -> tuple:
    # (area, x, y, w, h) as COCO's area and bbox fields hold them.
    rows, cols = box
    return area, cols.start, rows.start, cols.stop - cols.start, rows.stop - rows.start


@requires_sample
@pytest.mark.parametrize("name", REAL_NAMES)
def test_real_instances_are_the_blobs(real_conversion, name):
    coco = real_conversion["coco"]
    categories = read_blob_categories(HEIMED_DIR / f"{name}.GND")
    label_map = read_label_map(HEIMED_DIR / f"{name}.map.gz")
    image_id = image_id_by_name(coco, f"{name}.jpg")
    # Independent of the converter: each blob's area and tight box straight from the map.
    areas = np.bincount(label_map.ravel(), minlength=len(categories) + 1)
    boxes = ndimage.find_objects(label_map, max_label=len(categories))

    for category in heimed.CATEGORIES:
        category_id = lesion(category).id
        blob_ids = [i for i, c in enumerate(categories, start=1) if c == category]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], catIds=[category_id]))
        assert len(anns) == len(blob_ids), f"{name} {category}: {len(anns)} != {len(blob_ids)}"

        expected = np.isin(label_map, blob_ids)
        if anns:
            rles = [a["segmentation"] for a in anns]
            union = mask_util.decode(mask_util.merge(rles, intersect=False)).astype(bool)
            # Disjoint iff the areas add up to the union's.
            assert sum(a["area"] for a in anns) == int(union.sum()), f"{name}: instances overlap"
        else:
            union = np.zeros_like(expected)
        assert np.array_equal(union, expected), f"{name} {category}: union != blob pixels"

        # One instance per blob, not merely the same pixels: same multiset of (area, box).
        blob_shapes = Counter(_area_and_box(int(areas[i]), boxes[i - 1]) for i in blob_ids)
        ann_shapes = Counter((a["area"], *(int(v) for v in a["bbox"])) for a in anns)
        assert ann_shapes == blob_shapes, f"{name} {category}: instances are not the blobs"


@requires_sample
def test_real_fields(real_conversion):
    for record in real_conversion["coco"].dataset["images"]:
        name = record["file_name"][: -len(".jpg")]
        meta = read_meta(HEIMED_DIR / f"{name}.meta")
        assert record["optic_disc_center"] == list(optic_nerve_center(meta)), name
        assert record["quality"] == pytest.approx(float(meta["QualityValue"])), name
        x, y = record["optic_disc_center"]
        assert 0 <= x < record["width"] and 0 <= y < record["height"], name


@requires_sample
def test_real_dev_split_file(tmp_path):
    expected = heimed.dev_split(REAL_NAMES)
    assert read_json(DEV_SPLIT) == expected
    assert (len(expected["train"]), len(expected["val"])) == (30, 10)
    # 1-based positions 4, 8, ..., 40 of the sorted names.
    assert expected["val"] == REAL_NAMES[3::4]

    summary = heimed.convert(
        HEIMED_DIR, tmp_path, ConvertOptions(progress=False, semantic=False), split_file=DEV_SPLIT
    )
    assert not (tmp_path / "all.json").exists()
    for split, names in expected.items():
        coco = load_checked(tmp_path / f"{split}.json", HEIMED_DIR)
        assert sorted(i["file_name"] for i in coco.dataset["images"]) == [f"{n}.jpg" for n in names]
        assert summary["tasks"]["seg"][split]["images"] == len(names)


# ---------------------------------------------------------------- fixtures

HEIGHT, WIDTH = 40, 60
_GND_TAIL = ["0", "0", "0", "NA", "NA", "NA", "NA", "NA", "NA", "NA"]


def _write_map(path: Path, labels: np.ndarray, tag: int = -43) -> None:
    height, width = labels.shape
    header = struct.pack("<3i", tag, width, height)
    path.write_bytes(gzip.compress(header + labels.astype("<i4").tobytes()))


def _write_gnd(path: Path, labels: Sequence[str]) -> None:
    lines = [str(len(labels)), *labels, *_GND_TAIL]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode("ascii"))


def _write_sample(
    root: Path,
    name: str,
    label_map: Optional[np.ndarray],
    labels: Optional[Sequence[str]],
    image_hw=(HEIGHT, WIDTH),
) -> None:
    """One image in the published layout; None for label_map / labels leaves that file out."""
    write_image(root / f"{name}.jpg", *image_hw)
    write_image(root / f"{name}_vess.png", *image_hw, mode="L")
    if label_map is not None:
        _write_map(root / f"{name}.map.gz", label_map)
    if labels is not None:
        _write_gnd(root / f"{name}.GND", labels)
    (root / f"{name}.meta").write_bytes(
        f"~ImageName:~{name}.jpg\r\n~PatientGender~F\r\n~PatientRace~AFRICAN\r\n"
        "~PatientDOB~4/12/1942\r\n~QualityValue~0.4071071\r\n~DiabetesType~TYPE II\r\n"
        "~ONrow~12\r\n~ONcol~31\r\n".encode("ascii")
    )


def _two_piece_and_touching_map() -> np.ndarray:
    labels = np.zeros((HEIGHT, WIDTH), np.int32)
    labels[2:5, 2:5] = 1
    labels[30:33, 50:52] = 1  # blob 1 again, far away: one instance in two pieces
    labels[10:14, 20:23] = 2
    labels[10:14, 23:26] = 3  # blob 3 touches blob 2: still two instances
    labels[20, 40] = 4  # a one-pixel blob
    return labels


_FOUR_LABELS = ["Exudate 1", "Exudate 1", "Other Bright Lesion 1", "MicroAneurysm 0"]
_UNKNOWN_LABELS = ["Exudate 1", "Hemangioma 0", "Exudate 1", "Exudate 1"]


@pytest.fixture
def fixture_root(tmp_path):
    root = tmp_path / "heimed"
    root.mkdir()
    _write_sample(root, "0907440_(625).dcm", _two_piece_and_touching_map(), _FOUR_LABELS)
    empty = np.zeros((HEIGHT, WIDTH), np.int32)
    _write_sample(root, "(00000197)", empty, [])
    # The dataset ships one stray, truncated uncompressed map beside its .map.gz.
    (root / "(00000197).map").write_bytes(b"\xd5\xff\xff\xff")
    return root


def _convert(root: Path, out: Path, **kwargs) -> dict:
    split_file = kwargs.pop("split_file", None)
    unknown_labels = kwargs.pop("unknown_labels", "ignore")
    options = ConvertOptions(progress=False, **kwargs)
    return heimed.convert(root, out, options, split_file=split_file, unknown_labels=unknown_labels)


def test_blobs_are_neither_split_nor_merged(fixture_root, tmp_path):
    summary = _convert(fixture_root, tmp_path / "out")
    coco = load_checked(tmp_path / "out" / "all.json", fixture_root)
    assert summary["skipped"] == []
    assert len(coco.dataset["images"]) == 2  # NAME_vess.png and the stray .map are not images

    labels = _two_piece_and_touching_map()
    image_id = image_id_by_name(coco, "0907440_(625).dcm.jpg")
    exudates = decoded_instances(coco, image_id, lesion("hard exudate").id)
    # Blob 1 (two separate pieces) is ONE instance; blobs 2 and 3 touch yet stay TWO.
    assert sorted(m.sum() for m in exudates) == sorted([(labels == 1).sum(), (labels == 2).sum()])
    assert any(np.array_equal(m, labels == 1) for m in exudates)
    assert any(np.array_equal(m, labels == 2) for m in exudates)
    (other,) = decoded_instances(coco, image_id, lesion("other bright lesion").id)
    assert np.array_equal(other, labels == 3)
    (micro,) = decoded_instances(coco, image_id, lesion("microaneurysm").id)
    assert np.array_equal(micro, labels == 4)  # a 1-pixel blob survives

    record = coco.loadImgs([image_id])[0]
    assert record["optic_disc_center"] == [31.0, 12.0]  # [ONcol, ONrow] = [x, y]
    assert record["quality"] == pytest.approx(0.4071071)
    empty_id = image_id_by_name(coco, "(00000197).jpg")
    assert coco.getAnnIds(imgIds=[empty_id]) == []


def test_companion_files_are_not_warned_about(fixture_root, tmp_path, caplog):
    (fixture_root / "Thumbs.db").write_bytes(b"\x00")
    with caplog.at_level(logging.WARNING):
        _convert(fixture_root, tmp_path / "out")
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "Thumbs.db" in warned[0], warned


def test_registered_converter(fixture_root, tmp_path):
    module = get_converter("heimed")
    assert module is heimed and module.DATASET == "heimed"
    module.convert(fixture_root, tmp_path / "out", ConvertOptions(progress=False))
    assert (tmp_path / "out" / "all.json").is_file()


def test_missing_map_and_gnd_means_no_blobs(fixture_root, tmp_path):
    _write_sample(fixture_root, "(00000300)", None, None)
    _convert(fixture_root, tmp_path / "out")
    coco = load_checked(tmp_path / "out" / "all.json", fixture_root)
    image_id = image_id_by_name(coco, "(00000300).jpg")
    assert coco.getAnnIds(imgIds=[image_id]) == []


@pytest.mark.parametrize("missing", [".map.gz", ".GND"])
def test_only_one_annotation_file_missing(fixture_root, tmp_path, missing):
    (fixture_root / f"0907440_(625).dcm{missing}").unlink()
    with pytest.raises(ConversionError) as info:
        _convert(fixture_root, tmp_path / "out")
    assert f"0907440_(625).dcm{missing}: missing" in str(info.value)


def test_unknown_label_stops_when_asked(fixture_root, tmp_path):
    _write_gnd(fixture_root / "0907440_(625).dcm.GND", _UNKNOWN_LABELS)
    with pytest.raises(ConversionError) as info:
        _convert(fixture_root, tmp_path / "out", unknown_labels="stop")
    message = str(info.value)
    assert "0907440_(625).dcm.GND" in message and "blob 2" in message
    assert "'Hemangioma 0'" in message


def test_unknown_label_stopping_skips_only_that_image(fixture_root, tmp_path):
    _write_gnd(fixture_root / "0907440_(625).dcm.GND", _UNKNOWN_LABELS)
    summary = _convert(fixture_root, tmp_path / "out", on_error="skip", unknown_labels="stop")
    coco = load_checked(tmp_path / "out" / "all.json", fixture_root)
    assert [i["file_name"] for i in coco.dataset["images"]] == ["(00000197).jpg"]
    (skipped,) = summary["skipped"]
    assert skipped["file"].endswith("0907440_(625).dcm.jpg")
    assert "0907440_(625).dcm.GND" in skipped["reason"]


def test_map_size_differs_from_image(fixture_root, tmp_path):
    _write_map(fixture_root / "(00000197).map.gz", np.zeros((HEIGHT, WIDTH + 1), np.int32))
    with pytest.raises(ConversionError) as info:
        _convert(fixture_root, tmp_path / "out")
    assert "(00000197).map.gz" in str(info.value) and "61x40" in str(info.value)


def test_map_value_without_label(fixture_root, tmp_path):
    # A drawn blob with no .GND label has no category: an error, not a guess.
    _write_gnd(fixture_root / "0907440_(625).dcm.GND", _FOUR_LABELS[:3])
    with pytest.raises(ConversionError) as info:
        _convert(fixture_root, tmp_path / "out")
    assert "0907440_(625).dcm.map.gz" in str(info.value)


def test_listed_blob_not_drawn_warns(fixture_root, tmp_path, caplog):
    _write_gnd(fixture_root / "0907440_(625).dcm.GND", _FOUR_LABELS + ["Exudate 1"])
    with caplog.at_level(logging.WARNING):
        _convert(fixture_root, tmp_path / "out")
    coco = read_json(tmp_path / "out" / "all.json")
    assert len(coco["annotations"]) == 4
    assert any("0907440_(625).dcm.GND" in r.getMessage() and "[5]" in r.getMessage()
               for r in caplog.records)


def test_truncated_map_names_file(fixture_root, tmp_path):
    path = fixture_root / "0907440_(625).dcm.map.gz"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ConversionError) as info:
        _convert(fixture_root, tmp_path / "out")
    assert "0907440_(625).dcm.map.gz" in str(info.value)


def _write_splits(path: Path, splits: Dict[str, List[str]]) -> Path:
    path.write_text(json.dumps(splits))
    return path


def test_split_file(fixture_root, tmp_path):
    split_file = _write_splits(
        tmp_path / "split.json", {"train": ["0907440_(625).dcm"], "val": ["(00000197)"]}
    )
    summary = _convert(fixture_root, tmp_path / "out", split_file=split_file)
    assert not (tmp_path / "out" / "all.json").exists()
    train = load_checked(tmp_path / "out" / "train.json", fixture_root)
    val = load_checked(tmp_path / "out" / "val.json", fixture_root)
    assert [i["file_name"] for i in train.dataset["images"]] == ["0907440_(625).dcm.jpg"]
    assert [i["file_name"] for i in val.dataset["images"]] == ["(00000197).jpg"]
    assert len(train.dataset["annotations"]) == 4 and not val.dataset["annotations"]
    assert set(summary["tasks"]["seg"]) == {"train", "val"}


def test_split_file_unknown_names(fixture_root, tmp_path):
    split_file = _write_splits(
        tmp_path / "split.json", {"train": ["(00000197)", "(12345678)"], "val": ["(00000197).jpg"]}
    )
    with pytest.raises(ConversionError) as info:
        _convert(fixture_root, tmp_path / "out", split_file=split_file)
    message = str(info.value)
    assert "(12345678)" in message and "(00000197).jpg" in message and "split.json" in message


def test_split_file_name_in_two_splits(fixture_root, tmp_path):
    split_file = _write_splits(
        tmp_path / "split.json", {"train": ["(00000197)"], "val": ["(00000197)"]}
    )
    with pytest.raises(ConversionError, match="listed in split 'train' and again in 'val'"):
        _convert(fixture_root, tmp_path / "out", split_file=split_file)


def test_dev_split_positions():
    names = [f"({i:08d})" for i in range(40, 0, -1)]
    split = heimed.dev_split(names)
    assert split["val"] == [f"({i:08d})" for i in range(4, 41, 4)]
    assert len(split["train"]) == 30 and not set(split["train"]) & set(split["val"])


def test_missing_root(tmp_path):
    with pytest.raises(ConversionError, match="HEI-MED folder") as info:
        _convert(tmp_path / "nowhere", tmp_path / "out")
    assert "nowhere" in str(info.value)


# ---------------------------------------------------------------- every label of the full dataset

# Each blob label the full 169-image dataset uses and what its blob must become (None: an ignore
# region, neither lesion nor background).
_DATASET_LABELS = {
    "Exudate 1": "hard exudate",
    "Other Bright Lesion 1": "other bright lesion",
    "MicroAneurysm 0": "microaneurysm",
    "Cotton Wool Spot 1": "soft exudate",
    "Flame Hemmorhage 0": "haemorrhage",
    "Intraretinal Hemmorhage 0": "haemorrhage",
    "Bright Scar 1": "other bright lesion",
    "Soft Drusen 1": "other bright lesion",
    "Basal Laminar Drusen 1": "other bright lesion",
    "Artifact 1": None,
    "Fluid without CSME 0": None,
    "Macular Hole 0": None,  # a label HEI-MED does not use: unknown, so ignored with a warning
}


def _one_blob_per_label(count: int) -> np.ndarray:
    """Blob k is a 3x4 rectangle of its own, in rows of five."""
    labels = np.zeros((HEIGHT, WIDTH), np.int32)
    for k in range(1, count + 1):
        y, x = 2 + 8 * ((k - 1) // 5), 2 + 11 * ((k - 1) % 5)
        labels[y : y + 3, x : x + 4] = k
    return labels


def test_every_dataset_label_has_its_category_or_is_ignored(tmp_path, caplog):
    root = tmp_path / "heimed"
    labels_text = list(_DATASET_LABELS)
    label_map = _one_blob_per_label(len(labels_text))
    _write_sample(root, "(00000061)", label_map, labels_text)
    with caplog.at_level(logging.WARNING):
        summary = _convert(root, tmp_path / "out")
    assert summary["skipped"] == []
    # Only the label HEI-MED does not use is warned about, naming the file, the blob and it.
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1
    assert "(00000061).GND" in warned[0] and "blob 12" in warned[0]
    assert "'Macular Hole 0'" in warned[0]

    coco = load_checked(tmp_path / "out" / "all.json", root)
    image_id = image_id_by_name(coco, "(00000061).jpg")
    blob_categories = dict(enumerate(_DATASET_LABELS.values(), start=1))
    ignored = np.isin(label_map, [k for k, c in blob_categories.items() if c is None])
    for category in heimed.CATEGORIES:
        category_id = lesion(category).id
        expected = [label_map == k for k, c in blob_categories.items() if c == category]
        found = decoded_instances(coco, image_id, category_id)
        assert sorted(m.sum() for m in found) == [12] * len(expected), category
        for mask in expected:
            assert any(np.array_equal(mask, m) for m in found), category
        # The ignored blobs are crowd regions of every category: no prediction there counts.
        crowd = decoded_instances(coco, image_id, category_id, iscrowd=1)
        assert np.array_equal(np.logical_or.reduce(crowd), ignored), category
        target = tmp_path / "out" / "semantic" / "all" / "(00000061)"
        semantic = np.asarray(Image.open(target / f"{lesion(category).abbrev}.png"))
        assert np.array_equal(semantic == 255, ignored), category
        assert np.array_equal(semantic == 1, np.logical_or.reduce(expected)), category
    assert summary["tasks"]["seg"]["all"]["categories"]["hard exudate"]["ignore_regions"] == 3


def _rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _exudate_results(masks_scores) -> list:
    return [
        {"image_id": 1, "category_id": lesion("hard exudate").id, "segmentation": _rle(m),
         "score": score}
        for m, score in masks_scores
    ]


def _segm_ap50_ar50(root: Path, out: Path, results) -> tuple:
    from retina_d2.evaluation import evaluate_coco_results

    _convert(root, out)
    metrics = evaluate_coco_results(out / "all.json", results, tasks=("segm",))["segm"]
    return metrics["AP50"], metrics["AR50"]


def test_unknown_label_is_neither_positive_nor_negative_in_evaluation(tmp_path):
    """A prediction on an unknown label's blob is no false positive, and missing that blob is
    no miss; the same blob labelled Exudate, or left undrawn, changes both (the test's control)."""
    labels = np.zeros((HEIGHT, WIDTH), np.int32)
    labels[5:11, 5:11] = 1
    labels[20:26, 30:36] = 2
    exudate, other = labels == 1, labels == 2
    on_both = _exudate_results([(other, 0.9), (exudate, 0.8)])  # the blob-2 guess ranks first
    on_exudate = _exudate_results([(exudate, 0.8)])

    def run(name, label_map, blob_labels, results):
        root = tmp_path / name / "raw"
        _write_sample(root, "(00000001)", label_map, blob_labels)
        return _segm_ap50_ar50(root, tmp_path / name / "out", results)

    unknown = ["Exudate 1", "Macular Hole 0"]
    perfect = (pytest.approx(100), pytest.approx(100))
    assert run("unknown_hit", labels, unknown, on_both) == perfect
    assert run("unknown_missed", labels, unknown, on_exudate) == perfect
    # Controls: as background blob 2 makes the first-ranked prediction a false positive (AP
    # falls), and as an exudate missing it halves recall.
    background = np.where(labels == 2, 0, labels)
    ap, _ = run("background", background, ["Exudate 1"], on_both)
    assert ap < 60
    _, ar = run("exudate", labels, ["Exudate 1", "Exudate 1"], on_exudate)
    assert ar == pytest.approx(50)


def test_command_line_stops_at_unknown_label_only_with_on_error_stop(tmp_path, capsys, caplog):
    # The tool run in this process (a subprocess costs seconds).
    from retina_d2.tools import convert_dataset as tool

    root = tmp_path / "heimed"
    _write_sample(root, "(00000061)", _one_blob_per_label(2), ["Exudate 1", "Soft Drusen 2"])
    argv = ["heimed", "--root", str(root)]
    unknown = "(00000061).GND: blob 2: unknown HEI-MED blob label 'Soft Drusen 2'"
    with caplog.at_level(logging.WARNING):
        assert tool.main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert any(unknown in r.getMessage() for r in caplog.records)
    coco = read_json(tmp_path / "a" / "all.json")
    assert sum(a["iscrowd"] for a in coco["annotations"]) == len(heimed.CATEGORIES)

    capsys.readouterr()
    assert tool.main(argv + ["--out", str(tmp_path / "b"), "--on-error", "stop"]) != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and unknown in errors[0]
    assert not (tmp_path / "b" / "retina_d2.json").exists()
