"""Tests for the synthetic fundus generator: exact ground truth, determinism and the file layout."""
import csv
import json
import os

import cv2
import numpy as np
import pytest
from scipy import ndimage

from retina_d2.data import synthetic
from retina_d2.data.synthetic import (
    LESION_ABBREVS,
    SyntheticFundus,
    generate_dataset,
    image_rng,
    render_fundus,
)

LESION_TYPES = ("MA", "HE", "EX", "SE")
EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


def _render(seed, size=384, healthy=False):
    return render_fundus(np.random.default_rng(seed), size=size, healthy=healthy)


@pytest.fixture(scope="module")
def samples():
    # Enough seeds that every lesion type appears several times (checked below), small enough
    # to stay fast.
    return [_render(seed) for seed in range(8)]


def _read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def test_samples_contain_every_lesion_type(samples):
    # Guards the other tests against passing vacuously on images without lesions.
    for kind in LESION_TYPES:
        assert sum(s.counts[kind] for s in samples) >= 2, kind


def test_render_is_deterministic_per_seed():
    a, b, c = _render(11), _render(11), _render(12)
    assert isinstance(a, SyntheticFundus)
    np.testing.assert_array_equal(a.image, b.image)
    for kind in LESION_ABBREVS:
        np.testing.assert_array_equal(a.masks[kind], b.masks[kind])
    assert a.counts == b.counts
    assert (a.dr_grade, a.dme_grade) == (b.dr_grade, b.dme_grade)
    assert a.optic_disc_center == b.optic_disc_center and a.fovea_center == b.fovea_center
    assert not np.array_equal(a.image, c.image)


def test_image_and_mask_types(samples):
    for s in samples:
        assert s.image.dtype == np.uint8 and s.image.shape == (384, 384, 3)
        assert set(s.masks) == set(LESION_ABBREVS) and set(s.counts) == set(LESION_ABBREVS)
        for kind in LESION_ABBREVS:
            assert s.masks[kind].dtype == bool and s.masks[kind].shape == (384, 384)
        assert 0 <= s.dr_grade <= 4 and 0 <= s.dme_grade <= 2


def test_connected_components_match_counts(samples):
    for s in samples:
        for kind in LESION_ABBREVS:
            _, n = ndimage.label(s.masks[kind], structure=EIGHT_CONNECTED)
            assert n == s.counts[kind], (kind, n, s.counts[kind])
        assert s.counts["OD"] == 1


def test_same_type_instances_keep_two_pixel_gap(samples):
    gap = np.ones((5, 5), dtype=bool)  # pixels within Chebyshev distance 2 of an instance
    for s in samples:
        for kind in LESION_TYPES:
            labels, n = ndimage.label(s.masks[kind], structure=EIGHT_CONNECTED)
            for i in range(1, n + 1):
                near = ndimage.binary_dilation(labels == i, structure=gap)
                others = (labels > 0) & (labels != i)
                assert not (near & others).any(), (kind, i)


def test_masks_are_disjoint(samples):
    for s in samples:
        stacked = np.stack([s.masks[k] for k in LESION_ABBREVS]).astype(int)
        assert stacked.sum(axis=0).max() <= 1


def test_lesions_inside_fov_and_off_the_disc(samples):
    size = 384
    yy, xx = np.mgrid[0:size, 0:size]
    center = (size - 1) / 2.0
    radius = np.hypot(xx - center, yy - center)
    for s in samples:
        lesions = np.any([s.masks[k] for k in LESION_TYPES], axis=0)
        assert (radius[lesions] < 0.46 * size - 2).all()  # inside and off the rim
        assert (radius[s.masks["OD"]] < 0.46 * size).all()
        # Outside the field of view the photograph is black.
        assert s.image[radius > 0.46 * size + 2].max() == 0
        od_x, od_y = s.optic_disc_center
        assert s.masks["OD"][int(round(od_y)), int(round(od_x))]
        assert not (lesions & ndimage.binary_dilation(s.masks["OD"], iterations=2)).any()


def test_landmarks_geometry(samples):
    for s in samples:
        (od_x, od_y), (fx, fy) = s.optic_disc_center, s.fovea_center
        disc_diameter = np.ptp(np.nonzero(s.masks["OD"])[1]) + 1
        assert fy == pytest.approx(od_y)
        assert abs(fx - od_x) == pytest.approx(2.5 * disc_diameter, rel=0.05)
        assert disc_diameter == pytest.approx(384 / 7, rel=0.1)


