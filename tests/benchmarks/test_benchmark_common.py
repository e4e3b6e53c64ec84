"""Shared pieces of tools/benchmark.py: training a config or scoring its final weights; the
script is python -m benchmarks, from any folder."""
import os
import subprocess
import sys
from pathlib import Path

import benchmarks

REPO = Path(__file__).resolve().parents[2]


def test_train_or_score_trains_or_scores_the_final_weights(monkeypatch):
    calls = []
    monkeypatch.setattr(benchmarks, "run_tool", lambda *args, env: calls.append((args, env)) or 12.5)
    run_dir, env, opts = Path("/runs/x"), {"RETINA_D2_DATASETS": "/d"}, ["OUTPUT_DIR", "/runs/x"]

    assert benchmarks.train_or_score(Path("c.yaml"), opts, run_dir, False, env) == 12.5
    assert calls.pop() == (("train_net.py", "--config-file", "c.yaml", *opts), env)

    assert benchmarks.train_or_score(Path("c.yaml"), opts, run_dir, True, env) is None
    assert calls.pop() == (
        ("train_net.py", "--config-file", "c.yaml", "--eval-only",
         "MODEL.WEIGHTS", "/runs/x/model_final.pth", *opts),
        env,
    )


def test_the_script_is_python_m_benchmarks_from_any_folder(tmp_path):
    """tools/benchmark.py, run from elsewhere with no PYTHONPATH, is python -m benchmarks run from
    the checkout root: the same parser (so the same module), its exit status passed on."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*command, cwd):
        return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env,
                              timeout=300)

    for args in (["--help"], ["pixel-ap", "--help"]):
        script = run(sys.executable, str(REPO / "tools" / "benchmark.py"), *args, cwd=tmp_path)
        module = run(sys.executable, "-m", "benchmarks", *args, cwd=REPO)
        assert script.returncode == module.returncode == 0, script.stderr + module.stderr
        assert script.stdout == module.stdout and "pixel-ap" in script.stdout
    unknown = run(sys.executable, str(REPO / "tools" / "benchmark.py"), "fly", cwd=tmp_path)
    assert unknown.returncode == 2 and "invalid choice: 'fly'" in unknown.stderr
