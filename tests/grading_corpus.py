"""Answers written the ways models write them, built from gold answers: the corpus on which
the "authors" grader is checked against the Qwen2.5-Math harness (bench/grader_agreement.py)
and which the grading tests draw their cases from.

Each case is (style, response text, gold). Styles cover the harness's extraction paths (last
box, "The answer is", Minerva's "final answer is $...$. I hope", the last-number fallback,
Math-Shepherd step tags) and its equality rules (percent x100 / /100, relative tolerance,
tuples, intervals, matrices, units, thousands separators, empty boxes).
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _wrong(gold: str) -> str:
    """A plausible wrong answer: the first number changed, else something else entirely."""
    match = _NUMBER.search(gold)
    if match is None:
        return gold + "+1"
    value = match.group()
    changed = str(int(float(value)) + 7) if "." not in value else str(float(value) * 3)
    return gold[: match.start()] + changed + gold[match.end() :]


def _styles(gold: str) -> list[tuple[str, str]]:
    plain = gold.strip().strip("$")
    cases = [
        ("boxed", f"We compute step by step.\nSo the answer is $\\boxed{{{plain}}}$."),
        ("boxed_wrong", f"Thus the result is \\boxed{{{_wrong(plain)}}}."),
        ("two_boxes", f"First \\boxed{{{_wrong(plain)}}}, correcting: \\boxed{{{plain}}}"),
        ("answer_is", f"Step 1: add. ки\nStep 2: done. ки\nThe answer is: {plain} ки"),
        ("answer_is_wrong", f"Step 1: guess. ки\nThe answer is: {_wrong(plain)} ки"),
        (
            "minerva",
            f"Solution: ... Final Answer: The final answer is ${plain}$. I hope it is correct.",
        ),
        ("final_answer_is", f"Therefore the final answer is {plain}."),
        ("empty_box", "I am not sure, so \\boxed{}."),
        ("no_answer", "I cannot solve this problem."),
        ("text_box", f"\\boxed{{\\text{{{plain}}}}}"),
        ("dfrac", "\\boxed{" + plain.replace("\\frac", "\\dfrac") + "}"),
        ("spaces", "\\boxed{ " + " ".join(plain) + " }"),
        ("left_right", "\\boxed{" + plain.replace("(", "\\left(").replace(")", "\\right)") + "}"),
        ("end_token", f"\\boxed{{{plain}}}<|im_end|>"),
    ]
    number = _NUMBER.fullmatch(plain.replace(",", ""))
    if number:
        value = float(number.group())
        cases += [
            ("last_number", f"She has 3 apples and 4 pears, so in total {plain} things"),
            ("last_number_wrong", f"She has 3 apples and then {plain} and finally 12345 more"),
            ("percent", f"\\boxed{{{plain}\\%}}"),
            ("times_100", f"\\boxed{{{value * 100:g}}}"),
            ("over_100", f"\\boxed{{{value / 100:g}}}"),
            ("close", f"\\boxed{{{value * (1 + 5e-5):.10g}}}"),
            ("not_close", f"\\boxed{{{value * 1.01 + 0.5:.10g}}}"),
            ("thousands", f"The answer is {int(value):,}" if value == int(value) else "\\boxed{}"),
            ("units", f"\\boxed{{{plain} \\text{{ dollars}}}}"),
            ("unit_word", f"The answer is {plain} feet."),
            ("dollar", f"The answer is \\${plain}."),
            (
                "decimal_zero",
                f"\\boxed{{{plain}.00}}" if "." not in plain else f"\\boxed{{{plain}0}}",
            ),
            ("equation", f"\\boxed{{x = {plain}}}"),
            ("brace_less", f"so it is $\\boxed {plain}$ indeed"),
        ]
    if plain.startswith(("(", "[")) and "," in plain:
        items = plain[1:-1].split(",")
        cases += [
            (
                "tuple_spaced",
                "\\boxed{" + plain[0] + ", ".join(i.strip() for i in items) + plain[-1] + "}",
            ),
            ("tuple_reversed", "\\boxed{" + plain[0] + ",".join(reversed(items)) + plain[-1] + "}"),
            ("interval_other_bracket", "\\boxed{" + "[" + plain[1:-1] + ")" + "}"),
        ]
    if "pmatrix" in plain:
        cases.append(("bmatrix", "\\boxed{" + plain.replace("pmatrix", "bmatrix") + "}"))
    if "\\frac" in plain:
        cases.append(
            ("slash", "\\boxed{" + re.sub(r"\\frac\{(\w+)\}\{(\w+)\}", r"\1/\2", plain) + "}")
        )
    return cases


def corpus(golds: dict[str, list[str]]) -> list[tuple[str, str, str, str]]:
    """(dataset, style, response text, gold) for each gold of each dataset and each style."""
    return [
        (dataset, style, text, gold)
        for dataset, values in golds.items()
        for gold in values
        for style, text in _styles(gold)
    ]
