"""
Tests for the DIARETDB1 v2.1 converter on ground truth generated here in the published layout
(``ddb1_v02_01/images``, ``groundtruth/<image>_0K.xml`` with ``_plain.xml`` twins, the official
split lists): every region kind against a mask worked by hand, the experts' fusion, the optic-disc
landmark, bad files, and evaluation of a HEI-MED model's results on the conversion.
"""
import logging
import math
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pytest
from dataset_checks import decoded_instances, image_id_by_name, load_checked, read_json
from diaretdb1_layout import HEIGHT, WIDTH, circle, ellipse, four, polygon, write_dataset
from PIL import Image
from scipy import ndimage

from retina_d2.data.converters import ConversionError, ConvertOptions, get_converter
from retina_d2.data.converters import diaretdb1
from retina_d2.data.lesions import lesion

REPO = Path(__file__).resolve().parents[3]
QUIET = {"progress": False}


def convert(root: Path, out: Path, **kwargs) -> dict:
    options = ConvertOptions(**QUIET, **{k: kwargs.pop(k) for k in list(kwargs) if k in (
        "on_error", "min_area", "connectivity")})
    return diaretdb1.convert(root, out, options, **kwargs)


# ---------------------------------------------------------------- masks worked by hand

YY, XX = np.mgrid[:HEIGHT, :WIDTH]


def hand_circle(x, y, r) -> np.ndarray:
    return (XX - x) ** 2 + (YY - y) ** 2 <= r * r


def hand_ellipse(x, y, rx, ry, degrees) -> np.ndarray:
    # The x radius's axis points along (cos a, sin a) in (column, row) coordinates.
    a = math.radians(degrees)
    along = (XX - x) * math.cos(a) + (YY - y) * math.sin(a)
    across = -(XX - x) * math.sin(a) + (YY - y) * math.cos(a)
    return (along / rx) ** 2 + (across / ry) ** 2 <= 1


def instances(out: Path, split: str, stem: str, name: str, iscrowd: int = 0) -> List[np.ndarray]:
    """The decoded masks of one image's instances (or ignore regions) of one lesion."""
    manifest = read_json(out / "retina_d2.json")
    coco = load_checked(out / f"{split}.json", manifest["image_root"])
    image_id = image_id_by_name(coco, f"images/{stem}.png")
    return decoded_instances(coco, image_id, lesion(name).id, iscrowd)


def union(masks: Sequence[np.ndarray]) -> np.ndarray:
    result = np.zeros((HEIGHT, WIDTH), bool)
    for m in masks:
        result |= m
    return result


def record(out: Path, split: str, stem: str) -> dict:
    coco = read_json(out / f"{split}.json")
    (image,) = [i for i in coco["images"] if i["file_name"] == f"images/{stem}.png"]
    return image


IMG1, IMG2, IMG3 = "diaretdb1_image001", "diaretdb1_image002", "diaretdb1_image003"


