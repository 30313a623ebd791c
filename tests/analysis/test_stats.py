"""Paired bootstrap / permutation statistics of `compare`, and its rows laid out as Table 1.

Calibration measured with these seeds (numpy 2.4): the 95% bootstrap interval covered the true
activation-intensity difference in 40/40 datasets here (0.943 over 400 other seeds); with no
shift, 4/40 (activation intensity) and 6/40 (kurtosis) permutation p-values fell below 0.1
(0.098 and 0.100 over 400 other seeds) and 18/40, 24/40 below 0.5. The asserted bounds are the
central ~97% range of a Binomial(40, p) count at the nominal rate, so any correct
implementation passes them whatever its random stream.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from checker import unchecked

from rl_circuits.analysis.metrics import (
    METRICS,
    activation_intensity,
    information_complexity,
    sample_diversity,
)
from rl_circuits.analysis.report import render_report
from rl_circuits.analysis.stats import (
    COLUMNS,
    MIN_PAIRED_N,
    compare,
    format_value,
    table1_from_rows,
    weighted_sample_diversity,
)

GAIN, NOISE = 1.2, 0.5
# Entries before ~ s N(0, 1), after = s (1.2 N + 0.5 N'), E[s] = 1: E|N(0, v)| = sqrt(2v/pi).
TRUE_AI_DIFF = (math.sqrt(GAIN**2 + NOISE**2) - 1) * math.sqrt(2 / math.pi)


def shifted(rng, n=60, shape=(4, 6), gain=GAIN, noise=NOISE):
    """Paired scores: after = gain * before + noise, both scaled by a per-question factor."""
    scale = rng.uniform(0.5, 1.5, size=(n, 1, 1))
    z = rng.standard_normal((n, *shape))
    return scale * z, scale * (gain * z + noise * rng.standard_normal((n, *shape)))


def unshifted(rng, n=40, shape=(4, 6)):
    """Paired scores with exchangeable before/after (no effect): the null of the tests."""
    scale = rng.uniform(0.5, 1.5, size=(n, 1, 1))
    return scale * rng.standard_normal((n, *shape)), scale * rng.standard_normal((n, *shape))


def _slow(metric):
    """The same metric, hidden from compare's batched fast paths."""
    return lambda W, edge_mask=None: metric(W, edge_mask)


@pytest.mark.parametrize("use_mask", [False, True])
def test_batched_resampling_equals_materialised_resamples(use_mask):
    rng = np.random.default_rng(7)
    before, after = shifted(rng, n=25, shape=(5, 7))
    mask = rng.random((5, 7)) < 0.6 if use_mask else None
    if use_mask:
        before, after = before * mask, after * mask
    before[3] = 0.0  # a constant sample: undefined kurtosis / correlation must stay NaN
    metrics = {**METRICS, "ic_bins7": functools.partial(information_complexity, bins=7)}
    fast = compare(before, after, mask, metrics=metrics, n_resamples=40, seed=3)
    slow = compare(
        before,
        after,
        mask,
        metrics={k: _slow(m) for k, m in metrics.items()},
        n_resamples=40,
        seed=3,
    )
    numeric = [c for c in COLUMNS if c not in ("metric", "direction", "significant", "ci_note")]
    same = fast.metric != "sample_diversity"  # its bootstrap skips duplicate pairs (below)
    np.testing.assert_allclose(
        fast.loc[same, numeric].to_numpy(float),
        slow.loc[same, numeric].to_numpy(float),
        rtol=1e-9,
        atol=1e-12,
    )
    assert fast["significant"].tolist() == slow["significant"].tolist()
    assert fast.loc[fast.metric == "distribution_kurtosis", "before"].isna().all()
    assert fast.loc[~same, "before"].isna().all()
    # Permutation sets hold no duplicates: diversity's p-value matches the materialised one.
    before, after = shifted(np.random.default_rng(8), n=25, shape=(5, 7), noise=2.0)
    fast, slow = (
        compare(before, after, mask, metrics={"d": d}, n_resamples=100, seed=3).iloc[0]
        for d in (sample_diversity, _slow(sample_diversity))
    )
    assert 0.02 < fast.p_value < 0.9
    assert fast.p_value == slow.p_value and fast["diff"] == pytest.approx(slow["diff"])