def test_grades_follow_the_lesions(samples):
    for s in samples:
        has_lesion = any(s.counts[k] for k in LESION_TYPES)
        assert (s.dr_grade == 0) == (not has_lesion)
        assert (s.dme_grade == 0) == (s.counts["EX"] == 0)
        only_few_ma = s.counts["MA"] <= 10 and not any(s.counts[k] for k in ("HE", "EX", "SE"))
        assert (s.dr_grade == 1) == (has_lesion and only_few_ma)


@pytest.mark.parametrize(
    "ma, he, ex, se, grade",
    [
        (0, 0, 0, 0, 0),
        (10, 0, 0, 0, 1),  # mild: a few microaneurysms only
        (11, 0, 0, 0, 2),
        (0, 1, 0, 0, 2),
        (0, 0, 1, 0, 2),
        (0, 0, 0, 1, 2),
        (0, 3, 0, 0, 2),
        (0, 4, 0, 0, 3),  # severe: many haemorrhages
        (0, 2, 0, 1, 3),
        (0, 3, 0, 1, 3),
        (0, 4, 0, 1, 4),  # soft exudate + many haemorrhages stands in for proliferative DR
    ],
)
def test_dr_grade_table(ma, he, ex, se, grade):
    counts = {"MA": ma, "HE": he, "EX": ex, "SE": se, "OD": 1}
    assert synthetic._dr_grade(counts) == grade


def test_dme_grade_follows_exudate_distance_to_fovea(samples):
    seen = set()
    for s in samples:
        ys, xs = np.nonzero(s.masks["EX"])
        if ys.size == 0:
            continue
        fx, fy = s.fovea_center
        nearest = np.hypot(xs - fx, ys - fy).min()
        disc_diameter = np.ptp(np.nonzero(s.masks["OD"])[1]) + 1
        if abs(nearest - disc_diameter) < 1.5:
            continue  # too close to the threshold for the mask-based diameter estimate
        assert s.dme_grade == (2 if nearest < disc_diameter else 1)
        seen.add(s.dme_grade)
    assert seen == {1, 2}


def _empty_canvas(size=64):
    masks = {k: np.zeros((size, size), bool) for k in LESION_ABBREVS}
    allowed = np.ones((size, size), bool)
    allowed[:, 50:] = False  # e.g. the optic disc or the FOV rim
    image = np.zeros((size, size, 3), np.float32)
    return synthetic._LesionCanvas(image, allowed, np.ones((size, size), np.float32), masks)


@pytest.mark.parametrize(
    "first, second, dx, fits",
    [
        ("HE", "HE", 6, False),  # one background pixel between same-type instances: too close
        ("HE", "HE", 7, True),  # two pixels: enough
        ("HE", "EX", 4, False),  # a different type may not overwrite the first lesion's pixels
        ("HE", "EX", 5, True),  # but may touch it
    ],
)
def test_placement_rules(first, second, dx, fits):
    canvas = _empty_canvas()
    dot = synthetic._disc_patch(5, 3)
    red = np.array([100.0, 10.0, 10.0])
    assert canvas.try_place(first, dot, (20, 20), red, 0.5, 1.0)
    assert canvas.try_place(second, dot, (20 + dx, 20), red, 0.5, 1.0) == fits
    assert sum(canvas.counts.values()) == (2 if fits else 1)
    stacked = np.stack([canvas.masks[k] for k in LESION_ABBREVS]).astype(int)
    assert stacked.sum(axis=0).max() == 1
    assert stacked.sum() == 21 * (2 if fits else 1)  # a 5-px disc has 21 pixels
    # A lesion reaching into a forbidden region is refused.
    assert not canvas.try_place("MA", dot, (48, 40), red, 0.5, 1.0)


def test_healthy_image_has_only_the_disc():
    sick, healthy = _render(5), _render(5, healthy=True)
    for kind in LESION_TYPES:
        assert healthy.counts[kind] == 0 and not healthy.masks[kind].any()
    assert healthy.counts["OD"] == 1 and healthy.masks["OD"].any()
    assert healthy.dr_grade == 0 and healthy.dme_grade == 0
    # Same eye, lesions removed: the anatomy comes from the same generator stream.
    np.testing.assert_array_equal(healthy.masks["OD"], sick.masks["OD"])
    assert healthy.optic_disc_center == sick.optic_disc_center
    lesions = np.any([sick.masks[k] for k in LESION_TYPES], axis=0)
    assert lesions.any()
    far = ~ndimage.binary_dilation(lesions, iterations=12)
    np.testing.assert_array_equal(healthy.image[far], sick.image[far])


