"""The Qwen2.5-Math harness's symbolic equality: answer text to sympy, and the checks that
compare two parsed answers.

Why apart from `rl_circuits.data.harness_grader`: parsing is its own concept, with its own
dependencies (sympy's ANTLR LaTeX grammar, antlr4) and its own safety rule: model output is
never evaluated as Python, only plain arithmetic text goes to sympy's `parse_expr`
(`_plain_expression`). The harness tries three parsers in order: sympy's LaTeX grammar, plain
arithmetic, and latex2sympy2's reading of lists.
"""

from __future__ import annotations

import builtins
import keyword
import math
import re
from collections.abc import Callable
from functools import cache
from typing import Any


def numbers_close(prediction: float, reference: float) -> bool:
    """Equal within the harness's relative tolerance, 1e-4."""
    return math.isclose(reference, prediction, rel_tol=1e-4)


@cache
def _expression_names() -> frozenset[str]:
    """Names `parse_expr` would resolve to objects (sympy's namespace and builtins)."""
    namespace: dict[str, Any] = {}
    exec("from sympy import *", namespace)  # noqa: S102 - a fixed import, no user text
    return frozenset(namespace) | frozenset(vars(builtins))


_SAFE_FUNCTIONS = frozenset(
    "sin cos tan cot sec csc asin acos atan sinh cosh tanh log ln exp sqrt pi E I oo "
    "Abs factorial binomial floor ceiling gamma Rational Integer Float Symbol Matrix "
    "Interval Union FiniteSet Eq root re im conjugate max min sign".split()
)


def _plain_expression(text: str) -> bool:
    """True when `parse_expr` may read `text` without running anything but arithmetic:
    no attribute access, strings, dunders or keywords, and only names that sympy turns into
    symbols or that are mathematical functions."""
    if re.search(r"[\"'`\\@#;:]|__|\.\s*[A-Za-z_]", text):
        return False
    for name in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text):
        if keyword.iskeyword(name) or name.startswith("_"):
            return False
        if name in _expression_names() and name not in _SAFE_FUNCTIONS:
            return False
    return True


def _parse_plain(text: str) -> Any:
    from sympy.parsing.sympy_parser import parse_expr

    if not _plain_expression(text):
        raise ValueError(f"not plain arithmetic: {text!r}")
    return parse_expr(text)


@cache
def latex_grammar() -> tuple[Any, type, type, Any]:
    """sympy's ANTLR LaTeX grammar (the one behind the harness's `parse_latex`): the antlr4
    module, lexer and parser classes, and sympy's module with its error listener and
    converter. sympy's own `parse_latex` wrapper insists on antlr4 4.11 (math-verify needs
    4.13), but the generated grammar runs unchanged on 4.13; the subclasses only silence the
    generated code's version notice, which it prints to stdout."""
    try:
        import antlr4
        from sympy.parsing.latex import _parse_latex_antlr as grammar
    except ImportError as exc:
        raise ImportError(
            "the authors' grader parses LaTeX with sympy's ANTLR grammar, which needs the "
            "package antlr4-python3-runtime (pip install 'antlr4-python3-runtime>=4.11')"
        ) from exc
    if None in (grammar.LaTeXLexer, grammar.LaTeXParser, grammar.MathErrorListener):
        raise ImportError(
            "sympy's ANTLR LaTeX grammar did not load (sympy.parsing.latex._antlr); install "
            "antlr4-python3-runtime>=4.11 next to sympy"
        )

    class Lexer(grammar.LaTeXLexer):
        def checkVersion(self, toolVersion: str) -> None:  # noqa: N802 - antlr's name
            """Generated for antlr 4.11; its grammar runs on later runtimes as is."""

    class Parser(grammar.LaTeXParser):
        def checkVersion(self, toolVersion: str) -> None:  # noqa: N802 - antlr's name
            """Generated for antlr 4.11; its grammar runs on later runtimes as is."""

    return antlr4, Lexer, Parser, grammar


