"""Each paper config is its paper's recipe: the merged values of preprocessing, optimiser, LR
schedule, input size and augmentation equal the paper's numbers (the table below cites them;
papers/ in ../shared), and every paper config builds and runs one CPU training step, through its
own data pipeline, on a tiny generated dataset (pretrained weights left out: the tests of
tests/modeling/test_pretrained*.py load them)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import retina_d2.modeling  # noqa: F401  (registration)
from retina_d2.config import get_retina_cfg
from retina_d2.data.converters import (
    ConvertOptions,
    ddr,
    eophtha,
    idrid,
    retinal_lesions,
    synthetic,
)
from retina_d2.data.mapper import LesionDatasetMapper
from retina_d2.data.register import load_lesion_json
from retina_d2.engine import LesionTrainer
from retina_d2.engine.plateau import uses_plateau

pytestmark = pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
IMAGENET_MEAN = [123.675, 116.28, 103.53]  # 255 x (0.485, 0.456, 0.406)
IMAGENET_STD = [58.395, 57.12, 57.375]  # 255 x (0.229, 0.224, 0.225)

# config -> {key: the paper's value} (a comment says where each comes from).
PAPERS = {
    # papers/resunet-grading-localization-idrid.txt
    "resunet_idrid.yaml": {
        "MODEL.WEIGHTS": "",  # "initialized with Kaiming He initialization"
        "INPUT.MIN_SIZE_TRAIN": (256,), "INPUT.MAX_SIZE_TRAIN": 256,  # "256x256 pixels"
        "MODEL.PIXEL_MEAN": [0.0, 0.0, 0.0], "MODEL.PIXEL_STD": [255.0] * 3,  # "[0, 1] range"
        "RETINA.PREPROCESS.CLAHE": True, "RETINA.PREPROCESS.GRAHAM": False,
        "SOLVER.OPTIMIZER": "ADAM", "SOLVER.BASE_LR": 1e-3,  # "Adam ... 1x10^-3"
        "SOLVER.IMS_PER_BATCH": 4,  # "batch size of 4"
        "SOLVER.MAX_ITER": 50 * math.ceil(44 / 4),  # "50 epochs"; 54 - 10 validation images
        "SOLVER.STEPS": (), "SOLVER.WARMUP_ITERS": 0,  # a constant rate
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": 2.0,  # "gradient clipping (norm threshold 2.0)"
        "TEST.EVAL_PERIOD": math.ceil(44 / 4),  # "After each epoch, we evaluate"
        "RETINA.EVAL.BEST_METRIC": "argmax_dice/mDice",  # "saving checkpoints if ... Dice improves"
        "RETINA.EVAL.PROTOCOLS": ["argmax_dice"],  # argmax; Dice, IoU, pixel accuracy
        "augmentation": "none",  # listed only as future work
    },
    # papers/lesion-net-side-attention-retinal-lesions.txt, "Implementations"
    "lesionnet16s_retinal_lesions.yaml": {
        "MODEL.WEIGHTS": "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth",
        "INPUT.MIN_SIZE_TRAIN": (896,), "INPUT.MAX_SIZE_TRAIN": 896,  # "sized to 896 x 896"
        "SOLVER.OPTIMIZER": "SGD", "SOLVER.MOMENTUM": 0.95, "SOLVER.WEIGHT_DECAY": 1e-4,
        "SOLVER.BASE_LR": 1e-3,  # "The initial learning rate is 0.001"
        "SOLVER.STEPS": (), "SOLVER.WARMUP_ITERS": 0,
        "TEST.EVAL_PERIOD": 1000,  # "Validation occurs every 1K batches"
        "RETINA.PLATEAU.ENABLED": True, "RETINA.PLATEAU.PATIENCE": 4,  # "4 consecutive"
        "RETINA.PLATEAU.FACTOR": 0.1,  # "divided by 10"
        "RETINA.EARLY_STOP.PATIENCE": 10,  # "10 consecutive validations"
        "MODEL.LESION_SEG.LOSS_SWITCH_ITER": -1,  # dual loss "once the learning rate is reduced"
        "MODEL.LESION_NET.DICE": "squared_pooled",  # eq. 3 and 4
        "MODEL.LESION_NET.DUAL_DICE_LAMBDA": 0.8,  # "lambda ... 0.8"
        "RETINA.AUG.ROTATION": 180.0, "INPUT.CROP.ENABLED": True,  # "Random rotation, crop,
        "RETINA.AUG.HFLIP": True,  # flip and random changes in brightness, saturation and
        "RETINA.AUG.BRIGHTNESS": (0.8, 1.2), "RETINA.AUG.SATURATION": (0.8, 1.2),  # contrast"
        "RETINA.AUG.CONTRAST": (0.8, 1.2),
        "RETINA.PREPROCESS.GRAHAM": False, "RETINA.PREPROCESS.FOV_CROP": False,
    },
    # papers/cbam-deeplab-ddr.txt, "Data Preprocessing" and "Implementation Details"
    "cbam_deeplab_ddr.yaml": {
        "MODEL.WEIGHTS": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
        "INPUT.MIN_SIZE_TRAIN": (512,), "INPUT.MAX_SIZE_TRAIN": 512,  # "resized to 512x512"
        "MODEL.PIXEL_MEAN": IMAGENET_MEAN, "MODEL.PIXEL_STD": IMAGENET_STD,  # ImageNet stats
        "RETINA.PREPROCESS.GRAHAM": False, "RETINA.PREPROCESS.FOV_CROP": False,
        "SOLVER.OPTIMIZER": "ADAM", "SOLVER.BASE_LR": 1e-4,  # "learning rate of 1x10^-4"
        "SOLVER.IMS_PER_BATCH": 4,  # "a batch size of 4"
        "SOLVER.STEPS": (), "SOLVER.WARMUP_ITERS": 0,
        "RETINA.PLATEAU.ENABLED": True,  # "ReduceLROnPlateau"
        "TEST.EVAL_PERIOD": math.ceil(383 / 4),  # an epoch of DDR's 383 training images
        "RETINA.EARLY_STOP.PATIENCE": 15,  # "early stopping after 15 epochs"
        "RETINA.AUG.ALBUMENTATIONS": "cbam_deeplab_ddr",  # its list (test_albumentations_aug)
        "RETINA.AUG.HFLIP": False, "RETINA.AUG.ROT90": False,  # in the pipeline, with its p
        "MODEL.CBAM_DEEPLAB.ASPP_DILATIONS": [6, 12, 18],
    },
    # papers/red-seg-idrid.txt (garbled OCR; red_seg.py states the reading)
    "redseg_idrid.yaml": {
        "MODEL.WEIGHTS": "https://download.pytorch.org/models/vgg16-397923af.pth",  # ImageNet
        "MODEL.PIXEL_MEAN": IMAGENET_MEAN, "MODEL.PIXEL_STD": IMAGENET_STD,
        "RETINA.PREPROCESS.GRAHAM": False,
        "MODEL.RED_SEG.BRANCH_FEATURES": [["conv2", "conv3", "conv4"], ["conv3", "conv4", "conv5"]],
        "MODEL.RED_SEG.TOPK_BALANCE": "beta",  # beta = N- / (N+ + N-)
        "MODEL.RED_SEG.SIDE_SUPERVISION": True,  # Fig. 7's per-side supervision
        "MODEL.RED_SEG.TOPK_DECAY_STEPS": 4,  # k(r) = k0 (1 - floor(r / S) / M)
    },
    # papers/maskrcnn-small-lesions-eophtha.txt, sections 3.2 and 3.3
    "maskrcnn_eophtha.yaml": {
        "MODEL.WEIGHTS": "detectron2://COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x/"
                         "138205316/model_final_a3ec72.pkl",  # "ResNet101 ... COCO"
        "MODEL.RESNETS.DEPTH": 101,
        "RETINA.PREPROCESS.FOV_CROP": True,  # "crop the images", "morphed ... into circles"
        "RETINA.PREPROCESS.GRAHAM": True, "RETINA.PREPROCESS.GRAHAM_SIGMA": 20.0,  # 4, -4, 128
        "INPUT.MIN_SIZE_TRAIN": (1024,), "INPUT.MAX_SIZE_TRAIN": 1024,  # "1024x1024 pixels"
        "MODEL.ANCHOR_GENERATOR.SIZES": [[8], [16], [32], [64], [128]],  # "as small as 8"
        "MODEL.RPN.BATCH_SIZE_PER_IMAGE": 512, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 512,
        "TEST.DETECTIONS_PER_IMAGE": 256, "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.35,
        "SOLVER.OPTIMIZER": "ADAM", "SOLVER.BASE_LR": 1e-4,  # "0.0001"
        "SOLVER.GAMMA": 0.1,  # "0.00001, and 0.000001"
        # "65 epochs ... 25, 25, and 15": 155 images an epoch at 2 a batch
        "SOLVER.MAX_ITER": 65 * math.ceil(155 / 2),
        "SOLVER.STEPS": (25 * math.ceil(155 / 2), 50 * math.ceil(155 / 2)),
        "SOLVER.WARMUP_ITERS": 0,
        "DATALOADER.FILTER_EMPTY_ANNOTATIONS": True,  # "only ... the images with lesions"
        "RETINA.AUG.HFLIP": True, "RETINA.AUG.VFLIP": True, "RETINA.AUG.ROT90": True,
        "RETINA.AUG.BRIGHTNESS": (1.0, 1.0), "RETINA.AUG.CONTRAST": (1.0, 1.0),  # no colour
        "RETINA.EVAL.PROTOCOLS": ["per_image_map"],  # Matterport's per-image mAP
    },
}
GPU_PAPER_CONFIGS = sorted(PAPERS) + ["multitask_idrid.yaml", "multitask_retinal_lesions.yaml"]


def _merged(name):
    cfg = get_retina_cfg()
    cfg.merge_from_file(str(CONFIGS / name))
    return cfg


def _value(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _augmentation_off(cfg) -> bool:
    a = cfg.RETINA.AUG
    return (
        not (a.HFLIP or a.VFLIP or a.ROT90 or a.ROTATION or a.TRANSLATE or a.ALBUMENTATIONS)
        and all(
            tuple(a[k]) == (1.0, 1.0) for k in ("SCALE", "BRIGHTNESS", "CONTRAST", "SATURATION")
        )
        and not a.CROP_LESION_PROB and not cfg.INPUT.CROP.ENABLED
    )


@pytest.mark.parametrize("name", sorted(PAPERS))
def test_merged_config_is_the_papers_recipe(name):
    cfg = _merged(name)
    for key, paper in PAPERS[name].items():
        if key == "augmentation":
            assert _augmentation_off(cfg) == (paper == "none")
            continue
        value = _value(cfg, key)
        if isinstance(paper, float):
            assert value == pytest.approx(paper), key
        else:
            assert (list(value) if isinstance(value, tuple) else value) == (
                list(paper) if isinstance(paper, tuple) else paper
            ), key


@pytest.mark.parametrize("name", ["lesionnet16s_retinal_lesions.yaml", "cbam_deeplab_ddr.yaml"])
def test_plateau_configs_have_what_drives_the_plateau(name):
    cfg = _merged(name)
    assert uses_plateau(cfg) and cfg.TEST.EVAL_PERIOD > 0 and cfg.SOLVER.STEPS == ()


# ------------------------------------------------------------------- one CPU training step


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Two synthetic eyes with lesions, their records and lesion names."""
    out = tmp_path_factory.mktemp("recipes")
    synthetic.convert(None, out, ConvertOptions(progress=False), count=2, size=160)
    manifest = json.loads((out / "retina_d2.json").read_text())
    name = "test_paper_recipes_source"
    records = load_lesion_json(
        str(out / manifest["tasks"]["seg"]["train"]), str(out / manifest["image_root"]), name
    )
    classes = list(MetadataCatalog.get(name).thing_classes)
    MetadataCatalog.remove(name)
    return records, classes


