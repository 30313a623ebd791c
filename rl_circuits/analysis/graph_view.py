"""A cell's top edges as an attribution graph: the JSON that circuit-tracer's frontend and
Neuronpedia read, and the project's own offline viewer page of it.

The JSON follows circuit-tracer's graph files (`frontend/graph_models.py`, written by
`create_graph_files`): `metadata`, `qParams`, `nodes`, `links`. Each node of the top-K edges is
one graph node: `clerp` is its hook name (a TransformerLens hook, `[h]` for a head), `layer` its
transformer layer (`"E"` for the embedding, `n_layers + 1` for the logits, as circuit-tracer),
`ctx_idx` 0 (scores are summed over positions: one context slot), `influence` its share of the
exported links' total |weight|; each link's `weight` is the edge's mean score over the cell's
questions (the loss change when the edge is removed: positive where the edge helps). A folder
with the JSON and `graph-metadata.json` (`{"graphs": [metadata, ...]}`, one entry per slug, the
slug being the JSON's file name) is what circuit-tracer's local server opens.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

from rl_circuits.analysis.reader import Run
from rl_circuits.engine.graph import parse_node
from rl_circuits.engine.scores import EdgeScores
from rl_circuits.errors import DataError, RLCircuitsError
from rl_circuits.store.atomic import write_atomic

GRAPH_METADATA = "graph-metadata.json"  # circuit-tracer's index of the graphs in a folder
ROLES_AND_DIFF: tuple[str, ...] = ("before", "after", "diff")  # what --role can name
DEFAULT_DIRECTION = "after_into_before"  # the diff stage's first direction
_LAYER = re.compile(r"^blocks\.(\d+)\.")
# hook name ending -> (feature_type, row within its layer: attention read, attention write,
# MLP read, MLP write)
_KINDS: tuple[tuple[str, str, int], ...] = (
    ("hook_q_input", "attention input", 1),
    ("hook_k_input", "attention input", 1),
    ("hook_v_input", "attention input", 1),
    ("hook_attn_in", "attention input", 1),
    ("hook_resid_pre", "residual stream", 1),
    ("attn.hook_result", "attention head", 2),
    ("hook_attn_out", "attention output", 2),
    ("hook_mlp_in", "mlp input", 3),
    ("hook_resid_mid", "residual stream", 3),
    ("hook_mlp_out", "mlp output", 4),
)


def attribution_graph(
    scores: EdgeScores, top: int, *, slug: str, scan: str, prompt: str
) -> dict[str, Any]:
    """The `top` edges of `scores` by |mean score| as a circuit-tracer attribution graph."""
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"export-graph: --top must be a whole number >= 1, got {top!r}")
    edges = scores.top_edges(top)
    n_layers = sum(name.endswith("hook_mlp_out") for name in scores.upstream)
    logits = f"blocks.{n_layers - 1}.hook_resid_post"
    total = sum(abs(w) for _, _, w in edges) or 1.0
    touched: dict[str, float] = {}
    for up, down, weight in edges:
        for name in (up, down):
            touched[name] = touched.get(name, 0.0) + abs(weight) / total
    ids = {}
    nodes = []
    for name in _residual_order(scores, touched):
        index = _node_index(scores, name)
        kind, layer, _ = _describe(name, n_layers, logits)
        node_id = f"{layer}_{index}_0"
        ids[name] = node_id
        nodes.append(
            {
                "node_id": node_id,
                "feature": index,
                "layer": layer,
                "ctx_idx": 0,
                "feature_type": kind,
                "token_prob": 0.0,
                "is_target_logit": name == logits,
                "run_idx": 0,
                "reverse_ctx_idx": 0,
                "jsNodeId": node_id,
                "clerp": name,
                "influence": touched[name],
            }
        )
    links = [
        {"source": ids[up], "target": ids[down], "weight": weight} for up, down, weight in edges
    ]
    metadata = {
        "slug": slug,
        "scan": scan,
        "transcoder_list": [],
        "prompt_tokens": ["<all positions>"],
        "prompt": prompt,
        "node_threshold": None,
        "schema_version": 1,
    }
    q_params = {
        "pinnedIds": [],
        "supernodes": [],
        "linkType": "both",
        "clickedId": "",
        "sg_pos": "",
    }
    return {"metadata": metadata, "qParams": q_params, "nodes": nodes, "links": links}


def cell_graph(
    run: Run,
    pair: str,
    role: str,
    alpha: float,
    top: int,
    slug: str,
    *,
    dataset: str | None = None,
    direction: str | None = None,
) -> dict[str, Any]:
    """The attribution graph of one cell of a run: `role` before/after reads the attribute
    stage's scores, `diff` the diff stage's (`direction`, default `DEFAULT_DIRECTION`) through
    the run's reader."""
    direction = direction or DEFAULT_DIRECTION
    if role not in ROLES_AND_DIFF:
        raise RLCircuitsError(
            f"export-graph: role {role!r} is not one of {', '.join(map(repr, ROLES_AND_DIFF))}"
        )
    datasets = list(run.config.run.datasets)
    if dataset is None:
        if len(datasets) != 1:
            raise RLCircuitsError(
                f"export-graph: run {run.root} has datasets {', '.join(datasets)}; pick one "
                "with --dataset"
            )
        dataset = datasets[0]
    if role == "diff":
        scores = run.diff_scores(pair, direction, dataset, alpha)
        what = f"cross-model patching scores, {direction.replace('_', ' ')}"
        scan = run.model_path(pair, "before" if direction.endswith("before") else "after")
    else:
        scores = run.scores(pair, role, dataset, alpha)
        what = f"the {role} model's edge scores"
        scan = run.model_path(pair, role)
    prompt = (
        f"{pair}, {dataset}, alpha={alpha:g}: {what}, mean over {scores.values.shape[0]} "
        f"questions, top {top} edges ({scores.graph or 'paper'} graph)"
    )
    return attribution_graph(scores, top, slug=slug, scan=scan, prompt=prompt)


