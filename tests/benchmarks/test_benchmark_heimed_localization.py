"""tools/benchmark.py heimed-localization: its training-free rows (brightest region, image centre)
on synthetic eyes with known discs, its schedule and its command line (the full run trains for
about ten CPU minutes: a benchmark, not a test)."""
import math

import cv2
import numpy as np
import pytest

from benchmarks import BENCHMARKS, build_parser
from benchmarks.heimed_localization import (
    CONFIG,
    brightest_region_center,
    floor_rows,
)
from benchmarks.heimed_semantic import scaled_schedule
from retina_d2.data.synthetic import image_rng, render_fundus

DISC_DIAMETER_512 = 512 / 7  # the synthetic disc is 1/7 of the image wide


@pytest.mark.parametrize("index", [0, 1, 2])
def test_brightest_region_finds_the_synthetic_disc_within_half_a_diameter(index):
    fundus = render_fundus(image_rng(3, index), size=512)
    x, y = brightest_region_center(fundus.image)
    od_x, od_y = fundus.optic_disc_center
    assert math.hypot(x - od_x, y - od_y) < DISC_DIAMETER_512 / 2
    # The fovea, 2.5 disc diameters away, is the darkest spot, not the brightest.
    assert math.hypot(x - fundus.fovea_center[0], y - fundus.fovea_center[1]) > DISC_DIAMETER_512


def test_brightest_region_maps_back_through_its_downscaling():
    image = np.zeros((600, 1200, 3), np.uint8)
    cv2.circle(image, (600, 300), 290, (120, 60, 30), -1)  # field of view
    cv2.circle(image, (751, 203), 25, (250, 230, 200), -1)  # the disc
    x, y = brightest_region_center(image)  # worked on at 512 px wide, returned at 1200
    assert math.hypot(x - 751, y - 203) < 5


def test_floor_rows_score_distances_to_the_records_disc(tmp_path):
    records, expected = [], {"brightest": [], "centre": []}
    for i in range(2):
        fundus = render_fundus(image_rng(5, i), size=256)
        name = f"eye{i}.png"
        cv2.imwrite(str(tmp_path / name), cv2.cvtColor(fundus.image, cv2.COLOR_RGB2BGR))
        truth = list(fundus.optic_disc_center)
        records.append({"file_name": name, "optic_disc_center": truth})
        bx, by = brightest_region_center(fundus.image)
        expected["brightest"].append(math.hypot(bx - truth[0], by - truth[1]))
        expected["centre"].append(math.hypot(128 - truth[0], 128 - truth[1]))
    records.append({"file_name": "eye0.png"})  # no disc mark: not scored
    rows = floor_rows(records, tmp_path, radii=[20.0])
    by_name = {r["name"].split()[0]: r for r in rows}
    assert by_name["brightest"]["images"] == 2
    assert by_name["brightest"]["distance"] == pytest.approx(np.mean(expected["brightest"]))
    assert by_name["image"]["distance"] == pytest.approx(np.mean(expected["centre"]))
    assert by_name["image"]["within20px"] == pytest.approx(
        np.mean(np.array(expected["centre"]) <= 20) * 100
    )


def test_command_line_and_schedule():
    assert BENCHMARKS["heimed-localization"][0] == "heimed_localization"
    args = build_parser(["heimed-localization"]).parse_args(
        ["heimed-localization", "--iterations", "60"]
    )
    assert args.iterations == 60 and args.config_file == CONFIG and not args.skip_train
    opts = dict(zip(*[iter(scaled_schedule(CONFIG, 75))] * 2))
    # multitask_heimed.yaml: 150 iterations, steps (110, 135), warm-up 10.
    assert opts["SOLVER.MAX_ITER"] == "75" and opts["SOLVER.STEPS"] == "(55, 68)"
    assert opts["SOLVER.WARMUP_ITERS"] == "5" and opts["TEST.EVAL_PERIOD"] == "0"
