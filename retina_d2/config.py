"""``add_retina_config``: every config key retina_d2 adds to Detectron2's, with its default,
composed of one ``add_*_config`` per component (backbone, head, meta-architecture, data,
inference or evaluation step), each of which can also be applied alone;
``read_config_yaml`` / ``merge_config``: config files read with YAML's safe loader only."""
import os
import re

import yaml
from detectron2.config import CfgNode as CN

from .schema import FROC_IOU, FROC_MATCH, FROC_SCORE_THRESHOLD, IOU_THRESHOLDS

__all__ = [
    "ConfigError",
    "add_augmentation_config",
    "add_bright_candidates_config",
    "add_cbam_deeplab_config",
    "add_checkpoint_config",
    "add_components_config",
    "add_evaluation_config",
    "add_grading_config",
    "add_inception_config",
    "add_inference_config",
    "add_lesion_net_config",
    "add_lesion_rcnn_config",
    "add_lesion_resnet_config",
    "add_localization_config",
    "add_multitask_config",
    "add_plateau_config",
    "add_preprocess_config",
    "add_protocol_config",
    "add_red_seg_config",
    "add_reproducibility_config",
    "add_resunet_config",
    "add_retina_config",
    "add_semantic_config",
    "add_solver_config",
    "add_tiling_config",
    "add_tta_config",
    "add_unet_encoder_config",
    "add_vgg_config",
    "get_retina_cfg",
    "merge_config",
    "read_config_yaml",
]


class ConfigError(ValueError):
    """A config that cannot run: unknown key, unregistered dataset, class count mismatch."""


def add_retina_config(cfg):
    """Add retina_d2's keys to a Detectron2 config (in place). Call before ``merge_from_file``.

    One ``add_*_config`` per component, each usable alone on Detectron2's ``get_cfg()``."""
    for add_component_config in RETINA_CONFIG_COMPONENTS:
        add_component_config(cfg)


def add_checkpoint_config(cfg):
    """How weights files are read and how much of the model they must set."""
    # Weights files (MODEL.WEIGHTS, MODEL.MULTITASK.LESION_WEIGHTS, --resume's last checkpoint)
    # are read as tensors, NumPy arrays and containers only (retina_d2/safe_load.py): unpickling
    # in full runs whatever code the file carries. True reads an old full pickle anyway, with a
    # warning naming it; only for files you made or trust (tools: --trust-checkpoint).
    cfg.MODEL.TRUST_CHECKPOINT = False
    # Evaluation and prediction refuse a checkpoint that sets fewer than all of the model's
    # parameters (another class count, another model): the rest would predict from random
    # initial values. True accepts it (training from a pretrained start always does, warning).
    cfg.MODEL.ALLOW_PARTIAL_WEIGHTS = False


def add_solver_config(cfg):
    """The optimiser Detectron2 0.6 lacks (``SOLVER.OPTIMIZER``)."""
    # Detectron2 0.6 has only SGD; the e-ophtha Mask R-CNN paper trains with Adam.
    cfg.SOLVER.OPTIMIZER = "SGD"  # "SGD" or "ADAM"


def add_lesion_resnet_config(cfg):
    """``MODEL.LESION_RESNET``: the free-width ResNet of the CPU configs."""
    # A ResNet whose widths are free (Detectron2's ResNet pins R-18/34 to 64 res2 channels): the
    # CPU configs need a slimmer trunk than any stock depth to train in minutes.
    cfg.MODEL.LESION_RESNET = CN()
    cfg.MODEL.LESION_RESNET.DEPTH = 18  # 18 or 34 (basic blocks)
    cfg.MODEL.LESION_RESNET.STEM_OUT_CHANNELS = 64
    cfg.MODEL.LESION_RESNET.RES2_OUT_CHANNELS = 64  # doubled at each later stage
    cfg.MODEL.LESION_RESNET.NORM = "GN"  # GN trains from scratch; frozen BN on random weights diverges
    cfg.MODEL.LESION_RESNET.OUT_FEATURES = ["res2", "res3", "res4", "res5"]


def add_unet_encoder_config(cfg):
    """``MODEL.UNET_ENCODER``: ResUNet's encoder backbone."""
    # ResUNet's encoder (retina_d2/modeling/encoders.py, build_unet_encoder_backbone): residual
    # double-conv stages "enc1".."encN" at strides 1, 2, 4, ..., no normalisation, Kaiming init.
    cfg.MODEL.UNET_ENCODER = CN()
    cfg.MODEL.UNET_ENCODER.WIDTHS = [64, 128, 256, 512, 1024]  # channels per stage (U-Net's)
    cfg.MODEL.UNET_ENCODER.DROPOUT = 0.3  # between the two convs of every block
    cfg.MODEL.UNET_ENCODER.OUT_FEATURES = ["enc1", "enc2", "enc3", "enc4", "enc5"]


def add_vgg_config(cfg):
    """``MODEL.VGG``: Red-Seg's VGG16 trunk."""
    # Red-Seg's trunk (build_vgg16_backbone): VGG16 conv1_1..conv5_3, outputs "conv1".."conv5"
    # at strides 1..16; torchvision's published vgg16 weights load into it (MODEL.WEIGHTS).
    cfg.MODEL.VGG = CN()
    cfg.MODEL.VGG.WIDTH_MULT = 1.0  # multiplies VGG16's 64..512 channels (CPU configs: < 1)
    cfg.MODEL.VGG.NORM = ""  # "" (VGG16 as published) or "GN" (trains from scratch far better)
    cfg.MODEL.VGG.OUT_FEATURES = ["conv1", "conv2", "conv3", "conv4", "conv5"]


