"""Figures (hook-name axes, NaN non-edges, CI bands) and the self-contained HTML report."""

from __future__ import annotations

import base64
import gzip
import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from plotly.offline import get_plotlyjs

from rl_circuits.analysis.metrics import output_entropy, relative_change
from rl_circuits.analysis.plots import (
    LOG2_LIMITS,
    diff_curves,
    diff_heatmap,
    diversity_bars,
    metric_vs_alpha,
    output_entropy_lines,
    relative_change_heatmap,
    short_node_label,
)
from rl_circuits.analysis.report import png_images, render_report, write_report
from rl_circuits.analysis.stats import compare, table1_from_rows

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
    mb, ma = np.abs(before).mean(axis=0), np.abs(after).mean(axis=0)
    limit = heatmap.zmax
    expected = np.log2(ma[MASK] / mb[MASK])
    np.testing.assert_allclose(z[MASK], np.clip(expected, -limit, limit), rtol=1e-5)
    assert heatmap.zmid == 0 and heatmap.zmin == -limit
    assert tuple(heatmap.y) == UPSTREAM and tuple(heatmap.x) == DOWNSTREAM
    custom = np.asarray(heatmap.customdata, dtype=float)
    np.testing.assert_allclose(custom[..., 0], mb, rtol=1e-6)
    np.testing.assert_allclose(custom[..., 1], ma, rtol=1e-6)
    # the hover still shows the relative change in percent
    np.testing.assert_allclose(custom[..., 2][MASK], relative_change(before, after)[MASK], 1e-5)
    for field in ("%{y}", "%{x}", "customdata[0]", "customdata[1]", "customdata[2]:+.1%"):
        assert field in heatmap.hovertemplate
    assert figure.layout.title.text == "Toy"
    with pytest.raises(ValueError, match="upstream"):
        relative_change_heatmap(before, after, UPSTREAM[:2], DOWNSTREAM, MASK)


def test_diff_heatmap_shows_mean_signed_scores_and_sums_heads_per_hook():
    values, _ = scores()
    figure = diff_heatmap(values, UPSTREAM, DOWNSTREAM, MASK, title="Diff")
    z = np.asarray(figure.data[0].z, dtype=float)
    assert np.isnan(z[~MASK]).all()
    np.testing.assert_allclose(z[MASK], values.mean(0)[MASK], rtol=1e-6)
    assert figure.data[0].zmid == 0 and figure.data[0].zmax == -figure.data[0].zmin > 0
    assert tuple(figure.data[0].y) == UPSTREAM and figure.layout.title.text == "Diff"
    # head-level nodes: one row per hook, the heads' mean scores summed
    heads = ("hook_embed", "blocks.0.attn.hook_result[0]", "blocks.0.attn.hook_result[1]")
    figure = diff_heatmap(values, heads, DOWNSTREAM, np.ones((3, 5), bool))
    z = np.asarray(figure.data[0].z, dtype=float)
    assert list(figure.data[0].y) == ["hook_embed", "blocks.0.attn.hook_result"]
    np.testing.assert_allclose(z[1], values.mean(0)[1:].sum(0), rtol=1e-5)


def test_diff_curves_one_line_and_band_per_direction():
    summary = {"ks": [1, 4, 16], "curve": [0.2, 0.7, 0.9], "curve_low": [0.1, 0.6, 0.8]}
    summary["curve_high"] = [0.3, 0.8, 1.0]
    figure = diff_curves({"after_into_before": summary, "before_into_after": summary})
    lines = [t for t in figure.data if t.mode == "lines+markers"]
    assert [t.name for t in lines] == ["after into before", "before into after"]
    assert list(lines[0].y) == [0.2, 0.7, 0.9] and figure.layout.xaxis.type == "log"


