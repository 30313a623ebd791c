"""Table 1's layout and formats (`rl_circuits.analysis.table1`): the paper's number format,
rows x columns, Markdown, LaTeX and HTML."""

from __future__ import annotations

import numpy as np

from rl_circuits.analysis.table1 import format_value, table1_from_rows


def test_format_value_matches_paper():
    assert format_value(2.29e-3) == "2.29e-3"
    assert format_value(393.0) == "3.93e+2"
    assert format_value(0.196) == "1.96e-1"
    assert format_value(float("nan")) == "nan"


def _row(pair, algorithm, dataset, alpha, metric, before, after, significant):
    return {
        "pair": pair,
        "algorithm": algorithm,
        "dataset": dataset,
        "alpha": alpha,
        "metric": metric,
        "before": before,
        "after": after,
        "diff": after - before,
        "ci_low": (after - before) / 2 if significant else -1.0,
        "ci_high": (after - before) * 2 if significant else 1.0,
        "p_value": 0.001 if significant else 0.5,
        "significant": significant,
    }


ROWS = [
    _row("Deepseek-Math", "GRPO", "MATH", 0.03, "activation_intensity", 2.29e-3, 2.64e-3, True),
    _row("Deepseek-Math", "GRPO", "MATH", 0.1, "activation_intensity", 1.10e-3, 1.31e-3, False),
    _row("Deepseek-Math", "GRPO", "MATH", 0.03, "distribution_kurtosis", 393.0, 253.0, True),
    _row("Mistral", "PPO", "MATH", 0.03, "activation_intensity", 9.47e-7, 3.61e-6, True),
    _row("Mistral", "PPO", "MATH", 0.03, "information_complexity", 3.39e-2, 1.58e-2, False),
    _row("Mistral", "PPO", "GSM8K", 0.5, "activation_intensity", 3.01e-4, 3.60e-4, True),
]


def test_table1_layout():
    table = table1_from_rows(ROWS)
    frame = table.frame
    assert frame.index.names == ["dataset", "metric", "alpha"]
    assert frame.columns.names == ["pair", "model"]
    assert list(frame.columns) == [
        ("Deepseek-Math", "before"),
        ("Deepseek-Math", "+GRPO"),
        ("Mistral", "before"),
        ("Mistral", "+PPO"),
    ]
    assert list(frame.index) == [
        ("MATH", "Act. Intens.", 0.03),
        ("MATH", "Act. Intens.", 0.1),
        ("MATH", "Info. Complex.", 0.03),
        ("MATH", "Dist. Kurt.", 0.03),
        ("GSM8K", "Act. Intens.", 0.5),
    ]
    assert frame.loc[("MATH", "Act. Intens.", 0.03), ("Deepseek-Math", "before")] == "2.29e-3"
    assert frame.loc[("MATH", "Act. Intens.", 0.03), ("Deepseek-Math", "+GRPO")] == "2.64e-3 ↑*"
    assert frame.loc[("MATH", "Act. Intens.", 0.1), ("Deepseek-Math", "+GRPO")] == "1.31e-3 ↑"
    assert frame.loc[("MATH", "Dist. Kurt.", 0.03), ("Deepseek-Math", "+GRPO")] == "2.53e+2 ↓*"
    assert frame.loc[("MATH", "Info. Complex.", 0.03), ("Mistral", "+PPO")] == "1.58e-2 ↓"
    assert frame.loc[("MATH", "Act. Intens.", 0.1), ("Mistral", "+PPO")] == "-"
    assert table.numbers.loc[("GSM8K", "Act. Intens.", 0.5), ("Mistral", "after")] == 3.60e-4
    assert np.isnan(table.numbers.loc[("GSM8K", "Act. Intens.", 0.5), ("Deepseek-Math", "after")])
    assert table1_from_rows(ROWS, before_label="SFT").frame.columns[0] == ("Deepseek-Math", "SFT")


def test_table1_markdown_latex_html():
    table = table1_from_rows(ROWS)
    markdown = table.to_markdown()
    lines = markdown.splitlines()
    assert lines[0].startswith(
        "| Dataset | Metric | α | Deepseek-Math · before | Deepseek-Math · +GRPO"
    )
    assert lines[1].count("---:") == 4
    assert "| MATH | Act. Intens. | 0.03 | 2.29e-3 | 2.64e-3 ↑* | 9.47e-7 | 3.61e-6 ↑* |" in lines
    assert "|  |  | 0.1 | 1.10e-3 | 1.31e-3 ↑ | - | - |" in lines
    assert "excludes 0" in markdown

    latex = table.to_latex()
    assert "\\begin{tabular}{lllrrrr}" in latex
    assert "\\multicolumn{2}{c}{Deepseek-Math}" in latex and "+GRPO" in latex
    assert "2.64e-3 $\\uparrow$*" in latex and "2.53e+2 $\\downarrow$*" in latex
    assert "1.58e-2 $\\downarrow$ &" in latex or "1.58e-2 $\\downarrow$ \\\\" in latex

    page = table.to_html()
    assert page.startswith('<table class="table1">')
    assert "<td>2.64e-3 ↑*</td>" in page and '<th colspan="2">Mistral</th>' in page
