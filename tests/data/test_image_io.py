"""Image reading: a 16-bit greyscale photograph is scaled to 8 bit (Detectron2 clips it to
0/255), a 16-bit mask reads as nonzero = lesion, 8-bit images read exactly as Detectron2 reads
them, and a truncated image's error names the file (in the mapper too)."""
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from detectron2.data import detection_utils
from PIL import Image

from retina_d2.config import get_retina_cfg
from retina_d2.data.converters import ConversionError, ConvertOptions, synthetic
from retina_d2.data.converters.base import read_mask
from retina_d2.data.image_io import ImageReadError, mask_to_8bit, read_image
from retina_d2.data.mapper import LesionDatasetMapper


def gradient16(height=48, width=64):
    """A 16-bit greyscale 'photograph' spanning 0..65535, every value distinct-ish."""
    values = np.linspace(0, 65535, height * width).round().astype(np.uint16)
    return values.reshape(height, width)


def by_hand(values16):
    """The documented scaling, worked independently: round(v * 255 / 65535)."""
    return np.floor(values16.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)


@pytest.fixture
def grey16(tmp_path):
    path = tmp_path / "eye16.png"
    values = gradient16()
    assert cv2.imwrite(str(path), values)
    assert Image.open(path).mode == "I;16"
    return path, values


def test_16bit_greyscale_photograph_is_scaled_not_binarised(grey16):
    path, values = grey16
    expected = by_hand(values)
    rgb = read_image(str(path), format="RGB")
    assert rgb.dtype == np.uint8 and rgb.shape == values.shape + (3,)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], expected)
    np.testing.assert_array_equal(read_image(str(path), format="BGR")[..., 0], expected)
    np.testing.assert_array_equal(read_image(str(path), format="L")[..., 0], expected)
    assert len(np.unique(rgb)) == 256
    # What Detectron2's reader gives (the bug): everything above 255 becomes 255.
    theirs = detection_utils.read_image(str(path), format="RGB")
    assert (theirs == 255).mean() > 0.99


def test_16bit_rgb_photograph_keeps_its_range(tmp_path):
    values = np.stack([gradient16(), gradient16()[::-1], np.full((48, 64), 40000, np.uint16)], -1)
    path = tmp_path / "eye48.png"
    assert cv2.imwrite(str(path), values[..., ::-1])  # OpenCV writes BGR
    rgb = read_image(str(path), format="RGB")
    assert rgb.dtype == np.uint8
    # PIL reduces 16-bit RGB to its high byte: within one level of the exact scaling.
    assert np.abs(rgb.astype(int) - by_hand(values).astype(int)).max() <= 1


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
@pytest.mark.parametrize("fmt", ["RGB", "BGR"])
def test_8bit_images_read_exactly_as_detectron2_reads_them(tmp_path, suffix, fmt):
    rng = np.random.RandomState(0)
    pixels = (rng.rand(30, 50, 3) * 255).astype(np.uint8)
    path = tmp_path / f"eye{suffix}"
    Image.fromarray(pixels).save(path)
    np.testing.assert_array_equal(
        read_image(str(path), format=fmt), detection_utils.read_image(str(path), format=fmt)
    )


def test_exif_orientation_is_applied_as_detectron2_applies_it(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:5, :10] = 255  # a corner that shows the rotation
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(pixels).save(path, exif=exif, quality=100)
    ours = read_image(str(path), format="RGB")
    assert ours.shape == (40, 20, 3)
    np.testing.assert_array_equal(ours, detection_utils.read_image(str(path), format="RGB"))


def truncated_jpeg(tmp_path):
    rng = np.random.RandomState(1)
    path = tmp_path / "cut_in_half.jpg"
    Image.fromarray((rng.rand(120, 160, 3) * 255).astype(np.uint8)).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_a_truncated_or_missing_image_is_named(tmp_path):
    path = truncated_jpeg(tmp_path)
    with pytest.raises(OSError) as theirs:  # Detectron2's message does not name the file
        detection_utils.read_image(str(path), format="RGB")
    assert path.name not in str(theirs.value)
    with pytest.raises(ImageReadError, match=f"{path}: unreadable or truncated image"):
        read_image(str(path), format="RGB")
    with pytest.raises(ImageReadError, match="nope.png: no such file"):
        read_image(str(tmp_path / "nope.png"))
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ImageReadError, match="notes.png: unreadable"):
        read_image(str(text))


