"""The authors' grader: the Qwen2.5-Math evaluation harness's answer extraction and equality.

The paper's accuracies and its both-correct question sets come from that harness
(`evaluation/parser.py`, `evaluation/grader.py` of QwenLM/Qwen2.5-Math, in the copy that
holimario/llm_rl_probing_analysis vendors with latex2sympy2 1.9.0, sympy 1.12 and antlr4
4.11.1). This module reproduces its decisions rule by rule,
including the odd ones (the last number of a text is its answer; 50 equals 0.5 and 5000;
unit words are deleted), because a different verdict changes which questions are selected.
Model output is never evaluated as Python: where the harness calls sympy's `parse_expr` on an
answer, only plain arithmetic text goes there (`rl_circuits.data.harness_sympy`, which parses
answers for the symbolic check; its `parse_latex`, `parse_latex_list` and `latex_grammar` are
importable from here too).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from rl_circuits.data.harness_sympy import latex_grammar as latex_grammar
from rl_circuits.data.harness_sympy import numbers_close, symbolic_equal
from rl_circuits.data.harness_sympy import parse_latex as parse_latex
from rl_circuits.data.harness_sympy import parse_latex_list as parse_latex_list

# Datasets whose answers keep their unit words (the harness's STRIP_EXCEPTIONS).
KEEP_UNITS = ("carp_en", "minerva_math")
# Datasets whose gold is the \boxed{} of a worked solution: the gold goes through answer
# extraction like a model's answer does.
SOLUTION_GOLD = ("math", "math500", "minerva_math")
CHOICES = ("A", "B", "C", "D", "E")
STEP_TAG = "\u043a\u0438"  # Math-Shepherd's step tag "ки"

# Unit words the harness deletes (from MathQA), in its order; each also with a trailing "s".
# They are regular expressions there ("q ." matches "q x"), and so here.
_UNIT_WORDS = (
    "east|degree|mph|kmph|ft|m sqaure| m east|sq m|deg|mile|q .|monkey|prime|ratio|"
    "profit of rs|rd|o|gm|p . m|lb|tile|per|dm|lt|gain|ab|way|west|a .|b .|c .|d .|e .|f .|"
    "g .|h .|t|a|h|no change|men|soldier|pie|bc|excess|st|inches|noon|percent|by|gal|kmh|c|"
    "acre|rise|a . m|th|π r 2|sq|mark|l|toy|coin|sq . m|gallon|° f|profit|minw|yr|women|"
    "feet|am|pm|hr|cu cm|square|v â € ™|are|rupee|rounds|cubic|cc|mtr|s|ohm|number|kmph|day|"
    "hour|minute|min|second|man|woman|sec|cube|mt|sq inch|mp|∏ cm ³|hectare|more|sec|unit|"
    "cu . m|cm 2|rs .|rs|kg|g|month|km|m|cm|mm|apple|liter|loss|yard|pure|year|increase|"
    "decrease|d|less|Surface|litre|pi sq m|s .|metre|meter|inch"
).split("|")
_UNIT_PATTERNS = tuple(
    re.compile(r"(^|\W)" + word + r"($|\W)")
    for word in (*_UNIT_WORDS, *(w + "s" for w in _UNIT_WORDS))
)
_LAST_NUMBER = re.compile(r"-?\d*\.?\d+")
_VARIABLE_PREFIXES = ("x=", "y=", "z=", "x\\in", "y\\in", "z\\in", "x\\to", "y\\to", "z\\to")


# ---------------------------------------------------------------- string normalisation


def _number_words(text: str) -> str:
    """Number words to digits ("five" -> "5"), as the harness does with word2number."""
    from word2number import w2n

    try:
        return str(w2n.word_to_num(text))
    except Exception:  # word2number signals "no number words" with exceptions
        return text


def _brace_fracs(text: str) -> str:
    r"""`\frac12` -> `\frac{1}{2}`, `\frac1{x}` -> `\frac{1}{x}`; text unchanged if malformed."""
    head, *pieces = text.split("\\frac")
    out = [head]
    for piece in pieces:
        out.append("\\frac")
        if piece.startswith("{"):
            out.append(piece)
            continue
        if len(piece) < 2:
            return text
        first, second, rest = piece[0], piece[1], piece[2:]
        if second == "{":
            out.append("{" + first + "}" + second + rest)
        else:
            out.append("{" + first + "}{" + second + "}" + rest)
    return "".join(out)


def _slash_to_frac(text: str) -> str:
    r"""`3/4` -> `\frac{3}{4}` when both sides are integers written plainly (or hold sqrt)."""
    parts = text.split("/")
    if len(parts) != 2:
        return text
    sides = []
    for side in parts:
        if "sqrt" in side:
            sides.append(side)
            continue
        try:
            sides.append(str(int(side)))
        except ValueError:
            return text
    if "/".join(sides) != text:
        return text
    return "\\frac{" + sides[0] + "}{" + sides[1] + "}"


def normalize(text: Any, keep_units: bool = False) -> str:
    """The harness's `strip_string`: canonical text of an answer (no evaluation)."""
    s = str(text).strip().replace("\n", "").rstrip(".")
    s = s.replace("\\!", "")
    s = re.sub(r"\\begin\{array\}\{.*?\}", r"\\begin{pmatrix}", s)
    s = re.sub(r"\\end\{array\}", r"\\end{pmatrix}", s)
    s = s.replace("bmatrix", "pmatrix")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\neq", "\\ne").replace("\\leq", "\\le").replace("\\geq", "\\ge")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\{", "{").replace("\\}", "}")
    without_text_unit = re.sub(r"\\text{.*?}$", "", s).strip()
    if without_text_unit and without_text_unit != s:
        s = without_text_unit
    if not keep_units:
        for _ in range(2):
            for pattern in _UNIT_PATTERNS:
                shorter = pattern.sub(r"\1\2", s)
                if shorter:
                    s = shorter
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\(", "").replace("\\)", "")
    s = _number_words(s)
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    for prefix in _VARIABLE_PREFIXES:
        s = s.replace(prefix, "")
    s = s.replace("\\emptyset", "{}").replace("(-\\infty,\\infty)", "\\mathbb{R}")
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    # (The harness also unwraps "{x}" when the whole string is alphanumeric: never true.)
    s = s.replace("infinity", "\\infty")
    if "\\infty" not in s:
        s = s.replace("inf", "\\infty")
    s = s.replace("+\\inity", "\\infty")
    s = s.replace("and", "").replace("\\mathbf", "")
    s = re.sub(r"\\mbox{.*?}", "", s)
    if "j" in s and "i" not in s:
        s = s.replace("j", "i")
    s = re.sub(r"(\d+)\.0*([^\d])", r"\1\2", s)
    s = re.sub(r"(\d+)\.0*$", r"\1", s)
    if not s:
        return s
    if s.startswith("."):
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        s = sides[1]
    s = re.sub(r"\\sqrt(\w+)", r"\\sqrt{\1}", s)
    s = s.replace(" ", "")
    return _slash_to_frac(_brace_fracs(s))


