"""The `retina-d2` console command: each subcommand is the tool script it wraps."""
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from retina_d2.cli import SUBCOMMANDS

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, command=(sys.executable, "-m", "retina_d2.cli")):
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=REPO, timeout=300)


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
