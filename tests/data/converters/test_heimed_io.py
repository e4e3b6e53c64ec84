"""
Tests for retina_d2.data.converters.heimed_io: the real 40-image HEI-MED sample and small files
written into tmp_path that exercise each documented error.
"""
import gzip
import logging
import struct
import tracemalloc
import zlib
from pathlib import Path
from typing import List

import numpy as np
import pytest
from PIL import Image

from retina_d2.data.converters.heimed_io import (
    HEIMED_CATEGORIES,
    HeimedFormatError,
    blob_category,
    optic_nerve_center,
    read_blob_categories,
    read_blob_labels,
    read_label_map,
    read_meta,
)

HEIMED_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "heimed"
if not HEIMED_DIR.is_dir():
    pytest.skip(
        "../shared/data/heimed not found: the real HEI-MED sample is only beside the CI checkout",
        allow_module_level=True,
    )


def _sample_names() -> List[str]:
    # Names hold parentheses and dots ("0907440_(625).dcm"), so strip the suffix, not a stem.
    return sorted(p.name[: -len(".GND")] for p in HEIMED_DIR.glob("*.GND"))


SAMPLE_NAMES = _sample_names()


def _write_map(path: Path, values: np.ndarray, tag: int = -43, compress: bool = True) -> None:
    height, width = values.shape
    payload = struct.pack("<3i", tag, width, height) + values.astype("<i4").tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


# ---------------------------------------------------------------- real sample


def test_sample_is_present():
    assert len(SAMPLE_NAMES) == 40, f"expected the 40-image sample, found {len(SAMPLE_NAMES)}"


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_real_image(name):
    labels = read_blob_labels(HEIMED_DIR / f"{name}.GND")
    label_map = read_label_map(HEIMED_DIR / f"{name}.map.gz", num_blobs=len(labels))
    # PIL reads only the JPEG header here; the pixels are never decoded.
    with Image.open(HEIMED_DIR / f"{name}.jpg") as image:
        width, height = image.size

    assert label_map.dtype == np.int32
    assert label_map.shape == (height, width)
    assert label_map.max() <= len(labels)
    assert label_map.min() >= 0
    # Every listed blob is drawn: ids 1..N all occur, so each label yields one instance.
    present = set(np.unique(label_map).tolist()) - {0}
    assert present == set(range(1, len(labels) + 1))
    if not labels:
        assert not label_map.any()

    categories = [blob_category(label) for label in labels]
    assert set(categories) <= set(HEIMED_CATEGORIES)
    assert read_blob_categories(HEIMED_DIR / f"{name}.GND") == categories

    meta = read_meta(HEIMED_DIR / f"{name}.meta")
    center = optic_nerve_center(meta)
    assert center is not None
    x, y = center
    assert 0 <= x < width and 0 <= y < height


def test_real_zero_blob_images_exist():
    # The README promises images without lesions; the all-zero check above must not be vacuous.
    empty = [n for n in SAMPLE_NAMES if not read_blob_labels(HEIMED_DIR / f"{n}.GND")]
    assert empty


@pytest.mark.parametrize("raw_map", sorted(p.name for p in HEIMED_DIR.glob("*.map")))
def test_real_raw_map_matches_gz_or_is_rejected(raw_map):
    # The dataset ships a stray uncompressed .map (cut short) beside one .map.gz.
    gz_path = HEIMED_DIR / f"{raw_map}.gz"
    try:
        label_map = read_label_map(HEIMED_DIR / raw_map)
    except HeimedFormatError as e:
        assert raw_map in str(e)
    else:
        np.testing.assert_array_equal(label_map, read_label_map(gz_path))


def test_real_meta_keys():
    meta = read_meta(HEIMED_DIR / f"{SAMPLE_NAMES[0]}.meta")
    assert {"ImageName:", "ONrow", "ONcol", "QualityValue"} <= set(meta)
    assert meta["ImageName:"] == f"{SAMPLE_NAMES[0]}.jpg"


# ---------------------------------------------------------------- label map


def test_map_round_trip(tmp_path):
    values = np.array([[0, 1, 1, 0], [2, 2, 0, 3], [0, 0, 3, 3]], dtype=np.int32)
    path = tmp_path / "(00000001).map.gz"
    _write_map(path, values)
    label_map = read_label_map(path, num_blobs=3)
    assert label_map.dtype == np.int32
    assert label_map.shape == (3, 4)
    np.testing.assert_array_equal(label_map, values)
    label_map[0, 0] = 7  # a private writable copy, not a view of the decompressed bytes


