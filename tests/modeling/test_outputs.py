"""What a config's model outputs and trains on is asked of its registered class: each
meta-architecture's ``output_types`` / ``training_targets``, and the mapper targets and
evaluators they switch on."""
import json
from pathlib import Path

import pytest
from detectron2.data import MetadataCatalog
from torch import nn

import retina_d2.modeling  # noqa: F401  (registration)
from retina_d2.config import ConfigError, get_retina_cfg
from retina_d2.data.mapper import LesionDatasetMapper
from retina_d2.engine.trainer import LesionTrainer
from retina_d2.evaluation import LesionInstanceEvaluator
from retina_d2.evaluation.grading_eval import LesionGradingEvaluator
from retina_d2.evaluation.localization_eval import LandmarkLocalizationEvaluator
from retina_d2.evaluation.semantic_eval import LesionSemanticEvaluator
from retina_d2.modeling.inference import LesionMerging, build_inference_model
from retina_d2.modeling.outputs import (
    GRADES,
    INSTANCES,
    LANDMARKS,
    LESION_PRESENCE,
    SEM_SEG,
    has_detector,
    has_grading,
    has_localization,
    has_semantic_head,
    output_types,
    trains_lesions,
    training_targets,
)
from retina_d2.modeling.pretrained import part_weights

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _cfg(arch, branch=None, *, lesion_seg=False, frozen=False, grading=(), landmarks=()):
    cfg = get_retina_cfg()
    cfg.MODEL.META_ARCHITECTURE = arch
    cfg.MODEL.LESION_SEG.ENABLED = lesion_seg
    if branch is not None:
        cfg.MODEL.MULTITASK.LESION_ARCHITECTURE = branch
    cfg.MODEL.MULTITASK.LESION_FROZEN = frozen
    cfg.MODEL.GRADING.TASKS = list(grading)
    cfg.MODEL.LOCALIZATION.LANDMARKS = list(landmarks)
    return cfg


# (config, outputs, training targets), worked out from each class's docstring.
CASES = {
    "LesionRCNN": (_cfg("LesionRCNN"), {INSTANCES}, {INSTANCES}),
    "LesionRCNN + semantic head": (
        _cfg("LesionRCNN", lesion_seg=True), {INSTANCES, SEM_SEG}, {INSTANCES, SEM_SEG},
    ),
    "SemanticLesionNet": (_cfg("SemanticLesionNet"), {SEM_SEG}, {SEM_SEG}),
    # LESION_SEG.ENABLED belongs to LesionRCNN: a SemanticLesionNet has maps either way.
    "SemanticLesionNet, LESION_SEG on": (
        _cfg("SemanticLesionNet", lesion_seg=True), {SEM_SEG}, {SEM_SEG},
    ),
    "Detectron2's GeneralizedRCNN (the default)": (
        _cfg("GeneralizedRCNN"), {INSTANCES}, {INSTANCES},
    ),
    "MultiTask, LesionRCNN branch": (
        _cfg("MultiTaskLesionNet", "LesionRCNN", grading=["dr_grade"], landmarks=["fovea"]),
        {INSTANCES, LESION_PRESENCE, GRADES, LANDMARKS}, {INSTANCES, GRADES, LANDMARKS},
    ),
    "MultiTask, LesionRCNN branch with maps": (
        _cfg("MultiTaskLesionNet", "LesionRCNN", lesion_seg=True, grading=["dr_grade"]),
        {INSTANCES, SEM_SEG, LESION_PRESENCE, GRADES}, {INSTANCES, SEM_SEG, GRADES},
    ),
    "MultiTask, SemanticLesionNet branch": (
        _cfg("MultiTaskLesionNet", "SemanticLesionNet", landmarks=["optic_disc"]),
        {SEM_SEG, LESION_PRESENCE, LANDMARKS}, {SEM_SEG, LANDMARKS},
    ),
    "MultiTask, frozen branch": (
        _cfg("MultiTaskLesionNet", "SemanticLesionNet", frozen=True, grading=["dr_grade"]),
        {SEM_SEG, LESION_PRESENCE, GRADES}, {GRADES},
    ),
    "MultiTask, grading only": (
        _cfg("MultiTaskLesionNet", "", lesion_seg=True, grading=["dr_grade", "dme_grade"]),
        {GRADES}, {GRADES},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_registered_architecture_declares_its_outputs_and_targets(name):
    cfg, outputs, targets = CASES[name]
    assert output_types(cfg) == outputs
    assert training_targets(cfg) == targets
    assert has_detector(cfg) == (INSTANCES in outputs)
    assert has_semantic_head(cfg) == (SEM_SEG in outputs)
    assert has_grading(cfg) == (GRADES in outputs)
    assert has_localization(cfg) == (LANDMARKS in outputs)
    assert trains_lesions(cfg) == bool(targets & {INSTANCES, SEM_SEG})


@pytest.mark.parametrize("name", list(CASES))
def test_the_mapper_loads_the_targets_the_class_trains_on(name, monkeypatch):
    cfg, outputs, targets = CASES[name]
    cfg = cfg.clone()
    cfg.MODEL.MASK_ON = True
    monkeypatch.setattr(
        "retina_d2.data.mapper.semantic_classes", lambda datasets: ["microaneurysm"]
    )
    mapper = LesionDatasetMapper(cfg, is_train=True)
    assert mapper.instance_targets == (INSTANCES in targets)
    assert (mapper.semantic_classes is not None) == (SEM_SEG in targets)
    assert mapper.landmark_targets == (LANDMARKS in targets)
    assert mapper.use_instance_mask == (INSTANCES in outputs)
    test_mapper = LesionDatasetMapper(cfg, is_train=False)
    assert test_mapper.semantic_classes is None and not test_mapper.landmark_targets


@pytest.fixture(scope="module")
def lesion_dataset(tmp_path_factory):
    """A registered dataset name with one lesion class and an empty COCO ground truth."""
    root = tmp_path_factory.mktemp("outputs")
    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "microaneurysm"}]}
    (root / "gt.json").write_text(json.dumps(gt))
    dataset = f"retina_d2_test_outputs_{root.name}"
    MetadataCatalog.get(dataset).set(
        thing_classes=["microaneurysm"], json_file=str(root / "gt.json"), image_root=str(root)
    )
    return dataset


