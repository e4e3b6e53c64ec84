"""Nothing runs on load: config YAML through the safe loader only, weights files as tensors and
NumPy arrays only (full pickles with an explicit --trust-checkpoint), damaged weights files and
incomplete checkpoints as one error line naming the file."""
import argparse
import json
import logging
import os
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from detectron2.modeling import build_model

from retina_d2.config import ConfigError, get_retina_cfg, merge_config, read_config_yaml
from retina_d2.modeling import LesionCheckpointer
from retina_d2.modeling.meta_arch.multitask import load_lesion_weights
from retina_d2.safe_load import (
    IncompleteCheckpointError,
    UnreadableCheckpointError,
    UntrustedCheckpointError,
    load_checkpoint,
)
from retina_d2.tools import predict, train_net

REPO = Path(__file__).resolve().parents[1]

INSTANT = REPO / "configs/quick_schedules/maskrcnn_synthetic_instant_test.yaml"


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``: proof that loading ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


@pytest.fixture
def datasets(synthetic_datasets, monkeypatch):
    monkeypatch.setenv("RETINA_D2_DATASETS", str(synthetic_datasets))
    return synthetic_datasets


def _cfg(**overrides):
    cfg = get_retina_cfg()
    cfg.merge_from_file(str(INSTANT))
    cfg.MODEL.DEVICE = "cpu"
    for key, value in overrides.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = getattr(node, part)
        setattr(node, last, value)
    return cfg


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _train_net_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train_net.cli([str(a) for a in argv])
    assert exit_info.value.code == 2
    return _error_line(capsys)


def _predict_error(capsys, datasets, tmp_path, weights, *extra) -> str:
    image = sorted((datasets / "synthetic/raw/images").glob("*.png"))[0]
    code = predict.main([
        "--config-file", str(INSTANT), "--weights", str(weights), "--input", str(image),
        "--output", str(tmp_path / "predictions"), *extra,
    ])
    assert code == 2
    return _error_line(capsys)


# --- YAML -----------------------------------------------------------------------------------


def _evil_yaml(path: Path, marker: Path, base: Path = INSTANT) -> Path:
    command = json.dumps(f"touch {shlex.quote(str(marker))}")
    path.write_text(
        f"_BASE_: {json.dumps(str(base))}\n"
        "SOLVER:\n"
        f"  MAX_ITER: !!python/object/apply:os.system [{command}]\n"
    )
    return path


def test_the_payloads_are_live(tmp_path):
    """What Detectron2 0.6 did with these files (yaml.unsafe_load, pickle.load, torch.load with
    weights_only=False) creates the marker: the tests below would catch a loader that runs them."""
    for name, load in [
        ("yaml", lambda path: yaml.unsafe_load(path.read_text())),
        ("pkl", lambda path: pickle.loads(path.read_bytes())),
        ("pth", lambda path: torch.load(path, weights_only=False)),
    ]:
        marker = tmp_path / f"MARKER-{name}"
        make = {"yaml": _evil_yaml, "pkl": _malicious_pkl, "pth": _malicious_pth}[name]
        load(make(tmp_path / f"evil.{name}", marker))
        assert marker.exists(), name


def test_tools_print_one_line_and_no_traceback(datasets, tmp_path):
    """As a user runs them (a fresh process, so no other test's logging handlers are around):
    a malicious config and a malicious checkpoint give exit 2 and one line naming the file."""
    marker = tmp_path / "MARKER"
    config = _evil_yaml(tmp_path / "evil.yaml", marker)
    weights = _malicious_pth(tmp_path / "evil.pth", marker)
    for argv, named in [
        (["--config-file", config], config),
        (["--config-file", INSTANT, "--eval-only", "MODEL.WEIGHTS", weights], weights),
    ]:
        run = subprocess.run(
            [sys.executable, str(REPO / "tools/train_net.py"), *map(str, argv),
             "OUTPUT_DIR", str(tmp_path / "out")],
            capture_output=True, text=True, env=dict(os.environ), timeout=600,
        )
        assert run.returncode == 2, run.stderr
        assert "Traceback" not in run.stderr
        errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and str(named) in errors[0]
    assert not marker.exists()