def test_map_uncompressed(tmp_path):
    values = np.arange(6, dtype=np.int32).reshape(2, 3)
    path = tmp_path / "raw.map"
    _write_map(path, values, compress=False)
    np.testing.assert_array_equal(read_label_map(path), values)


def test_map_truncated_payload(tmp_path):
    path = tmp_path / "short_(1).dcm.map.gz"
    payload = struct.pack("<3i", -43, 4, 3) + np.zeros(11, dtype="<i4").tobytes()
    path.write_bytes(gzip.compress(payload))
    with pytest.raises(HeimedFormatError, match="truncated") as info:
        read_label_map(path)
    assert path.name in str(info.value)
    assert "60" in str(info.value)  # 12 + 4*4*3 expected bytes


def test_map_trailing_bytes(tmp_path):
    path = tmp_path / "long.map.gz"
    payload = struct.pack("<3i", -43, 2, 2) + np.zeros(5, dtype="<i4").tobytes()
    path.write_bytes(gzip.compress(payload))
    with pytest.raises(HeimedFormatError, match="trailing") as info:
        read_label_map(path)
    assert path.name in str(info.value)


@pytest.mark.parametrize("width,height", [(0, 3), (4, 0), (-4, 3), (4, -3)])
def test_map_bad_header_size(tmp_path, width, height):
    path = tmp_path / "bad_header.map.gz"
    path.write_bytes(gzip.compress(struct.pack("<3i", -43, width, height) + bytes(48)))
    with pytest.raises(HeimedFormatError, match="bad label map header") as info:
        read_label_map(path)
    assert path.name in str(info.value)


def test_map_short_header(tmp_path):
    path = tmp_path / "tiny.map.gz"
    path.write_bytes(gzip.compress(b"\x00" * 8))
    with pytest.raises(HeimedFormatError, match="header truncated") as info:
        read_label_map(path)
    assert path.name in str(info.value)


