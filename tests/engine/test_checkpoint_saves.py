"""Crash-safe checkpoints: saves are atomic (temporary file, fsync, rename), ``last_checkpoint``
only ever names a complete file, a kill -9 in the middle of a save loses nothing, and ``--resume``
falls back past a damaged last checkpoint with a warning naming it."""
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from retina_d2.modeling import LesionCheckpointer
from retina_d2.modeling.checkpoint import NoIntactCheckpointError, checkpoint_damage

REPO = Path(__file__).resolve().parents[2]


class _Records(logging.Handler):
    """The messages of one logger, whatever its propagation (setup_logger turns it off)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_of_checkpoint():
    handler = _Records()
    log = logging.getLogger("retina_d2.modeling.checkpoint")
    log.addHandler(handler)
    yield handler.messages
    log.removeHandler(handler)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def _save(folder, name, seed, **extra):
    """Save a model made from ``seed`` as ``name``; returns its state dict."""
    model = _model(seed)
    LesionCheckpointer(model, str(folder)).save(name, **extra)
    return model.state_dict()


def _resumed_state(folder):
    """What a resuming run loads: (model state, extra data of the checkpoint)."""
    model = _model(999)
    extra = LesionCheckpointer(model, str(folder)).resume_or_load("", resume=True)
    return model.state_dict(), extra


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_save_leaves_the_complete_file_named_by_last_checkpoint_and_no_temporary(tmp_path):
    state = _save(tmp_path, "model_0000004", seed=1, iteration=4)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000004.pth"]
    loaded = torch.load(tmp_path / "model_0000004.pth", weights_only=True)
    assert _same(loaded["model"], state) and loaded["iteration"] == 4


def test_saved_files_honour_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        _save(tmp_path, "model_final", seed=1)
    finally:
        os.umask(old)
    assert (tmp_path / "model_final.pth").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "last_checkpoint").stat().st_mode & 0o777 == 0o640


_CHILD = textwrap.dedent(
    """
    import io, os, sys, time
    sys.path.insert(0, {repo!r})
    import retina_d2  # noqa: F401  (Detectron2 compat first)
    import torch
    from torch import nn
    from retina_d2.modeling import LesionCheckpointer

    real_save = torch.save

    def half_then_hang(obj, f):
        # Serialise fully, write half of it to the file, make it durable, then hang: the
        # state a kill -9 in the middle of a large checkpoint's write leaves.
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        print("writing", flush=True)
        time.sleep(600)

    torch.save = half_then_hang
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    LesionCheckpointer(model, {folder!r}).save("model_best", iteration=9)
    """
)


def test_kill_9_during_a_save_loses_nothing_and_resume_uses_the_previous_file(tmp_path):
    # model_best.pth is saved again and again under one name, and last_checkpoint names it: a
    # save in place killed halfway would leave last_checkpoint naming a truncated file.
    _save(tmp_path, "model_0000001", seed=1, iteration=1)
    best = _save(tmp_path, "model_best", seed=2, iteration=3)
    before = (tmp_path / "model_best.pth").read_bytes()
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD.format(repo=str(REPO), folder=str(tmp_path))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "writing"
        # Mid-save: the half-written bytes are only in the temporary file.
        partial = [p for p in tmp_path.iterdir() if p.name.endswith(".retina_d2-partial")]
        assert len(partial) == 1 and partial[0].name.startswith(".model_best.pth.")
        assert partial[0].stat().st_size > 0
        assert (tmp_path / "last_checkpoint").read_text() == "model_best.pth"
        assert (tmp_path / "model_best.pth").read_bytes() == before
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert (tmp_path / "model_best.pth").read_bytes() == before
    assert checkpoint_damage(str(tmp_path / "model_best.pth")) is None
    state, extra = _resumed_state(tmp_path)
    assert _same(state, best) and extra["iteration"] == 3
    # The next save cleans the dead save's temporary file up.
    _save(tmp_path, "model_0000005", seed=3)
    assert not any(p.name.endswith(".retina_d2-partial") for p in tmp_path.iterdir())


def test_next_save_removes_only_the_toolkits_own_temporaries(tmp_path):
    ours = [".model_0000009.pth.0123abcd.retina_d2-partial", ".last_checkpoint.deadbeef.retina_d2-partial"]
    others = [
        "model_0000009.pth.tmp",
        ".model_0000009.pth.tmp",
        "notes.retina_d2-partial",  # not hidden: not our pattern
        ".model.pth.XYZ.retina_d2-partial",  # not 8 hex digits
        ".model.pth.0123abcd.retina_d2-partial.bak",
    ]
    for name in ours + others:
        (tmp_path / name).write_bytes(b"x")
    _save(tmp_path, "model_0000010", seed=1)
    names = {p.name for p in tmp_path.iterdir()}
    assert not names & set(ours)
    assert set(others) <= names


def _truncate(path: Path, keep: float = 0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _flip_a_byte_in_the_middle(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_a_byte_in_the_middle, lambda p: p.write_bytes(b"")])
def test_resume_falls_back_past_a_damaged_last_checkpoint(tmp_path, warnings_of_checkpoint, damage):
    good = _save(tmp_path, "model_0000001", seed=1, iteration=1)
    _save(tmp_path, "model_0000003", seed=3, iteration=3)
    damage(tmp_path / "model_0000003.pth")
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    state, extra = _resumed_state(tmp_path)
    assert _same(state, good) and extra["iteration"] == 1
    damaged = str(tmp_path / "model_0000003.pth")
    assert any(damaged in m and "damaged" in m for m in warnings_of_checkpoint)
    assert any(
        str(tmp_path / "model_0000001.pth") in m and damaged in m for m in warnings_of_checkpoint
    )


def test_fallback_takes_the_most_recently_written_intact_checkpoint(tmp_path):
    _save(tmp_path, "model_0000001", seed=1, iteration=1)
    newer = _save(tmp_path, "model_0000002", seed=2, iteration=2)
    _save(tmp_path, "model_final", seed=3, iteration=3)
    os.utime(tmp_path / "model_0000001.pth", ns=(1, 1))  # written long ago
    _truncate(tmp_path / "model_final.pth")
    state, extra = _resumed_state(tmp_path)
    assert _same(state, newer) and extra["iteration"] == 2


def test_no_intact_checkpoint_is_one_clear_error(tmp_path):
    _save(tmp_path, "model_0000001", seed=1)
    _save(tmp_path, "model_final", seed=2)
    _truncate(tmp_path / "model_0000001.pth")
    _truncate(tmp_path / "model_final.pth", keep=0.9)
    with pytest.raises(NoIntactCheckpointError, match="no intact checkpoint to resume from"):
        _resumed_state(tmp_path)


def test_last_checkpoint_naming_a_path_elsewhere_is_not_followed(tmp_path, warnings_of_checkpoint):
    outside = tmp_path / "elsewhere"
    run = tmp_path / "run"
    _save(outside, "model_0000009", seed=9)
    good = _save(run, "model_0000001", seed=1)
    (run / "last_checkpoint").write_text("../elsewhere/model_0000009.pth")
    state, _ = _resumed_state(run)
    assert _same(state, good)
    assert any("not a file in" in m for m in warnings_of_checkpoint)


def test_without_resume_the_given_weights_are_loaded(tmp_path):
    weights = _save(tmp_path / "w", "model_final", seed=5)
    _save(tmp_path / "run", "model_0000001", seed=1)
    model = _model(0)
    LesionCheckpointer(model, str(tmp_path / "run")).resume_or_load(
        str(tmp_path / "w" / "model_final.pth"), resume=False
    )
    assert _same(model.state_dict(), weights)


def test_train_net_resume_without_an_intact_checkpoint_is_one_error_line(
    synthetic_datasets, monkeypatch, tmp_path, capsys
):
    from retina_d2.tools import train_net

    monkeypatch.setenv("RETINA_D2_DATASETS", str(synthetic_datasets))
    _save(tmp_path, "model_final", seed=1)
    _truncate(tmp_path / "model_final.pth")
    with pytest.raises(SystemExit) as exit_info:
        train_net.cli(
            [
                "--config-file",
                str(REPO / "configs/quick_schedules/maskrcnn_synthetic_instant_test.yaml"),
                "--resume",
                "OUTPUT_DIR",
                str(tmp_path),
            ]
        )
    assert exit_info.value.code == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(error) == 1
    assert str(tmp_path / "last_checkpoint") in error[0]
    assert "no intact checkpoint to resume from" in error[0]
