"""``add_retina_config``: every config key retina_d2 adds to Detectron2's, with its default."""
from detectron2.config import CfgNode as CN

__all__ = ["ConfigError", "add_retina_config", "get_retina_cfg"]


class ConfigError(ValueError):
    """A config that cannot run: unknown key, unregistered dataset, class count mismatch."""


def add_retina_config(cfg):
    """Add retina_d2's keys to a Detectron2 config (in place). Call before ``merge_from_file``."""
    # Detectron2 0.6 has only SGD; the e-ophtha Mask R-CNN paper trains with Adam.
    cfg.SOLVER.OPTIMIZER = "SGD"  # "SGD" or "ADAM"

    # A ResNet whose widths are free (Detectron2's ResNet pins R-18/34 to 64 res2 channels): the
    # CPU configs need a slimmer trunk than any stock depth to train in minutes.
    cfg.MODEL.LESION_RESNET = CN()
    cfg.MODEL.LESION_RESNET.DEPTH = 18  # 18 or 34 (basic blocks)
    cfg.MODEL.LESION_RESNET.STEM_OUT_CHANNELS = 64
    cfg.MODEL.LESION_RESNET.RES2_OUT_CHANNELS = 64  # doubled at each later stage
    cfg.MODEL.LESION_RESNET.NORM = "GN"  # GN trains from scratch; frozen BN on random weights diverges
    cfg.MODEL.LESION_RESNET.OUT_FEATURES = ["res2", "res3", "res4", "res5"]

    cfg.RETINA = CN()
    # Preprocessing, applied to train and test images alike (retina_d2/data/preprocess.py).
    cfg.RETINA.PREPROCESS = CN()
    # Crop the black border to the field of view (FOV) and blank what lies outside the FOV circle.
    cfg.RETINA.PREPROCESS.FOV_CROP = True
    # Pixels darker than this (max over channels, 0-255) count as the black border.
    cfg.RETINA.PREPROCESS.FOV_THRESHOLD = 20
    # Graham normalisation: 4*img - 4*GaussianBlur(img, sigma) + 128, the e-ophtha paper's.
    cfg.RETINA.PREPROCESS.GRAHAM = False
    # sigma at a FOV 1024 px wide; scaled with the FOV's width so any resolution looks the same.
    cfg.RETINA.PREPROCESS.GRAHAM_SIGMA = 20.0
    # CLAHE on the L channel of Lab (the ResUNet report's preprocessing).
    cfg.RETINA.PREPROCESS.CLAHE = False
    cfg.RETINA.PREPROCESS.CLAHE_CLIP_LIMIT = 2.0
    cfg.RETINA.PREPROCESS.CLAHE_TILE_GRID = 8

    # Training augmentation; every geometric op is applied to masks identically.
    cfg.RETINA.AUG = CN()
    cfg.RETINA.AUG.HFLIP = True
    cfg.RETINA.AUG.VFLIP = True
    cfg.RETINA.AUG.ROT90 = True  # random multiple of 90 degrees
    cfg.RETINA.AUG.TRANSLATE = 0.1  # max shift, fraction of the image size (0 = off)
    cfg.RETINA.AUG.SCALE = (0.9, 1.1)  # random scale range ((1.0, 1.0) = off)
    cfg.RETINA.AUG.BRIGHTNESS = (0.8, 1.2)  # intensity ranges for colour jitter ((1, 1) = off)
    cfg.RETINA.AUG.CONTRAST = (0.8, 1.2)
    cfg.RETINA.AUG.SATURATION = (0.8, 1.2)

    # Evaluation (retina_d2/evaluation/instance_eval.py).
    cfg.RETINA.EVAL = CN()
    cfg.RETINA.EVAL.IOU_THRESHOLDS = [0.35, 0.5, 0.75]
    # COCOeval's default maxDets of 100 truncates images with hundreds of exudates; keep it equal
    # to MODEL.ROI_HEADS / TEST.DETECTIONS_PER_IMAGE.
    cfg.RETINA.EVAL.MAX_DETS = 256
    # e-ophtha protocol: keep only predictions of the lesion types an image is annotated for.
    cfg.RETINA.EVAL.ANNOTATED_ONLY = False
    # Overlays of the first N test images with predictions drawn, beside the metrics.
    cfg.RETINA.EVAL.NUM_OVERLAYS = 8
    # Keep the checkpoint that is best by this metric (empty: off).
    cfg.RETINA.EVAL.BEST_METRIC = "segm/AP50"


def get_retina_cfg():
    """Detectron2's default config with retina_d2's keys added."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_retina_config(cfg)
    return cfg
