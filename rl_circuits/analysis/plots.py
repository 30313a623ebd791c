"""Plotly figures of the paper: Figure 2 (per-edge relative change), Figure 3a/3b, metric vs alpha.

Each function takes arrays or `compare`-style DataFrames and returns a `go.Figure`; nothing is
shown or written here (see `rl_circuits.analysis.report`). Node axes carry the
TransformerLens hook names, so a cell can be traced back to the hook that produced it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from jaxtyping import Float
from plotly.subplots import make_subplots

from rl_circuits.analysis.metrics import (
    Mask,
    OtherScoreArray,
    ScoreArray,
    check_mask,
    check_scores,
)
from rl_circuits.analysis.table1 import METRIC_LABELS
from rl_circuits.engine.graph import parse_node

__all__ = [
    "diff_curves",
    "diff_heatmap",
    "diversity_bars",
    "faithfulness_curves",
    "group_by_hook",
    "metric_vs_alpha",
    "output_entropy_lines",
    "relative_change_heatmap",
    "short_node_label",
]

BEFORE_COLOUR, AFTER_COLOUR = "#1f77b4", "#d62728"
# What a cell of several edges shows, stated on the head-level Figure 2.
SUMMED_CELL = (
    "cell: mean over questions of |Σ W|, each question's scores summed with their signs over "
    "the cell's edges (a layer's heads sum to the paper graph's edge)"
)


def relative_change_heatmap(
    W_before: ScoreArray,
    W_after: OtherScoreArray,
    upstream: Sequence[str],
    downstream: Sequence[str],
    edge_mask: Mask,
    title: str | None = None,
) -> go.Figure:
    """Figure 2: change of mean |W| per edge (mean over samples of |W|), upstream rows x
    downstream columns.

    Colour is log2(after / before) on a scale symmetric about 0 (red: stronger after), so a
    halving and a doubling look equally strong; the range is ±R for the smallest R in
    `LOG2_LIMITS` that holds 99% of the edges, and cells beyond it are clipped (the colour
    bar's title says so). Non-edges are grey. Hover shows both node names, both models' mean |W|,
    the relative change in percent and the ratio. Tick labels are short (`L3 q` for
    `blocks.3.hook_q_input`, the hover keeps the hook name) and the figure grows with the
    node count so that every label has room. Head-level graphs (node names `hook[h]`) get one
    view with each layer's heads summed and a drop-down to drill into the heads of any layer
    (see `_head_heatmap`); a cell of several edges shows mean |Σ W|, each sample's scores summed
    with their signs first, so a layer's summed heads read as the paper graph's edge does.
    """
    before, after = check_scores(W_before), check_scores(W_after)
    mask = check_mask(edge_mask, before)
    if (len(upstream), len(downstream)) != before.shape[1:]:
        raise ValueError(
            f"{len(upstream)} upstream x {len(downstream)} downstream names for matrices "
            f"{before.shape[1:]}"
        )
    if any(parse_node(name)[1] is not None for name in (*upstream, *downstream)):
        return _head_heatmap(before, after, list(upstream), list(downstream), mask, title)
    keep = np.ones(before.shape[1:], bool) if mask is None else mask
    mb = np.where(keep, np.abs(before).mean(axis=0), 0.0)
    ma = np.where(keep, np.abs(after).mean(axis=0), 0.0)
    figure = go.Figure(_change_trace(mb, ma, downstream, upstream, True, summed=False))
    _layout_heatmap(figure, title, [(len(upstream), len(downstream))], upstream, downstream)
    return figure


# Half-ranges of the log2 colour scale (±R: from x 2^-R to x 2^R); the smallest that holds
# 99% of the edges is used, so one extreme edge does not wash out all others.
LOG2_LIMITS = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
_SHORT_HOOKS = {
    "q_input": "q",
    "k_input": "k",
    "v_input": "v",
    "mlp_in": "mlp",
    "attn_in": "attn",
    "attn_out": "attn",
    "mlp_out": "mlp",
    "result": "attn",
    "resid_pre": "pre",
    "resid_mid": "mid",
    "resid_post": "post",
}
_CELL_PX = 13  # room per tick label (9 px font)


def short_node_label(name: str) -> str:
    """A compact tick label: `blocks.3.hook_q_input` -> `L3 q`, `...hook_result[2]` -> `L3 attn[2]`,
    `hook_embed` -> `embed`; other names are returned unchanged."""
    hook, head = parse_node(name)
    match = re.fullmatch(r"blocks\.(\d+)\.(?:attn\.)?hook_(\w+)", hook)
    if hook == "hook_embed":
        label = "embed"
    elif match and match[2] in _SHORT_HOOKS:
        label = f"L{match[1]} {_SHORT_HOOKS[match[2]]}"
    else:
        return name
    return label if head is None else f"{label}[{head}]"


def log2_limit(log_ratio: Float[np.ndarray, "*shape"]) -> float:
    """The colour range ±R of a log2-ratio map: the smallest `LOG2_LIMITS` entry holding 99% of
    its finite cells (1 when there are none)."""
    values = np.abs(log_ratio[np.isfinite(log_ratio)])
    if values.size == 0:
        return 1.0
    q = float(np.quantile(values, 0.99))
    return next((limit for limit in LOG2_LIMITS if limit >= q), LOG2_LIMITS[-1])


def _ratio_text(log2_value: float) -> str:
    ratio = 2.0**log2_value
    return f"×{ratio:.3g} ({ratio - 1:+.0%})"


def _change_trace(
    before: np.ndarray, after: np.ndarray, x, y, visible: bool, summed: bool = True
) -> go.Heatmap:
    """A log2(after / before) heatmap of mean |W| (`summed`: mean |Σ W| over each cell's edges),
    clipped to a symmetric range; NaN (grey) where there is no edge."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(before > 0, after / before, np.nan)
        log_ratio = np.log2(ratio)  # after = 0: -inf, clipped below
    limit = log2_limit(log_ratio)
    n_clipped = int(np.count_nonzero(np.abs(log_ratio[~np.isnan(log_ratio)]) > limit))
    colour = np.clip(log_ratio, -limit, limit)
    step = 0.5 if limit <= 1 else (1.0 if limit <= 4 else 2.0)
    ticks = np.arange(-limit, limit + step / 2, step)
    text = [_ratio_text(v) for v in ticks]
    if n_clipped:
        text[0], text[-1] = f"≤ {text[0]}", f"≥ {text[-1]}"
    clipped = f"{n_clipped} edge(s) beyond, clipped" if n_clipped else "no edge beyond"
    colour_title = f"after / before<br>(log2 scale, ±{limit:g}:<br>{clipped})"
    strength = "mean |Σ W|" if summed else "mean |W|"
    return go.Heatmap(
        z=colour.astype(np.float32),
        x=list(x),
        y=list(y),
        customdata=np.stack([before, after, ratio - 1, ratio], axis=-1).astype(np.float32),
        colorscale="RdBu_r",
        zmin=-limit,
        zmax=limit,
        zmid=0,
        visible=visible,
        colorbar={
            "title": {"text": colour_title},
            "tickmode": "array",
            "tickvals": ticks.tolist(),
            "ticktext": text,
        },
        hoverongaps=False,
        hovertemplate=(
            "upstream %{y}<br>downstream %{x}<br>"
            f"before {strength} %{{customdata[0]:.3e}}<br>"
            f"after {strength} %{{customdata[1]:.3e}}<br>"
            "relative change %{customdata[2]:+.1%}<br>"
            "after / before ×%{customdata[3]:.3g}<extra></extra>"
        ),
    )


def _figure_size(n_rows: int, n_cols: int) -> dict:
    """Height and width giving every row and column label `_CELL_PX` pixels."""
    return {
        "height": max(450, 220 + _CELL_PX * n_rows),
        "width": max(800, 320 + _CELL_PX * n_cols),
    }


def _layout_heatmap(
    figure: go.Figure,
    title: str | None,
    shapes: list[tuple[int, int]],
    rows: Sequence[str],
    cols: Sequence[str],
) -> None:
    """Axes with every node's short label shown (tickmode array), sized for the first view."""

    def axis(names: Sequence[str], label: str) -> dict:
        names = list(dict.fromkeys(names))
        return {
            "title": {"text": label},
            "tickmode": "array",
            "tickvals": names,
            "ticktext": [short_node_label(name) for name in names],
            "tickfont": {"size": 9},
            "showgrid": False,
        }

    x_axis = axis(cols, "downstream node (L = layer; hover for the hook name)")
    y_axis = axis(rows, "upstream node")
    figure.update_layout(
        title=title or "Change of edge strength, after vs before (grey: no edge)",
        xaxis={**x_axis, "tickangle": -90},
        yaxis={**y_axis, "autorange": "reversed"},
        plot_bgcolor="#c8c8c8",
        **_figure_size(*shapes[0]),
    )


def group_by_hook(names: Sequence[str]) -> tuple[list[str], Float[np.ndarray, "n_groups n_names"]]:
    """Group node names by their hook (a head-level node `hook[h]` joins `hook`'s group):
    the group names in order of appearance and a one-hot [n_groups, n_names] matrix."""
    groups: dict[str, int] = {}
    index = [groups.setdefault(parse_node(name)[0], len(groups)) for name in names]
    onehot = np.zeros((len(groups), len(names)))
    onehot[index, np.arange(len(names))] = 1.0
    return list(groups), onehot


def _head_heatmap(
    before: np.ndarray,
    after: np.ndarray,
    upstream: list[str],
    downstream: list[str],
    mask: np.ndarray | None,
    title: str | None,
) -> go.Figure:
    """Figure 2 for a head-level graph (~800 x 3400 edges at 7B): readable at layer level.

    Every view shows, per cell, the mean over samples of |Σ W| over the cell's edges: each
    sample's scores are summed with their signs, then made absolute (the heads of a layer sum
    to the paper graph's edge exactly, so the first view is the paper graph's Figure 2). The
    first view sums each layer's heads (upstream `attn.hook_result`, downstream
    `hook_{q,k,v}_input`); the drop-down shows one layer's heads instead: as writers (rows,
    against every summed reader) or as q/k/v readers (columns, against every summed writer).
    """
    keep = np.ones(before.shape[1:]) if mask is None else mask.astype(float)
    wb, wa = before * keep, after * keep
    up_groups, up_onehot = group_by_hook(upstream)
    down_groups, down_onehot = group_by_hook(downstream)
    down_onehot = down_onehot.T

    def strength(w: np.ndarray, rows: np.ndarray | None, cols: np.ndarray | None) -> np.ndarray:
        """mean over samples of |Σ W| per cell: `rows` / `cols` sum nodes into groups (None:
        every node its own)."""
        if rows is not None:
            w = rows @ w
        if cols is not None:
            w = w @ cols
        return np.abs(w).mean(axis=0)

    traces = [
        _change_trace(
            strength(wb, up_onehot, down_onehot),
            strength(wa, up_onehot, down_onehot),
            down_groups,
            up_groups,
            True,
        )
    ]
    labels = ["all nodes, heads summed per layer"]
    shapes = [(len(up_groups), len(down_groups))]
    for g, group in enumerate(up_groups):
        rows = np.flatnonzero(up_onehot[g])
        if len(rows) > 1:  # the heads of one layer, as writers
            traces.append(
                _change_trace(
                    strength(wb[:, rows], None, down_onehot),
                    strength(wa[:, rows], None, down_onehot),
                    down_groups,
                    [upstream[i] for i in rows],
                    False,
                )
            )
            labels.append(f"{group}: each head's outputs")
            shapes.append((len(rows), len(down_groups)))
    layers: dict[str, list[int]] = {}
    for j, name in enumerate(downstream):
        hook, head = parse_node(name)
        if head is not None:
            layers.setdefault(hook.rsplit(".hook_", 1)[0], []).append(j)
    for layer, cols in layers.items():  # the heads of one layer, as q/k/v readers
        traces.append(
            _change_trace(
                strength(wb[:, :, cols], up_onehot, None),
                strength(wa[:, :, cols], up_onehot, None),
                [downstream[j] for j in cols],
                up_groups,
                False,
            )
        )
        labels.append(f"{layer}: each head's q/k/v inputs")
        shapes.append((len(up_groups), len(cols)))
    buttons = [
        {
            "label": label,
            "method": "update",
            "args": [{"visible": [i == k for i in range(len(traces))]}, _figure_size(*shapes[k])],
        }
        for k, label in enumerate(labels)
    ]
    figure = go.Figure(traces)
    _layout_heatmap(figure, title, shapes, [*up_groups, *upstream], [*down_groups, *downstream])
    figure.update_layout(
        title={"text": f"{figure.layout.title.text}<br><sup>{SUMMED_CELL}</sup>"},
        updatemenus=[{"buttons": buttons, "direction": "down", "x": 0, "y": 1.12}],
    )
    return figure


def _model_error(df: pd.DataFrame, model: str) -> dict | None:
    """Plotly error_y from a model's bootstrap interval columns, when compare wrote them."""
    low, high = f"{model}_ci_low", f"{model}_ci_high"
    if low not in df or high not in df:
        return None
    return {
        "type": "data",
        "symmetric": False,
        "array": (df[high] - df[model]).to_numpy(),
        "arrayminus": (df[model] - df[low]).to_numpy(),
    }


def diversity_bars(df: pd.DataFrame) -> go.Figure:
    """Figure 3a: sample diversity before vs after for each pair / dataset / alpha.

    `df` holds compare rows plus pair, dataset, alpha (rows of other metrics are ignored).
    """
    if "metric" in df:
        df = df[df["metric"] == "sample_diversity"]
    if df.empty:
        raise ValueError("no sample_diversity rows to plot")
    df = df.sort_values(["pair", "dataset", "alpha"], kind="stable")
    labels = [
        f"{p}<br>{d} α={a:g}"
        for p, d, a in zip(df["pair"], df["dataset"], df["alpha"], strict=True)
    ]
    figure = go.Figure()
    for model, colour in (("before", BEFORE_COLOUR), ("after", AFTER_COLOUR)):
        figure.add_bar(
            x=labels,
            y=df[model].to_numpy(),
            name=model,
            marker_color=colour,
            error_y=_model_error(df, model),
        )
    figure.update_layout(
        title="Sample diversity (1 − mean pairwise correlation)",
        barmode="group",
        yaxis={"title": {"text": "sample diversity"}},
    )
    return figure


def output_entropy_lines(
    entropy_before: Sequence[float] | Float[np.ndarray, " n_upstream"],
    entropy_after: Sequence[float] | Float[np.ndarray, " n_upstream"],
    upstream: Sequence[str],
    title: str | None = None,
) -> go.Figure:
    """Figure 3b: output-edge entropy per upstream node, before vs after."""
    before, after = np.asarray(entropy_before, float), np.asarray(entropy_after, float)
    if not len(before) == len(after) == len(upstream):
        raise ValueError(f"{len(before)}, {len(after)} entropies for {len(upstream)} nodes")
    figure = go.Figure()
    for model, values, colour in (
        ("before", before, BEFORE_COLOUR),
        ("after", after, AFTER_COLOUR),
    ):
        figure.add_scatter(
            x=list(upstream), y=values, mode="lines+markers", name=model, line_color=colour
        )
    figure.update_layout(
        title=title or "Output-edge entropy per upstream node",
        xaxis={"title": {"text": "upstream node"}, "tickangle": -60, "tickfont": {"size": 9}},
        yaxis={"title": {"text": "entropy (nats)"}},
    )
    return figure


def _band(x: np.ndarray, low: np.ndarray, high: np.ndarray, colour: str, group: str) -> go.Scatter:
    """A closed polygon between low and high over x."""
    red, green, blue = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return go.Scatter(
        x=np.concatenate([x, x[::-1]]),
        y=np.concatenate([high, low[::-1]]),
        mode="lines",  # the default adds a marker at every boundary point of the polygon
        fill="toself",
        fillcolor=f"rgba({red},{green},{blue},0.2)",
        line={"width": 0},
        hoverinfo="skip",
        legendgroup=group,
        showlegend=False,
    )


def metric_vs_alpha(df: pd.DataFrame, metric: str) -> go.Figure:
    """One metric before/after against alpha, a panel per dataset (rows) x pair (columns).

    Bands are each model's bootstrap interval (`before_ci_low` ... columns of `compare`).
    """
    df = df[df["metric"] == metric] if "metric" in df else df
    if df.empty:
        raise ValueError(f"no rows for metric {metric!r}")
    datasets = list(dict.fromkeys(df["dataset"]))
    pairs = list(dict.fromkeys(df["pair"]))
    figure = make_subplots(
        rows=len(datasets),
        cols=len(pairs),
        subplot_titles=[f"{p} · {d}" for d in datasets for p in pairs],
        shared_xaxes=True,
    )
    for row, dataset in enumerate(datasets, start=1):
        for col, pair in enumerate(pairs, start=1):
            part = df[(df["dataset"] == dataset) & (df["pair"] == pair)].sort_values("alpha")
            if part.empty:
                continue
            x = part["alpha"].to_numpy(float)
            first = row == 1 and col == 1
            for model, colour in (("before", BEFORE_COLOUR), ("after", AFTER_COLOUR)):
                low, high = f"{model}_ci_low", f"{model}_ci_high"
                if low in part and high in part:
                    band = _band(
                        x, part[low].to_numpy(float), part[high].to_numpy(float), colour, model
                    )
                    figure.add_trace(band, row=row, col=col)
                figure.add_scatter(
                    x=x,
                    y=part[model].to_numpy(float),
                    mode="lines+markers",
                    name=model,
                    line_color=colour,
                    legendgroup=model,
                    showlegend=first,
                    row=row,
                    col=col,
                )
    figure.update_xaxes(title_text="α (truncation scale)", row=len(datasets))
    figure.update_yaxes(title_text=METRIC_LABELS.get(metric, metric), col=1)
    figure.update_layout(
        title=f"{METRIC_LABELS.get(metric, metric)} vs α", height=280 * len(datasets) + 120
    )
    return figure


def faithfulness_curves(curves: dict, title: str = "Faithfulness of the top-k edges") -> go.Figure:
    """Mean faithfulness f(k) before and after with bootstrap bands against k (log axis), and
    the Jaccard overlap of the two models' top-k circuits (dotted, same axis).

    `curves` holds `ks`, `before`, `after`, their `*_low`/`*_high` bands and `overlap`, as
    `rl_circuits.analysis.faithfulness.compare_circuit_sizes` and `overlap_curve` return them.
    """
    x = np.asarray(curves["ks"], float)
    figure = go.Figure()
    for model, colour in (("before", BEFORE_COLOUR), ("after", AFTER_COLOUR)):
        low = np.asarray(curves[f"{model}_low"], float)
        high = np.asarray(curves[f"{model}_high"], float)
        figure.add_trace(_band(x, low, high, colour, model))
        figure.add_scatter(
            x=x,
            y=np.asarray(curves[model], float),
            mode="lines+markers",
            name=model,
            line_color=colour,
            legendgroup=model,
            hovertemplate="k = %{x}<br>f(k) = %{y:.3f}<extra>" + model + "</extra>",
        )
    if "overlap" in curves:
        figure.add_scatter(
            x=x,
            y=np.asarray(curves["overlap"], float),
            mode="lines",
            name="overlap (Jaccard)",
            line={"color": "#555555", "dash": "dot"},
        )
    figure.update_xaxes(type="log", title_text="k (top edges kept)")
    figure.update_yaxes(title_text="faithfulness f(k)")
    figure.update_layout(title=title, height=420)
    return figure


def diff_heatmap(
    values: ScoreArray,
    upstream: Sequence[str],
    downstream: Sequence[str],
    edge_mask: Mask,
    title: str | None = None,
) -> go.Figure:
    """Mean cross-model patching score per edge on Figure 2's axes (upstream rows x downstream
    columns; head-level nodes summed per hook): blue where taking the other model's output
    lowers the loss, red where it raises it, grey for non-edges. The colour range is the 99th
    percentile of |mean score| so that one edge does not wash out the others."""
    scores = check_scores(values)
    mask = check_mask(edge_mask, scores)
    mean = scores.mean(axis=0) * (1.0 if mask is None else mask)
    up, up_onehot = group_by_hook(upstream)
    down, down_onehot = group_by_hook(downstream)
    summed = up_onehot @ mean @ down_onehot.T
    exists = (up_onehot @ (np.ones_like(mean) if mask is None else mask) @ down_onehot.T) > 0
    z = np.where(exists, summed, np.nan)
    finite = np.abs(z[np.isfinite(z)])
    limit = float(np.quantile(finite, 0.99)) if finite.size and finite.max() > 0 else 1.0
    figure = go.Figure(
        go.Heatmap(
            z=z,
            x=down,
            y=up,
            colorscale="RdBu_r",
            zmin=-limit,
            zmax=limit,
            zmid=0,
            colorbar={"title": {"text": "mean score<br>(loss change)"}},
            hoverongaps=False,
            hovertemplate="upstream %{y}<br>downstream %{x}<br>mean score %{z:.3e}<extra></extra>",
        )
    )
    _layout_heatmap(figure, title, [(len(up), len(down))], up, down)
    return figure


def diff_curves(summaries: dict, title: str = "Diff circuit curves") -> go.Figure:
    """The share of the loss gap recovered against k (log axis), one line with its bootstrap
    band per direction; `summaries` maps a direction to `analysis.diff.diff_summary`'s dict."""
    figure = go.Figure()
    colours = (AFTER_COLOUR, BEFORE_COLOUR)
    for (direction, summary), colour in zip(summaries.items(), colours, strict=False):
        x = np.asarray(summary["ks"], float)
        low = np.asarray(summary["curve_low"], float)
        high = np.asarray(summary["curve_high"], float)
        figure.add_trace(_band(x, low, high, colour, direction))
        figure.add_scatter(
            x=x,
            y=np.asarray(summary["curve"], float),
            mode="lines+markers",
            name=direction.replace("_", " "),
            line_color=colour,
            legendgroup=direction,
            hovertemplate="k = %{x}<br>share of gap %{y:.3f}<extra>" + direction + "</extra>",
        )
    figure.update_xaxes(type="log", title_text="k (top edges carrying the other model's outputs)")
    figure.update_yaxes(title_text="share of the loss gap recovered")
    figure.update_layout(title=title, height=420)
    return figure