def test_bootstrap_diversity_skips_pairs_of_a_duplicated_question():
    rng = np.random.default_rng(2)
    pool = rng.standard_normal((6, 3, 4)) + rng.standard_normal((1, 3, 4))
    draws = np.array([0, 0, 2, 3, 3, 3])  # questions 0 and 3 drawn more than once
    weights = np.bincount(draws, minlength=6)[None, :].astype(float)
    corr = np.corrcoef(pool.reshape(6, -1))
    pairs = [(a, b) for a in range(6) for b in range(a + 1, 6) if draws[a] != draws[b]]
    expected = 1 - np.mean([corr[draws[a], draws[b]] for a, b in pairs])
    assert weighted_sample_diversity(pool, None)(weights)[0] == pytest.approx(expected)
    # Without duplicates it is plain sample diversity.
    ones = np.ones((1, 6))
    assert weighted_sample_diversity(pool, None)(ones)[0] == pytest.approx(sample_diversity(pool))
    # So each model's bootstrap interval brackets its own value (the naive one sits ~1/n low).
    before, after = shifted(np.random.default_rng(4), n=30)
    row = compare(before, after, metrics=["sample_diversity"], n_resamples=300).iloc[0]
    assert row.before_ci_low < row.before < row.before_ci_high
    assert row.after_ci_low < row.after < row.after_ci_high


def test_compare_columns_values_and_seed():
    before, after = shifted(np.random.default_rng(0), n=30)
    result = compare(before, after, n_resamples=200, seed=1)
    assert list(result.columns) == list(COLUMNS)
    assert result["metric"].tolist() == list(METRICS)
    row = result.set_index("metric").loc["activation_intensity"]
    assert row["before"] == pytest.approx(activation_intensity(before))
    assert row["after"] == pytest.approx(activation_intensity(after))
    assert row["diff"] == pytest.approx(row["after"] - row["before"])
    assert row["before_ci_low"] <= row["before"] <= row["before_ci_high"]
    assert row["after_ci_low"] <= row["after"] <= row["after_ci_high"]
    assert row["n"] == 30 and row["n_resamples"] == 200 and row["ci"] == 0.95
    pd.testing.assert_frame_equal(result, compare(before, after, n_resamples=200, seed=1))
    other = compare(before, after, n_resamples=200, seed=2)
    assert not np.allclose(other["ci_low"], result["ci_low"])


def test_bootstrap_interval_covers_known_shift():
    covered = []
    for i in range(40):
        before, after = shifted(np.random.default_rng(100 + i))
        row = compare(before, after, metrics=["activation_intensity"], seed=i).iloc[0]
        covered.append(row.ci_low <= TRUE_AI_DIFF <= row.ci_high)
        if i == 0:
            assert row.ci_low < row["diff"] < row.ci_high
            assert row.before_ci_low < row.before < row.before_ci_high
    # Nominal 0.95 over 40 datasets: P(Binomial(40, 0.95) <= 33) = 0.003. Measured: 40/40.
    assert np.mean(covered) >= 34 / 40


@pytest.mark.parametrize("metric", ["activation_intensity", "distribution_kurtosis"])
def test_permutation_p_values_roughly_uniform_without_shift(metric):
    p = []
    for i in range(40):
        before, after = unshifted(np.random.default_rng(1000 + i))
        p.append(compare(before, after, metrics=[metric], n_resamples=500, seed=i).p_value[0])
    p = np.array(p)
    assert ((p > 0) & (p <= 1)).all()
    # Uniform p: #(p < 0.1) ~ Binomial(40, 0.1), 1..8 with prob 0.97; #(p < 0.5) 12..28, 0.99.
    assert 1 / 40 <= np.mean(p < 0.1) <= 8 / 40
    assert 0.3 <= np.mean(p < 0.5) <= 0.7


def test_clear_shifts_are_detected_in_the_right_direction():
    rng = np.random.default_rng(5)
    before, after = shifted(rng, n=60)
    row = compare(before, after, metrics=["activation_intensity"], seed=0).iloc[0]
    assert row.p_value < 0.01 and row.significant and row.direction == "up"
    assert row.p_value >= 1 / 1001  # the +1 correction

    # A shared pattern plus per-question noise; more noise after -> samples less alike.
    pattern = rng.standard_normal((1, 6, 8))
    before = pattern + 0.5 * rng.standard_normal((50, 6, 8))
    after = pattern + 1.0 * rng.standard_normal((50, 6, 8))
    row = compare(before, after, metrics=["sample_diversity"], n_resamples=500).iloc[0]
    assert row.p_value < 0.01 and row.significant and row.direction == "up"

    # Normal entries before, heavy-tailed (t, 5 dof) after: kurtosis rises.
    before = rng.standard_normal((50, 6, 8))
    after = rng.standard_t(5, size=(50, 6, 8))
    row = compare(before, after, metrics=["distribution_kurtosis"], n_resamples=500).iloc[0]
    assert row.p_value < 0.01 and row.significant and row.direction == "up"


def test_compare_rejects_bad_input():
    before, after = unshifted(np.random.default_rng(0), n=5)
    with pytest.raises(ValueError, match="same questions"), unchecked():  # hint: one batch
        compare(before, after[:4])
    with pytest.raises(ValueError, match="unknown metric"):
        compare(before, after, metrics=["nope"])
    with pytest.raises(ValueError, match="at least 2"):
        compare(before[:1], after[:1])


