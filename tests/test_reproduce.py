"""``retina-d2 reproduce``: every paper system end to end on a tiny raw dataset in its published
layout (convert with the paper's options, train its config a step on the CPU, select on
validation, score the test split once, write the paper-vs-ours table), a run killed during
training and resumed, and one error line for each bad invocation."""
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "data" / "converters"))  # the layout writers

from paper_layouts import (  # noqa: E402
    make_ddr_layout,
    make_eophtha_paper_layout,
    make_idrid_layout,
    make_retinal_lesions_layout,
)

from retina_d2 import cli  # noqa: E402
from retina_d2.config import get_retina_cfg, merge_config  # noqa: E402
from retina_d2.data.converters import CONVERTER_MODULES  # noqa: E402
from retina_d2.evaluation.published import load_published_figures  # noqa: E402
from retina_d2.modeling.pretrained import OFFLINE_ENV  # noqa: E402
from retina_d2.reproduce import (  # noqa: E402
    DEFAULT_CONFIGS,
    STATE_FILE,
    SYSTEMS,
    Reproduction,
    ReproduceError,
    config_path,
    stage_names,
)
from retina_d2.tools.reproduce import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _in_the_checkout(monkeypatch):
    """reproduce reads the paper configs from ./configs unless --configs says: run from the
    checkout's root, as its users do."""
    monkeypatch.chdir(REPO)
# A CPU step on 64 px images, evaluated after it (so model_best.pth is selected), no downloads.
TINY = [
    "MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "1", "TEST.EVAL_PERIOD", "1",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "0", "DATALOADER.NUM_WORKERS", "0",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
    "RETINA.EVAL.NUM_OVERLAYS", "0", "RETINA.EVAL.REPORT", "False", "SEED", "1",
]
# Per system: its raw layout and the overrides that make its paper config a CPU step: no
# pretrained start (the configs name URLs), and a narrow network where the paper's is wide.
LAYOUTS = {
    "eophtha-maskrcnn": (make_eophtha_paper_layout, [
        "MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", "50",
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE", "32", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
        "TEST.DETECTIONS_PER_IMAGE", "20",
    ]),
    "idrid-resunet": (make_idrid_layout, [
        "MODEL.UNET_ENCODER.WIDTHS", "[4, 8, 8, 8, 8]", "RETINA.EVAL.ARGMAX_SIZE", "64",
    ]),
    "retinal-lesions-lesionnet": (make_retinal_lesions_layout, ["MODEL.WEIGHTS", ""]),
    # The CBAM pipeline's distortions drop box corners that leave the frame (albumentations'
    # keypoint path), which the 60 px fixtures' border lesions hit: reported, not ours to fix.
    "ddr-cbam-deeplab": (make_ddr_layout, [
        "MODEL.WEIGHTS", "", "RETINA.AUG.ALBUMENTATIONS", "", "RETINA.EVAL.COMPONENT_AP_SIZE", "64",
    ]),
    "idrid-redseg": (make_idrid_layout, [
        "MODEL.WEIGHTS", "", "MODEL.VGG.WIDTH_MULT", "0.125", "INPUT.CROP.SIZE", "[48, 48]",
    ]),
}


def _metrics_on_disk(eval_dir: Path) -> dict:
    """{"task/metric": value} of every metrics file the evaluators wrote (read back
    independently of reproduce)."""
    flat = {}
    for path in eval_dir.glob("*_metrics.json"):
        for task, values in json.loads(path.read_text()).items():
            for metric, value in values.items():
                flat[f"{task}/{metric}"] = value
    return flat


