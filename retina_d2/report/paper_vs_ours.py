"""The report's "paper vs ours" section: the published figures of the run's system
(``RETINA.EVAL.PUBLISHED_SYSTEM`` in the run's config.yaml) beside what the evaluators measured,
one row per figure and per results key measuring it (the paper's protocol first, then the
toolkit's standard reading), with the difference.

The evaluation folder's name says the split (``<dataset>_test`` -> the paper's test figures,
``_val``, ``_train``); a folder named otherwise is compared with every split's figures.
"""
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple

import yaml

from ..evaluation.published import (
    PublishedFiguresError,
    comparison_cells,
    paper_vs_ours,
    published_system,
)
from ..schema import FROC_FILE
from .tables import Cell, Table

__all__ = ["paper_vs_ours_section", "published_system_of", "splits_of"]

HEADING = "Paper vs ours"
_SPLIT_SUFFIXES = {"_test": "test", "_val": "val", "_train": "train"}


def published_system_of(config: Optional[Path]) -> str:
    """``RETINA.EVAL.PUBLISHED_SYSTEM`` of a run's config.yaml ("" without one)."""
    if config is None:
        return ""
    try:
        content = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return ""  # the config's own section reports an unreadable file
    retina = content.get("RETINA") if isinstance(content, dict) else None
    evaluation = retina.get("EVAL") if isinstance(retina, dict) else None
    if not isinstance(evaluation, dict):
        return ""
    return str(evaluation.get("PUBLISHED_SYSTEM") or "")


def splits_of(eval_dir: Path) -> Optional[Sequence[str]]:
    """The split an evaluation folder holds, from its dataset name; None when it does not say."""
    for suffix, split in _SPLIT_SUFFIXES.items():
        if eval_dir.name.endswith(suffix):
            return [split]
    return None


def paper_vs_ours_section(
    eval_dir: Path, loaded: Mapping[str, Mapping], config: Optional[Path]
) -> Optional[Tuple[str, List[Table], list]]:
    """The section (heading, tables, figures), or None when the run names no published system.

    Args:
        eval_dir: the evaluation folder.
        loaded: metrics file name -> its ``{task: {metric: value}}`` content.
        config: the run's config.yaml, if found.

    Raises:
        ReportError: the config names a system the published figures do not have.
    """
    name = published_system_of(config)
    if not name:
        return None
    try:
        system = published_system(name)
    except PublishedFiguresError as e:
        from .build import ReportError

        raise ReportError(f"{config}: RETINA.EVAL.PUBLISHED_SYSTEM: {e}") from e
    results, source_of = {}, {}
    for file_name, content in loaded.items():
        if file_name == FROC_FILE:  # curves and parameters, not {task: {metric: value}}
            continue
        for task, values in content.items():
            if isinstance(values, Mapping):
                results[task] = values
                source_of[task] = file_name
    splits = splits_of(eval_dir)
    rows = paper_vs_ours(system, results, splits)
    table = Table(
        f"{system.name}: {system.model}",
        ["metric", "paper's figure (source)", "ours", "difference"],
        note=_note(system, splits, rows),
    )
    for row in rows:
        label, paper, _, difference = comparison_cells(row)
        task, metric = row.metric.split("/", 1)
        ours = Cell(row.ours, source_of[task], (task, metric)) if row.ours is not None else "–"
        table.rows.append([label, paper, ours, difference])
    tables = [table]
    baselines = [b for b in system.baselines if splits is None or b.split in splits]
    if baselines:
        context = Table(f"{system.name}: the paper's baselines (context, not compared)",
                        ["model", "figure", "paper's value (source)"])
        for b in baselines:
            context.rows.append([b.model, b.name, f"{b.ours_scale:.2f} ({b.table}, {b.split})"])
        tables.append(context)
    return HEADING, tables, []


def _note(system, splits, rows) -> str:
    where = f"{', '.join(splits)} split" if splits else "every split (the folder name gives none)"
    notes = {f"{r.figure.name}: {r.figure.note}" for r in rows if r.figure.note}
    return (
        f"{system.paper_title} ({system.paper_file}); {system.dataset}. Figures of the {where}; "
        f"rates in percent; difference = ours - paper; '–' = not measured by this run. "
        + " ".join(sorted(notes))
    )
