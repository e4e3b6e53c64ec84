"""Mask -> instances: components, dilation without fusion, RLE that keeps every pixel."""
import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
from scipy import ndimage

from retina_d2.data.instances import (
    EOPHTHA_MA_DILATION,
    Dilation,
    coco_annotation,
    decode_rle,
    decode_segmentation,
    decode_segmentation_region,
    dilate_small_lesions,
    encode_rle,
    instance_rles,
    instance_rles_from_mask,
    label_components,
)

EIGHT = np.ones((3, 3), int)


def _random_mask(seed, shape=(37, 53), density=0.2):
    rng = np.random.default_rng(seed)
    return rng.random(shape) < density


@pytest.mark.parametrize("seed", range(20))
def test_strip_rle_equals_full_image_encoding(seed):
    labels = label_components(_random_mask(seed))
    seen = 0
    for label_id, rle in instance_rles(labels):
        assert rle == encode_rle(labels == label_id)
        seen += 1
    assert seen == labels.max()


@pytest.mark.parametrize("connectivity,structure", [(8, EIGHT), (4, None)])
def test_components_match_scipy(connectivity, structure):
    for seed in range(10):
        mask = _random_mask(seed)
        _, expected = ndimage.label(mask, structure=structure)
        rles = instance_rles_from_mask(mask, connectivity=connectivity)
        assert len(rles) == expected
        union = np.zeros(mask.shape, bool)
        for rle in rles:
            m = decode_rle(rle)
            assert not (union & m).any()
            union |= m
        assert np.array_equal(union, mask)


def test_min_area_drops_small_components_and_keeps_ids_dense():
    mask = np.zeros((10, 10), bool)
    mask[1, 1] = True  # 1 px
    mask[5:8, 5:8] = True  # 9 px
    labels = label_components(mask, min_area=2)
    assert labels.max() == 1 and (labels > 0).sum() == 9


def test_one_pixel_lesion_survives_as_rle():
    mask = np.zeros((20, 30), bool)
    mask[7, 11] = True
    (rle,) = instance_rles_from_mask(mask)
    ann = coco_annotation(rle, annotation_id=1, image_id=1, category_id=1)
    assert ann["area"] == 1 and ann["bbox"] == [11.0, 7.0, 1.0, 1.0]
    # As a polygon it is the pixel's unit square, which rasterises back to the pixel.
    ann = coco_annotation(rle, annotation_id=1, image_id=1, category_id=1, segmentation_format="polygon")
    assert ann["segmentation"] == [[11.0, 7.0, 11.0, 8.0, 12.0, 8.0, 12.0, 7.0]]
    assert np.array_equal(decode_segmentation(ann["segmentation"], 20, 30), mask)


def test_holes_survive_in_rle():
    mask = np.zeros((12, 12), bool)
    mask[2:10, 2:10] = True
    mask[5:7, 5:7] = False
    (rle,) = instance_rles_from_mask(mask)
    assert np.array_equal(decode_rle(rle), mask)
    assert coco_annotation(rle, annotation_id=1, image_id=1, category_id=3)["area"] == 60


def _polygon_annotation(mask):
    (rle,) = instance_rles_from_mask(mask)
    return coco_annotation(rle, annotation_id=1, image_id=1, category_id=3, segmentation_format="polygon")


def _assert_stores_exactly(ann, mask):
    """The stored segmentation decodes (pycocotools) to the mask, and ``area`` is its area."""
    decoded = decode_segmentation(ann["segmentation"], *mask.shape)
    np.testing.assert_array_equal(decoded, mask)
    stored = ann["segmentation"]
    if isinstance(stored, list):
        stored = mask_util.merge(mask_util.frPyObjects(stored, *mask.shape))
    assert ann["area"] == mask_util.area(stored) == mask.sum()


def test_polygon_format_keeps_a_blob_as_its_exact_outline():
    mask = np.zeros((20, 20), np.uint8)
    cv2.ellipse(mask, (10, 9), (6, 4), 30.0, 0, 360, 1, -1)
    mask = mask.astype(bool)
    ann = _polygon_annotation(mask)
    assert isinstance(ann["segmentation"], list) and len(ann["segmentation"]) == 1
    _assert_stores_exactly(ann, mask)
    box = np.zeros((9, 11), bool)
    box[2:6, 3:8] = True
    # A box is its four pixel corners (cf. test_decode_segmentation_reads_every_coco_form).
    assert _polygon_annotation(box)["segmentation"] == [[3.0, 2.0, 3.0, 6.0, 8.0, 6.0, 8.0, 2.0]]


