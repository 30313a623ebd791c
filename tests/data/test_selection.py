"""Question selection (paper Section 3.3): hand-computed tables for every rule combination."""

from __future__ import annotations

import json

import numpy as np
import pytest
from checker import unchecked

from rl_circuits.data.selection import Selection, reference_length, select, t_cut
from rl_circuits.errors import ConfigError, DataError, SelectionError


def row(qid, before, after, *, correct=(True, True), prompts=(40, 40)):
    return {
        "id": qid,
        "prompt_len_before": prompts[0],
        "prompt_len_after": prompts[1],
        "len_before": before,
        "len_after": after,
        "correct_before": correct[0],
        "correct_after": correct[1],
    }


# After the first two filters (q6 wrong, q7 unequal prompts) seven questions remain:
#   before: 100 + 80 + 20 + 300 + 100 + 50 + 58 = 708 -> mean 708/7 = 101.142857
#   after:  100 + 120 + 30 + 200 + 160 + 160 + 70 = 840 -> mean 120
#   refer "min" = 708/7 = 101.142857; refer "mean" (Eq. 10) = (708/7 + 120)/2 = 774/7 = 110.571
# Pair means: q1 100, q2 100, q3 25, q4 250, q5 130, q8 105, q9 64.
# Balance |Tb-Ta|/mean: q1 0, q2 0.4, q5 0.4615, q8 1.0476, q9 0.1875.
TABLE = [
    row("q1", 100, 100),
    row("q2", 80, 120),
    row("q3", 20, 30),
    row("q4", 300, 200),
    row("q5", 100, 160),
    row("q6", 100, 100, correct=(False, True)),
    row("q7", 100, 100, prompts=(50, 51)),
    row("q8", 50, 160),
    row("q9", 58, 70),
]
REFER_MIN = 708 / 7
REFER_MEAN = 774 / 7


@pytest.mark.parametrize(
    ("reference", "window", "refer", "kept", "removed"),
    [
        # window [50.57, 151.71] on pair means keeps q1 q2 q5 q8 q9; balance removes q8.
        ("min", "pair_mean", REFER_MIN, ("q1", "q2", "q5", "q9"), [1, 1, 2, 1, 0]),
        # same window on each length: q5 (160) and q8 (50, 160) fall out.
        ("min", "each", REFER_MIN, ("q1", "q2", "q9"), [1, 1, 4, 0, 0]),
        # window [55.29, 165.86] on pair means: as for min; balance removes q8.
        ("mean", "pair_mean", REFER_MEAN, ("q1", "q2", "q5", "q9"), [1, 1, 2, 1, 0]),
        # on each length: q8 (50) falls out, q5 (160) and q9 (58) stay.
        ("mean", "each", REFER_MEAN, ("q1", "q2", "q5", "q9"), [1, 1, 3, 0, 0]),
    ],
)
def test_hand_computed_selection(reference, window, refer, kept, removed):
    sel = select(TABLE, reference=reference, window=window)
    assert sel.ids == kept
    assert sel.refer == pytest.approx(refer)
    assert [stage["removed"] for stage in sel.report["filters"]] == removed
    assert [stage["filter"] for stage in sel.report["filters"]] == [
        "both_correct",
        "equal_prompt_len",
        "length_window",
        "balance",
        "sample",
    ]
    assert sel.report["entering"] == 9
    assert sel.report["kept"] == len(kept)


def test_t_cut_per_alpha_for_both_references():
    # 0.03 * 101.14 = 3.03, 0.1 -> 10.11, 0.3 -> 30.34, 0.5 -> 50.57
    assert select(TABLE, reference="min").t_cut == {0.03: 3, 0.1: 10, 0.3: 30, 0.5: 50}
    # 0.03 * 110.57 = 3.32, 0.1 -> 11.06, 0.3 -> 33.17, 0.5 -> 55.29
    assert select(TABLE, reference="mean").t_cut == {0.03: 3, 0.1: 11, 0.3: 33, 0.5: 55}
    assert t_cut(0.001, REFER_MIN) == 1  # int(0.10) = 0, floored to one token


def test_reference_length_rules():
    passing = [r for r in TABLE if r["id"] not in ("q6", "q7")]
    assert reference_length(passing, "min") == pytest.approx(REFER_MIN)
    assert reference_length(passing, "mean") == pytest.approx(REFER_MEAN)


