"""Numbers pinned before the issue-14 redesign: the evaluators' results on a small hand-built
dataset and a seeded short CPU training of the two quick-schedule models.

The literals below were computed at commit 50d8da23630cfb3d88cd9135e2ed066acf8bc7f6, before the
issue-14 refactor (switches, lesion-branch contract, inference pipeline, schema module, config
families), from a worktree of that commit. The refactor is meant to change no behaviour: a
difference here means the evaluators score differently, or training builds, feeds or initialises
the model differently. Change a literal only for a change of behaviour that was intended, and say
so in the commit.

The evaluators' numbers are exact arithmetic on fixed inputs (compared at 1e-9); the training
losses are float32 CPU arithmetic, identical run to run on one machine (tests/engine/test_seed.py)
but free to differ in the last bits with another CPU or thread count, hence 1e-4 relative.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import HookBase
from detectron2.structures import Boxes, Instances
from PIL import Image

from retina_d2.config import get_retina_cfg
from retina_d2.engine import LesionTrainer
from retina_d2.evaluation import (
    LandmarkLocalizationEvaluator,
    LesionFROCEvaluator,
    LesionGradingEvaluator,
    LesionInstanceEvaluator,
    LesionSemanticEvaluator,
)
from retina_d2.evaluation.protocols import PROTOCOLS
from retina_d2.tools import train_net

REPO = Path(__file__).resolve().parents[1]

# --- a hand-built dataset: three 56 x 40 photographs, two lesion types ---------------------------

HEIGHT, WIDTH = 40, 56
DATASET = "pinned_regression_eval"
LESIONS = ["haemorrhage", "hard exudate"]
# Dataset category ids that are not 0-based, so the evaluators' id mapping is exercised.
DATASET_IDS = [3, 7]
# Per image: ground-truth rectangles (contiguous class, x0, y0, x1, y1; x1 / y1 exclusive), the
# lesion types annotated on it, grades and landmark centres (None: not in the record).
GROUND_TRUTH = [
    dict(lesions=[(0, 4, 4, 16, 14), (1, 30, 20, 36, 26), (1, 44, 6, 48, 10)], annotated=[0, 1],
         dr_grade=3, dme_grade=2, optic_disc=(40.0, 20.0), fovea=(20.0, 20.0)),
    dict(lesions=[(0, 10, 22, 24, 34), (1, 40, 28, 46, 34)], annotated=[0, 1],
         dr_grade=1, dme_grade=0, optic_disc=(10.0, 15.0), fovea=(30.0, 18.0)),
    # A healthy eye, graded for haemorrhages only: no exudate PNG, no fovea.
    dict(lesions=[], annotated=[0], dr_grade=0, dme_grade=0, optic_disc=(45.0, 25.0), fovea=None),
]
# Per image: detections (contiguous class, score, x0, y0, x1, y1) with box and mask the same
# rectangle; a hit, a shifted hit, a wrong class, false positives.
DETECTIONS = [
    [(0, 0.95, 5, 4, 16, 15), (1, 0.9, 30, 21, 36, 26), (1, 0.6, 20, 30, 26, 36),
     (0, 0.3, 44, 6, 48, 10)],
    [(0, 0.8, 12, 24, 22, 32), (1, 0.7, 40, 28, 46, 34), (1, 0.4, 2, 2, 6, 6)],
    [(1, 0.5, 20, 10, 24, 14)],
]
GRADE_PROBS = [
    dict(dr_grade=[0.1, 0.1, 0.2, 0.5, 0.1], dme_grade=[0.2, 0.5, 0.3]),
    dict(dr_grade=[0.1, 0.2, 0.4, 0.2, 0.1], dme_grade=[0.7, 0.2, 0.1]),
    dict(dr_grade=[0.6, 0.1, 0.1, 0.1, 0.1], dme_grade=[0.5, 0.3, 0.2]),
]
PRESENCE_PROBS = [[0.9, 0.8], [0.6, 0.3], [0.2, 0.7]]
LANDMARKS = [
    {"optic_disc": (43.0, 24.0), "fovea": (20.0, 26.0)},
    {"optic_disc": (10.0, 15.0), "fovea": (60.0, 58.0)},
    {"optic_disc": (5.0, 5.0), "fovea": (1.0, 1.0)},
]


def _rectangle(x0, y0, x1, y1) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _probability_maps(index: int) -> np.ndarray:
    """(2, H, W) lesion probabilities: a fixed low texture, each detection's score inside its
    rectangle."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    maps = np.stack([0.05 + 0.1 * ((x + 2 * y + 3 * c) % 7) / 7 for c in range(len(LESIONS))])
    for c, score, *box in DETECTIONS[index]:
        maps[c][_rectangle(*box)] = score
    return maps.astype(np.float32)


