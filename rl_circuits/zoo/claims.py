"""The README's demo accuracies (`readme_numbers.json`) and the demo's comparison with them.

The README's numbers are copied from one data file, and `rl-circuits demo` says plainly
whether its own run reproduced them, so a claim that the user's run contradicts is seen.
"""

from __future__ import annotations

import json
from pathlib import Path

NUMBERS_FILE = Path(__file__).with_name("readme_numbers.json")
ALGORITHMS = {"sft": "SFT", "grpo": "GRPO", "dpo": "DPO"}


def load_claims(path: str | Path = NUMBERS_FILE) -> dict:
    """{"test_size": int, "accuracy": {recipe: fraction}} as the README states them."""
    raw = json.loads(Path(path).read_text())
    return {"test_size": raw["test_size"], "accuracy": raw["accuracy"]}


def accuracy_line(accuracy: dict[str, float], test_size: int) -> str:
    """The demo's accuracy line, e.g. `greedy test accuracy (300 questions): SFT 39.3%, ...`."""
    listed = ", ".join(f"{name} {accuracy[recipe]:.1%}" for recipe, name in ALGORITHMS.items())
    return f"greedy test accuracy ({test_size} questions): {listed}"


def compare_with_readme(accuracy: dict[str, float], test_size: int, claims: dict) -> str:
    """One line: does this run's accuracy equal the README's (at its 0.1-point precision)?"""
    stated = accuracy_line(claims["accuracy"], claims["test_size"])
    if test_size != claims["test_size"]:
        return (
            f"README check: not comparable: this zoo has {test_size} test questions, the "
            f"README's run {claims['test_size']} ({stated})"
        )
    differ = [
        f"{name} {accuracy[recipe]:.1%} vs {claims['accuracy'][recipe]:.1%}"
        for recipe, name in ALGORITHMS.items()
        if f"{accuracy[recipe]:.1%}" != f"{claims['accuracy'][recipe]:.1%}"
    ]
    if not differ:
        return "README check: this run's accuracies equal the README's"
    return (
        "README check: this run DIFFERS from the README's numbers ("
        + "; ".join(differ)
        + "): the README's claims do not describe this run"
    )
