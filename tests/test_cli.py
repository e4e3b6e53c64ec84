"""The `retina-d2` console command: each subcommand runs a tool module of the package, as the thin
script tools/<name>.py does; multi-process training and prediction through it; no sys.path hacks
in tools/."""
import json
import os
import re
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

from retina_d2.cli import SUBCOMMANDS, tool_module

REPO = Path(__file__).resolve().parents[1]
INSTANT = str(REPO / "configs/quick_schedules/maskrcnn_synthetic_instant_test.yaml")


def _cli(*args, command=(sys.executable, "-m", "retina_d2.cli"), env=None, timeout=300):
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env=env)


def _retina_d2():
    """The installed console script (what a user types), else the same entry through -m."""
    script = Path(sys.executable).parent / "retina-d2"
    return (str(script),) if script.is_file() else (sys.executable, "-m", "retina_d2.cli")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_help_lists_every_subcommand_with_an_example():
    done = _cli("--help")
    assert done.returncode == 0
    for name in ("convert", "train", "evaluate", "predict", "report"):
        assert f"\n  {name} " in done.stdout and f"\n  retina-d2 {name} " in done.stdout
    assert _cli().returncode == 2  # no command: the usage, as an error
    done = _cli("fly")
    assert done.returncode == 2 and "unknown command 'fly'" in done.stderr


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_subcommand_help_is_the_tools_with_an_example(name):
    done = _cli(name, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: retina-d2 {name}")
    assert "Example" in done.stdout
    script = SUBCOMMANDS[name][0]
    tool = subprocess.run([sys.executable, f"tools/{script}", "--help"], capture_output=True,
                          text=True, cwd=REPO, timeout=300)
    # The same parser: only the program name (and the wrapping it shifts) differs.
    words = " ".join(done.stdout.replace(f"retina-d2 {name}", script).split())
    assert words == " ".join(tool.stdout.split())


def test_subcommand_runs_the_tool_with_its_exit_code(tmp_path):
    done = _cli("report", "--eval-dir", str(tmp_path / "missing"))
    assert done.returncode == 2 and "does not exist" in done.stderr
    done = _cli("evaluate", "--gt", str(tmp_path / "gt.json"), "--predictions", "x.json")
    assert done.returncode == 2 and "gt.json" in done.stderr


def test_pip_install_made_the_command():
    try:
        dist = metadata.distribution("retina_d2")
    except metadata.PackageNotFoundError:
        pytest.skip("retina_d2 is not pip-installed here (`make env` installs it with -e)")
    (entry,) = [e for e in dist.entry_points if e.group == "console_scripts"]
    assert (entry.name, entry.value) == ("retina-d2", "retina_d2.cli:main")
    script = Path(sys.executable).parent / "retina-d2"
    assert script.is_file(), f"{script} missing: reinstall with pip install -e ."
    done = _cli("--help", command=(str(script),))
    assert done.returncode == 0 and "retina-d2 train --config-file" in done.stdout


def test_tool_scripts_are_thin_and_leave_sys_path_alone():
    scripts = sorted((REPO / "tools").glob("*.py"))
    assert scripts
    for script in scripts:
        text = script.read_text()
        # The editable install (pip install -e .) makes retina_d2 importable from anywhere.
        assert not re.search(r"sys\.path\.(insert|append)|sys\.path\s*[+=]|site\.addsitedir",
                             text), f"{script.name} changes sys.path"
    for name, (script, entry, _, _) in SUBCOMMANDS.items():
        module = tool_module(script)
        text = (REPO / "tools" / script).read_text()
        assert f"from {module} import" in text, f"tools/{script} does not run {module}"
        code = [line for line in text.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
        assert len(code) <= 12, f"tools/{script} holds logic; it belongs in {module}"
        assert callable(getattr(__import__(module, fromlist=[entry]), entry))


def _train_env(datasets):
    # One thread per process: two ranks on a 2-core machine.
    return dict(os.environ, RETINA_D2_DATASETS=str(datasets), OMP_NUM_THREADS="1")


def _train_flags(out):
    return ["--config-file", INSTANT, "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "2",
            "DATASETS.TEST", "()", "RETINA.EVAL.NUM_OVERLAYS", "0", "RETINA.EVAL.REPORT", "False"]


@pytest.fixture(scope="module")
def two_process_run(synthetic_datasets, tmp_path_factory):
    """``retina-d2 train --num-gpus 2`` on the instant config: its output folder and the run."""
    out = tmp_path_factory.mktemp("two_processes") / "run"
    done = _cli("train", "--num-gpus", "2", "--dist-url", f"tcp://127.0.0.1:{_free_port()}",
                *_train_flags(out), command=_retina_d2(), env=_train_env(synthetic_datasets),
                timeout=600)
    return out, done


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) path runs without CUDA only")
def test_train_with_two_processes_writes_one_checkpoint(two_process_run):
    # Regression: retina-d2 loaded tools/train_net.py by file path, and launch, which pickles
    # the training function for the processes it spawns, died with a PicklingError.
    out, done = two_process_run
    assert done.returncode == 0, done.stderr[-3000:]
    assert "PicklingError" not in done.stderr
    assert "Rank of current process: 1. World size: 2" in (out / "log.txt.rank1").read_text()
    assert sorted(p.name for p in out.rglob("*.pth")) == ["model_final.pth"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) path runs without CUDA only")
def test_predict_with_two_processes_predicts_every_image_once(two_process_run,
                                                               synthetic_datasets, tmp_path):
    # Regression: retina-d2 loaded tools/predict.py by file path, so the spawned processes could
    # not import the predict_shard function they were handed by name.
    run, trained = two_process_run
    assert trained.returncode == 0, trained.stderr[-3000:]
    photos = sorted((synthetic_datasets / "synthetic/raw/images").glob("*.png"))
    out = tmp_path / "predicted"
    done = _cli("predict", "--weights", str(run / "model_final.pth"), "--input",
                str(photos[0].parent), "--output", str(out), "--num-gpus", "2", "--dist-url",
                f"tcp://127.0.0.1:{_free_port()}", command=_retina_d2(),
                env=_train_env(synthetic_datasets), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "PicklingError" not in done.stderr
    # Each process wrote its part, and together they hold every photograph once.
    files = [json.loads(line)["file"] for rank in (0, 1)
             for line in (out / "parts" / f"rank{rank}.jsonl").read_text().splitlines()]
    assert sorted(files) == sorted(str(p) for p in photos)
    rows = (out / "lesion_counts.csv").read_text().splitlines()[1:]  # the merge: one per image
    assert sorted(row.split(",")[0] for row in rows) == [p.name for p in photos]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == [p.name for p in photos]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) path runs without CUDA only")
def test_train_on_two_machines_of_localhost_writes_one_checkpoint(synthetic_datasets, tmp_path):
    out = tmp_path / "run"
    url = f"tcp://127.0.0.1:{_free_port()}"
    machines = [
        subprocess.Popen(
            [*_retina_d2(), "train", "--num-machines", "2", "--machine-rank", str(rank),
             "--dist-url", url, *_train_flags(out)],
            cwd=REPO, env=_train_env(synthetic_datasets), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        for rank in (0, 1)
    ]
    try:
        finished = [machine.communicate(timeout=600) for machine in machines]
    finally:
        for machine in machines:
            machine.kill()
    for machine, (_, err) in zip(machines, finished):
        assert machine.returncode == 0, err[-3000:]
    # Machine 1's single process is global rank 1; only rank 0 saves.
    assert "Rank of current process: 1. World size: 2" in (out / "log.txt.rank1").read_text()
    assert sorted(p.name for p in out.rglob("*.pth")) == ["model_final.pth"]