def write_graph_files(graph: dict[str, Any], out: Path) -> tuple[Path, Path, Path]:
    """Write `out` (the graph JSON), its folder's `graph-metadata.json` (this graph's entry
    added or replaced by slug, others kept) and `out` with suffix .html (the viewer page)."""
    out = Path(out)
    if out.suffix != ".json":
        raise ValueError(f"export-graph: {out} must end in .json (the graph file)")
    if out.stem != graph["metadata"]["slug"]:
        raise ValueError(f"export-graph: the file name {out.name} must be <slug>.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    index_path = out.parent / GRAPH_METADATA
    index = {"graphs": []}
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text())
            graphs = index["graphs"]
            if not isinstance(graphs, list):
                raise TypeError("graphs is not a list")
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(
                f"export-graph: {index_path} exists but is not a graph index "
                f"({type(exc).__name__}: {exc}); move it away or pick another folder"
            ) from exc
    slug = graph["metadata"]["slug"]
    index["graphs"] = [g for g in index["graphs"] if g.get("slug") != slug]
    index["graphs"].append(graph["metadata"])
    write_atomic(out, json.dumps(graph, indent=1))
    write_atomic(index_path, json.dumps(index, indent=2))
    page = write_atomic(out.with_suffix(".html"), viewer_html(graph))
    return out, index_path, page


def viewer_html(graph: dict[str, Any]) -> str:
    """A self-contained page drawing `graph` as a layered node-link diagram (embedding at the
    bottom, logits on top; link width ~ |weight|, red positive, blue negative); no network."""
    rows = {node["node_id"]: _row(node["clerp"]) for node in graph["nodes"]}
    fill = {
        "TITLE": html.escape(graph["metadata"]["prompt"]),
        "GRAPH_JSON": json.dumps(graph).replace("</", "<\\/"),
        "ROWS_JSON": json.dumps(rows).replace("</", "<\\/"),
    }
    return re.sub("|".join(fill), lambda match: fill[match[0]], _PAGE)  # one pass


def _residual_order(scores: EdgeScores, names: dict[str, float]) -> list[str]:
    """`names` sorted by where they sit in the forward pass (layer, then row, then index)."""
    return sorted(names, key=lambda n: (_row(n), _node_index(scores, n)))


def _node_index(scores: EdgeScores, name: str) -> int:
    """A number unique to the node: its upstream index, or n_upstream + its downstream index."""
    if name in scores.upstream:
        return scores.upstream.index(name)
    return len(scores.upstream) + scores.downstream.index(name)


