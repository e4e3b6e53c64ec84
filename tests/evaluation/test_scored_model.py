"""Which model an evaluation scored: the weights file and iteration written into eval_info.json,
during training (Detectron2's event storage) and in --eval-only (MODEL.WEIGHTS)."""
import json

import torch
from detectron2.config import get_cfg
from detectron2.utils.events import EventStorage

from retina_d2.config import add_retina_config
from retina_d2.evaluation import LesionFROCEvaluator, LesionInstanceEvaluator
from retina_d2.evaluation.scored_model import checkpoint_iteration, scored_model
from test_instance_eval import registered, run_evaluator  # noqa: F401  (fixture)


def _cfg(tmp_path, **keys):
    cfg = get_cfg()
    add_retina_config(cfg)
    cfg.OUTPUT_DIR = str(tmp_path / "run")
    cfg.SOLVER.MAX_ITER = 100
    for key, value in keys.items():
        node = cfg
        *parents, leaf = key.split(".")
        for part in parents:
            node = getattr(node, part)
        setattr(node, leaf, value)
    return cfg


def _checkpoint(path, iteration=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {"model": {"w": torch.zeros(2)}}
    if iteration is not None:
        content["iteration"] = iteration
    torch.save(content, path)
    return path


def test_eval_only_names_model_weights_and_its_stored_iteration(tmp_path):
    weights = _checkpoint(tmp_path / "run" / "model_best.pth", iteration=41)
    assert scored_model(_cfg(tmp_path, **{"MODEL.WEIGHTS": str(weights)})) == {
        "weights": str(weights), "iteration": 41, "during_training": False}
    bare = _checkpoint(tmp_path / "other.pth")  # a file without a trainer's iteration
    assert checkpoint_iteration(str(bare)) is None
    url = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
    assert scored_model(_cfg(tmp_path, **{"MODEL.WEIGHTS": url})) == {
        "weights": url, "iteration": None, "during_training": False}
    assert scored_model(_cfg(tmp_path))["weights"] is None
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    assert checkpoint_iteration(str(tmp_path / "broken.pth")) is None


def test_during_training_names_the_iteration_and_the_checkpoint_saved_at_it(tmp_path):
    cfg = _cfg(tmp_path, **{"MODEL.WEIGHTS": "detectron2://start.pkl"})
    with EventStorage(start_iter=49) as storage:
        storage.iter = 49  # the trainer sets it before each step; EvalHook runs after it
        # Not saved at this iteration (CHECKPOINT_PERIOD elsewhere): no file named.
        assert scored_model(cfg) == {"weights": None, "iteration": 49, "during_training": True}
        periodic = _checkpoint(tmp_path / "run" / "model_0000049.pth", 49)
        assert scored_model(cfg)["weights"] == str(periodic)
        storage.iter = 99  # the last iteration: model_final.pth
        final = _checkpoint(tmp_path / "run" / "model_final.pth", 99)
        assert scored_model(cfg) == {"weights": str(final), "iteration": 99,
                                     "during_training": True}
        # The final evaluation runs after training, where Detectron2 has set storage.iter to
        # MAX_ITER: still the weights of iteration 99, as model_final.pth stores.
        storage.iter = 100
        assert scored_model(cfg) == {"weights": str(final), "iteration": 99,
                                     "during_training": True}


def test_the_evaluators_write_it_into_eval_info(registered, tmp_path):  # noqa: F811
    name, _, dets = registered
    weights = _checkpoint(tmp_path / "ckpt" / "model_final.pth", iteration=7)
    cfg = _cfg(tmp_path, **{"MODEL.WEIGHTS": str(weights), "MODEL.MASK_ON": True})
    for kind in (LesionInstanceEvaluator, LesionFROCEvaluator):
        out = tmp_path / kind.__name__
        run_evaluator(kind(cfg, name, output_dir=str(out)), name, dets)
        info = json.loads((out / "eval_info.json").read_text())
        assert info["model"] == {"weights": str(weights), "iteration": 7,
                                 "during_training": False}
        assert info["dataset"] == name
    # Built without a config (tools/evaluate.py's way), nothing is claimed.
    out = tmp_path / "plain"
    run_evaluator(LesionInstanceEvaluator(name, output_dir=str(out), distributed=False), name,
                  dets)
    assert "model" not in json.loads((out / "eval_info.json").read_text())
