"""Evaluating a checkpoint on a dataset checks that the dataset's lesion classes are the model's, in
the model's order (retina_d2.modeling.model_file.check_evaluation_classes): evaluation reads output
k as the dataset's class k, so a dataset converted with another order or another set of lesions
would have its scores assigned to the wrong lesion types. train_net --eval-only runs the check
after loading the weights, before any inference."""
import logging
from pathlib import Path

import pytest
import torch
from detectron2.data import MetadataCatalog

from retina_d2.config import ConfigError
from retina_d2.data.converters.synthetic import CATEGORIES
from retina_d2.data.lesions import lesion
from retina_d2.modeling.model_file import (
    MODEL_INFO_KEY,
    ModelInfo,
    check_evaluation_classes,
    read_model_info,
)
from retina_d2.tools import train_net

REPO = Path(__file__).resolve().parents[2]
INSTANT = str(REPO / "configs/quick_schedules/maskrcnn_synthetic_instant_test.yaml")

MODEL_CLASSES = ["microaneurysm", "haemorrhage", "hard exudate"]


def _info(names):
    return ModelInfo(list(names), [lesion(n).id for n in names], "", "0")


@pytest.fixture
def datasets_with_classes():
    """Register metadata-only test datasets: name -> thing_classes; removed afterwards."""
    made = []

    def register(**classes_by_name):
        for name, classes in classes_by_name.items():
            MetadataCatalog.get(name).set(thing_classes=list(classes))
            made.append(name)
        return list(classes_by_name)

    yield register
    for name in made:
        MetadataCatalog.remove(name)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def model_file_warnings():
    """The check's warnings, read from its module's logger itself: Detectron2's setup_logger
    (run by any earlier tool test) stops retina_d2's loggers propagating to pytest's root one."""
    log, records = logging.getLogger("retina_d2.modeling.model_file"), _Records()
    log.addHandler(records)
    yield lambda: list(records.records)
    log.removeHandler(records)


def test_same_names_in_the_same_order_pass(datasets_with_classes, model_file_warnings):
    names = datasets_with_classes(evalcheck_same=MODEL_CLASSES)
    check_evaluation_classes("model.pth", _info(MODEL_CLASSES), names)
    assert model_file_warnings() == []


def test_same_names_in_another_order_are_refused_naming_file_dataset_and_both_lists(
    datasets_with_classes,
):
    reordered = [MODEL_CLASSES[1], MODEL_CLASSES[0], MODEL_CLASSES[2]]
    names = datasets_with_classes(evalcheck_reordered=reordered)
    with pytest.raises(ConfigError) as error:
        check_evaluation_classes("out/model_best.pth", _info(MODEL_CLASSES), names)
    message = str(error.value)
    assert message.startswith("out/model_best.pth: ")
    assert "'evalcheck_reordered'" in message
    assert str(MODEL_CLASSES) in message and str(reordered) in message
    assert "the same lesions in another order" in message
    assert "Evaluate on a dataset converted with the model's lesion types" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "classes",
    [
        ["microaneurysm", "haemorrhage", "soft exudate"],  # one lesion type swapped for another
        ["microaneurysm", "haemorrhage"],  # a subset
        MODEL_CLASSES + ["optic disc"],  # a superset
    ],
)
def test_another_set_of_lesions_is_refused(datasets_with_classes, classes):
    names = datasets_with_classes(evalcheck_other=classes)
    with pytest.raises(ConfigError, match="other lesion types") as error:
        check_evaluation_classes("model.pth", _info(MODEL_CLASSES), names)
    assert str(classes) in str(error.value) and str(MODEL_CLASSES) in str(error.value)


def test_every_test_dataset_is_checked_not_only_the_first(datasets_with_classes):
    names = datasets_with_classes(
        evalcheck_a=MODEL_CLASSES, evalcheck_b=list(reversed(MODEL_CLASSES))
    )
    with pytest.raises(ConfigError, match="'evalcheck_b'"):
        check_evaluation_classes("model.pth", _info(MODEL_CLASSES), names)


def test_a_checkpoint_without_class_names_warns_once_and_proceeds(
    datasets_with_classes, model_file_warnings
):
    names = datasets_with_classes(
        evalcheck_one=MODEL_CLASSES, evalcheck_two=list(reversed(MODEL_CLASSES))
    )
    check_evaluation_classes("old.pth", None, names)  # no error: old checkpoints still evaluate
    warnings = model_file_warnings()
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert text.startswith("old.pth holds no class names")
    assert "evalcheck_one, evalcheck_two" in text and "unchecked" in text


def test_datasets_without_lesion_classes_and_models_without_lesions_are_not_compared(
    datasets_with_classes, model_file_warnings
):
    # A grading / localization set registers thing_classes [] (retina_d2.data.register): no
    # lesion truth, whatever the model's classes; not even an old checkpoint's warning.
    grading = datasets_with_classes(evalcheck_grading=[])
    check_evaluation_classes("model.pth", _info(MODEL_CLASSES), grading)
    check_evaluation_classes("old.pth", None, grading)
    assert model_file_warnings() == []
    # A model trained without lesion classes (grades only) outputs no lesions to misread.
    lesions = datasets_with_classes(evalcheck_lesions=MODEL_CLASSES)
    check_evaluation_classes("grader.pth", _info([]), lesions)


