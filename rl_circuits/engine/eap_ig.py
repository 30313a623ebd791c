"""Edge scores in EAP-IG's graph files (hannamw/EAP-IG `Graph.to_json` / `to_pt`), which
EAP-IG's `Graph.from_json` / `from_pt` and the MIB circuit track read.

EAP-IG's graph is the heads graph: forward (source) nodes `input`, `a{l}.h{h}`, `m{l}`;
backward (destination) nodes `a{l}.h{h}<q|k|v>`, `m{l}`, `logits`, in the same order as ours:

| EAP-IG      | rl-circuits heads graph           | rl-circuits paper graph (cfg n_heads 1) |
|-------------|-----------------------------------|-----------------------------------------|
| input       | hook_embed                        | hook_embed                              |
| a{l}.h{h}   | blocks.{l}.attn.hook_result[{h}]  | blocks.{l}.hook_attn_out (h = 0)        |
| a{l}.h{h}<q>| blocks.{l}.hook_q_input[{h}]      | blocks.{l}.hook_q_input (h = 0)         |
| m{l}        | hook_mlp_out / hook_mlp_in        | hook_mlp_out / hook_mlp_in              |
| logits      | blocks.{L-1}.hook_resid_post      | blocks.{L-1}.hook_resid_post            |

The paper graph is written as a graph with one head per layer, each layer's heads summed (its
`cfg` says `n_heads: 1` and `rl_circuits_graph: "paper"`): EAP-IG's tools (pruning, drawing)
read it; evaluating it on a model needs the heads graph. An edge's name is
`{parent}->{child}`, e.g. `a0.h1->a1.h2<k>`; a JSON file maps each edge name to `score` and
`in_graph`, a .pt file holds `edges_scores` [n_forward, n_backward] with `src_nodes` and
`dst_nodes`. Every edge and node is written as in the graph (`in_graph` true): the file holds
importance scores, the form the MIB circuit track accepts as one file per task and model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float

from rl_circuits.engine.graph import build_graph
from rl_circuits.errors import DataError

SUFFIXES: tuple[str, ...] = (".json", ".pt")
_OWN_GRAPH_KEY = "rl_circuits_graph"  # a cfg key EAP-IG ignores: which of our graphs it was


def eap_ig_names(n_layers: int, n_heads: int) -> tuple[list[str], list[str]]:
    """EAP-IG's forward and backward node names in matrix order (`Graph.to_pt`'s `src_nodes`
    and `dst_nodes`)."""
    forward, backward = ["input"], []
    for layer in range(n_layers):
        forward += [f"a{layer}.h{h}" for h in range(n_heads)] + [f"m{layer}"]
        backward += [f"a{layer}.h{h}<{p}>" for p in "qkv" for h in range(n_heads)]
        backward.append(f"m{layer}")
    return forward, [*backward, "logits"]


def write(
    path: Path,
    values: Float[torch.Tensor, "n_upstream n_downstream"],
    upstream: Sequence[str],
    downstream: Sequence[str],
    edge_mask: Bool[torch.Tensor, "n_upstream n_downstream"],
    d_model: int | None,
) -> None:
    """One matrix of edge scores on the heads or paper graph as an EAP-IG graph file."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"to_eap_ig: {path} must end in .json or .pt (EAP-IG's two formats)")
    graph, n_layers, n_heads = _layout(tuple(upstream), tuple(downstream))
    if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
        raise ValueError(
            "to_eap_ig needs the model's width (EAP-IG's Graph.from_json reads cfg['d_model']): "
            "pass d_model=model.cfg.d_model"
        )
    values = values.float()
    forward, backward = eap_ig_names(n_layers, n_heads)
    cfg = {"n_layers": n_layers, "n_heads": n_heads, "parallel_attn_mlp": False, "d_model": d_model}
    if graph == "paper":
        cfg = {**cfg, _OWN_GRAPH_KEY: "paper"}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".pt":
        payload = {
            "cfg": cfg,
            "src_nodes": forward,
            "dst_nodes": backward,
            "edges_scores": torch.where(edge_mask, values, torch.zeros_like(values)),
            "edges_in_graph": edge_mask.clone(),
            "nodes_in_graph": torch.ones(len(forward), dtype=torch.bool),
        }
        _replace(path, lambda temp: torch.save(payload, temp))
        return
    nodes = {name: {"in_graph": True} for name in [*forward, "logits"]}
    rows, cols = edge_mask.nonzero(as_tuple=True)
    edges = {
        f"{forward[u]}->{backward[d]}": {"score": float(values[u, d]), "in_graph": True}
        for u, d in zip(rows.tolist(), cols.tolist(), strict=True)
    }
    text = json.dumps({"cfg": cfg, "nodes": nodes, "edges": edges})
    _replace(path, lambda temp: temp.write_text(text))


def _replace(path: Path, write: Callable[[Path], object]) -> None:
    """`write` a temporary file beside `path`, then move it there: an existing file is either
    kept whole or replaced whole, never left half-written."""
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def read(path: Path) -> dict[str, Any]:
    """An EAP-IG graph file (.json or .pt) as EdgeScores fields: `values` [1, n_upstream,
    n_downstream] (its edge scores), `upstream`, `downstream`, `edge_mask`, `graph`, `meta`."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: not an EAP-IG graph file (expected .json or .pt)")
    try:
        if path.suffix == ".pt":  # tensors, lists and dicts only: no pickled objects are run
            data = torch.load(path, map_location="cpu", weights_only=True)
        else:
            data = json.loads(path.read_text())
        cfg = data["cfg"]
        n_layers, n_heads = int(cfg["n_layers"]), int(cfg["n_heads"])
        parallel = bool(cfg.get("parallel_attn_mlp", False))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise DataError(
            f"{path}: not a readable EAP-IG graph file ({type(exc).__name__}: {exc}); write it "
            "with EAP-IG's Graph.to_json or Graph.to_pt"
        ) from exc
    if parallel:
        raise DataError(
            f"{path}: a graph with parallel attention and MLP; rl-circuits graphs assume each "
            "block's attention feeds its MLP"
        )
    if n_layers < 1 or n_heads < 1:
        raise DataError(f"{path}: cfg n_layers {n_layers} and n_heads {n_heads} must be >= 1")
    graph = "paper" if cfg.get(_OWN_GRAPH_KEY) == "paper" else "heads"
    if graph == "paper" and n_heads != 1:
        raise DataError(f"{path}: cfg says {_OWN_GRAPH_KEY} paper but n_heads {n_heads}, not 1")
    g = build_graph(graph, n_layers, n_heads)
    forward, backward = eap_ig_names(n_layers, n_heads)
    if path.suffix == ".pt":
        values = _pt_values(path, data, forward, backward, g.edge_mask)
    else:
        values = _json_values(path, data, forward, backward, g.edge_mask)
    return {
        "values": values.unsqueeze(0),
        "upstream": g.upstream,
        "downstream": g.downstream,
        "edge_mask": g.edge_mask,
        "graph": graph,
        "meta": {"d_model": cfg.get("d_model"), "source": "eap-ig"},
    }


def _json_values(path, data, forward, backward, mask) -> torch.Tensor:
    edges = data.get("edges")
    if not isinstance(edges, dict):
        raise DataError(f"{path}: 'edges' must map edge names to {{score, in_graph}}")
    values = torch.zeros(len(forward), len(backward))
    expected = set()
    for u, d in zip(*mask.nonzero(as_tuple=True), strict=True):
        name = f"{forward[u]}->{backward[d]}"
        expected.add(name)
        entry = edges.get(name)
        if not isinstance(entry, dict) or not isinstance(entry.get("score"), int | float):
            raise DataError(
                f"{path}: edge {name!r} has no numeric score; EAP-IG writes every edge of the "
                "graph with its score (Graph.to_json)"
            )
        values[u, d] = float(entry["score"])
    unknown = sorted(set(edges) - expected)
    if unknown:
        raise DataError(f"{path}: edges not in the graph its cfg describes: {unknown[:5]}")
    return values


def _pt_values(path, data, forward, backward, mask) -> torch.Tensor:
    if list(data.get("src_nodes", [])) != forward or list(data.get("dst_nodes", [])) != backward:
        raise DataError(
            f"{path}: src_nodes / dst_nodes are not those of the graph its cfg describes "
            f"({len(forward)} forward, {len(backward)} backward nodes in EAP-IG's order)"
        )
    scores = data.get("edges_scores")
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != tuple(mask.shape):
        raise DataError(f"{path}: edges_scores must be a tensor of shape {tuple(mask.shape)}")
    return torch.where(mask, scores.float(), torch.zeros(()))


def _layout(upstream: tuple[str, ...], downstream: tuple[str, ...]) -> tuple[str, int, int]:
    """(graph, n_layers, n_heads as written) of node names of the heads or paper graph."""
    n_layers = sum(name.endswith("hook_mlp_out") for name in upstream)
    n_heads = sum(name.startswith("blocks.0.attn.hook_result[") for name in upstream)
    for graph, heads in (("heads", n_heads), ("paper", 1)):
        if n_layers and heads:
            g = build_graph(graph, n_layers, heads)
            if g.upstream == upstream and g.downstream == downstream:
                return graph, n_layers, heads
    raise ValueError(
        "to_eap_ig: EAP-IG's graph format holds the heads and paper graphs, not these scores' "
        "graph; attribute with graph='heads' (per-head nodes, as EAP-IG and MIB) or "
        "graph='paper'"
    )