def test_circle_ellipse_at_30_degrees_and_polygon_are_drawn_as_worked_by_hand(tmp_path):
    l_shape = [(10, 60), (30, 60), (30, 65), (15, 65), (15, 80), (10, 80)]
    markings = [
        circle(20, 20, 6),
        ellipse(70, 30, 14, 5, 30, kind="Haemorrhages"),
        polygon(l_shape, kind="Soft_exudates"),
    ]
    root = write_dataset(tmp_path, {IMG1: four(markings)}, [IMG1], [])
    out = tmp_path / "out"
    summary = convert(root, out)
    assert summary["skipped"] == []

    (exudate,) = instances(out, "train", IMG1, "hard exudate")
    assert np.array_equal(exudate, hand_circle(20, 20, 6))
    (haemorrhage,) = instances(out, "train", IMG1, "haemorrhage")
    assert np.array_equal(haemorrhage, hand_ellipse(70, 30, 14, 5, 30))
    # The angle's direction matters: the mirror image (-30 degrees) is another mask.
    assert not np.array_equal(haemorrhage, hand_ellipse(70, 30, 14, 5, -30))
    # Its lowest-right pixel lies below-right of the centre: turned towards +y (rows run down).
    rows, cols = np.nonzero(haemorrhage)
    assert rows[np.argmax(cols)] > 30
    (soft,) = instances(out, "train", IMG1, "soft exudate")
    # The L with its outline: two rectangles of pixel centres, bounds included.
    hand_l = ((XX >= 10) & (XX <= 30) & (YY >= 60) & (YY <= 65)) | (
        (XX >= 10) & (XX <= 15) & (YY >= 60) & (YY <= 80)
    )
    assert np.array_equal(soft, hand_l)
    assert instances(out, "train", IMG1, "microaneurysm") == []
    image = record(out, "train", IMG1)
    assert image["lesion_labels"] == {
        "hard exudate": 1, "soft exudate": 1, "haemorrhage": 1, "microaneurysm": 0,
        "neovascularization": 0, "intraretinal microvascular abnormality": 0,
    }
    assert image["annotated_category_ids"] == [1, 2, 3, 4]  # no other bright lesions marked


def test_self_intersecting_polygon_is_repaired_and_counted(tmp_path):
    # A bow tie crossing itself at (60, 40): two triangles meeting at that point.
    bow_tie = [(50, 30), (70, 50), (70, 30), (50, 50)]
    root = write_dataset(tmp_path, {IMG1: four([polygon(bow_tie)])}, [IMG1], [])
    out = tmp_path / "out"
    summary = convert(root, out)
    assert summary["notes"]["polygons_repaired"] == 4  # one per expert file
    hand = (np.abs(YY - 40) <= np.abs(XX - 60)) & (XX >= 50) & (XX <= 70)
    found = instances(out, "train", IMG1, "hard exudate")
    assert np.array_equal(union(found), hand)
    assert len(found) == 1  # the triangles touch at the crossing: one 8-connected lesion


def _mixed_experts() -> Tuple[List[List[dict]], np.ndarray]:
    """Four experts, overlapping exudate circles with mixed confidences, and the fused mask
    worked pixel by pixel: each expert's highest confidence covering the pixel (High 1, Medium
    2/3, Low 1/3, none 0), averaged over the four, kept where >= 0.75."""
    experts = [
        [circle(30, 40, 10, "High"), circle(90, 40, 8, "High")],
        [circle(34, 40, 10, "High"), circle(90, 40, 8, "Medium"), circle(30, 40, 4, "Low")],
        [circle(30, 44, 10, "Medium"), circle(90, 40, 8, "Medium")],
        [circle(30, 40, 12, "Low"), circle(30, 40, 6, "High"), circle(90, 40, 8, "Low")],
    ]
    value = {"High": 1.0, "Medium": 2 / 3, "Low": 1 / 3}
    fused = np.zeros((HEIGHT, WIDTH))
    for markings in experts:
        best = np.zeros((HEIGHT, WIDTH))
        for m in markings:
            (x, y), r = m["region"][1], m["region"][2]
            inside = (XX - x) ** 2 + (YY - y) ** 2 <= r * r
            best = np.where(inside, np.maximum(best, value[m["confidence"]]), best)
        fused += best / 4
    return experts, fused >= 0.75 - 1e-9


def test_four_experts_with_mixed_confidences_fuse_to_the_hand_computed_mask(tmp_path):
    experts, hand = _mixed_experts()
    # The circle at (90, 40) is High, Medium, Medium, Low: a mean of 2/3, below 0.75.
    assert not hand[40, 90]
    assert hand.any()
    root = write_dataset(tmp_path, {IMG1: experts}, [], [IMG1])
    out = tmp_path / "out"
    convert(root, out)
    found = instances(out, "test", IMG1, "hard exudate")
    assert np.array_equal(union(found), hand)
    _, expected_count = ndimage.label(hand, structure=np.ones((3, 3)))
    assert len(found) == expected_count
    semantic = np.asarray(Image.open(out / "semantic" / "test" / "images" / IMG1 / "EX.png"))
    assert np.array_equal(semantic == 1, hand)


