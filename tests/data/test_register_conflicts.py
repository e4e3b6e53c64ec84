"""register_all on a datasets root that holds two conversions of one dataset, or a corrupt
manifest: no silent winner, no anonymous JSONDecodeError, everything else still registers."""
import json
import logging
import shutil
from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog

from retina_d2.config import ConfigError
from retina_d2.data.converters import ConvertOptions, synthetic
from retina_d2.data.register import (
    ManifestError,
    explain_unregistered,
    read_manifest,
    register_all,
)
from retina_d2.engine import setup_cfg

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "maskrcnn_synthetic.yaml")
# Dataset names of their own, so that this file leaves the "synthetic_*" registrations alone.
TWIN, OTHER = "twinset", "otherset"


@pytest.fixture(scope="module")
def conversion(tmp_path_factory):
    """One small synthetic conversion to copy from."""
    out = tmp_path_factory.mktemp("conversion") / "synthetic"
    synthetic.convert(None, out, ConvertOptions(progress=False), count=2, size=128, seed=5)
    return out


def copy_as(conversion: Path, folder: Path, dataset: str) -> Path:
    """A copy of the conversion whose manifest names ``dataset``."""
    shutil.copytree(conversion, folder)
    manifest = json.loads((folder / "retina_d2.json").read_text())
    manifest["dataset"] = dataset
    (folder / "retina_d2.json").write_text(json.dumps(manifest))
    return folder


def file_names(name):
    return {record["file_name"] for record in DatasetCatalog.get(name)}


def config_asking_for(name):
    return setup_cfg(CONFIG, ["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()"])


def test_two_conversions_of_one_dataset_register_neither_and_name_both(
    conversion, tmp_path, monkeypatch, caplog
):
    root = tmp_path / "datasets"
    current = copy_as(conversion, root / "twin", TWIN)
    old = copy_as(conversion, root / "twin_old", TWIN)
    other = copy_as(conversion, root / "other", OTHER)
    # Registered earlier in the process from a root holding only one: must not linger.
    solo_root = tmp_path / "solo"
    copy_as(conversion, solo_root / "twin", TWIN)
    register_all(solo_root)
    assert f"{TWIN}_seg_train" in DatasetCatalog.list()

    with caplog.at_level(logging.WARNING, logger="retina_d2.data.register"):
        found = register_all(root)
    for name in (f"{TWIN}_seg_train", f"{TWIN}_seg_val"):
        assert name not in DatasetCatalog.list(), "the last in sort order silently won"
        why = explain_unregistered(name)
        assert str(current.resolve()) in why and str(old.resolve()) in why
        assert "RETINA_D2_DATASETS" in why
    assert str(current.resolve()) in caplog.text and str(old.resolve()) in caplog.text
    # The other dataset under the same root is unaffected.
    assert sorted(found[str(other.resolve())]) == [f"{OTHER}_seg_train", f"{OTHER}_seg_val"]
    assert file_names(f"{OTHER}_seg_train") and all(
        f.startswith(str(other.resolve())) for f in file_names(f"{OTHER}_seg_train")
    )

    # A config that asks for the name: one error naming both folders and how to choose.
    monkeypatch.setenv("RETINA_D2_DATASETS", str(root))
    with pytest.raises(ConfigError) as info:
        config_asking_for(f"{TWIN}_seg_train")
    message = str(info.value)
    assert str(current.resolve()) in message and str(old.resolve()) in message
    assert "Remove all but one" in message and "point RETINA_D2_DATASETS at" in message

    # The remedy the message gives: RETINA_D2_DATASETS at the conversion folder to use.
    monkeypatch.setenv("RETINA_D2_DATASETS", str(old))
    config_asking_for(f"{TWIN}_seg_train")
    files = file_names(f"{TWIN}_seg_train")
    assert files and all(f.startswith(str(old.resolve())) for f in files), files


def test_conversions_of_one_dataset_with_different_splits_both_register(conversion, tmp_path):
    # Only names two folders would both register are withheld.
    root = tmp_path / "datasets"
    first = copy_as(conversion, root / "a", TWIN)
    second = copy_as(conversion, root / "b", TWIN)
    manifest = json.loads((second / "retina_d2.json").read_text())
    val = manifest["tasks"]["seg"]["val"]
    manifest["tasks"]["seg"] = {"val": val, "test": val}  # val in both, test only here
    (second / "retina_d2.json").write_text(json.dumps(manifest))
    found = register_all(root)
    assert found[str(second.resolve())] == [f"{TWIN}_seg_test"]
    assert found[str(first.resolve())] == [f"{TWIN}_seg_train"]
    assert f"{TWIN}_seg_val" not in DatasetCatalog.list()
    assert all(f.startswith(str(second.resolve())) for f in file_names(f"{TWIN}_seg_test"))


@pytest.mark.parametrize(
    "text, problem",
    [
        ('{"dataset": "broken", "tasks": {', "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2]", "a JSON list, not an object"),
        ('{"dataset": "broken", "image_root": "raw"}', "tasks is not"),
        ('{"image_root": "raw", "tasks": {}}', "no dataset name"),
    ],
)
def test_a_corrupt_manifest_is_skipped_with_a_warning_naming_it(
    conversion, tmp_path, monkeypatch, caplog, text, problem
):
    root = tmp_path / "datasets"
    good = copy_as(conversion, root / "other", OTHER)
    broken = root / "zz" / "nested" / "retina_d2.json"
    broken.parent.mkdir(parents=True)
    broken.write_text(text)

    with pytest.raises(ManifestError, match=f"{broken}: .*{problem}"):
        read_manifest(broken.parent)
    with caplog.at_level(logging.WARNING, logger="retina_d2.data.register"):
        found = register_all(root)
    assert str(broken.resolve()) in caplog.text and problem in caplog.text
    assert sorted(found) == [str(good.resolve())]
    assert file_names(f"{OTHER}_seg_val")

    # Every tool still works on the datasets that read; asking for one that may have been in
    # the corrupt manifest names it.
    monkeypatch.setenv("RETINA_D2_DATASETS", str(root))
    config_asking_for(f"{OTHER}_seg_train")
    with pytest.raises(ConfigError) as info:
        config_asking_for("broken_seg_train")
    assert "'broken_seg_train' is not registered" in str(info.value)
    assert str(broken.resolve()) in str(info.value) and problem in str(info.value)


def test_the_datasets_root_may_be_one_conversion_folder(conversion, tmp_path):
    folder = copy_as(conversion, tmp_path / "only", OTHER)
    found = register_all(folder)
    assert sorted(found[str(folder.resolve())]) == [f"{OTHER}_seg_train", f"{OTHER}_seg_val"]
    assert explain_unregistered(f"{OTHER}_seg_test") is None


def test_train_net_prints_one_error_line_for_an_ambiguous_dataset(
    conversion, tmp_path, monkeypatch, capsys
):
    from retina_d2.tools import train_net

    root = tmp_path / "datasets"
    first = copy_as(conversion, root / "twin", TWIN)
    second = copy_as(conversion, root / "twin_old", TWIN)
    monkeypatch.setenv("RETINA_D2_DATASETS", str(root))
    argv = ["--config-file", CONFIG, "OUTPUT_DIR", str(tmp_path / "out")]
    argv += ["DATASETS.TRAIN", f"('{TWIN}_seg_train',)", "DATASETS.TEST", "()"]
    with pytest.raises(SystemExit) as exit_info:
        train_net.cli(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    # (register_all's warning may print before it, outside pytest's log capture.)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert str(first.resolve()) in errors[0] and str(second.resolve()) in errors[0]
    assert not (tmp_path / "out").exists()
