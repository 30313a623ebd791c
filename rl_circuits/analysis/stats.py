"""Paired before/after statistics of the metrics (`compare`), the rows of Table 1.

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
results out as in the paper (`rl_circuits.analysis.table1`, whose names this module
re-exports).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

import numpy as np
import pandas as pd
from jaxtyping import Bool, Float

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
from rl_circuits.analysis.table1 import (
    METRIC_LABELS,
    MIN_PAIRED_N,
    Table1,
    direction,
    format_value,
    table1_from_rows,
)

__all__ = [
    "METRIC_LABELS",
    "MIN_PAIRED_N",
    "Table1",
    "compare",
    "format_value",
    "table1_from_rows",
]

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


def weighted_sample_diversity(
    pool: Float[np.ndarray, "pool n_upstream n_downstream"],
    mask: Bool[np.ndarray, "n_upstream n_downstream"] | None,
) -> Batched:
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
                "direction": direction(diff),
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
