"""Question selection and truncation lengths of the paper's Section 3.3 (pure functions).

Keeps questions both models answer correctly with equal prompt lengths and comparable,
typical answer lengths, draws a seeded sample, and derives T_cut for each alpha.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rl_circuits.errors import ConfigError, DataError, SelectionError

REFERENCES = ("min", "mean")
WINDOWS = ("pair_mean", "each")
RULES = ("paper-text", "authors-code")
# What each rule set implies for the keys it leaves unset: Eqs. 10-11 as printed (the mean of
# the pair's lengths as reference, each length in the window), or the authors' `MathDataset`.
PRESETS: dict[str, dict[str, str]] = {
    "paper-text": {"reference": "mean", "window": "each"},
    "authors-code": {"reference": "min", "window": "pair_mean"},
}
SUBSETS = ("both_correct", "both_wrong", "only_before", "only_after")
DEFAULT_ALPHAS = (0.03, 0.1, 0.3, 0.5)
_INT_FIELDS = ("prompt_len_before", "prompt_len_after", "len_before", "len_after")
_BOOL_FIELDS = ("correct_before", "correct_after")


@dataclass(frozen=True)
class _Row:
    id: str
    prompt_before: int
    prompt_after: int
    before: int
    after: int
    correct_before: bool
    correct_after: bool

    @property
    def pair_mean(self) -> float:
        return (self.before + self.after) / 2


@dataclass(frozen=True)
class Selection:
    """Selected question ids, reference length, T_cut per alpha, and report.

    Ids are in input order under "paper-text" rules and in the draw order of Python's
    `random.sample` under "authors-code" (as the authors' `MathDataset` holds them)."""

    ids: tuple[str, ...]
    refer: float
    t_cut: dict[float, int]
    report: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; alpha keys become strings such as "0.03"."""
        return {
            "ids": list(self.ids),
            "refer": self.refer,
            "t_cut": {str(alpha): cut for alpha, cut in self.t_cut.items()},
            "report": self.report,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Selection:
        """Inverse of `to_dict`."""
        return cls(
            ids=tuple(data["ids"]),
            refer=float(data["refer"]),
            t_cut={float(alpha): int(cut) for alpha, cut in data["t_cut"].items()},
            report=dict(data.get("report", {})),
        )

    @property
    def shortfall(self) -> str:
        """Why fewer questions than `n` were selected ("" when `n` were): the report says it."""
        return str(self.report.get("shortfall", ""))


def t_cut(alpha: float, refer: float) -> int:
    """Truncation length for one alpha: `max(int(alpha * refer), 1)`."""
    return max(int(alpha * refer), 1)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise ConfigError(f"selection {name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"selection {name} must be finite, got {value!r}")
    return float(value)


def _validate(
    n: int,
    seed: int,
    beta: float,
    gamma: float,
    delta: float,
    reference: str,
    window: str,
    alphas: Sequence[float],
    rules: str = "paper-text",
    subset: str = "both_correct",
) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"selection n must be an integer >= 1, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"selection seed must be an integer >= 0, got {seed!r}")
    if _number("beta", beta) < 0:
        raise ConfigError(f"selection beta must be >= 0, got {beta!r}")
    if _number("gamma", gamma) < beta:
        raise ConfigError(
            f"selection beta must not exceed gamma (0 <= beta <= gamma), got beta {beta!r} "
            f"and gamma {gamma!r}"
        )
    if not 0 < _number("delta", delta) <= 1:
        raise ConfigError(f"selection delta must lie in (0, 1], got {delta!r}")
    if reference not in REFERENCES:
        raise ConfigError(f"selection reference must be one of {REFERENCES}, got {reference!r}")
    if window not in WINDOWS:
        raise ConfigError(f"selection window must be one of {WINDOWS}, got {window!r}")
    if rules not in RULES:
        raise ConfigError(f"selection rules must be one of {RULES}, got {rules!r}")
    if subset not in SUBSETS:
        raise ConfigError(f"selection subset must be one of {SUBSETS}, got {subset!r}")
    for alpha in alphas:
        if _number("alpha", alpha) <= 0:
            raise ConfigError(f"selection alpha must be > 0, got {alpha!r}")


def _count(value: Any, key: str, index: int, qid: Any) -> int:
    """A token count (integer >= 0) from a row, else DataError."""
    if isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= 0:
        return int(value)
    if isinstance(value, float | np.floating) and value.is_integer() and value >= 0:
        return int(value)
    raise DataError(
        f"selection row {index} (id {qid}): {key} must be a token count (integer >= 0), "
        f"got {value!r}"
    )


def _flag(value: Any, key: str, index: int, qid: Any) -> bool:
    """A correctness flag (bool, or 0/1) from a row, else DataError."""
    if isinstance(value, bool | np.bool_) or (
        isinstance(value, int | np.integer) and value in (0, 1)
    ):
        return bool(value)
    raise DataError(f"selection row {index} (id {qid}): {key} must be a bool, got {value!r}")


def _rows(rows: Iterable[Mapping[str, Any]]) -> list[_Row]:
    parsed = []
    seen: set[str] = set()
    for index, row in enumerate(rows):
        missing = [key for key in ("id", *_INT_FIELDS, *_BOOL_FIELDS) if key not in row]
        if missing:
            raise DataError(f"selection row {index}: missing field(s) {', '.join(missing)}")
        values = {key: _count(row[key], key, index, row["id"]) for key in _INT_FIELDS}
        qid = str(row["id"])
        if qid in seen:
            raise DataError(f"selection row {index}: duplicate id {qid!r}")
        seen.add(qid)
        parsed.append(
            _Row(
                qid,
                values["prompt_len_before"],
                values["prompt_len_after"],
                values["len_before"],
                values["len_after"],
                _flag(row["correct_before"], "correct_before", index, qid),
                _flag(row["correct_after"], "correct_after", index, qid),
            )
        )
    return parsed


def _reference(rows: Sequence[_Row], rule: str) -> float:
    if rule == "min":
        return min(
            float(np.mean([r.before for r in rows])), float(np.mean([r.after for r in rows]))
        )
    return float(np.mean([r.pair_mean for r in rows]))


def reference_length(rows: Iterable[Mapping[str, Any]], rule: str = "min") -> float:
    """Reference answer length of rows: `min` of the two models' mean lengths (authors' code)
    or `mean` of the per-question pair means (paper Eq. 10)."""
    if rule not in REFERENCES:
        raise ConfigError(f"selection reference must be one of {REFERENCES}, got {rule!r}")
    parsed = _rows(rows)
    if not parsed:
        raise DataError("cannot compute a reference length from no questions")
    return _reference(parsed, rule)


def _in_window(row: _Row, low: float, high: float, window: str) -> bool:
    if window == "pair_mean":
        return low <= row.pair_mean <= high
    return low <= row.before <= high and low <= row.after <= high


def _balanced(row: _Row, delta: float) -> bool:
    if row.before + row.after == 0:
        return False
    return abs(row.before - row.after) / row.pair_mean <= delta


def _in_subset(row: _Row, subset: str) -> bool:
    """Which of the four groups of the authors' `datasets_prepare.ipynb` a question is in."""
    return {
        "both_correct": row.correct_before and row.correct_after,
        "both_wrong": not row.correct_before and not row.correct_after,
        "only_before": row.correct_before and not row.correct_after,
        "only_after": not row.correct_before and row.correct_after,
    }[subset]


