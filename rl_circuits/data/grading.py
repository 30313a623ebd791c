"""Answer extraction and equivalence grading: decides which generations count as correct.

Two graders: "math-verify" (parse + verify, its signal-based timeouts disabled) and
"authors" (the Qwen2.5-Math harness the paper's authors graded with, `harness_grader`). A
thread-based timeout lets `grade` run from any thread. Model output is never evaluated.
"""

from __future__ import annotations

import ctypes
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

VERDICTS = ("correct", "incorrect", "no_answer", "ungradable")
GRADERS = ("math-verify", "authors")

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# "The answer is: 18" (Math-Shepherd), "The answer is 18.", "The final answer is $18$".
_ANSWER_IS = re.compile(r"answer\s+is\s*:?", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Grade:
    """Outcome of grading one response against one gold answer."""

    verdict: str
    extracted: str | None
    gold: str
    error: str | None = None

    @property
    def correct(self) -> bool:
        return self.verdict == "correct"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _match_braces(text: str, start: int) -> int | None:
    """Index of the `}` closing the `{` at `start`; backslash-escaped braces are skipped."""
    depth = 0
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (nested braces allowed), else None.

    Returns None when the last box is unbalanced (e.g. generation cut off inside it). The
    brace-less form `\\boxed 5` found in some MATH solutions is also read.
    """
    matches = list(_BOX_COMMAND.finditer(text))
    if not matches:
        return None
    end = matches[-1].end()
    rest = text[end:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        start = end + len(rest) - len(stripped)
        close = _match_braces(text, start)
        return None if close is None else text[start + 1 : close].strip()
    if rest[:1].isspace() and stripped:
        return re.split(r"[\s$]", stripped, maxsplit=1)[0]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer in a response: last box, else a trailing "The answer is: X", else None."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed or None
    anchors = list(_ANSWER_IS.finditer(text))
    if not anchors:
        return None
    answer = text[anchors[-1].end() :].split("\n", 1)[0].strip().rstrip(".").strip()
    answer = _strip_dollars(answer)
    return answer or None


def _strip_dollars(text: str) -> str:
    """Remove one pair of `$...$` or `$$...$$` wrapping the whole string (not inner pairs)."""
    for fence in ("$$", "$"):
        inner = text[len(fence) : -len(fence)] if len(text) > 2 * len(fence) else ""
        if text.startswith(fence) and text.endswith(fence) and "$" not in inner and inner:
            return inner.strip()
    return text


def gold_answer(record_or_string: str | Mapping[str, Any] | Any) -> str:
    """Normalised gold answer text from a string, a `Record` or a mapping with a "gold" key.

    `datasets.py` locates the gold in each source format (text after GSM8K's `####` without
    thousands separators, the `\\boxed{}` of a MATH solution); this function only applies the
    format-free normalisation: outer whitespace and an outer `$...$` (College Math). Commas
    are kept: in College Math "110,880" is a list of two answers.
    """
    if isinstance(record_or_string, str):
        text = record_or_string
    elif isinstance(record_or_string, Mapping):
        text = record_or_string["gold"]
    else:
        text = record_or_string.gold
    return _strip_dollars(str(text).strip())


def _canonical(text: str) -> str:
    return _WHITESPACE.sub("", gold_answer(text))


def _boxed(text: str) -> str:
    return "\\boxed{" + text + "}"


def _compare(gold: str, extracted: str) -> tuple[bool | None, str | None]:
    """math-verify equivalence: (True/False, None), or (None, reason) when ungradable."""
    import math_verify

    parsed_gold = math_verify.parse(_boxed(gold), parsing_timeout=None, raise_on_error=True)
    if not parsed_gold:
        return None, f"math-verify could not parse the gold answer {gold!r}"
    parsed = math_verify.parse(_boxed(extracted), parsing_timeout=None, raise_on_error=True)
    if not parsed:
        return False, None
    same = math_verify.verify(parsed_gold, parsed, timeout_seconds=None, raise_on_error=True)
    return bool(same), None


class GradingTimeout(BaseException):
    """Raised inside a grading worker thread that ran past its timeout."""


def _stop_thread(thread: threading.Thread) -> None:
    """Ask a running thread to stop by raising `GradingTimeout` in it at its next bytecode.

    Sympy's hangs are pure Python, so this frees the CPU; a thread stuck inside one C call
    stops only when that call returns.
    """
    if thread.ident is None:
        return
    set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
    changed = set_async_exc(ctypes.c_ulong(thread.ident), ctypes.py_object(GradingTimeout))
    if changed > 1:  # never expected; undo rather than hit other threads
        set_async_exc(ctypes.c_ulong(thread.ident), None)


def _compare_with_timeout(
    gold: str, extracted: str, timeout: float, compare=None, label: str = "math-verify"
) -> tuple[bool | None, str | None]:
    """Run `compare` (default `_compare`) in a daemon thread; a timeout or exception becomes
    (None, reason)."""
    outcome: dict[str, Any] = {}
    compare = compare or _compare

    def work() -> None:
        try:
            outcome["result"] = compare(gold, extracted)
        except BaseException as exc:  # any grader failure is recorded
            outcome["error"] = f"{type(exc).__name__}: {exc}"

    worker = threading.Thread(target=work, name="rl-circuits-grade", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        _stop_thread(worker)
        return None, f"{label} timed out after {timeout:g} s"
    if "error" in outcome:
        return None, outcome["error"]
    return outcome["result"]


def _check_grader(grader: str) -> None:
    if grader not in GRADERS:
        raise ValueError(f"grader must be one of {', '.join(map(repr, GRADERS))}, got {grader!r}")


def _grade_authors(
    response_text: str | None, gold: str | Mapping[str, Any] | Any, timeout: float, dataset: str
) -> Grade:
    """The harness's verdict: its extraction and `math_equal`; a timeout counts as wrong, as
    in the harness (its process pool gives up after 3 s)."""
    from rl_circuits.data import harness_grader

    harness_grader.latex_grammar()  # raises ImportError naming the missing package
    raw_gold = gold if isinstance(gold, str) else gold_answer(gold)
    pred, ref = harness_grader.verdict_inputs(response_text, raw_gold, dataset)
    if not str(raw_gold).strip():
        return Grade("ungradable", pred, ref, "the gold answer is empty")
    if pred is None:
        return Grade("no_answer", None, ref)

    def compare(ref_text: str, pred_text: str) -> tuple[bool, None]:
        return harness_grader.math_equal(pred_text, ref_text), None

    same, error = _compare_with_timeout(ref, pred, timeout, compare, "the authors' grader")
    if same is None:
        return Grade("incorrect", pred, ref, error)
    return Grade("correct" if same else "incorrect", pred, ref)


def grade(
    response_text: str | None,
    gold: str | Mapping[str, Any] | Any,
    timeout: float = 5.0,
    *,
    exact_match: bool = True,
    grader: str = "math-verify",
    dataset: str = "",
) -> Grade:
    """Grade one response: extract its final answer and compare it with the gold.

    `grader="math-verify"`: with `exact_match` (default) an answer whose text equals the
    gold's (ignoring whitespace) is correct without calling math-verify. `grader="authors"`:
    the Qwen2.5-Math harness's rules for dataset `dataset` (its names: gsm8k, math, math500,
    college_math, minerva_math, olympiadbench, aime24, amc23). Never raises for a bad
    response or grader failure.
    """
    _check_grader(grader)
    if grader == "authors":
        return _grade_authors(response_text, gold, timeout, dataset)
    gold_text = gold_answer(gold)
    extracted = extract_answer(response_text) if response_text else None
    if not gold_text:
        return Grade("ungradable", extracted, gold_text, "the gold answer is empty")
    if extracted is None:
        return Grade("no_answer", None, gold_text)
    if exact_match and _canonical(extracted) == _canonical(gold_text):
        return Grade("correct", extracted, gold_text)
    same, error = _compare_with_timeout(gold_text, gold_answer(extracted), timeout)
    if same is None:
        return Grade("ungradable", extracted, gold_text, error)
    return Grade("correct" if same else "incorrect", extracted, gold_text)


def grade_many(
    responses: Iterable[str | None],
    golds: Iterable[str | Mapping[str, Any] | Any],
    *,
    timeout: float = 5.0,
    exact_match: bool = True,
    progress: bool = True,
    desc: str = "grading",
    grader: str = "math-verify",
    dataset: str = "",
) -> list[Grade]:
    """Grade responses against golds pairwise, with a tqdm progress bar."""
    from tqdm.auto import tqdm

    responses = list(responses)
    golds = list(golds)
    if len(responses) != len(golds):
        raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
    pairs: Sequence[tuple[Any, Any]] = list(zip(responses, golds, strict=True))
    return [
        grade(response, gold, timeout, exact_match=exact_match, grader=grader, dataset=dataset)
        for response, gold in tqdm(pairs, desc=desc, disable=not progress)
    ]
