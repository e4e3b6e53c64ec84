"""per_image_map: hand-worked scenes, an independent re-implementation on random scenes, the
evaluator interface and tools/evaluate.py --protocol."""
import json
import math

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances

from retina_d2.evaluation.protocols import PerImageMAPEvaluator, per_image_map
from retina_d2.evaluation.protocols.per_image_map import image_average_precision

SHAPE = (40, 60)
EX, MA = 3, 1
CATEGORIES = [{"id": MA, "name": "microaneurysm"}, {"id": EX, "name": "hard exudate"}]


def rle_of(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def box_mask(y, x, h, w, shape=SHAPE):
    mask = np.zeros(shape, bool)
    mask[y : y + h, x : x + w] = True
    return mask


class Scene:
    """A COCO GT and results built image by image."""

    def __init__(self):
        self.images, self.annotations, self.results = [], [], []

    def image(self, lesions=(), predictions=(), shape=SHAPE):
        """lesions: (category, mask); predictions: (category, mask, score)."""
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "height": shape[0], "width": shape[1],
                            "file_name": f"{image_id}.png"})
        for category, mask in lesions:
            rle = rle_of(mask)
            self.annotations.append(dict(
                id=len(self.annotations) + 1, image_id=image_id, category_id=category,
                segmentation=rle, area=float(mask.sum()), iscrowd=0,
                bbox=[float(v) for v in mask_util.toBbox(rle)],
            ))
        for category, mask, score in predictions:
            self.results.append(dict(image_id=image_id, category_id=category,
                                     segmentation=rle_of(mask), score=float(score)))
        return image_id

    @property
    def gt(self):
        return {"images": self.images, "annotations": self.annotations,
                "categories": CATEGORIES}


# --- hand-worked cases ---------------------------------------------------------------------------

A, B = box_mask(5, 5, 10, 10), box_mask(20, 30, 10, 10)
FAR = box_mask(30, 50, 5, 5)


def hand_scene():
    """Seven images; the APs in the comments are worked out by hand in the tests below."""
    s = Scene()
    # perfect: both lesions found exactly -> AP 1 at every threshold.
    s.image([(EX, A), (EX, B)], [(EX, A, 0.9), (EX, B, 0.8)])
    # shifted by 3 px: IoU 70 / 130 = 0.538 -> a hit at 0.35 and 0.5, a miss at 0.75.
    s.image([(EX, A)], [(EX, box_mask(5, 8, 10, 10), 0.9)])
    # duplicate ranked between two hits: matched T, F, T; precision 1, 1/2, 2/3 -> envelope
    # 1, 2/3, 2/3; AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    s.image([(MA, A), (MA, B)], [(MA, A, 0.9), (MA, A, 0.8), (MA, B, 0.7)])
    # missed: one of two lesions found -> AP = 1/2 * 1 = 1/2.
    s.image([(EX, A), (EX, B)], [(EX, A, 0.9)])
    # extra: a false alarm ranked above the hit -> precision 0, 1/2 -> AP = 1 * 1/2.
    s.image([(EX, A)], [(EX, FAR, 0.9), (EX, A, 0.8)])
    # healthy images: three false alarms, then none. Excluded from the mean.
    s.image([], [(EX, A, 0.9), (MA, B, 0.5), (EX, FAR, 0.4)])
    s.image([], [])
    return s


def test_hand_worked_scene():
    m = per_image_map(hand_scene().gt, hand_scene().results)
    assert m["mAP35"] == pytest.approx((1 + 1 + 5 / 6 + 0.5 + 0.5) / 5 * 100)
    assert m["mAP50"] == pytest.approx((1 + 1 + 5 / 6 + 0.5 + 0.5) / 5 * 100)
    assert m["mAP75"] == pytest.approx((1 + 0 + 5 / 6 + 0.5 + 0.5) / 5 * 100)
    # Per category: the microaneurysm image alone; the four exudate images.
    assert m["mAP50-microaneurysm"] == pytest.approx(5 / 6 * 100)
    assert m["mAP75-hard exudate"] == pytest.approx((1 + 0 + 0.5 + 0.5) / 4 * 100)
    assert m["images"] == 5 and m["healthy_images"] == 2
    assert m["false_alarms_per_healthy_image"] == pytest.approx(3 / 2)


@pytest.mark.parametrize(
    "predictions, expected",
    [
        ([(EX, A, 0.9), (EX, B, 0.8)], 1.0),  # perfect
        ([(EX, A, 0.9), (EX, A, 0.8), (EX, B, 0.7)], 5 / 6),  # duplicate in between
        ([(EX, A, 0.9), (EX, B, 0.8), (EX, A, 0.7)], 1.0),  # duplicate ranked last: free
        ([(EX, A, 0.9)], 0.5),  # missed
        ([], 0.0),  # nothing predicted
        # extra on top: precision 0, 1/2, 2/3 -> envelope 2/3 at both hits
        ([(EX, FAR, 0.9), (EX, A, 0.8), (EX, B, 0.7)], 1 / 2 * 2 / 3 + 1 / 2 * 2 / 3),
        # the right place but the wrong lesion type is a false alarm: precision 0, 1/2 at
        # recall 0, 1/2 -> AP = 1/2 * 1/2
        ([(MA, A, 0.9), (EX, B, 0.8)], 0.25),
    ],
)
def test_single_image_cases(predictions, expected):
    s = Scene()
    s.image([(EX, A), (EX, B)], predictions)
    assert per_image_map(s.gt, s.results, (0.5,))["mAP50"] == pytest.approx(expected * 100)