def test_experts_disagreeing_below_the_threshold_give_no_instance(tmp_path):
    # Two experts sure, two silent: a mean of 0.5.
    experts = [[circle(40, 40, 8)], [circle(40, 40, 8)], [], []]
    root = write_dataset(tmp_path, {IMG1: experts}, [IMG1], [])
    convert(root, tmp_path / "mean")
    assert instances(tmp_path / "mean", "train", IMG1, "hard exudate") == []
    assert record(tmp_path / "mean", "train", IMG1)["lesion_labels"]["hard exudate"] == 0
    # The other fusions keep it: a threshold of 0.5, the union, or expert 2 alone.
    for name, flags in (("half", {"min_confidence": 0.5}), ("union", {"experts": "union"}),
                        ("expert2", {"experts": 2})):
        convert(root, tmp_path / name, **flags)
        (found,) = instances(tmp_path / name, "train", IMG1, "hard exudate")
        assert np.array_equal(found, hand_circle(40, 40, 8)), name
    convert(root, tmp_path / "expert3", experts=3)
    assert instances(tmp_path / "expert3", "train", IMG1, "hard exudate") == []


def test_three_sure_experts_of_four_reach_exactly_the_threshold(tmp_path):
    experts = [[circle(40, 40, 8)], [circle(40, 40, 8)], [circle(40, 40, 8)], []]
    root = write_dataset(tmp_path, {IMG1: experts}, [IMG1], [])
    convert(root, tmp_path / "out")
    (found,) = instances(tmp_path / "out", "train", IMG1, "hard exudate")
    assert np.array_equal(found, hand_circle(40, 40, 8))


def test_disc_markings_give_the_consensus_optic_disc_centre(tmp_path):
    square = [(96, 50), (110, 50), (110, 64), (96, 64)]  # centre (103, 57)
    experts = [
        [circle(100, 60, 9, kind="Disc"), circle(20, 20, 4)],
        [circle(104, 62, 10, "Medium", kind="Disc")],
        [polygon(square, "Low", kind="Disc")],
        [circle(10, 10, 3, kind="Fundus_area")],  # the fourth expert marked no disc
    ]
    root = write_dataset(tmp_path, {IMG1: experts, IMG2: four([])}, [IMG1], [IMG2])
    convert(root, tmp_path / "out")
    image = record(tmp_path / "out", "train", IMG1)
    assert image["optic_disc_center"] == pytest.approx([(100 + 104 + 103) / 3, (60 + 62 + 57) / 3])
    # The disc is a landmark, not a lesion: no instance, and Fundus_area draws nothing.
    assert all(not instances(tmp_path / "out", "train", IMG1, name) for name in diaretdb1.ANNOTATED)
    assert "optic_disc_center" not in record(tmp_path / "out", "test", IMG2)
    convert(root, tmp_path / "expert2", experts=2)
    assert record(tmp_path / "expert2", "train", IMG1)["optic_disc_center"] == [104, 62]


def test_split_lists_decide_the_splits_and_plain_twins_give_the_same_conversion(tmp_path):
    images = {IMG1: four([circle(20, 20, 5)]), IMG2: four([]), IMG3: four([circle(50, 50, 3)])}
    root = write_dataset(tmp_path, images, [IMG1], [IMG3, IMG2])
    summary = convert(tmp_path, tmp_path / "out")  # the folder holding ddb1_v02_01 works too
    assert set(summary["tasks"]["seg"]) == {"train", "test"}
    test = read_json(tmp_path / "out" / "test.json")
    assert [i["file_name"] for i in test["images"]] == [f"images/{IMG3}.png", f"images/{IMG2}.png"]
    manifest = read_json(tmp_path / "out" / "retina_d2.json")
    assert Path(manifest["image_root"]) == root.resolve()
    assert [c["name"] for c in manifest["categories"]] == [
        "microaneurysm", "haemorrhage", "hard exudate", "soft exudate", "other bright lesion"
    ]
    convert(root, tmp_path / "plain", plain=True)
    for split in ("train", "test"):
        assert read_json(tmp_path / "plain" / f"{split}.json") == read_json(
            tmp_path / "out" / f"{split}.json"
        )


