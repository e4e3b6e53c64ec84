"""Mixed-precision inference (RETINA.INFERENCE.AMP): the forward pass really runs in half
precision, the outputs come back in float32, and the tiled and untiled paths both take it. The
CPU runs autocast in bfloat16; the CUDA float16 path is measured by tools/benchmark.py gpu."""
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

import retina_d2.modeling  # noqa: F401  (registration)
from retina_d2.config import get_retina_cfg
from retina_d2.engine import LesionTrainer
from retina_d2.modeling.amp import AutocastInference, outputs_to_float32
from retina_d2.modeling.inference import LesionMerging
from retina_d2.modeling.tiling import TiledInference

INSTANT = Path(__file__).resolve().parents[2] / "configs/quick_schedules/maskrcnn_synthetic_instant_test.yaml"


def test_half_tensors_are_cast_back_and_the_rest_kept():
    instances = Instances((4, 5))
    instances.pred_boxes = Boxes(torch.tensor([[0.5, 1.0, 3.0, 2.5]], dtype=torch.float16))
    instances.scores = torch.tensor([0.75], dtype=torch.bfloat16)
    instances.pred_classes = torch.tensor([2])
    instances.pred_masks = torch.ones((1, 4, 5), dtype=torch.bool)
    out = outputs_to_float32([{"instances": instances, "sem_seg": torch.zeros(2, dtype=torch.half),
                               "grades": {"dr": torch.tensor([0.25], dtype=torch.half)}}])[0]
    i = out["instances"]
    assert i.pred_boxes.tensor.dtype == i.scores.dtype == torch.float32
    assert i.pred_boxes.tensor.tolist() == [[0.5, 1.0, 3.0, 2.5]] and i.scores.tolist() == [0.75]
    assert i.pred_classes.dtype == torch.int64 and i.pred_masks.dtype == torch.bool
    assert out["sem_seg"].dtype == out["grades"]["dr"].dtype == torch.float32


def _cfg(amp: bool, tiled: bool = False):
    cfg = get_retina_cfg()
    cfg.merge_from_file(str(INSTANT))
    cfg.MODEL.DEVICE = "cpu"
    cfg.INPUT.MIN_SIZE_TEST = 0
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # random weights: keep every detection
    cfg.TEST.DETECTIONS_PER_IMAGE = 20
    cfg.RETINA.INFERENCE.AMP = amp
    cfg.RETINA.INFERENCE.AMP_DTYPE = "bfloat16"
    cfg.RETINA.TILE.ENABLED = tiled
    cfg.RETINA.TILE.SIZE, cfg.RETINA.TILE.OVERLAP = 64, 16
    return cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(_cfg(False)).eval()


def _inputs():
    generator = torch.Generator().manual_seed(3)
    return {"image": torch.randint(0, 256, (3, 96, 128), generator=generator, dtype=torch.uint8),
            "height": 96, "width": 128}


def _conv_dtypes(model):
    """The output dtypes of the model's convolutions and linear layers during the next forward
    pass. (A Detectron2 Conv2d with a norm returns the norm's output, which autocast keeps in
    float32; the FPN's and heads' plain layers show the compute dtype.)"""
    seen = []
    handles = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
               for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    return seen, handles


@pytest.mark.parametrize("tiled", [False, True], ids=["whole", "tiled"])
def test_inference_runs_in_half_precision_and_returns_float32(model, tiled):
    runner = LesionTrainer.build_inference_model(_cfg(True, tiled), model)
    assert isinstance(runner, TiledInference if tiled else AutocastInference)
    seen, handles = _conv_dtypes(model)
    try:
        with torch.no_grad():
            out = runner([_inputs()])[0]["instances"]
    finally:
        for h in handles:
            h.remove()
    assert seen.count(torch.bfloat16) > len(seen) // 2, seen
    assert len(out) > 0 and out.image_size == (96, 128)
    assert out.pred_boxes.tensor.dtype == out.scores.dtype == torch.float32
    assert out.pred_masks.dtype == torch.bool


def test_lesion_merging_takes_half_precision_predictions(model):
    # LESION_MERGE is the pipeline's last step, around the autocast step: it merges the bfloat16
    # predictions, cast back to float32.
    cfg = _cfg(True)
    cfg.MODEL.LESION_MERGE.ENABLED = True
    cfg.MODEL.LESION_MERGE.SCORE_THRESH = 0.0
    runner = LesionTrainer.build_inference_model(cfg, model)
    assert isinstance(runner, LesionMerging) and isinstance(runner.model, AutocastInference)
    with torch.no_grad():
        out = runner([_inputs()])[0]["instances"]
    # Merged lesions of one class are disjoint (random weights' raw masks overlap heavily).
    assert len(out) > 0 and out.scores.dtype == torch.float32
    for cls in out.pred_classes.unique():
        masks = out.pred_masks[out.pred_classes == cls].flatten(1).int()
        overlap = masks @ masks.T
        assert torch.equal(overlap, torch.diag(overlap.diagonal()))


def test_without_amp_the_model_runs_in_float32(model):
    runner = LesionTrainer.build_inference_model(_cfg(False), model)
    assert runner is model
    seen, handles = _conv_dtypes(model)
    try:
        with torch.no_grad():
            runner([_inputs()])
    finally:
        for h in handles:
            h.remove()
    assert set(seen) == {torch.float32}


def test_half_precision_finds_what_float32_finds(model):
    # bfloat16 keeps 8 bits of mantissa: boxes move by a pixel or so and near-equal scores of
    # random weights may swap ranks across the cut, but most of the best detections stay.
    with torch.no_grad():
        full = model([_inputs()])[0]["instances"]
        half = LesionTrainer.build_inference_model(_cfg(True), model)([_inputs()])[0]["instances"]
    from torchvision.ops import box_iou

    top = full[full.scores.argsort(descending=True)[:10]]
    best = box_iou(top.pred_boxes.tensor, half.pred_boxes.tensor).max(1).values
    assert (best > 0.9).float().mean() >= 0.8, best


def test_an_unknown_dtype_is_refused(model):
    cfg = _cfg(True)
    cfg.RETINA.INFERENCE.AMP_DTYPE = "float8"
    with pytest.raises(ValueError, match="AMP_DTYPE"):
        LesionTrainer.build_inference_model(cfg, model)


def test_training_mode_passes_straight_through(model):
    wrapper = AutocastInference(_cfg(True), model)
    calls = []
    inner = torch.nn.Linear(1, 1)  # a module: the wrapper reads its mode and device
    inner.forward = lambda inputs: calls.append(torch.is_autocast_enabled("cpu")) or "losses"
    wrapper.model = inner
    assert wrapper([_inputs()]) == "losses" and calls == [False]