def add_inception_config(cfg):
    """``MODEL.INCEPTION``: Lesion-Net's Inception-v3 encoder."""
    # Lesion-Net's Inception-v3 encoder (retina_d2/modeling/inception.py,
    # build_inception_v3_backbone): torchvision's layers and names, padded so that strides are
    # exact; torchvision's published inception_v3 ImageNet weights load into it (MODEL.WEIGHTS).
    cfg.MODEL.INCEPTION = CN()
    # "FrozenBN": BN fixed at the loaded weights' statistics (fine-tuning at a few images per
    # batch); "BN": trained with batch statistics.
    cfg.MODEL.INCEPTION.NORM = "FrozenBN"
    # Among Conv2d_2b_3x3 (stride 2), Conv2d_4a_3x3 (4), Mixed_5d (8), Mixed_6e (16), Mixed_7c (32).
    cfg.MODEL.INCEPTION.OUT_FEATURES = [
        "Conv2d_2b_3x3", "Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e", "Mixed_7c"
    ]


def add_lesion_rcnn_config(cfg):
    """``MODEL.LESION_MERGE``: merging of touching predicted lesions."""
    # The inference pipeline's last step, once, for a model that predicts instances
    # (retina_d2/modeling/inference.py): predictions of a class whose masks touch become one
    # lesion, as the converters make one ground-truth lesion of each connected component.
    cfg.MODEL.LESION_MERGE = CN()
    cfg.MODEL.LESION_MERGE.ENABLED = False
    cfg.MODEL.LESION_MERGE.SCORE_THRESH = 0.35  # only confident predictions merge
    cfg.MODEL.LESION_MERGE.CONNECTIVITY = 8


def add_semantic_config(cfg):
    """``MODEL.LESION_SEG``: what every semantic lesion head shares."""
    # Semantic lesion heads (retina_d2/modeling/semantic, chosen by MODEL.SEM_SEG_HEAD.NAME with
    # NUM_CLASSES = lesion channels, background not counted, and IGNORE_VALUE 255).
    cfg.MODEL.LESION_SEG = CN()
    # A semantic head beside Mask R-CNN in LesionRCNN, on its FPN features. SemanticLesionNet
    # needs no switch: it is nothing but a semantic head.
    cfg.MODEL.LESION_SEG.ENABLED = False
    # "sigmoid": one independent map per lesion (C outputs); "softmax": C + 1 outputs, background
    # first (ResUNet), of which the background is dropped at inference.
    cfg.MODEL.LESION_SEG.ACTIVATION = "sigmoid"
    # Iteration from which two-stage heads train with their stage-2 loss (Red-Seg: top-k
    # balanced BCE -> FN+FP; Lesion-Net: pixel Dice -> dual Dice); -1 = at the first LR drop
    # (SOLVER.STEPS[0]), 0 = never.
    cfg.MODEL.LESION_SEG.LOSS_SWITCH_ITER = -1
    # Weight of the semantic losses in LesionRCNN's total (SemanticLesionNet's are its only ones).
    cfg.MODEL.LESION_SEG.LOSS_WEIGHT = 1.0


def add_resunet_config(cfg):
    """``MODEL.RESUNET``: the ResUNet head."""
    # ResUNet head (ResUNetHead): U-Net decoder over the encoder's features, softmax over
    # background + NUM_CLASSES lesions (MODEL.LESION_SEG.ACTIVATION must be "softmax").
    cfg.MODEL.RESUNET = CN()
    # Encoder features the decoder merges, any order (sorted by stride; the coarsest starts it).
    cfg.MODEL.RESUNET.IN_FEATURES = ["enc1", "enc2", "enc3", "enc4", "enc5"]
    cfg.MODEL.RESUNET.DROPOUT = 0.3  # of the decoder's residual blocks
    # Focal alpha of the background class and of every lesion class (the report's 0.25 / 0.75).
    cfg.MODEL.RESUNET.FOCAL_ALPHA = [0.25, 0.75]
    cfg.MODEL.RESUNET.FOCAL_GAMMA = 2.0
    cfg.MODEL.RESUNET.FOCAL_WEIGHT = 1.0  # weight of the focal term in the loss
    cfg.MODEL.RESUNET.DICE_WEIGHT = 1.0  # weight of the soft Dice term (background excluded)


def add_red_seg_config(cfg):
    """``MODEL.RED_SEG``: the Red-Seg head."""
    # Red-Seg head (RedSegHead): one branch per lesion, each fusing 1x1-conv side outputs of
    # its trunk features; stage 1 top-k balanced BCE, stage 2 FN+FP (LESION_SEG.LOSS_SWITCH_ITER).
    cfg.MODEL.RED_SEG = CN()
    # The lesions with a branch, by name; the head finds their channels in the training dataset's
    # thing_classes and fills every other channel with RED_SEG.ABSENT_LOGIT (not trained).
    cfg.MODEL.RED_SEG.LESIONS = ["microaneurysm", "haemorrhage"]
    # Trunk features each branch fuses, one list per lesion (the paper: conv2-4 for
    # microaneurysms, conv3-5 for haemorrhages).
    cfg.MODEL.RED_SEG.BRANCH_FEATURES = [["conv2", "conv3", "conv4"], ["conv3", "conv4", "conv5"]]
    cfg.MODEL.RED_SEG.SIDE_CHANNELS = 1  # channels of each 1x1-conv side output (HED's 1)
    # Logit of the channels no branch predicts: sigmoid(-20) ~ 2e-9, so they score ~0.
    cfg.MODEL.RED_SEG.ABSENT_LOGIT = -20.0
    cfg.MODEL.RED_SEG.TOPK_NEGATIVE_RATIO = 1.0  # stage 1: hard negatives per positive pixel
    cfg.MODEL.RED_SEG.TOPK_MIN_NEGATIVES = 256  # stage 1: fewest hard negatives per image
    # Stage 1's weighting: "none" (every selected pixel alike) or "beta" (the paper's balancing
    # weight beta = k / (positives + k) on positives, 1 - beta on the k hard negatives).
    cfg.MODEL.RED_SEG.TOPK_BALANCE = "none"
    # The k schedule: the ratio falls by TOPK_NEGATIVE_RATIO / TOPK_DECAY_STEPS every
    # TOPK_DECAY_PERIOD iterations, k(r) = k0 (1 - floor(r / period) / steps), down to k0 / steps.
    # 0 = constant k.
    cfg.MODEL.RED_SEG.TOPK_DECAY_PERIOD = 0
    cfg.MODEL.RED_SEG.TOPK_DECAY_STEPS = 1
    # Supervise every side output with the stage's loss too, beside the fused map (HED's deep
    # supervision, the paper's per-side "supervision loss").
    cfg.MODEL.RED_SEG.SIDE_SUPERVISION = False


