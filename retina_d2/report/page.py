"""The report as one HTML page: inline style, no script, pictures linked by relative path, so it
opens from disk in any browser and can be zipped or mailed with its folder."""
import datetime
import html
import json
from typing import List, Optional, Sequence, Tuple

from .tables import Cell, Table, format_value

__all__ = ["render_page"]

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0 1.6em; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
caption { text-align: left; font-weight: 600; padding: .3em 0; }
p.note { color: #555; font-size: .85em; margin-top: -1.2em; }
.figures, .gallery { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
.figures figure { width: 31%; } .gallery figure { width: 48%; }
figcaption { font-size: .85em; color: #444; }
.key span { display: inline-block; width: 1em; height: 1em; vertical-align: middle;
            margin: 0 .3em 0 1em; }
pre { background: #f7f7f7; padding: 1em; overflow: auto; font-size: .8em; max-height: 30em; }
"""


def _cell(item) -> str:
    if isinstance(item, Cell):
        value = "null" if item.value is None else json.dumps(item.value)
        return (
            f'<td class="num" data-source="{html.escape(item.source)}" '
            f'data-path="{html.escape(json.dumps(list(item.path)))}" data-scale="{item.scale:g}" '
            f'data-value="{html.escape(value)}">{html.escape(format_value(item.value))}</td>'
        )
    return f"<td>{html.escape(str(item))}</td>"


def _table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in table.rows)
    note = f'<p class="note">{html.escape(table.note)}</p>' if table.note else ""
    return (
        f'<table><caption>{html.escape(table.title)}</caption><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table>{note}"
    )


def _figures(figures: Sequence[Tuple[str, str]], css_class: str = "figures") -> str:
    items = "".join(
        f'<figure><img src="{html.escape(path)}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for path, caption in figures
    )
    return f'<div class="{css_class}">{items}</div>'


def render_page(
    *,
    title: str,
    eval_dir: str,
    sections: Sequence[Tuple[str, List[Table], List[Tuple[str, str]]]],
    worst: Sequence[Tuple[str, str]] = (),
    best: Sequence[Tuple[str, str]] = (),
    colours: Optional[dict] = None,
    gallery_note: str = "",
    config_text: Optional[str] = None,
    env_text: Optional[str] = None,
) -> str:
    """The whole page.

    Args:
        sections: (heading, tables, figures) in order; figures are (relative path, caption).
        worst, best: gallery pictures, (relative path, caption).
        colours: outline name -> RGB, for the gallery's key.
    """
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Evaluation folder <code>{html.escape(eval_dir)}</code>; report written "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}.</p>",
    ]
    for heading, tables, figures in sections:
        parts.append(f"<section><h2>{html.escape(heading)}</h2>")
        parts += [_table(t) for t in tables]
        if figures:
            parts.append(_figures(figures))
        parts.append("</section>")
    if worst or best or gallery_note:
        parts.append('<section id="gallery"><h2>Images</h2>')
        if colours:
            key = "".join(
                f'<span style="background: rgb{tuple(rgb)}"></span>{html.escape(name)}'
                for name, rgb in colours.items()
            )
            parts.append(f'<p class="key">Outlines:{key}</p>')
        if gallery_note:
            parts.append(f'<p class="note">{html.escape(gallery_note)}</p>')
        if worst:
            parts.append("<h3>Worst</h3>" + _figures(worst, "gallery"))
        if best:
            parts.append("<h3>Best</h3>" + _figures(best, "gallery"))
        parts.append("</section>")
    if config_text is not None or env_text is not None:
        parts.append("<section><h2>What produced these numbers</h2>")
        if config_text is not None:
            parts.append(f"<h3>Config</h3><pre>{html.escape(config_text)}</pre>")
        if env_text is not None:
            parts.append(f"<h3>Environment</h3><pre>{html.escape(env_text)}</pre>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)
