"""The e-ophtha Mask R-CNN paper's data in the converter: its 195 lesion images split 155/20/20
by a fixed rule (--paper-split), and microaneurysms dilated as the paper did, on the eye at a
1024 px field of view before instance splitting (--ma-dilation-scale 1024)."""
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from dataset_checks import (
    EIGHT_CONNECTED,
    decoded_instances,
    image_id_by_name,
    load_checked,
    read_json,
)
from retina_d2.data.converters import eophtha
from retina_d2.data.converters.base import ConversionError, ConvertOptions, Sample
from retina_d2.data.lesions import lesion
from retina_d2.data.preprocess import field_of_view_diameter
from test_eophtha import _ma_sources, make_eophtha

MA_ID = lesion("microaneurysm").id
EX_ID = lesion("hard exudate").id


def _listed(ex=47, ma=148, healthy=3):
    """(subset, folder, sample) as the converter lists them; no files are needed."""
    out = []
    for key, count in (("EX", ex), ("MA", ma)):
        subset = eophtha.SUBSETS[key]
        folder = Path("/data") / subset.folder
        for i in range(count):
            out.append((subset, folder, Sample(folder / key / f"E{i % 7:07d}" / f"C{i:07d}.jpg")))
        for i in range(healthy):
            out.append((subset, folder, Sample(folder / "healthy" / "E1" / f"H{i}.jpg")))
    return out


def test_paper_split_is_155_20_20_of_the_lesion_images_by_sha256_order():
    listed = _listed()
    splits = eophtha.paper_split_samples(listed)
    assert {k: len(v) for k, v in splits.items()} == {"train": 155, "val": 20, "test": 20}
    names = {id(s): eophtha._full_name(sub, folder, s) for sub, folder, s in listed}
    chosen = [names[id(s)] for split in splits.values() for s in split]
    assert len(set(chosen)) == 195 and not any("/healthy/" in n for n in chosen)
    # The rule, computed independently: per subset, SHA-256 order; test first, then val.
    for key, shares in (("EX", (5, 5)), ("MA", (15, 15))):
        folder = f"e_optha_{key}/{key}/"
        ordered = sorted((n for n in names.values() if n.startswith(folder)),
                         key=lambda n: hashlib.sha256(n.encode()).hexdigest())
        in_split = {k: [names[id(s)] for s in v if names[id(s)].startswith(folder)]
                    for k, v in splits.items()}
        assert in_split["test"] == ordered[: shares[0]]
        assert in_split["val"] == ordered[shares[0] : sum(shares)]
        assert sorted(in_split["train"]) == sorted(ordered[sum(shares) :])
    # The same on any listing order.
    again = eophtha.paper_split_samples(list(reversed(listed)))
    assert {k: [names[id(s)] for s in v] for k, v in again.items()} == {
        k: [names[id(s)] for s in v] for k, v in splits.items()
    }


def test_paper_split_refuses_other_image_counts(tmp_path):
    with pytest.raises(ConversionError, match="EX 47, MA 148"):
        eophtha.paper_split_samples(_listed(ex=46))
    make_eophtha(tmp_path / "raw")  # a tiny fixture is not the published dataset
    with pytest.raises(ConversionError, match="--paper-split"):
        eophtha.convert(tmp_path / "raw", tmp_path / "out", ConvertOptions(progress=False),
                        paper_split=True)
    with pytest.raises(ConversionError, match="give one"):
        eophtha.convert(tmp_path / "raw", tmp_path / "out2", ConvertOptions(progress=False),
                        paper_split=True, split_file=tmp_path / "s.json")


def test_dilation_at_fov_scale_by_hand():
    mask = np.zeros((41, 41), bool)
    mask[20, 20] = True
    # 5x5 twice at 1024 px reaches 4 px: a 9x9 square; at a 2048 px FOV, 8 px: 17x17.
    assert eophtha.dilate_at_fov_scale(mask, 1024).sum() == 81
    grown = eophtha.dilate_at_fov_scale(mask, 2048)
    assert grown.sum() == 17 * 17 and grown[12:29, 12:29].all()
    assert eophtha.dilate_at_fov_scale(mask, 100).sum() == 1  # under half a pixel: none


def test_ma_dilated_at_fov_scale_before_splitting(tmp_path, monkeypatch):
    # The fixture's eyes are 60 px wide: a 30 px "paper width" makes the reach 2x4 = 8 px there,
    # the scale at which the close pair (2 px apart) merges into one instance.
    monkeypatch.setattr(eophtha, "PAPER_DILATION_WIDTH", 30)
    truth = make_eophtha(tmp_path / "raw")
    out = tmp_path / "out"
    eophtha.convert(tmp_path / "raw", out, ConvertOptions(progress=False),
                    ma_dilation_scale="1024")
    manifest = read_json(out / "retina_d2.json")
    assert manifest["options"]["dilation"] == {}  # no per-instance dilation on top
    coco = load_checked(out / "all.json", manifest["image_root"])
    root = tmp_path / "raw"
    for file_name, source in _ma_sources(truth).items():
        image = np.asarray(Image.open(root / file_name).convert("RGB"))
        diameter = field_of_view_diameter(image, 20) or max(image.shape[:2])
        expected = eophtha.dilate_at_fov_scale(source, diameter)
        assert expected.sum() > source.sum()
        instances = decoded_instances(coco, image_id_by_name(coco, file_name), MA_ID)
        labels, count = ndimage.label(expected, structure=EIGHT_CONNECTED)
        assert len(instances) == count < ndimage.label(source, structure=EIGHT_CONNECTED)[1]
        assert sorted(m.sum() for m in instances) == sorted(
            (labels == k).sum() for k in range(1, count + 1)
        )
        record = coco.loadImgs([image_id_by_name(coco, file_name)])[0]
        semantic = np.asarray(Image.open(out / record["sem_seg_files"]["microaneurysm"]))
        np.testing.assert_array_equal(semantic, expected.astype(np.uint8))


def test_command_line_flags_of_the_paper():
    import argparse

    parser = argparse.ArgumentParser()
    eophtha.add_arguments(parser)
    args = parser.parse_args(["--paper-split", "--ma-dilation-scale", "1024"])
    assert args.paper_split and args.ma_dilation_scale == "1024"
    with pytest.raises(SystemExit):
        parser.parse_args(["--ma-dilation-scale", "512"])