def _few(n, seed=0):
    rng = np.random.default_rng(seed)
    before = rng.standard_normal((n, 3, 5))
    return before, before + 0.3 * rng.standard_normal((n, 3, 5))


def test_small_n_diversity_interval_is_a_number_or_a_stated_reason():
    # n = 4: 3 of 200 resamples draw one question four times (P = 1/64 each) and have no pair.
    with pytest.warns(UserWarning, match="MIN_PAIRED_N"):
        row = compare(*_few(4), metrics=["sample_diversity"], n_resamples=200).iloc[0]
    assert row.ci_low < row["diff"] < row.ci_high and not np.isnan(row.before_ci_low)
    assert row.ci_note.startswith("interval over the other 197: 3 of 200 bootstrap resamples")
    # n = 2: half the resamples draw one question: no interval, and the reason says so.
    with pytest.warns(UserWarning, match="MIN_PAIRED_N"):
        row = compare(*_few(2), metrics=["sample_diversity"], n_resamples=200).iloc[0]
    assert np.isnan(row.ci_low) and not row.significant
    assert row.ci_note.startswith("no interval: ") and "draws one question" in row.ci_note
    # Every resample defined: no note.
    row = compare(*_few(30), metrics=["activation_intensity"], n_resamples=200).iloc[0]
    assert row.ci_note == "" and np.isfinite(row.ci_low)


def test_compare_warns_below_the_documented_minimum_n_only():
    assert MIN_PAIRED_N == 20
    with pytest.warns(UserWarning, match="19 paired samples, fewer than MIN_PAIRED_N = 20"):
        compare(*_few(19), metrics=["activation_intensity"], n_resamples=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compare(*_few(20), metrics=["activation_intensity"], n_resamples=50)


def test_table1_and_report_state_the_star_test_missing_intervals_and_small_n():
    rows = []
    for pair, n in (("Two", 2), ("Four", 4)):
        with pytest.warns(UserWarning):
            result = compare(*_few(n), n_resamples=200)
        rows += result.assign(pair=pair, algorithm="GRPO", dataset="MATH", alpha=0.5).to_dict(
            "records"
        )
    table = table1_from_rows(rows)
    no_interval = table.frame.loc[("MATH", "Sample Div.", 0.5), ("Two", "+GRPO")]
    assert no_interval.endswith("†")
    assert not table.frame.loc[("MATH", "Sample Div.", 0.5), ("Four", "+GRPO")].endswith("†")
    note = table.note
    assert "the star is the bootstrap's" in note and "permutation p-value" in note
    assert "†: no interval of the difference: 1" in note and "draws one question only" in note
    assert "Warning: fewer than 20 paired questions (Two, MATH: n = 2; Four, MATH: n = 4)" in note
    details = table.details().set_index(["metric", "pair"])
    interval = details.loc[("Sample Div.", "Two"), "95% interval"]
    assert interval.startswith("none: ") and "draws one question only" in interval
    assert details.loc[("Sample Div.", "Four"), "95% interval"].startswith("[")
    assert "\\textdagger{}" in table.to_latex() and "Warning: fewer than 20" in table.to_markdown()
    page = render_report(title="t", table=table, figures={})
    assert "no interval of the difference" in page and "none: " in page
    # Stored rows (compare.jsonl) lose NaN to null and may predate ci_note: still a reason.
    old = [
        {**r, "ci_low": None, "ci_high": None} for r in rows if r["metric"] == "sample_diversity"
    ]
    for r in old:
        r.pop("ci_note")
    reasons = table1_from_rows(old).details()["95% interval"]
    assert (reasons == "none: no bootstrap resample gave a value").all()


def test_table1_from_compare_output():
    rng = np.random.default_rng(3)
    rows = []
    for alpha in (0.1, 0.3):
        before, after = shifted(rng, n=20)
        result = compare(before, after, n_resamples=100)
        rows += result.assign(pair="Toy", algorithm="GRPO", dataset="MATH", alpha=alpha).to_dict(
            "records"
        )
    table = table1_from_rows(rows)
    assert table.frame.shape == (8, 2)
    three = ["activation_intensity", "information_complexity", "distribution_kurtosis"]
    paper = table1_from_rows(pd.DataFrame(rows), metrics=three[::-1])
    assert paper.frame.index.get_level_values("metric").unique().tolist() == [
        "Dist. Kurt.",
        "Info. Complex.",
        "Act. Intens.",
    ]
    assert "95% paired bootstrap" in table.note
    cell = table.frame.loc[("MATH", "Act. Intens.", 0.3), ("Toy", "+GRPO")]
    assert cell.startswith(format_value(rows[4]["after"])) and "↑" in cell
    with pytest.raises(ValueError, match="two rows"):
        table1_from_rows(rows + rows[:1])
    with pytest.raises(ValueError, match="lack"):
        table1_from_rows([{"pair": "x"}])
