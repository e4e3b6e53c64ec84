"""Multi-process training through tools/train_net.py --num-gpus 2 on a machine without CUDA: two
gloo processes train the instant config in step (DistributedDataParallel), evaluate their halves
of the test set, and write one checkpoint."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retina_d2.data.converters import ConvertOptions, synthetic

REPO = Path(__file__).resolve().parents[2]
INSTANT = REPO / "configs/quick_schedules/maskrcnn_synthetic_instant_test.yaml"
ITERATIONS = 4
# Detectron2's IterationTimer counts to MAX_ITER + 1 and leaves out its 3 warm-up iterations: a
# rank that ran all 4 logs "Overall training speed: 2 iterations".
TIMED = ITERATIONS + 1 - 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) path runs without CUDA only")
def test_two_cpu_processes_train_in_step_and_write_one_checkpoint(tmp_path):
    synthetic.convert(None, tmp_path / "data" / "synthetic", ConvertOptions(progress=False),
                      count=6, size=192)
    out = tmp_path / "run"
    env = dict(os.environ, RETINA_D2_DATASETS=str(tmp_path / "data"), OMP_NUM_THREADS="1")
    command = [
        sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", str(INSTANT),
        "--num-gpus", "2", "--dist-url", f"tcp://127.0.0.1:{_free_port()}",
        "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", str(ITERATIONS),
        "RETINA.EVAL.NUM_OVERLAYS", "0", "RETINA.EVAL.REPORT", "False",
    ]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]

    logs = {rank: (out / name).read_text() for rank, name in ((0, "log.txt"), (1, "log.txt.rank1"))}
    for rank, log in logs.items():
        # World size 2: DefaultTrainer wrapped the model in DistributedDataParallel (which
        # refuses a CPU model without compat.patch_cpu_ddp), so the ranks' steps are in sync.
        assert f"Rank of current process: {rank}. World size: 2" in log
        assert f"Overall training speed: {TIMED} iterations" in log, f"rank {rank} did not step"
    # The final evaluation split the 2 val images between the ranks.
    assert "Start inference on 1 batches" in logs[0] and "Start inference on 1 batches" in logs[1]
    checkpoints = sorted(p.name for p in out.rglob("*.pth"))
    assert checkpoints == ["model_final.pth"]
    assert (out / "inference" / "synthetic_seg_val" / "instance_metrics.json").is_file()
