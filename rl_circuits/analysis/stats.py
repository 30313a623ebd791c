"""Paired before/after statistics of the metrics, and the paper's Table 1.

The paper reports each metric before and after post-training with no uncertainty. Here both
models are scored on the same questions, so `compare` adds a paired bootstrap confidence
interval of each difference (questions resampled with replacement, the same ones for both
models) and a paired permutation test (each question's two matrices swapped with probability
1/2). Resamples are evaluated in batch: every resampled set is a vector of per-sample weights
over the pooled 2n samples, and each paper metric has an exact weighted form (a weighted mean
of per-sample values, a weighted histogram, a quadratic form in the sample correlations), so
1000 resamples cost about as much as a few direct evaluations. Other metrics fall back to
materialising each resampled set. (Sample diversity on a bootstrap set skips pairs of a
question with its own duplicate, see `weighted_sample_diversity`.) `table1_from_rows` lays the
results out as in the paper.
"""

from __future__ import annotations

import functools
import html
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import pandas as pd

from rl_circuits.analysis.metrics import (
    METRICS,
    Mask,
    ScoreArray,
    activation_intensity,
    activation_intensity_per_sample,
    check_mask,
    check_scores,
    distribution_kurtosis,
    flat_entries,
    information_complexity,
    kurtosis_per_sample,
    sample_correlations,
    sample_diversity,
)