def _as_dataset(records, source_classes, classes, name):
    """``records`` relabelled to ``classes`` (lesions the source lacks: not annotated), registered
    as ``name``."""
    mapped = []
    for record in records:
        record = json.loads(json.dumps(record))
        record["annotations"] = [
            dict(a, category_id=classes.index(source_classes[a["category_id"]]))
            for a in record["annotations"]
            if source_classes[a["category_id"]] in classes
        ]
        record["sem_seg_files"] = {
            k: v for k, v in record.get("sem_seg_files", {}).items() if k in classes
        }
        mapped.append(record)
    DatasetCatalog.register(name, lambda: mapped)
    MetadataCatalog.get(name).set(thing_classes=list(classes))
    return mapped


DATASET_CLASSES = {
    "idrid": list(idrid.CATEGORIES), "ddr": list(ddr.CATEGORIES),
    "eophtha": list(eophtha.CATEGORIES), "retinal_lesions": list(retinal_lesions.CATEGORIES),
}


@pytest.mark.parametrize("name", GPU_PAPER_CONFIGS)
def test_paper_config_builds_and_trains_one_cpu_step(name, generated, tmp_path):
    records, source_classes = generated
    cfg = _merged(name)
    dataset = next(d for d in DATASET_CLASSES if d in name)
    test_name = f"test_paper_recipes_{dataset}_{name}"
    mapped = _as_dataset(records, source_classes, DATASET_CLASSES[dataset], test_name)
    try:
        cfg.MODEL.DEVICE = "cpu"
        cfg.MODEL.WEIGHTS = ""  # pretrained loads are tests/modeling/test_pretrained*.py's
        cfg.MODEL.MULTITASK.LESION_WEIGHTS = cfg.MODEL.MULTITASK.TASK_BACKBONE_WEIGHTS = ""
        cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (test_name,), ()
        # The recipe's network and pipeline, on small images: one step on two CPU cores.
        cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (128,), 128
        cfg.SOLVER.IMS_PER_BATCH = 2
        cfg.OUTPUT_DIR = str(tmp_path)
        torch.manual_seed(0)
        np.random.seed(0)
        model = build_model(cfg)
        model.train()
        mapper = LesionDatasetMapper(cfg, is_train=True)
        batch = [mapper(record) for record in mapped]
        optimizer = LesionTrainer.build_optimizer(cfg, model)
        before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
        with EventStorage(0):
            losses = model(batch)
        total = sum(losses.values())
        assert torch.isfinite(total), losses
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        moved = [k for k, v in model.named_parameters() if k in before and not torch.equal(v, before[k])]
        assert moved, "the step changed no parameter"
    finally:
        DatasetCatalog.remove(test_name)
        MetadataCatalog.remove(test_name)
