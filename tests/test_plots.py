"""Figures (hook-name axes, NaN non-edges, CI bands) and the self-contained HTML report."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from plotly.offline import get_plotlyjs

from rl_circuits.metrics import output_entropy, relative_change
from rl_circuits.plots import (
    diversity_bars,
    metric_vs_alpha,
    output_entropy_lines,
    relative_change_heatmap,
)
from rl_circuits.report import png_images, render_report, write_report
from rl_circuits.stats import compare, table1

UPSTREAM = ("hook_embed", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out")
DOWNSTREAM = (
    "blocks.0.hook_q_input",
    "blocks.0.hook_k_input",
    "blocks.0.hook_v_input",
    "blocks.0.hook_mlp_in",
    "blocks.0.hook_resid_post",
)
# hook_embed feeds everything; attn_out feeds mlp_in and resid_post; mlp_out only resid_post.
MASK = np.array(
    [
        [True, True, True, True, True],
        [False, False, False, True, True],
        [False, False, False, False, True],
    ]
)


def scores(seed=0, n=12):
    rng = np.random.default_rng(seed)
    before = rng.standard_normal((n, 3, 5)) * MASK
    after = before * 1.3 + 0.2 * rng.standard_normal((n, 3, 5)) * MASK
    return before.astype(np.float32), after.astype(np.float32)


def compare_rows():
    rows = []
    for pair, algorithm in (("Toy-A", "GRPO"), ("Toy-B", "DPO")):
        for alpha in (0.1, 0.3, 0.5):
            before, after = scores(seed=int(alpha * 10))
            result = compare(before, after, MASK, n_resamples=100)
            extra = {"pair": pair, "algorithm": algorithm, "dataset": "MATH", "alpha": alpha}
            rows.append(result.assign(**extra))
    return pd.concat(rows, ignore_index=True)


def test_heatmap_nan_non_edges_zmid_and_hook_name_axes():
    before, after = scores()
    figure = relative_change_heatmap(before, after, UPSTREAM, DOWNSTREAM, MASK, title="Toy")
    heatmap = figure.data[0]
    assert isinstance(heatmap, go.Heatmap)
    z = np.asarray(heatmap.z, dtype=float)
    assert np.isnan(z[~MASK]).all() and np.isfinite(z[MASK]).all()
    np.testing.assert_allclose(z[MASK], relative_change(before, after)[MASK])
    assert heatmap.zmid == 0
    assert tuple(heatmap.y) == UPSTREAM and tuple(heatmap.x) == DOWNSTREAM
    custom = np.asarray(heatmap.customdata, dtype=float)
    np.testing.assert_allclose(custom[..., 0], np.abs(before).mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(custom[..., 1], np.abs(after).mean(axis=0), rtol=1e-6)
    for field in ("%{y}", "%{x}", "customdata[0]", "customdata[1]", "%{z"):
        assert field in heatmap.hovertemplate
    assert figure.layout.title.text == "Toy"
    with pytest.raises(ValueError, match="upstream"):
        relative_change_heatmap(before, after, UPSTREAM[:2], DOWNSTREAM, MASK)


def test_diversity_bars_output_entropy_and_metric_vs_alpha():
    rows = compare_rows()
    bars = diversity_bars(rows)
    assert [trace.name for trace in bars.data] == ["before", "after"]
    diversity = rows[rows.metric == "sample_diversity"]
    assert len(bars.data[0].x) == len(diversity) == 6
    assert sorted(bars.data[1].y) == pytest.approx(sorted(diversity["after"]))
    assert bars.data[0].error_y.array is not None

    before, after = scores()
    eb, ea = output_entropy(before, MASK), output_entropy(after, MASK)
    lines = output_entropy_lines(eb, ea, UPSTREAM)
    assert tuple(lines.data[0].x) == UPSTREAM
    np.testing.assert_allclose(lines.data[1].y, ea)

    figure = metric_vs_alpha(rows, "activation_intensity")
    bands = [t for t in figure.data if t.fill == "toself"]
    curves = [t for t in figure.data if t.mode == "lines+markers"]
    assert len(bands) == len(curves) == 4  # (before, after) x two pairs
    part = rows[(rows.metric == "activation_intensity") & (rows.pair == "Toy-A")]
    np.testing.assert_allclose(curves[0].x, [0.1, 0.3, 0.5])
    np.testing.assert_allclose(curves[0].y, part["before"])
    np.testing.assert_allclose(bands[0].y[:3], part["before_ci_high"])
    with pytest.raises(ValueError, match="no rows"):
        metric_vs_alpha(rows, "nope")


def _figures():
    before, after = scores()
    return {
        "Figure 2: relative change": relative_change_heatmap(
            before, after, UPSTREAM, DOWNSTREAM, MASK
        ),
        "Figure 3b": output_entropy_lines(
            output_entropy(before, MASK), output_entropy(after, MASK), UPSTREAM
        ),
    }


def test_report_is_self_contained_with_table(tmp_path):
    rows = compare_rows()
    table = table1(rows)
    path = write_report(
        tmp_path / "out" / "report.html",
        title="Toy <report>",
        table=table,
        figures=_figures(),
        notes="seed 0 & co",
    )
    assert path == tmp_path / "out" / "report.html"
    text = path.read_text(encoding="utf-8")
    bundle = get_plotlyjs()
    assert text.count(bundle) == 1  # plotly.js inline, once
    assert text.count("plotly.js v") == 1
    assert not re.search(r"<script[^>]*\bsrc\s*=", text)  # nothing fetched
    assert not re.search(r"<link[^>]*\bhref\s*=", text)
    assert '<table class="table1">' in text
    cell = table.frame.iloc[0, 1]
    assert f"<td>{cell}</td>" in text
    assert "Toy &lt;report&gt;" in text and "seed 0 &amp; co" in text
    assert text.count("Plotly.newPlot") == 2
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # no temp file left

    # Rewriting replaces the file whole; without a table there is no table.
    write_report(path, title="again", table=None, figures={})
    assert '<table class="table1">' not in path.read_text(encoding="utf-8")
    assert render_report(title="t", table=None, figures={}).count(bundle) == 1


def test_png_images_without_kaleido_returns_empty(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "kaleido", None)  # makes `import kaleido` fail
    assert png_images(_figures()) == {}
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "kaleido" in message
