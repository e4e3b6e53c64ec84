"""The report as one HTML page: inline style, no script, pictures linked by relative path, so it
opens from disk in any browser and can be zipped or mailed with its folder.

The page is rendered by Jinja2 from ``templates/`` (shipped as package data), autoescaped: a
dataset name, caption, config or environment text holding ``<script>`` is shown as text. This
module only turns the report's tables and pictures into plain values for the templates.
"""
import datetime
import json
from typing import List, Mapping, Optional, Sequence, Tuple

import jinja2

from ..schema import EVAL_INFO_FILE
from .tables import Cell, Table, format_value

__all__ = ["GalleryItem", "render_page"]

_ENVIRONMENT = jinja2.Environment(
    loader=jinja2.PackageLoader("retina_d2.report", "templates"),
    autoescape=True,  # every value is text; nothing a caller passes becomes markup
    undefined=jinja2.StrictUndefined,  # a misspelt name is an error, not an empty string
    keep_trailing_newline=True,
)


class GalleryItem(dict):
    """One gallery picture: ``thumb`` and ``full`` (relative paths of the thumbnail and the
    full-resolution view), ``caption`` and ``image_id``."""

    def __init__(self, thumb: str, full: str, caption: str, image_id=""):
        super().__init__(thumb=thumb, full=full, caption=caption, image_id=str(image_id))


def _cell(item) -> dict:
    if isinstance(item, Cell):
        return {
            "number": True,
            "source": item.source,
            "path": json.dumps(list(item.path)),
            "scale": f"{item.scale:g}",
            "value": "null" if item.value is None else json.dumps(item.value),
            "text": format_value(item.value),
        }
    return {"number": False, "text": str(item)}


def _table(table: Table) -> dict:
    return {
        "title": table.title,
        "columns": list(table.columns),
        "rows": [[_cell(c) for c in row] for row in table.rows],
        "note": table.note,
    }


def render_page(
    *,
    title: str,
    eval_dir: str,
    sections: Sequence[Tuple[str, List[Table], List[Tuple[str, str]]]],
    gallery_groups: Sequence[Mapping] = (),
    colours: Optional[dict] = None,
    gallery_note: str = "",
    model: Optional[Mapping] = None,
    eval_info_name: str = EVAL_INFO_FILE,
    config_text: Optional[str] = None,
    env_text: Optional[str] = None,
) -> str:
    """The whole page.

    Args:
        sections: (heading, tables, figures) in order; figures are (relative path, caption).
        gallery_groups: ``{"id", "heading", "pictures": [GalleryItem], "empty"}`` in order
            (``empty``: the line shown when a group has no picture).
        colours: outline name -> RGB, for the gallery's key.
        model: the scored model (``eval_info.json``'s ``model``: weights, iteration,
            during_training); None when the evaluation did not record it.
    """
    gallery = None
    if gallery_groups or gallery_note:
        gallery = {
            "colours": colours or {},
            "note": gallery_note,
            "groups": [dict(g) for g in gallery_groups],
        }
    return _ENVIRONMENT.get_template("report.html.j2").render(
        title=title,
        eval_dir=eval_dir,
        written=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        model=model,
        eval_info_name=eval_info_name,
        sections=[
            {"heading": heading, "tables": [_table(t) for t in tables], "figures": list(figures)}
            for heading, tables, figures in sections
        ],
        gallery=gallery,
        config_text=config_text,
        env_text=env_text,
    )
