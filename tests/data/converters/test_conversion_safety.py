"""What a conversion writes and deletes: nothing outside --out whatever the raw data names,
only its own files replaced by --overwrite, nothing half-done after an interruption, leftovers
of interrupted runs cleaned, symlinked dataset folders followed, and the umask's permissions."""
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dataset_checks import load_checked
from retina_d2.data.converters import ConversionError, ConvertOptions, synthetic
from retina_d2.data.converters import base
from retina_d2.data.converters.base import (
    MANIFEST_NAME,
    REPLACED_MANIFEST_NAME,
    OutputError,
    Sample,
    atomic_write,
    convert_samples,
)
from retina_d2.data.synthetic import generate_dataset

REPO = Path(__file__).resolve().parents[3]
QUIET = dict(progress=False)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """One synthetic generation (4 photographs of 128 px, splits train/val), copied per test."""
    raw = tmp_path_factory.mktemp("generated") / "raw"
    generate_dataset(raw, count=4, size=128, seed=1, val_fraction=0.5)
    return raw


@pytest.fixture
def raw(generated, tmp_path):
    copy = tmp_path / "raw"
    shutil.copytree(generated, copy)
    return copy


def _splits(raw: Path, splits: dict) -> None:
    (raw / "splits.json").write_text(json.dumps(splits))


