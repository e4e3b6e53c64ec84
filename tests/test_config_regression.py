"""Every config in configs/ merges to what it merged to before the configs were rebased onto the
family bases alone (the configs/ tree of commit 2e9dfa9, read from git), except the keys listed
in ``CHANGED``: Mask R-CNN values that a semantic config inherited from Base-MaskRCNN.yaml and
Detectron2 ResNet values (MODEL.RESNETS) that configs whose trunks are LESION_RESNET never read.
For those configs the model built from either config is the same, parameter for parameter."""
import io
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model

import retina_d2.modeling  # noqa: F401  (registration)
from retina_d2.config import get_retina_cfg

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# The last commit whose configs inherited demo, other-family and Mask R-CNN configs.
BEFORE_REBASE = "2e9dfa9"
MASK_RCNN_KEYS = (
    "MODEL.ANCHOR_GENERATOR.", "MODEL.RPN.", "MODEL.ROI_HEADS.", "MODEL.ROI_BOX_HEAD.",
    "MODEL.ROI_MASK_HEAD.", "MODEL.RESNETS.", "TEST.DETECTIONS_PER_IMAGE",
)
# config -> the key prefixes whose merged values may differ from the reference; each now holds
# Detectron2's default (nothing of the Mask R-CNN base).
CHANGED = {
    # A SemanticLesionNet, formerly on Base-MaskRCNN.yaml: no anchors, RPN, RoI heads, Detectron2
    # ResNet (its trunk is LESION_RESNET) or instance cap (it predicts maps, never instances).
    "exudate_fpnseg_heimed_cpu.yaml": MASK_RCNN_KEYS,
    # Its LesionRCNN branch and grading CNN are LESION_RESNET trunks: MODEL.RESNETS is unread.
    "multitask_synthetic.yaml": ("MODEL.RESNETS.",),
    "quick_schedules/multitask_synthetic_instant_test.yaml": ("MODEL.RESNETS.",),
}
# config -> keys chosen on evidence after the rebase (each quoted from the results file that chose
# it by a test of its own): they may differ from the reference and from the default.
TUNED = {
    # Cross-validated operating threshold (tests/benchmarks/test_dense_recipe_quotes.py).
    "exudate_fpnseg_heimed_cpu.yaml": ("RETINA.COMPONENTS.SCORE_THRESHOLD",),
}
# Configs added after the rebase: nothing to compare them with (tests/test_config_families.py
# checks them like every other).
ADDED_AFTER_REBASE = {"Base-BrightCandidates.yaml", "exudate_candidates_heimed_cpu.yaml"}
ALL_CONFIGS = sorted(
    name for name in (str(p.relative_to(CONFIGS)) for p in CONFIGS.glob("**/*.yaml"))
    if name not in ADDED_AFTER_REBASE
)


def _flat(node, prefix=""):
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _merged(path: Path):
    cfg = get_retina_cfg()
    cfg.merge_from_file(str(path))
    return cfg


@pytest.fixture(scope="module")
def reference_configs(tmp_path_factory) -> Path:
    """configs/ as it was at BEFORE_REBASE, extracted into a temporary folder."""
    try:
        archive = subprocess.run(
            ["git", "archive", BEFORE_REBASE, "configs"], cwd=REPO, check=True,
            capture_output=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"no git history with commit {BEFORE_REBASE} (not a git checkout of the repo)")
    root = tmp_path_factory.mktemp("configs_before")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root)
    return root / "configs"


def test_no_config_was_added_or_lost(reference_configs):
    before = sorted(str(p.relative_to(reference_configs)) for p in reference_configs.glob("**/*.yaml"))
    assert ALL_CONFIGS == before
    assert all((CONFIGS / name).is_file() for name in ADDED_AFTER_REBASE)  # the list is not stale


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_merged_config_equals_the_reference(name, reference_configs):
    now = _flat(_merged(CONFIGS / name))
    before = _flat(_merged(reference_configs / name))
    assert set(now) == set(before)
    tuned = TUNED.get(name, ())
    if tuned:  # the exemption is real, not stale: those keys were tuned
        assert all(now[k] != before[k] for k in tuned)
    differ = sorted(key for key in now if now[key] != before[key] and key not in tuned)
    allowed = CHANGED.get(name, ())
    unexpected = [k for k in differ if not k.startswith(allowed)]
    assert not unexpected, {k: (before[k], now[k]) for k in unexpected}
    default = _flat(get_retina_cfg())
    assert all(now[k] == default[k] for k in differ), "a changed key must fall back to the default"
    if name in CHANGED:  # the exemption is real, not stale: those keys did differ
        assert differ


def _model_state(cfg):
    cfg = cfg.clone()
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    return build_model(cfg).state_dict()


@pytest.mark.parametrize("name", sorted(CHANGED))
def test_changed_keys_build_the_same_model(name, reference_configs):
    # Same modules, same shapes, same initial values: the keys that changed are not read.
    now = _model_state(_merged(CONFIGS / name))
    before = _model_state(_merged(reference_configs / name))
    assert list(now) == list(before)
    for key in now:
        assert now[key].shape == before[key].shape, key
        assert torch.equal(now[key], before[key]), key


# A frozen lesion branch must see what it was trained on: the keys that build it and shape its
# input, in the second-step config and in the config that trained the branch.
BRANCH_KEYS = (
    "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD", "MODEL.BACKBONE.NAME", "MODEL.SEM_SEG_HEAD.",
    "MODEL.LESION_SEG.", "MODEL.UNET_ENCODER.", "MODEL.INCEPTION.", "MODEL.RESUNET.",
    "MODEL.LESION_NET.", "INPUT.FORMAT", "RETINA.PREPROCESS.GRAHAM", "RETINA.PREPROCESS.CLAHE",
)
SECOND_STEPS = [
    name for name in ALL_CONFIGS
    if _merged(CONFIGS / name).MODEL.MULTITASK.LESION_WEIGHTS.startswith("output/")
    and _merged(CONFIGS / name).MODEL.META_ARCHITECTURE == "MultiTaskLesionNet"
]


def test_second_step_configs_are_found():
    assert SECOND_STEPS == ["multitask_idrid.yaml", "multitask_retinal_lesions.yaml"]


@pytest.mark.parametrize("name", SECOND_STEPS)
def test_frozen_branch_settings_equal_those_it_was_trained_with(name):
    cfg = _merged(CONFIGS / name)
    # output/<run>/model_final.pth was written by the config whose OUTPUT_DIR is output/<run>.
    run_dir = str(Path(cfg.MODEL.MULTITASK.LESION_WEIGHTS).parent)
    first = [n for n in ALL_CONFIGS if _merged(CONFIGS / n).OUTPUT_DIR == run_dir]
    assert len(first) == 1, (run_dir, first)
    now, trained = _flat(cfg), _flat(_merged(CONFIGS / first[0]))
    branch = [k for k in now if k.startswith(BRANCH_KEYS)]
    assert {k: now[k] for k in branch} == {k: trained[k] for k in branch}, first[0]