def add_lesion_net_config(cfg):
    """``MODEL.LESION_NET``: the Lesion-Net head."""
    # Lesion-Net head (LesionNetHead): a copy-and-merge expansive path over the encoder, one
    # sigmoid map per lesion; pixel Dice, then dual Dice from LESION_SEG.LOSS_SWITCH_ITER.
    cfg.MODEL.LESION_NET = CN()
    # Encoder features the path may merge, one per stride (those finer than OUTPUT_STRIDE unused).
    cfg.MODEL.LESION_NET.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    # K of Lesion-Net-Ks: the stride of the prediction (2, 4, 8, 16 or 32; the paper's best is 8).
    cfg.MODEL.LESION_NET.OUTPUT_STRIDE = 8
    cfg.MODEL.LESION_NET.CONVS_DIM = 256  # channels of the expansive path's convs
    cfg.MODEL.LESION_NET.NUM_CONVS = 2  # 3x3 conv-norm-ReLU layers closing every stage (U-Net's 2)
    cfg.MODEL.LESION_NET.DUAL_DICE_LAMBDA = 0.8  # pixel term's weight in the stage-2 dual Dice
    # The Dice of both terms: "per_lesion" (mean over lesions of sum(2py) / sum(p + y)) or
    # "squared_pooled" (the paper's: one fraction pooled over pixels and lesions, squared
    # denominators sum(p^2) + sum(y^2)).
    cfg.MODEL.LESION_NET.DICE = "per_lesion"


def add_cbam_deeplab_config(cfg):
    """``MODEL.CBAM_DEEPLAB``: the CBAM-DeepLab head."""
    # CBAM-DeepLab head (CBAMDeepLabHead): DeepLabV3+ with CBAM after ASPP and after the
    # low-level reduction, one sigmoid map per lesion.
    cfg.MODEL.CBAM_DEEPLAB = CN()
    cfg.MODEL.CBAM_DEEPLAB.IN_FEATURE = "res5"  # ASPP's input, at stride 16 (RES5_DILATION 2)
    cfg.MODEL.CBAM_DEEPLAB.LOW_LEVEL_FEATURE = "res2"  # the decoder's stride-4 skip
    cfg.MODEL.CBAM_DEEPLAB.ASPP_CHANNELS = 256  # width of each ASPP branch and its projection
    cfg.MODEL.CBAM_DEEPLAB.ASPP_DILATIONS = [6, 12, 18]  # atrous rates, DeepLab's for stride 16
    cfg.MODEL.CBAM_DEEPLAB.ASPP_DROPOUT = 0.1  # on the ASPP output while training
    cfg.MODEL.CBAM_DEEPLAB.LOW_LEVEL_CHANNELS = 48  # width of the low-level 1x1 reduction
    cfg.MODEL.CBAM_DEEPLAB.DECODER_CHANNELS = 256  # width of the two 3x3 decoder convs
    cfg.MODEL.CBAM_DEEPLAB.CBAM_REDUCTION = 16  # r of the CBAM channel MLPs (C -> C / r -> C)
    cfg.MODEL.CBAM_DEEPLAB.DICE_WEIGHT = 1.0  # weight of the soft Dice term
    cfg.MODEL.CBAM_DEEPLAB.BCE_WEIGHT = 0.5  # weight of the BCE term
    cfg.MODEL.CBAM_DEEPLAB.FOCAL_WEIGHT = 1.0  # weight of the focal term
    cfg.MODEL.CBAM_DEEPLAB.BOUNDARY_WEIGHT = 0.5  # weight of the boundary-weighted BCE term
    cfg.MODEL.CBAM_DEEPLAB.FOCAL_ALPHA = 0.25  # focal weight of positives
    cfg.MODEL.CBAM_DEEPLAB.FOCAL_GAMMA = 2.0  # focal exponent
    cfg.MODEL.CBAM_DEEPLAB.BOUNDARY_BETA = 1.5  # boundary weights exp(-beta * |Sobel(target)|)


def add_multitask_config(cfg):
    """``MODEL.MULTITASK``: MultiTaskLesionNet's lesion branch and task backbone."""
    # MultiTaskLesionNet (retina_d2/modeling/meta_arch/multitask.py): lesions, DR / DME grading
    # and optic disc / fovea localization in one forward pass.
    cfg.MODEL.MULTITASK = CN()
    # The lesion branch: "LesionRCNN" (instances; lesion maps too with MODEL.LESION_SEG.ENABLED),
    # "SemanticLesionNet" (lesion maps) or "" (none: grading / localization on a plain backbone).
    cfg.MODEL.MULTITASK.LESION_ARCHITECTURE = "LesionRCNN"
    # Keep the lesion branch fixed (the Lesion-Net paper trains segmentation first, then grading
    # on its maps): it takes no lesion targets then, so a grading-only dataset can train.
    cfg.MODEL.MULTITASK.LESION_FROZEN = False
    # A lesion-only checkpoint (LesionRCNN / SemanticLesionNet .pth) loaded into the lesion branch
    # when the model is built, unless MODEL.WEIGHTS is set ("" = none).
    cfg.MODEL.MULTITASK.LESION_WEIGHTS = ""
    # A BACKBONE_REGISTRY name: grading and localization read a second backbone of their own,
    # built from this same config (the paper's separate grading CNN; trained even when the lesion
    # branch is frozen). "" = they share the lesion branch's backbone.
    cfg.MODEL.MULTITASK.TASK_BACKBONE = ""
    # Weights the TASK_BACKBONE starts from when training starts (not on --resume), read before
    # MODEL.WEIGHTS (which wins where both set a tensor): a published torchvision file (local
    # path or URL, as MODEL.WEIGHTS) or the backbone's own state dict. "" = its initialisation.
    cfg.MODEL.MULTITASK.TASK_BACKBONE_WEIGHTS = ""