def test_microaneurysm_diameters_at_1024():
    diameters = []
    for seed in range(2):
        s = _render(seed, size=1024)
        labels, _ = ndimage.label(s.masks["MA"], structure=EIGHT_CONNECTED)
        for rows, cols in ndimage.find_objects(labels):
            diameters += [rows.stop - rows.start, cols.stop - cols.start]
    assert diameters, "no microaneurysm drawn"
    assert min(diameters) >= 1 and max(diameters) <= 5


def test_microaneurysms_stay_visible_below_1024(samples):
    for s in samples:
        labels, _ = ndimage.label(s.masks["MA"], structure=EIGHT_CONNECTED)
        for rows, cols in ndimage.find_objects(labels):
            assert rows.stop - rows.start >= 2 and cols.stop - cols.start >= 2


def test_generate_dataset_layout(tmp_path):
    count, size, seed = 5, 160, 3
    splits = generate_dataset(tmp_path, count=count, size=size, seed=seed)
    stems = [f"synth_{i:04d}" for i in range(count)]

    with open(tmp_path / "splits.json") as f:
        assert json.load(f) == splits
    assert sorted(splits["train"] + splits["val"]) == stems  # each image exactly once
    assert len(splits["val"]) == 1  # round(5 * 0.25)

    header, grades = _read_csv(tmp_path / "grades.csv")
    assert header == ["image", "dr_grade", "dme_grade"]
    header, landmarks = _read_csv(tmp_path / "landmarks.csv")
    assert header == ["image", "od_x", "od_y", "fovea_x", "fovea_y"]
    header, counts = _read_csv(tmp_path / "counts.csv")
    assert header == ["image", "MA", "HE", "EX", "SE", "OD"]
    assert [r[0] for r in grades] == [r[0] for r in landmarks] == [r[0] for r in counts] == stems

    n_healthy = 0
    for i, stem in enumerate(stems):
        row_counts = dict(zip(LESION_ABBREVS, map(int, counts[i][1:])))
        healthy = not any(row_counts[k] for k in LESION_TYPES)
        n_healthy += healthy
        # Rendering with healthy=True or with no lesion placed gives the same image, so the
        # counts tell which flag was used.
        expected = render_fundus(image_rng(seed, i), size=size, healthy=healthy)
        assert row_counts == expected.counts
        assert [int(v) for v in grades[i][1:]] == [expected.dr_grade, expected.dme_grade]
        od_x, od_y, fovea_x, fovea_y = map(float, landmarks[i][1:])
        assert (od_x, od_y) == pytest.approx(expected.optic_disc_center, abs=0.01)
        assert (fovea_x, fovea_y) == pytest.approx(expected.fovea_center, abs=0.01)

        bgr = cv2.imread(str(tmp_path / "images" / f"{stem}.png"), cv2.IMREAD_COLOR)
        np.testing.assert_array_equal(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), expected.image)
        for kind in LESION_ABBREVS:
            path = tmp_path / "masks" / kind / f"{stem}.png"
            mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            assert mask.dtype == np.uint8 and mask.shape == (size, size)
            assert set(np.unique(mask)) <= {0, 255}
            np.testing.assert_array_equal(mask == 255, expected.masks[kind])
    assert n_healthy >= 1  # healthy_fraction 0.125 of 5 rounds to 1, and count >= 4 forces it


def test_generate_dataset_split_sizes(tmp_path):
    splits = generate_dataset(tmp_path / "two", count=2, size=128, seed=0)
    assert len(splits["val"]) == 1 and len(splits["train"]) == 1
    splits = generate_dataset(tmp_path / "one", count=1, size=128, seed=0)
    assert splits == {"train": ["synth_0000"], "val": []}
    assert os.path.isfile(tmp_path / "one" / "masks" / "OD" / "synth_0000.png")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"count": 0},
        {"count": -3},
        {"size": 127},
        {"val_fraction": 1.0},
        {"val_fraction": -0.1},
        {"healthy_fraction": 1.5},
    ],
)
def test_generate_dataset_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        generate_dataset(tmp_path, **kwargs)
    assert not (tmp_path / "images").exists()  # validation happens before anything is written


def test_render_rejects_small_size():
    with pytest.raises(ValueError, match="size"):
        render_fundus(np.random.default_rng(0), size=64)
