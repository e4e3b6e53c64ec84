"""The embedded default dataset: generate, convert, register, load."""
import json

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from dataset_checks import assert_instances_match_mask, image_id_by_name, load_checked
from retina_d2.data.converters import ConversionError, ConvertOptions, synthetic
from retina_d2.data.register import register_all


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    out = root / "synthetic"
    summary = synthetic.convert(None, out, ConvertOptions(progress=False), count=6, size=192, seed=3)
    return root, out, summary


def test_instances_equal_generated_masks(converted):
    _, out, _ = converted
    manifest = json.loads((out / "retina_d2.json").read_text())
    assert manifest["image_root"] == "raw"
    for split in ("train", "val"):
        coco = load_checked(out / f"{split}.json", out / "raw")
        for image in coco.dataset["images"]:
            stem = image["file_name"].split("/")[-1][:-4]
            for cat in coco.dataset["categories"]:
                from retina_d2.data.lesions import lesion

                abbrev = lesion(cat["name"]).abbrev
                source = np.asarray(Image.open(out / "raw" / "masks" / abbrev / f"{stem}.png")) > 0
                assert_instances_match_mask(coco, image["id"], cat["id"], source)
            assert image["dr_grade"] in range(5) and len(image["optic_disc_center"]) == 2


def test_counts_agree_with_generator(converted):
    _, out, _ = converted
    counts = {}
    for line in (out / "raw" / "counts.csv").read_text().splitlines()[1:]:
        name, *values = line.split(",")
        counts[name] = dict(zip(["MA", "HE", "EX", "SE", "OD"], map(int, values)))
    coco = load_checked(out / "train.json", out / "raw")
    for image in coco.dataset["images"]:
        stem = image["file_name"].split("/")[-1][:-4]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        n_ma = sum(1 for a in anns if a["category_id"] == 1)
        assert n_ma == counts[stem]["MA"]
        assert image_id_by_name(coco, image["file_name"]) == image["id"]


def test_semantic_targets_written_and_referenced(converted):
    _, out, _ = converted
    coco = json.loads((out / "val.json").read_text())
    image = coco["images"][0]
    files = image["sem_seg_files"]
    assert set(files) == {"microaneurysm", "haemorrhage", "hard exudate", "soft exudate", "optic disc"}
    target = np.asarray(Image.open(out / files["optic disc"]))
    assert target.shape == (image["height"], image["width"]) and set(np.unique(target)) == {0, 1}


def test_register_all_and_load_from_catalog(converted):
    root, _, _ = converted
    names = register_all(root, replace=True)
    (registered,) = names.values()
    assert sorted(registered) == ["synthetic_seg_train", "synthetic_seg_val"]
    dicts = DatasetCatalog.get("synthetic_seg_val")
    assert dicts and all("sem_seg_files" in d and "dr_grade" in d for d in dicts)
    assert all(p.startswith("/") for d in dicts for p in d["sem_seg_files"].values())
    meta = MetadataCatalog.get("synthetic_seg_val")
    assert meta.thing_classes[0] == "microaneurysm" and meta.evaluator_type == "coco"


def test_existing_output_is_refused_without_overwrite(converted):
    _, out, _ = converted
    before = (out / "train.json").read_bytes()
    with pytest.raises(ConversionError, match="--overwrite"):
        synthetic.convert(None, out, ConvertOptions(progress=False), count=2, size=128)
    assert (out / "train.json").read_bytes() == before


def test_interrupted_run_leaves_no_partial_file(tmp_path, monkeypatch):
    import retina_d2.data.converters.base as base

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    # Interrupt while the COCO file is being serialized.
    monkeypatch.setattr(base.json, "dump", explode)
    with pytest.raises(KeyboardInterrupt):
        synthetic.convert(None, tmp_path / "out", ConvertOptions(progress=False), count=2, size=128)
    leftovers = [p.name for p in (tmp_path / "out").iterdir() if p.is_file()]
    assert leftovers == [], leftovers


def test_a_changed_datasets_root_is_followed_and_hand_registrations_are_kept(tmp_path):
    # Two runs in one process with different RETINA_D2_DATASETS: the second must read its own
    # images, not the first root's.
    roots = []
    for k, count in enumerate((2, 3)):
        root = tmp_path / f"root{k}"
        synthetic.convert(None, root / "synthetic", ConvertOptions(progress=False), count=count,
                          size=128)
        roots.append(root)
    for root in roots + roots[:1]:
        register_all(root)
        files = {d["file_name"] for d in DatasetCatalog.get("synthetic_seg_train")}
        assert files and all(f.startswith(str(root.resolve())) for f in files), (root, files)
    # A name registered by hand, not by register_all, stays the user's.
    DatasetCatalog.remove("synthetic_seg_val")
    MetadataCatalog.remove("synthetic_seg_val")
    DatasetCatalog.register("synthetic_seg_val", lambda: [{"file_name": "mine.png"}])
    register_all(roots[1])
    assert DatasetCatalog.get("synthetic_seg_val") == [{"file_name": "mine.png"}]
    register_all(roots[1], replace=True)
    assert DatasetCatalog.get("synthetic_seg_val")[0]["file_name"] != "mine.png"