def test_heatmap_log2_scale_is_symmetric_and_states_its_clipping():
    """A halving and a doubling get opposite colours of equal strength; extreme cells are
    clipped to the stated range; the colour bar shows only ratios that can occur."""
    base = np.ones((4, 3, 5)) * MASK
    factors = np.ones((3, 5))
    factors[0, 0], factors[0, 1], factors[0, 2] = 0.5, 2.0, 0.06  # -50%, +100%, -94%
    factors[0, 3], factors[0, 4] = 10.68, 1.25  # +968%, +25%
    factors[1, 3], factors[1, 4], factors[2, 4] = 0.8, 1.1, 0.9
    heatmap = relative_change_heatmap(base, base * factors, UPSTREAM, DOWNSTREAM, MASK).data[0]
    z = np.asarray(heatmap.z, dtype=float)
    assert z[0, 0] == pytest.approx(-z[0, 1]) and z[0, 1] == pytest.approx(1.0)
    limit = heatmap.zmax
    assert limit == -heatmap.zmin and limit in LOG2_LIMITS
    # 9 edges: the 99th percentile is close to the largest, so the range holds the extremes
    assert z[0, 3] == pytest.approx(min(np.log2(10.68), limit), rel=1e-5)
    assert z[0, 2] == pytest.approx(max(np.log2(0.06), -limit), rel=1e-5)
    custom = np.asarray(heatmap.customdata, dtype=float)
    assert custom[0, 2, 2] == pytest.approx(-0.94, rel=1e-5)  # hover: the true -94%
    ticks = heatmap.colorbar.ticktext
    assert all("%" in text for text in ticks)
    assert float(ticks[0].split("(")[1].rstrip("%)")) > -100  # no impossible -500 %
    assert f"±{limit:g}" in heatmap.colorbar.title.text

    # One extreme edge among many: clipped, and the title says how many
    rng = np.random.default_rng(0)
    wide = 1 + rng.random((4, 40, 40))
    ratio = np.ones((40, 40))
    ratio[0, 0] = 1000.0
    names_up = [f"blocks.{i}.hook_mlp_out" for i in range(40)]
    names_down = [f"blocks.{i}.hook_mlp_in" for i in range(40)]
    heatmap = relative_change_heatmap(
        wide, wide * ratio, names_up, names_down, np.ones((40, 40), bool)
    ).data[0]
    assert heatmap.zmax == LOG2_LIMITS[0] and heatmap.z[0][0] == heatmap.zmax
    assert "1 edge(s) beyond, clipped" in heatmap.colorbar.title.text
    assert heatmap.colorbar.ticktext[-1].startswith("≥")


def test_heatmap_labels_readable_on_121_downstream_nodes():
    from rl_circuits.engine.graph import build_graph

    graph = build_graph("paper", 30)  # SmolLM2-135M: 30 layers
    assert len(graph.downstream) == 121
    rng = np.random.default_rng(1)
    mask = graph.edge_mask.numpy()
    before = rng.random((3, *mask.shape)) * mask
    figure = relative_change_heatmap(before, before * 1.5, graph.upstream, graph.downstream, mask)
    layout = figure.layout
    # every node has a tick label (no auto-skipping), short, with room for its 9 px font
    assert list(layout.xaxis.tickvals) == list(graph.downstream)
    assert list(layout.yaxis.tickvals) == list(graph.upstream)
    assert layout.xaxis.tickmode == "array" and layout.xaxis.tickfont.size == 9
    assert max(len(t) for t in layout.xaxis.ticktext) <= 10
    assert layout.xaxis.ticktext[:4] == ("L0 q", "L0 k", "L0 v", "L0 mlp")
    assert layout.yaxis.ticktext[:3] == ("embed", "L0 attn", "L0 mlp")
    assert (layout.width - 320) / 121 >= 12 and (layout.height - 220) / 61 >= 12
    assert figure.data[0].x[0] == "blocks.0.hook_q_input"  # hover keeps the hook name
    assert short_node_label("blocks.3.attn.hook_result[2]") == "L3 attn[2]"
    assert short_node_label("custom_node") == "custom_node"


