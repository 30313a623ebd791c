"""export-graph: a cell's top edges as the attribution-graph JSON of circuit-tracer and
Neuronpedia (validated against the schema kept in tests/fixtures), its graph-metadata.json,
and the offline viewer page, rendered by headless Chromium."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

from rl_circuits.analysis.graph_view import attribution_graph, viewer_html, write_graph_files
from rl_circuits.analysis.reader import load_run
from rl_circuits.cli.main import main
from rl_circuits.engine.graph import build_graph
from rl_circuits.engine.scores import EdgeScores
from rl_circuits.errors import DataError
from rl_circuits.store.layout import RunLayout

SCHEMA = json.loads(
    (Path(__file__).resolve().parents[1] / "fixtures" / "attribution_graph.schema.json").read_text()
)


def _scores(graph="heads", n=5, seed=0) -> EdgeScores:
    g = build_graph(graph, 2, 3)
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(n, len(g.upstream), len(g.downstream), generator=gen) * g.edge_mask
    return EdgeScores(values, g.upstream, g.downstream, g.edge_mask, graph=graph)


def _check(graph: dict, scores: EdgeScores, top: int) -> None:
    jsonschema.validate(graph, SCHEMA)
    ids = [node["node_id"] for node in graph["nodes"]]
    assert len(set(ids)) == len(ids)
    by_id = {node["node_id"]: node for node in graph["nodes"]}
    got = [
        (by_id[lk["source"]]["clerp"], by_id[lk["target"]]["clerp"], lk["weight"])
        for lk in graph["links"]
    ]
    assert got == scores.top_edges(top)  # top-K by |mean score|, weight = the mean score
    assert sum(node["influence"] for node in graph["nodes"]) == pytest.approx(2.0)
    for node in graph["nodes"]:
        assert node["clerp"] in scores.upstream + scores.downstream  # a hook name
        assert node["feature_type"] != "logit" or node["clerp"].endswith("hook_resid_post")


@pytest.mark.parametrize("graph_name", ["heads", "paper", "block", "residual"])
def test_graph_json_validates_and_holds_the_top_edges(tmp_path, graph_name):
    scores = _scores(graph_name)
    graph = attribution_graph(scores, 12, slug="cell", scan="model", prompt="a cell")
    _check(graph, scores, 12)
    kinds = {node["clerp"]: node["feature_type"] for node in graph["nodes"]}
    assert kinds.get("hook_embed", "embedding") == "embedding"
    with pytest.raises(ValueError, match="--top"):
        attribution_graph(scores, 0, slug="cell", scan="model", prompt="a cell")


def test_graph_metadata_lists_each_slug_once(tmp_path):
    scores = _scores()
    for slug, top in (("first", 4), ("second", 6), ("first", 8)):
        graph = attribution_graph(scores, top, slug=slug, scan="m", prompt=slug)
        write_graph_files(graph, tmp_path / f"{slug}.json")
    index = json.loads((tmp_path / "graph-metadata.json").read_text())
    assert sorted(g["slug"] for g in index["graphs"]) == ["first", "second"]
    assert len(json.loads((tmp_path / "first.json").read_text())["links"]) == 8
    with pytest.raises(ValueError, match="<slug>.json"):
        write_graph_files(graph, tmp_path / "other.json")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "graph-metadata.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="not a graph index"):
        write_graph_files(graph, tmp_path / "bad" / "first.json")
    assert (tmp_path / "bad" / "graph-metadata.json").read_text() == "[1, 2]"  # left as found


def test_export_graph_command_on_a_run(tiny_run, tmp_path, capsys):
    base, _ = tiny_run
    run_dir = str(base / "run")
    for role in ("before", "after"):
        out = tmp_path / role / f"tiny-{role}.json"
        argv = ["export-graph", run_dir, str(out), "--pair", "tiny", "--role", role]
        assert main([*argv, "--alpha", "1.0", "--top", "7"]) == 0
        graph = json.loads(out.read_text())
        scores = load_run(run_dir).scores("tiny", role, "sevens", 1.0)
        _check(graph, scores, 7)
        assert graph["metadata"]["slug"] == f"tiny-{role}"
        assert (out.parent / "graph-metadata.json").is_file()
        assert out.with_suffix(".html").is_file()
    report = (base / "run" / "report" / "report.html").read_text()
    for role in ("before", "after"):  # the report links each cell's viewer page beside it
        page = base / "run" / "report" / "graphs" / f"tiny-{role}-sevens-alpha-1.html"
        assert f'href="graphs/{page.name}"' in report
        assert '<script type="application/json" id="graph">' in page.read_text()
    capsys.readouterr()
    cell = ["export-graph", run_dir, str(tmp_path / "x.json"), "--pair", "tiny", "--alpha", "1"]
    assert main([*cell, "--role", "middle"]) == 2
    assert "'before', 'after', 'diff'" in capsys.readouterr().err
    assert main([*cell, "--role", "after", "--top", "0"]) == 2
    assert "--top must be >= 1" in capsys.readouterr().err
    assert main([*cell, "--role", "after", "--pair", "nope"]) == 2
    assert "pair 'nope' is not in run" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
    diff = ["export-graph", run_dir, str(tmp_path / "d.json"), "--pair", "tiny", "--role", "diff"]
    assert main([*diff, "--alpha", "1.0"]) == 2
    assert "rl-circuits diff" in capsys.readouterr().err
    assert not (tmp_path / "d.json").exists()
    # A diff cell's scores (here the after model's, copied where the diff stage writes them)
    # export like any cell.
    stand_in = load_run(run_dir).scores("tiny", "after", "sevens", 1.0)
    target = Path(run_dir) / RunLayout.diff_scores("tiny", "after_into_before", "sevens", 1.0)
    target.parent.mkdir(parents=True)
    shutil.copy(Path(run_dir) / RunLayout.scores("tiny", "after", "sevens", 1.0), target)
    try:
        assert main([*diff, "--alpha", "1.0", "--top", "3"]) == 0
    finally:
        shutil.rmtree(Path(run_dir) / "diff")
    _check(json.loads((tmp_path / "d.json").read_text()), stand_in, 3)


@pytest.mark.chromium
def test_viewer_page_draws_the_graph(tmp_path):
    from test_report_browser import console_errors, read_png, screenshot

    scores = _scores()
    graph = attribution_graph(scores, 20, slug="cell", scan="m", prompt="viewer check")
    _, _, page = write_graph_files(graph, tmp_path / "cell.json")
    shot, stderr = screenshot(page, tmp_path)
    assert not console_errors(stderr), "\n".join(console_errors(stderr))
    image = read_png(shot).astype(int)
    red, green, blue = image[..., 0], image[..., 1], image[..., 2]
    reds = np.count_nonzero((red - blue > 60) & (red - green > 60))
    blues = np.count_nonzero((blue - red > 60) & (blue - green > 20))
    dark = np.count_nonzero(image.max(axis=2) < 100)  # nodes and labels
    total = image.shape[0] * image.shape[1]
    assert reds > 0.002 * total and blues > 0.002 * total, (reds, blues)
    assert dark > 0.001 * total, dark


def test_viewer_page_embeds_the_graph_verbatim():
    prompt = "pair </script><b>x</b> ROWS_JSON TITLE"
    graph = attribution_graph(_scores(), 5, slug="cell", scan="m", prompt=prompt)
    page = viewer_html(graph)
    embedded = page.split('id="graph">', 1)[1].split("</script>", 1)[0]
    assert json.loads(embedded.replace("<\\/", "</")) == graph
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt; ROWS_JSON TITLE" in page