def add_grading_config(cfg):
    """``MODEL.GRADING``: DR / DME grading heads."""
    # Grading heads (retina_d2/modeling/grading.py, GRADING_HEAD_REGISTRY): one per graded task.
    cfg.MODEL.GRADING = CN()
    # Record fields graded: "dr_grade" (0-4), "dme_grade" (0-2); [] = no grading.
    cfg.MODEL.GRADING.TASKS = []
    # "SideAttentionGradingHead" (Lesion-Net's), "LesionConcatGradingHead" or "PlainGradingHead".
    cfg.MODEL.GRADING.NAME = "SideAttentionGradingHead"
    cfg.MODEL.GRADING.IN_FEATURE = "res5"  # the backbone feature graded
    # Side attention's weight maps: "conv" (two 3x3 convs on the lesion maps, the paper's) or
    # "cw_max" (the lesion maps' channel-wise max, one parameter-free map for every channel).
    cfg.MODEL.GRADING.ATTENTION = "conv"
    cfg.MODEL.GRADING.ATTENTION_CHANNELS = 0  # k: the last k feature channels weighted; 0 = all
    cfg.MODEL.GRADING.ATTENTION_HIDDEN = 64  # channels between the two 3x3 convs
    # Lesion maps -> the feature's size: "max" (a 3-px microaneurysm survives) or "avg".
    cfg.MODEL.GRADING.LESION_POOL = "max"
    cfg.MODEL.GRADING.DROPOUT = 0.0  # before the FC layer
    cfg.MODEL.GRADING.LOSS_WEIGHT = 1.0  # of each grading task's cross-entropy


def add_localization_config(cfg):
    """``MODEL.LOCALIZATION``: optic disc / fovea heatmaps."""
    # Landmark localization (retina_d2/modeling/localization.py): one heatmap per landmark.
    cfg.MODEL.LOCALIZATION = CN()
    cfg.MODEL.LOCALIZATION.LANDMARKS = []  # "optic_disc", "fovea"; [] = no localization
    # Backbone features summed (1x1 projections, upsampled to the finest): its stride is the
    # heatmap's. Deep features give the fovea, a dark spot, the context that finds it.
    cfg.MODEL.LOCALIZATION.IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.LOCALIZATION.CONVS_DIM = 64
    cfg.MODEL.LOCALIZATION.NUM_CONVS = 2
    cfg.MODEL.LOCALIZATION.NORM = "GN"
    cfg.MODEL.LOCALIZATION.SIGMA = 12.0  # of the Gaussian target, in network-input pixels
    # Cells around the heatmap's peak whose probability-weighted mean gives the position.
    cfg.MODEL.LOCALIZATION.REFINE_RADIUS = 2
    cfg.MODEL.LOCALIZATION.LOSS_WEIGHT = 1.0


def add_preprocess_config(cfg):
    """``RETINA.PREPROCESS``: field of view, scale and contrast, train and test alike."""
    _add_section(cfg, "RETINA")
    # Preprocessing, applied to train and test images alike (retina_d2/data/preprocess.py).
    cfg.RETINA.PREPROCESS = CN()
    # Crop the black border to the field of view (FOV) and blank what lies outside the FOV circle.
    cfg.RETINA.PREPROCESS.FOV_CROP = True
    # Pixels darker than this (max over channels, 0-255) count as the black border.
    cfg.RETINA.PREPROCESS.FOV_THRESHOLD = 20
    # Camera-independent scale: resize every image (train, test, predict) so that its FOV is this
    # many pixels across, measured on the FOV found by FOV_THRESHOLD; outputs are mapped back to
    # the photograph's pixels. It takes the place of INPUT.MIN_SIZE_* (ignored when > 0). 0 = off.
    cfg.RETINA.PREPROCESS.FOV_DIAMETER = 0
    # Graham normalisation: 4*img - 4*GaussianBlur(img, sigma) + 128, the e-ophtha paper's.
    cfg.RETINA.PREPROCESS.GRAHAM = False
    # sigma at a FOV 1024 px wide; scaled with the FOV's width so any resolution looks the same.
    cfg.RETINA.PREPROCESS.GRAHAM_SIGMA = 20.0
    # CLAHE on the L channel of Lab (the ResUNet report's preprocessing).
    cfg.RETINA.PREPROCESS.CLAHE = False
    cfg.RETINA.PREPROCESS.CLAHE_CLIP_LIMIT = 2.0
    cfg.RETINA.PREPROCESS.CLAHE_TILE_GRID = 8
    # A band this wide (fraction of the image width, after the FOV crop and resize) along the
    # frame's edges is set to the neutral grey that Graham normalisation gives flat retina (128;
    # 0 without Graham). Some cameras write bright or dark lines into the last rows (HEI-MED),
    # which Graham's 4x contrast turns into a row of false lesions. 0 = off.
    cfg.RETINA.PREPROCESS.FRAME_MARGIN = 0.0