@pytest.mark.parametrize("shape_name", ["1x5 line", "5x1 line", "3-px diagonal", "L"])
def test_polygon_format_keeps_one_pixel_wide_lesions(shape_name):
    mask = np.zeros((12, 12), bool)
    if shape_name == "1x5 line":
        mask[4, 3:8] = True
    elif shape_name == "5x1 line":
        mask[3:8, 4] = True
    elif shape_name == "3-px diagonal":
        mask[[3, 4, 5], [6, 7, 8]] = True
    else:
        mask[2:7, 3] = True
        mask[6, 3:9] = True
    ann = _polygon_annotation(mask)
    assert isinstance(ann["segmentation"], list)
    _assert_stores_exactly(ann, mask)


def test_polygon_format_keeps_rle_for_a_ring_with_a_hole():
    mask = np.zeros((12, 12), bool)
    mask[2:10, 2:10] = True
    mask[5:7, 5:7] = False
    ann = _polygon_annotation(mask)
    assert isinstance(ann["segmentation"], dict), "a polygon would fill the hole"
    _assert_stores_exactly(ann, mask)
    assert ann["area"] == 60


@pytest.mark.parametrize("seed", range(8))
def test_polygon_format_stores_every_random_lesion_exactly(seed):
    """Random lesions (holes, pinches, single pixels): whatever is stored is the lesion, pixel for
    pixel, and its ``area``; most are polygons."""
    mask = _random_mask(seed, shape=(30, 40), density=0.45)
    labels = label_components(mask)
    polygons = 0
    for label_id, rle in instance_rles(labels):
        ann = coco_annotation(
            rle, annotation_id=1, image_id=1, category_id=1, segmentation_format="polygon"
        )
        _assert_stores_exactly(ann, labels == label_id)
        polygons += isinstance(ann["segmentation"], list)
    assert polygons > labels.max() / 2


def _chebyshev_distance_to(source: np.ndarray) -> np.ndarray:
    return ndimage.distance_transform_cdt(~source, metric="chessboard")


def _dilation_scene(seed):
    """A random 40x40 scene of small lesions (4- or 8-connected) and a random dilation."""
    rng = np.random.default_rng(seed)
    connectivity = (4, 8)[seed % 2]
    mask = rng.random((40, 40)) < rng.uniform(0.02, 0.15)
    dilation = Dilation(kernel=int(rng.choice([3, 5, 7])), iterations=int(rng.integers(1, 4)))
    return label_components(mask, connectivity), connectivity, dilation


@pytest.mark.parametrize("block", range(6))
def test_dilated_lesions_stay_one_piece_nearest_to_their_source(block):
    """300 random scenes: every dilated instance is one connected piece (in the components'
    connectivity) holding its whole source, no source pixel changes owner, and every pixel it
    gains is strictly nearer (Chebyshev) to its source than to any other lesion, within reach."""
    for seed in range(block * 50, block * 50 + 50):
        labels, connectivity, dilation = _dilation_scene(seed)
        dilated = dilate_small_lesions(labels, dilation)
        assert ((labels == 0) | (dilated == labels)).all(), "a source pixel changed owner"
        count = labels.max()
        assert dilated.max() == count
        if not count:
            continue
        structure = EIGHT if connectivity == 8 else None
        distances = np.stack([_chebyshev_distance_to(labels == k) for k in range(1, count + 1)])
        reach = dilation.iterations * (dilation.kernel - 1) // 2
        for k in range(1, count + 1):
            grown = dilated == k
            _, pieces = ndimage.label(grown, structure=structure)
            assert pieces == 1, f"seed {seed}: lesion {k} in {pieces} pieces"
            gained = grown & (labels == 0)
            own = distances[k - 1][gained]
            others = np.delete(distances, k - 1, axis=0)[:, gained]
            assert (own <= reach).all()
            assert (own[None] < others).all(), f"seed {seed}: lesion {k} took a pixel not nearest"


@pytest.mark.parametrize("kernel,iterations", [(3, 1), (5, 2), (7, 1), (3, 4)])
def test_a_lone_lesion_dilates_as_cv2_does(kernel, iterations):
    rng = np.random.default_rng(kernel * 10 + iterations)
    for _ in range(10):
        mask = np.zeros((40, 40), np.uint8)
        mask[rng.integers(0, 40, 3), rng.integers(0, 40, 3)] = 1
        labels = np.where(mask > 0, 1, 0).astype(np.int32)  # one lesion, even in three pieces
        expected = cv2.dilate(mask, np.ones((kernel, kernel), np.uint8), iterations=iterations)
        got = dilate_small_lesions(labels, Dilation(kernel, iterations))
        np.testing.assert_array_equal(got, expected.astype(np.int32))