def test_all_lesions_adds_neovascularization_and_irma(tmp_path):
    markings = [circle(20, 20, 5, kind="IRMA"), circle(60, 40, 6, kind="Neovascularisation")]
    root = write_dataset(tmp_path, {IMG1: four(markings)}, [IMG1], [])
    convert(root, tmp_path / "five")
    labels = record(tmp_path / "five", "train", IMG1)["lesion_labels"]
    assert labels["intraretinal microvascular abnormality"] == 1
    assert labels["neovascularization"] == 1
    assert len(read_json(tmp_path / "five" / "train.json")["annotations"]) == 0
    convert(root, tmp_path / "seven", all_lesions=True)
    (irma,) = instances(tmp_path / "seven", "train", IMG1, "intraretinal microvascular abnormality")
    assert np.array_equal(irma, hand_circle(20, 20, 5))
    (nv,) = instances(tmp_path / "seven", "train", IMG1, "neovascularization")
    assert np.array_equal(nv, hand_circle(60, 40, 6))


def test_unknown_marking_type_is_an_ignore_region_unless_stopping(tmp_path, caplog):
    markings = [circle(20, 20, 5), circle(60, 40, 6, "Low", kind="Drusen")]
    experts = [markings, [circle(20, 20, 5)], markings, markings]
    root = write_dataset(tmp_path, {IMG1: experts}, [IMG1], [])
    with caplog.at_level(logging.WARNING):
        summary = convert(root, tmp_path / "out")
    warned = [r.getMessage() for r in caplog.records if "'Drusen'" in r.getMessage()]
    assert len(warned) == 3 and f"{IMG1}_01.xml: marking 2" in warned[0]
    assert summary["notes"]["unknown_markings"] == 3
    for name in diaretdb1.ANNOTATED:
        (crowd,) = instances(tmp_path / "out", "train", IMG1, name, iscrowd=1)
        assert np.array_equal(crowd, hand_circle(60, 40, 6)), name
    with pytest.raises(ConversionError, match=f"{IMG1}_01.xml: marking 2: unknown DIARETDB1 "
                                              "marking type 'Drusen'"):
        convert(root, tmp_path / "stop", unknown_labels="stop")


@pytest.mark.parametrize(
    "text,message",
    [
        ("<imgannotooldata><markinglist><marking>", "not valid XML"),
        ("<annotation></annotation>", "root element is <annotation>"),
        ("<imgannotooldata><header/></imgannotooldata>", "no <markinglist>"),
        ("<imgannotooldata><markinglist><marking><confidencelevel>Sure</confidencelevel>"
         "<markingtype>Haemorrhages</markingtype></marking></markinglist></imgannotooldata>",
         "marking 1: confidence level 'Sure'"),
        ("<imgannotooldata><markinglist><marking><confidencelevel>High</confidencelevel>"
         "<markingtype>Haemorrhages</markingtype></marking></markinglist></imgannotooldata>",
         "marking 1: expected one of <circleregion>"),
        ("<imgannotooldata><markinglist><marking><circleregion><centroid><coords2d>4;5"
         "</coords2d></centroid><radius direction=\"x\">3</radius></circleregion>"
         "<confidencelevel>High</confidencelevel><markingtype>Haemorrhages</markingtype>"
         "</marking></markinglist></imgannotooldata>", "marking 1: centroid is '4;5'"),
    ],
)
def test_bad_xml_names_the_file(tmp_path, text, message):
    images = {IMG1: four([circle(20, 20, 5)]), IMG2: four([])}
    root = write_dataset(tmp_path, images, [IMG1, IMG2], [])
    bad = root / "groundtruth" / f"{IMG1}_03.xml"
    bad.write_text(text)
    with pytest.raises(ConversionError) as info:
        convert(root, tmp_path / "out")
    assert str(bad) in str(info.value) and message in str(info.value)
    assert not (tmp_path / "out" / "retina_d2.json").exists()
    summary = convert(root, tmp_path / "skip", on_error="skip")
    (skipped,) = summary["skipped"]
    assert skipped["file"].endswith(f"{IMG1}.png") and str(bad) in skipped["reason"]
    assert [i["file_name"] for i in read_json(tmp_path / "skip" / "train.json")["images"]] == [
        f"images/{IMG2}.png"
    ]