__all__ = [
    "METRIC_LABELS",
    "MIN_PAIRED_N",
    "Table1",
    "compare",
    "format_value",
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


COLUMNS = (
    "metric",
    "before",
    "after",
    "diff",
    "ci_low",
    "ci_high",
    "p_value",
    "direction",
    "significant",
    "before_ci_low",
    "before_ci_high",
    "after_ci_low",
    "after_ci_high",
    "n",
    "n_resamples",
    "ci",
    "ci_note",
)

Weights = np.ndarray  # [R, 2n] how often each pooled sample (before ones, then after) is drawn
Batched = Callable[[Weights], np.ndarray]  # weights -> metric value per resample [R]


# --- batched (weighted) forms of the metrics -------------------------------------------------


def _nan_rows(weights: Weights, bad: np.ndarray) -> np.ndarray:
    """True for resamples that draw any sample whose metric value is undefined."""
    return (weights[:, bad] > 0).any(axis=1) if bad.any() else np.zeros(len(weights), bool)


def _weighted_mean(per_sample: Callable, pool: np.ndarray, mask) -> Batched:
    """Metrics that are means over samples of a per-sample value: a weighted mean, exactly."""
    values = per_sample(pool, mask)
    bad = np.isnan(values)
    clean = np.where(bad, 0.0, values)

    def evaluate(weights: Weights) -> np.ndarray:
        out = (weights @ clean) / weights.sum(axis=1)
        out[_nan_rows(weights, bad)] = np.nan
        return out

    return evaluate


def _weighted_histogram_entropy(
    pool: np.ndarray, mask, bins: int = 100, eps: float = 1e-12
) -> Batched:
    """Eq. 15 on weighted sample sets; each set's histogram spans its own [min, max].

    Each sample's |values| are sorted once; the count of a sample below a bin edge e is one
    binary search in its own row (x < e), so a range's histogram of every sample costs P
    searches of B edges and no pooled index array (which at 7B heads-graph size would be tens
    of GB). Bins are np.histogram's: [e_j, e_j+1), the last one closed.
    """
    entries = flat_entries(pool, mask)
    values = np.empty(entries.shape)
    for k, row in enumerate(entries):  # one row at a time: no second [P, m] temporary
        values[k] = np.sort(np.abs(row))
    n_pool, m = values.shape
    lows, highs = values[:, 0], values[:, -1]

    def per_sample_counts(ranges: np.ndarray) -> np.ndarray:
        """[U, P, bins] histogram counts of each pooled sample for each (lo, hi) range."""
        edges = np.stack([np.histogram_bin_edges(r, bins=bins) for r in ranges])  # [U, B+1]
        below = np.empty((len(ranges), n_pool, bins), dtype=np.int64)
        for k in range(n_pool):  # the number of values[k] < e
            below[:, k, :] = np.searchsorted(values[k], edges[:, :-1], side="left")
        return np.diff(below, axis=2, append=m)

    def evaluate(weights: Weights) -> np.ndarray:
        drawn = weights > 0
        lo = np.where(drawn, lows, np.inf).min(axis=1)
        hi = np.where(drawn, highs, -np.inf).max(axis=1)
        ranges, which = np.unique(np.stack([lo, hi], axis=1), axis=0, return_inverse=True)
        which = which.ravel()
        counts = np.empty((len(weights), bins))
        chunk = max(1, 2**22 // (n_pool * bins))
        for start in range(0, len(ranges), chunk):
            block = per_sample_counts(ranges[start : start + chunk])
            for u, hist in enumerate(block, start=start):
                selected = which == u
                counts[selected] = weights[selected] @ hist
        p = counts / counts.sum(axis=1, keepdims=True)
        return -(p * np.log(p + eps)).sum(axis=1)

    return evaluate


def weighted_sample_diversity(pool: np.ndarray, mask) -> Batched:
    """Figure 3a on weighted sets: mean correlation over pairs of draws of distinct samples.

    A bootstrap set that draws a question twice holds one sample twice; pairing it with itself
    (correlation 1) would bias diversity down by about 1/n, so such pairs are left out: the
    statistic stays 1 - mean correlation over pairs of distinct samples, weighted by draws.
    """
    corr = sample_correlations(pool, mask)
    bad = np.isnan(np.diag(corr))  # a constant sample has no correlation with anything
    corr = np.where(np.isnan(corr), 0.0, corr)
    np.fill_diagonal(corr, 0.0)

    def evaluate(weights: Weights) -> np.ndarray:
        pairs = ((weights @ corr) * weights).sum(axis=1)
        count = weights.sum(axis=1) ** 2 - (weights**2).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = 1.0 - pairs / count
        out[_nan_rows(weights, bad) | (count == 0)] = np.nan
        return out

    return evaluate


_BATCHED: Mapping[Callable, tuple[Callable, frozenset[str]]] = MappingProxyType(
    {
        activation_intensity: (
            functools.partial(_weighted_mean, activation_intensity_per_sample),
            frozenset(),
        ),
        distribution_kurtosis: (
            functools.partial(_weighted_mean, kurtosis_per_sample),
            frozenset(),
        ),
        information_complexity: (_weighted_histogram_entropy, frozenset({"bins", "eps"})),
        sample_diversity: (weighted_sample_diversity, frozenset()),
    }
)


def _materialised(metric: Callable, pool: np.ndarray, mask) -> Batched:
    """Any metric: build each resampled set and evaluate it (slow, exact)."""
    ids = np.arange(len(pool))

    def evaluate(weights: Weights) -> np.ndarray:
        counts = np.rint(weights).astype(int)
        return np.array([metric(pool[np.repeat(ids, c)], mask) for c in counts])

    return evaluate


def _batched(metric: Callable, pool: np.ndarray, mask) -> Batched:
    """The fastest exact weighted evaluator for `metric` (a paper metric or a partial of one)."""
    func, keywords = metric, {}
    if isinstance(metric, functools.partial) and not metric.args:
        func, keywords = metric.func, dict(metric.keywords)
    entry = _BATCHED.get(func)
    if entry is not None and set(keywords) <= entry[1]:
        return entry[0](pool, mask, **keywords)
    return _materialised(metric, pool, mask)


# --- compare -----------------------------------------------------------------------------------


def _select(metrics) -> dict[str, Callable]:
    """None -> METRICS; names -> those of METRICS; a mapping -> itself."""
    if metrics is None:
        return dict(METRICS)
    if isinstance(metrics, Mapping):
        return dict(metrics)
    if isinstance(metrics, str):
        metrics = [metrics]
    unknown = [name for name in metrics if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
    return {name: METRICS[name] for name in metrics}


def _direction(diff: float) -> str:
    return "up" if diff > 0 else "down" if diff < 0 else "flat"


def _interval(resampled: np.ndarray, tail: float) -> tuple[float, float]:
    """The percentile interval over the resamples where the statistic is defined; NaN when
    fewer than half of them are (`_interval_note` says why)."""
    finite = resampled[np.isfinite(resampled)]
    if 2 * len(finite) < len(resampled) or not len(finite):
        return np.nan, np.nan
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def _interval_note(before: float, after: float, resampled: np.ndarray) -> str:
    """Why a difference has no interval, or which resamples its interval leaves out; "" when
    every resample gave a value."""
    for role, value in (("before", before), ("after", after)):
        if not np.isfinite(value):
            return f"no interval: the metric is undefined on the {role} samples ({value})"
    undefined = int(np.count_nonzero(~np.isfinite(resampled)))
    if not undefined:
        return ""
    what = (
        f"{undefined} of {len(resampled)} bootstrap resamples leave the metric undefined (e.g. "
        "sample diversity on a resample that draws one question only)"
    )
    if 2 * undefined > len(resampled):
        return f"no interval: {what}; an interval needs at least half of them defined"
    return f"interval over the other {len(resampled) - undefined}: {what}"


def compare(
    before: ScoreArray,
    after: ScoreArray,
    edge_mask: Mask | None = None,
    metrics: Mapping[str, Callable] | Sequence[str] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> pd.DataFrame:
    """Each metric before/after on paired samples, with bootstrap CI and permutation p-value.

    Rows follow `metrics` (default: `METRICS`); columns are `COLUMNS`: the two values, `diff`
    (after - before), its percentile interval `ci_low`/`ci_high` from a paired bootstrap, the
    two-sided paired permutation `p_value` ((1 + #|d*| >= |d|) / (1 + R)), `direction`
    (up/down/flat), `significant` (the interval excludes 0), each model's own interval, and
    `ci_note`: why the interval is NaN, or which resamples it leaves out ("" when none).
    Resamples where a metric is undefined (sample diversity of a resample drawing one question)
    are left out of intervals and p-values; fewer than `MIN_PAIRED_N` pairs warn.
    """
    # One float64 copy of both models' scores (at 7B heads-graph size each model's is GBs):
    # `b` and `a` become views of the pool that the bootstrap resamples.
    b = check_scores(before)
    n = len(b)
    pool = np.empty((2 * n, *b.shape[1:]))
    pool[:n] = b
    del b
    a = check_scores(after)
    if a.shape != pool[:n].shape:
        raise ValueError(
            f"before {pool[:n].shape} and after {a.shape} must score the same questions and edges"
        )
    pool[n:] = a
    b, a = pool[:n], pool[n:]
    if n < 2:
        raise ValueError("compare needs at least 2 paired samples")
    if n_resamples < 1:
        raise ValueError("n_resamples must be at least 1")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    mask = check_mask(edge_mask, b)
    chosen = _select(metrics)

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_resamples, n))
    counts = np.zeros((n_resamples, n))
    np.add.at(counts, (np.arange(n_resamples)[:, None], draws), 1.0)
    swap = (rng.random((n_resamples, n)) < 0.5).astype(float)
    none = np.zeros_like(counts)
    boot_before, boot_after = np.hstack([counts, none]), np.hstack([none, counts])
    perm_after, perm_before = np.hstack([swap, 1 - swap]), np.hstack([1 - swap, swap])

    if n < MIN_PAIRED_N:
        warnings.warn(
            f"compare: {n} paired samples, fewer than MIN_PAIRED_N = {MIN_PAIRED_N}: the "
            "bootstrap intervals and permutation p-values are unreliable at this size",
            stacklevel=2,
        )
    tail = 100 * (1 - ci) / 2
    records = []
    for name, metric in chosen.items():
        value_before, value_after = float(metric(b, mask)), float(metric(a, mask))
        diff = value_after - value_before
        evaluate = _batched(metric, pool, mask)
        star_before, star_after = evaluate(boot_before), evaluate(boot_after)
        null = evaluate(perm_after) - evaluate(perm_before)
        null = null[np.isfinite(null)]
        tol = 1e-9 * (abs(value_before) + abs(value_after))
        extreme = np.count_nonzero(np.abs(null) >= abs(diff) - tol)
        defined = np.isfinite(diff) and len(null) > 0
        p_value = (1 + extreme) / (1 + len(null)) if defined else np.nan
        low, high = _interval(star_after - star_before, tail)
        own = {
            role: _interval(star, tail)
            for role, star in (("before", star_before), ("after", star_after))
        }
        records.append(
            {
                "metric": name,
                "before": value_before,
                "after": value_after,
                "diff": diff,
                "ci_low": low,
                "ci_high": high,
                "p_value": float(p_value),
                "direction": _direction(diff),
                "significant": bool(low > 0 or high < 0),
                "before_ci_low": own["before"][0],
                "before_ci_high": own["before"][1],
                "after_ci_low": own["after"][0],
                "after_ci_high": own["after"][1],
                "n": n,
                "n_resamples": n_resamples,
                "ci": ci,
                "ci_note": _interval_note(value_before, value_after, star_after - star_before),
            }
        )
    return pd.DataFrame.from_records(records, columns=list(COLUMNS))


# --- Table 1 -----------------------------------------------------------------------------------


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
    marker = _ARROWS[_direction(diff)] if np.isfinite(diff) else ""
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