def test_map_truncated_gzip(tmp_path):
    path = tmp_path / "cut.map.gz"
    _write_map(path, np.ones((30, 40), dtype=np.int32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(HeimedFormatError, match="truncated gzip") as info:
        read_label_map(path)
    assert path.name in str(info.value)


def test_map_header_above_the_pixel_limit_is_refused_before_inflating(tmp_path):
    path = tmp_path / "(00000007).map.gz"
    # 60000 x 60000 int32 would be 14.4 GB; only the header is stored.
    path.write_bytes(gzip.compress(struct.pack("<3i", -43, 60000, 60000)))
    with pytest.raises(HeimedFormatError, match="60000x60000") as info:
        read_label_map(path)
    assert path.name in str(info.value) and "more than the 40000000" in str(info.value)
    _write_map(path, np.zeros((3, 4), np.int32))
    with pytest.raises(HeimedFormatError, match="more than the 11 a label map may have"):
        read_label_map(path, max_pixels=11)
    assert read_label_map(path, max_pixels=12).shape == (3, 4)


def test_map_that_inflates_far_beyond_its_header_stops_early(tmp_path):
    """A small file holding a valid 100x80 map followed by 128 MB of zeros (a gzip bomb): an
    error naming the file, and memory stays near the map's size instead of the 128 MB."""
    path = tmp_path / "(00000013).map.gz"
    compressor = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip framing
    parts = [compressor.compress(struct.pack("<3i", -43, 100, 80) + bytes(4 * 100 * 80))]
    zeros = bytes(1 << 20)
    parts += [compressor.compress(zeros) for _ in range(128)]
    path.write_bytes(b"".join(parts) + compressor.flush())
    assert path.stat().st_size < 1_000_000
    tracemalloc.start()
    try:
        with pytest.raises(HeimedFormatError, match="has trailing bytes") as info:
            read_label_map(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert path.name in str(info.value)
    assert peak < 20_000_000, f"peak {peak / 1e6:.0f} MB while reading a 128 MB bomb"


def test_map_values_above_blob_count(tmp_path):
    path = tmp_path / "over.map.gz"
    _write_map(path, np.array([[0, 1], [2, 5]], dtype=np.int32))
    assert read_label_map(path).max() == 5  # no count given: not checked
    with pytest.raises(HeimedFormatError, match="above the blob count 2") as info:
        read_label_map(path, num_blobs=2)
    assert path.name in str(info.value)


def test_map_negative_value(tmp_path):
    path = tmp_path / "neg.map.gz"
    _write_map(path, np.array([[0, -1]], dtype=np.int32))
    with pytest.raises(HeimedFormatError, match="negative") as info:
        read_label_map(path)
    assert path.name in str(info.value)


# ---------------------------------------------------------------- GND


_GND_TAIL = ["0", "0", "0", "NA", "NA", "NA", "NA", "NA", "NA", "NA"]


@pytest.mark.parametrize("newline", ["\r\n", "\n"])
def test_gnd_line_ends(tmp_path, newline):
    path = tmp_path / "(00000052).GND"
    lines = ["3", "Exudate 1", "Other Bright Lesion 1 ", "MicroAneurysm 0"] + _GND_TAIL
    path.write_bytes((newline.join(lines) + newline).encode("ascii"))
    assert read_blob_labels(path) == ["Exudate 1", "Other Bright Lesion 1", "MicroAneurysm 0"]
    assert read_blob_categories(path) == ["hard exudate", "other bright lesion", "microaneurysm"]


def test_gnd_labels_at_end_of_file_without_newline(tmp_path):
    path = tmp_path / "a.GND"
    path.write_bytes(b"2\r\nExudate 1\r\nExudate 1")
    assert read_blob_labels(path) == ["Exudate 1", "Exudate 1"]


def test_gnd_version_line_shifts_labels(tmp_path):
    path = tmp_path / "v2.GND"
    lines = ["GNDVERSION2.0 (INCLUDES NOTES AT THE END OF THE FILE)", "2"]
    lines += ["Intraretinal Hemmorhage 0", "Cotton Wool Spot 1"] + _GND_TAIL + ["some notes"]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode("ascii"))
    assert read_blob_labels(path) == ["Intraretinal Hemmorhage 0", "Cotton Wool Spot 1"]
    assert read_blob_categories(path) == ["haemorrhage", "soft exudate"]


def test_gnd_zero_blobs(tmp_path):
    path = tmp_path / "none.GND"
    path.write_bytes(("\r\n".join(["0"] + _GND_TAIL) + "\r\n").encode("ascii"))
    assert read_blob_labels(path) == []


@pytest.mark.parametrize("count_line", ["abc", "2.5", "", "NA"])
def test_gnd_count_not_integer(tmp_path, count_line):
    path = tmp_path / "(bad).count.GND"
    path.write_bytes(f"{count_line}\r\nExudate 1\r\nExudate 1\r\n".encode("ascii"))
    with pytest.raises(HeimedFormatError, match="not an integer") as info:
        read_blob_labels(path)
    assert path.name in str(info.value)


def test_gnd_negative_count(tmp_path):
    path = tmp_path / "neg.GND"
    path.write_bytes(b"-1\r\n")
    with pytest.raises(HeimedFormatError, match="negative") as info:
        read_blob_labels(path)
    assert path.name in str(info.value)


@pytest.mark.parametrize(
    "content", [b"", b"GNDVERSION2.0 (INCLUDES NOTES AT THE END OF THE FILE)\r\n"]
)
def test_gnd_no_count_line(tmp_path, content):
    path = tmp_path / "empty.GND"
    path.write_bytes(content)
    with pytest.raises(HeimedFormatError, match="no blob count") as info:
        read_blob_labels(path)
    assert path.name in str(info.value)


def test_gnd_fewer_labels_than_count(tmp_path):
    path = tmp_path / "short.GND"
    path.write_bytes(b"3\r\nExudate 1\r\nExudate 1\r\n")
    with pytest.raises(HeimedFormatError, match="count is 3 but only 2") as info:
        read_blob_labels(path)
    assert path.name in str(info.value)


def test_gnd_empty_label_line(tmp_path):
    path = tmp_path / "blank.GND"
    path.write_bytes(b"2\r\n\r\nExudate 1\r\n")
    with pytest.raises(HeimedFormatError, match="blob 1 .line 2. is empty") as info:
        read_blob_labels(path)
    assert path.name in str(info.value)


def test_gnd_unknown_label(tmp_path):
    path = tmp_path / "(00000099).GND"
    path.write_bytes(b"2\r\nExudate 1\r\nHemangioma 0\r\n")
    assert read_blob_labels(path) == ["Exudate 1", "Hemangioma 0"]
    with pytest.raises(HeimedFormatError, match="Hemangioma 0") as info:
        read_blob_categories(path)
    assert path.name in str(info.value)
    assert "blob 2" in str(info.value)


def test_gnd_unknown_label_ignored_with_a_warning(tmp_path, caplog):
    path = tmp_path / "(00000061).GND"
    path.write_bytes(b"3\r\nSoft Drusen 1\r\nHemangioma 0\r\nArtifact 1\r\n")
    with caplog.at_level(logging.WARNING):
        categories = read_blob_categories(path, unknown="ignore")
    assert categories == ["other bright lesion", None, None]
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert path.name in warning and "blob 2" in warning and "'Hemangioma 0'" in warning
    with pytest.raises(ValueError, match="unknown must be one of"):
        read_blob_categories(path, unknown="skip")


# ---------------------------------------------------------------- labels -> categories


@pytest.mark.parametrize(
    "label,category",
    [
        ("Exudate 1", "hard exudate"),
        ("exudate", "hard exudate"),
        ("  EXUDATE   1 ", "hard exudate"),
        ("Other Bright Lesion 1", "other bright lesion"),
        ("other  bright\tlesion 1", "other bright lesion"),
        ("MicroAneurysm 0", "microaneurysm"),
        ("Micro Aneurysm 0", "microaneurysm"),
        ("Intraretinal Hemmorhage 0", "haemorrhage"),
        ("Intraretinal Hemorrhage 0", "haemorrhage"),
        ("Haemorrhage 0", "haemorrhage"),
        ("Preretinal hemorrhage 0", "haemorrhage"),
        ("Cotton Wool Spot 1", "soft exudate"),
        ("cotton wool spot", "soft exudate"),
        # The labels of the full 169-image dataset beyond the sample's two.
        ("Flame Hemmorhage 0", "haemorrhage"),
        ("Bright Scar 1", "other bright lesion"),
        ("Soft Drusen 1", "other bright lesion"),
        ("Basal Laminar Drusen 1", "other bright lesion"),
        ("Drusen 1", "other bright lesion"),
        ("Artifact 1", None),
        ("Artifact", None),
        ("Fluid without CSME 0", None),
        ("fluid WITHOUT csme", None),
    ],
)
def test_blob_category(label, category):
    assert blob_category(label) == category


@pytest.mark.parametrize("label", ["", "Exudate 2", "Hemangioma 0", "Soft Drusen 2", "Fluid"])
def test_blob_category_unknown(label):
    with pytest.raises(HeimedFormatError) as info:
        blob_category(label)
    assert repr(label) in str(info.value)


def test_categories_vocabulary():
    assert HEIMED_CATEGORIES == (
        "hard exudate",
        "other bright lesion",
        "microaneurysm",
        "haemorrhage",
        "soft exudate",
    )


# ---------------------------------------------------------------- meta


def test_meta_and_optic_nerve(tmp_path):
    path = tmp_path / "0907440_(625).dcm.meta"
    path.write_bytes(
        b"~ImageName:~0907440_(625).dcm.jpg\r\n~PatientGender~F\r\n~QualityValue~0.4071071\r\n"
        b"~ONrow~788\r\n~ONcol~587.5\r\n~Note~a~b\r\n\r\n"
    )
    meta = read_meta(path)
    assert meta["ImageName:"] == "0907440_(625).dcm.jpg"
    assert meta["Note"] == "a~b"
    assert optic_nerve_center(meta) == (587.5, 788.0)


@pytest.mark.parametrize(
    "meta",
    [{}, {"ONrow": "788"}, {"ONrow": "788", "ONcol": "NA"}, {"ONrow": "nan", "ONcol": "5"}],
)
def test_optic_nerve_missing(meta):
    assert optic_nerve_center(meta) is None


@pytest.mark.parametrize("content", [b"PatientGender F\r\n", b"~~F\r\n", b"~A~1\r\n~A~2\r\n"])
def test_meta_malformed(tmp_path, content):
    path = tmp_path / "(bad).meta"
    path.write_bytes(content)
    with pytest.raises(HeimedFormatError) as info:
        read_meta(path)
    assert path.name in str(info.value)