# ------------------------------------------------------------------ the CLI: train_net --eval-only


@pytest.fixture(scope="module")
def untrained_weights(synthetic_datasets, tmp_path_factory):
    """The instant config's model, untrained, as a state dict (the weights of the checkpoints
    below: the class check needs no training, and evaluating them stays a few seconds)."""
    from retina_d2.engine import LesionTrainer, setup_cfg

    mp = pytest.MonkeyPatch()
    mp.setenv("RETINA_D2_DATASETS", str(synthetic_datasets))
    out = tmp_path_factory.mktemp("evalcheck_cfg")
    cfg = setup_cfg(INSTANT, ["OUTPUT_DIR", str(out), "MODEL.DEVICE", "cpu"])
    mp.undo()
    return LesionTrainer.build_model(cfg).state_dict()


def _checkpoint(path, weights, class_names=None):
    """A checkpoint like training's, storing ``class_names`` (none stored when None)."""
    data = {"model": weights}
    if class_names is not None:
        data[MODEL_INFO_KEY] = {
            "class_names": list(class_names),
            "lesion_ids": [lesion(n).id for n in class_names],
            "config": "",
            "version": "0",
        }
    torch.save(data, path)
    return path


@pytest.mark.parametrize(
    "model_classes",
    [
        list(reversed(CATEGORIES)),  # the same five lesions in another order
        list(CATEGORIES[:4]) + ["neovascularization"],  # five lesions, one of them another
    ],
)
def test_eval_only_on_a_dataset_of_other_classes_exits_2_before_inference(
    synthetic_datasets, untrained_weights, model_classes, monkeypatch, tmp_path, capsys
):
    weights = _checkpoint(tmp_path / "other_classes.pth", untrained_weights, model_classes)
    assert read_model_info(str(weights)).class_names == model_classes
    monkeypatch.setenv("RETINA_D2_DATASETS", str(synthetic_datasets))
    out = tmp_path / "eval"
    with pytest.raises(SystemExit) as exit_info:
        train_net.cli([
            "--config-file", INSTANT, "--eval-only", "MODEL.WEIGHTS", str(weights),
            "OUTPUT_DIR", str(out), "MODEL.DEVICE", "cpu",
        ])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("error: "))
    assert line.startswith(f"error: {weights}: the model's classes {model_classes}")
    assert f"dataset 'synthetic_seg_val', {list(CATEGORIES)}" in line
    # Refused before inference: no evaluation folder was written.
    assert not (out / "inference").exists()


def test_eval_only_with_a_checkpoint_without_class_names_warns_and_evaluates(
    synthetic_datasets, untrained_weights, monkeypatch, tmp_path
):
    weights = _checkpoint(tmp_path / "old.pth", untrained_weights)
    assert read_model_info(str(weights)) is None
    monkeypatch.setenv("RETINA_D2_DATASETS", str(synthetic_datasets))
    out = tmp_path / "eval"
    results = train_net.cli([
        "--config-file", INSTANT, "--eval-only", "MODEL.WEIGHTS", str(weights),
        "OUTPUT_DIR", str(out), "MODEL.DEVICE", "cpu", "RETINA.EVAL.NUM_OVERLAYS", "0",
        "RETINA.EVAL.REPORT", "False",
    ])
    assert "segm" in results
    assert (out / "inference" / "synthetic_seg_val" / "instance_metrics.json").is_file()
    # The warning, in the run's log (Detectron2's setup_logger writes OUTPUT_DIR/log.txt).
    log = (out / "log.txt").read_text()
    assert f"{weights} holds no class names" in log and "synthetic_seg_val" in log


def test_eval_only_resume_checks_the_checkpoint_it_resumed_from(
    synthetic_datasets, untrained_weights, monkeypatch, tmp_path, capsys
):
    """With --resume the weights come from OUTPUT_DIR's last checkpoint, not MODEL.WEIGHTS: the
    check reads, and the error names, that file."""
    out = tmp_path / "run"
    out.mkdir()
    resumed = _checkpoint(out / "model_final.pth", untrained_weights, list(reversed(CATEGORIES)))
    (out / "last_checkpoint").write_text("model_final.pth")
    given = _checkpoint(tmp_path / "given.pth", untrained_weights, list(CATEGORIES))
    monkeypatch.setenv("RETINA_D2_DATASETS", str(synthetic_datasets))
    with pytest.raises(SystemExit) as exit_info:
        train_net.cli([
            "--config-file", INSTANT, "--eval-only", "--resume", "MODEL.WEIGHTS", str(given),
            "OUTPUT_DIR", str(out), "MODEL.DEVICE", "cpu",
        ])
    assert exit_info.value.code == 2
    assert f"error: {resumed}: the model's classes" in capsys.readouterr().err
