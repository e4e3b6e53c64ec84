"""README's table of configs and the registered classes that build them: every config of
configs/ is listed, each cell holds the names its merged config holds, and every name is in the
Detectron2 (or retina_d2) registry that builds it once ``import retina_d2`` has run."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from retina_d2.config import get_retina_cfg

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
HEADER = "| config | `META_ARCHITECTURE` |"
NONE = "—"
# The registry of each name column, in the table's order (a cell may name several registries'
# entries: the detector's parts, one per registry, in this order).
COLUMN_REGISTRIES = (
    ("META_ARCH_REGISTRY",),
    ("META_ARCH_REGISTRY",),
    ("BACKBONE_REGISTRY",),
    ("PROPOSAL_GENERATOR_REGISTRY", "ROI_HEADS_REGISTRY", "ROI_BOX_HEAD_REGISTRY",
     "ROI_MASK_HEAD_REGISTRY"),
    ("SEM_SEG_HEADS_REGISTRY",),
    ("GRADING_HEAD_REGISTRY",),
    ("BACKBONE_REGISTRY",),
)
# Run in a fresh interpreter: whatever this test session imported must not count.
_REGISTERED = """
import json, sys
import retina_d2
from detectron2 import modeling
grading = sys.modules.get("retina_d2.modeling.grading")
names = {n: sorted(getattr(modeling, n)._obj_map) for n in (
    "META_ARCH_REGISTRY", "BACKBONE_REGISTRY", "PROPOSAL_GENERATOR_REGISTRY",
    "ROI_HEADS_REGISTRY", "ROI_BOX_HEAD_REGISTRY", "ROI_MASK_HEAD_REGISTRY",
    "SEM_SEG_HEADS_REGISTRY")}
names["GRADING_HEAD_REGISTRY"] = sorted(grading.GRADING_HEAD_REGISTRY._obj_map) if grading else []
print(json.dumps(names))
"""


def table_rows(text: str) -> dict:
    """{config file name: [names of each column after the first]} from README's table."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(HEADER)]
    assert len(starts) == 1, f"README: {len(starts)} tables start with {HEADER!r}"
    rows = {}
    for line in lines[starts[0] + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        names = [re.findall(r"`([^`]+)`", cell) for cell in cells]
        for cell, found in zip(cells[1:], names[1:]):
            assert found or cell == NONE, f"README row {cells[0]}: cell {cell!r} names nothing"
        assert len(names[0]) == 1, f"README row {line!r}: no config name"
        assert names[0][0] not in rows, f"README lists {names[0][0]} twice"
        rows[names[0][0]] = names[1:]
    return rows


def expected_names(cfg) -> list:
    """The names of each column for a merged config (the parts its model is built from)."""
    model = cfg.MODEL
    multitask = model.META_ARCHITECTURE == "MultiTaskLesionNet"
    lesion = model.MULTITASK.LESION_ARCHITECTURE if multitask else model.META_ARCHITECTURE
    detector = lesion == "LesionRCNN"
    semantic = lesion == "SemanticLesionNet" or (detector and model.LESION_SEG.ENABLED)
    rcnn = [model.PROPOSAL_GENERATOR.NAME, model.ROI_HEADS.NAME, model.ROI_BOX_HEAD.NAME]
    if model.MASK_ON:
        rcnn.append(model.ROI_MASK_HEAD.NAME)
    return [
        [model.META_ARCHITECTURE],
        [lesion] if multitask and lesion else [],
        # BrightCandidateNet has no network trunk: its candidates are computed, not learned.
        [model.BACKBONE.NAME] if lesion != "BrightCandidateNet" else [],
        rcnn if detector else [],
        [model.SEM_SEG_HEAD.NAME] if semantic else [],
        [model.GRADING.NAME] if multitask and len(model.GRADING.TASKS) else [],
        [model.MULTITASK.TASK_BACKBONE] if multitask and model.MULTITASK.TASK_BACKBONE else [],
    ]


def mismatches(rows: dict) -> list:
    """What README's rows get wrong about the configs of configs/ (empty: nothing)."""
    configs = sorted(p.name for p in CONFIGS.glob("*.yaml") if not p.name.startswith("Base"))
    problems = [f"{name}: not in README's table" for name in configs if name not in rows]
    problems += [f"{name}: in README's table, not in configs/" for name in rows
                 if name not in configs]
    for name in configs:
        if name not in rows:
            continue
        cfg = get_retina_cfg()
        cfg.merge_from_file(str(CONFIGS / name))
        if rows[name] != expected_names(cfg):
            problems.append(f"{name}: README {rows[name]} != merged {expected_names(cfg)}")
    return problems


@pytest.fixture(scope="module")
def rows():
    return table_rows((REPO / "README.md").read_text(encoding="utf-8"))


def test_every_config_is_listed_with_the_names_its_merged_config_holds(rows):
    assert not mismatches(rows)


def test_every_name_is_registered_after_import_retina_d2(rows):
    out = subprocess.run([sys.executable, "-c", _REGISTERED], check=True, capture_output=True,
                         text=True, cwd=REPO).stdout
    registered = json.loads(out.strip().splitlines()[-1])
    missing = []
    for config, columns in rows.items():
        assert len(columns) == len(COLUMN_REGISTRIES), config
        for names, registries in zip(columns, COLUMN_REGISTRIES):
            # One registry per name; a single-registry column may list several names.
            for i, name in enumerate(names):
                registry = registries[min(i, len(registries) - 1)]
                if name not in registered[registry]:
                    missing.append(f"{config}: {name} not in {registry}")
    assert not missing


def test_the_check_can_fail(rows):
    # A wrong head, a missing row and a row for no config are all caught.
    columns = list(rows["redseg_idrid.yaml"])
    columns[4] = ["ResUNetHead"]
    wrong = dict(rows, **{"redseg_idrid.yaml": columns})
    assert [p.split(":")[0] for p in mismatches(wrong)] == ["redseg_idrid.yaml"]
    dropped = {k: v for k, v in rows.items() if k != "maskrcnn_ddr.yaml"}
    assert mismatches(dropped) == ["maskrcnn_ddr.yaml: not in README's table"]
    extra = dict(rows, **{"gone.yaml": rows["maskrcnn_ddr.yaml"]})
    assert mismatches(extra) == ["gone.yaml: in README's table, not in configs/"]
