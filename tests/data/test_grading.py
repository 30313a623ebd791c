"""Answer extraction and grading: real gold answers, equivalences, threads and grader failures."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import math_verify
import pytest

from rl_circuits.data.datasets import Record, load_dataset
from rl_circuits.data.grading import (
    Grade,
    extract_answer,
    extract_boxed,
    gold_answer,
    grade,
    grade_many,
)

SHARED = Path("/work/shared/data")


def self_grades(name: str, *, sample: int | None = None, exact_match: bool) -> Counter:
    records = load_dataset(name, data_dir=SHARED)
    if sample is not None:
        records = random.Random(0).sample(records, sample)
    responses = [f"Step 1 ... so the answer is $\\boxed{{{r.gold}}}$." for r in records]
    grades = grade_many(responses, records, exact_match=exact_match, progress=False)
    return Counter(g.verdict for g in grades)


@pytest.mark.parametrize("name", ["gsm8k", "math500", "college_math"])
def test_every_gold_grades_correct_against_itself(name):
    # Measured: 1319/1319, 500/500, 2818/2818 (text-identical answers short-cut math-verify).
    verdicts = self_grades(name, exact_match=True)
    assert verdicts == Counter({"correct": sum(verdicts.values())})


@pytest.mark.parametrize(
    ("name", "sample", "minimum"),
    [
        ("gsm8k", None, 1.0),  # measured 1319/1319 = 100% (1.2-1.8 s)
        ("math500", 300, 1.0),  # measured 300/300 = 100% (all 500: 100%, 2.6 s)
        ("college_math", 25, 0.92),  # measured 25/25 = 100% (all 2818: 100%, ~110 s)
    ],
)
def test_math_verify_agrees_gold_with_itself(name, sample, minimum):
    verdicts = self_grades(name, sample=sample, exact_match=False)
    assert verdicts["correct"] / sum(verdicts.values()) >= minimum, verdicts


def test_different_gsm8k_golds_grade_incorrect():
    # Each gold graded against the next question's gold: correct exactly when the numbers match.
    records = load_dataset("gsm8k", data_dir=SHARED)
    shifted = records[1:] + records[:1]
    responses = [f"\\boxed{{{r.gold}}}" for r in records]
    grades = grade_many(responses, shifted, exact_match=False, progress=False)
    expected = [
        "correct" if float(a.gold) == float(b.gold) else "incorrect"
        for a, b in zip(records, shifted, strict=True)
    ]
    assert [g.verdict for g in grades] == expected
    assert expected.count("correct") == 15  # measured: 15 neighbouring questions share a gold


@pytest.mark.parametrize(
    ("response", "gold"),
    [
        ("\\boxed{0.5}", "\\frac{1}{2}"),
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}"),
        ("\\boxed{1,000}", "1000"),
        ("\\boxed{1000}", "1,000"),
        ("\\boxed{\\dfrac{3}{4}}", "\\frac34"),
        ("\\boxed{10-4n}", "$10-4 n$"),
        ("\\boxed{x=3}", "3"),
        ("\\boxed{(1, 2)}", "\\left( 1, 2 \\right)"),
        ("\\boxed{\\frac{\\pi}{2}}", "\\pi/2"),
        ("\\boxed{50\\%}", "0.5"),
        ("The answer is: 18", "18"),
    ],
)
def test_equivalent_answers_grade_correct(response, gold):
    result = grade(response, gold, exact_match=False)
    assert result.verdict == "correct", result


@pytest.mark.parametrize(
    ("response", "gold"),
    [
        ("\\boxed{5}", "6"),
        ("\\boxed{\\frac{1}{3}}", "0.33"),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{2}"),
        ("\\boxed{(1, 2)}", "(2, 1)"),
        ("\\boxed{x^2}", "x^3"),
        ("\\boxed{-4}", "4"),
        ("\\boxed{1000}", "100"),
    ],
)
def test_non_equivalent_answers_grade_incorrect(response, gold):
    assert grade(response, gold).verdict == "incorrect"


def test_extract_boxed_takes_the_last_complete_box():
    assert extract_boxed("a \\boxed{1} b \\boxed{\\frac{1}{\\sqrt{2}}} c") == "\\frac{1}{\\sqrt{2}}"
    assert extract_boxed("\\fbox{7}") == "7"
    assert extract_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"  # escaped braces do not nest
    assert extract_boxed("\\boxed{\\left\\{ x \\right.}") == "\\left\\{ x \\right."
    assert extract_boxed("so $\\boxed 5$.") == "5"
    assert extract_boxed("\\boxed{3} then \\boxed{\\frac{1}{2") is None  # cut off in the box
    assert extract_boxed("no box here") is None
    assert extract_boxed("\\boxedx{3}") is None


def test_extract_answer_prefers_a_box_then_the_last_answer_phrase():
    assert extract_answer("... The answer is: 18") == "18"
    assert extract_answer("The answer is 3.5.\n") == "3.5"
    assert extract_answer("The final answer is $\\frac{1}{2}$.") == "\\frac{1}{2}"
    assert extract_answer("The answer is: 2 then \\boxed{4}") == "4"  # a box wins
    assert extract_answer("The answer is 1. Wait, the answer is 2.") == "2"
    assert extract_answer("Let me think about it") is None
    assert extract_answer("\\boxed{}") is None


def test_gold_answer_strips_one_outer_pair_of_dollars():
    assert gold_answer("  $\\frac{4}{5}$ ") == "\\frac{4}{5}"
    assert gold_answer("$$x+1$$") == "x+1"
    assert gold_answer("$\\min$ at $x=-1$") == "$\\min$ at $x=-1$"  # not one outer pair
    assert gold_answer("110,880") == "110,880"  # College Math lists keep their commas
    assert gold_answer(Record("a", "q", "$7$")) == "7"
    assert gold_answer({"id": "a", "question": "q", "gold": "8"}) == "8"


def test_missing_or_cut_answer_is_no_answer_and_a_grade_has_four_fields():
    truncated = "First, 3 + 4 = 7. Then we multiply by"
    result = grade(truncated, "14")
    assert result == Grade("no_answer", None, "14", None)
    assert grade("", "14").verdict == "no_answer"
    assert grade(None, "14").verdict == "no_answer"
    assert grade("\\boxed{14", "14").verdict == "no_answer"  # unbalanced box
    assert grade("x \\boxed{14}", "$14$").to_dict() == {
        "verdict": "correct",
        "extracted": "14",
        "gold": "14",
        "error": None,
    }
    assert grade("\\boxed{1}", "  ").verdict == "ungradable"


def test_grading_works_from_other_threads():
    cases = [
        ("\\boxed{0.5}", "\\frac{1}{2}"),
        ("\\boxed{3}", "4"),
        ("\\boxed{\\sqrt{8}}", "2\\sqrt2"),
    ]
    with ThreadPoolExecutor(max_workers=3) as pool:
        verdicts = list(pool.map(lambda case: grade(*case, exact_match=False).verdict, cases))
    assert verdicts == ["correct", "incorrect", "correct"]


def test_raising_verifier_is_ungradable(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("sympy exploded")

    monkeypatch.setattr(math_verify, "verify", broken)
    result = grade("\\boxed{2}", "3")
    assert result.verdict == "ungradable"
    assert result.extracted == "2"
    assert "RuntimeError: sympy exploded" in result.error


def test_hanging_verifier_times_out_and_stops(monkeypatch):
    def hang(*args, **kwargs):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # pure-Python spin, like a sympy hang
            continue
        return True

    monkeypatch.setattr(math_verify, "verify", hang)
    start = time.monotonic()
    result = grade("\\boxed{2}", "3", timeout=0.2)
    elapsed = time.monotonic() - start
    assert result.verdict == "ungradable"
    assert "timed out after 0.2 s" in result.error
    assert elapsed < 2
    # The abandoned worker is interrupted rather than left spinning for 30 s.
    for _ in range(100):
        if not any(t.name == "rl-circuits-grade" for t in threading.enumerate()):
            break
        time.sleep(0.02)
    assert not any(t.name == "rl-circuits-grade" for t in threading.enumerate())


def test_grade_many_refuses_responses_and_golds_of_different_lengths():
    with pytest.raises(ValueError, match="2 responses but 1 gold"):
        grade_many(["a", "b"], ["1"], progress=False)


# ----------------------------------------------------------------- the authors' grader


@pytest.mark.parametrize(
    ("text", "gold", "dataset", "correct"),
    [
        ("Step 1: 9 eggs. ки\nThe answer is: 18 ки", "18", "gsm8k", True),  # step tags
        ("She sells 9 eggs and earns 18", "18", "gsm8k", True),  # last-number fallback
        ("She sells 9 eggs and earns 18 and 2 cents", "18", "gsm8k", False),
        ("so \\boxed{50\\%}", "0.5", "gsm8k", True),  # percent and the x100 rule
        ("so \\boxed{5000}", "50", "gsm8k", True),
        ("\\boxed{18.0012}", "18", "gsm8k", True),  # relative 1e-4
        ("\\boxed{18.01}", "18", "gsm8k", False),
        ("I guess \\boxed{}", "18", "gsm8k", False),  # an empty box is an answer, and wrong
        ("The final answer is $\\frac{1}{2}$. I hope it is correct.", "0.5", "minerva_math", True),
        ("\\boxed{\\dfrac{1}{2}}", "\\frac12", "math500", True),
        ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", "math500", True),
        ("\\boxed{(\\frac{\\pi}{2}, 3)}", "\\left( 3, \\frac{\\pi}{2} \\right)", "math500", False),
        ("\\boxed{[2, 5)}", "[2,5)", "math500", True),  # intervals
        (
            "\\boxed{\\begin{bmatrix} 1 & 2 \\\\ 3 & 4 \\end{bmatrix}}",
            "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}",
            "math500",
            True,
        ),
        ("\\boxed{12 \\text{ dollars}}", "12", "gsm8k", True),  # units
        ("The answer is 1,234.", "1234", "gsm8k", True),
        ("\\boxed{x = 5}", "$5$", "college_math", True),
        ("the result is \\boxed{18}<|im_end|> junk 19", "18", "gsm8k", True),  # stop strings
    ],
)
def test_authors_grader_follows_the_harness_rules(text, gold, dataset, correct):
    result = grade(text, gold, grader="authors", dataset=dataset)
    assert result.correct is correct, result


# Verdicts of the harness itself (QwenLM/Qwen2.5-Math grader.py under its pinned sympy 1.12 and
# antlr4 4.11.1), where an emulation of sympy's `parse_latex` by another LaTeX parser differed.
@pytest.mark.parametrize(
    ("text", "gold", "dataset", "correct"),
    [
        ("\\boxed{ 1 4 5 ^ \\ c i r c }", "145^\\circ", "math500", False),
        ("\\boxed{ 3   \\ p m   2   \\ s q r t { 2 } }", "3 \\pm 2 \\sqrt{2}", "math500", False),
        # the gold's own answer is wrong: "\approx\1985.06" stops sympy's grammar with an error
        (
            "So the answer is $\\boxed{P=\\frac{2000}{e^{0.0025 \\cdot 3}} \\approx \\$ 1985.06}$.",
            "$P=\\frac{2000}{e^{0.0025 \\cdot 3}} \\approx \\$ 1985.06$",
            "college_math",
            False,
        ),
        # chains of equations read as Eq(Eq(..)) = False on both sides: equal
        (
            "Thus \\boxed{i^{311}=\\left(i^{4}\\right)^{76}=1^{76}=1}.",
            "$i^{304}=\\left(i^{4}\\right)^{76}=1^{76}=1$",
            "college_math",
            True,
        ),
        (
            "\\boxed{\\frac{-3}{\\sqrt{1+4+1} \\sqrt{1+4+49}}=-0.55555=\\cos \\theta}",
            "$\\frac{-10}{\\sqrt{1+4+1} \\sqrt{1+4+49}}=-0.55555=\\cos \\theta$",
            "college_math",
            True,
        ),
        (
            "\\boxed{P(X=12) \\approx\\left((100 / 1000)^{5} / 5\\right.$ ! $) "
            "\\exp \\{-100 / 1000\\}}",
            "$P(X=5) \\approx\\left((100 / 1000)^{5} / 5\\right.$ ! $) \\exp \\{-100 / 1000\\}$",
            "college_math",
            True,  # the equations differ, then the whole texts both read as P
        ),
        # one `=` each: when the difference check fails the whole equations are still compared,
        # and sympy reads each `log(c) = -6` as False
        (
            "\\boxed{\\log \\frac{8}{1000000}=-6}",
            "$\\log \\frac{1}{1000000}=-6$",
            "college_math",
            True,
        ),
        # latex2sympy2 reads a leading {a, b} as a list and ignores what follows it
        (
            "\\boxed{\\{\\sin \\sqrt{x}, \\cos \\sqrt{x}\\}+1}",
            "$\\{\\sin \\sqrt{x}, \\cos \\sqrt{x}\\}$",
            "college_math",
            True,
        ),
        (
            "The answer is \\{e^{x}, e^{x} / x\\}+1",
            "$\\{e^{x}, e^{x} / x\\}$",
            "college_math",
            True,
        ),
        ("The answer is \\{e^{x}, e^{x} / 2\\}", "$\\{e^{x}, e^{x} / x\\}$", "college_math", False),
        (
            "\\boxed{1/4 ;\\left(y-1/2\\right)^{2}}",
            "$\\frac{1}{4} ;\\left(y-\\frac{1}{2}\\right)^{2}$",
            "college_math",
            True,
        ),
        # ... only when every item is one formula (`x^{}` is none)
        (
            "\\boxed{\\left\\{x^{a}, x^{a} \\ln x\\right\\}+1}",
            "$\\left\\{x^{a}, x^{a} \\ln x\\right\\}$",
            "college_math",
            False,
        ),
        # bracketed matrices: the grammar has no \begin{pmatrix}, each side fails to parse
        (
            "\\boxed{\\mathbf{y}=c_{8} e^{2 t}"
            "\\left[\\begin{array}{c}\\cos t \\\\ 2\\end{array}\\right]}",
            "$\\mathbf{y}=c_{1} e^{2 t}\\left[\\begin{array}{c}\\cos t \\\\ 2\\end{array}\\right]$",
            "college_math",
            False,
        ),
        ("\\boxed{\\mathbb{R}+1}", "$\\mathbb{R}$", "college_math", False),  # R*mathbb + 1
        ("\\boxed{\\mathbb{R}}", "$\\{$ All reals. $\\}: \\mathbb{R}$", "college_math", False),
        ("\\boxed{No. Consider y}", "No. Consider x", "college_math", True),  # both N*o
        ("\\boxed{Yes}", "No. Consider x", "college_math", False),
    ],
)
def test_authors_grader_parses_latex_as_the_harness_does(text, gold, dataset, correct):
    result = grade(text, gold, grader="authors", dataset=dataset)
    assert result.correct is correct, result


@pytest.mark.parametrize(
    ("latex", "expected"),
    [
        ("\\mathbb{R}+1", "R*mathbb + 1"),  # the longest leading formula, partial commands too
        ("No. Consider x", "N*o"),
        ("x^{2}+1, 5", "x**2 + 1"),
        ("P(X=12)\\approx3", "P"),
        ("i^{311}=(i^{4})^{76}=1^{76}=1", "False"),
        ("\\frac{1}{", None),  # a syntax error in what it reads raises
        ("(45,2),(-10,-9)", None),
        ("\\begin{pmatrix}1&2\\end{pmatrix}", None),
        ("?x", None),
        ("", None),
    ],
)
def test_latex_parser_matches_sympys_parse_latex(latex, expected, capsys):
    """Results of sympy 1.12's `parse_latex` on antlr4 4.11 (the harness's), from our antlr4."""
    from sympy.parsing.latex.errors import LaTeXParsingError

    from rl_circuits.data.harness_grader import parse_latex

    if expected is None:
        with pytest.raises(LaTeXParsingError):
            parse_latex(latex)
    else:
        assert str(parse_latex(latex)) == expected
    assert capsys.readouterr().out == ""  # the generated code's version notice is silenced


@pytest.mark.parametrize(
    ("latex", "expected"),
    [
        ("{\\sin\\sqrt{x},\\cos\\sqrt{x}}+1", ["sin(sqrt(x))", "cos(sqrt(x))"]),
        ("[a;b^{2}]\\cdot3", ["a", "b**2"]),
        ("{\\frac{1}{2},x}", ["1/2", "x"]),  # inner braces do not split
        ("1/4;(y-1/2)^{2}", ["1/4", "(y - 1/2)**2"]),  # bare lists too
        ("a,b;c", ["a", "b"]),  # ... up to the other separator
        ("a,b)x", ["a", "b"]),  # ... or a stray closing bracket
        ("{a,b;c}", None),
        ("{x^{},x}", None),  # an item that is not one formula
        ("{(1,2),x}", None),
        ("(a,b)", None),  # parentheses are not a list to latex2sympy2
        ("{a,b", None),
        ("{a,b)", None),
    ],
)
def test_third_parser_reads_a_leading_list_as_latex2sympy2_does(latex, expected):
    """latex2sympy2 1.9.0's verdicts in the authors' environment: lists, or a parse error."""
    from rl_circuits.data.harness_grader import parse_latex_list

    if expected is None:
        with pytest.raises(Exception):  # noqa: B017 - any parse error, as the harness catches
            parse_latex_list(latex)
    else:
        assert [str(item) for item in parse_latex_list(latex)] == expected


def test_authors_grader_without_antlr4_says_what_to_install(monkeypatch):
    import sys

    from rl_circuits.data import harness_grader

    harness_grader.latex_grammar.cache_clear()
    monkeypatch.setitem(sys.modules, "antlr4", None)  # `import antlr4` raises ImportError
    try:
        with pytest.raises(ImportError, match="antlr4-python3-runtime"):
            grade("\\boxed{x+1}", "1+x", grader="authors", dataset="math500")
    finally:
        harness_grader.latex_grammar.cache_clear()


def test_authors_grader_differs_from_math_verify_where_the_harness_does():
    text = "She sells 9 eggs and earns 18"  # no box, no "answer is": only the harness reads 18
    assert grade(text, "18", grader="authors", dataset="gsm8k").correct
    assert not grade(text, "18").correct


def test_authors_grader_never_evaluates_model_output(tmp_path):
    target = tmp_path / "pwned"
    text = f"\\boxed{{open('{target}', 'w')}}"
    assert not grade(text, "5", grader="authors", dataset="gsm8k").correct
    assert not target.exists()


def test_unknown_grader_is_an_error():
    with pytest.raises(ValueError, match="grader must be one of"):
        grade("\\boxed{1}", "1", grader="harness")


def test_authors_grader_on_the_answer_style_corpus():
    """Every style of the agreement corpus grades without error, correct styles correct."""
    from grading_corpus import corpus

    golds = {
        "gsm8k": ["18", "3", "70000", "0.5"],
        "math500": ["\\frac{14}{3}", "\\left( 3, \\frac{\\pi}{2} \\right)", "[-2,7]", "p - q"],
        "college_math": ["$10-4 n$", "$(45,2),(-10,-9)$", "$-\\frac{1}{2}$"],
    }
    for dataset, style, text, gold in corpus(golds):
        result = grade(text, gold, grader="authors", dataset=dataset)
        assert result.verdict in ("correct", "incorrect", "no_answer"), (style, result)
        if style in ("boxed", "two_boxes", "answer_is", "end_token"):
            assert result.correct, (dataset, style, text, gold, result)
        if style in ("empty_box", "no_answer"):
            assert not result.correct