def add_augmentation_config(cfg):
    """``RETINA.AUG``: training augmentation."""
    _add_section(cfg, "RETINA")
    # Training augmentation; every geometric op is applied to masks identically.
    cfg.RETINA.AUG = CN()
    cfg.RETINA.AUG.HFLIP = True
    cfg.RETINA.AUG.VFLIP = True
    # With INPUT.CROP: the share of crops centred on a random lesion (0 = Detectron2's uniform
    # RandomCrop). Native-resolution crops are mostly healthy retina otherwise.
    cfg.RETINA.AUG.CROP_LESION_PROB = 0.0
    # With INPUT.CROP: a lesion the crop cuts is kept only if at least this fraction of its area
    # (in the frame just before the crop) lies inside the crop; 0 keeps any visible part, as
    # Detectron2 does. A sliver of a lesion looks like nothing the model should call a lesion.
    cfg.RETINA.AUG.CROP_MIN_VISIBLE = 0.0
    cfg.RETINA.AUG.ROT90 = True  # random multiple of 90 degrees
    cfg.RETINA.AUG.TRANSLATE = 0.1  # max shift, fraction of the image size (0 = off)
    cfg.RETINA.AUG.SCALE = (0.9, 1.1)  # random scale range ((1.0, 1.0) = off)
    cfg.RETINA.AUG.BRIGHTNESS = (0.8, 1.2)  # intensity ranges for colour jitter ((1, 1) = off)
    cfg.RETINA.AUG.CONTRAST = (0.8, 1.2)
    cfg.RETINA.AUG.SATURATION = (0.8, 1.2)
    # Rotation by an angle drawn uniformly from [-ROTATION, ROTATION] degrees (Detectron2's
    # RandomRotation, same image size; masks nearest-neighbour), Lesion-Net's "random rotation".
    # 0 = off.
    cfg.RETINA.AUG.ROTATION = 0.0
    # A named albumentations pipeline (retina_d2/data/albumentations_aug.py, e.g.
    # "cbam_deeplab_ddr": the CBAM-DeepLab paper's list), applied last; masks and instances move
    # with the image. "" = none.
    cfg.RETINA.AUG.ALBUMENTATIONS = ""


def add_plateau_config(cfg):
    """``RETINA.PLATEAU`` / ``RETINA.EARLY_STOP``: LR on a plateau, early stopping."""
    _add_section(cfg, "RETINA")
    # Learning rate reduced on a plateau of the periodic validation metric
    # (retina_d2/engine/plateau.py, PyTorch's ReduceLROnPlateau driven by TEST.EVAL_PERIOD's
    # evaluations): after PATIENCE evaluations without improvement the LR is multiplied by
    # FACTOR, never below MIN_LR. Use a schedule without steps (SOLVER.STEPS ()), whose
    # warmup-then-constant multiplier the reduction scales. With MODEL.LESION_SEG.LOSS_SWITCH_ITER
    # -1, two-stage heads switch their loss at the first reduction (Lesion-Net's rule).
    cfg.RETINA.PLATEAU = CN()
    cfg.RETINA.PLATEAU.ENABLED = False
    cfg.RETINA.PLATEAU.METRIC = ""  # a key of the evaluation results; "" = RETINA.EVAL.BEST_METRIC
    cfg.RETINA.PLATEAU.MODE = "max"  # "max": higher is better; "min": lower is better
    cfg.RETINA.PLATEAU.FACTOR = 0.1
    cfg.RETINA.PLATEAU.PATIENCE = 10  # evaluations without improvement before a reduction
    cfg.RETINA.PLATEAU.MIN_LR = 0.0  # floor of SOLVER.BASE_LR's reduced value
    # Training ends after this many evaluations without improvement of RETINA.PLATEAU.METRIC
    # (model_final.pth is written and evaluated as at the last iteration). 0 = never.
    cfg.RETINA.EARLY_STOP = CN()
    cfg.RETINA.EARLY_STOP.PATIENCE = 0


def add_tiling_config(cfg):
    """``RETINA.TILE``: tiled inference over whole images."""
    _add_section(cfg, "RETINA")
    # Tiled (sliding-window) inference over whole images (retina_d2/modeling/tiling.py): the
    # model sees overlapping tiles at the network input's resolution (after INPUT.MIN_SIZE_TEST;
    # with 0 the photograph's own pixels), so 1-5 px lesions are never shrunk and the network's
    # memory (the GPU's) follows the tile, not the image. Host memory does not: the returned
    # masks are full-frame (N x H x W), as the untiled model's, and on the CPU they set the peak
    # (benchmarks/results/tiling.json). Instances split by a seam are merged; semantic maps are
    # blended.
    cfg.RETINA.TILE = CN()
    cfg.RETINA.TILE.ENABLED = False
    cfg.RETINA.TILE.SIZE = 512  # tile side in network-input pixels
    # Pixels neighbouring tiles share (>= 1): seams are matched there, and a lesion no larger
    # than this always lies whole in some tile.
    cfg.RETINA.TILE.OVERLAP = 64
    # Two instances of one lesion type from overlapping tiles are one lesion when their masks
    # (boxes, without masks) have at least this IoU within the area both tiles saw.
    cfg.RETINA.TILE.MERGE_IOU = 0.5
    cfg.RETINA.TILE.BATCH_SIZE = 1  # tiles per forward pass
    # Per-tile budget of a detector, 0 = the model's own settings. MODEL.RPN.POST_NMS_TOPK_TEST
    # and TEST.DETECTIONS_PER_IMAGE are sized for a whole image; every tile keeping as many
    # gives the RoI heads (tiles)x the boxes. PROPOSALS_PER_TILE replaces POST_NMS_TOPK_TEST and
    # DETECTIONS_PER_TILE replaces TEST.DETECTIONS_PER_IMAGE while the model runs on tiles
    # (speed and recall measured in benchmarks/results/tiling.json).
    cfg.RETINA.TILE.PROPOSALS_PER_TILE = 0
    cfg.RETINA.TILE.DETECTIONS_PER_TILE = 0
    # The merged instances are capped at TEST.DETECTIONS_PER_IMAGE, as the untiled model's are.