def _tree(folder: Path) -> dict:
    """Every file below ``folder`` -> (inode, mtime): a rewritten file gets a new pair."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def _stems(raw: Path):
    return json.loads((raw / "splits.json").read_text())


# --- nothing outside --out ------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../../escaped", "ABSOLUTE"])
def test_split_names_that_leave_the_output_folder_are_refused(raw, tmp_path, bad):
    bad = str(tmp_path / "abs" / "escaped") if bad == "ABSOLUTE" else bad
    stems = [s for names in _stems(raw).values() for s in names]
    _splits(raw, {"train": stems[:2], bad: stems[2:]})
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(ConversionError) as caught:
        synthetic.convert(raw, out, ConvertOptions(**QUIET))
    message = str(caught.value)
    assert str(raw / "splits.json") in message and repr(bad) in message
    # Nothing written anywhere: not the escaped JSON, not its semantic targets.
    written = [p for p in tmp_path.rglob("*") if p.is_file() and raw not in p.parents]
    assert written == []


def test_image_names_that_leave_the_images_folder_are_refused(raw, tmp_path):
    (tmp_path / "x.png").write_bytes((raw / "images" / "synth_0000.png").read_bytes())
    _splits(raw, {"train": ["synth_0001", "../../x"]})
    with pytest.raises(ConversionError, match=r"splits\.json: image name '\.\./\.\./x'"):
        synthetic.convert(raw, tmp_path / "out", ConvertOptions(**QUIET))


def test_the_tool_prints_one_error_line_for_an_escaping_split(raw, tmp_path):
    stems = _stems(raw)["train"]
    _splits(raw, {"../../x": stems})
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_dataset.py"), "synthetic", "--root",
         str(raw), "--out", str(tmp_path / "out")], capture_output=True, text=True,
    )
    assert done.returncode == 2  # bad input, as every tool reports it
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "splits.json" in errors[0] and "'../../x'" in errors[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "x.json").exists() and not (tmp_path.parent / "x.json").exists()


def test_every_converter_gets_plain_split_names_checked(raw, tmp_path):
    """convert_samples checks task and split names itself: a converter that forgot to cannot
    write outside."""
    sample = Sample(image=raw / "images" / "synth_0000.png", masks={})
    for tasks in ({"seg": {"../up": [sample]}}, {"../grading": {"train": [sample]}},
                  {"seg": {"/abs": [sample]}}):
        with pytest.raises(ConversionError, match="not a plain name"):
            convert_samples("toy", tasks, raw, tmp_path / "out", [], ConvertOptions(**QUIET))
    assert not (tmp_path / "out").exists() and not (tmp_path / "up.json").exists()


def test_an_image_outside_the_root_is_an_error_not_a_traceback(raw, tmp_path):
    outside = tmp_path / "elsewhere.png"
    shutil.copy(raw / "images" / "synth_0000.png", outside)
    for image in (outside, raw / "images" / ".." / ".." / "elsewhere.png"):
        tasks = {"grading": {"train": [Sample(image=image)]}}
        with pytest.raises(ConversionError, match="not inside the dataset root"):
            convert_samples("toy", tasks, raw, tmp_path / "out", [], ConvertOptions(**QUIET))


# --- symlinked dataset folders ----------------------------------------------------------------


def test_symlinked_image_and_mask_folders_convert_and_load(generated, tmp_path):
    """The raw images and masks on another disk, linked into the root: file names stay below the
    root (images/...), and the COCO files open with every image."""
    root = tmp_path / "linked"
    root.mkdir()
    for name in ("grades.csv", "landmarks.csv", "splits.json", "counts.csv"):
        shutil.copy(generated / name, root / name)
    (root / "images").symlink_to(generated / "images", target_is_directory=True)
    (root / "masks").symlink_to(generated / "masks", target_is_directory=True)
    out = tmp_path / "out"
    synthetic.convert(root, out, ConvertOptions(**QUIET))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    coco = load_checked(out / "train.json", Path(manifest["image_root"]))
    names = sorted(image["file_name"] for image in coco.dataset["images"])
    assert names == sorted(f"images/{s}.png" for s in _stems(generated)["train"])
    # A symlinked root works too.
    (tmp_path / "root_link").symlink_to(generated, target_is_directory=True)
    synthetic.convert(tmp_path / "root_link", tmp_path / "out2", ConvertOptions(**QUIET))
    assert (tmp_path / "out2" / MANIFEST_NAME).is_file()


# --- --overwrite ------------------------------------------------------------------------------


def test_overwrite_onto_another_split_layout_removes_only_the_old_conversions_files(
    raw, tmp_path
):
    out = tmp_path / "out"
    synthetic.convert(raw, out, ConvertOptions(**QUIET))
    old = _stems(raw)
    assert (out / "semantic" / "val").is_dir()
    (out / "notes.txt").write_text("mine")
    (out / "semantic" / "val" / "mine.txt").write_text("mine too")
    (out / "extra.json").write_text("{}")  # a JSON the manifest does not list
    _splits(raw, {"fold1": old["train"] + old["val"]})
    synthetic.convert(raw, out, ConvertOptions(overwrite=True, **QUIET))

    assert not (out / "train.json").exists() and not (out / "val.json").exists()
    assert not (out / "semantic" / "train").exists()
    assert [p.name for p in (out / "semantic" / "val").rglob("*") if p.is_file()] == ["mine.txt"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "extra.json").exists()
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["tasks"] == {"seg": {"fold1": "fold1.json"}}
    coco = json.loads((out / "fold1.json").read_text())
    assert all((out / f).is_file() for image in coco["images"]
               for f in image["sem_seg_files"].values())
    assert not (out / REPLACED_MANIFEST_NAME).exists()


def test_a_manifest_naming_files_outside_its_own_kinds_deletes_nothing_of_them(raw, tmp_path):
    """A tampered (or foreign) manifest: only COCO .json files and semantic/*.png are taken as
    its own, never paths leading out or into the raw data."""
    out = tmp_path / "out"
    synthetic.convert(raw, out, ConvertOptions(**QUIET))
    victim = tmp_path / "victim.json"
    victim.write_text("{}")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["tasks"]["seg"]["evil"] = "../victim.json"
    manifest["tasks"]["seg"]["abs"] = str(victim)
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    coco = json.loads((out / "val.json").read_text())
    coco["images"][0]["sem_seg_files"]["optic disc"] = "../raw/images/synth_0000.png"
    (out / "val.json").write_text(json.dumps(coco))
    synthetic.convert(raw, out, ConvertOptions(overwrite=True, **QUIET))
    assert victim.exists() and (raw / "images" / "synth_0000.png").exists()


def test_an_interrupted_overwrite_leaves_the_old_conversion_untouched(raw, tmp_path, monkeypatch):
    out = tmp_path / "out"
    synthetic.convert(raw, out, ConvertOptions(**QUIET))
    before = _tree(out)
    writes = []
    real = base._write_png_atomic

    def interrupted(path, arr):
        if len(writes) == 7:
            raise KeyboardInterrupt  # Ctrl-C half way through the semantic targets
        writes.append(path)
        real(path, arr)

    monkeypatch.setattr(base, "_write_png_atomic", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synthetic.convert(raw, out, ConvertOptions(overwrite=True, **QUIET))
    # The manifest still describes exactly the files it described: none was rewritten.
    assert _tree(out) == before
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_a_failed_overwrite_keeps_the_old_conversion(raw, tmp_path):
    out = tmp_path / "out"
    synthetic.convert(raw, out, ConvertOptions(**QUIET))
    before = _tree(out)
    (raw / "images" / "synth_0003.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(ConversionError, match="synth_0003.png"):
        synthetic.convert(raw, out, ConvertOptions(overwrite=True, **QUIET))
    assert _tree(out) == before


def test_an_interrupted_commit_is_finished_by_the_next_run(raw, tmp_path):
    """Killed after the old manifest was set aside: the next --overwrite removes the files it
    names, though no retina_d2.json names them any more."""
    out = tmp_path / "out"
    synthetic.convert(raw, out, ConvertOptions(**QUIET))
    os.replace(out / MANIFEST_NAME, out / REPLACED_MANIFEST_NAME)
    stems = _stems(raw)
    _splits(raw, {"all": stems["train"] + stems["val"]})
    synthetic.convert(raw, out, ConvertOptions(overwrite=True, **QUIET))
    assert sorted(p.name for p in out.glob("*.json")) == ["all.json", MANIFEST_NAME,
                                                          "summary.json"]
    assert sorted(p.name for p in (out / "semantic").iterdir()) == ["all"]
    assert not (out / REPLACED_MANIFEST_NAME).exists()


def test_overwrite_of_a_generated_set_invalidates_the_manifest_before_regenerating(
    tmp_path, monkeypatch
):
    """Without --root the images are regenerated in place: interrupted there, no manifest may
    describe the old images any more."""
    out = tmp_path / "out"
    synthetic.convert(None, out, ConvertOptions(**QUIET), count=2, size=128)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "generate_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synthetic.convert(None, out, ConvertOptions(overwrite=True, **QUIET), count=2, size=128)
    assert not (out / MANIFEST_NAME).exists()
    monkeypatch.undo()
    synthetic.convert(None, out, ConvertOptions(overwrite=True, **QUIET), count=3, size=128)
    assert (out / MANIFEST_NAME).is_file() and not (out / REPLACED_MANIFEST_NAME).exists()


def test_leftovers_of_interrupted_runs_are_cleaned_and_nothing_else(raw, tmp_path):
    out = tmp_path / "out"
    synthetic.convert(raw, out, ConvertOptions(**QUIET))
    image_folder = next((out / "semantic" / "val").iterdir())
    toolkit = [
        out / ".train.json.abcd1234.tmp",  # atomic_write's pattern (hex, or mkstemp's)
        out / ".retina_d2.json.k2_j4h5g.tmp",
        image_folder / ".MA.png.0f0f0f0f.tmp",
        out / ".retina_d2-staging.0123abcd" / "semantic" / "val" / "x" / "MA.png",
    ]
    users = [
        out / ".notes.txt.abcd1234.tmp",  # not a JSON or PNG output
        out / "mine.tmp",
        out / ".train.json.short.tmp",
        out / ".retina_d2-staging.mine",
        image_folder / "MA.png.abcd1234.tmp",
    ]
    for path in toolkit + users:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("leftover")
    synthetic.convert(raw, out, ConvertOptions(overwrite=True, **QUIET))
    assert [p for p in toolkit if p.exists()] == []
    assert not (out / ".retina_d2-staging.0123abcd").exists()
    assert all(p.exists() for p in users)


# --- an output folder that cannot be written ----------------------------------------------------


def test_an_unwritable_out_is_one_error_naming_it(raw, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match=str(blocker)):
        synthetic.convert(raw, blocker / "out", ConvertOptions(**QUIET))
    with pytest.raises(OutputError, match=str(blocker)):
        synthetic.convert(None, blocker / "out", ConvertOptions(**QUIET), count=2, size=128)
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_dataset.py"), "synthetic", "--root",
         str(raw), "--out", str(blocker / "out")], capture_output=True, text=True,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(blocker) in errors[0]


def test_a_write_failure_stops_the_run_even_when_skipping_bad_images(raw, tmp_path, monkeypatch):
    """on_error=skip is for bad raw files; a full disk would otherwise skip every image."""

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(base.Image.Image, "save", full)
    with pytest.raises(OutputError, match="No space left on device"):
        synthetic.convert(raw, tmp_path / "out", ConvertOptions(on_error="skip", **QUIET))
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_is_one_error_naming_it(raw, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(OutputError, match=str(out)):
            synthetic.convert(raw, out, ConvertOptions(**QUIET))
    finally:
        out.chmod(0o755)


# --- permissions --------------------------------------------------------------------------------


@pytest.fixture
def umask():
    """Set the process umask for one test; restored after."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755),
                                                       (0o077, 0o600, 0o700),
                                                       (0o002, 0o664, 0o775)])
def test_outputs_get_the_permissions_the_umask_gives(raw, tmp_path, umask, mask, file_mode,
                                                     dir_mode):
    umask(mask)
    with atomic_write(tmp_path / "plain.json") as f:
        f.write("{}")
    assert _mode(tmp_path / "plain.json") == file_mode
    out = tmp_path / "out"
    synthetic.convert(raw, out, ConvertOptions(**QUIET))
    files = [p for p in out.rglob("*") if p.is_file()]
    folders = [out] + [p for p in out.rglob("*") if p.is_dir()]
    assert len(files) > 10
    assert {_mode(p) for p in files} == {file_mode}, {p.name: oct(_mode(p)) for p in files}
    assert {_mode(p) for p in folders} == {dir_mode}
    # As a plain open() would have made them.
    (tmp_path / "reference").write_text("x")
    assert _mode(tmp_path / "reference") == file_mode


def test_atomic_write_leaves_no_temp_file_and_keeps_the_old_one_on_failure(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["a.json"]
    with atomic_write(target, "wb") as f:
        f.write(np.arange(3, dtype=np.uint8).tobytes())
    assert target.read_bytes() == b"\x00\x01\x02" and sorted(os.listdir(tmp_path)) == ["a.json"]
