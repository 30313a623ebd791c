"""The diff circuit curve and its edge counts, on losses whose answers are known by hand."""

import math

import numpy as np
import pytest

from rl_circuits.analysis.diff import diff_summary, gap_metric, gap_recovered, top_edges
from rl_circuits.analysis.stats import table1_from_rows


def test_gap_recovered_is_a_ratio_of_means_over_questions():
    clean, source = np.array([2.0, 4.0]), np.array([1.0, 1.0])  # gaps 1 and 3: mean 2
    losses = np.array([[2.0, 4.0], [1.5, 2.5], [1.0, 1.0], [0.0, 1.0]])
    # recovered (0.5 + 1.5) / 2 = 1 of 2; the last overshoots: (2 + 3) / 2 / 2 = 1.25
    assert gap_recovered(losses, clean, source).tolist() == [0.0, 0.5, 1.0, 1.25]
    assert np.isnan(gap_recovered(losses, clean, clean)).all()  # identical models: no gap


def _cell(shares, n=40, noise=0.01, seed=0):
    """Per-question losses whose mean curve is `shares` (question gaps 0.5 to 1.5)."""
    rng = np.random.default_rng(seed)
    clean = 3.0 + rng.random(n)
    gap = 0.5 + rng.random(n)
    source = clean - gap
    losses = clean[None] - np.asarray(shares)[:, None] * gap[None]
    return losses + noise * rng.standard_normal(losses.shape), clean, source


def test_diff_summary_counts_the_edges_for_each_share_of_the_gap():
    ks = [1, 2, 4, 8, 16]
    losses, clean, source = _cell([0.1, 0.55, 0.85, 0.95, 1.0])
    s = diff_summary(losses, clean, source, ks, n_resamples=300)
    assert s["ks"] == ks and s["n"] == 40 and s["n_edges"] == 16
    assert np.allclose(s["curve"], [0.1, 0.55, 0.85, 0.95, 1.0], atol=0.02)
    band = zip(s["curve_low"], s["curve"], s["curve_high"], strict=True)
    assert all(low <= c <= high for low, c, high in band)
    assert s["edges"]["50"] == [2.0, 2.0, 2.0, 2 / 16]
    assert s["edges"]["80"] == [4.0, 4.0, 4.0, 4 / 16]
    assert s["edges"]["90"] == [8.0, 8.0, 8.0, 8 / 16]
    assert math.isclose(s["gap"], float(np.mean(clean - source)))
    assert math.isclose(s["patched"], float(np.mean(losses[-1])))
    assert math.isclose(s["patched_share"], s["curve"][-1])
    # MIB's areas of the curve over the fraction of edges, by the trapezoid rule written out
    x, f = np.asarray(ks) / 16, np.asarray(s["curve"])
    area = sum((x[i + 1] - x[i]) * (f[i] + f[i + 1]) / 2 for i in range(len(ks) - 1))
    assert math.isclose(s["cpr"], area)
    g = np.abs(1 - f)
    assert math.isclose(s["cmd"], sum((x[i + 1] - x[i]) * (g[i] + g[i + 1]) / 2 for i in range(4)))


def test_a_share_never_reached_has_no_edge_count_and_noise_widens_the_interval():
    ks = [1, 3, 9, 27]
    losses, clean, source = _cell([0.3, 0.6, 0.79, 0.7])  # the full patch recovers 70%
    s = diff_summary(losses, clean, source, ks, n_resamples=300)
    assert s["edges"]["50"][0] == 3.0 and math.isnan(s["edges"]["90"][0])
    noisy = diff_summary(*_cell([0.3, 0.79, 0.81, 1.0], n=10, noise=0.1), ks, n_resamples=300)
    k, low, high, _ = noisy["edges"]["80"]
    assert low == 3.0 and high > 3.0 and low <= k <= high  # resamples disagree on where
    with pytest.raises(ValueError, match="must be"):
        diff_summary(losses[:2], clean, source, ks)


def test_top_edges_ranks_existing_edges_by_mean_absolute_score():
    values = np.zeros((2, 2, 3))
    values[:, 0, 1] = [-3.0, -1.0]  # mean -2, |.| 2
    values[:, 1, 2] = [1.0, 0.0]  # mean 0.5
    values[:, 1, 0] = [9.0, 9.0]  # not an edge
    mask = np.array([[True, True, True], [False, True, True]])
    table = top_edges(values, ["a", "b"], ["x", "y", "z"], mask, count=2)
    assert table[["upstream", "downstream"]].values.tolist() == [["a", "y"], ["b", "z"]]
    assert table["mean score"].tolist() == [-2.0, 0.5]
    assert table["mean |score|"].tolist() == [2.0, 0.5] and table["rank"].tolist() == [1, 2]


def test_table1_shows_the_edges_for_80_percent_of_the_gap_in_the_after_column():
    common = {"pair": "p", "algorithm": "GRPO", "dataset": "d", "alpha": 1.0}
    rows = [
        {**common, "metric": "activation_intensity", "before": 1.0, "after": 2.0},
        {**common, "metric": gap_metric(0.8, "after_into_before"), "before": None, "after": 12},
    ]
    table = table1_from_rows(rows)
    markdown = table.to_markdown()
    assert "| Edges for 80% of the gap (after→before) | 1 | - | 1.20e+1 |" in markdown