def _write_dataset(root: Path):
    """The COCO GT file, the lesion PNGs and the Detectron2 records."""
    images, annotations, records = [], [], []
    for index, truth in enumerate(GROUND_TRUTH):
        file_name = str(root / f"eye{index}.jpg")
        images.append({"id": index + 1, "file_name": f"eye{index}.jpg", "height": HEIGHT,
                       "width": WIDTH})
        png_files, record_annotations = {}, []
        for c in truth["annotated"]:
            label = np.zeros((HEIGHT, WIDTH), np.uint8)
            for lesion, *box in truth["lesions"]:
                if lesion == c:
                    label[_rectangle(*box)] = 1
            label[:, 0] = 255  # an ignored column, left out of the pixel metrics
            path = root / f"eye{index}_{c}.png"
            Image.fromarray(label).save(path)
            png_files[LESIONS[c]] = str(path)
        for lesion, x0, y0, x1, y1 in truth["lesions"]:
            annotations.append({
                "id": len(annotations) + 1, "image_id": index + 1,
                "category_id": DATASET_IDS[lesion], "iscrowd": 0,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
            })
            record_annotations.append({"category_id": lesion, "iscrowd": 0,
                                       "bbox": [x0, y0, x1, y1]})
        record = {
            "file_name": file_name, "image_id": index + 1, "height": HEIGHT, "width": WIDTH,
            "annotations": record_annotations, "sem_seg_files": png_files,
            "annotated_category_ids": [DATASET_IDS[c] for c in truth["annotated"]],
            "dr_grade": truth["dr_grade"], "dme_grade": truth["dme_grade"],
            "optic_disc_center": list(truth["optic_disc"]),
        }
        if truth["fovea"] is not None:
            record["fovea_center"] = list(truth["fovea"])
        records.append(record)
    gt = {"images": images, "annotations": annotations,
          "categories": [{"id": i, "name": n} for i, n in zip(DATASET_IDS, LESIONS)]}
    json_file = root / "gt.json"
    json_file.write_text(json.dumps(gt))
    return json_file, records


def _outputs(index: int) -> dict:
    detections = DETECTIONS[index]
    boxes = [box for _, _, *box in detections]
    instances = Instances((HEIGHT, WIDTH))
    instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    instances.scores = torch.tensor([score for _, score, *_ in detections])
    instances.pred_classes = torch.tensor([c for c, *_ in detections])
    instances.pred_masks = torch.from_numpy(np.stack([_rectangle(*box) for box in boxes]))
    return {
        "instances": instances,
        "sem_seg": torch.from_numpy(_probability_maps(index)),
        "dr_grade": torch.tensor(GRADE_PROBS[index]["dr_grade"]),
        "dme_grade": torch.tensor(GRADE_PROBS[index]["dme_grade"]),
        "lesion_presence": torch.tensor(PRESENCE_PROBS[index]),
        "landmarks": LANDMARKS[index],
    }


def _inputs(record: dict) -> dict:
    """What the test mapper keeps of a record: no annotations."""
    return {k: v for k, v in record.items() if k != "annotations"}


@pytest.fixture
def hand_built_dataset(tmp_path):
    json_file, records = _write_dataset(tmp_path)
    DatasetCatalog.register(DATASET, lambda: records)
    MetadataCatalog.get(DATASET).set(
        json_file=str(json_file), image_root=str(tmp_path), thing_classes=LESIONS,
        thing_dataset_id_to_contiguous_id={d: c for c, d in enumerate(DATASET_IDS)},
        evaluator_type="lesion",
    )
    try:
        yield records
    finally:
        DatasetCatalog.remove(DATASET)
        MetadataCatalog.remove(DATASET)


def _evaluator_cfg():
    cfg = get_retina_cfg()
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.GRADING.TASKS = ["dr_grade", "dme_grade"]
    cfg.MODEL.LOCALIZATION.LANDMARKS = ["optic_disc", "fovea"]
    return cfg