def _describe(name: str, n_layers: int, logits: str) -> tuple[str, str, int]:
    """(feature_type, layer as circuit-tracer writes it, row of the layered layout)."""
    if name == "hook_embed":
        return "embedding", "E", 0
    if name == logits:
        return "logit", str(n_layers + 1), 4 * n_layers + 1
    hook, _ = parse_node(name)
    match = _LAYER.match(hook)
    for ending, kind, row in _KINDS:
        if match and hook.endswith(ending):
            layer = int(match[1])
            return kind, str(layer), 4 * layer + row
    raise ValueError(f"export-graph: node {name!r} is no node of an rl-circuits graph")


def _row(name: str) -> int:
    """The row of `name` in the layered layout (0: embedding; 4 per layer; top: logits)."""
    if name == "hook_embed":
        return 0
    hook, _ = parse_node(name)
    match = _LAYER.match(hook)
    if match and hook.endswith("hook_resid_post"):
        return 4 * int(match[1]) + 5
    return _describe(name, 0, "")[2]


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>TITLE</title>
<style>
body { font-family: system-ui, sans-serif; margin: 16px; color: #222; }
svg text { font-size: 11px; fill: #222; }
.note { color: #555; font-size: 13px; max-width: 1100px; }
</style></head><body>
<h1 style="font-size:18px">TITLE</h1>
<p class="note">Each link is an edge of the cell's top edges by |mean score|; width grows with
|score|, red: removing the edge raises the loss (it helps), blue: it lowers the loss. Nodes are
TransformerLens hooks, from the embedding (bottom) to the logits (top).</p>
<svg id="view" xmlns="http://www.w3.org/2000/svg"></svg>
<script type="application/json" id="graph">GRAPH_JSON</script>
<script type="application/json" id="rows">ROWS_JSON</script>
<script>
(function () {
  const g = JSON.parse(document.getElementById("graph").textContent);
  const rows = JSON.parse(document.getElementById("rows").textContent);
  const svg = document.getElementById("view");
  const NS = "http://www.w3.org/2000/svg";
  const byRow = {};
  g.nodes.forEach(function (n) {
    const row = rows[n.node_id];
    (byRow[row] = byRow[row] || []).push(n);
  });
  const levels = Object.keys(byRow).map(Number).sort(function (a, b) { return a - b; });
  const width = 1100, step = 90, height = step * levels.length + 40;
  svg.setAttribute("width", width); svg.setAttribute("height", height);
  const pos = {};
  levels.forEach(function (level, i) {
    const nodes = byRow[level];
    nodes.forEach(function (n, j) {
      pos[n.node_id] = [(j + 1) * width / (nodes.length + 1), height - 30 - i * step, j];
    });
  });
  const top = Math.max.apply(null, g.links.map(function (l) { return Math.abs(l.weight); })) || 1;
  g.links.forEach(function (l, k) {
    const a = pos[l.source], b = pos[l.target];
    const path = document.createElementNS(NS, "path");
    const mid = (a[1] + b[1]) / 2;
    // One node above another: an arc bowing out to alternate sides, so stacked links part.
    const stacked = Math.abs(a[0] - b[0]) < 1;
    const bow = stacked ? (k % 2 ? 1 : -1) * Math.min(320, 0.6 * (a[1] - b[1])) : 0;
    const d = ["M", a[0], a[1], "C", a[0] + bow, mid, b[0] + bow, mid, b[0], b[1]].join(" ");
    path.setAttribute("d", d);
    path.setAttribute("fill", "none");
    path.setAttribute("stroke", l.weight >= 0 ? "#d62728" : "#1f77b4");
    path.setAttribute("stroke-opacity", "0.75");
    path.setAttribute("stroke-width", String(1.5 + 8 * Math.abs(l.weight) / top));
    const tip = document.createElementNS(NS, "title");
    tip.textContent = l.source + " -> " + l.target + ": " + l.weight.toPrecision(4);
    path.appendChild(tip);
    svg.appendChild(path);
  });
  g.nodes.forEach(function (n) {
    const p = pos[n.node_id];
    const dot = document.createElementNS(NS, "circle");
    dot.setAttribute("cx", p[0]); dot.setAttribute("cy", p[1]); dot.setAttribute("r", 7);
    dot.setAttribute("fill", n.feature_type === "logit" ? "#2ca02c" : "#444");
    svg.appendChild(dot);
    const label = document.createElementNS(NS, "text");
    label.setAttribute("x", p[0] + 9);  // neighbours' labels alternate above and below
    label.setAttribute("y", p[2] % 2 ? p[1] + 20 : p[1] - 9);
    label.textContent = n.clerp;
    svg.appendChild(label);
  });
})();
</script></body></html>
"""
