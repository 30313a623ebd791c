"""Where the change sits: how much of the loss gap between a pair's models few edges carry.

Pure functions over the diff stage's losses (`rl_circuits.pipeline.diff`). In a direction
"A_into_B" model B runs on model A's answer x; the gap is L_B(x) - L_A(x). Patching the top-k
edges of B (by mean |cross-model score|) with A's upstream outputs gives L_k, and the diff
circuit curve is the share of the gap recovered, (mean L_B - mean L_k) / (mean L_B - mean L_A):
a ratio of means over questions, since one question's gap can be near 0 or negative. k = all
edges is the fully patched run; the number of edges that recover 50/80/90% of the gap gets a
percentile bootstrap interval over questions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from jaxtyping import Bool, Float

from rl_circuits.analysis.faithfulness import circuit_size, cmd, cpr

THRESHOLDS = (0.5, 0.8, 0.9)  # shares of the gap whose edge counts are reported
TABLE_THRESHOLD = 0.8  # the one Table 1 shows


def gap_metric(threshold: float, direction: str) -> str:
    """The metric name of "edges for `threshold` of the gap" in `direction` (Table 1 rows)."""
    return f"gap_edges_{round(threshold * 100)}_{direction}"


def gap_recovered(
    losses: Float[np.ndarray, "k batch"],
    clean: Float[np.ndarray, " batch"],
    source: Float[np.ndarray, " batch"],
) -> Float[np.ndarray, " k"]:
    """Share of the mean gap each row of `losses` recovers: mean(clean - L_k) / mean(clean -
    source) over questions (NaN when the mean gap is 0, e.g. for identical models)."""
    gap = np.mean(clean - source)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gap != 0, np.mean(clean[None] - losses, axis=1) / gap, np.nan)


def diff_summary(
    losses: Float[np.ndarray, "k batch"],
    clean: Float[np.ndarray, " batch"],
    source: Float[np.ndarray, " batch"],
    ks: Sequence[int],
    thresholds: Sequence[float] = THRESHOLDS,
    n_resamples: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict:
    """The diff circuit curve of one cell with its bootstrap band, and the edges for each
    threshold.

    `losses[i]` is each question's loss with the top `ks[i]` edges patched (the last k is every
    edge: the fully patched run), `clean` its model's own loss, `source` the other model's.
    Returns ks, curve, curve_low/high, gap (mean clean - source), patched (mean fully patched
    loss), patched_share (the curve at k = all), MIB's `cpr` and `cmd` of the curve over the
    fraction of edges k / n_edges, n, n_edges and per threshold "edges" {pct:
    [k, low, high, fraction of all edges]}; a k is NaN where the curve never reaches it
    (resamples without one are left out of its interval).
    """
    losses, clean, source = (np.asarray(x, float) for x in (losses, clean, source))
    n = clean.shape[0]
    if losses.shape != (len(ks), n) or source.shape != (n,):
        raise ValueError(
            f"losses {losses.shape}, clean {clean.shape} and source {source.shape} must be "
            f"[len(ks)={len(ks)}, batch], [batch] and [batch]"
        )
    if n < 2:
        raise ValueError("diff_summary needs at least 2 questions")
    n_edges = int(ks[-1])
    curve = gap_recovered(losses, clean, source)
    draws = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    gaps = np.mean(clean[draws] - source[draws], axis=1)  # [R]
    recovered = np.mean(clean[draws][:, None, :] - losses[:, draws].transpose(1, 0, 2), axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = np.where(gaps[:, None] != 0, recovered / gaps[:, None], np.nan)  # [R, k]
    tail = (1 - ci) / 2 * 100
    band = np.nanpercentile(boot, [tail, 100 - tail], axis=0) if np.isfinite(boot).any() else None
    edges = {}
    for t in thresholds:
        size = float(circuit_size(curve, ks, t))
        sizes = circuit_size(boot, ks, t)
        sizes = sizes[np.isfinite(sizes)]
        low, high = np.percentile(sizes, [tail, 100 - tail]) if sizes.size else (np.nan, np.nan)
        edges[str(round(t * 100))] = [size, float(low), float(high), size / n_edges]
    nan = [float("nan")] * len(ks)
    return {
        "ks": [int(k) for k in ks],
        "curve": curve.tolist(),
        "curve_low": nan if band is None else band[0].tolist(),
        "curve_high": nan if band is None else band[1].tolist(),
        "gap": float(np.mean(clean - source)),
        "patched": float(np.mean(losses[-1])),
        "patched_share": float(curve[-1]),
        "cpr": float(cpr(np.asarray(ks) / n_edges, curve)),
        "cmd": float(cmd(np.asarray(ks) / n_edges, curve)),
        "n": n,
        "n_edges": n_edges,
        "edges": edges,
    }


def top_edges(
    values: Float[np.ndarray, "batch n_upstream n_downstream"],
    upstream: Sequence[str],
    downstream: Sequence[str],
    edge_mask: Bool[np.ndarray, "n_upstream n_downstream"],
    count: int = 20,
) -> pd.DataFrame:
    """The `count` edges with the largest mean |score|: rank, upstream, downstream, mean score
    (its sign: the loss change when the edge takes the other model's output), mean |score|."""
    values = np.asarray(values, float)
    magnitude = np.where(edge_mask, np.abs(values).mean(0), -np.inf).ravel()
    order = np.argsort(-magnitude, kind="stable")[: min(count, int(np.sum(edge_mask)))]
    rows, cols = np.unravel_index(order, values.shape[1:])
    mean = values.mean(0)
    return pd.DataFrame(
        {
            "rank": np.arange(1, len(order) + 1),
            "upstream": [upstream[i] for i in rows],
            "downstream": [downstream[j] for j in cols],
            "mean score": mean[rows, cols],
            "mean |score|": magnitude[order],
        }
    )