@pytest.mark.parametrize("name", list(CASES))
def test_the_evaluators_follow_the_outputs(name, lesion_dataset, tmp_path):
    cfg, outputs, _ = CASES[name]
    cfg = cfg.clone()
    dataset = lesion_dataset
    cfg.RETINA.EVAL.NUM_OVERLAYS = 0
    kinds = {type(e) for e in LesionTrainer.build_evaluator(cfg, dataset, str(tmp_path))._evaluators}
    assert (LesionInstanceEvaluator in kinds) == (INSTANCES in outputs)
    assert (LesionSemanticEvaluator in kinds) == (SEM_SEG in outputs)
    assert (LesionGradingEvaluator in kinds) == bool(outputs & {GRADES, LESION_PRESENCE})
    assert (LandmarkLocalizationEvaluator in kinds) == (LANDMARKS in outputs)


@pytest.mark.parametrize("name", list(CASES))
def test_lesion_merging_is_one_pipeline_step_for_models_with_instances(name):
    cfg, outputs, _ = CASES[name]
    cfg = cfg.clone()
    cfg.MODEL.LESION_MERGE.ENABLED = True
    model = nn.Identity()  # stands in for the model
    built = build_inference_model(cfg, model)
    assert isinstance(built, LesionMerging) == (INSTANCES in outputs)
    assert built is model or built.model is model
    cfg.MODEL.LESION_MERGE.ENABLED = False
    assert build_inference_model(cfg, model) is model


def test_an_unregistered_architecture_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"MODEL.META_ARCHITECTURE 'NoSuchNet' is not a registered"):
        output_types(_cfg("NoSuchNet"))


def test_part_weights_are_asked_of_the_class():
    cfg = _cfg("MultiTaskLesionNet", "LesionRCNN")
    cfg.MODEL.MULTITASK.TASK_BACKBONE = "build_inception_v3_backbone"
    cfg.MODEL.MULTITASK.TASK_BACKBONE_WEIGHTS = "inception.pth"
    assert part_weights(cfg) == {"task_backbone.": "inception.pth"}
    cfg.MODEL.META_ARCHITECTURE = "LesionRCNN"  # the keys mean nothing to a lone detector
    assert part_weights(cfg) == {}
