"""Shared pieces of tools/benchmark.py: training a config or scoring its final weights."""
from pathlib import Path

import retina_d2.benchmarks as benchmarks


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