def add_tta_config(cfg):
    """``TEST.AUG`` (Detectron2's switch) and ``RETINA.TTA``: test-time augmentation."""
    _add_section(cfg, "RETINA")
    # Test-time augmentation (retina_d2/modeling/tta.py; LesionTrainer.build_inference_model puts
    # it around the tiled model): the model also runs on mirrored / quarter-turned views of each
    # image, detections are merged across views by mask and semantic maps averaged, in the
    # photograph's frame; MODEL.LESION_MERGE then runs once. LesionRCNN and SemanticLesionNet
    # (MultiTaskLesionNet is refused). Detectron2's own keys switch it: TEST.AUG.ENABLED, and
    # TEST.AUG.FLIP adds the horizontal mirror of every view. TEST.AUG.MIN_SIZES / MAX_SIZE
    # (multi-scale) are not read: the field-of-view resize fixes the lesions' scale.
    cfg.TEST.AUG.ENABLED = False
    cfg.TEST.AUG.FLIP = True
    cfg.RETINA.TTA = CN()
    # Quarter turns added as views, each of 1, 2, 3 (90, 180, 270 degrees counter-clockwise);
    # [1, 2, 3] with TEST.AUG.FLIP: all 8 symmetries of the square. [] = mirror only.
    cfg.RETINA.TTA.ROTATIONS = []
    # Detections of one lesion type from two views are one lesion when their masks (boxes, for a
    # model without masks) have at least this IoU.
    cfg.RETINA.TTA.MERGE_IOU = 0.5
    # A merged lesion's score: "mean" over all views, 0 for a view that missed it (agreement
    # between views ranks a lesion up), or "max" (the best view's, as Detectron2's NMS keeps).
    cfg.RETINA.TTA.SCORE = "mean"


def add_components_config(cfg):
    """``RETINA.COMPONENTS``: lesions as connected components of a semantic map."""
    _add_section(cfg, "RETINA")
    # Lesions of a semantic model's probability maps (retina_d2/modeling/components.py): one
    # lesion per connected component, scored by its peak probability (used by
    # tools/benchmark.py heimed-exudate-cv).
    cfg.RETINA.COMPONENTS = CN()
    # Average the maps over the image and its horizontal mirror (flip test-time augmentation, the
    # same code as TEST.AUG's; this switch is the components path's, semantic_probabilities).
    cfg.RETINA.COMPONENTS.FLIP_TTA = False
    # Pixels at or above this probability form the lesions' masks.
    cfg.RETINA.COMPONENTS.MASK_THRESHOLD = 0.3
    # Components of fewer pixels (in the photograph's pixels) are dropped as noise.
    cfg.RETINA.COMPONENTS.MIN_AREA = 4
    # The operating point: lesions scoring at least this are reported as found (lesion F1, false
    # alarms per healthy eye); lower-scoring ones still rank in AP and FROC.
    cfg.RETINA.COMPONENTS.SCORE_THRESHOLD = 0.5
    # An eye's score per lesion type (screening, image AUC, image_predictions.json): the mean of
    # its k best lesion scores, missing ones counting 0 (retina_d2/evaluation/image_scores.py);
    # 1 = the best lesion's score.
    cfg.RETINA.COMPONENTS.IMAGE_SCORE_TOP_K = 1


def add_bright_candidates_config(cfg):
    """``MODEL.BRIGHT_CANDIDATES``: BrightCandidateNet, a classifier of training-free bright
    candidates (retina_d2/modeling/meta_arch/candidate_net.py)."""
    cfg.MODEL.BRIGHT_CANDIDATES = CN()
    # The candidates (retina_d2/modeling/bright_lesions.py; fractions of the FOV's diameter):
    # green contrast over the local background from which a pixel is a candidate,
    cfg.MODEL.BRIGHT_CANDIDATES.MIN_CONTRAST = 0.12
    # the background Gaussian's sigma, the blanked optic disc's radius, the rim band left out,
    cfg.MODEL.BRIGHT_CANDIDATES.BACKGROUND_SIGMA = 0.02
    cfg.MODEL.BRIGHT_CANDIDATES.DISC_RADIUS = 0.1
    cfg.MODEL.BRIGHT_CANDIDATES.RIM = 0.03
    # fewest pixels of a candidate at a 2000 px FOV, and the surround compared with it.
    cfg.MODEL.BRIGHT_CANDIDATES.MIN_AREA = 6.0
    cfg.MODEL.BRIGHT_CANDIDATES.RING = 0.004
    # The most contrasted candidates kept per image (the rest score 0): bounds the work on an
    # eye covered in reflections.
    cfg.MODEL.BRIGHT_CANDIDATES.MAX_CANDIDATES = 3000
    # The classifier: one hidden layer of this width, dropout before the output.
    cfg.MODEL.BRIGHT_CANDIDATES.HIDDEN_DIM = 32
    cfg.MODEL.BRIGHT_CANDIDATES.DROPOUT = 0.1
    # A candidate is a lesion when its IoU with a ground-truth lesion (a connected component of
    # the semantic target) reaches this; one mostly in an ignore region trains nothing.
    cfg.MODEL.BRIGHT_CANDIDATES.POSITIVE_IOU = 0.2
    # The semantic channel (lesion type) the candidates are scored for; the others stay 0.
    cfg.MODEL.BRIGHT_CANDIDATES.LESION_CHANNEL = 0


