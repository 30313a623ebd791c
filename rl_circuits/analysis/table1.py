"""The paper's Table 1: its type (`Table1`: Markdown, LaTeX, HTML, the per-cell details) and
how `compare` rows are laid out in it (`table1_from_rows`), with the paper's number format and
row labels. `rl_circuits.analysis.stats` computes the rows and re-exports these names.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import pandas as pd

from rl_circuits.analysis.metrics import METRICS

__all__ = [
    "METRIC_LABELS",
    "MIN_PAIRED_N",
    "MISSING",
    "NO_INTERVAL",
    "Table1",
    "direction",
    "format_value",
    "metric_label",
    "table1_from_rows",
]

MIN_PAIRED_N = 20
"""Fewest paired questions for which `compare`'s two tests are trusted: below it the percentile
bootstrap interval is too narrow (it undercovers) and the permutation test has few distinct
sign flips (2^n; at n = 4 no two-sided p below 0.125 exists). Smaller n warns (docs/metrics.md)."""

METRIC_LABELS: Mapping[str, str] = MappingProxyType(
    {
        "activation_intensity": "Act. Intens.",
        "information_complexity": "Info. Complex.",
        "distribution_kurtosis": "Dist. Kurt.",
        "sample_diversity": "Sample Div.",
    }
)
"""Row labels of Table 1, as the paper abbreviates them."""


def metric_label(metric: str) -> str:
    """A metric's row label: the paper's abbreviation, "Circuit size (f≥0.8)", or its name."""
    if metric.startswith("circuit_size_") and metric[13:].isdigit():
        return f"Circuit size (f≥{int(metric[13:]) / 100:g})"
    gap = re.fullmatch(r"gap_edges_(\d+)_(\w+)_into_(\w+)", metric)
    if gap:  # `analysis.diff.gap_metric`: one count per pair, in the after column
        return f"Edges for {gap[1]}% of the gap ({gap[2]}→{gap[3]})"
    return METRIC_LABELS.get(metric, metric)


def direction(diff: float) -> str:
    """The sign of a difference after - before as a word: "up", "down" or "flat" (the table's
    ↑/↓/→ marker)."""
    return "up" if diff > 0 else "down" if diff < 0 else "flat"


def format_value(x: float) -> str:
    """The paper's number format: 2.29e-3, 3.93e+2 (NaN as "nan")."""
    if x is None or not np.isfinite(x):
        return "nan" if x is None or np.isnan(x) else str(x)
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa}e{int(exponent):+d}"


_ARROWS = {"up": "↑", "down": "↓", "flat": "→"}
_TEX = {
    "\\": r"\textbackslash{}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    **{char: "\\" + char for char in "&%$#_{}"},
    "↑": r"$\uparrow$",
    "↓": r"$\downarrow$",
    "→": r"$\rightarrow$",
    "†": r"\textdagger{}",
    "α": r"$\alpha$",
    "−": "$-$",
}
_REQUIRED = ("pair", "algorithm", "dataset", "alpha", "metric", "before", "after")
MISSING = "-"
NO_INTERVAL = "†"


def _tex(text: str) -> str:
    """Text escaped for LaTeX, the markers as math arrows."""
    return "".join(_TEX.get(char, char) for char in text)


