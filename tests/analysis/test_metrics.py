"""The Sec. 4.2 metrics against values worked out by hand on tiny matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from checker import unchecked

from rl_circuits.analysis.metrics import (
    METRICS,
    activation_intensity,
    distribution_kurtosis,
    information_complexity,
    output_entropy,
    relative_change,
    sample_diversity,
)

# Two samples of a 2 x 3 matrix; the last column is not an edge (its scores are 0).
W = np.array(
    [
        [[1.0, -2.0, 0.0], [0.0, 3.0, 0.0]],
        [[2.0, 0.0, 0.0], [-1.0, 1.0, 0.0]],
    ],
    dtype=np.float32,
)
MASK = np.array([[True, True, False], [True, True, False]])


def test_activation_intensity_all_and_valid():
    # |W| sums to 6 + 4 = 10 over 12 entries, or over the 8 existing edges.
    assert activation_intensity(W) == pytest.approx(10 / 12)
    assert activation_intensity(W, MASK) == pytest.approx(10 / 8)


def test_information_complexity_all_and_valid():
    # All |W|: six 0s, three 1s, two 2s, one 3. Three bins over [0, 3]: [0,1) [1,2) [2,3].
    # p = (6, 3, 3) / 12 -> H = 0.5 ln 2 + 0.5 ln 4 = 1.5 ln 2.
    assert information_complexity(W, bins=3, eps=0.0) == pytest.approx(1.5 * math.log(2))
    # Valid edges only: two 0s, three 1s, two 2s, one 3 -> p = (2, 3, 3) / 8.
    expected = -(0.25 * math.log(0.25) + 2 * 0.375 * math.log(0.375))
    assert information_complexity(W, MASK, bins=3, eps=0.0) == pytest.approx(expected)
    # eps only guards log(0): it changes the value by about eps.
    assert information_complexity(W, bins=3) == pytest.approx(1.5 * math.log(2), abs=1e-9)


def test_information_complexity_matches_numpy_histogram_default_bins():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3, 4, 5))
    counts, _ = np.histogram(np.abs(X).ravel(), bins=100)
    p = counts / counts.sum()
    expected = -(p * np.log(p + 1e-12)).sum()
    assert information_complexity(X) == pytest.approx(expected)


def test_distribution_kurtosis_by_hand_and_against_scipy():
    # One sample (0, 0, 0, 4): mean 1, deviations (-1, -1, -1, 3): m2 = 3, m4 = 21.
    one = np.array([[[0.0, 0.0], [0.0, 4.0]]])
    assert distribution_kurtosis(one) == pytest.approx(21 / 9 - 3)

    per_sample = scipy.stats.kurtosis(W.reshape(2, -1), axis=1, fisher=True, bias=True)
    assert distribution_kurtosis(W) == pytest.approx(per_sample.mean())
    valid = scipy.stats.kurtosis(W[:, MASK], axis=1, fisher=True, bias=True)
    assert distribution_kurtosis(W, MASK) == pytest.approx(valid.mean())
    assert distribution_kurtosis(W) != pytest.approx(distribution_kurtosis(W, MASK))


def test_sample_diversity_by_hand():
    # A = (1, -1, 0), B = -A, C = A: correlations -1, 1, -1 -> mean -1/3 -> diversity 4/3.
    three = np.array([[[1.0, -1.0, 0.0]], [[-1.0, 1.0, 0.0]], [[1.0, -1.0, 0.0]]])
    assert sample_diversity(three) == pytest.approx(4 / 3)
    # A = (1, 2, 0), B = (2, 1, 0): correlation 1/2 over all entries, -1 over the first two.
    two = np.array([[[1.0, 2.0, 0.0]], [[2.0, 1.0, 0.0]]])
    assert sample_diversity(two) == pytest.approx(0.5)
    assert sample_diversity(two, np.array([[True, True, False]])) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="at least 2"):
        sample_diversity(two[:1])


def test_sample_diversity_matches_corrcoef():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((6, 3, 4))
    corr = np.corrcoef(X.reshape(6, -1))
    expected = 1 - corr[np.triu_indices(6, k=1)].mean()
    assert sample_diversity(X) == pytest.approx(expected)


def test_output_entropy_by_hand_zero_rows_and_mask():
    X = np.array(
        [
            [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]],  # row 0: p = (1/2, 1/2, 0) -> ln 2
            [[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]],  # row 0: one edge -> 0; row 1 all zero -> 0
        ]
    )
    np.testing.assert_allclose(output_entropy(X), [math.log(2) / 2, 0.0])
    assert not np.isnan(output_entropy(X)).any()
    # A score on a non-edge counts for "all" but not for "valid".
    Y = np.array([[[1.0, 1.0, 2.0]]])
    mask = np.array([[True, True, False]])
    assert output_entropy(Y)[0] == pytest.approx(1.5 * math.log(2))
    assert output_entropy(Y, mask)[0] == pytest.approx(math.log(2))


def test_relative_change_by_hand_nan_on_non_edges():
    after = W * np.array([[[2.0, 1.0, 0.0], [1.0, 0.5, 0.0]]], dtype=np.float32)
    change = relative_change(W, after)
    assert change.shape == (2, 3)
    # Edge (0, 0): before mean |W| (1 + 2) / 2 = 1.5, after (2 + 4) / 2 = 3 -> +100 %.
    assert change[0, 0] == pytest.approx(1.0)
    assert change[0, 1] == pytest.approx(0.0)
    assert change[1, 1] == pytest.approx(-0.5)
    assert np.isnan(change[:, 2]).all()


def test_torch_input_matches_numpy():
    tensor, mask = torch.from_numpy(W), torch.from_numpy(MASK)
    for name, metric in METRICS.items():
        assert metric(tensor, mask) == pytest.approx(metric(W, MASK)), name
    np.testing.assert_allclose(output_entropy(tensor, mask), output_entropy(W, MASK))
    np.testing.assert_allclose(relative_change(tensor, tensor * 2), np.where(MASK, 1.0, np.nan))


def test_metrics_mapping_and_shape_errors():
    assert list(METRICS) == [
        "activation_intensity",
        "information_complexity",
        "distribution_kurtosis",
        "sample_diversity",
    ]
    assert all(isinstance(metric(W), float) for metric in METRICS.values())
    with unchecked():  # a matrix, a mask of other edges: what the hints refuse, explained
        with pytest.raises(ValueError, match="n_upstream, n_downstream"):
            activation_intensity(W[0])
        with pytest.raises(ValueError, match="edge_mask"):
            activation_intensity(W, MASK[:, :2])