def add_evaluation_config(cfg):
    """``RETINA.EVAL``: the evaluators' settings, the overlays and the report."""
    _add_section(cfg, "RETINA")
    _add_section(cfg.RETINA, "EVAL")
    # Evaluation (retina_d2/evaluation/instance_eval.py).
    cfg.RETINA.EVAL.IOU_THRESHOLDS = list(IOU_THRESHOLDS)
    # COCOeval's default maxDets of 100 truncates images with hundreds of exudates; keep it equal
    # to MODEL.ROI_HEADS / TEST.DETECTIONS_PER_IMAGE.
    cfg.RETINA.EVAL.MAX_DETS = 256
    # e-ophtha protocol: keep only predictions of the lesion types an image is annotated for.
    cfg.RETINA.EVAL.ANNOTATED_ONLY = False
    # Overlays of the first N test images with predictions drawn, beside the metrics.
    cfg.RETINA.EVAL.NUM_OVERLAYS = 8
    # Write each predicted lesion's score beside it in those overlays (off: outlines and a
    # legend only; a score per lesion covers its neighbours at fundus scale).
    cfg.RETINA.EVAL.OVERLAY_SCORES = False
    # Keep the checkpoint that is best by this metric (empty: off).
    cfg.RETINA.EVAL.BEST_METRIC = "segm/AP50"
    # Lesion-level FROC (retina_d2/evaluation/froc.py): sensitivity at 1/8..8 false positives per
    # image, the microaneurysm literature's measure (ROC challenge, e-ophtha), and lesion F1.
    # Add LesionFROCEvaluator beside the instance evaluator.
    cfg.RETINA.EVAL.FROC_ENABLED = False
    # A hit: "iou" (mask IoU >= FROC_IOU; boxes without MODEL.MASK_ON) or "center" (the
    # prediction's centroid inside the lesion, the ROC challenge's rule).
    cfg.RETINA.EVAL.FROC_MATCH = FROC_MATCH
    # Lenient on purpose: a one-pixel shift of a 3-pixel microaneurysm already halves its IoU.
    cfg.RETINA.EVAL.FROC_IOU = FROC_IOU
    # Predictions scoring >= this give the lesion-level precision / recall / F1.
    cfg.RETINA.EVAL.FROC_SCORE_THRESHOLD = FROC_SCORE_THRESHOLD
    # Grading and localization (retina_d2/evaluation/grading_eval.py, localization_eval.py):
    # an image-level lesion probability >= this predicts the lesion present (lesion F1).
    cfg.RETINA.EVAL.PRESENCE_THRESHOLD = 0.5
    # Radii (pixels of the original image) within which a landmark counts as found.
    cfg.RETINA.EVAL.LANDMARK_RADII = [50.0, 100.0]
    # After --eval-only and after training, an HTML report of each test set's evaluation folder
    # (retina_d2/report): every metric table, PR / FROC curves, and this many worst and best
    # images with hits, misses and false alarms outlined (0: no gallery).
    cfg.RETINA.EVAL.REPORT = True
    cfg.RETINA.EVAL.REPORT_GALLERY = 4
    # A system of retina_d2/evaluation/published_figures.yaml (e.g. "eophtha-maskrcnn"): the
    # report then shows its paper's figures beside ours. "" = none.
    cfg.RETINA.EVAL.PUBLISHED_SYSTEM = ""


def add_protocol_config(cfg):
    """``RETINA.EVAL.PROTOCOLS`` and their settings: each paper's own evaluation."""
    _add_section(cfg, "RETINA")
    _add_section(cfg.RETINA, "EVAL")
    # Each paper's own evaluation protocol, added beside add_evaluation_config's evaluators
    # (retina_d2/evaluation/protocols): "per_image_map" (e-ophtha Mask R-CNN: Matterport's
    # per-image mask AP at IOU_THRESHOLDS; a detector's), "argmax_dice" (ResUNet: argmax Dice /
    # IoU / pixel accuracy), "pr_operating_point" (Red-Seg: pixel precision / recall beside
    # AUC-PR), "component_ap" (CBAM-DeepLab: AP@[.50:.95] of connected components, pixel AUC-PR
    # and IoU); the last three a semantic head's. Each writes <protocol>_metrics.json.
    cfg.RETINA.EVAL.PROTOCOLS = []
    # argmax_dice: the side (px) both maps are resized to (the ResUNet report's 256; 0 = native),
    # and "pooled" (over the split's pixels) or "per_batch" (the report's: per batch of
    # ARGMAX_BATCH_SIZE images, then averaged).
    cfg.RETINA.EVAL.ARGMAX_SIZE = 256
    cfg.RETINA.EVAL.ARGMAX_REDUCTION = "pooled"
    cfg.RETINA.EVAL.ARGMAX_BATCH_SIZE = 4
    # pr_operating_point: the score threshold of precision / recall, chosen on validation data;
    # < 0 = the PR curve's break-even point (Red-Seg's tables read that way).
    cfg.RETINA.EVAL.OPERATING_POINT = -1.0
    # component_ap: the side both maps are resized to (CBAM-DeepLab's 512; 0 = native) and the
    # probability at which a pixel is lesion (components, IoU).
    cfg.RETINA.EVAL.COMPONENT_AP_SIZE = 512
    cfg.RETINA.EVAL.COMPONENT_AP_THRESHOLD = 0.5


def add_inference_config(cfg):
    """``RETINA.INFERENCE``: mixed-precision inference."""
    _add_section(cfg, "RETINA")
    # Mixed-precision inference (retina_d2/modeling/amp.py), the test-time side of Detectron2's
    # SOLVER.AMP.ENABLED: evaluation and tools/predict.py run the model under torch.autocast in
    # AMP_DTYPE ("float16" on CUDA; "bfloat16" is what CPU autocast is made for). Outputs come
    # back in float32, so evaluators and the tiling merge see the same types either way.
    cfg.RETINA.INFERENCE = CN()
    cfg.RETINA.INFERENCE.AMP = False
    cfg.RETINA.INFERENCE.AMP_DTYPE = "float16"


def add_reproducibility_config(cfg):
    """``RETINA.DETERMINISTIC``: deterministic kernels for reproducible training."""
    _add_section(cfg, "RETINA")
    # Reproducible training (tools/train_net.py --deterministic; needs SEED >= 0, --seed N).
    # SEED alone already fixes every random draw: Detectron2's default_setup seeds Python,
    # NumPy and torch with SEED + rank, the training sampler's shuffle order is drawn from that
    # NumPy state (the same on every rank), and each loader worker reseeds from its torch seed.
    # On the CPU that is enough for the same loss curve twice (tests/engine/test_seed.py). On
    # CUDA it is not: cuDNN picks kernels by timing and several kernels add in whatever order
    # threads finish. This switch also sets torch.use_deterministic_algorithms(True,
    # warn_only=True), torch.backends.cudnn.deterministic = True and cudnn.benchmark = False
    # (whatever CUDNN_BENCHMARK says), and CUBLAS_WORKSPACE_CONFIG=":4096:8" unless the
    # environment sets it, which cuBLAS needs for repeatable matrix products. The cost is GPU
    # time and memory: no cuDNN autotuning, slower deterministic kernels (scatter-add,
    # index-add), a larger cuBLAS workspace, and RoIAlign on CUDA runs torchvision's pure-PyTorch
    # version (compiled on first use, more memory). Ops with no deterministic CUDA kernel at all
    # (the backward of bilinear upsampling, which the semantic heads use) print a warning naming
    # them and stay non-deterministic rather than stopping the run.
    cfg.RETINA.DETERMINISTIC = False