@dataclass(frozen=True)
class Table1:
    """Table 1: rows dataset x metric x alpha, columns pair x (before, +algorithm).

    `frame` holds the display strings (after values carry a marker: ↑/↓ for the direction of
    change, * when the bootstrap interval of the difference excludes 0, † when there is no
    interval: the reason is in `note` and `details`); `numbers` the same cells as floats with
    columns (pair, before|after); `rows` the long input records.
    """

    frame: pd.DataFrame
    numbers: pd.DataFrame
    rows: pd.DataFrame
    note: str

    def _body(self) -> list[tuple[tuple[str, str, str], list[str]]]:
        """Rows as (dataset, metric, alpha) labels, repeated labels blanked, and their cells."""
        out, previous = [], (None, None)
        for (dataset, metric, alpha), cells in self.frame.iterrows():
            labels = (
                dataset if dataset != previous[0] else "",
                metric if (dataset, metric) != previous else "",
                f"{alpha:g}",
            )
            previous = (dataset, metric)
            out.append((labels, [str(c) for c in cells]))
        return out

    def to_markdown(self) -> str:
        """A GitHub-flavoured Markdown table, then the marker legend."""

        def cell(text: str) -> str:
            return text.replace("|", r"\|")

        header = ["Dataset", "Metric", "α"] + [f"{p} · {m}" for p, m in self.frame.columns]
        lines = [
            "| " + " | ".join(cell(h) for h in header) + " |",
            "|" + "|".join([" --- "] * 3 + [" ---: "] * (len(header) - 3)) + "|",
        ]
        for labels, cells in self._body():
            lines.append("| " + " | ".join(cell(c) for c in [*labels, *cells]) + " |")
        return "\n".join(lines) + f"\n\n{self.note}\n"

    def to_latex(self, caption: str | None = None, label: str = "tab:table1") -> str:
        """A booktabs `table` (needs \\usepackage{booktabs}); the legend goes in the caption."""

        pairs = list(dict.fromkeys(p for p, _ in self.frame.columns))
        top = ["Dataset", "Metric", _tex("α")]
        top += [f"\\multicolumn{{2}}{{c}}{{{_tex(p)}}}" for p in pairs]
        rules = " ".join(f"\\cmidrule(lr){{{4 + 2 * i}-{5 + 2 * i}}}" for i in range(len(pairs)))
        second = ["", "", ""] + [_tex(m) for _, m in self.frame.columns]
        lines = [
            "\\begin{table}[t]",
            "\\centering",
            f"\\caption{{{_tex(caption or self.note)}}}",
            f"\\label{{{label}}}",
            f"\\begin{{tabular}}{{lll{'rr' * len(pairs)}}}",
            "\\toprule",
            " & ".join(top) + " \\\\",
            rules,
            " & ".join(second) + " \\\\",
            "\\midrule",
        ]
        for i, (labels, cells) in enumerate(self._body()):
            if labels[0] and i > 0:
                lines.append("\\midrule")
            lines.append(" & ".join(_tex(c) for c in [*labels, *cells]) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
        return "\n".join(lines) + "\n"

    def details(self) -> pd.DataFrame:
        """One row per cell with what the compact table leaves out: n, both values, the
        difference with its bootstrap interval, and the permutation p-value (display strings)."""
        long = self.rows
        out = pd.DataFrame(
            {
                "dataset": long["dataset"],
                "metric": [metric_label(m) for m in long["metric"]],
                "α": [f"{float(a):g}" for a in long["alpha"]],
                "pair": long["pair"],
            }
        )
        if "n" in long:
            out["n"] = [str(int(n)) if pd.notna(n) else MISSING for n in long["n"]]
        out["before"] = [format_value(float(v)) for v in long["before"]]
        out["after"] = [format_value(float(v)) for v in long["after"]]
        diff = long["diff"] if "diff" in long else long["after"] - long["before"]
        out["after − before"] = [format_value(float(v)) for v in diff]
        if "ci_low" in long and "ci_high" in long:
            level = f"{float(long['ci'].dropna().iloc[0]):.0%} " if "ci" in long else ""
            out[f"{level}interval"] = [
                f"[{format_value(float(r['ci_low']))}, {format_value(float(r['ci_high']))}]"
                if pd.notna(r["ci_low"])
                else f"none: {_interval_reason(r)}"
                for r in long.to_dict("records")
            ]
        if "p_value" in long:
            out["p"] = [f"{float(p):.3g}" if pd.notna(p) else MISSING for p in long["p_value"]]
        return out.sort_values(["dataset", "metric", "α", "pair"], kind="stable").reset_index(
            drop=True
        )

    def _repr_html_(self) -> str:
        """Notebooks show the table as HTML (the same as the report's)."""
        return self.to_html()

    def to_html(self) -> str:
        """A plain HTML table (class "table1") with a two-row header and the legend as caption."""
        e = html.escape
        pairs = list(dict.fromkeys(p for p, _ in self.frame.columns))
        head_top = "".join(f'<th colspan="2">{e(p)}</th>' for p in pairs)
        head_second = "".join(f"<th>{e(m)}</th>" for _, m in self.frame.columns)
        body = []
        for labels, cells in self._body():
            tds = "".join(f"<th>{e(c)}</th>" for c in labels)
            tds += "".join(f"<td>{e(c)}</td>" for c in cells)
            body.append(f"<tr>{tds}</tr>")
        return (
            '<table class="table1">'
            f"<caption>{e(self.note)}</caption>"
            "<thead>"
            f'<tr><th rowspan="2">Dataset</th><th rowspan="2">Metric</th>'
            f'<th rowspan="2">α</th>{head_top}</tr>'
            f"<tr>{head_second}</tr>"
            "</thead>"
            f"<tbody>{''.join(body)}</tbody>"
            "</table>"
        )


def _missing(value: object) -> bool:
    return value is None or bool(pd.isna(value))


def _interval_reason(record: Mapping) -> str:
    """Why a row (a `compare` record) has no interval of its difference; "" when it has one or
    carries no interval at all (rows without `ci_low`)."""
    if "ci_low" not in record or not _missing(record["ci_low"]):
        return ""
    note = record.get("ci_note")
    if isinstance(note, str) and note.startswith("no interval"):
        return note.removeprefix("no interval: ")
    for role in ("before", "after"):
        if _missing(record[role]) or not np.isfinite(float(record[role])):
            return f"the {role} value is undefined"
    return "no bootstrap resample gave a value"


def _after_cell(record: Mapping) -> str:
    """The after value with its marker, e.g. "2.64e-3 ↑*" ("†": no interval)."""
    diff = record.get("diff")
    if _missing(diff):
        diff = record["after"] - record["before"]
    marker = _ARROWS[direction(diff)] if np.isfinite(diff) else ""
    significant = record.get("significant")
    if not _missing(significant) and bool(significant):
        marker += "*"
    if _interval_reason(record):
        marker += NO_INTERVAL
    return f"{format_value(record['after'])} {marker}".rstrip()


def _small_n_note(long: pd.DataFrame) -> str:
    """The legend's warning naming the pair x dataset cells with fewer than MIN_PAIRED_N."""
    if "n" not in long.columns:
        return ""
    small = long[long["n"].notna() & (long["n"] < MIN_PAIRED_N)]
    cells = dict.fromkeys(
        f"{pair}, {dataset}: n = {int(n)}"
        for pair, dataset, n in zip(small["pair"], small["dataset"], small["n"], strict=True)
    )
    if not cells:
        return ""
    return (
        f" Warning: fewer than {MIN_PAIRED_N} paired questions ({'; '.join(cells)}): "
        "there neither the bootstrap interval nor the permutation p-value is reliable."
    )


def _no_interval_note(long: pd.DataFrame) -> str:
    """The legend's line for "†": each distinct reason why a cell has no interval."""
    reasons = dict.fromkeys(r for r in map(_interval_reason, long.to_dict("records")) if r)
    if not reasons:
        return ""
    return f" {NO_INTERVAL}: no interval of the difference: {'; '.join(reasons)}."


def table1_from_rows(
    rows: Iterable[Mapping] | pd.DataFrame,
    *,
    metrics: Sequence[str] | None = None,
    before_label: str = "before",
) -> Table1:
    """Lay `compare` rows (plus pair, algorithm, dataset, alpha) out as the paper's Table 1.

    Datasets and pairs keep their first-seen order, metrics follow `metrics` (default: `METRICS`
    order, then first-seen; given, only those), alphas ascend; absent cells read "-". Each
    pair's after column is headed "+<algorithm>".
    """
    long = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    missing = [key for key in _REQUIRED if key not in long.columns]
    if missing:
        raise ValueError(
            f"table1_from_rows: rows lack {missing}; each row needs {', '.join(_REQUIRED)}"
        )
    if metrics is not None:
        long = long[long["metric"].isin(list(metrics))].reset_index(drop=True)
    if long.empty:
        raise ValueError("table1_from_rows got no rows to lay out")
    key = ["dataset", "metric", "alpha", "pair"]
    duplicated = long.duplicated(subset=key)
    if duplicated.any():
        raise ValueError(
            f"table1_from_rows got two rows for {tuple(long.loc[duplicated, key].iloc[0])}"
        )

    datasets = list(dict.fromkeys(long["dataset"]))
    pairs = list(dict.fromkeys(long["pair"]))
    seen = list(dict.fromkeys(long["metric"]))
    order = list(METRICS) if metrics is None else list(metrics)
    metrics = [m for m in order if m in seen] + [m for m in seen if m not in order]
    algorithms = {p: str(long.loc[long["pair"] == p, "algorithm"].iloc[0]) for p in pairs}

    present = set(zip(long["dataset"], long["metric"], long["alpha"], strict=True))
    index_rows = [
        (d, metric_label(m), float(a))
        for d in datasets
        for m in metrics
        for a in sorted({float(x) for (dd, mm, x) in present if (dd, mm) == (d, m)})
    ]
    index = pd.MultiIndex.from_tuples(index_rows, names=["dataset", "metric", "alpha"])
    shown = pd.MultiIndex.from_tuples(
        [(p, label) for p in pairs for label in (before_label, f"+{algorithms[p]}")],
        names=["pair", "model"],
    )
    raw = pd.MultiIndex.from_tuples(
        [(p, role) for p in pairs for role in ("before", "after")], names=["pair", "model"]
    )
    text: dict[tuple, str] = {}
    value: dict[tuple, float] = {}
    for record in long.to_dict("records"):
        metric, pair = record["metric"], record["pair"]
        row = (record["dataset"], metric_label(metric), float(record["alpha"]))
        value[row, (pair, "before")] = float(record["before"])
        value[row, (pair, "after")] = float(record["after"])
        one_value = metric.startswith("gap_edges_")  # no before value: shown as MISSING
        text[row, (pair, before_label)] = (
            MISSING if one_value else format_value(float(record["before"]))
        )
        text[row, (pair, f"+{algorithms[pair]}")] = _after_cell(record)
    frame = pd.DataFrame(
        [[text.get((row, col), MISSING) for col in shown] for row in index_rows],
        index=index,
        columns=shown,
        dtype=object,
    )
    numbers = pd.DataFrame(
        [[value.get((row, col), np.nan) for col in raw] for row in index_rows],
        index=index,
        columns=raw,
        dtype=float,
    )

    levels = sorted({float(c) for c in long["ci"].dropna()}) if "ci" in long.columns else []
    level = f"{levels[0]:.0%} " if len(levels) == 1 else ""
    note = (
        "↑/↓/→: after − before is positive/negative/zero; "
        f"*: the {level}paired bootstrap interval of the difference excludes 0 (the star is the "
        "bootstrap's; the paired permutation p-value, a second test, is listed with the "
        "intervals and can disagree near the boundary)."
        + _no_interval_note(long)
        + _small_n_note(long)
    )
    return Table1(frame=frame, numbers=numbers, rows=long, note=note)
