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