def _plain_cfg():
    """No FOV crop, no resize: the mapper's image is the read image."""
    cfg = get_retina_cfg()
    cfg.INPUT.FORMAT = "RGB"
    cfg.INPUT.MIN_SIZE_TEST = 0
    cfg.RETINA.PREPROCESS.FOV_CROP = False
    return cfg


def test_the_mapper_reads_16bit_scaled_and_names_a_truncated_image(grey16, tmp_path):
    path, values = grey16
    mapper = LesionDatasetMapper(_plain_cfg(), is_train=False)
    mapped = mapper({"file_name": str(path), "height": 48, "width": 64, "image_id": 1})
    image = mapped["image"].numpy()
    for channel in range(3):
        np.testing.assert_array_equal(image[channel], by_hand(values))

    cut = truncated_jpeg(tmp_path)
    with pytest.raises(ImageReadError, match=str(cut)):
        mapper({"file_name": str(cut), "height": 120, "width": 160, "image_id": 2})


# --- masks: labels, not intensities -----------------------------------------------------------


@pytest.mark.parametrize(
    "values, expected",
    [
        ((0, 65535), (0, 255)),  # a binary mask saved as 16-bit
        ((0, 1), (0, 1)),  # 0/1 stays (split_mask_values takes 1 as the lesion value)
        ((0, 1000), (0, 255)),  # one nonzero value, not a multiple of 257: nonzero = lesion
        ((0, 127 * 257, 65535), (0, 127, 255)),  # an 8-bit mask with an ignore value, stretched
    ],
)
def test_16bit_masks_read_as_nonzero_lesion(tmp_path, values, expected):
    arr = np.zeros((10, 12), np.uint16)
    for k, v in enumerate(values):
        arr[:, 4 * k : 4 * k + 4] = v
    path = tmp_path / "mask16.png"
    assert cv2.imwrite(str(path), arr)
    read = read_mask(path, (10, 12), tmp_path / "eye.jpg")
    assert read.dtype == np.uint8
    for k, v in enumerate(expected):
        assert (read[:, 4 * k : 4 * k + 4] == v).all(), (k, np.unique(read))


def test_a_16bit_label_image_is_refused_naming_the_file(tmp_path):
    arr = np.zeros((10, 12), np.uint16)
    arr[:3], arr[5:] = 300, 600
    path = tmp_path / "labels16.png"
    assert cv2.imwrite(str(path), arr)
    expected = r"labels16.png: uint16 mask with values \[300, 600\]"
    with pytest.raises(ConversionError, match=expected):
        read_mask(path, (10, 12), tmp_path / "eye.jpg")
    with pytest.raises(ValueError, match="negative"):
        mask_to_8bit(np.array([[0, -1]], np.int32))


def test_a_conversion_of_16bit_masks_equals_that_of_8bit_masks(tmp_path):
    # The same synthetic generation twice: once as written (8-bit 0/255 masks), once with every
    # mask saved as 16-bit 0/65535. The instances must be identical.
    first = tmp_path / "eight"
    synthetic.convert(None, first, ConvertOptions(progress=False), count=3, size=128, seed=2)
    raw16 = tmp_path / "raw16"
    shutil.copytree(first / "raw", raw16)
    converted = 0
    for mask in sorted((raw16 / "masks").rglob("*.png")):
        binary = np.asarray(Image.open(mask)) > 0
        assert cv2.imwrite(str(mask), binary.astype(np.uint16) * 65535)
        converted += binary.any()
    assert converted, "the generation has no lesion to compare"
    second = tmp_path / "sixteen"
    synthetic.convert(raw16, second, ConvertOptions(progress=False))

    def annotations(out):
        found = {}
        for split in ("train", "val"):
            coco = json.loads((out / f"{split}.json").read_text())
            names = {img["id"]: Path(img["file_name"]).name for img in coco["images"]}
            for a in coco["annotations"]:
                key = (names[a["image_id"]], a["category_id"], json.dumps(a["segmentation"]))
                found[key] = found.get(key, 0) + 1
        return found

    eight, sixteen = annotations(first), annotations(second)
    assert eight and sixteen == eight