def _stats(values: Sequence[int]) -> dict[str, float | int]:
    return {"mean": float(np.mean(values)), "min": int(min(values)), "max": int(max(values))}


class _Filters:
    """The filters applied so far, each with how many questions entered and how many it
    removed (the report's "filters"); an empty result stops the selection, naming them."""

    def __init__(self, entering: int):
        self.entering = entering
        self.steps: list[dict[str, Any]] = []

    def apply(self, name: str, kept: list[_Row], before: list[_Row]) -> list[_Row]:
        self.steps.append(
            {"filter": name, "entering": len(before), "removed": len(before) - len(kept)}
        )
        return kept

    def nonempty(self, rows: list[_Row]) -> list[_Row]:
        """`rows`, unless no question is left: then a SelectionError with every filter's count."""
        if rows:
            return rows
        counts = ", ".join(f"{step['filter']} removed {step['removed']}" for step in self.steps)
        raise SelectionError(
            f"no question survives selection: {self.entering} entered, {counts}. Check the "
            "grading of both models' answers, loosen beta, gamma or delta, or use more questions"
        )

    def prompts(self, rows: list[_Row]) -> list[_Row]:
        """Questions whose prompt has the same length for both models; none left stops it."""
        kept = [r for r in rows if r.prompt_before == r.prompt_after]
        return self.nonempty(self.apply("equal_prompt_len", kept, rows))

    def lengths(self, rows: list[_Row], bounds: tuple[float, float], params: dict) -> list[_Row]:
        """Questions whose answer lengths lie in `bounds` (`params["window"]`: which lengths)
        and are balanced within `params["delta"]`; none left stops it."""
        low, high = bounds
        kept = [r for r in rows if _in_window(r, low, high, params["window"])]
        rows = self.apply("length_window", kept, rows)
        kept = [r for r in rows if _balanced(r, params["delta"])]
        return self.nonempty(self.apply("balance", kept, rows))


