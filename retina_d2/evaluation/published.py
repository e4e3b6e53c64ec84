"""The papers' published figures (``published_figures.yaml``, shipped with the package) and the
"metric | paper's figure (source) | ours | difference" table that sets ours beside them.

Each figure names the results keys (``"<task>/<metric>"``, as the evaluators return them) that
measure it, the paper's own protocol first (``per_image_map/mAP35``) and then the toolkit's
standard reading where one exists (``segm/AP35``), so a gap can be told apart from a difference
of metric. Our rates are percent: a figure printed as a fraction is compared x100.
"""
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import yaml
from tabulate import tabulate

__all__ = [
    "FIGURES_FILE",
    "PublishedFigure",
    "PublishedFiguresError",
    "PublishedSystem",
    "SPLITS",
    "UNITS",
    "ComparisonRow",
    "flatten_results",
    "format_paper_vs_ours",
    "load_published_figures",
    "paper_vs_ours",
    "published_system",
]

FIGURES_FILE = Path(__file__).with_name("published_figures.yaml")
UNITS = ("fraction", "percent", "coefficient")
SPLITS = ("train", "val", "test", "unstated")
# The protocol of a system scored by the toolkit's standard evaluators alone.
_STANDARD = "standard"


class PublishedFiguresError(ValueError):
    """A published-figures file that does not follow the schema; the message names the file,
    the system and the figure."""


@dataclass(frozen=True)
class PublishedFigure:
    name: str  # what the paper calls it
    value: float  # as printed
    unit: str  # one of UNITS
    table: str  # where in the paper
    split: str  # one of SPLITS
    metrics: Tuple[str, ...] = ()  # our results keys, the paper's protocol first
    bound: str = ""  # "lower": the paper says only "exceeding value"
    note: str = ""
    model: str = ""  # set for a baseline: the paper's comparison model

    @property
    def ours_scale(self) -> float:
        """The value in our units: x100 for a rate printed as a fraction."""
        return self.value * 100 if self.unit == "fraction" else self.value


@dataclass(frozen=True)
class PublishedSystem:
    name: str
    paper: str  # key of the paper
    paper_file: str  # the paper's text file
    paper_title: str
    model: str
    dataset: str
    protocol: str  # the protocol that reproduces the figures, or "standard"
    figures: Tuple[PublishedFigure, ...]
    baselines: Tuple[PublishedFigure, ...] = ()


def _fail(path, where: str, message: str):
    raise PublishedFiguresError(f"{path}: {where}: {message}")