def parse_latex(text: str, *, whole: bool = False) -> Any:
    """LaTeX to sympy exactly as the harness's sympy 1.12 `parse_latex`: the same grammar and
    converter, which read the longest leading formula and ignore what follows it ("No.
    Consider x" reads as N*o, `\\mathbb{R}+1` as R*mathbb + 1); a syntax error in what it
    reads raises; with `whole`, so does text after it."""
    antlr4, lexer_class, parser_class, grammar = latex_grammar()
    errors = grammar.MathErrorListener(text)
    lexer = lexer_class(antlr4.InputStream(text))
    lexer.removeErrorListeners()
    lexer.addErrorListener(errors)
    parser = parser_class(antlr4.CommonTokenStream(lexer))
    parser.removeErrorListeners()
    parser.addErrorListener(errors)
    relation = parser.math().relation()
    if whole and parser.getCurrentToken().type != antlr4.Token.EOF:
        raise ValueError(f"{text!r} holds more than one formula")
    return grammar.convert_relation(relation)


_LIST_CLOSE = {"{": "}", "[": "]"}
_NESTING = {"{": "}", "[": "]", "(": ")"}


def _list_items(text: str) -> list[str] | None:
    """The items of a list as latex2sympy2 reads one: a leading `{a, b, ...}` or `[a, b, ...]`
    (text after the closing bracket ignored) or a bare `a, b, ...` (up to a stray closing
    bracket or the other separator); two or more items, split at the first separator kind
    (comma or semicolon) outside nested brackets; else None."""
    bracketed = bool(text) and text[0] in _LIST_CLOSE
    closers = [_LIST_CLOSE[text[0]]] if bracketed else []
    level, start = len(closers), len(closers)
    items: list[str] = []
    separator = None
    for i in range(start, len(text)):
        char = text[i]
        ends_bare_list = (
            not bracketed
            and not closers
            and (char in ")]}" or (char in ",;" and separator not in (None, char)))
        )
        if ends_bare_list:  # a stray closing bracket or the other separator: the rest is ignored
            items.append(text[start:i])
            break
        if char in _NESTING:
            closers.append(_NESTING[char])
        elif char in ")]}":
            if char != closers.pop():
                return None
            if bracketed and not closers:
                items.append(text[start:i])
                break
        elif char in ",;" and len(closers) == level and separator in (None, char):
            separator = char
            items.append(text[start:i])
            start = i + 1
    else:
        if bracketed:
            return None
        items.append(text[start:])
    return items if len(items) >= 2 and all(item.strip() for item in items) else None


def parse_latex_list(text: str) -> list[Any]:
    """The harness's third parser (latex2sympy2 1.9.0) where the first two fail on what it
    reads differently: a list, `{a, b}`, `[a; b]` or `a; b`, becomes a list of its items as
    formulas; after a closing bracket the text is ignored (`{a, b}+1` reads as [a, b]). Each
    item must be one formula of sympy's grammar. Anything else raises."""
    items = _list_items(text)
    if items is None:
        raise ValueError(f"not a list: {text!r}")
    return [parse_latex(item, whole=True) for item in items]


def _parse(text: str) -> Any:
    """A sympy object (or a list of them) from answer text, else the text: the harness's three
    parsers in its order, sympy's LaTeX grammar, plain arithmetic, then latex2sympy2's reading
    of lists (`parse_latex_list`), each on the text with `\\\\` read as `\\` and then
    as written."""
    latex_grammar()  # a missing antlr4 is an install error, not a failed parse
    for parser in (parse_latex, _parse_plain, parse_latex_list):
        for variant in (text.replace("\\\\", "\\"), text):
            try:
                return parser(variant)
            except Exception:  # any parse failure moves on, as in the harness
                continue
    return text


def symbolic_equal(a: str, b: str) -> bool:
    """The harness's `symbolic_equal`: parse both, then same text, same value, a zero
    difference, equal equations, equal numeric values (1e-4) or equal rounded matrices."""
    from sympy import N, simplify

    x, y = _parse(a), _parse(b)
    checks: tuple[Callable[[], Any], ...] = (
        lambda: str(x) == str(y) or x == y,
        lambda: x.equals(y) or simplify(x - y) == 0,
        lambda: abs(x.lhs - x.rhs).equals(abs(y.lhs - y.rhs)),
        lambda: numbers_close(float(N(x)), float(N(y))),
        lambda: (
            x.shape == y.shape
            and x.applyfunc(lambda v: round(v, 3)).equals(y.applyfunc(lambda v: round(v, 3)))
        ),
    )
    for check in checks:
        try:
            if check():
                return True
        except Exception:  # a check that does not apply to these objects is skipped
            continue
    return False