def test_yaml_python_tag_is_refused_by_every_merge(tmp_path):
    marker = tmp_path / "MARKER"
    config = _evil_yaml(tmp_path / "evil.yaml", marker)
    refused = r"evil\.yaml: line 3: YAML tag !!python/object/apply:os.system refused"
    with pytest.raises(ConfigError, match=refused):
        get_retina_cfg().merge_from_file(str(config))  # what benchmarks and tests call
    with pytest.raises(ConfigError, match="evil.yaml"):
        get_retina_cfg().merge_from_file(str(config), allow_unsafe=True)
    assert not marker.exists()


def test_yaml_python_tag_in_a_base_file_is_refused_naming_it(tmp_path):
    marker = tmp_path / "MARKER"
    base = _evil_yaml(tmp_path / "base.yaml", marker)
    child = tmp_path / "child.yaml"
    child.write_text('_BASE_: "base.yaml"\nSOLVER:\n  BASE_LR: 0.5\n')
    with pytest.raises(ConfigError) as error:
        read_config_yaml(str(child))
    assert str(error.value).startswith(str(base))
    assert not marker.exists()


def test_train_net_and_predict_refuse_a_malicious_config(datasets, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    config = _evil_yaml(tmp_path / "evil.yaml", marker)
    line = _train_net_error(capsys, "--config-file", config, "OUTPUT_DIR", tmp_path / "out")
    assert str(config) in line and "refused" in line
    image = sorted((datasets / "synthetic/raw/images").glob("*.png"))[0]
    code = predict.main(["--config-file", str(config), "--weights", str(tmp_path / "w.pth"),
                         "--input", str(image), "--output", str(tmp_path / "predictions")])
    assert code == 2
    assert str(config) in _error_line(capsys)
    assert not marker.exists()


def test_base_chains_still_merge(tmp_path):
    # Two levels (the instant config has a _BASE_ of its own) plus a list of bases, each
    # relative to the file naming it; values of the later file win, sections merge.
    (tmp_path / "sub").mkdir()
    extra = tmp_path / "sub" / "extra.yaml"
    extra.write_text("SOLVER:\n  BASE_LR: 0.125\n  MAX_ITER: 7\n")
    child = tmp_path / "sub" / "child.yaml"
    child.write_text(f'_BASE_: [{str(INSTANT)!r}, "extra.yaml"]\nSOLVER:\n  MAX_ITER: 11\n')
    cfg = get_retina_cfg()
    cfg.merge_from_file(str(child))
    parent = yaml.safe_load((REPO / "configs/Base-MaskRCNN-cpu-light.yaml").read_text())
    root = yaml.safe_load((REPO / "configs/Base-MaskRCNN.yaml").read_text())
    assert cfg.SOLVER.MAX_ITER == 11 and cfg.SOLVER.BASE_LR == 0.125
    assert cfg.MODEL.FPN.OUT_CHANNELS == 32  # the instant config's, over its base's 64
    assert parent["MODEL"]["FPN"]["OUT_CHANNELS"] == 64
    assert cfg.MODEL.BACKBONE.NAME == parent["MODEL"]["BACKBONE"]["NAME"]  # its base's
    assert cfg.MODEL.META_ARCHITECTURE == root["MODEL"]["META_ARCHITECTURE"]  # and that one's


@pytest.mark.parametrize(
    "text,message",
    [
        ("SOLVER:\n  MAX_ITER: [1, 2\n", "not valid YAML"),
        ("SOLVER: {MAX_ITER: 1}\n  BASE_LR: 3\n", "not valid YAML"),
        ("- 1\n- 2\n", "holds a YAML list, not a mapping of config keys"),
        ('_BASE_: "loop.yaml"\n', "_BASE_ chain loops back"),
        ('_BASE_: "nowhere.yaml"\n', "_BASE_ 'nowhere.yaml': no such file"),
    ],
)
def test_bad_yaml_is_one_error_line_naming_the_file(datasets, tmp_path, capsys, text, message):
    config = tmp_path / "loop.yaml"
    config.write_text(text)
    line = _train_net_error(capsys, "--config-file", config, "OUTPUT_DIR", tmp_path / "out")
    assert line.startswith(f"error: {config}") and message in line


def test_wrong_value_types_on_the_command_line_are_config_errors(datasets, tmp_path, capsys):
    line = _train_net_error(capsys, "--config-file", INSTANT, "OUTPUT_DIR", tmp_path / "out",
                            "SOLVER.MAX_ITER", "abc")
    assert line == "error: command line: SOLVER.MAX_ITER 'abc': expected int (like 3), got str"
    with pytest.raises(ConfigError, match="odd length"):
        merge_config(get_retina_cfg(), str(INSTANT), ["SOLVER.MAX_ITER"])


# --- weights files --------------------------------------------------------------------------


def _malicious_pth(path: Path, marker: Path, model=None) -> Path:
    state = model.state_dict() if model is not None else {}
    torch.save({"model": state, "iteration": 3, "extra": _Payload(marker)}, path)
    return path


def _malicious_pkl(path: Path, marker: Path) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": np.zeros(2)}, "__author__": _Payload(marker)}, f)
    return path


@pytest.mark.parametrize("kind", ["pth", "pkl"])
def test_malicious_weights_are_refused_by_the_checkpointer(tmp_path, kind):
    marker = tmp_path / "MARKER"
    path = (_malicious_pth if kind == "pth" else _malicious_pkl)(tmp_path / f"evil.{kind}", marker)
    model = build_model(_cfg())
    with pytest.raises(UntrustedCheckpointError, match=rf"{path}: refused: .*posix\.system"):
        LesionCheckpointer(model).load(str(path))
    with pytest.raises(UntrustedCheckpointError):
        load_checkpoint(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["pth", "pkl"])
def test_train_net_eval_only_and_predict_refuse_malicious_weights(datasets, tmp_path, capsys, kind):
    marker = tmp_path / "MARKER"
    path = (_malicious_pth if kind == "pth" else _malicious_pkl)(tmp_path / f"evil.{kind}", marker)
    line = _train_net_error(capsys, "--config-file", INSTANT, "--eval-only", "OUTPUT_DIR",
                            tmp_path / "out", "MODEL.WEIGHTS", path)
    assert str(path) in line and "--trust-checkpoint" in line
    line = _predict_error(capsys, datasets, tmp_path, path)
    assert str(path) in line and "refused" in line
    assert not marker.exists()


def test_resume_refuses_a_malicious_last_checkpoint(datasets, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    out = tmp_path / "out"
    out.mkdir()
    path = _malicious_pth(out / "model_0000002.pth", marker, build_model(_cfg()))
    (out / "last_checkpoint").write_text("model_0000002.pth")
    for flags in (["--resume"], ["--resume", "--eval-only"]):
        line = _train_net_error(capsys, "--config-file", INSTANT, *flags, "OUTPUT_DIR", out)
        assert str(path) in line and "refused" in line
    assert not marker.exists()


def test_multitask_lesion_weights_refuse_a_malicious_file(tmp_path):
    marker = tmp_path / "MARKER"
    path = _malicious_pth(tmp_path / "lesion.pth", marker)
    cfg = get_retina_cfg()
    cfg.merge_from_file(str(REPO / "configs/multitask_heimed.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.MULTITASK.LESION_WEIGHTS = str(path)
    with pytest.raises(UntrustedCheckpointError, match=str(path)):
        build_model(cfg)
    assert not marker.exists()


def test_trust_checkpoint_reads_a_full_pickle_with_a_warning(datasets, tmp_path, caplog):
    # A benign full pickle: an argparse.Namespace is no tensor, so weights_only refuses it.
    model = build_model(_cfg())
    path = tmp_path / "old.pth"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(UntrustedCheckpointError):
        LesionCheckpointer(build_model(_cfg())).load(str(path))
    target = build_model(_cfg())
    with caplog.at_level(logging.WARNING, logger="retina_d2.safe_load"):
        extra = LesionCheckpointer(target, trust_checkpoint=True).load(str(path))
    assert extra["args"].lr == 0.1
    messages = [r.getMessage() for r in caplog.records]
    assert any(str(path) in m and "TRUST_CHECKPOINT" in m for m in messages)
    for a, b in zip(model.state_dict().values(), target.state_dict().values()):
        assert torch.equal(a, b)
    # The flags set the key, which every checkpointer of the tools follows.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="retina_d2.safe_load"):
        results = train_net.cli(["--config-file", str(INSTANT), "--eval-only", "--trust-checkpoint",
                                 "MODEL.WEIGHTS", str(path), "OUTPUT_DIR", str(tmp_path / "out"),
                                 "RETINA.EVAL.REPORT", "False", "RETINA.EVAL.NUM_OVERLAYS", "0"])
    assert "segm" in results
    assert any(str(path) in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="retina_d2.safe_load"):
        image = sorted((datasets / "synthetic/raw/images").glob("*.png"))[0]
        code = predict.main(["--config-file", str(INSTANT), "--weights", str(path),
                             "--trust-checkpoint", "--input", str(image),
                             "--output", str(tmp_path / "predictions")])
    assert code == 0
    assert any(str(path) in r.getMessage() for r in caplog.records)


def test_trainer_saved_checkpoint_resumes_with_weights_only(datasets, tmp_path):
    from retina_d2.engine import LesionTrainer

    cfg = _cfg(OUTPUT_DIR=str(tmp_path / "out"))
    trainer = LesionTrainer(cfg)
    trainer.iter = 4  # as if 5 iterations had run (the trainer's state dict carries it)
    trainer.checkpointer.save("model_0000004", iteration=np.int64(4))  # an old-style NumPy count
    saved = torch.load(tmp_path / "out/model_0000004.pth", weights_only=False)
    assert isinstance(saved["iteration"], np.integer)  # so the allow-list is what lets it load
    resumed = LesionTrainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 5
    expected = trainer.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_numpy_arrays_and_scalars_load_from_a_pth(tmp_path):
    path = tmp_path / "numpy.pth"
    torch.save({"model": {"w": torch.ones(2)}, "iteration": np.int64(7),
                "mean": np.arange(3, dtype=np.float32), "flags": np.zeros(2, dtype=bool)}, path)
    loaded = load_checkpoint(str(path))
    assert loaded["iteration"] == 7 and isinstance(loaded["iteration"], np.int64)
    assert loaded["mean"].tolist() == [0.0, 1.0, 2.0] and loaded["flags"].dtype == np.bool_


def test_model_zoo_pkl_with_matching_heuristics_loads(tmp_path):
    torch.manual_seed(2)
    source = build_model(_cfg())
    path = tmp_path / "zoo.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in source.state_dict().items()},
                     "__author__": "Detectron2 Model Zoo", "matching_heuristics": True},
                    f, protocol=2)
    target = build_model(_cfg())
    LesionCheckpointer.for_inference(_cfg(), target).load(str(path))  # every parameter set
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name


def _damaged(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.pth"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "truncated":
        torch.save({"model": build_model(_cfg()).state_dict()}, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    return path


@pytest.mark.parametrize("kind", ["empty", "text", "truncated", "tensor"])
def test_damaged_weights_are_one_error_line(datasets, tmp_path, capsys, kind):
    path = _damaged(tmp_path, kind)
    with pytest.raises(UnreadableCheckpointError):
        LesionCheckpointer(build_model(_cfg())).load(str(path))
    line = _train_net_error(capsys, "--config-file", INSTANT, "--eval-only", "OUTPUT_DIR",
                            tmp_path / "out", "MODEL.WEIGHTS", path)
    assert line.startswith(f"error: {path}: ")
    assert _predict_error(capsys, datasets, tmp_path, path).startswith(f"error: {path}: ")


def test_damaged_multitask_lesion_weights_name_the_file(tmp_path):
    path = _damaged(tmp_path, "truncated")
    with pytest.raises(UnreadableCheckpointError, match=str(path)):
        load_lesion_weights(torch.nn.Linear(1, 1), str(path))


# --- incomplete checkpoints -----------------------------------------------------------------


def _three_class_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "three_classes.pth"
    three = build_model(_cfg(**{"MODEL.ROI_HEADS.NUM_CLASSES": 3}))
    torch.save({"model": three.state_dict()}, path)
    return path


def _unset_by_three_classes():
    """The parameters a 3-class checkpoint cannot set in the 5-class model, worked out from the
    two models' own shapes."""
    five = dict(build_model(_cfg()).named_parameters())
    three = build_model(_cfg(**{"MODEL.ROI_HEADS.NUM_CLASSES": 3})).state_dict()
    return len(five), sorted(k for k, v in five.items() if three[k].shape != v.shape)


def test_eval_only_and_predict_refuse_another_class_count(datasets, tmp_path, capsys):
    path = _three_class_checkpoint(tmp_path)
    total, unset = _unset_by_three_classes()
    assert unset == sorted(
        f"roi_heads.{head}.{p}" for head in ("box_predictor.cls_score", "box_predictor.bbox_pred",
                                             "mask_head.predictor") for p in ("weight", "bias")
    )
    line = _train_net_error(capsys, "--config-file", INSTANT, "--eval-only", "OUTPUT_DIR",
                            tmp_path / "out", "MODEL.WEIGHTS", path)
    set_count = total - len(unset)
    assert line.startswith(f"error: {path}: sets {set_count} of the model's {total} parameters")
    assert f"{len(unset)} differ in shape" in line and "MODEL.ALLOW_PARTIAL_WEIGHTS" in line
    assert "roi_heads." in line
    assert f"sets {total - len(unset)} of" in _predict_error(capsys, datasets, tmp_path, path)


def test_a_checkpoint_matching_no_tensor_is_refused(tmp_path):
    path = tmp_path / "unrelated.pth"
    torch.save({"model": {"unrelated.weight": torch.zeros(2)}}, path)
    model = build_model(_cfg())
    total = len(list(model.parameters()))
    refused = rf"sets 0 of the model's {total} parameters; {total} are not in it"
    with pytest.raises(IncompleteCheckpointError, match=refused):
        LesionCheckpointer.for_inference(_cfg(), model).load(str(path))


def test_partial_weights_are_allowed_when_asked_and_when_training(datasets, tmp_path):
    path = _three_class_checkpoint(tmp_path)
    allowed = _cfg(**{"MODEL.ALLOW_PARTIAL_WEIGHTS": True})
    LesionCheckpointer.for_inference(allowed, build_model(allowed)).load(str(path))
    # Fine-tuning from a pretrained start: the trainer's checkpointer only warns.
    from retina_d2.engine import LesionTrainer

    trainer = LesionTrainer(_cfg(OUTPUT_DIR=str(tmp_path / "out"), **{"MODEL.WEIGHTS": str(path)}))
    trainer.resume_or_load(resume=False)
    three = torch.load(path, weights_only=True)["model"]
    backbone = "backbone.bottom_up.stem.conv1.weight"
    assert torch.equal(trainer.model.state_dict()[backbone], three[backbone])