def _build(evaluator_class, cfg, dataset_name, output_dir):
    """Detectron2's construction from a config: ``Evaluator(cfg, dataset_name, output_dir)``
    (at the pinning commit, the five non-protocol evaluators were built by their
    ``from_config``, which returned an instance; the arguments are the same)."""
    return evaluator_class(cfg, dataset_name, output_dir)


EVALUATORS = [
    ("instance", LesionInstanceEvaluator),
    ("froc", LesionFROCEvaluator),
    ("semantic", LesionSemanticEvaluator),
    ("grading", LesionGradingEvaluator),
    ("localization", LandmarkLocalizationEvaluator),
] + sorted(PROTOCOLS.items())


def evaluator_numbers(records, output_root: Path) -> dict:
    """{evaluator: (its evaluate() result, the files it wrote)} on the hand-built dataset."""
    cfg = _evaluator_cfg()
    inputs = [_inputs(r) for r in records]
    outputs = [_outputs(i) for i in range(len(records))]
    numbers = {}
    for name, evaluator_class in EVALUATORS:
        output_dir = output_root / name
        evaluator = _build(evaluator_class, cfg, DATASET, str(output_dir))
        evaluator.reset()
        evaluator.process(inputs[:2], outputs[:2])  # two batches, as an inference loop feeds them
        evaluator.process(inputs[2:], outputs[2:])
        results = evaluator.evaluate()
        written = sorted(str(p.relative_to(output_dir)) for p in output_dir.rglob("*"))
        numbers[name] = (results, written)
    return numbers


# --- a seeded short training ---------------------------------------------------------------------

ITERATIONS = 6
SEED = 7
# Per config, what makes its iterations cheap enough for a unit test: the multi-task model's two
# backbones train on 128 px photographs instead of the quick schedule's 192 px.
CHEAPER = {
    "multitask_synthetic_instant_test": [
        "INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "128",
    ],
}


def _quick_schedule(name: str) -> str:
    """The quick-schedule config ``name``, wherever the config tree keeps it."""
    found = sorted((REPO / "configs").rglob(f"{name}.yaml"))
    assert len(found) == 1, f"expected one configs/**/{name}.yaml, found {found}"
    return str(found[0])


class _LossCurves(HookBase):
    """Every loss of every iteration, as the trainer's EventStorage recorded them."""

    def __init__(self, curves: dict):
        self._curves = curves

    def after_train(self):
        for key, history in self.trainer.storage.histories().items():
            if "loss" in key:
                self._curves[key] = [v for v, _ in sorted(history.values(), key=lambda v: v[1])]


def training_numbers(config_name: str, datasets_root, output_dir, monkeypatch) -> tuple:
    """(loss curves, final evaluation) of ITERATIONS seeded CPU iterations of ``config_name``."""
    curves = {}
    build_hooks = LesionTrainer.build_hooks
    monkeypatch.setattr(
        LesionTrainer, "build_hooks", lambda self: build_hooks(self) + [_LossCurves(curves)]
    )
    monkeypatch.setenv("RETINA_D2_DATASETS", str(datasets_root))
    results = train_net.cli([
        "--config-file", _quick_schedule(config_name), "--seed", str(SEED),
        "OUTPUT_DIR", str(output_dir), "SOLVER.MAX_ITER", str(ITERATIONS),
        "DATALOADER.NUM_WORKERS", "0", "RETINA.EVAL.NUM_OVERLAYS", "0",
        "RETINA.EVAL.REPORT", "False", *CHEAPER.get(config_name, []),
    ])
    return dict(sorted(curves.items())), results


# --- the pinned numbers --------------------------------------------------------------------------