# ---------------------------------------------------------------- answer extraction


def _after_last_boxed(text: str) -> str:
    """What the last "boxed" introduces: its brace group, or the text up to the next `$`."""
    rest = text.split("boxed")[-1]
    if not rest.startswith("{"):
        return rest.split("$")[0].strip()
    depth, out = 1, []
    for char in rest[1:]:
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                break
        out.append(char)
    return "".join(out)


def _raw_answer(text: str) -> str | None:
    """The answer text before clean-up; None where the harness returns "" at once."""
    if "final answer is $" in text and "$. I hope" in text:  # Minerva's few-shot style
        return text.split("final answer is $", 1)[1].split("$. I hope", 1)[0].strip()
    if "boxed" in text:
        if text.endswith("boxed"):
            return None
        return _after_last_boxed(text)
    for anchor in ("he answer is", "final answer is"):
        if anchor in text:
            return text.split(anchor)[-1].strip()
    if "答案是" in text:
        return text.split("答案是")[1].strip().split("\n\n")[0].strip()
    numbers = _LAST_NUMBER.findall(text.replace(",", ""))
    return numbers[-1] if numbers else ""


def extract_answer(text: str, dataset: str = "") -> str:
    """The harness's `extract_answer`: the final answer of a response, normalised."""
    text = text.replace(STEP_TAG, "")
    raw = _raw_answer(text)
    if raw is None:
        return ""
    raw = re.sub(r"\n\s*", "", raw)
    if raw.startswith(":"):
        raw = raw[1:]
    if raw.endswith("."):
        raw = raw[:-1]
    if raw.endswith("/"):
        raw = raw[:-1]
    return normalize(raw, keep_units=dataset in KEEP_UNITS)


