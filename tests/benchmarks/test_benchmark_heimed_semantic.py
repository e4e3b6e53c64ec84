"""tools/benchmark.py heimed-semantic: the schedule each head is trained on, and the latency probe
on a semantic head (the full run trains for about forty CPU minutes: a benchmark, not a test)."""
from benchmarks.heimed_semantic import HEADS, REPO_ROOT, scaled_schedule
from benchmarks.infer import infer_latency


def _as_dict(opts):
    return dict(zip(opts[::2], opts[1::2]))


def test_schedule_keeps_each_step_and_switch_at_its_share():
    # Red-Seg: 1200 iterations, steps (900, 1100), stage switch at 840, warm-up 50.
    opts = _as_dict(scaled_schedule(REPO_ROOT / HEADS["Red-Seg"][0], 300))
    assert opts["SOLVER.MAX_ITER"] == "300" and opts["SOLVER.STEPS"] == "(225, 275)"
    assert opts["MODEL.LESION_SEG.LOSS_SWITCH_ITER"] == "210"
    assert opts["SOLVER.WARMUP_ITERS"] == "12" and opts["TEST.EVAL_PERIOD"] == "0"
    # Lesion-Net switches at the first LR step (-1): nothing to scale but the steps.
    opts = _as_dict(scaled_schedule(REPO_ROOT / HEADS["Lesion-Net 16s"][0], 120))
    assert "MODEL.LESION_SEG.LOSS_SWITCH_ITER" not in opts and opts["SOLVER.STEPS"] == "(90, 110)"


def test_latency_probe_runs_a_semantic_head():
    result = infer_latency(HEADS["CBAM-DeepLab"][0], size=128, repeats=1)
    assert result["seconds"] > 0 and result["detections"] is None
    assert 0 < result["parameters_m"] < 50