NAN = math.nan
# Per evaluator: evaluate()'s result on the hand-built dataset (keys in order) and the files it
# wrote into its output folder.
PINNED_EVALUATORS = {
    "instance": {
        "results": {
            "bbox": {
                "AP35": 83.16831683168317,
                "AP50": 58.415841584158414,
                "AP75": 58.415841584158414,
                "AP": 43.415841584158414,
                "APs": 43.415841584158414,
                "APm": NAN,
                "APl": NAN,
                "AP35s": 83.16831683168317,
                "AP50s": 58.415841584158414,
                "AP75s": 58.415841584158414,
                "AP35m": NAN,
                "AP50m": NAN,
                "AP75m": NAN,
                "AP35l": NAN,
                "AP50l": NAN,
                "AP75l": NAN,
                "AR35": 83.33333333333333,
                "AR50": 58.33333333333333,
                "AR75": 58.33333333333333,
                "AR": 45.833333333333336,
                "AP35-haemorrhage": 100.0,
                "AP50-haemorrhage": 50.49504950495049,
                "AP75-haemorrhage": 50.49504950495049,
                "AP-haemorrhage": 35.34653465346533,
                "AP35-hard exudate": 66.33663366336634,
                "AP50-hard exudate": 66.33663366336634,
                "AP75-hard exudate": 66.33663366336634,
                "AP-hard exudate": 51.48514851485149,
            },
            "segm": {
                "AP35": 83.16831683168317,
                "AP50": 58.415841584158414,
                "AP75": 58.415841584158414,
                "AP": 43.415841584158414,
                "APs": 43.415841584158414,
                "APm": NAN,
                "APl": NAN,
                "AP35s": 83.16831683168317,
                "AP50s": 58.415841584158414,
                "AP75s": 58.415841584158414,
                "AP35m": NAN,
                "AP50m": NAN,
                "AP75m": NAN,
                "AP35l": NAN,
                "AP50l": NAN,
                "AP75l": NAN,
                "AR35": 83.33333333333333,
                "AR50": 58.33333333333333,
                "AR75": 58.33333333333333,
                "AR": 45.833333333333336,
                "AP35-haemorrhage": 100.0,
                "AP50-haemorrhage": 50.49504950495049,
                "AP75-haemorrhage": 50.49504950495049,
                "AP-haemorrhage": 35.34653465346533,
                "AP35-hard exudate": 66.33663366336634,
                "AP50-hard exudate": 66.33663366336634,
                "AP75-hard exudate": 66.33663366336634,
                "AP-hard exudate": 51.48514851485149,
            },
        },
        "files": ["coco_instances_results.json", "eval_info.json", "instance_metrics.json"],
    },
    "froc": {
        "results": {
            "froc": {
                "FROC": 83.33333333333333,
                "sens@1/8": 83.33333333333333,
                "sens@1/4": 83.33333333333333,
                "sens@1/2": 83.33333333333333,
                "sens@1": 83.33333333333333,
                "sens@2": 83.33333333333333,
                "sens@4": 83.33333333333333,
                "sens@8": 83.33333333333333,
                "P": 70.0,
                "R": 83.33333333333333,
                "F1": 75.0,
                "FROC-haemorrhage": 100.0,
                "sens@1/8-haemorrhage": 100.0,
                "sens@1/4-haemorrhage": 100.0,
                "sens@1/2-haemorrhage": 100.0,
                "sens@1-haemorrhage": 100.0,
                "sens@2-haemorrhage": 100.0,
                "sens@4-haemorrhage": 100.0,
                "sens@8-haemorrhage": 100.0,
                "P-haemorrhage": 100.0,
                "R-haemorrhage": 100.0,
                "F1-haemorrhage": 100.0,
                "FROC-hard exudate": 66.66666666666666,
                "sens@1/8-hard exudate": 66.66666666666666,
                "sens@1/4-hard exudate": 66.66666666666666,
                "sens@1/2-hard exudate": 66.66666666666666,
                "sens@1-hard exudate": 66.66666666666666,
                "sens@2-hard exudate": 66.66666666666666,
                "sens@4-hard exudate": 66.66666666666666,
                "sens@8-hard exudate": 66.66666666666666,
                "P-hard exudate": 40.0,
                "R-hard exudate": 66.66666666666666,
                "F1-hard exudate": 50.0,
            },
        },
        # Changed on purpose (issue 14 item 4): the evaluators write numbers only and the report
        # draws the pictures, so froc_<lesion>.png moved to the report (drawn from froc.json).
        "files": ["eval_info.json", "froc.json"],
    },
    "semantic": {
        "results": {
            "sem_seg": {
                "AUCPR-haemorrhage": 63.71100910724902,
                "AP-haemorrhage": 63.71100910724902,
                "F1-haemorrhage": 77.70961145194273,
                "Dice-haemorrhage": 77.70961145194273,
                "IoU-haemorrhage": 63.54515050167224,
                "imageF1-haemorrhage": 100.0,
                "AUCPR-hard exudate": 76.04614118981272,
                "AP-hard exudate": 76.04614118981272,
                "F1-hard exudate": 69.47368421052632,
                "Dice-hard exudate": 69.47368421052632,
                "IoU-hard exudate": 53.2258064516129,
                "imageF1-hard exudate": 100.0,
                "mAUCPR": 69.87857514853087,
                "mAP": 69.87857514853087,
                "mF1": 73.59164783123452,
                "mDice": 73.59164783123452,
                "mIoU": 58.385478476642575,
                "mImageF1": 100.0,
            },
        },
        # Changed on purpose (issue 14 item 4): pr_curves/pr_<lesion>.png moved to the report,
        # which draws them from semantic_pr_curves.json (the curves at 101 recall levels).
        "files": ["semantic_metrics.json", "semantic_pr_curves.json"],
    },
    "grading": {
        "results": {
            "dr_grade": {
                "kappa": 0.896551724137931,
                "accuracy": 66.66666666666666,
                "images": 3.0,
            },
            "dme_grade": {
                "kappa": 0.7272727272727273,
                "accuracy": 66.66666666666666,
                "images": 3.0,
            },
            "lesion_presence": {
                "F1-haemorrhage": 100.0,
                "precision-haemorrhage": 100.0,
                "recall-haemorrhage": 100.0,
                "F1-hard exudate": 66.66666666666666,
                "precision-hard exudate": 100.0,
                "recall-hard exudate": 50.0,
                "mF1": 83.33333333333333,
            },
        },
        # Changed on purpose (issue 14 item 4): confusion_<task>.png moved to the report, which
        # draws them from grading_confusion.json (the matrices' counts).
        "files": ["grading_confusion.json", "grading_metrics.json"],
    },
    "localization": {
        "results": {
            "optic_disc": {
                "distance": 16.573786516665265,
                "median_distance": 5.0,
                "within50px": 100.0,
                "within100px": 100.0,
                "images": 3.0,
            },
            "fovea": {
                "distance": 28.0,
                "median_distance": 28.0,
                "within50px": 100.0,
                "within100px": 100.0,
                "images": 2.0,
            },
        },
        "files": ["landmark_predictions.json", "localization_metrics.json"],
    },
    "argmax_dice": {
        "results": {
            "argmax_dice": {
                "Dice-haemorrhage": 77.53628220262482,
                "IoU-haemorrhage": 63.31367657065095,
                "Dice-hard exudate": 69.43774355167935,
                "IoU-hard exudate": 53.18362706083002,
                "mDice": 73.48701287715208,
                "mIoU": 58.24865181574048,
                "pixel_accuracy": 96.2011329681275,
            },
        },
        "files": ["argmax_dice_metrics.json"],
    },
    "component_ap": {
        "results": {
            "component_ap": {
                "AP-haemorrhage": 35.34653465346533,
                "AP-hard exudate": 43.16831683168317,
                "mAP": 39.257425742574256,
                "IoU-haemorrhage": 62.53740275284261,
                "IoU-hard exudate": 52.009026059106134,
                "mIoU": 57.27321440597437,
                "AUCPR-haemorrhage": 72.66102680575732,
                "AUCPR-hard exudate": 74.13608732225912,
                "mAUCPR": 73.39855706400822,
            },
        },
        "files": ["component_ap_metrics.json"],
    },
    "per_image_map": {
        "results": {
            "per_image_map": {
                "mAP35": 83.33333333333333,
                "mAP50": 45.83333333333333,
                "mAP75": 45.83333333333333,
                "mAP35-haemorrhage": 100.0,
                "mAP50-haemorrhage": 50.0,
                "mAP75-haemorrhage": 50.0,
                "mAP35-hard exudate": 75.0,
                "mAP50-hard exudate": 75.0,
                "mAP75-hard exudate": 75.0,
                "images": 2,
                "healthy_images": 1,
                "false_alarms_per_healthy_image": 1.0,
            },
        },
        "files": ["per_image_map_metrics.json"],
    },
    "pr_operating_point": {
        "results": {
            "pr_operating_point": {
                "AUCPR-haemorrhage": 63.71100910724902,
                "precision-haemorrhage": 87.55760368663594,
                "recall-haemorrhage": 65.97222222222221,
                "threshold-haemorrhage": 0.3,
                "AUCPR-hard exudate": 76.04614118981272,
                "precision-hard exudate": 64.70588235294117,
                "recall-hard exudate": 75.0,
                "threshold-hard exudate": 0.6,
                "mAUCPR": 69.87857514853087,
                "mPrecision": 76.13174301978856,
                "mRecall": 70.48611111111111,
            },
        },
        "files": ["pr_operating_point_metrics.json"],
    },
}

