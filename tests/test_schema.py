"""``retina_d2/schema.py`` is the single source of what data, models, evaluation and the report
share: no module restates its constants, evaluation and the report share COCO I/O through a
public module instead of each other's private names, and the evaluators follow Detectron2's
``@configurable`` convention (``from_config`` returns the arguments)."""
import ast
import re
from pathlib import Path

import pytest

from retina_d2 import schema
from retina_d2.config import get_retina_cfg

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "retina_d2"
SCHEMA = PACKAGE / "schema.py"


def _sources():
    """Every Python file of the package and the tools, but schema.py itself."""
    files = sorted(PACKAGE.rglob("*.py")) + sorted((REPO / "tools").rglob("*.py"))
    return [(p, p.read_text(encoding="utf-8")) for p in files if p != SCHEMA]


def _code_strings(source: str):
    """The string constants of the code, docstrings left out (they may name a file)."""
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        and id(node) not in docstrings
    ]


# A restatement of a schema constant, as a regular expression over the source.
RESTATEMENTS = {
    "GRADE_COUNTS": r'"dr_grade"\s*:\s*5',
    "LANDMARK_FIELDS": r'"optic_disc"\s*:\s*"optic_disc_center"',
    "IGNORE_VALUE": r"^\s*\w*IGNORE\w*\s*=\s*255\b",
    "IOU_THRESHOLDS": r"[\[(]0\.35,\s*0\.5,\s*0\.75[\])]",
    # Arguments' and command-line options' defaults alike.
    "FROC_MATCH": r'\b(match|FROC_MATCH|default)\b[^=\n]*=\s*"iou"',
    "FROC_IOU": r"\b(iou_threshold|FROC_IOU|default)\b[^=\n]*=\s*0\.2\b",
    "FROC_SCORE_THRESHOLD": (
        r"\b(score_threshold|FROC_SCORE_THRESHOLD|default)\b[^=\n]*=\s*0\.35\b"
    ),
}
# Defaults of the same value that are another setting: OverlayEvaluator's score_threshold is the
# detector's MODEL.ROI_HEADS.SCORE_THRESH_TEST (its from_config), not the FROC's.
ALLOWED = {("FROC_SCORE_THRESHOLD", "retina_d2/evaluation/overlays.py")}


@pytest.mark.parametrize("name", sorted(RESTATEMENTS))
def test_no_module_restates_a_schema_constant(name):
    pattern = re.compile(RESTATEMENTS[name], re.MULTILINE)
    assert pattern.search(SCHEMA.read_text()), f"the pattern of {name} misses schema.py itself"
    found = [
        f"{path.relative_to(REPO)}:{source[: m.start()].count(chr(10)) + 1}"
        for path, source in _sources()
        if (name, str(path.relative_to(REPO))) not in ALLOWED
        for m in pattern.finditer(source)
        # Docstrings and comments may quote the numbers; code may not.
        if not source[source.rfind("\n", 0, m.start()) + 1 : m.start()].lstrip().startswith("#")
        and m.group(0) not in _docstring_text(source)
    ]
    assert not found, f"{name} restated instead of imported from retina_d2.schema: {found}"


def _docstring_text(source: str) -> str:
    tree = ast.parse(source)
    texts = [ast.get_docstring(node, clean=False) or "" for node in ast.walk(tree)
             if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                  ast.AsyncFunctionDef))]
    return "\n".join(texts)


def test_no_module_spells_an_output_file_name():
    """The files the evaluators write and the report and predict read are named in schema.py."""
    names = {
        value for key, value in vars(schema).items()
        if key.endswith(("_FILE", "_DIR")) and isinstance(value, str)
    }
    assert {"instance_metrics.json", "froc.json", "eval_info.json", "pr_curves"} <= names
    found = [
        f"{path.relative_to(REPO)}:{line}: {value!r}"
        for path, source in _sources()
        for line, value in _code_strings(source)
        if value in names
    ]
    assert not found, f"output names spelled out instead of imported from retina_d2.schema: {found}"


def test_the_old_homes_of_the_constants_are_the_schemas():
    """The names other modules kept exporting are the schema's objects, not copies."""
    from retina_d2.data import mapper
    from retina_d2.data.converters import base
    from retina_d2.evaluation import grading_eval, localization_eval, semantic_metrics
    from retina_d2.modeling import grading, losses

    assert grading.GRADE_COUNTS is grading_eval.GRADE_COUNTS is schema.GRADE_COUNTS
    assert mapper.LANDMARK_FIELDS is localization_eval.LANDMARK_FIELDS is schema.LANDMARK_FIELDS
    assert (mapper.SEMANTIC_IGNORE == base.SEMANTIC_IGNORE == losses.IGNORE_VALUE
            == semantic_metrics.IGNORE_VALUE == schema.IGNORE_VALUE == 255)
    # Retinal-Lesions' raw-mask value for excluded annotations is another thing: a value of one
    # dataset's input files, which its converter turns into crowd regions and ignore pixels.
    assert base.IGNORE_VALUE == 127


def test_the_config_defaults_are_the_schemas():
    evaluation = get_retina_cfg().RETINA.EVAL
    assert tuple(evaluation.IOU_THRESHOLDS) == schema.IOU_THRESHOLDS == (0.35, 0.5, 0.75)
    assert evaluation.FROC_MATCH == schema.FROC_MATCH == "iou"
    assert evaluation.FROC_IOU == schema.FROC_IOU == 0.2
    assert evaluation.FROC_SCORE_THRESHOLD == schema.FROC_SCORE_THRESHOLD == 0.35


def test_schema_imports_nothing_of_the_package():
    """Any layer may import it: it must not import one itself (no cycle)."""
    tree = ast.parse(SCHEMA.read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not imports


def test_no_module_imports_a_private_name_of_another():
    """Evaluation and the report share COCO I/O through retina_d2.evaluation.coco_io, not
    through instance_eval's private helpers (which were _check_results, _annotated_types...)."""
    found = []
    for path, source in _sources():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ImportFrom) and (
                node.level > 0 or (node.module or "").startswith("retina_d2")
            ):
                private = [a.name for a in node.names
                           if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {private}")
    assert not found, found


def _evaluators():
    from retina_d2.evaluation import (
        LandmarkLocalizationEvaluator,
        LesionFROCEvaluator,
        LesionGradingEvaluator,
        LesionInstanceEvaluator,
        LesionSemanticEvaluator,
        OverlayEvaluator,
    )
    from retina_d2.evaluation.protocols import PROTOCOLS

    return [LandmarkLocalizationEvaluator, LesionFROCEvaluator, LesionGradingEvaluator,
            LesionInstanceEvaluator, LesionSemanticEvaluator, OverlayEvaluator,
            *PROTOCOLS.values()]


@pytest.mark.parametrize("evaluator_class", _evaluators(), ids=lambda c: c.__name__)
def test_evaluators_are_configurable_with_a_dict_from_config(evaluator_class, tmp_path):
    cfg = get_retina_cfg()
    cfg.MODEL.GRADING.TASKS = ["dr_grade"]
    cfg.MODEL.LOCALIZATION.LANDMARKS = ["fovea"]
    arguments = evaluator_class.from_config(cfg, "some_dataset", str(tmp_path))
    # Detectron2's convention: the constructor's keyword arguments, which @configurable passes
    # on when the class is called as Evaluator(cfg, dataset_name, output_dir).
    assert isinstance(arguments, dict)
    assert arguments["dataset_name"] == "some_dataset"
    assert arguments["output_dir"] == str(tmp_path)
    assert hasattr(evaluator_class.__init__, "__wrapped__"), "__init__ is not @configurable"
