"""One self-contained HTML report (Table 1 + figures) and optional PNG copies of the figures.

The report must open offline, years later, from an archive: plotly.js is embedded once, inline
(gzip-compressed: 2 MB instead of 4.8 MB; a page script decompresses it with the browser's
DecompressionStream), figures as JSON, and nothing is fetched. It is written atomically so a
crashed run never leaves half a report.
PNGs need a static exporter (kaleido, the `png` extra); without one they are skipped, not fatal.
"""

from __future__ import annotations

import base64
import gzip
import html
import json
import os
import re
import sys
from collections.abc import Mapping
from functools import cache
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from rl_circuits.analysis.method_ranking import method_table, method_verdicts
from rl_circuits.analysis.table1 import Table1, format_value
from rl_circuits.store.atomic import write_atomic

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


# Decompresses the embedded plotly.js (gzip, base64), runs it, then draws each figure from its
# JSON. Inlining plotly.js as text would add 4.8 MB to every report; compressed it is ~2 MB.
LOADER = """
(async function () {
  const packed = document.getElementById("plotlyjs-gzip").textContent;
  const bytes = Uint8Array.from(atob(packed), (c) => c.charCodeAt(0));
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  const code = document.createElement("script");
  code.text = await new Response(stream).text();
  document.head.appendChild(code);
  for (const data of document.querySelectorAll("script.figure-json")) {
    const figure = JSON.parse(data.textContent);
    Plotly.newPlot(data.dataset.target, figure.data, figure.layout, CONFIG);
  }
})().catch((error) => {
  document.body.insertAdjacentHTML("afterbegin",
    "<p><b>The figures cannot be drawn: this browser lacks DecompressionStream " +
    "(Chrome 80+, Firefox 113+, Safari 16.4+).</b></p>");
  console.error(error);
});
"""
FIGURE_CONFIG = {"displaylogo": False, "responsive": True}


@cache
def packed_plotlyjs() -> str:
    """plotly.js, gzip-compressed and base64-encoded (computed once per process)."""
    return base64.b64encode(gzip.compress(get_plotlyjs().encode(), 9, mtime=0)).decode()


def _script_json(value: str) -> str:
    """JSON safe inside a <script> element (no closing tag or comment opener)."""
    return value.replace("</", "<\\/").replace("<!--", "<\\!--")


def render_report(
    *,
    title: str,
    table: Table1 | None,
    figures: Mapping[str, go.Figure],
    notes: str = "",
    accuracy: pd.DataFrame | None = None,
    funnel: pd.DataFrame | None = None,
    skipped: Mapping[str, str] | None = None,
    tables: Mapping[str, pd.DataFrame] | None = None,
    links: Mapping[str, str] | None = None,
    methods: pd.DataFrame | None = None,
) -> str:
    """The report's HTML text: title, notes, Table 1 and its statistics in full, the cells
    without results, the selection funnel, the accuracy table, further `tables` (heading ->
    table), then each figure; `links` (label -> relative href) lists the pages beside the
    report (the circuit graph viewers)."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        f"<style>{STYLE}</style>",
        f'<script id="plotlyjs-gzip" type="application/octet-stream">{packed_plotlyjs()}</script>',
        "</head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    if notes:
        parts.append(f'<div class="notes">{e(notes)}</div>')
    if table is not None:
        parts += ["<h2>Table 1</h2>", table.to_html()]
        parts += [
            "<h2>Table 1 in full: sample size, intervals and p-values</h2>",
            table.details().to_html(index=False, classes="table1", escape=True),
        ]
    if skipped:
        items = "".join(
            f"<li>{e(key.replace('|', ', '))}: {e(why)}</li>" for key, why in skipped.items()
        )
        parts += ["<h2>Cells without results</h2>", f"<ul>{items}</ul>"]
    if funnel is not None and len(funnel):
        parts += [
            "<h2>Question selection: how many questions each filter removed</h2>",
            funnel.to_html(index=False, classes="table1"),
        ]
    if accuracy is not None and len(accuracy):
        parts += [
            "<h2>Accuracy per model and dataset</h2>",
            accuracy.to_html(index=False, classes="table1", float_format=lambda x: f"{x:.1f}"),
        ]
    for name, frame in (tables or {}).items():
        parts += [
            f"<h2>{e(name)}</h2>",
            frame.to_html(index=False, classes="table1", float_format=format_value),
        ]
    if links:
        items = "".join(
            f'<li><a href="{e(href)}">{e(label)}</a></li>' for label, href in links.items()
        )
        parts += ["<h2>Circuit graphs: each cell's top edges, drawn</h2>", f"<ul>{items}</ul>"]
    if methods is not None and len(methods):
        verdicts = "".join(f"<li>{e(v)}</li>" for v in method_verdicts(methods))
        cost = methods.groupby("method", sort=False)["seconds"].mean()
        parts += [
            "<h2>Attribution methods ranked by faithfulness (MIB's CPR and CMD)</h2>",
            method_table(methods).to_html(classes="table1"),
            f"<ul>{verdicts}</ul>",
            "<p>Seconds of attribution per question: "
            + e(", ".join(f"{m} {v:.3g}" for m, v in cost.items()))
            + ". relp gives query and key inputs no relevance: they are not scored, which does "
            "not make them unimportant.</p>",
        ]
    for i, (name, figure) in enumerate(figures.items()):
        target = f"figure-{i}-{_slug(name)}"
        parts += [
            f"<h2>{e(name)}</h2>",
            f'<div id="{target}" class="figure"></div>',
            f'<script type="application/json" class="figure-json" data-target="{target}">'
            f"{_script_json(figure.to_json())}</script>",
        ]
    loader = LOADER.replace("CONFIG", json.dumps(FIGURE_CONFIG))
    parts += [f"<script>{loader}</script>", "</body></html>"]
    return "\n".join(parts) + "\n"


def write_report(
    path: str | os.PathLike,
    *,
    title: str,
    table: Table1 | None,
    figures: Mapping[str, go.Figure],
    notes: str = "",
    **sections,
) -> Path:
    """Write the self-contained report to `path` atomically (`store.atomic.write_atomic`);
    `sections` are render_report's optional tables (accuracy, funnel, skipped, tables)."""
    text = render_report(title=title, table=table, figures=figures, notes=notes, **sections)
    return write_atomic(path, text)


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
