"""One self-contained HTML report (Table 1 + figures) and optional PNG copies of the figures.

The report must open offline, years later, from an archive: plotly.js is embedded once, inline,
and nothing is fetched. It is written atomically so a crashed run never leaves half a report.
PNGs need a static exporter (kaleido, the `png` extra); without one they are skipped, not fatal.
"""

from __future__ import annotations

import html
import os
import re
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from rl_circuits.stats import Table1

__all__ = ["png_images", "render_report", "write_report"]

STYLE = """
body { font-family: system-ui, sans-serif; color: #222; }
body { margin: 0 auto; padding: 1em 2em; max-width: 1400px; }
table.table1 { border-collapse: collapse; font-size: 0.85em; margin: 1em 0; }
table.table1 th, table.table1 td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
table.table1 td { text-align: right; font-variant-numeric: tabular-nums; }
table.table1 caption { caption-side: bottom; text-align: left; color: #555; padding-top: 0.4em; }
.notes { white-space: pre-wrap; }
"""


def _slug(name: str) -> str:
    """A file- and id-safe version of a figure name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "figure"


def render_report(
    *,
    title: str,
    table: Table1 | None,
    figures: Mapping[str, go.Figure],
    notes: str = "",
    accuracy: pd.DataFrame | None = None,
) -> str:
    """The report's HTML text: title, notes, Table 1, the accuracy table, then each figure."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        f"<style>{STYLE}</style>",
        f'<script type="text/javascript">{get_plotlyjs()}</script>',
        "</head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    if notes:
        parts.append(f'<div class="notes">{e(notes)}</div>')
    if table is not None:
        parts += ["<h2>Table 1</h2>", table.to_html()]
    if accuracy is not None and len(accuracy):
        parts += [
            "<h2>Accuracy per model and dataset</h2>",
            accuracy.to_html(index=False, classes="table1", float_format=lambda x: f"{x:.1f}"),
        ]
    for i, (name, figure) in enumerate(figures.items()):
        div = figure.to_html(
            full_html=False,
            include_plotlyjs=False,
            include_mathjax=False,
            div_id=f"figure-{i}-{_slug(name)}",
            config={"displaylogo": False, "responsive": True},
        )
        parts += [f"<h2>{e(name)}</h2>", div]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(
    path: str | os.PathLike,
    *,
    title: str,
    table: Table1 | None,
    figures: Mapping[str, go.Figure],
    notes: str = "",
) -> Path:
    """Write the self-contained report to `path` atomically (temp file, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = render_report(title=title, table=table, figures=figures, notes=notes)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def png_images(figures: Mapping[str, go.Figure]) -> dict[str, bytes]:
    """`<slug>.png` -> PNG bytes per figure if kaleido works; else {} and a one-line notice."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        print(
            "PNG export skipped: kaleido is not installed (pip install 'rl-circuits[png]'); "
            "the HTML report has every figure.",
            file=sys.stderr,
        )
        return {}
    images = {}
    for name, figure in figures.items():
        try:
            images[f"{_slug(name)}.png"] = figure.to_image(format="png")
        except Exception as error:  # kaleido present but unusable (e.g. no Chrome for kaleido 1)
            print(f"PNG export stopped: {type(error).__name__}: {error}", file=sys.stderr)
            break
    return images
