"""End to end through tools/train_net.py: the evaluation folder records the model it scored and
the report names it, after training (the trainer's last iteration, model_final.pth) and in
--eval-only (MODEL.WEIGHTS and the iteration stored in it)."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INSTANT = REPO / "configs/quick_schedules/maskrcnn_synthetic_instant_test.yaml"
DATASET = "synthetic_seg_val"


def _train_net(*args, datasets):
    env = dict(os.environ, RETINA_D2_DATASETS=str(datasets))
    done = subprocess.run([sys.executable, str(REPO / "tools" / "train_net.py"),
                           "--config-file", str(INSTANT), *map(str, args)],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def test_training_and_eval_only_record_and_report_the_model(synthetic_datasets, tmp_path):
    run = tmp_path / "run"
    _train_net("OUTPUT_DIR", run, "RETINA.EVAL.NUM_OVERLAYS", 0, datasets=synthetic_datasets)
    final = run / "model_final.pth"
    info = json.loads((run / "inference" / DATASET / "eval_info.json").read_text())
    # MAX_ITER 3: Detectron2 numbers the last iteration 2 and saves model_final.pth at it.
    assert info["model"] == {"weights": str(final), "iteration": 2, "during_training": True}
    page = (run / "inference" / DATASET / "report" / "index.html").read_text()
    assert f"saved as <code class=\"weights\">{final}</code>" in page
    assert "in training at iteration 2" in page

    again = tmp_path / "eval_only"
    _train_net("--eval-only", "MODEL.WEIGHTS", final, "OUTPUT_DIR", again,
               "RETINA.EVAL.NUM_OVERLAYS", 0, datasets=synthetic_datasets)
    info = json.loads((again / "inference" / DATASET / "eval_info.json").read_text())
    assert info["model"] == {"weights": str(final), "iteration": 2, "during_training": False}
    page = (again / "inference" / DATASET / "report" / "index.html").read_text()
    assert f"<code class=\"weights\">{final}</code>, iteration 2." in page
