"""Plotly figures of the paper: Figure 2 (per-edge relative change), Figure 3a/3b, metric vs alpha.

Each function takes arrays or `compare`-style DataFrames and returns a `go.Figure`; nothing is
shown or written here (see `rl_circuits.report`). Node axes carry the TransformerLens hook names,
so a cell can be traced back to the hook that produced it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from rl_circuits.graph import parse_node
from rl_circuits.metrics import Mask, Scores, check_mask, check_scores, relative_change
from rl_circuits.stats import METRIC_LABELS

__all__ = [
    "diversity_bars",
    "faithfulness_curves",
    "group_by_hook",
    "metric_vs_alpha",
    "output_entropy_lines",
    "relative_change_heatmap",
]

BEFORE_COLOUR, AFTER_COLOUR = "#1f77b4", "#d62728"


def relative_change_heatmap(
    W_before: Scores,
    W_after: Scores,
    upstream: Sequence[str],
    downstream: Sequence[str],
    edge_mask: Mask,
    title: str | None = None,
) -> go.Figure:
    """Figure 2: relative change of mean |W| per edge, upstream rows x downstream columns.

    Diverging colours centred on 0 (red: stronger after); non-edges are NaN, left blank. Hover
    shows both node names, both models' mean |W| and the relative change. Head-level graphs
    (node names `hook[h]`) get one view with each layer's heads summed and a drop-down to
    drill into the heads of any layer (see `_head_heatmap`).
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
    change = np.where(mask, relative_change(before, after), np.nan)
    means = np.stack([np.abs(before).mean(axis=0), np.abs(after).mean(axis=0)], axis=-1)
    figure = go.Figure(
        go.Heatmap(
            z=change,
            x=list(downstream),
            y=list(upstream),
            customdata=means,
            colorscale="RdBu_r",
            zmid=0,
            colorbar={"title": {"text": "relative change"}, "tickformat": "+.0%"},
            hoverongaps=False,
            hovertemplate=(
                "upstream %{y}<br>downstream %{x}<br>"
                "before mean |W| %{customdata[0]:.3e}<br>after mean |W| %{customdata[1]:.3e}<br>"
                "relative change %{z:+.1%}<extra></extra>"
            ),
        )
    )
    figure.update_layout(
        title=title or "Relative change of edge strength (after vs before)",
        xaxis={"title": {"text": "downstream node"}, "tickangle": -60, "tickfont": {"size": 9}},
        yaxis={
            "title": {"text": "upstream node"},
            "autorange": "reversed",
            "tickfont": {"size": 9},
        },
        height=max(450, 160 + 14 * len(upstream)),
        plot_bgcolor="white",
    )
    return figure


def group_by_hook(names: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Group node names by their hook (a head-level node `hook[h]` joins `hook`'s group):
    the group names in order of appearance and a one-hot [n_groups, n_names] matrix."""
    groups: dict[str, int] = {}
    index = [groups.setdefault(parse_node(name)[0], len(groups)) for name in names]
    onehot = np.zeros((len(groups), len(names)))
    onehot[index, np.arange(len(names))] = 1.0
    return list(groups), onehot


def _change_trace(before: np.ndarray, after: np.ndarray, x, y, visible: bool) -> go.Heatmap:
    """A relative-change heatmap of summed mean |W| (NaN where there is no edge)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        change = np.where(before > 0, (after - before) / before, np.nan)
    return go.Heatmap(
        z=change.astype(np.float32),
        x=list(x),
        y=list(y),
        customdata=np.stack([before, after], axis=-1).astype(np.float32),
        colorscale="RdBu_r",
        zmid=0,
        visible=visible,
        colorbar={"title": {"text": "relative change"}, "tickformat": "+.0%"},
        hoverongaps=False,
        hovertemplate=(
            "upstream %{y}<br>downstream %{x}<br>"
            "before Σ mean |W| %{customdata[0]:.3e}<br>after Σ mean |W| %{customdata[1]:.3e}<br>"
            "relative change %{z:+.1%}<extra></extra>"
        ),
    )


def _head_heatmap(
    before: np.ndarray,
    after: np.ndarray,
    upstream: list[str],
    downstream: list[str],
    mask: np.ndarray | None,
    title: str | None,
) -> go.Figure:
    """Figure 2 for a head-level graph (~800 x 3400 edges at 7B): readable at layer level.

    The first view sums mean |W| over each layer's heads (upstream `attn.hook_result`,
    downstream `hook_{q,k,v}_input`) before taking the relative change; the drop-down shows
    one layer's heads instead: as writers (rows, against every summed reader) or as q/k/v
    readers (columns, against every summed writer).
    """
    keep = np.ones(before.shape[1:]) if mask is None else mask.astype(float)
    mb, ma = np.abs(before).mean(axis=0) * keep, np.abs(after).mean(axis=0) * keep
    up_groups, up_onehot = group_by_hook(upstream)
    down_groups, down_onehot = group_by_hook(downstream)
    down_onehot = down_onehot.T
    traces = [
        _change_trace(
            up_onehot @ mb @ down_onehot, up_onehot @ ma @ down_onehot, down_groups, up_groups, True
        )
    ]
    labels = ["all nodes, heads summed per layer"]
    heights = [len(up_groups)]
    for g, group in enumerate(up_groups):
        rows = np.flatnonzero(up_onehot[g])
        if len(rows) > 1:  # the heads of one layer, as writers
            traces.append(
                _change_trace(
                    mb[rows] @ down_onehot,
                    ma[rows] @ down_onehot,
                    down_groups,
                    [upstream[i] for i in rows],
                    False,
                )
            )
            labels.append(f"{group}: each head's outputs")
            heights.append(len(rows))
    layers: dict[str, list[int]] = {}
    for j, name in enumerate(downstream):
        hook, head = parse_node(name)
        if head is not None:
            layers.setdefault(hook.rsplit(".hook_", 1)[0], []).append(j)
    for layer, cols in layers.items():  # the heads of one layer, as q/k/v readers
        traces.append(
            _change_trace(
                up_onehot @ mb[:, cols],
                up_onehot @ ma[:, cols],
                [downstream[j] for j in cols],
                up_groups,
                False,
            )
        )
        labels.append(f"{layer}: each head's q/k/v inputs")
        heights.append(len(up_groups))
    buttons = [
        {
            "label": label,
            "method": "update",
            "args": [
                {"visible": [i == k for i in range(len(traces))]},
                {"height": max(450, 200 + 14 * heights[k])},
            ],
        }
        for k, label in enumerate(labels)
    ]
    figure = go.Figure(traces)
    figure.update_layout(
        title=title or "Relative change of edge strength (after vs before)",
        xaxis={"title": {"text": "downstream node"}, "tickangle": -60, "tickfont": {"size": 9}},
        yaxis={
            "title": {"text": "upstream node"},
            "autorange": "reversed",
            "tickfont": {"size": 9},
        },
        height=max(450, 200 + 14 * heights[0]),
        plot_bgcolor="white",
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
    entropy_before: Sequence[float] | np.ndarray,
    entropy_after: Sequence[float] | np.ndarray,
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
    `rl_circuits.faithfulness.compare_circuit_sizes` and `overlap_curve` return them.
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
