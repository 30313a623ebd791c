"""What the weights say next to what the edges say: each node's parameter update (the weights
stage) joined to the change of its outgoing edge scores, and the report's three figures.

Per upstream node u, the edge change is the relative change of the mass of its outgoing edges,
S_after(u) / S_before(u) - 1 with S(u) = sum over u's edges of the mean |score| over questions;
where the `diff` stage ran, its per-node mass sum_d mean |diff score| is joined as well. Whether
the nodes whose weights moved most are those whose edges moved most: Spearman's rho between
`rel_norm` and |edge change| over the nodes, with a two-sided permutation p-value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from jaxtyping import Bool, Float
from scipy.stats import rankdata

from rl_circuits.analysis.plots import short_node_label
from rl_circuits.models.weight_diff import COLUMNS

# Mukherjee et al. 2025: RL updates 5-30% of the parameters (bfloat16, tol 1e-5).
PAPER_RANGE = (0.05, 0.30)


def weights_table(record: Mapping) -> pd.DataFrame:
    """A weights-stage file (`RunLayout.weights`) as `weight_diff` returned it: indexed by
    node, whole-model totals in `attrs["model"]`."""
    frame = pd.DataFrame(record["nodes"]).set_index("node")[list(COLUMNS)]
    frame.attrs["model"] = dict(record["model"])
    return frame


def outgoing_mass(
    values: Float[np.ndarray, "batch n_upstream n_downstream"],
    edge_mask: Bool[np.ndarray, "n_upstream n_downstream"],
) -> Float[np.ndarray, " n_upstream"]:
    """Per upstream node, the sum over its edges of the mean |score| over questions."""
    return np.where(edge_mask, np.abs(values).mean(axis=0), 0.0).sum(axis=1)


def join_edges(
    weights: pd.DataFrame,
    upstream: Sequence[str],
    before: Float[np.ndarray, " n_upstream"],
    after: Float[np.ndarray, " n_upstream"],
    diff: Float[np.ndarray, " n_upstream"] | None = None,
) -> pd.DataFrame:
    """The weights table's graph nodes (norms and unembed have no edges) with `edge_change`
    (relative change of outgoing edge mass, from per-node masses `before`, `after`) and, given
    `diff` masses, `diff_mass`."""
    edges = pd.DataFrame(
        {"edge_change": np.asarray(after) / np.asarray(before) - 1.0},
        index=pd.Index(list(upstream), name="node"),
    )
    if diff is not None:
        edges["diff_mass"] = np.asarray(diff)
    return weights.join(edges, how="inner")


def rank_agreement(
    x: Sequence[float] | Float[np.ndarray, " points"] | pd.Series,
    y: Sequence[float] | Float[np.ndarray, " points"] | pd.Series,
    n_permutations: int = 10000,
    seed: int = 0,
) -> tuple[float, float]:
    """Spearman's rho of x and y (average ranks for ties) and its two-sided permutation
    p-value, (1 + #{|rho_perm| >= |rho|}) / (1 + n_permutations); (nan, nan) under 3 points."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = (rx - rx.mean()) / np.linalg.norm(rx - rx.mean()), ry - ry.mean()
    ry /= np.linalg.norm(ry)
    rho = float(rx @ ry)
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((n_permutations, ry.size)), axis=1)
    null = ry[perms] @ rx
    p = (1 + int(np.sum(np.abs(null) >= abs(rho) - 1e-12))) / (1 + n_permutations)
    return rho, p


def update_fractions(frame: pd.DataFrame, title: str) -> go.Figure:
    """Fraction of each node's parameters that changed, nodes down the page in the order of
    Figure 2's rows (norms and unembed, no graph nodes, in grey); hover: n_params, rel_norm,
    effective rank."""
    labels = [short_node_label(n) for n in frame.index]
    graph = [n.startswith("hook_") or ".hook_" in n for n in frame.index]
    hover = [
        f"{node}<br>{row.n_changed:,} of {row.n_params:,} changed ({row.fraction_changed:.2%})"
        f"<br>||dW||/||W|| = {row.rel_norm:.3g}<br>effective rank {row.effective_rank:.1f}"
        for node, row in frame.iterrows()
    ]
    figure = go.Figure(
        go.Bar(
            x=100 * frame["fraction_changed"].to_numpy(),
            y=labels,
            orientation="h",
            marker_color=["#1f77b4" if g else "#999999" for g in graph],
            hovertext=hover,
            hoverinfo="text",
        )
    )
    figure.update_layout(
        title=title,
        xaxis_title="parameters changed (%)",
        yaxis={"autorange": "reversed", "tickfont": {"size": 9}, "type": "category"},
        height=max(400, 14 * len(frame) + 150),
        template="plotly_white",
    )
    return figure


def weight_edge_scatter(joined: pd.DataFrame, title: str, stats: Mapping[str, tuple]) -> go.Figure:
    """Each graph node's weight change (rel_norm) against the relative change of its outgoing
    edge mass and, where present, its diff-score mass; `stats`: column -> (rho, p)."""
    figure = go.Figure()
    for column, axis, colour in (("edge_change", "y", "#d62728"), ("diff_mass", "y2", "#2ca02c")):
        if column not in joined:
            continue
        rho, p = stats[column]
        figure.add_trace(
            go.Scatter(
                x=joined["rel_norm"],
                y=joined[column],
                yaxis=axis,
                mode="markers",
                marker={"color": colour},
                name=f"{column.replace('_', ' ')} (Spearman rho {rho:.2f}, p = {p:.2g})",
                text=[short_node_label(n) for n in joined.index],
                hovertemplate="%{text}<br>||dW||/||W|| %{x:.3g}<br>%{y:.3g}<extra></extra>",
            )
        )
    figure.update_layout(
        title=title,
        xaxis={"title": "||dW|| / ||W|| of the node's parameters", "type": "log"},
        yaxis={"title": "relative change of outgoing edge mass"},
        yaxis2={"title": "diff-score mass", "overlaying": "y", "side": "right"},
        legend={"orientation": "h", "y": -0.25},
        template="plotly_white",
    )
    return figure


def model_fractions(totals: Mapping[str, Mapping]) -> go.Figure:
    """Whole-model fraction of parameters changed per pair, next to Mukherjee et al.'s 5-30%."""
    names = list(totals)
    figure = go.Figure(
        go.Bar(
            x=names,
            y=[100 * totals[n]["fraction_changed"] for n in names],
            text=[
                f"{100 * totals[n]['fraction_changed']:.1f}% at {totals[n]['dtype']}" for n in names
            ],
            textposition="outside",
        )
    )
    low, high = (100 * v for v in PAPER_RANGE)
    figure.add_hrect(
        y0=low,
        y1=high,
        fillcolor="#2ca02c",
        opacity=0.15,
        line_width=0,
        annotation_text="RL in Mukherjee et al. 2025 (bf16): 5-30%",
        annotation_position="top left",
    )
    figure.update_layout(
        title="Share of all parameters changed by post-training",
        yaxis={"title": "parameters changed (%)", "range": [0, 105]},
        template="plotly_white",
    )
    return figure