def _check_table(output: Path, system: str):
    """reproduce.json / .md: one row per test (or unstated) figure and results key, the
    paper's figure as published (x100 for fractions), ours as the test evaluation wrote it."""
    report = json.loads((output / "reproduce.json").read_text())
    published = load_published_figures()[system]
    state = json.loads((output / STATE_FILE).read_text())
    assert list(state["stages"]) == stage_names(SYSTEMS[system])
    test_dir = output / "test" / "inference" / SYSTEMS[system].test_dataset
    on_disk = _metrics_on_disk(test_dir)
    expected = [(f.name, key, f.value * (100 if f.unit == "fraction" else 1))
                for f in published.figures if f.split in ("test", "unstated") for key in f.metrics]
    assert [(r["figure"], r["metric"]) for r in report["rows"]] == [e[:2] for e in expected]
    assert [r["paper"] for r in report["rows"]] == pytest.approx([e[2] for e in expected])
    measured = 0
    for row in report["rows"]:
        ours = on_disk.get(row["metric"])
        if ours is None or (isinstance(ours, float) and math.isnan(ours)):
            assert row["ours"] is None and row["difference"] is None, row
            continue
        measured += 1
        assert row["ours"] == pytest.approx(ours, abs=1e-9), row
        assert row["difference"] == pytest.approx(ours - row["paper"], abs=1e-9), row
    assert measured, "no figure of the paper was measured"
    # The paper's protocol was scored beside the standard evaluators.
    if published.protocol != "standard":
        assert (test_dir / f"{published.protocol}_metrics.json").is_file()
    # Selected on validation: model_best.pth of the training run, scored on the test split only.
    assert report["checkpoint"] == str(output / "train" / "model_best.pth")
    assert report["selected_by"]["metric"] == state["stages"]["train"]["selected_by"]["metric"]
    assert report["test_dataset"] == SYSTEMS[system].test_dataset
    assert [p.name for p in (output / "test" / "inference").iterdir()] == [test_dir.name]
    validated = {p.name for p in (output / "train" / "inference").iterdir()}
    assert validated == {SYSTEMS[system].val_dataset}
    markdown = (output / "reproduce.md").read_text()
    assert "| metric" in markdown and "paper's figure (source)" in markdown
    for row in report["rows"]:
        assert row["metric"] in markdown
    return report


def test_the_systems_table_names_existing_configs_figures_and_splits():
    figures = load_published_figures()
    for name, system in SYSTEMS.items():
        assert name in figures
        assert system.converter in CONVERTER_MODULES
        cfg = get_retina_cfg()
        merge_config(cfg, str(REPO / DEFAULT_CONFIGS / system.config))
        # The config selects on the split reproduce calls validation; test is another split.
        assert tuple(cfg.DATASETS.TEST) == (system.val_dataset,), name
        assert system.test_dataset.endswith("_test") and system.test_dataset != system.val_dataset
        protocol = figures[name].protocol
        assert list(system.protocols) == ([] if protocol == "standard" else [protocol]), name
        if system.lesion_system:
            assert not SYSTEMS[system.lesion_system].lesion_system
    assert {"eophtha-maskrcnn", "idrid-resunet", "retinal-lesions-lesionnet", "ddr-cbam-deeplab",
            "idrid-redseg"} <= set(SYSTEMS)