def _paper_text(
    rows: list[_Row], filters: _Filters, params: dict
) -> tuple[list[_Row], float, tuple]:
    """Eqs. 10-12 as printed: the reference after the prompt-length filter, real window
    bounds, numpy's seeded sample kept in input order. -> (selected, reference, bounds)."""
    rows = filters.prompts(rows)
    refer = _reference(rows, params["reference"])
    bounds = (params["beta"] * refer, params["gamma"] * refer)
    rows = filters.lengths(rows, bounds, params)
    sampled = rows
    if len(rows) > params["n"]:
        drawn = np.random.default_rng(params["seed"]).choice(
            len(rows), size=params["n"], replace=False
        )
        sampled = [rows[i] for i in sorted(int(i) for i in drawn)]
    return filters.apply("sample", sampled, rows), refer, bounds


def _authors_code(
    rows: list[_Row], filters: _Filters, params: dict
) -> tuple[list[_Row], float, tuple]:
    """The authors' `MathDataset`: the reference over every question of the subset, integer
    window bounds, `random.seed(seed); random.sample(rows, n)` kept in draw order."""
    refer = _reference(filters.nonempty(rows), params["reference"])
    rows = filters.prompts(rows)
    bounds = (int(params["beta"] * refer), int(params["gamma"] * refer))
    rows = filters.lengths(rows, bounds, params)
    sampled = rows
    if len(rows) > params["n"]:  # the same stream as random.seed(seed) + random.sample
        sampled = random.Random(params["seed"]).sample(rows, params["n"])
    return filters.apply("sample", sampled, rows), refer, bounds


# Each rule set (`RULES`) keeps the subset's questions that pass its filters and draws the sample.
_RULE_SETS = {"paper-text": _paper_text, "authors-code": _authors_code}


def select(
    rows: Iterable[Mapping[str, Any]],
    *,
    n: int = 100,
    seed: int = 42,
    beta: float = 0.5,
    gamma: float = 1.5,
    delta: float = 0.5,
    reference: str | None = None,
    window: str | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    rules: str = "paper-text",
    subset: str = "both_correct",
) -> Selection:
    """Select questions as in Section 3.3 and compute T_cut per alpha.

    Filters, in order: the subset (both correct by default); equal prompt lengths; length
    window around the reference length; balance; a seeded sample of `n` (when fewer pass,
    all are kept and the report's "shortfall" says so).

    `rules="paper-text"`: the reference is computed after the prompt-length filter, the window
    bounds are real numbers and the sample is numpy's, kept in input order.
    `rules="authors-code"` (the authors' `MathDataset`): the reference is computed over every
    question of the subset before the prompt-length filter, the bounds are
    `int(beta * refer)` and `int(gamma * refer)`, and the sample is
    `random.seed(seed); random.sample(rows, n)` over the surviving rows in input order, kept in
    draw order. `reference` and `window` left as None take the rules' preset (`PRESETS`:
    mean/each for paper-text, min/pair_mean for authors-code); given, they override it.
    """
    if rules not in RULES:
        raise ConfigError(f"selection rules must be one of {RULES}, got {rules!r}")
    reference = reference or PRESETS[rules]["reference"]
    window = window or PRESETS[rules]["window"]
    _validate(n, seed, beta, gamma, delta, reference, window, alphas, rules, subset)
    params = {
        "n": n,
        "seed": seed,
        "beta": float(beta),
        "gamma": float(gamma),
        "delta": float(delta),
        "reference": reference,
        "window": window,
        "alphas": [float(alpha) for alpha in alphas],
        "rules": rules,
        "subset": subset,
    }
    parsed = _rows(rows)
    filters = _Filters(len(parsed))
    kept = filters.apply(subset, [r for r in parsed if _in_subset(r, subset)], parsed)
    kept, refer, bounds = _RULE_SETS[rules](kept, filters, params)
    cuts = {float(alpha): t_cut(alpha, refer) for alpha in alphas}
    return Selection(
        tuple(r.id for r in kept), refer, cuts, _report(kept, filters, params, refer, bounds, cuts)
    )


def _report(
    kept: list[_Row], filters: _Filters, params: dict, refer: float, bounds: tuple, cuts: dict
) -> dict[str, Any]:
    """The selection report: settings, each filter's count, lengths, T_cut and what it cuts."""
    short = {}
    for alpha, cut in cuts.items():
        too_short = [r.id for r in kept if min(r.before, r.after) < cut]
        short[str(alpha)] = {"count": len(too_short), "ids": too_short}
    report: dict[str, Any] = {
        "params": params,
        "entering": filters.entering,
        "filters": filters.steps,
        "kept": len(kept),
        "refer": refer,
        "window_bounds": list(bounds),
        "lengths": {
            "before": _stats([r.before for r in kept]),
            "after": _stats([r.after for r in kept]),
        },
        "t_cut": {str(alpha): cut for alpha, cut in cuts.items()},
        "shorter_than_t_cut": short,
    }
    if len(kept) < params["n"]:
        report["shortfall"] = (
            f"select.n = {params['n']} questions requested, but only {len(kept)} passed the "
            f"filters (of {filters.entering}): all {len(kept)} are used"
        )
    return report