# Per quick-schedule config: every loss of the ITERATIONS seeded iterations, and the final
# evaluation's results (the headline numbers; bbox / segm / froc without the per-lesion ones).
PINNED_TRAINING = {
    "multitask_synthetic_instant_test": {
        "losses": {
            "loss_box_reg": [
                0.039874061942100525, 0.043275151401758194, 0.08068255335092545,
                0.06141098588705063, 0.053561124950647354, 0.10024869441986084
            ],
            "loss_cls": [
                1.7896140813827515, 1.5996708869934082, 1.3869779109954834,
                1.1151005029678345, 0.9829692840576172, 0.9267784953117371
            ],
            "loss_dme_grade": [
                1.140138864517212, 0.5300595760345459, 0.3063133955001831,
                0.19581806659698486, 0.12875241041183472, 0.0913582593202591
            ],
            "loss_dr_grade": [
                1.6481382846832275, 1.296111822128296, 1.0908703804016113, 0.9607139825820923,
                0.8793327212333679, 0.9851764440536499
            ],
            "loss_landmarks": [
                2.7196505069732666, 2.686798095703125, 2.631772041320801, 2.6023969650268555,
                2.5545737743377686, 2.52482271194458
            ],
            "loss_mask": [
                0.6933397054672241, 0.6902428269386292, 0.6867825388908386,
                0.6838251948356628, 0.6780900955200195, 0.6728245615959167
            ],
            "loss_rpn_cls": [
                0.6931690573692322, 0.6930649280548096, 0.6926669478416443,
                0.6925212740898132, 0.6922855377197266, 0.6897966265678406
            ],
            "loss_rpn_loc": [
                1.5204825401306152, 1.5434154272079468, 1.5677027702331543, 1.712972640991211,
                1.590225100517273, 1.5537995100021362
            ],
            "loss_sem_seg_bce": [
                1.235784649848938, 1.1404931545257568, 0.922045886516571, 0.8522102236747742,
                0.7277272343635559, 0.630750298500061
            ],
            "loss_sem_seg_dice": [
                0.9902825951576233, 0.9921934604644775, 0.9705752730369568,
                0.9727198481559753, 0.9653833508491516, 0.9573088884353638
            ],
            "total_loss": [
                12.47047434747219, 11.215325329452753, 10.336389698088169, 9.849689684808254,
                9.252900633960962, 9.132864490151405
            ],
        },
        "results": {
            "bbox": {
                "AP35": 0.0,
                "AP50": 0.0,
                "AP75": 0.0,
                "AP": 0.0,
                "APs": 0.0,
                "APm": NAN,
                "APl": NAN,
                "AP35s": 0.0,
                "AP50s": 0.0,
                "AP75s": 0.0,
                "AP35m": NAN,
                "AP50m": NAN,
                "AP75m": NAN,
                "AP35l": NAN,
                "AP50l": NAN,
                "AP75l": NAN,
                "AR35": 0.0,
                "AR50": 0.0,
                "AR75": 0.0,
                "AR": 0.0,
            },
            "segm": {
                "AP35": 0.0,
                "AP50": 0.0,
                "AP75": 0.0,
                "AP": 0.0,
                "APs": 0.0,
                "APm": NAN,
                "APl": NAN,
                "AP35s": 0.0,
                "AP50s": 0.0,
                "AP75s": 0.0,
                "AP35m": NAN,
                "AP50m": NAN,
                "AP75m": NAN,
                "AP35l": NAN,
                "AP50l": NAN,
                "AP75l": NAN,
                "AR35": 0.0,
                "AR50": 0.0,
                "AR75": 0.0,
                "AR": 0.0,
            },
            "froc": {
                "FROC": 0.0,
                "sens@1/8": 0.0,
                "sens@1/4": 0.0,
                "sens@1/2": 0.0,
                "sens@1": 0.0,
                "sens@2": 0.0,
                "sens@4": 0.0,
                "sens@8": 0.0,
                "P": NAN,
                "R": 0.0,
                "F1": 0.0,
            },
            "sem_seg": {
                "AUCPR-microaneurysm": 0.11162931928311477,
                "AP-microaneurysm": 0.11162931928311477,
                "F1-microaneurysm": 0.22818026240730174,
                "Dice-microaneurysm": 0.22818026240730174,
                "IoU-microaneurysm": 0.1142204454597373,
                "imageF1-microaneurysm": 66.66666666666666,
                "AUCPR-haemorrhage": 0.17181094376454342,
                "AP-haemorrhage": 0.17181094376454342,
                "F1-haemorrhage": 0.0,
                "Dice-haemorrhage": 0.0,
                "IoU-haemorrhage": 0.0,
                "imageF1-haemorrhage": 0.0,
                "AUCPR-hard exudate": 0.11688212026064902,
                "AP-hard exudate": 0.11688212026064902,
                "F1-hard exudate": 0.1293451899757478,
                "Dice-hard exudate": 0.1293451899757478,
                "IoU-hard exudate": 0.06471444750040446,
                "imageF1-hard exudate": 66.66666666666666,
                "AUCPR-soft exudate": 0.049755910991051325,
                "AP-soft exudate": 0.049755910991051325,
                "F1-soft exudate": 0.04814057046576002,
                "Dice-soft exudate": 0.04814057046576002,
                "IoU-soft exudate": 0.024076080414108584,
                "imageF1-soft exudate": 66.66666666666666,
                "AUCPR-optic disc": 62.98392771682227,
                "AP-optic disc": 62.98392771682227,
                "F1-optic disc": 18.14572822760731,
                "Dice-optic disc": 18.14572822760731,
                "IoU-optic disc": 9.97816991086047,
                "imageF1-optic disc": 100.0,
                "mAUCPR": 12.686801202224327,
                "mAP": 12.686801202224327,
                "mF1": 3.710278850091224,
                "mDice": 3.710278850091224,
                "mIoU": 2.036236176846944,
                "mImageF1": 60.0,
            },
            "dr_grade": {
                "kappa": 0.0,
                "accuracy": 0.0,
                "images": 2.0,
            },
            "dme_grade": {
                "kappa": 0.0,
                "accuracy": 50.0,
                "images": 2.0,
            },
            "lesion_presence": {
                "F1-microaneurysm": 66.66666666666666,
                "precision-microaneurysm": 50.0,
                "recall-microaneurysm": 100.0,
                "F1-haemorrhage": 0.0,
                "precision-haemorrhage": NAN,
                "recall-haemorrhage": 0.0,
                "F1-hard exudate": 66.66666666666666,
                "precision-hard exudate": 50.0,
                "recall-hard exudate": 100.0,
                "F1-soft exudate": 66.66666666666666,
                "precision-soft exudate": 50.0,
                "recall-soft exudate": 100.0,
                "F1-optic disc": 100.0,
                "precision-optic disc": 100.0,
                "recall-optic disc": 100.0,
                "mF1": 60.0,
            },
            "optic_disc": {
                "distance": 3.971076380212252,
                "median_distance": 3.971076380212252,
                "within9px": 100.0,
                "within18px": 100.0,
                "within37px": 100.0,
                "images": 2.0,
            },
            "fovea": {
                "distance": 81.24361486996781,
                "median_distance": 81.24361486996781,
                "within9px": 0.0,
                "within18px": 0.0,
                "within37px": 0.0,
                "images": 2.0,
            },
        },
    },
    "semantic_synthetic_instant_test": {
        "losses": {
            "loss_sem_seg_bce": [
                1.6645376682281494, 1.6987918615341187, 1.582520842552185, 1.4292947053909302,
                1.3120120763778687, 1.182965636253357
            ],
            "loss_sem_seg_dice": [
                0.9868865013122559, 0.9707375764846802, 0.9785103797912598,
                0.9664559960365295, 0.9567720293998718, 0.9479593634605408
            ],
            "total_loss": [
                2.6514241695404053, 2.669529438018799, 2.561031222343445, 2.3957507014274597,
                2.2687841057777405, 2.1309249997138977
            ],
        },
        "results": {
            "sem_seg": {
                "AUCPR-microaneurysm": 0.10368337065925431,
                "AP-microaneurysm": 0.10368337065925431,
                "F1-microaneurysm": 0.24293956878226544,
                "Dice-microaneurysm": 0.24293956878226544,
                "IoU-microaneurysm": 0.12161751292186075,
                "imageF1-microaneurysm": 66.66666666666666,
                "AUCPR-haemorrhage": 0.039277204060647726,
                "AP-haemorrhage": 0.039277204060647726,
                "F1-haemorrhage": 0.12066556585799569,
                "Dice-haemorrhage": 0.12066556585799569,
                "IoU-haemorrhage": 0.060369205350617995,
                "imageF1-haemorrhage": 66.66666666666666,
                "AUCPR-hard exudate": 0.0629869124705718,
                "AP-hard exudate": 0.0629869124705718,
                "F1-hard exudate": 0.0,
                "Dice-hard exudate": 0.0,
                "IoU-hard exudate": 0.0,
                "imageF1-hard exudate": 66.66666666666666,
                "AUCPR-soft exudate": 0.021468666888873653,
                "AP-soft exudate": 0.021468666888873653,
                "F1-soft exudate": 0.0,
                "Dice-soft exudate": 0.0,
                "IoU-soft exudate": 0.0,
                "imageF1-soft exudate": 66.66666666666666,
                "AUCPR-optic disc": 74.37749104395007,
                "AP-optic disc": 74.37749104395007,
                "F1-optic disc": 49.47495961227787,
                "Dice-optic disc": 49.47495961227787,
                "IoU-optic disc": 32.868258653072175,
                "imageF1-optic disc": 100.0,
                "mAUCPR": 14.920981439605885,
                "mAP": 14.920981439605885,
                "mF1": 9.967712949383625,
                "mDice": 9.967712949383625,
                "mIoU": 6.610049074268931,
                "mImageF1": 73.33333333333333,
            },
        },
    },
}