def test_layout_errors_name_the_file(tmp_path):
    root = write_dataset(tmp_path, {IMG1: four([]), IMG2: four([])}, [IMG1], [IMG2])
    (root / "groundtruth" / f"{IMG2}_04.xml").unlink()
    missing = f"{IMG2}_04.xml: missing .listed in .*test.txt, line 1"
    with pytest.raises(ConversionError, match=missing):
        convert(root, tmp_path / "out")
    (root / "ddb1_v02_01_test.txt").write_text(f"images/{IMG1}.png groundtruth/{IMG1}_01.xml\n")
    with pytest.raises(ConversionError, match="listed again"):
        convert(root, tmp_path / "out")
    (root / "ddb1_v02_01_test.txt").write_text(f"images/../../{IMG2}.png groundtruth/x.xml\n")
    with pytest.raises(ConversionError, match="not a path inside the dataset folder"):
        convert(root, tmp_path / "out")
    (root / "ddb1_v02_01_test.txt").unlink()
    with pytest.raises(ConversionError, match="ddb1_v02_01_test.txt, but no such file"):
        convert(root, tmp_path / "out")
    (root / "ddb1_v02_01_test.txt").write_text("")
    with pytest.raises(ConversionError, match=f"no ground truth of expert 7 .*{IMG1}.png"):
        convert(root, tmp_path / "out", experts=7)


def _convert_tool():
    """The convert_dataset tool, run in this process (a subprocess costs seconds)."""
    from retina_d2.tools import convert_dataset

    return convert_dataset


def test_command_line(tmp_path, capsys):
    bow_tie = [(50, 30), (70, 50), (70, 30), (50, 50)]
    root = write_dataset(tmp_path, {IMG1: [[polygon(bow_tie)], [], [], []], IMG2: four([])},
                         [IMG1], [IMG2])
    tool = _convert_tool()
    argv = ["diaretdb1", "--root", str(root), "--out", str(tmp_path / "out"), "--experts", "union"]
    assert tool.main(argv) == 0
    assert "polygons repaired: 1" in capsys.readouterr().out
    assert read_json(tmp_path / "out" / "summary.json")["notes"]["fusion"] == "any expert's marking"
    with pytest.raises(SystemExit) as info:
        tool.main(["diaretdb1", "--root", str(root), "--out", str(tmp_path / "x"),
                   "--experts", "most"])
    assert info.value.code == 2
    assert "--experts takes mean, union or an expert number" in capsys.readouterr().err


def test_registered_converter():
    assert get_converter("diaretdb1") is diaretdb1


# ---------------------------------------------------------------- cross-dataset evaluation


def _heimed_contiguous() -> Dict[int, int]:
    """A HEI-MED model's classes: the contiguous ids registration gives HEI-MED's categories."""
    from retina_d2.data.converters import heimed
    from retina_d2.data.lesions import coco_categories

    return {c["id"]: i for i, c in enumerate(coco_categories(heimed.CATEGORIES))}