def prediction(text: str | None, dataset: str = "") -> str | None:
    """What the harness compares for one response text: None for an empty response."""
    if not text or text == "error":
        return None
    return normalize(extract_answer(text, dataset), keep_units=dataset in KEEP_UNITS)


def gold_answer(gold: Any, dataset: str = "") -> str:
    """The harness's ground truth from a gold answer text (as `datasets.py` stores it)."""
    if dataset in SOLUTION_GOLD:
        ref = extract_answer("\\boxed{" + str(gold) + "}", dataset)
        if dataset in KEEP_UNITS:
            ref = ref.replace("\\neq", "\\ne").replace("\\leq", "\\le").replace("\\geq", "\\ge")
        return ref
    text = str(gold)
    if dataset == "college_math":
        text = text.replace("$", "").strip()
    elif dataset == "olympiadbench":
        text = text.strip("$")
    if dataset in KEEP_UNITS:
        return text.replace("\\neq", "\\ne").replace("\\leq", "\\le").replace("\\geq", "\\ge")
    return normalize(normalize(text))


def _choice_letter(text: str) -> str:
    """The last standalone A-E of an answer, else the answer without its final period."""
    text = text.strip("\n").rstrip(".").rstrip("/").strip(" ").lstrip(":")
    letters = re.findall(r"\b(A|B|C|D|E)\b", text.upper())
    picked = letters[-1] if letters else text.strip().strip(".")
    return picked.rstrip(".").rstrip("/")


def _response_choice(text: str) -> str:
    """The harness's parser-side choice clean-up of a whole response (multiple choice)."""
    text = text.strip("\n")
    if any(text.count(t) > 1 for t in ("choice is", "answer is")):
        text = text.split("\n\n")[0]
    parts = re.split("choice is|answer is", text)
    after_trigger = len(parts) > 1
    if after_trigger:
        text = parts[-1]
    text = text.strip("\n").rstrip(".").rstrip("/").strip(" ").lstrip(":")
    letters = re.findall(r"\b(A|B|C|D|E)\b", text.upper()) or [text.strip().strip(".")]
    picked = letters[0] if after_trigger else letters[-1]
    return picked.rstrip(".").rstrip("/")


def _only_choices(text: str) -> bool:
    return all(char in CHOICES for char in text)


# ---------------------------------------------------------------- equality


def _as_number(text: Any) -> float | None:
    """A float from answer text (commas dropped; a trailing % divides by 100), else None."""
    s = str(text).replace(",", "")
    with suppress(ValueError):
        return float(s)
    if s.endswith("%"):
        with suppress(ValueError):
            return float(s[:-1].removesuffix("\\")) / 100
    return None


def _numbers_equal(pred: str, ref: str) -> bool:
    """Numerically equal within relative 1e-4, where ref may also be read x100 or /100."""
    a, b = _as_number(pred), _as_number(ref)
    if a is None or b is None:
        return False
    for candidate in (b / 100, b, b * 100):
        try:
            if numbers_close(a, candidate):
                return True
        except (OverflowError, ValueError):
            continue
    return False


def _is_list(text: str) -> bool:
    return re.match(r"(\(|\[).+(\)|\])", text) is not None


_MATRIX_OPEN = ("\\begin{pmatrix}", "\\begin{bmatrix}")
_MATRIX_CLOSE = ("\\end{pmatrix}", "\\end{bmatrix}")


def _is_matrix(text: str) -> bool:
    return text.startswith(_MATRIX_OPEN) and text.endswith(_MATRIX_CLOSE)


def _as_pmatrix(text: str) -> str:
    r"""`{1,2}` groups -> `\begin{pmatrix}1\2\end{pmatrix}` (the harness's reading)."""
    groups = re.findall(r"\{.*,.*\}", text.strip())
    return ", ".join(
        "\\begin{pmatrix}" + g.strip("{}").replace(",", "\\") + "\\end{pmatrix}" for g in groups
    )


def _matrix_rows(text: str) -> list[str]:
    body = text[len("\\begin{pmatrix}") : -len("\\end{pmatrix}")]
    return [row.strip() for row in body.split("\\\\") if row.strip()]


def _lists_equal(pred: str, ref: str, symbolic: Callable[[str, str], bool]) -> bool:
    pred_items, ref_items = pred[1:-1].split(","), ref[1:-1].split(",")
    return len(pred_items) == len(ref_items) and all(
        _equal(p, r, symbolic) for p, r in zip(pred_items, ref_items, strict=True)
    )