def _add_section(node, name: str) -> None:
    """Give ``node`` an empty section ``name`` unless it has one: several components add keys
    under RETINA (and RETINA.EVAL), and each must run alone."""
    if name not in node:
        setattr(node, name, CN())  # through yacs' checks (a frozen config refuses it)


# Every component's keys, in the order add_retina_config adds them.
RETINA_CONFIG_COMPONENTS = (
    add_checkpoint_config,
    add_solver_config,
    add_lesion_resnet_config,
    add_unet_encoder_config,
    add_vgg_config,
    add_inception_config,
    add_lesion_rcnn_config,
    add_semantic_config,
    add_resunet_config,
    add_red_seg_config,
    add_lesion_net_config,
    add_cbam_deeplab_config,
    add_multitask_config,
    add_grading_config,
    add_localization_config,
    add_preprocess_config,
    add_augmentation_config,
    add_plateau_config,
    add_tiling_config,
    add_tta_config,
    add_components_config,
    add_bright_candidates_config,
    add_evaluation_config,
    add_protocol_config,
    add_inference_config,
    add_reproducibility_config,
)


_BASE_KEY = "_BASE_"


def read_config_yaml(filename: str, _chain=()) -> dict:
    """The mapping a config YAML file holds, with its ``_BASE_`` file(s) (paths relative to it)
    read the same way and merged below it.

    Only YAML's safe loader reads it: Detectron2 0.6's ``load_yaml_with_base`` falls back to
    ``yaml.unsafe_load``, with which a ``!!python/...`` tag runs code; retina_d2.compat puts
    this function in its place.

    Raises:
        ConfigError: naming the file: unreadable, not YAML, a tag that builds Python objects,
            not a mapping, a missing or circular ``_BASE_``.
    """
    if filename in _chain:
        raise ConfigError(f"{filename}: _BASE_ chain loops back to itself: {' -> '.join(_chain)}")
    loaded = _safe_yaml(filename)
    base = loaded.pop(_BASE_KEY, None)
    if base is None:
        return loaded
    merged = {}
    for base_file in base if isinstance(base, list) else [base]:
        path = os.path.expanduser(str(base_file))
        if not os.path.isabs(path):
            path = os.path.join(os.path.dirname(filename), path)
        if not os.path.isfile(path):
            raise ConfigError(f"{filename}: _BASE_ {base_file!r}: no such file ({path})")
        _merge_below(read_config_yaml(path, _chain + (filename,)), merged, filename)
    _merge_below(loaded, merged, filename)
    return merged


def _safe_yaml(filename: str) -> dict:
    try:
        with open(filename, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
    except yaml.constructor.ConstructorError as e:
        tag = re.search(r"tag '([^']*)'", str(e.problem))
        tag = tag.group(1).replace("tag:yaml.org,2002:", "!!") if tag else "a tag"
        raise ConfigError(
            f"{filename}{_yaml_line(e)}: YAML tag {tag} refused: config files are read with "
            "YAML's safe loader, which builds no Python objects"
        ) from None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError(f"{filename}{_yaml_line(e)}: not valid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{filename}: not a text (UTF-8) file") from None
    except OSError as e:
        raise ConfigError(f"{filename}: cannot read it: {e.strerror or e}") from None
    if loaded is None:
        return {}  # an empty file changes nothing
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"{filename}: holds a YAML {type(loaded).__name__}, not a mapping of config keys"
        )
    return loaded


def _yaml_line(error) -> str:
    mark = getattr(error, "problem_mark", None)
    return f": line {mark.line + 1}" if mark is not None else ""


def _merge_below(top: dict, merged: dict, filename: str) -> None:
    """Merge ``top`` into ``merged`` in place, ``top``'s values winning, sections recursively."""
    for key, value in top.items():
        if isinstance(value, dict) and key in merged:
            if not isinstance(merged[key], dict):
                raise ConfigError(f"{filename}: {key} is a section here but a value in _BASE_")
            _merge_below(value, merged[key], filename)
        else:
            merged[key] = value


_TYPE_MISMATCH = re.compile(
    r"Type mismatch \(<class '(\w+)'> vs\. <class '(\w+)'>\) with values \((.*) vs\. (.*)\) "
    r"for config key: (\S+)"
)


def _merge_error(where: str, error: Exception) -> "ConfigError":
    """A ConfigError for what yacs raised while merging ``where`` (a file or "command line")."""
    text = " ".join(str(error.args[0] if error.args else error).split())
    mismatch = _TYPE_MISMATCH.search(text)
    if mismatch:
        want, got, default, value, key = mismatch.groups()
        return ConfigError(f"{where}: {key} {value!r}: expected {want} (like {default}), got {got}")
    if isinstance(error, KeyError) or text.startswith("Non-existent key"):
        return ConfigError(f"{where}: {text} (not a Detectron2 or retina_d2 key)")
    return ConfigError(f"{where}: {text}")


def merge_config(cfg, config_file: str, opts=()) -> None:
    """Merge ``config_file`` and then the command line's ``opts`` (KEY VALUE ...) into ``cfg``.

    Raises:
        ConfigError: naming the file or "command line": unsafe or malformed YAML, an unknown
            key, a value of the wrong type, an odd number of overrides.
    """
    try:
        cfg.merge_from_file(config_file)
    except ConfigError:
        raise
    except (KeyError, ValueError, AssertionError) as e:  # yacs asserts as well as raising
        raise _merge_error(config_file, e) from None
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, ValueError, AssertionError) as e:
        raise _merge_error("command line", e) from None


def get_retina_cfg():
    """Detectron2's default config with retina_d2's keys added."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_retina_config(cfg)
    return cfg
