"""How much of a model's behaviour its top-k edges carry, and how that changes with training.

Pure functions over the losses that `evaluate_circuit` measured on a grid of top-k circuits:
faithfulness f(k) = (L_none - L_k) / (L_none - L_clean), the circuit size (the smallest grid k
with mean f(k) >= a threshold), the MIB circuit track's summaries CPR and CMD of a curve, and
the before/after comparison of sizes with a paired bootstrap interval and a paired permutation
p-value over questions, like Table 1's metrics.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from jaxtyping import Bool, Float

from rl_circuits.engine.circuits import RANKINGS, top_k_circuits


def faithfulness(
    losses: Float[np.ndarray, "k batch"],
    clean: Float[np.ndarray, " batch"],
    none: Float[np.ndarray, " batch"],
) -> Float[np.ndarray, "k batch"]:
    """f(k) = (L_none - L_k) / (L_none - L_clean) per sample: 1 is the whole model, 0 nothing
    (NaN for a sample whose ablated loss equals its clean loss)."""
    span = none - clean
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(span != 0, (none - losses) / span, np.nan)


# The MIB circuit track's grid of circuit sizes, as fractions of the graph's edges (0.1% ... 100%):
# `percentages` in `evaluate_area_under_curve`, MIB_circuit_track/evaluation.py
# (hannamw/MIB-circuit-track).
MIB_FRACTIONS: tuple[float, ...] = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def mib_edge_counts(n_edges: int, fractions: Sequence[float] = MIB_FRACTIONS) -> list[int]:
    """The circuit sizes MIB evaluates for a graph of `n_edges` scored edges: int(fraction *
    n_edges), rounded down as `evaluate_area_under_curve` does."""
    return [int(x * n_edges) for x in fractions]


# The x and y of a curve on the fraction of edges kept (lists or arrays), and its area: one per
# leading index of the curve, a float for one curve.
Fractions = Sequence[float] | Float[np.ndarray, " k"]
Curve = Sequence[float] | Float[np.ndarray, "*rest k"]
Area = Float[np.ndarray, "*rest"] | float


def _trapezoid(fractions: Fractions, y: Curve) -> Area:
    x = np.asarray(fractions, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.ndim != 1 or x.size < 2 or y.shape[-1:] != x.shape:
        raise ValueError(
            f"fractions ({x.size} points) and the curve's last axis ({y.shape}) must match, "
            "with at least 2 points; pass one faithfulness value per fraction (MIB_FRACTIONS)"
        )
    if np.any(np.diff(x) <= 0):
        raise ValueError(f"fractions {x.tolist()} must increase; sort them with their curve")
    return np.sum(np.diff(x) * (y[..., 1:] + y[..., :-1]) / 2, axis=-1)


def cpr(fractions: Fractions, f: Curve) -> Area:
    """MIB's circuit performance ratio: the area under the faithfulness curve over the fraction
    of edges kept, trapezoid rule on a linear axis (higher is better).

    CPR = sum_i (x_{i+1} - x_i) (f_i + f_{i+1}) / 2, x_i = `fractions`, f_i = f at x_i; the
    `area_under` of `evaluate_area_under_curve` in MIB_circuit_track/evaluation.py
    (hannamw/MIB-circuit-track, log_scale=False, its default and the leaderboard's). MIB's f_i
    is (m(C_i) - m(empty)) / (m(model) - m(empty)) with each m the mean metric over the dataset
    (a ratio of means); the curve's last axis is the fractions, any leading axes are kept.
    """
    return _trapezoid(fractions, f)


def cmd(fractions: Fractions, f: Curve) -> Area:
    """MIB's circuit-model distance: the area under |1 - f| over the fraction of edges kept,
    trapezoid rule on a linear axis (lower is better; 0 when every circuit matches the model).

    CMD = sum_i (x_{i+1} - x_i) (|1 - f_i| + |1 - f_{i+1}|) / 2; the `area_from_1` of
    `evaluate_area_under_curve` in MIB_circuit_track/evaluation.py (hannamw/MIB-circuit-track).
    """
    return _trapezoid(fractions, np.abs(1.0 - np.asarray(f, dtype=float)))


def circuit_size(
    curve: Float[np.ndarray, "*rest k"], ks: Sequence[int], threshold: float
) -> Float[np.ndarray, "*rest"]:
    """The smallest grid k whose faithfulness reaches `threshold` (NaN where none does)."""
    reached = curve >= threshold
    first = reached.argmax(-1)
    return np.where(reached.any(-1), np.asarray(ks, dtype=float)[first], np.nan)


def jaccard(a: Bool[np.ndarray, "*shape"], b: Bool[np.ndarray, "*shape"]) -> float:
    """|a & b| / |a | b| of two edge sets (1.0 for two empty sets)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def overlap_curve(
    before: Float[np.ndarray, "n_upstream n_downstream"],
    after: Float[np.ndarray, "n_upstream n_downstream"],
    edge_mask: Bool[np.ndarray, "n_upstream n_downstream"],
    ks: Sequence[int],
    ranking: str = "abs",
) -> list[float]:
    """Jaccard overlap of the two models' top-k circuits at each grid k."""
    if ranking not in RANKINGS:
        raise ValueError(f"unknown ranking {ranking!r}; choose one of {', '.join(RANKINGS)}")
    a = top_k_circuits(before, edge_mask, ks, ranking)
    b = top_k_circuits(after, edge_mask, ks, ranking)
    return [jaccard(x, y) for x, y in zip(a, b, strict=True)]


def compare_circuit_sizes(
    before: Float[np.ndarray, "k batch"],
    after: Float[np.ndarray, "k batch"],
    ks: Sequence[int],
    thresholds: Sequence[float],
    n_resamples: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> tuple[list[dict], dict]:
    """Circuit sizes of the mean faithfulness curves, before vs after, over paired questions.

    `before`/`after` are per-question faithfulness [k, batch] on the same questions. Returns one
    row per threshold (metric `circuit_size_<pct>`: before, after, diff, percentile bootstrap
    interval of diff, two-sided permutation p-value, significant, n) and the mean curves with
    their bootstrap bands. A size is NaN where the mean curve never reaches the threshold;
    resamples where either size is NaN are left out of the interval.
    """
    b, a = np.asarray(before, float), np.asarray(after, float)
    if b.shape != a.shape or b.ndim != 2 or b.shape[0] != len(ks):
        raise ValueError(
            f"before {b.shape} and after {a.shape} must both be [len(ks)={len(ks)}, batch]"
        )
    n = b.shape[1]
    if n < 2:
        raise ValueError("compare_circuit_sizes needs at least 2 paired questions")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_resamples, n))
    swap = rng.random((n_resamples, n)) < 0.5
    curve_b, curve_a = np.nanmean(b, 1), np.nanmean(a, 1)
    boot_b = np.nanmean(b[:, draws], 2).T  # [R, k]
    boot_a = np.nanmean(a[:, draws], 2).T
    perm_b = np.nanmean(np.where(swap[:, None, :], a[None], b[None]), 2)  # [R, k]
    perm_a = np.nanmean(np.where(swap[:, None, :], b[None], a[None]), 2)
    tail = (1 - ci) / 2 * 100
    rows = []
    for t in thresholds:
        size_b, size_a = circuit_size(curve_b, ks, t), circuit_size(curve_a, ks, t)
        diff = float(size_a - size_b)
        boot = circuit_size(boot_a, ks, t) - circuit_size(boot_b, ks, t)
        boot = boot[np.isfinite(boot)]
        low, high = np.percentile(boot, [tail, 100 - tail]) if boot.size else (np.nan, np.nan)
        perm = circuit_size(perm_a, ks, t) - circuit_size(perm_b, ks, t)
        p = (1 + np.sum(np.abs(np.nan_to_num(perm, nan=0.0)) >= abs(diff))) / (1 + n_resamples)
        rows.append(
            {
                "metric": f"circuit_size_{round(t * 100)}",
                "before": float(size_b),
                "after": float(size_a),
                "diff": diff,
                "ci_low": float(low),
                "ci_high": float(high),
                "p_value": float(p) if np.isfinite(diff) else np.nan,
                "significant": bool(np.isfinite(low) and (low > 0 or high < 0)),
                "n": n,
            }
        )
    band = {
        "ks": list(ks),
        "before": curve_b.tolist(),
        "after": curve_a.tolist(),
        "before_low": np.percentile(boot_b, tail, 0).tolist(),
        "before_high": np.percentile(boot_b, 100 - tail, 0).tolist(),
        "after_low": np.percentile(boot_a, tail, 0).tolist(),
        "after_high": np.percentile(boot_a, 100 - tail, 0).tolist(),
    }
    return rows, band
