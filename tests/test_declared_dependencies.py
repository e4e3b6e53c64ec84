"""pyproject.toml declares what retina_d2 imports: every third-party module imported when a
module of the package is imported is a dependency, and every one imported inside a function (an
optional feature) is a dependency or an extra. Read from the sources, so a new import without a
declaration fails here."""
import ast
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "retina_d2"

# Import name -> distribution name, where they differ.
DISTRIBUTION = {
    "PIL": "pillow",
    "cv2": "opencv-python-headless",
    "sklearn": "scikit-learn",
    "yaml": "pyyaml",
    "faster_coco_eval": "faster-coco-eval",
    # retina_d2.compat imports it only to see whether setuptools still ships it (else a shim).
    "pkg_resources": None,
    # Not on PyPI under its own name: tools/setup_env.sh installs v0.6 (pyproject.toml says so).
    "detectron2": None,
}


def _module_level(body):
    """Statements run on import: the module's own, including those under a top-level if / try."""
    for node in body:
        if isinstance(node, (ast.If, ast.Try)):
            yield from _module_level(node.body)
            yield from _module_level(node.orelse)
            for handler in getattr(node, "handlers", []):
                yield from _module_level(handler.body)
            yield from _module_level(getattr(node, "finalbody", []))
        else:
            yield node


def _third_party(node):
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module]
    else:
        return []
    tops = {name.split(".")[0] for name in names}
    return [t for t in tops if t not in sys.stdlib_module_names and t != "retina_d2"]


def _imports():
    on_import, in_functions = {}, {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        top = {id(node) for node in _module_level(tree.body)}
        for node in ast.walk(tree):
            for module in _third_party(node):
                where = on_import if id(node) in top else in_functions
                where.setdefault(module, []).append(path.relative_to(REPO).as_posix())
    return on_import, in_functions


def _declared():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    required = {_name(r) for r in project["dependencies"]}
    extras = {_name(r) for reqs in project.get("optional-dependencies", {}).values() for r in reqs}
    return required, extras


def _name(requirement: str) -> str:
    for mark in "<>=!~[; ":
        requirement = requirement.split(mark)[0]
    return requirement.lower()


def _distribution(module: str):
    return DISTRIBUTION.get(module, module.lower())


def test_what_importing_the_package_needs_is_a_dependency():
    required, _ = _declared()
    on_import, _ = _imports()
    assert "numpy" in on_import and "detectron2" in on_import  # the reading works
    missing = {m: files[:2] for m, files in on_import.items()
               if _distribution(m) is not None and _distribution(m) not in required}
    assert not missing, f"imported on import but not in pyproject's dependencies: {missing}"


def test_what_a_feature_imports_is_a_dependency_or_an_extra():
    required, extras = _declared()
    _, in_functions = _imports()
    assert "onnxruntime" in in_functions  # the reading sees imports inside functions
    missing = {m: files[:2] for m, files in in_functions.items()
               if _distribution(m) is not None and _distribution(m) not in required | extras}
    assert not missing, f"imported by a feature but declared nowhere in pyproject: {missing}"


def test_the_reading_finds_a_top_level_import_under_try_and_not_one_in_a_function():
    tree = ast.parse("try:\n    import yaml\nexcept ImportError:\n    pass\n"
                     "def f():\n    import onnxruntime\n")
    top = [m for node in _module_level(tree.body) for m in _third_party(node)]
    everywhere = [m for node in ast.walk(tree) for m in _third_party(node)]
    assert top == ["yaml"] and sorted(everywhere) == ["onnxruntime", "yaml"]