def test_heads_heatmap_summed_per_layer_is_the_paper_graphs_figure():
    """One definition in both views (issue 22): the heads graph's per-layer view sums each
    sample's head scores with their signs, then takes mean |.|, as the paper graph's edge is
    that signed sum; so both figures show the same numbers, and the figure says so."""
    from rl_circuits.analysis.plots import SUMMED_CELL
    from rl_circuits.engine.graph import build_graph, parse_node

    fine, coarse = build_graph("heads", 2, n_heads=3), build_graph("paper", 2)
    rows = np.zeros((len(coarse.upstream), len(fine.upstream)))
    for i, name in enumerate(fine.upstream):
        hook = parse_node(name)[0].replace(".attn.hook_result", ".hook_attn_out")
        rows[coarse.upstream.index(hook), i] = 1
    cols = np.zeros((len(fine.downstream), len(coarse.downstream)))
    for j, name in enumerate(fine.downstream):
        cols[j, coarse.downstream.index(parse_node(name)[0])] = 1
    rng = np.random.default_rng(22)
    mask = fine.edge_mask.numpy()
    # heads of one layer partly cancelling: absolute-first sums would differ from the paper's
    before, after = (rng.normal(size=(5, *mask.shape)) * mask for _ in range(2))
    heads = relative_change_heatmap(before, after, fine.upstream, fine.downstream, mask).data[0]
    paper = relative_change_heatmap(
        rows @ before @ cols,
        rows @ after @ cols,
        coarse.upstream,
        coarse.downstream,
        coarse.edge_mask.numpy(),
    ).data[0]
    heads_rows = [name.replace(".attn.hook_result", ".hook_attn_out") for name in heads.y]
    assert heads_rows == list(paper.y) and list(heads.x) == list(paper.x)
    np.testing.assert_allclose(
        np.asarray(heads.customdata, float), np.asarray(paper.customdata, float), rtol=1e-5
    )
    assert "mean |Σ W|" in heads.hovertemplate and "mean |W|" in paper.hovertemplate
    figure = relative_change_heatmap(before, after, fine.upstream, fine.downstream, mask)
    assert SUMMED_CELL in figure.layout.title.text and "with their signs" in SUMMED_CELL


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
    assert all(t.mode == "lines" for t in bands)  # no marker on the bands' boundary points
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
    table = table1_from_rows(rows)
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
    # plotly.js inline once, gzip-compressed: the page decompresses exactly the bundle
    packed = re.findall(r'<script id="plotlyjs-gzip"[^>]*>([^<]*)</script>', text)
    assert len(packed) == 1 and gzip.decompress(base64.b64decode(packed[0])).decode() == bundle
    assert text.count(packed[0]) == 1 and "DecompressionStream" in text
    assert len(text.encode()) < 0.5 * len(bundle.encode())  # was the 4.8 MB bundle plus figures
    assert not re.search(r"<script[^>]*\bsrc\s*=", text)  # nothing fetched
    assert not re.search(r"<link[^>]*\bhref\s*=", text)
    assert '<table class="table1">' in text
    cell = table.frame.iloc[0, 1]
    assert f"<td>{cell}</td>" in text
    assert "Toy &lt;report&gt;" in text and "seed 0 &amp; co" in text
    figures = re.findall(r'<script type="application/json" class="figure-json"[^>]*>', text)
    assert len(figures) == 2 and text.count("Plotly.newPlot") == 1  # one loop draws them all
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # no temp file left
    # Table 1's statistics in full, not only in hovers: n, the interval and p of every cell
    assert "Table 1 in full: sample size, intervals and p-values" in text
    details = table.details()
    assert len(details) == len(rows) and {"n", "95% interval", "p"} <= set(details.columns)
    first = rows.sort_values(["dataset", "metric", "alpha", "pair"]).iloc[0]
    assert str(int(first["n"])) in set(details["n"])
    assert f"{first['p_value']:.3g}" in set(details["p"])
    assert "→" in table.note  # every marker the table uses is in its legend

    # Rewriting replaces the file whole; without a table there is no table.
    write_report(path, title="again", table=None, figures={})
    assert '<table class="table1">' not in path.read_text(encoding="utf-8")
    assert render_report(title="t", table=None, figures={}).count(packed[0]) == 1


def test_report_sections_funnel_and_skipped_cells():
    funnel = pd.DataFrame(
        [{"pair": "Toy", "dataset": "MATH", "questions": 6, "− both correct": 1, "kept": 5}]
    )
    text = render_report(
        title="t",
        table=None,
        figures={},
        funnel=funnel,
        skipped={"Toy|MATH|0.5": "every question skipped"},
    )
    assert "<h2>Question selection: how many questions each filter removed</h2>" in text
    assert "<th>− both correct</th>" in text
    assert "<h2>Cells without results</h2>" in text
    assert "<li>Toy, MATH, 0.5: every question skipped</li>" in text
    edges = pd.DataFrame([{"upstream": "hook_embed", "mean score": -0.00123}])
    text = render_report(title="t", table=None, figures={}, tables={"Top <edges>": edges})
    assert "<h2>Top &lt;edges&gt;</h2>" in text and "<td>-1.23e-3</td>" in text
    # a figure title that closes the script element cannot break out of it
    figure = go.Figure(layout={"title": {"text": "</script><b>x"}})
    assert "</script><b>x" not in render_report(title="t", table=None, figures={"f": figure})


def test_png_images_without_kaleido_returns_empty(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "kaleido", None)  # makes `import kaleido` fail
    assert png_images(_figures()) == {}
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "kaleido" in message
