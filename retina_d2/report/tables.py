"""Metric JSON files -> tables of labelled cells, ready for the page.

Every metrics file the evaluators write is ``{task: {metric: value}}`` (instance_metrics.json:
bbox / segm in percent, semantic_metrics.json: sem_seg in percent, later grading and localization
files alike), with per-lesion metrics named ``<metric>-<lesion>``. froc.json is the one richer
file (fractions, curves) and has its own table. A cell keeps the JSON key and value it shows, so
a test can read the numbers back out of the rendered page and compare them with the file.
"""
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from ..schema import FROC_FILE, FROC_MATCH

__all__ = ["Cell", "Table", "metric_tables", "froc_tables", "format_value"]


@dataclass
class Cell:
    """One number of a metrics file: the file (``source``), the keys leading to it in the file's
    JSON (``path``), and the value shown, which is the file's times ``scale``."""

    value: Optional[float]
    source: str = ""
    path: Tuple[str, ...] = ()
    scale: float = 1.0


@dataclass
class Table:
    title: str
    columns: List[str]
    rows: List[List[object]] = field(default_factory=list)  # first entry a label, then Cells
    note: str = ""


def format_value(value) -> str:
    """Two decimals; an undefined metric (no ground truth) shows as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (int, float)):
        return f"{value:.2f}"
    return str(value)


def _split_per_lesion(metrics: Mapping[str, float], lesions: Sequence[str]):
    """(headline metrics, metric -> lesion -> value) of one task's flat dict."""
    headline: Dict[str, float] = OrderedDict()
    per_lesion: Dict[str, Dict[str, float]] = OrderedDict()
    # Longest lesion names first: "other bright lesion" must not be read as "lesion".
    by_length = sorted(lesions, key=len, reverse=True)
    for key, value in metrics.items():
        lesion = next((name for name in by_length if key.endswith(f"-{name}")), None)
        if lesion is None:
            headline[key] = value
        else:
            per_lesion.setdefault(key[: -len(lesion) - 1], OrderedDict())[lesion] = value
    return headline, per_lesion


def _size_breakdown(headline: Mapping[str, float]):
    """COCO's size ranges (``APs``, ``AP35m`` ...) apart from the rest."""
    sizes = OrderedDict()
    rest = OrderedDict()
    for key, value in headline.items():
        if key[-1:] in "sml" and key[:-1] and key[:2] in ("AP", "AR") and (
            key[2:-1] == "" or key[2:-1].isdigit()
        ):
            sizes[key] = value
        else:
            rest[key] = value
    return rest, sizes


def metric_tables(
    source: str, metrics: Mapping[str, Mapping[str, float]], lesions: Sequence[str]
) -> List[Table]:
    """The tables of one ``{task: {metric: value}}`` file: headline metrics (one row per task),
    COCO size ranges when present, and one per-lesion table per task."""
    tables: List[Table] = []
    headline_rows, size_rows, lesion_tables = [], [], []
    headline_columns: List[str] = []
    size_columns: List[str] = []
    for task, values in metrics.items():
        if not isinstance(values, Mapping):
            continue
        headline, per_lesion = _split_per_lesion(values, lesions)
        headline, sizes = _size_breakdown(headline)
        for key in headline:
            if key not in headline_columns:
                headline_columns.append(key)
        for key in sizes:
            if key not in size_columns:
                size_columns.append(key)
        headline_rows.append((task, headline))
        if sizes:
            size_rows.append((task, sizes))
        if per_lesion:
            names = [n for n in lesions if any(n in v for v in per_lesion.values())]
            table = Table(f"{task}: per lesion", ["lesion"] + list(per_lesion))
            for name in names:
                table.rows.append([name] + [
                    Cell(per_lesion[m][name], source, (task, f"{m}-{name}"))
                    if name in per_lesion[m] else ""
                    for m in per_lesion
                ])
            lesion_tables.append(table)
    if headline_rows:
        table = Table(f"{source}", ["task"] + headline_columns)
        for task, headline in headline_rows:
            table.rows.append([task] + [
                Cell(headline[c], source, (task, c)) if c in headline else ""
                for c in headline_columns
            ])
        tables.append(table)
    if size_rows:
        table = Table(
            f"{source}: by lesion size (COCO small / medium / large)", ["task"] + size_columns
        )
        for task, sizes in size_rows:
            table.rows.append([task] + [
                Cell(sizes[c], source, (task, c)) if c in sizes else "" for c in size_columns
            ])
        tables.append(table)
    return tables + lesion_tables


def froc_tables(froc: Mapping, source: str = FROC_FILE) -> List[Table]:
    """Sensitivity at each FP rate, the FROC score and lesion P / R / F1, per lesion type and
    their mean, in percent (froc.json stores fractions)."""
    params = froc.get("params", {})
    rates = list(froc.get("mean", {}).get("sensitivity_at", {}))
    columns = ["lesion", "lesions", "FROC"] + [f"sens@{r}" for r in rates]
    columns += ["precision", "recall", "F1"]
    match = params.get("match", FROC_MATCH)
    rule = (
        f"mask IoU ≥ {params.get('iou_threshold')}"
        if match == "iou"
        else "centre inside the lesion"
    )
    note = (
        f"A prediction hits a lesion when {rule}; each lesion counts once. Precision, recall and "
        f"F1 at score ≥ {params.get('score_threshold')}. Percent."
    )
    table = Table("Lesion-level FROC and F1", columns, note=note)

    def row(label, entry, prefix, lesions=""):
        cells = [label, lesions, Cell(_percent(entry.get("froc")), source, prefix + ("froc",), 100)]
        for rate in rates:
            value = entry.get("sensitivity_at", {}).get(rate)
            cells.append(Cell(_percent(value), source, prefix + ("sensitivity_at", rate), 100))
        for name in ("precision", "recall", "f1"):
            cells.append(Cell(_percent(entry.get(name)), source, prefix + (name,), 100))
        return cells

    for name, entry in froc.get("categories", {}).items():
        if entry.get("num_lesions", 0) > 0:
            table.rows.append(row(name, entry, ("categories", name), entry["num_lesions"]))
    if "mean" in froc:
        table.rows.append(row("mean", froc["mean"], ("mean",)))
    return [table]


def _percent(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return 100.0 * value
