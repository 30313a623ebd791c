"""Did post-training change accuracy? McNemar's exact test on per-question correctness.

Both models answer the same test questions, so their accuracies are paired: only the
discordant questions (right after but not before, `gained`; right before but not after,
`lost`) carry information about a difference. Under "no difference" each discordant
question is equally likely to fall either way, so `gained` ~ Binomial(gained + lost, 1/2);
the two-sided exact p-value doubles the smaller tail (capped at 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb


def mcnemar_exact(before: Sequence[bool], after: Sequence[bool]) -> dict:
    """Paired comparison of two per-question correctness lists (same questions, same order).

    Returns `before`/`after` accuracy, `gain` (after - before), the discordant counts
    `gained`/`lost`, and the two-sided exact McNemar `p_value`.
    """
    if len(before) != len(after):
        raise ValueError(
            f"paired test needs one answer per question from both models; got {len(before)} "
            f"before and {len(after)} after"
        )
    if not before:
        raise ValueError("paired test needs at least one question")
    gained = sum(1 for b, a in zip(before, after, strict=True) if a and not b)
    lost = sum(1 for b, a in zip(before, after, strict=True) if b and not a)
    n = gained + lost
    tail = sum(comb(n, k) for k in range(min(gained, lost) + 1)) / 2**n
    return {
        "questions": len(before),
        "before": sum(map(bool, before)) / len(before),
        "after": sum(map(bool, after)) / len(after),
        "gain": (gained - lost) / len(before),
        "gained": gained,
        "lost": lost,
        "p_value": min(1.0, 2 * tail),
    }


def describe(test: dict) -> str:
    """One line: `+9.3 points (48.3% -> 57.7%; 41 gained, 13 lost, McNemar exact p = 1.2e-04)`."""
    return (
        f"{100 * test['gain']:+.1f} points ({test['before']:.1%} -> {test['after']:.1%}; "
        f"{test['gained']} gained, {test['lost']} lost, McNemar exact p = {test['p_value']:.1e})"
    )