def _figure(path, where: str, entry, baseline: bool) -> PublishedFigure:
    if not isinstance(entry, Mapping):
        _fail(path, where, f"a figure is a mapping, got {entry!r}")
    required = ["name", "value", "unit", "table", "split"] + (["model"] if baseline else
                                                               ["metrics"])
    missing = [k for k in required if k not in entry]
    if missing:
        _fail(path, where, f"missing {', '.join(missing)}")
    known = set(required) | {"bound", "note", "metrics"}
    unknown = sorted(set(entry) - known)
    if unknown:
        _fail(path, where, f"unknown keys {unknown}")
    value = entry["value"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        _fail(path, where, f"value must be a number, got {value!r}")
    if entry["unit"] not in UNITS:
        _fail(path, where, f"unit must be one of {UNITS}, got {entry['unit']!r}")
    if entry["unit"] == "fraction" and not 0 <= value <= 1:
        _fail(path, where, f"a fraction lies in [0, 1], got {value}")
    if entry["split"] not in SPLITS:
        _fail(path, where, f"split must be one of {SPLITS}, got {entry['split']!r}")
    if entry.get("bound", "") not in ("", "lower"):
        _fail(path, where, f"bound must be 'lower' or absent, got {entry['bound']!r}")
    metrics = entry.get("metrics", [])
    if not baseline and (not isinstance(metrics, list) or not metrics):
        _fail(path, where, "metrics must be a non-empty list of '<task>/<metric>' keys")
    for key in metrics:
        if not isinstance(key, str) or "/" not in key:
            _fail(path, where, f"a metric is '<task>/<metric>', got {key!r}")
    return PublishedFigure(
        name=str(entry["name"]), value=float(value), unit=entry["unit"],
        table=str(entry["table"]), split=entry["split"], metrics=tuple(metrics),
        bound=entry.get("bound", ""), note=str(entry.get("note", "")),
        model=str(entry.get("model", "")),
    )


def load_published_figures(
    path: Union[str, Path, None] = None,
) -> "OrderedDict[str, PublishedSystem]":
    """Read and check the published figures (default: the file shipped with the package).

    Raises:
        PublishedFiguresError: an unreadable file or one that breaks the schema described in
            the file's header, naming the system and figure.
    """
    from .protocols import PROTOCOLS

    path = Path(path) if path is not None else FIGURES_FILE
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise PublishedFiguresError(f"{path}: cannot be read as YAML: {e}") from e
    if not isinstance(content, Mapping) or not isinstance(content.get("systems"), Mapping):
        _fail(path, "top level", "needs 'papers' and 'systems' mappings")
    papers = content.get("papers") or {}
    systems = OrderedDict()
    for name, entry in content["systems"].items():
        where = f"system {name!r}"
        if not isinstance(entry, Mapping):
            _fail(path, where, "must be a mapping")
        missing = [k for k in ("paper", "model", "dataset", "protocol", "figures")
                   if k not in entry]
        if missing:
            _fail(path, where, f"missing {', '.join(missing)}")
        paper = papers.get(entry["paper"])
        if not isinstance(paper, Mapping) or "file" not in paper or "title" not in paper:
            _fail(path, where, f"paper {entry['paper']!r} is not in 'papers' with file and title")
        if entry["protocol"] not in (*PROTOCOLS, _STANDARD):
            _fail(path, where, f"protocol must be one of {sorted(PROTOCOLS)} or "
                               f"'{_STANDARD}', got {entry['protocol']!r}")
        figures = entry["figures"]
        if not isinstance(figures, list) or not figures:
            _fail(path, where, "figures must be a non-empty list")
        baselines = entry.get("baselines", []) or []
        systems[name] = PublishedSystem(
            name=name, paper=entry["paper"], paper_file=paper["file"],
            paper_title=paper["title"], model=str(entry["model"]),
            dataset=str(entry["dataset"]), protocol=entry["protocol"],
            figures=tuple(_figure(path, f"{where} figure {i}", f, False)
                          for i, f in enumerate(figures)),
            baselines=tuple(_figure(path, f"{where} baseline {i}", f, True)
                            for i, f in enumerate(baselines)),
        )
    return systems


def published_system(name: str, path=None) -> PublishedSystem:
    """One system's figures; PublishedFiguresError naming the known systems if it is unknown."""
    systems = load_published_figures(path)
    if name not in systems:
        raise PublishedFiguresError(
            f"{path or FIGURES_FILE}: no system {name!r}; known: {', '.join(systems)}"
        )
    return systems[name]


def flatten_results(results: Mapping) -> Dict[str, float]:
    """``{task: {metric: value}}`` (the evaluators' results) -> ``{"task/metric": value}``;
    keys that already hold a "/" are kept."""
    flat = {}
    for key, value in results.items():
        if isinstance(value, Mapping):
            for metric, v in value.items():
                flat[f"{key}/{metric}"] = v
        else:
            flat[key] = value
    return flat


@dataclass(frozen=True)
class ComparisonRow:
    figure: PublishedFigure
    metric: str  # our results key
    paper: float  # the figure in our units
    ours: Optional[float]  # None: not measured in this run (or undefined)
    difference: Optional[float]  # ours - paper

    @property
    def source(self) -> str:
        return f"{self.figure.table}, {self.figure.split}"


def paper_vs_ours(
    system: PublishedSystem, results: Mapping, splits: Optional[Sequence[str]] = None
) -> List[ComparisonRow]:
    """One row per figure and per results key measuring it, in the file's order.

    Args:
        system: from :func:`load_published_figures`.
        results: ``{task: {metric: value}}`` or ``{"task/metric": value}``, our units.
        splits: keep the figures of these splits only (None: all).
    """
    flat = flatten_results(results)
    rows = []
    for figure in system.figures:
        if splits is not None and figure.split not in splits:
            continue
        for metric in figure.metrics:
            ours = flat.get(metric)
            if ours is None or (isinstance(ours, float) and math.isnan(ours)):
                ours = None
            paper = figure.ours_scale
            difference = None if ours is None else float(ours) - paper
            rows.append(ComparisonRow(figure, metric, paper, ours, difference))
    return rows


def _number(value: Optional[float], signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def comparison_cells(row: ComparisonRow) -> List[str]:
    """The row's texts: metric, paper's figure (source), ours, difference."""
    bound = "> " if row.figure.bound == "lower" else ""
    paper = f"{bound}{_number(row.paper)} ({row.source})"
    return [f"{row.figure.name} [{row.metric}]", paper, _number(row.ours),
            _number(row.difference, signed=True)]


def format_paper_vs_ours(system: PublishedSystem, rows: Sequence[ComparisonRow]) -> str:
    """A pipe table "metric | paper's figure (source) | ours | difference", headed by the paper
    and followed by the figures' notes."""
    lines = [f"{system.name}: {system.paper_title} ({system.paper_file}); rates in percent, "
             "differences = ours - paper; '–' = not measured in this run.\n"]
    lines.append(tabulate(
        [comparison_cells(r) for r in rows],
        headers=["metric", "paper's figure (source)", "ours", "difference"],
        tablefmt="pipe", disable_numparse=True,
    ))
    notes = list(OrderedDict.fromkeys(f"{r.figure.name}: {r.figure.note}" for r in rows
                                      if r.figure.note))
    if notes:
        lines.append("\n" + "\n".join(f"- {n}" for n in notes))
    return "".join(lines)