def test_an_extra_prediction_on_top_halves_a_single_lesion_image():
    assert image_average_precision([False, True], 1) == pytest.approx(0.5)
    assert image_average_precision([True, False], 1) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="without ground truth"):
        image_average_precision([True], 0)


def test_only_healthy_images_give_nan_and_their_false_alarms():
    s = Scene()
    s.image([], [(EX, A, 0.9), (EX, B, 0.8)])
    m = per_image_map(s.gt, s.results)
    assert math.isnan(m["mAP35"]) and m["images"] == 0
    assert m["false_alarms_per_healthy_image"] == 2


def test_crowd_regions_are_not_lesions():
    s = Scene()
    s.image([(EX, A)], [(EX, A, 0.9)])
    s.annotations[0]["iscrowd"] = 1
    m = per_image_map(s.gt, s.results)
    assert m["images"] == 0 and m["false_alarms_per_healthy_image"] == 1


def test_max_dets_keeps_the_highest_scores():
    s = Scene()
    s.image([(EX, A)], [(EX, FAR, 0.9), (EX, A, 0.8)])
    assert per_image_map(s.gt, s.results, (0.5,), max_dets=1)["mAP50"] == 0.0
    assert per_image_map(s.gt, s.results, (0.5,), max_dets=2)["mAP50"] == 50.0


def test_annotated_only_drops_the_other_lesion_type():
    s = Scene()
    s.image([(EX, A)], [(MA, FAR, 0.9), (EX, A, 0.8)])
    s.images[0]["annotated_category_ids"] = [EX]
    assert per_image_map(s.gt, s.results, (0.5,))["mAP50"] == 50.0
    assert per_image_map(s.gt, s.results, (0.5,), annotated_only=True)["mAP50"] == 100.0


# --- an independent re-implementation on random scenes ------------------------------------------


def reference_map(images, threshold):
    """Straight from the definition: Matterport's matching loop over GT sorted by IoU, and AP as
    (1 / G) * the sum over hits of the best precision at that rank or later."""
    aps, alarms, healthy = [], 0, 0
    for lesions, predictions in images:
        predictions = sorted(predictions, key=lambda p: -p[2])
        if not lesions:
            healthy += 1
            alarms += len(predictions)
            continue
        taken = [False] * len(lesions)
        hits = []
        for category, mask, _ in predictions:
            ious = [(mask & g).sum() / max((mask | g).sum(), 1) for _, g in lesions]
            hit = False
            for j in sorted(range(len(lesions)), key=lambda j: -ious[j]):
                if taken[j]:
                    continue
                if ious[j] < threshold:
                    break
                if lesions[j][0] == category:
                    taken[j] = hit = True
                    break
            hits.append(hit)
        precisions = [sum(hits[: k + 1]) / (k + 1) for k in range(len(hits))]
        ap = sum(max(precisions[k:]) for k in range(len(hits)) if hits[k]) / len(lesions)
        aps.append(ap)
    return (np.mean(aps) * 100 if aps else math.nan), (alarms / healthy if healthy else math.nan)


def random_mask(rng):
    h, w = rng.integers(2, 12, size=2)
    return box_mask(rng.integers(0, SHAPE[0] - h), rng.integers(0, SHAPE[1] - w), h, w)


def random_scene(rng):
    images = []
    for _ in range(rng.integers(1, 5)):
        lesions = [(int(rng.choice([MA, EX])), random_mask(rng))
                   for _ in range(rng.integers(0, 5))]
        predictions = []
        for category, mask in lesions:
            for _ in range(rng.integers(0, 3)):  # 0-2 predictions near each lesion
                shifted = np.roll(mask, tuple(rng.integers(-2, 3, size=2)), axis=(0, 1))
                other = int(rng.choice([MA, EX])) if rng.random() < 0.2 else category
                predictions.append((other, shifted, rng.random()))
        predictions += [(int(rng.choice([MA, EX])), random_mask(rng), rng.random())
                        for _ in range(rng.integers(0, 3))]
        images.append((lesions, predictions))
    return images


