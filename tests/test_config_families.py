"""Per-family config bases: each family's base stands alone, a semantic or multi-task config
inherits nothing of Mask R-CNN (anchors, RPN / RoI settings, Graham, field-of-view crop), and no
real config inherits a demo config or another dataset's config."""
from pathlib import Path

import pytest
import yaml

from retina_d2.config import get_retina_cfg

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LEAVES = sorted(p for p in CONFIGS.glob("**/*.yaml") if not p.name.startswith("Base"))
FAMILY_BASES = {
    "Base-MaskRCNN.yaml": "LesionRCNN",
    "Base-Semantic.yaml": "SemanticLesionNet",
    "Base-MultiTask.yaml": "MultiTaskLesionNet",
    "Base-BrightCandidates.yaml": "BrightCandidateNet",
}
# A CPU variant of a family base inherits that base, nothing else.
CPU_BASES = {
    "Base-MaskRCNN-cpu-light.yaml": "Base-MaskRCNN.yaml",
    "Base-Semantic-cpu-light.yaml": "Base-Semantic.yaml",
}
# Keys only Mask R-CNN reads (Detectron2's sections) and the e-ophtha paper's preprocessing.
MASK_RCNN_SECTIONS = ("ANCHOR_GENERATOR", "RPN", "ROI_HEADS", "ROI_BOX_HEAD", "ROI_MASK_HEAD")
DEMOS = ("maskrcnn_synthetic.yaml", "multitask_synthetic.yaml")


def _raw(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def _chain(path: Path):
    """The config files ``path`` inherits, nearest first (lists of bases flattened)."""
    out = []
    base = _raw(path).get("_BASE_")
    for name in ([] if base is None else base if isinstance(base, list) else [base]):
        parent = (path.parent / name).resolve()
        out.append(parent)
        out += _chain(parent)
    return out


def _detects(cfg) -> bool:
    """A LesionRCNN, or a MultiTaskLesionNet whose lesion branch is one (the synthetic demo)."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "MultiTaskLesionNet":
        arch = cfg.MODEL.MULTITASK.LESION_ARCHITECTURE
    return arch == "LesionRCNN"


def _merged(path: Path):
    cfg = get_retina_cfg()
    cfg.merge_from_file(str(path))
    return cfg


@pytest.mark.parametrize("name", sorted(FAMILY_BASES))
def test_family_bases_stand_alone_and_name_their_architecture(name):
    raw = _raw(CONFIGS / name)
    assert "_BASE_" not in raw
    assert raw["MODEL"]["META_ARCHITECTURE"] == FAMILY_BASES[name]


@pytest.mark.parametrize("name", sorted(CPU_BASES))
def test_cpu_bases_inherit_only_their_family_base(name):
    assert [p.name for p in _chain(CONFIGS / name)] == [CPU_BASES[name]]


@pytest.mark.parametrize("name", ["Base-Semantic.yaml", "Base-MultiTask.yaml"])
def test_semantic_and_multitask_bases_set_nothing_of_mask_rcnn(name):
    raw = _raw(CONFIGS / name)
    assert not set(MASK_RCNN_SECTIONS) & set(raw["MODEL"])
    assert "PIXEL_MEAN" not in raw["MODEL"]  # each leaf states its paper's statistics
    assert raw["RETINA"]["PREPROCESS"] == {"FOV_CROP": False, "GRAHAM": False}
    assert "SOLVER" not in raw  # each leaf states its optimiser and schedule
    aug = _merged(CONFIGS / name).RETINA.AUG  # off, each leaf switches on its own
    assert not aug.HFLIP and not aug.VFLIP and not aug.ROT90 and aug.TRANSLATE == 0
    for key in ("SCALE", "BRIGHTNESS", "CONTRAST", "SATURATION"):
        assert tuple(aug[key]) == (1.0, 1.0), key


@pytest.mark.parametrize("path", LEAVES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_no_semantic_or_multitask_config_inherits_mask_rcnn(path):
    cfg = _merged(path)
    if _detects(cfg):
        return
    chain = [p.name for p in _chain(path)]
    assert not any(name.startswith("Base-MaskRCNN") for name in chain), chain
    # So the Mask R-CNN base's values are nowhere: Detectron2's defaults stand.
    default = get_retina_cfg()
    for section in MASK_RCNN_SECTIONS:
        assert cfg.MODEL[section] == default.MODEL[section], section
    for ancestor in _chain(path):
        raw_model = _raw(ancestor).get("MODEL", {})
        assert not set(MASK_RCNN_SECTIONS) & set(raw_model), (ancestor.name, raw_model.keys())


@pytest.mark.parametrize("path", LEAVES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_graham_and_fov_crop_only_where_the_config_family_says(path):
    # A semantic or multi-task config crops the field of view or applies Graham only when a
    # file of its own (or its CPU base) says so, never by inheriting the Mask R-CNN base.
    cfg = _merged(path)
    if _detects(cfg):
        return
    setters = [p for p in [path] + _chain(path) if p.name not in FAMILY_BASES]
    for key in ("GRAHAM", "FOV_CROP"):
        if cfg.RETINA.PREPROCESS[key]:
            said = [
                p.name for p in setters
                if _raw(p).get("RETINA", {}).get("PREPROCESS", {}).get(key)
            ]
            assert said, f"{path.name}: RETINA.PREPROCESS.{key} on without saying so"


def _dataset_of(name: str) -> str:
    """The dataset part of a leaf config's name: ``maskrcnn_idrid.yaml`` -> ``idrid``."""
    stem = name[: -len(".yaml")]
    for dataset in ("retinal_lesions", "idrid", "eophtha", "ddr", "heimed", "synthetic"):
        if dataset in stem:
            return dataset
    return stem


@pytest.mark.parametrize("path", LEAVES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_inherits_only_family_bases(path):
    # Demos and second steps included: each states its own settings over one family's base
    # (tests/test_config_regression.py checks a second step's frozen branch against its first).
    # Quick schedules are a few iterations of a config they name, so they inherit that config.
    if path.parent.name == "quick_schedules":
        return
    chain = [p.name for p in _chain(path)]
    assert chain and all(name in FAMILY_BASES or name in CPU_BASES for name in chain), chain
    # The family a config inherits is its architecture's.
    family = [name for name in chain if name in FAMILY_BASES]
    assert len(family) == 1, chain
    assert _merged(path).MODEL.META_ARCHITECTURE == FAMILY_BASES[family[0]], chain


@pytest.mark.parametrize("path", LEAVES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_no_real_config_inherits_a_demo_or_another_datasets_config(path):
    if path.parent.name == "quick_schedules" or path.name in DEMOS:
        return  # demos and their instant tests may build on demos
    for parent in _chain(path):
        if parent.name.startswith("Base"):
            continue
        assert parent.name not in DEMOS, f"{path.name} inherits the demo {parent.name}"
        assert _dataset_of(parent.name) == _dataset_of(path.name), (
            f"{path.name} inherits {parent.name}, another dataset's config"
        )


def test_the_rules_can_fail():
    # The inheritance the split removed would be caught: a HEI-MED config built on IDRiD's, and a
    # semantic config on the Mask R-CNN base.
    assert _dataset_of("redseg_idrid.yaml") != _dataset_of("redseg_heimed.yaml")
    assert "ANCHOR_GENERATOR" in _raw(CONFIGS / "Base-MaskRCNN.yaml")["MODEL"]