def _matrices_equal(pred: str, ref: str, symbolic: Callable[[str, str], bool]) -> bool:
    pred_rows, ref_rows = _matrix_rows(pred), _matrix_rows(ref)
    if len(pred_rows) != len(ref_rows):
        return False
    for pred_row, ref_row in zip(pred_rows, ref_rows, strict=True):
        pred_cells, ref_cells = pred_row.split("&"), ref_row.split("&")
        if len(pred_cells) != len(ref_cells):
            return False
        if not all(_equal(p, r, symbolic) for p, r in zip(pred_cells, ref_cells, strict=True)):
            return False
    return True


def _equation_difference(equation: str) -> str:
    left, right = equation.split("=")[:2]
    return f"{left.strip()} - ({right.strip()})"


def _short_lhs(equation: str) -> bool:
    """`x = 5`-like: one `=` with at most two characters before it."""
    return equation.count("=") == 1 and len(equation.split("=")[0].strip()) <= 2


def _without(text: str, chars: str) -> str:
    return "".join(c for c in text if c not in chars)


def _equal(pred: Any, ref: Any, symbolic: Callable[[str, str], bool]) -> bool:
    """The harness's `math_equal` (percent rule and relative tolerance on) as the authors'
    copy has it (holimario/llm_rl_probing_analysis `evaluation/grader.py`): a failed list,
    matrix or equation rule falls through to the symbolic check of the whole texts (today's
    QwenLM/Qwen2.5-Math grader returns False there instead)."""
    if pred is None or ref is None:
        return False
    if pred.strip().lower() == ref.strip().lower():
        return True
    if ref in CHOICES and _choice_letter(pred) == ref:
        return True
    if _as_number(pred) is not None and _as_number(ref) is not None:
        return _numbers_equal(pred, ref)  # two numbers: no symbolic check after this one
    if not pred:
        return False
    ref, pred = str(ref).strip(), str(pred).strip()
    if "pmatrix" in pred and "pmatrix" not in ref:
        ref = _as_pmatrix(ref)
    bare_pred, bare_ref = pred, ref
    pred_square = pred.startswith("[") and pred.endswith("]")
    pred_round = pred.startswith("(") and pred.endswith(")")
    if (pred_square and not ref.startswith("(")) or (pred_round and not ref.startswith("[")):
        bare_pred, bare_ref = bare_pred.strip("[]()"), bare_ref.strip("[]()")
    if _without(bare_pred, "{}()").lower() == _without(bare_ref, "{}()").lower():
        return True
    # Each structural rule can only say "equal"; otherwise the whole texts still go to the
    # symbolic check, as in the harness (sympy reads `\log 8 = -6` and `\log 1 = -6` both as
    # False, so they are equal there).
    if _is_list(pred) and _is_list(ref) and _lists_equal(pred, ref, symbolic):
        return True
    if _is_matrix(pred) and _is_matrix(ref) and _matrices_equal(pred, ref, symbolic):
        return True
    if pred.count("=") == 1 and ref.count("=") == 1:
        a, b = _equation_difference(pred), _equation_difference(ref)
        if symbolic(a, b) or symbolic(f"-({a})", b):
            return True
    elif _short_lhs(pred) and "=" not in ref:
        if _equal(pred.split("=")[1], ref, symbolic):
            return True
    elif _short_lhs(ref) and "=" not in pred and _equal(pred, ref.split("=")[1], symbolic):
        return True
    return symbolic(pred, ref)


def math_equal(pred: str | None, ref: str | None) -> bool:
    """Whether a normalised prediction equals a normalised ground truth (harness rules)."""
    return _equal(pred, ref, symbolic_equal)


STOP_STRINGS = ("</s>", "<|im_end|>", "<|endoftext|>")


def verdict_inputs(text: str | None, gold: Any, dataset: str) -> tuple[str | None, str]:
    """(prediction, ground truth) exactly as the harness compares them, for one response
    (whose text it strips and cuts at its stop strings first)."""
    ref = gold_answer(gold, dataset)
    text = (text or "").strip()
    for stop in STOP_STRINGS:
        if stop in text:
            text = text.split(stop)[0].strip()
    pred = prediction(text, dataset)
    if pred is not None and ref in CHOICES and pred not in CHOICES:
        pred = _response_choice(text or "")
    elif pred is not None and _only_choices(ref) and not _only_choices(pred):
        pred = "".join(c for c in pred if c in CHOICES)
    return pred, ref
