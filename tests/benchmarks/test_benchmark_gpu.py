"""tools/benchmark.py gpu, run on the CPU (the GPU rows themselves come from a CUDA machine and are
in benchmarks/results/gpu.json): the plumbing of every row, the AMP training row refused without
CUDA, and timings that agree with each other."""
import json

import pytest

from benchmarks import main

INSTANT = "configs/quick_schedules/maskrcnn_synthetic_instant_test.yaml"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"
    main(["gpu", "--device", "cpu", "--configs", INSTANT, "--iterations", "2", "--warmup", "1",
          "--passes", "2", "--count", "4", "--size", "256", "--tiling", "none", "--out", str(out)])
    return json.loads(out.read_text())


def test_every_row_is_measured_or_says_why_not(results):
    rows = {(r["task"], r["amp"]): r for r in results["rows"]}
    assert set(rows) == {("train", False), ("train", True), ("infer", False), ("infer", True)}
    assert rows["train", True]["error"] == "not run: Detectron2's AMPTrainer needs CUDA"
    for key in [("train", False), ("infer", False), ("infer", True)]:
        assert "error" not in rows[key], rows[key]
        assert rows[key]["images_per_second"] > 0 and rows[key]["peak_rss_mb"] > 0


def test_training_row_agrees_with_its_own_iterations(results):
    train = next(r for r in results["rows"] if r["task"] == "train" and not r["amp"])
    assert train["trainer"] == "SimpleTrainer" and train["iterations"] == 2
    assert train["loss_finite"] and train["last_total_loss"] > 0
    # images/s is the batch over the mean step; the median of two steps is their mean.
    assert train["images_per_second"] == pytest.approx(
        train["batch"] / train["seconds_per_iteration"], rel=1e-6
    )
    assert 0 <= train["data_wait_seconds"] < train["seconds_per_iteration"]


def test_inference_rows_say_what_they_ran(results):
    for row in (r for r in results["rows"] if r["task"] == "infer"):
        assert row["passes"] == 2 and row["images"] == 1  # 4 photographs, a quarter for val
        assert row["network_input"] == "192x192"  # the instant config resizes to 192 px