def test_report_lengths_and_short_answers():
    # kept q1 (100,100) q2 (80,120) q5 (100,160) q9 (58,70); T_cut(0.6) = int(60.69) = 60
    sel = select(TABLE, alphas=(0.03, 0.6), reference="min", window="pair_mean")
    report = sel.report
    assert report["lengths"]["before"] == {"mean": (100 + 80 + 100 + 58) / 4, "min": 58, "max": 100}
    assert report["lengths"]["after"] == {"mean": (100 + 120 + 160 + 70) / 4, "min": 70, "max": 160}
    assert report["t_cut"] == {"0.03": 3, "0.6": 60}
    assert report["shorter_than_t_cut"]["0.03"] == {"count": 0, "ids": []}
    assert report["shorter_than_t_cut"]["0.6"] == {"count": 1, "ids": ["q9"]}
    assert report["window_bounds"] == pytest.approx([0.5 * REFER_MIN, 1.5 * REFER_MIN])


def test_to_dict_is_json_and_round_trips():
    sel = select(TABLE, reference="min", window="pair_mean")
    data = json.loads(json.dumps(sel.to_dict()))
    assert data["ids"] == ["q1", "q2", "q5", "q9"]
    assert data["t_cut"] == {"0.03": 3, "0.1": 10, "0.3": 30, "0.5": 50}
    assert Selection.from_dict(data) == sel


def many_rows(count):
    return [row(f"r{i}", 100 + i % 7, 100 + i % 5) for i in range(count)]


def test_seeded_sample_is_reproducible_and_in_input_order():
    rows = many_rows(50)
    first = select(rows, n=10, seed=42)
    assert first.ids == select(rows, n=10, seed=42).ids
    assert len(first.ids) == 10 and len(set(first.ids)) == 10
    positions = [int(qid[1:]) for qid in first.ids]
    assert positions == sorted(positions)
    drawn = np.random.default_rng(42).choice(50, size=10, replace=False)
    assert positions == sorted(int(i) for i in drawn)
    assert select(rows, n=10, seed=7).ids != first.ids
    assert first.report["filters"][-1] == {"filter": "sample", "entering": 50, "removed": 40}


