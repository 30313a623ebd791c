"""Synthetic arithmetic word problems for the model zoo, and their exact-integer grader.

A seeded generator writes one- and two-step problems ("Ann has 4 pens, buys 3 more, sells 2.
How many pens?") with step-by-step solutions ending in `\\boxed{N}`. Answers are integers
(1..9 by default), so grading is an exact integer comparison of the last `\\boxed{}`. The
SFT recipe learns from an imperfect teacher (`teacher_solution`): it misreads a verb, a flaw
that the verifier's reward (GRPO) and the preference pairs (DPO) can correct. The splits are
written in the MATH-500 JSONL format (`problem`, `solution`, `answer`) so the pipeline's
dataset reader loads them unchanged.

The grader lives here, not in `rl_circuits.data.grading`, so the zoo is self-contained.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

DATASET_NAME = "toy_math"
SPLITS = ("train", "validation", "test")
NAMES = ("Ann", "Bob", "Cal", "Dee", "Eva", "Gus", "Ida", "Jon", "Kim", "Lea", "Max", "Ned")
ITEMS = ("pens", "cards", "coins", "eggs", "books", "apples", "shells", "stamps", "beads")
GAIN = ("buys {n} more", "finds {n} more", "gets {n} more", "wins {n} more")
LOSS = ("gives away {n}", "loses {n}", "sells {n}", "uses {n}")
MAX_REPEATS = 10_000  # draws without a new question before the task counts as exhausted
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
    max_amount: int = 9,
    max_operand: int = 4,
    step_weights: Sequence[float] = (0.5, 0.5),
) -> Problem:
    """Draw one problem: a starting amount, then additions and subtractions.

    The number of steps is 1, 2, ... with probabilities proportional to `step_weights`. The
    starting amount is 2..`max_amount`; each step adds or removes 1..`max_operand`, and the
    amount always stays within 1..`max_amount` (single digits by default, so the arithmetic
    is quickly learnt and the model's errors are about reading the question).
    """
    steps = rng.choices(range(1, len(step_weights) + 1), weights=step_weights)[0]
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start = total = rng.randint(2, max_amount)
    lines: list[str] = []
    events = []
    for _ in range(steps):
        if total > 1 and (total == max_amount or rng.random() < 0.5):
            n = rng.randint(1, min(total - 1, max_operand))
            events.append(rng.choice(LOSS).format(n=n))
            lines.append(f"{total}-{n}={total - n}")
            total -= n
        else:
            n = rng.randint(1, min(max_operand, max_amount - total))
            events.append(rng.choice(GAIN).format(n=n))
            lines.append(f"{total}+{n}={total + n}")
            total += n
    question = ", ".join([f"{name} has {start} {item}", *events]) + f". How many {item}?"
    solution = "\n".join([*lines, f"\\boxed{{{total}}}"])
    return Problem(question=question, solution=solution, answer=total, steps=steps)


_OPENING = re.compile(r" has (\d+) ")
_EVENT = re.compile(r"^(.*?) (\d+)(?: more)?$")


def teacher_solution(
    problem: Problem, misread: Collection[str], rate: float, rng: random.Random
) -> str:
    """The solution an imperfect teacher writes: each loss verb in `misread` taken as a gain.

    Every event whose verb (e.g. "sells") is in `misread` is, with probability `rate`, written
    as an addition instead of a subtraction, and the later lines follow from the wrong total.
    The SFT recipe trains on these demonstrations; the gold answer stays the true one.
    """
    head, *events = problem.question.rsplit(". How many", 1)[0].split(", ")
    opening = _OPENING.search(head)
    if opening is None:
        raise ValueError(f"not a zoo problem: {problem.question!r}")
    total = int(opening.group(1))
    lines = []
    for event in events:
        verb, n = _EVENT.match(event).groups()
        gain = event.endswith(" more") or (verb in misread and rng.random() < rate)
        after = total + int(n) if gain else total - int(n)
        lines.append(f"{total}{'+' if gain else '-'}{n}={after}")
        total = after
    return "\n".join([*lines, f"\\boxed{{{total}}}"])


def generate_splits(
    seed: int,
    sizes: dict[str, int],
    max_amount: int = 9,
    max_operand: int = 4,
    step_weights: Sequence[float] = (0.5, 0.5),
) -> dict[str, list[Problem]]:
    """Disjoint splits (no question text in two splits) drawn from one seeded generator.

    Test and validation are drawn first, so their problems do not depend on the train size.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[Problem]] = {}
    for split in ("test", "validation", "train"):
        problems: list[Problem] = []
        repeats = 0  # draws in a row that gave no new question
        while len(problems) < sizes.get(split, 0):
            problem = make_problem(rng, max_amount, max_operand, step_weights)
            if problem.question not in seen:
                seen.add(problem.question)
                problems.append(problem)
                repeats = 0
            elif (repeats := repeats + 1) > MAX_REPEATS:
                raise ValueError(
                    f"the task has too few distinct questions for splits of {sizes}: "
                    f"{len(seen)} drawn, then {MAX_REPEATS} repeats in a row; lower the "
                    "split sizes or widen max_amount, max_operand or step_weights"
                )
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