@pytest.mark.slow
@pytest.mark.parametrize("system", list(LAYOUTS))
def test_reproduce_end_to_end_on_the_published_layout(system, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(OFFLINE_ENV, "1")  # nothing may be downloaded
    make_layout, overrides = LAYOUTS[system]
    raw = make_layout(tmp_path / "raw")
    output = tmp_path / "run"
    status = cli.main(["reproduce", system, "--data-root", str(raw), "--output", str(output),
                       *TINY, *overrides])
    captured = capsys.readouterr()
    assert status == 0, captured.err[-3000:]
    report = _check_table(output, system)
    # The paper's figures are printed as the table's rows.
    for row in report["rows"]:
        assert row["metric"] in captured.out
    # The conversion used the paper's options (e-ophtha: its 155 / 20 / 20 split).
    state = json.loads((output / STATE_FILE).read_text())
    if system == "eophtha-maskrcnn":
        assert state["stages"]["convert"]["images"] == {
            "seg/train": 155, "seg/val": 20, "seg/test": 20}


@pytest.mark.slow
def test_a_two_step_grading_system_trains_on_its_lesion_systems_best_model(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv(OFFLINE_ENV, "1")
    raw = make_idrid_layout(tmp_path / "raw", grading=True)
    output = tmp_path / "run"
    status = main(["idrid-resunet-grading", "--data-root", str(raw), "--output", str(output),
                   *TINY, *LAYOUTS["idrid-resunet"][1],
                   "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64"])
    captured = capsys.readouterr()
    assert status == 0, captured.err[-3000:]
    report = _check_table(output, "idrid-resunet-grading")
    assert [r["metric"] for r in report["rows"]] == ["dr_grade/accuracy"]
    # Step 1 selected its lesion model on IDRiD's lesion validation images; step 2 froze it.
    train_cfg = (output / "train" / "config.yaml").read_text()
    assert str(output / "lesion_train" / "model_best.pth") in train_cfg
    assert "idrid_seg_val" in (output / "lesion_train" / "config.yaml").read_text()
    log = (output / "train" / "log.txt").read_text()
    assert f"tensors loaded from {output / 'lesion_train' / 'model_best.pth'}" in log


def test_a_grading_file_loads_without_lesion_truth(tmp_path):
    """A conversion's grading file has no categories: read under its dataset name without
    Detectron2's category check, its records carry no (empty) annotations to filter on."""
    from retina_d2.data.register import load_lesion_json

    grading = {"images": [{"id": 1, "file_name": "a.jpg", "height": 4, "width": 6,
                           "dr_grade": 3}], "annotations": [], "categories": []}
    path = tmp_path / "train.json"
    path.write_text(json.dumps(grading))
    (record,) = load_lesion_json(str(path), str(tmp_path), "some_grading_train")
    assert record["dr_grade"] == 3 and "annotations" not in record


def _run_reproduce(args, log: Path, **kwargs):
    """tools/reproduce.py in a process of its own, its output to ``log`` (a pipe nobody reads
    while waiting would fill and stall it)."""
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, str(REPO / "tools/reproduce.py"), *args],
            stdout=f, stderr=subprocess.STDOUT, text=True, cwd=REPO,  # its configs/
            env={**os.environ, OFFLINE_ENV: "1"}, **kwargs,
        )


def _finish(run, log: Path):
    run.wait(timeout=1200)  # a guard against a hang only
    return run.returncode, log.read_text()


