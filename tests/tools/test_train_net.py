"""tools/train_net.py end to end on the synthetic dataset: train, checkpoint, evaluate, eval-only,
and the errors a user meets first (bad key, unknown dataset, missing weights)."""
import json
from pathlib import Path

import pytest

from retina_d2.tools import train_net

REPO = Path(__file__).resolve().parents[2]
INSTANT = str(REPO / "configs/quick_schedules/maskrcnn_synthetic_instant_test.yaml")


@pytest.fixture(scope="module")
def datasets(synthetic_datasets):
    return synthetic_datasets


@pytest.fixture(scope="module")
def trained(datasets, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    mp = pytest.MonkeyPatch()
    mp.setenv("RETINA_D2_DATASETS", str(datasets))
    train_net.cli(["--config-file", INSTANT, "OUTPUT_DIR", str(out)])
    mp.undo()
    return out


def test_training_writes_checkpoint_config_env_metrics_and_overlays(trained):
    assert (trained / "model_final.pth").is_file()
    assert (trained / "config.yaml").is_file() and (trained / "env.txt").is_file()
    inference = trained / "inference" / "synthetic_seg_val"
    metrics = json.loads((inference / "instance_metrics.json").read_text())
    assert {"AP35", "AP50", "AP75", "AP"} <= set(metrics["segm"])
    overlays = list((inference / "overlays").glob("*.png"))
    assert len(overlays) == 2
    # The HTML report, written after the final evaluation, with the gallery (eval_info.json
    # names the GT and its images) and the run's config.
    assert json.loads((inference / "eval_info.json").read_text())["dataset"] == "synthetic_seg_val"
    page = (inference / "report" / "index.html").read_text()
    assert "Instance detection" in page and "Worst" in page and "META_ARCHITECTURE" in page


def test_eval_only_reloads_the_weights(trained, datasets, monkeypatch, tmp_path):
    monkeypatch.setenv("RETINA_D2_DATASETS", str(datasets))
    results = train_net.cli(
        ["--config-file", INSTANT, "--eval-only", "MODEL.WEIGHTS", str(trained / "model_final.pth"),
         "OUTPUT_DIR", str(tmp_path)]
    )
    before = json.loads((trained / "inference/synthetic_seg_val/instance_metrics.json").read_text())
    assert results["segm"]["AP50"] == pytest.approx(before["segm"]["AP50"], nan_ok=True)
    assert (tmp_path / "inference" / "synthetic_seg_val" / "report" / "index.html").is_file()


@pytest.mark.parametrize(
    "extra,message",
    [
        (["MODEL.NOT_A_KEY", "1"], "MODEL.NOT_A_KEY (not a Detectron2 or retina_d2 key)"),
        (["DATASETS.TRAIN", "('idrid_seg_train',)"], "dataset 'idrid_seg_train' is not registered"),
        (["MODEL.ROI_HEADS.NUM_CLASSES", "3"], "NUM_CLASSES is 3 but synthetic_seg_train has 5"),
        (["--eval-only", "MODEL.WEIGHTS", "/nonexistent/model.pth"], "no such file"),
    ],
)
def test_bad_configs_give_one_clear_error(datasets, monkeypatch, tmp_path, capsys, extra, message):
    from detectron2.data import DatasetCatalog

    monkeypatch.setenv("RETINA_D2_DATASETS", str(datasets))
    # Detectron2's catalog is per process: an earlier test of the suite may have registered
    # IDRiD from its own datasets root. Here (this root has the synthetic set only) it is not.
    if "idrid_seg_train" in DatasetCatalog:
        monkeypatch.delitem(DatasetCatalog.data, "idrid_seg_train")  # restored afterwards
    flags = [e for e in extra if e.startswith("--")]
    opts = [e for e in extra if not e.startswith("--")]
    with pytest.raises(SystemExit) as exit_info:
        train_net.cli(["--config-file", INSTANT, *flags, "OUTPUT_DIR", str(tmp_path), *opts])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_froc_evaluator_joins_when_enabled(datasets, monkeypatch, tmp_path):
    from retina_d2.engine import LesionTrainer, setup_cfg
    from retina_d2.evaluation import LesionFROCEvaluator, LesionInstanceEvaluator

    monkeypatch.setenv("RETINA_D2_DATASETS", str(datasets))
    kinds = {}
    for enabled in (False, True):
        cfg = setup_cfg(INSTANT, ["RETINA.EVAL.FROC_ENABLED", str(enabled), "OUTPUT_DIR", str(tmp_path)])
        evaluators = LesionTrainer.build_evaluator(cfg, "synthetic_seg_val")._evaluators
        kinds[enabled] = {type(e) for e in evaluators}
    assert LesionInstanceEvaluator in kinds[False] and LesionFROCEvaluator not in kinds[False]
    assert LesionFROCEvaluator in kinds[True]


def test_a_truncated_training_photograph_is_one_error_line_naming_it(
    synthetic_datasets, monkeypatch, tmp_path, capfd
):
    import shutil

    root = tmp_path / "datasets"
    shutil.copytree(synthetic_datasets, root)
    images = sorted((root / "synthetic" / "raw" / "images").iterdir())
    for image in images:  # every training photograph cut in half: the first batch meets one
        data = image.read_bytes()
        image.write_bytes(data[: len(data) // 2])
    monkeypatch.setenv("RETINA_D2_DATASETS", str(root))
    with pytest.raises(SystemExit) as stop:
        train_net.cli(["--config-file", INSTANT, "OUTPUT_DIR", str(tmp_path / "run")])
    assert stop.value.code == 2
    out, err = capfd.readouterr()
    # (torch may warn on stderr about CUDA; only the error lines count)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err[-2000:]
    assert any(image.name in errors[0] for image in images), errors[0]
    assert "Traceback" not in out + err


def test_a_loader_workers_image_error_becomes_its_original_line():
    from retina_d2.data.image_io import ImageReadError

    # What torch's DataLoader re-raises in the main process for an error in a worker.
    wrapped = ImageReadError(
        "Caught ImageReadError in DataLoader worker process 0.\nOriginal Traceback (most recent "
        'call last):\n  File "x.py", line 1, in f\nretina_d2.data.image_io.ImageReadError: '
        "/d/eye.jpg: unreadable or truncated image\n"
    )
    line = train_net.image_error_line(wrapped)
    assert line == "/d/eye.jpg: unreadable or truncated image"
    assert train_net.image_error_line(ImageReadError("/d/a.png: no such file")) == "/d/a.png: no such file"
