"""Reproducible runs: ``train_net --seed N`` gives the same loss curve twice on the CPU (model
initialisation, the sampler's order, augmentation in a loader worker), a different seed another
curve; ``--deterministic`` sets torch's switches and needs a seed."""
import os
from pathlib import Path

import pytest
import torch
from detectron2.engine import HookBase

from retina_d2.engine import LesionTrainer
from retina_d2.tools import train_net

REPO = Path(__file__).resolve().parents[2]
INSTANT = str(REPO / "configs/quick_schedules/maskrcnn_synthetic_instant_test.yaml")
ITERATIONS = 20


class _LossCurve(HookBase):
    """Every iteration's total loss, as the trainer's EventStorage recorded it."""

    def __init__(self, curves):
        self._curves = curves

    def after_train(self):
        history = self.trainer.storage.history("total_loss").values()
        self._curves.append([loss for loss, _ in sorted(history, key=lambda v: v[1])])


@pytest.fixture
def loss_curves(monkeypatch):
    curves = []
    build_hooks = LesionTrainer.build_hooks
    monkeypatch.setattr(
        LesionTrainer, "build_hooks", lambda self: build_hooks(self) + [_LossCurve(curves)]
    )
    return curves


@pytest.fixture
def torch_switches():
    """What --deterministic changes, put back afterwards for the tests that follow."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2:4]
    if saved[4] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[4]


def _train(seed, out, *flags, iterations=ITERATIONS):
    train_net.cli([
        "--config-file", INSTANT, "--seed", str(seed), *flags, "OUTPUT_DIR", str(out),
        "SOLVER.MAX_ITER", str(iterations), "SOLVER.BASE_LR", "0.002",
        # The 192 px photographs resized to 128 px: a cheaper step.
        "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128",
        # A loader worker: its augmentation draws must follow the seed too.
        "DATALOADER.NUM_WORKERS", "1",
        "DATASETS.TEST", "()", "RETINA.EVAL.NUM_OVERLAYS", "0", "RETINA.EVAL.REPORT", "False",
    ])


def test_same_seed_same_losses_other_seed_other_losses(
    synthetic_datasets, monkeypatch, tmp_path, loss_curves, torch_switches
):
    monkeypatch.setenv("RETINA_D2_DATASETS", str(synthetic_datasets))
    _train(7, tmp_path / "a")
    # --deterministic changes nothing on the CPU: the same seed still gives the same curve.
    _train(7, tmp_path / "b", "--deterministic")
    _train(8, tmp_path / "c", iterations=2)
    first, again, other = loss_curves
    assert len(first) == ITERATIONS and all(torch.isfinite(torch.tensor(first)))
    assert first == again  # bit for bit, not approximately
    # Another seed: other initial weights, batch and augmentation, so another loss from the
    # very first iteration on.
    assert len(other) == 2 and other[0] != first[0] and other[1] != first[1]


def test_deterministic_sets_torchs_switches(
    synthetic_datasets, monkeypatch, tmp_path, torch_switches
):
    from retina_d2.engine import setup_cfg

    monkeypatch.setenv("RETINA_D2_DATASETS", str(synthetic_datasets))
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = True
    args = train_net.build_parser().parse_args([
        "--config-file", INSTANT, "--seed", "3", "--deterministic",
        "OUTPUT_DIR", str(tmp_path), "CUDNN_BENCHMARK", "True",
    ])
    cfg = setup_cfg(args.config_file, train_net.run_opts(args), args)
    assert cfg.SEED == 3 and cfg.RETINA.DETERMINISTIC
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    # The seed went through default_setup: torch's generator starts at SEED + rank (0 here).
    assert torch.initial_seed() == 3


def test_deterministic_without_a_seed_is_one_error(synthetic_datasets, monkeypatch, tmp_path,
                                                    capsys):
    monkeypatch.setenv("RETINA_D2_DATASETS", str(synthetic_datasets))
    with pytest.raises(SystemExit) as exit_info:
        train_net.cli(["--config-file", INSTANT, "--deterministic", "OUTPUT_DIR", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "needs a seed" in err and "--seed" in err
    assert len(err.strip().splitlines()) == 1
