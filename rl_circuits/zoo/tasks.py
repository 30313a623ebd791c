"""Synthetic arithmetic word problems for the model zoo, and their exact-integer grader.

A seeded generator writes one- to three-step problems ("Ann has 4 boxes of 7 pens, buys 15
more, loses 9. How many pens?") with step-by-step solutions ending in `\\boxed{N}`.
Answers are non-negative integers, so grading is an exact integer comparison of the last
`\\boxed{}` (chance level is about 0%). The splits are written in the MATH-500 JSONL format
(`problem`, `solution`, `answer`) so the pipeline's dataset reader loads them unchanged.

The grader lives here, not in `rl_circuits.data.grading`, so the zoo is self-contained.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

DATASET_NAME = "toy_math"
SPLITS = ("train", "validation", "test")
NAMES = ("Ann", "Bob", "Cal", "Dee", "Eva", "Gus", "Ida", "Jon", "Kim", "Lea", "Max", "Ned")
ITEMS = ("pens", "cards", "coins", "eggs", "books", "apples", "shells", "stamps", "beads")
GAIN = ("buys {n} more", "finds {n} more", "gets {n} more", "wins {n} more")
LOSS = ("gives away {n}", "loses {n}", "sells {n}", "uses {n}")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


@dataclass(frozen=True)
class Problem:
    """One problem: question text, solution lines ending in `\\boxed{answer}`, integer answer."""

    question: str
    solution: str
    answer: int
    steps: int

    def record(self) -> dict:
        """The MATH-500-style JSONL record (`answer` as a string, like MATH's).

        No `unique_id`: the pipeline's reader then names records `toy_math-<line index>`.
        """
        return {
            "problem": self.question,
            "solution": self.solution,
            "answer": str(self.answer),
            "level": self.steps,
        }


def make_problem(
    rng: random.Random,
    max_start: int = 20,
    max_operand: int = 9,
    step_weights: Sequence[float] = (0.5, 0.3, 0.2),
) -> Problem:
    """Draw one problem: maybe a multiplication, then additions and subtractions.

    The number of steps is 1, 2, 3, ... with probabilities proportional to `step_weights`.
    The starting amount is 10..`max_start` (or 2..9 boxes of 2..9), each later step adds or
    removes 1..`max_operand`; amounts never go below 1.
    """
    steps = rng.choices(range(1, len(step_weights) + 1), weights=step_weights)[0]
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    lines: list[str] = []
    if rng.random() < 1 / 3:  # start from boxes: the first step multiplies
        boxes, per_box = rng.randint(2, 9), rng.randint(2, 9)
        total = boxes * per_box
        opening = f"{name} has {boxes} boxes of {per_box} {item}"
        lines.append(f"{boxes}*{per_box}={total}")
    else:
        total = rng.randint(10, max_start)
        opening = f"{name} has {total} {item}"
    events = []
    while len(lines) < steps:
        if total > 1 and rng.random() < 0.5:
            n = rng.randint(1, min(total - 1, max_operand))
            events.append(rng.choice(LOSS).format(n=n))
            lines.append(f"{total}-{n}={total - n}")
            total -= n
        else:
            n = rng.randint(1, max_operand)
            events.append(rng.choice(GAIN).format(n=n))
            lines.append(f"{total}+{n}={total + n}")
            total += n
    question = ", ".join([opening, *events]) + f". How many {item}?"
    solution = "\n".join([*lines, f"\\boxed{{{total}}}"])
    return Problem(question=question, solution=solution, answer=total, steps=steps)


def generate_splits(
    seed: int,
    sizes: dict[str, int],
    max_start: int = 20,
    max_operand: int = 9,
    step_weights: Sequence[float] = (0.5, 0.3, 0.2),
) -> dict[str, list[Problem]]:
    """Disjoint splits (no question text in two splits) drawn from one seeded generator.

    Test and validation are drawn first, so their problems do not depend on the train size.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[Problem]] = {}
    for split in ("test", "validation", "train"):
        problems: list[Problem] = []
        while len(problems) < sizes.get(split, 0):
            problem = make_problem(rng, max_start, max_operand, step_weights)
            if problem.question not in seen:
                seen.add(problem.question)
                problems.append(problem)
        splits[split] = problems
    return {split: splits[split] for split in SPLITS}


def write_jsonl(path: Path, problems: Iterable[Problem]) -> None:
    """One JSON record per line (MATH-500 fields)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for problem in problems:
            handle.write(json.dumps(problem.record()) + "\n")


def read_jsonl(path: Path) -> list[Problem]:
    """Read back a split written by `write_jsonl`."""
    problems = []
    for line in path.read_text().splitlines():
        raw = json.loads(line)
        problems.append(
            Problem(raw["problem"], raw["solution"], int(raw["answer"]), int(raw["level"]))
        )
    return problems


def write_splits(data_dir: Path, splits: dict[str, list[Problem]]) -> Path:
    """Write `<data_dir>/toy_math/{train,validation,test}.jsonl`; returns the dataset folder."""
    folder = Path(data_dir) / DATASET_NAME
    for split, problems in splits.items():
        write_jsonl(folder / f"{split}.jsonl", problems)
    return folder


def extract_answer(text: str) -> int | None:
    """The integer in the last `\\boxed{...}` of `text`, or None when absent or not an integer."""
    found = _BOXED.findall(text)
    if not found:
        return None
    try:
        return int(found[-1].strip())
    except ValueError:
        return None


def is_correct(completion: str, answer: int | str) -> bool:
    """Exact integer match of the completion's last `\\boxed{}` with the gold answer."""
    predicted = extract_answer(completion)
    return predicted is not None and predicted == int(answer)


def summary(problems: list[Problem]) -> dict:
    """Counts by number of steps and the longest solution (for the model card)."""
    by_steps: dict[int, int] = {}
    for problem in problems:
        by_steps[problem.steps] = by_steps.get(problem.steps, 0) + 1
    return {
        "size": len(problems),
        "by_steps": dict(sorted(by_steps.items())),
        "max_solution_chars": max((len(p.solution) for p in problems), default=0),
        "example": asdict(problems[0]) if problems else None,
    }