def test_equals_an_independent_implementation_on_50_random_scenes():
    rng = np.random.default_rng(13)
    for _ in range(50):
        images = random_scene(rng)
        s = Scene()
        for lesions, predictions in images:
            s.image(lesions, predictions)
        m = per_image_map(s.gt, s.results)
        for t in (0.35, 0.5, 0.75):
            expected, alarms = reference_map(images, t)
            got = m[f"mAP{round(t * 100)}"]
            assert (math.isnan(got) and math.isnan(expected)) or got == pytest.approx(expected)
            got = m["false_alarms_per_healthy_image"]
            assert (math.isnan(got) and math.isnan(alarms)) or got == pytest.approx(alarms)


# --- the evaluator and the tool ------------------------------------------------------------------


@pytest.fixture
def registered(tmp_path):
    s = hand_scene()
    json_file = tmp_path / "gt.json"
    json_file.write_text(json.dumps(s.gt))
    name = "test_per_image_map_protocol"
    records = [dict(image_id=i["id"], file_name=i["file_name"], height=i["height"],
                    width=i["width"]) for i in s.images]
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(
        json_file=str(json_file), thing_classes=[c["name"] for c in CATEGORIES],
        thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(CATEGORIES)},
    )
    yield name, s, json_file
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)


def instances_of(results, height, width, contiguous):
    instances = Instances((height, width))
    masks = np.stack([mask_util.decode(r["segmentation"]) for r in results]) if results else (
        np.zeros((0, height, width), np.uint8))
    instances.pred_masks = torch.from_numpy(masks.astype(bool))
    boxes = [mask_util.toBbox(r["segmentation"]) for r in results]
    instances.pred_boxes = Boxes(torch.tensor(
        [[x, y, x + w, y + h] for x, y, w, h in boxes], dtype=torch.float32).reshape(-1, 4))
    instances.scores = torch.tensor([r["score"] for r in results], dtype=torch.float32)
    instances.pred_classes = torch.tensor(
        [contiguous[r["category_id"]] for r in results], dtype=torch.int64)
    return instances


def test_evaluator_process_evaluate_equals_the_function(registered, tmp_path):
    name, s, _ = registered
    evaluator = PerImageMAPEvaluator(name, str(tmp_path / "eval"), distributed=False)
    evaluator.reset()
    contiguous = MetadataCatalog.get(name).thing_dataset_id_to_contiguous_id
    for record in DatasetCatalog.get(name):
        mine = [r for r in s.results if r["image_id"] == record["image_id"]]
        out = {"instances": instances_of(mine, record["height"], record["width"], contiguous)}
        evaluator.process([record], [out])
    got = evaluator.evaluate()["per_image_map"]
    expected = per_image_map(s.gt, s.results)
    for key, value in expected.items():  # scores went through float32: compare approximately
        assert got[key] == pytest.approx(value, nan_ok=True), key
    written = json.loads((tmp_path / "eval" / "per_image_map_metrics.json").read_text())
    assert written["per_image_map"]["mAP35"] == pytest.approx(got["mAP35"])


def test_evaluator_from_config(registered):
    from retina_d2.config import get_retina_cfg

    name, _, _ = registered
    cfg = get_retina_cfg()
    cfg.RETINA.EVAL.IOU_THRESHOLDS = [0.5]
    cfg.RETINA.EVAL.ANNOTATED_ONLY = True
    evaluator = PerImageMAPEvaluator(cfg, name)  # @configurable: built from the config
    assert evaluator._iou_thresholds == (0.5,) and evaluator._annotated_only
    assert PerImageMAPEvaluator(name, iou_thresholds=(0.35,))._iou_thresholds == (0.35,)


def load_evaluate_tool():
    from retina_d2.tools import evaluate

    return evaluate


def test_tools_evaluate_protocol_per_image_map(tmp_path, capsys):
    s = hand_scene()
    gt, dt, out = tmp_path / "gt.json", tmp_path / "dt.json", tmp_path / "metrics.json"
    gt.write_text(json.dumps(s.gt))
    dt.write_text(json.dumps(s.results))
    tool = load_evaluate_tool()
    code = tool.main(["--gt", str(gt), "--predictions", str(dt), "--protocol", "per_image_map",
                      "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "per_image_map" in printed and "hard exudate" in printed
    written = json.loads(out.read_text())
    expected = per_image_map(s.gt, s.results)
    for key, value in expected.items():
        assert written["per_image_map"][key] == pytest.approx(value), key
    assert "segm" in written  # the standard metrics are still there, beside the protocol


def test_tools_evaluate_protocol_refuses_box_only_results(tmp_path, capsys):
    s = hand_scene()
    boxes = [dict(image_id=r["image_id"], category_id=r["category_id"], score=r["score"],
                  bbox=[float(v) for v in mask_util.toBbox(r["segmentation"])])
             for r in s.results]
    gt, dt = tmp_path / "gt.json", tmp_path / "dt.json"
    gt.write_text(json.dumps(s.gt))
    dt.write_text(json.dumps(boxes))
    code = load_evaluate_tool().main(["--gt", str(gt), "--predictions", str(dt), "--protocol",
                                      "per_image_map"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and str(dt) in err and "per_image_map scores masks" in err
