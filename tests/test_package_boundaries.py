"""Greps of the sources that keep the package's boundaries: behaviour is switched by what the
model's class declares (retina_d2/modeling/outputs.py), never by comparing architecture names."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Where a comparison would decide behaviour: the package, the tools and the benchmarks.
SOURCES = ["retina_d2", "tools", "benchmarks"]
# Config building only adds keys and their defaults; it is the one place allowed to name them.
CONFIG_BUILDING = {REPO / "retina_d2" / "config.py"}

_ARCH_KEY = r"(?:META_ARCHITECTURE|LESION_ARCHITECTURE)"
ARCHITECTURE_COMPARISON = re.compile(
    rf"{_ARCH_KEY}\s*(?:==|!=|\bnot\s+in\b|\bin\s*[\(\[\{{])"  # cfg.MODEL.META_ARCHITECTURE == ...
    rf"|(?:==|!=)\s*\S*{_ARCH_KEY}\b"  # ... == cfg.MODEL.META_ARCHITECTURE
)


def _python_files():
    for folder in SOURCES:
        root = REPO / folder
        if root.is_dir():
            yield from sorted(p for p in root.rglob("*.py") if ".venv" not in p.parts)


def test_the_pattern_finds_every_form_of_comparison():
    for line in [
        'if cfg.MODEL.META_ARCHITECTURE == "SemanticLesionNet":',
        "multitask = cfg.MODEL.META_ARCHITECTURE != MULTITASK",
        'if cfg.MODEL.META_ARCHITECTURE in ("LesionRCNN", "X"):',
        "if node.LESION_ARCHITECTURE not in LESION_ARCHITECTURES:",
        'if "LesionRCNN" == cfg.MODEL.META_ARCHITECTURE:',
    ]:
        assert ARCHITECTURE_COMPARISON.search(line), line
    for line in [
        "cls = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)",
        'raise ExportError(f"MODEL.META_ARCHITECTURE {arch}: not exported")',
        '"architecture": cfg.MODEL.META_ARCHITECTURE,',
    ]:
        assert not ARCHITECTURE_COMPARISON.search(line), line


def test_no_module_compares_architecture_names_outside_config_building():
    found = []
    for path in _python_files():
        if path in CONFIG_BUILDING:
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if ARCHITECTURE_COMPARISON.search(line):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not found, (
        "ask the model's class (retina_d2/modeling/outputs.py) instead of comparing names:\n"
        + "\n".join(found)
    )


def test_config_building_compares_no_architecture_names_either():
    # config.py only adds keys; the helpers that compared names now live on the classes.
    for path in CONFIG_BUILDING:
        lines = path.read_text().splitlines()
        assert not [line for line in lines if ARCHITECTURE_COMPARISON.search(line)]


# --- package boundaries (issue 14 item 6): the installed package stands alone and the
# checkout's scripts need no import tricks.

PACKAGE = REPO / "retina_d2"


def _sources(folder: Path):
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def _code(path: Path) -> str:
    """The file without its comments (a comment may name a folder to say why it is not read)."""
    return "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())


def test_no_tool_script_changes_sys_path():
    # pip install -e . makes retina_d2 importable from anywhere; tools/benchmark.py reaches the
    # checkout's benchmarks/ by running python -m benchmarks with PYTHONPATH, not by sys.path.
    scripts = sorted((REPO / "tools").glob("*.py"))
    assert scripts
    changes = re.compile(r"sys\.path\b|site\.addsitedir")
    offenders = [p.name for p in scripts if changes.search(_code(p))]
    assert not offenders, f"tools/ scripts that touch sys.path: {offenders}"


def test_tool_scripts_hold_no_logic():
    """Every tools/*.py defines nothing: imports, a constant or two, and its __main__ block
    calling the package (the logic is in retina_d2/ or, for benchmark.py, benchmarks/)."""
    import ast

    for script in sorted((REPO / "tools").glob("*.py")):
        tree = ast.parse(script.read_text())
        defined = [node.name for node in ast.walk(tree)
                   if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        assert not defined, f"tools/{script.name} defines {defined}: move them into the package"
        mains = [node for node in tree.body if isinstance(node, ast.If)]
        assert len(mains) == 1 and "__main__" in ast.unparse(mains[0].test), script.name


# A string or path part naming one of the checkout's folders outside the package:
# "configs/...", "tools", '../shared', / "configs" / ..., parents[1] / "tools".
CHECKOUT_FOLDER = re.compile(r"""["'](?:\.\./)?(configs|tools|shared)(?:/[^"']*)?["']""")

# The one default naming a checkout folder, and why it is not reaching into one: reproduce's
# --configs defaults to "configs" relative to the folder the command runs in (a checkout's root),
# never beside the package; the test below checks it is resolved against the current folder.
CURRENT_FOLDER_DEFAULTS = {"retina_d2/reproduce.py": 'DEFAULT_CONFIGS = Path("configs")'}


def test_the_package_reads_nothing_of_the_checkout():
    """Nothing in retina_d2/ builds a path into configs/, tools/ or ../shared: an installed
    wheel has none of them (the package's own data lives under retina_d2/)."""
    found = []
    for path in _sources(PACKAGE):
        name = str(path.relative_to(REPO))
        for number, line in enumerate(_code(path).splitlines(), 1):
            for match in CHECKOUT_FOLDER.finditer(line):
                if CURRENT_FOLDER_DEFAULTS.get(name) != line.strip():
                    found.append(f"{name}:{number}: {match.group(0)}")
    assert not found, "retina_d2/ reaches into the checkout:\n" + "\n".join(found)
    # Nothing locates files from the package's own folder upwards (parents[1] is the checkout).
    upwards = []
    for path in _sources(PACKAGE):
        depth = len(path.relative_to(PACKAGE).parts)  # parents[depth] is the checkout
        for level in re.findall(r"__file__\)(?:\.resolve\(\))?\.parents\[(\d+)\]", _code(path)):
            if int(level) >= depth:
                upwards.append(f"{path.relative_to(REPO)}: parents[{level}]")
    assert not upwards, f"modules finding files above the package: {upwards}"


def test_the_checkout_patterns_find_what_they_look_for():
    """The patterns above are not vacuous: each catches the forms the package used to have."""
    for line in ('REPO_ROOT / "configs" / "splits"', "root / 'tools' / script",
                 'Path("../shared/data/heimed")', 'cfg.merge_from_file("configs/a.yaml")'):
        assert CHECKOUT_FOLDER.search(line), line
    for line in ('help="the config, e.g. configs-like"', "retina_d2.tools.predict",
                 'name = "toolset"'):
        assert not CHECKOUT_FOLDER.search(line), line
    assert re.search(r"sys\.path\b", "sys.path.insert(0, str(REPO))")


def test_benchmarks_are_not_in_the_package():
    assert not (PACKAGE / "benchmarks").exists()
    assert (REPO / "benchmarks" / "__init__.py").is_file()


def test_the_wheel_holds_the_package_alone():
    """setuptools' package search as pyproject.toml configures it (what a wheel and the editable
    install get): retina_d2 and its subpackages, no benchmarks/, tools/ or tests/."""
    import tomllib

    from setuptools import find_packages

    with open(REPO / "pyproject.toml", "rb") as f:
        found = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]
    packages = find_packages(where=str(REPO), **found)
    assert "retina_d2" in packages and "retina_d2.tools" in packages
    assert all(p == "retina_d2" or p.startswith("retina_d2.") for p in packages), packages