def test_fewer_than_n_keeps_all_and_the_report_says_so():
    short = select(many_rows(12), n=100)
    assert short.ids == tuple(f"r{i}" for i in range(12))
    assert (
        short.shortfall
        == short.report["shortfall"]
        == (
            "select.n = 100 questions requested, but only 12 passed the filters (of 12): all 12 "
            "are used"
        )
    )
    assert Selection.from_dict(json.loads(json.dumps(short.to_dict()))).shortfall
    assert select(many_rows(12), n=12).shortfall == ""
    assert "shortfall" not in select(many_rows(12), n=5).report


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"alphas": (0.1, 0.0)}, "alpha"),
        ({"alphas": (-0.5,)}, "alpha"),
        ({"beta": 2.0, "gamma": 1.5}, "gamma"),
        ({"beta": -0.1}, "beta"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.5}, "delta"),
        ({"n": 0}, "n must"),
        ({"reference": "median"}, "reference"),
        ({"window": "both"}, "window"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_bad_selection_parameters_are_config_errors_naming_them(kwargs, name):
    with pytest.raises(ConfigError, match=name), unchecked():  # seed="x": outside the hint
        select(TABLE, **kwargs)


def test_delta_one_is_allowed():
    assert select(TABLE, delta=1.0).ids == ("q1", "q2", "q5", "q9")  # q8's 1.05 still fails


def test_empty_selection_lists_counts_per_filter():
    rows = [row("a", 10, 10, correct=(True, False)), row("b", 10, 10, prompts=(3, 4))]
    with pytest.raises(
        SelectionError, match="2 entered, both_correct removed 1, equal_prompt_len removed 1"
    ):
        select(rows)
    # all pass correctness; refer = min(40, 40) = 40, window [20, 60] on pair means 40 and 40;
    # both pairs are unbalanced (60/40 = 1.5 > 0.5).
    rows = [row("a", 10, 70), row("b", 70, 10), row("c", 1000, 1000, prompts=(1, 2))]
    with pytest.raises(SelectionError) as err:
        select(rows, reference="min", window="pair_mean")
    message = str(err.value)
    assert "3 entered" in message
    assert "both_correct removed 0" in message
    assert "equal_prompt_len removed 1" in message
    assert "length_window removed 0" in message
    assert "balance removed 2" in message


def test_bad_rows_are_data_errors():
    with pytest.raises(DataError, match="row 0: missing field"):
        select([{"id": "x", "len_before": 3}])
    with pytest.raises(DataError, match="len_after must be a token count"):
        select([row("x", 10, -1)])
    with pytest.raises(DataError, match="duplicate id 'x'"):
        select([row("x", 10, 10), row("x", 10, 10)])


# ----------------------------------------------------------------- the authors' rules


def _authors_math_dataset(rows, n, seed, alpha, beta, gamma, delta):
    """The authors' MathDataset selection, written from its description in the issue:
    refer over all rows, int bounds, balance, random.seed + random.sample in row order."""
    import random

    before = [r["len_before"] for r in rows]
    after = [r["len_after"] for r in rows]
    refer = min(sum(before) / len(before), sum(after) / len(after))
    low, high = int(beta * refer), int(gamma * refer)
    kept = []
    for r in rows:
        if r["prompt_len_before"] != r["prompt_len_after"]:
            continue
        mean = (r["len_before"] + r["len_after"]) / 2
        if mean > high or mean < low:
            continue
        if abs(r["len_before"] - r["len_after"]) / mean > delta:
            continue
        kept.append(r)
    if n < len(kept):
        random.seed(seed)
        kept = random.sample(kept, n)
    return [r["id"] for r in kept], refer, max(int(refer * alpha), 1)


def _random_rows(count, seed):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        b = int(rng.integers(5, 200))
        out.append(
            {
                "id": f"q{i}",
                "prompt_len_before": int(rng.integers(10, 13)),
                "prompt_len_after": int(rng.integers(10, 13)),
                "len_before": b,
                "len_after": max(1, b + int(rng.integers(-60, 60))),
                "correct_before": True,
                "correct_after": True,
            }
        )
    return out


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_authors_code_matches_the_authors_sampler(seed):
    rows = _random_rows(300, seed)
    ids, refer, cut = _authors_math_dataset(rows, 40, 42 + seed, 0.3, 0.3, 2.0, 0.8)
    selection = select(
        rows,
        n=40,
        seed=42 + seed,
        alphas=[0.3],
        beta=0.3,
        gamma=2.0,
        delta=0.8,
        rules="authors-code",
    )
    assert selection.report["filters"][-1]["entering"] > 40  # the sampler did draw
    assert list(selection.ids) == ids  # same questions, in the same (draw) order
    assert selection.refer == pytest.approx(refer)
    assert selection.t_cut[0.3] == cut
    assert ids != sorted(ids, key=lambda q: int(q[1:]))  # draw order is not input order


def test_authors_code_reference_is_taken_before_the_prompt_filter():
    rows = [row("a", 10, 10), row("b", 100, 100), row("c", 40, 40)]
    rows[1]["prompt_len_after"] = 99  # b is dropped by the prompt filter, but counts in refer
    authors = select(rows, rules="authors-code", beta=0.1, gamma=3.0)
    text = select(rows, rules="paper-text", beta=0.1, gamma=3.0)
    assert authors.refer == pytest.approx(50.0)
    assert text.refer == pytest.approx(25.0)


def test_authors_code_window_bounds_are_integers():
    # refer = 15; beta * refer = 7.5 -> 7: a pair mean of 7 passes only with int bounds
    rows = [row("a", 7, 7), row("b", 23, 23), row("c", 15, 15)]
    authors = select(rows, rules="authors-code", delta=1.0)
    text = select(rows, rules="paper-text", delta=1.0)
    assert "a" in authors.ids and "a" not in text.ids
    assert authors.report["window_bounds"] == [7, 22]


@pytest.mark.parametrize(
    ("subset", "expected"),
    [("both_correct", ["a"]), ("both_wrong", ["d"]), ("only_before", ["b"]), ("only_after", ["c"])],
)
def test_each_subset_keeps_questions_by_which_models_were_correct(subset, expected):
    rows = [row(q, 10, 10) for q in "abcd"]
    rows[1]["correct_after"] = False
    rows[2]["correct_before"] = False
    rows[3]["correct_before"] = rows[3]["correct_after"] = False
    chosen = select(rows, subset=subset)
    assert list(chosen.ids) == expected
    assert chosen.report["params"]["subset"] == subset


def test_unknown_rules_and_subset_are_config_errors():
    rows = [row("a", 10, 10)]
    with pytest.raises(ConfigError, match="rules must be one of"):
        select(rows, rules="authors")
    with pytest.raises(ConfigError, match="subset must be one of"):
        select(rows, subset="all")


@pytest.mark.parametrize(
    ("rules", "reference", "window"),
    [("paper-text", "mean", "each"), ("authors-code", "min", "pair_mean")],
)
def test_rules_presets_fill_reference_and_window_unless_given(rules, reference, window):
    chosen = select(TABLE, rules=rules)
    params = chosen.report["params"]
    assert (params["reference"], params["window"]) == (reference, window)
    assert chosen == select(TABLE, rules=rules, reference=reference, window=window)
    other = {"mean": "min", "min": "mean"}[reference]
    overridden = select(TABLE, rules=rules, reference=other)
    assert overridden.report["params"]["reference"] == other
    assert overridden.report["params"]["window"] == window