def _assert_close(actual, pinned, where: str, rel: float, abs_: float, all_keys: bool = True):
    """``actual`` equals ``pinned`` number by number (NaN where NaN was pinned); with all_keys the
    dicts have the pinned keys in the pinned order, else at least the pinned keys."""
    if isinstance(pinned, dict):
        assert isinstance(actual, dict), f"{where}: {actual!r} is not a dict"
        if all_keys:
            assert list(actual) == list(pinned), f"{where}: keys {list(actual)} != {list(pinned)}"
        for key, value in pinned.items():
            assert key in actual, f"{where}: {key!r} missing"
            _assert_close(actual[key], value, f"{where}/{key}", rel, abs_, all_keys)
    elif isinstance(pinned, list):
        assert len(actual) == len(pinned), f"{where}: {len(actual)} values, pinned {len(pinned)}"
        for i, (a, p) in enumerate(zip(actual, pinned)):
            _assert_close(a, p, f"{where}[{i}]", rel, abs_, all_keys)
    elif math.isnan(pinned):
        assert math.isnan(actual), f"{where}: {actual!r}, pinned NaN"
    else:
        assert actual == pytest.approx(pinned, rel=rel, abs=abs_), (
            f"{where}: {actual!r}, pinned {pinned!r}"
        )


def test_evaluators_give_the_pinned_numbers(hand_built_dataset, tmp_path):
    numbers = evaluator_numbers(hand_built_dataset, tmp_path / "inference")
    assert list(numbers) == list(PINNED_EVALUATORS)
    for name, (results, written) in numbers.items():
        _assert_close(results, PINNED_EVALUATORS[name]["results"], name, rel=1e-9, abs_=1e-12)
        assert written == PINNED_EVALUATORS[name]["files"], name


@pytest.mark.parametrize("config_name", sorted(PINNED_TRAINING))
def test_seeded_training_gives_the_pinned_losses_and_results(
    config_name, synthetic_datasets, tmp_path, monkeypatch
):
    curves, results = training_numbers(config_name, synthetic_datasets, tmp_path, monkeypatch)
    pinned = PINNED_TRAINING[config_name]
    _assert_close(curves, pinned["losses"], "losses", rel=1e-4, abs_=1e-6)
    _assert_close(results, pinned["results"], "results", rel=1e-4, abs_=1e-6, all_keys=False)