@pytest.mark.slow
def test_a_run_killed_during_training_resumes_where_it_stopped(tmp_path):
    raw = make_idrid_layout(tmp_path / "raw")
    output = tmp_path / "run"
    opts = [*TINY, *LAYOUTS["idrid-resunet"][1], "RETINA.EVAL.REPORT", "True",
            "SOLVER.MAX_ITER", "12", "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "4"]
    args = ["idrid-resunet", "--data-root", str(raw), "--output", str(output), *opts]
    # Saved and named: a checkpoint is written, then last_checkpoint points at it.
    first_checkpoint = output / "train" / "last_checkpoint"
    # Its own session, so that the kill takes the whole run (as a crash or a lost machine).
    run = _run_reproduce(args, tmp_path / "first.log", start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while not first_checkpoint.is_file():
            assert run.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 15 minutes"
            time.sleep(0.05)
        os.killpg(run.pid, signal.SIGKILL)
    finally:
        run.wait()
    state = json.loads((output / STATE_FILE).read_text())
    assert list(state["stages"]) == ["convert"], "the run was not killed during training"
    manifest = output / "datasets" / "idrid" / "retina_d2.json"
    converted_at = manifest.stat().st_mtime_ns
    assert not (output / "reproduce.json").exists()

    # Without --resume the folder is refused, untouched.
    status, out = _finish(_run_reproduce(args, tmp_path / "refused.log"), tmp_path / "refused.log")
    assert status == 2 and "pass --resume" in out
    status, out = _finish(_run_reproduce([*args, "--resume"], tmp_path / "resumed.log"),
                          tmp_path / "resumed.log")
    assert status == 0, out[-3000:]

    assert "convert: done" in out and "skipped" in out  # not converted again
    assert manifest.stat().st_mtime_ns == converted_at
    assert "resuming from its last checkpoint" in out
    log = (output / "train" / "log.txt").read_text()
    starts = [int(line.rsplit(" ", 1)[1]) for line in log.splitlines()
              if "Starting training from iteration" in line]
    assert starts[0] == 0 and len(starts) == 2 and starts[1] >= 2, starts
    state = json.loads((output / STATE_FILE).read_text())
    assert list(state["stages"]) == ["convert", "train", "test"]
    assert (output / "train" / "model_final.pth").is_file()
    _check_table(output, "idrid-resunet")
    # The test split's report opens with the paper-vs-ours section.
    page = output / "test" / "inference" / "idrid_seg_test" / "report" / "index.html"
    assert "Paper vs ours" in page.read_text()

    # A finished run resumed again does nothing but write the table.
    status, out = _finish(_run_reproduce([*args, "--resume"], tmp_path / "again.log"),
                          tmp_path / "again.log")
    assert status == 0, out[-3000:]
    for stage in ("convert", "train", "test"):
        assert f"{stage}: done" in out
    assert "converting" not in out and "training configs" not in out and "scoring" not in out


# ---------------------------------------------------------------------------- errors

def _error_of(argv, capsys):
    status = main(argv)
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert status == 2 and len(errors) == 1, captured.err[-2000:]
    assert "Traceback" not in captured.err
    return errors[0]


@pytest.fixture
def idrid_raw(tmp_path):
    return make_idrid_layout(tmp_path / "raw")


def test_an_offline_pretrained_start_stops_before_converting(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(OFFLINE_ENV, "1")
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    raw = make_ddr_layout(tmp_path / "raw")
    output = tmp_path / "run"
    line = _error_of(["ddr-cbam-deeplab", "--data-root", str(raw), "--output", str(output)],
                     capsys)
    assert "MODEL.WEIGHTS https://download.pytorch.org/models/resnet50-0676ba61.pth" in line
    assert not output.exists()


def test_a_folder_reproduce_did_not_make_is_refused_untouched(idrid_raw, tmp_path, capsys):
    output = tmp_path / "mine"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    line = _error_of(["idrid-resunet", "--data-root", str(idrid_raw), "--output", str(output),
                      "MODEL.DEVICE", "cpu"], capsys)
    assert str(output) in line and "not empty" in line
    assert [p.name for p in output.iterdir()] == ["notes.txt"]


def test_resume_with_other_arguments_is_refused(idrid_raw, tmp_path, capsys):
    output = tmp_path / "run"
    run = Reproduction("idrid-resunet", idrid_raw, output, ["MODEL.DEVICE", "cpu"])
    run.open_state()  # a run that was started (and stopped before converting)
    argv = ["idrid-resunet", "--data-root", str(idrid_raw), "--output", str(output)]
    line = _error_of(argv + ["MODEL.DEVICE", "cpu"], capsys)
    assert "pass --resume" in line
    line = _error_of(argv + ["--resume", "MODEL.DEVICE", "cpu", "SOLVER.MAX_ITER", "3"], capsys)
    assert "opts" in line and "SOLVER.MAX_ITER" in line
    line = _error_of(["idrid-redseg", "--data-root", str(idrid_raw), "--output", str(output),
                      "--resume", "MODEL.WEIGHTS", ""], capsys)
    assert "'idrid-resunet'" in line and "'idrid-redseg'" in line


@pytest.mark.parametrize("opts, expected", [
    (["OUTPUT_DIR", "elsewhere"], "OUTPUT_DIR"),
    (["DATASETS.TEST", "('idrid_seg_test',)"], "DATASETS.TEST"),
    (["MODEL.DEVICE"], "odd number"),
    (["MODEL.NO_SUCH_KEY", "1"], "MODEL.NO_SUCH_KEY"),
    (["RETINA.EVAL.PROTOCOLS", "['per_image_map']"], "scores lesion instances"),
])
def test_bad_opts_are_one_line(opts, expected, idrid_raw, tmp_path, capsys):
    output = tmp_path / "run"
    line = _error_of(["idrid-resunet", "--data-root", str(idrid_raw), "--output", str(output),
                      *opts], capsys)
    assert expected in line
    assert not output.exists()


def test_a_missing_data_root_and_missing_splits_are_named(tmp_path, capsys):
    line = _error_of(["idrid-resunet", "--data-root", str(tmp_path / "nowhere")], capsys)
    assert str(tmp_path / "nowhere") in line
    raw = make_retinal_lesions_layout(tmp_path / "raw")
    (raw / "retinal-lesions-v20191227" / "val.txt").unlink()
    output = tmp_path / "run"
    line = _error_of(["retinal-lesions-lesionnet", "--data-root", str(raw), "--output",
                      str(output), "MODEL.WEIGHTS", ""], capsys)
    assert "val.txt" in line and "70 / 10 / 20" in line
    assert not output.exists()
    # IDRiD without the images of the committed validation split: no idrid_seg_val to select on.
    raw = tmp_path / "idrid"
    make_idrid_layout(raw)
    for path in raw.rglob("IDRiD_05*"):
        path.unlink()
    for path in raw.rglob("IDRiD_10*"):
        path.unlink()
    line = _error_of(["idrid-resunet", "--data-root", str(raw), "--output", str(output),
                      "MODEL.DEVICE", "cpu"], capsys)
    assert "idrid_seg_val" in line


def test_configs_are_found_in_the_current_folder_or_named(tmp_path, idrid_raw, monkeypatch):
    """The package never looks beside itself for configs (a wheel has none): --configs, or the
    configs/ folder of the current one."""
    run = Reproduction("idrid-resunet", idrid_raw, tmp_path / "run", configs=tmp_path)
    with pytest.raises(ReproduceError, match=f"{tmp_path}/resunet_idrid.yaml not found: .* "
                       "--configs"):
        run.check()
    monkeypatch.chdir(tmp_path)  # no configs/ here
    with pytest.raises(ReproduceError, match="configs/resunet_idrid.yaml not found"):
        Reproduction("idrid-resunet", idrid_raw, tmp_path / "run2").check()
    monkeypatch.chdir(REPO)
    assert config_path(SYSTEMS["idrid-resunet"]).resolve() == REPO / "configs/resunet_idrid.yaml"


def test_the_cli_lists_reproduce(capsys):
    assert cli.main(["--help"]) == 0
    assert "reproduce" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "--help"])
    out = capsys.readouterr().out
    for name in SYSTEMS:
        assert name in out


def test_without_a_validation_score_the_last_model_is_scored_and_said(idrid_raw, tmp_path):
    run = Reproduction("idrid-resunet", idrid_raw, tmp_path / "run", out=io.StringIO())
    folder = tmp_path / "train"
    folder.mkdir()
    with pytest.raises(ReproduceError, match="no model_final.pth to score"):
        run._selection(SYSTEMS["idrid-resunet"], folder)
    (folder / "model_final.pth").write_bytes(b"")
    record = run._selection(SYSTEMS["idrid-resunet"], folder)
    assert record["checkpoint"] == str(folder / "model_final.pth")
    assert record["selected_by"] is None
    assert "argmax_dice/mDice was never a finite number on idrid_seg_val" in (
        record["selection_note"])


def test_a_damaged_state_file_is_named(idrid_raw, tmp_path, capsys):
    output = tmp_path / "run"
    output.mkdir()
    (output / STATE_FILE).write_text('{"format": 1, "stages": ')
    line = _error_of(["idrid-resunet", "--data-root", str(idrid_raw), "--output", str(output),
                      "--resume", "MODEL.DEVICE", "cpu"], capsys)
    assert str(output / STATE_FILE) in line and "unreadable" in line
    (output / STATE_FILE).write_text('{"format": 7, "stages": {}}')
    line = _error_of(["idrid-resunet", "--data-root", str(idrid_raw), "--output", str(output),
                      "--resume", "MODEL.DEVICE", "cpu"], capsys)
    assert "not a reproduce state of format 1" in line