def test_pixels_equally_near_two_lesions_stay_background():
    """Hand-worked: two 1-px lesions 4 columns apart, 5x5 once (reach 2). Column 7 is 2 away from
    both, so it keeps them apart; each gets the 5x5 square around it minus that column."""
    labels = np.zeros((12, 14), np.int32)
    labels[5, 5], labels[5, 9] = 1, 2
    dilated = dilate_small_lesions(labels, Dilation(kernel=5, iterations=1))
    expected = np.zeros_like(labels)
    expected[3:8, 3:7] = 1
    expected[3:8, 8:12] = 2
    np.testing.assert_array_equal(dilated, expected)


def test_dilation_validation():
    with pytest.raises(ValueError, match="odd"):
        Dilation(kernel=4)
    with pytest.raises(ValueError, match="iterations"):
        Dilation(iterations=-1)
    with pytest.raises(ValueError, match="connectivity"):
        label_components(np.zeros((3, 3)), connectivity=6)


def test_decode_segmentation_reads_every_coco_form():
    mask = np.zeros((9, 11), bool)
    mask[2:6, 3:8] = True
    (rle,) = instance_rles_from_mask(mask)
    assert np.array_equal(decode_segmentation(rle, 9, 11), mask)
    bytes_rle = dict(rle, counts=rle["counts"].encode("ascii"))
    assert np.array_equal(decode_segmentation(bytes_rle, 9, 11), mask)
    flat = mask.ravel(order="F").astype(int)
    change = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate(([0], change, [flat.size]))).tolist()
    assert np.array_equal(decode_segmentation({"size": [9, 11], "counts": counts}, 9, 11), mask)
    # A polygon along the box's pixel corners rasterises to the box.
    polygon = [[3.0, 2.0, 8.0, 2.0, 8.0, 6.0, 3.0, 6.0]]
    assert decode_segmentation(polygon, 9, 11).sum() == mask.sum()


def _region_to_mask(region, shape):
    mask = np.zeros(shape, bool)
    if region is not None:
        rows, cols, patch = region
        mask[rows, cols] = patch
        # The box is tight: every edge row and column holds a lesion pixel.
        assert patch[0].any() and patch[-1].any() and patch[:, 0].any() and patch[:, -1].any()
    return mask


@pytest.mark.parametrize("seed", range(12))
def test_region_decoding_equals_pycocotools(seed):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(1, 60)), int(rng.integers(1, 80)))
    # Sparse, dense, empty and full masks: long runs need multi-character counts and the
    # delta coding that starts at the third count; full masks start with an empty run.
    density = [0.01, 0.3, 0.95, 0.0, 1.0, 0.5][seed % 6]
    mask = rng.random(shape) < density
    if seed % 4 == 0:
        mask[:] = False
        mask[rng.integers(shape[0]), rng.integers(shape[1])] = True  # one pixel
    rle = encode_rle(mask)
    got = decode_segmentation_region(rle, *shape)
    assert (got is None) == (not mask.any())
    np.testing.assert_array_equal(_region_to_mask(got, shape), mask_util.decode(
        dict(rle, counts=rle["counts"].encode("ascii"))).astype(bool))
    np.testing.assert_array_equal(_region_to_mask(got, shape), mask)
    # Bytes counts, uncompressed RLE and polygons go the same way.
    as_bytes = dict(rle, counts=rle["counts"].encode("ascii"))
    np.testing.assert_array_equal(
        _region_to_mask(decode_segmentation_region(as_bytes, *shape), shape), mask
    )


def test_region_decoding_of_a_large_image_and_other_forms():
    shape = (2848, 4288)
    labels = np.zeros(shape, np.int32)
    labels[100:103, 4000:4002] = 1  # a 6-pixel microaneurysm far from the origin
    labels[2840:2848, 0:3] = 2  # touching the corner
    rles = dict(instance_rles(labels))
    for label_id, rle in rles.items():
        rows, cols, patch = decode_segmentation_region(rle, *shape)
        ys, xs = np.nonzero(labels == label_id)
        assert (rows.start, rows.stop, cols.start, cols.stop) == (
            ys.min(), ys.max() + 1, xs.min(), xs.max() + 1)
        assert patch.all()
    polygon = [[3.0, 2.0, 8.0, 2.0, 8.0, 6.0, 3.0, 6.0]]
    rows, cols, patch = decode_segmentation_region(polygon, 9, 11)
    assert (rows, cols) == (slice(2, 6), slice(3, 8)) and patch.all()