def test_a_heimed_model_evaluates_on_a_diaretdb1_conversion_out_of_the_box(tmp_path, monkeypatch):
    """--eval-only with configs/maskrcnn_heimed.yaml and DATASETS.TEST = a DIARETDB1 split: the
    config check passes (5 classes), the model's class ids map to the right lesions, and the
    results file it writes evaluates with tools/evaluate.py."""
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.structures import Boxes, Instances

    from retina_d2.engine.trainer import setup_cfg
    from retina_d2.evaluation import LesionInstanceEvaluator

    markings = [circle(30, 30, 6), ellipse(80, 50, 10, 4, 30, kind="Haemorrhages")]
    write_dataset(tmp_path / "raw", {IMG1: four(markings), IMG2: four([])}, [IMG2], [IMG1])
    datasets = tmp_path / "datasets"
    convert(tmp_path / "raw", datasets / "diaretdb1")
    monkeypatch.setenv("RETINA_D2_DATASETS", str(datasets))
    names = ("diaretdb1_seg_train", "diaretdb1_seg_test")
    try:
        cfg = setup_cfg(
            str(REPO / "configs" / "maskrcnn_heimed.yaml"),
            ["DATASETS.TRAIN", f"('{names[0]}',)", "DATASETS.TEST", f"('{names[1]}',)",
             "OUTPUT_DIR", str(tmp_path / "run")],
        )
        assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 5
        metadata = MetadataCatalog.get(names[1])
        assert metadata.thing_dataset_id_to_contiguous_id == _heimed_contiguous()

        # What a HEI-MED model outputs: its own class ids (hard exudate 2, other bright lesion 4).
        heimed_class = _heimed_contiguous()
        predictions = [
            (hand_circle(30, 30, 6), lesion("hard exudate").id, 0.9),
            (hand_ellipse(80, 50, 10, 4, 30), lesion("haemorrhage").id, 0.8),
            (hand_circle(100, 20, 5), lesion("other bright lesion").id, 0.7),
        ]
        (record,) = DatasetCatalog.get(names[1])
        assert record["lesion_labels"]["hard exudate"] == 1  # registration carries the field
        instances = Instances((HEIGHT, WIDTH))
        instances.pred_masks = torch.from_numpy(np.stack([m for m, _, _ in predictions]))
        boxes = [[*np.argwhere(m)[:, ::-1].min(0), *(np.argwhere(m)[:, ::-1].max(0) + 1)]
                 for m, _, _ in predictions]
        instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        instances.scores = torch.tensor([s for _, _, s in predictions])
        instances.pred_classes = torch.tensor([heimed_class[c] for _, c, _ in predictions])
        evaluator = LesionInstanceEvaluator(names[1], output_dir=str(tmp_path / "eval"),
                                            distributed=False)
        evaluator.reset()
        evaluator.process([record], [{"instances": instances}])
        metrics = evaluator.evaluate()
    finally:
        for name in names:
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)
    assert metrics["segm"]["AP50-hard exudate"] == pytest.approx(100)
    assert metrics["segm"]["AP50-haemorrhage"] == pytest.approx(100)
    assert math.isnan(metrics["segm"]["AP50-other bright lesion"])  # not annotated here

    # The results file (HEI-MED vocabulary ids) against the DIARETDB1 GT, from the command line.
    results = tmp_path / "eval" / "coco_instances_results.json"
    saved = read_json(results)
    assert sorted(r["category_id"] for r in saved) == sorted(c for _, c, _ in predictions)
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "evaluate.py"), "--gt",
         str(datasets / "diaretdb1" / "test.json"), "--predictions", str(results),
         "--json", str(tmp_path / "metrics.json")],
        capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr
    written = read_json(tmp_path / "metrics.json")
    assert written["segm"]["AP50-hard exudate"] == pytest.approx(100)
    assert written["segm"]["AP50-haemorrhage"] == pytest.approx(100)
