"""The computational graphs whose edges are scored, named with TransformerLens hook names.

Upstream nodes are the writers to the residual stream (embedding, each attention and MLP
output); downstream nodes are its readers. Each downstream node also has a *site*: the place in
a HookedTransformer's forward pass where its input can be read, hooked and ablated.

The `heads` graph makes every attention head a node: upstream, head h of layer l writes
`blocks.{l}.attn.hook_result[{h}]` (z_h W_O[h], as TransformerLens's `hook_result`); downstream,
each head reads its own query, key and value inputs `blocks.{l}.hook_{q,k,v}_input[{h}]` (one
per query head, as TransformerLens's split-qkv inputs with `ungroup_grouped_query_attention`).
An attention output bias b_O belongs to no head (as in TransformerLens and EAP-IG): it is not
an upstream node of the heads graph, so its edges are not scored there, while the paper
graph's `hook_attn_out` includes it. Llama, Mistral and Qwen2 have no output bias (b_O = 0),
so summing a layer's head scores gives the paper graph's scores exactly; a model whose b_O is
nonzero (b_V folded into it by TransformerLens's weight processing) is refused for this graph
(`heads.check_supported`).

A graph owns its index arithmetic: `forward_index` / `backward_index` give a node's position
from what it is (component, layer, head: a `NodeKey`), as EAP-IG's `Graph` does, so code that
indexes score matrices asks the graph rather than recomputing the node order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, NamedTuple

import torch
from jaxtyping import Bool

from rl_circuits.engine.choices import GRAPHS
from rl_circuits.engine.tl_compat import LN1_CALLS

GraphName = Literal["paper", "block", "residual", "heads"]
_HEAD_NAME = re.compile(r"^(?P<hook>[A-Za-z0-9_.]+)\[(?P<head>[0-9]+)\]$")
_BLOCK_HOOK = re.compile(r"^blocks\.(?P<layer>[0-9]+)\.(?P<hook>[A-Za-z0-9_.]+)$")
# A block hook's component: what a layer writes (attn, mlp) or reads (q, k, v, attn, mlp, the
# residual states); the last layer's hook_resid_post is the logits node.
_COMPONENTS = {
    "hook_attn_out": "attn",
    "attn.hook_result": "attn",
    "hook_mlp_out": "mlp",
    "hook_q_input": "q",
    "hook_k_input": "k",
    "hook_v_input": "v",
    "hook_attn_in": "attn",
    "hook_mlp_in": "mlp",
    "hook_resid_pre": "resid_pre",
    "hook_resid_mid": "resid_mid",
    "hook_resid_post": "logits",
}


class NodeKey(NamedTuple):
    """What a node is: its component (upstream "embed", "attn", "mlp"; downstream "q", "k",
    "v", "attn", "mlp", "resid_pre", "resid_mid", "logits"), its layer and its head (None where
    the node has none: the embedding and the logits have no layer, layer nodes no head)."""

    component: str
    layer: int | None = None
    head: int | None = None


def node_key(name: str) -> NodeKey:
    """A node name -> its `NodeKey`: `"blocks.3.hook_q_input[5]"` -> `NodeKey("q", 3, 5)`."""
    hook, head = parse_node(name)
    if hook == "hook_embed":
        return NodeKey("embed")
    match = _BLOCK_HOOK.match(hook)
    component = _COMPONENTS.get(match["hook"]) if match else None
    if component is None:
        raise ValueError(f"node name {name!r} names no node of any graph")
    if component == "logits":
        return NodeKey("logits")
    return NodeKey(component, int(match["layer"]), head)


@dataclass(frozen=True)
class Site:
    """Where a downstream node's input lives in the forward pass.

    `module` is a submodule path of the HookedTransformer. `kind="input"`: the input of a norm
    module, on the given `calls` of it within one forward (TransformerLens calls `ln1` once per
    attention input, `tl_compat.LN1_CALLS`: query, key and value, in that order).
    `kind="output"`: the output of a HookPoint (a residual-stream state, seen by all of its
    readers). `kind="head"`: the input of one head's query, key or value projection; `module` is
    the HookPoint `hook_q`, `hook_k` or `hook_v` of the attention layer (output [batch, pos,
    n_heads, d_head], keys and values ungrouped) and `head` the head whose slice that input
    produces.
    """

    module: str
    kind: Literal["input", "output", "head"]
    calls: tuple[int, ...] = (0,)
    head: int | None = None


@dataclass(frozen=True)
class Graph:
    """Node names, and for each downstream node its site and how many upstream nodes precede it."""

    name: str
    upstream: tuple[str, ...]
    downstream: tuple[str, ...]
    sites: tuple[Site, ...]
    n_before: tuple[int, ...]  # upstream nodes 0..n_before[d]-1 write before node d reads

    @property
    def edge_mask(self) -> Bool[torch.Tensor, "n_upstream n_downstream"]:
        rows = torch.arange(len(self.upstream)).unsqueeze(1)
        return rows < torch.tensor(self.n_before).unsqueeze(0)

    @property
    def n_edges(self) -> int:
        return sum(self.n_before)

    def forward_index(
        self, component: str, layer: int | None = None, head: int | None = None
    ) -> int:
        """The position among the upstream nodes of `NodeKey(component, layer, head)`."""
        return _position(self._forward, NodeKey(component, layer, head), self.name, "upstream")

    def backward_index(
        self, component: str, layer: int | None = None, head: int | None = None
    ) -> int:
        """The position among the downstream nodes of `NodeKey(component, layer, head)`."""
        key = NodeKey(component, layer, head)
        return _position(self._backward, key, self.name, "downstream")

    def forward_key(self, index: int) -> NodeKey:
        """What upstream node `index` is (the inverse of `forward_index`)."""
        return node_key(self.upstream[index])

    def forward_heads(self, layer: int) -> slice:
        """The upstream positions of `layer`'s heads, in head order (the heads graph)."""
        return _run(self._head_runs, ("upstream", "attn", layer), self.name)

    def backward_heads(self, component: str, layer: int) -> slice:
        """The downstream positions of `layer`'s heads' `component` ("q", "k", "v") inputs."""
        return _run(self._head_runs, ("downstream", component, layer), self.name)

    @cached_property
    def _forward(self) -> dict[NodeKey, int]:
        return {node_key(name): i for i, name in enumerate(self.upstream)}

    @cached_property
    def _backward(self) -> dict[NodeKey, int]:
        return {node_key(name): i for i, name in enumerate(self.downstream)}

    @cached_property
    def _head_runs(self) -> dict[tuple[str, str, int], slice]:
        """(side, component, layer) -> the positions of that layer's per-head nodes, which the
        graphs place in a run in head order (checked here, once)."""
        runs = {}
        for side, positions in (("upstream", self._forward), ("downstream", self._backward)):
            heads: dict[tuple[str, str, int], list[tuple[int, int]]] = {}
            for key, i in positions.items():
                if key.head is not None:
                    heads.setdefault((side, key.component, key.layer), []).append((key.head, i))
            for run, found in heads.items():
                first = min(i for _, i in found)
                if sorted(found) != [(h, first + h) for h in range(len(found))]:
                    raise AssertionError(f"{self.name} graph: the heads of {run} are not in a run")
                runs[run] = slice(first, first + len(found))
        return runs


def _position(positions: dict[NodeKey, int], key: NodeKey, graph: str, side: str) -> int:
    if key not in positions:
        raise KeyError(f"the {graph} graph has no {side} node {key}")
    return positions[key]


def _run(runs: dict[tuple[str, str, int], slice], run: tuple[str, str, int], graph: str) -> slice:
    if run not in runs:
        side, component, layer = run
        raise KeyError(f"the {graph} graph has no per-head {component} nodes in layer {layer}")
    return runs[run]


def parse_node(name: str) -> tuple[str, int | None]:
    """A node name -> (TransformerLens hook name, head index or None).

    `"blocks.3.hook_q_input[5]"` -> `("blocks.3.hook_q_input", 5)`; `"hook_embed"` ->
    `("hook_embed", None)`.
    """
    match = _HEAD_NAME.match(name)
    if match:
        return match["hook"], int(match["head"])
    if "[" in name or "]" in name:
        raise ValueError(f"node name {name!r} is not of the form 'hook.name' or 'hook.name[head]'")
    return name, None


def upstream_nodes(n_layers: int, n_heads: int | None = None) -> tuple[str, ...]:
    """`hook_embed`, then per layer `hook_attn_out` (or, given `n_heads`, each head's
    `attn.hook_result[h]`), then `hook_mlp_out`: residual order (1 + 2L, or 1 + L(H+1))."""
    nodes = ["hook_embed"]
    for layer in range(n_layers):
        if n_heads is None:
            nodes.append(f"blocks.{layer}.hook_attn_out")
        else:
            nodes += [f"blocks.{layer}.attn.hook_result[{h}]" for h in range(n_heads)]
        nodes.append(f"blocks.{layer}.hook_mlp_out")
    return tuple(nodes)


def build_graph(name: str, n_layers: int, n_heads: int | None = None) -> Graph:
    """The `paper` (q/k/v/mlp inputs + logits, 4L+1 nodes), `block` (2L+1), `residual` (2L)
    or `heads` graph (needs `n_heads`: 1 + L(H+1) upstream, L(3H+1)+1 downstream nodes)."""
    if name not in GRAPHS:
        raise ValueError(f"unknown graph {name!r}; choose one of {', '.join(GRAPHS)}")
    if name == "heads":
        if n_heads is None or n_heads < 1:
            raise ValueError(f"the heads graph needs n_heads (model.cfg.n_heads), got {n_heads}")
        return _heads_graph(n_layers, n_heads)
    nodes: list[tuple[str, Site, int]] = []
    last = n_layers - 1
    all_calls = tuple(range(len(LN1_CALLS)))
    for layer in range(n_layers):
        attn_reads, mlp_reads = 1 + 2 * layer, 2 + 2 * layer
        ln1, ln2 = f"blocks.{layer}.ln1", f"blocks.{layer}.ln2"
        if name == "paper":
            for call, letter in enumerate(LN1_CALLS):
                nodes.append(
                    (f"blocks.{layer}.hook_{letter}_input", Site(ln1, "input", (call,)), attn_reads)
                )
        elif name == "block":
            nodes.append(
                (f"blocks.{layer}.hook_attn_in", Site(ln1, "input", all_calls), attn_reads)
            )
        elif layer > 0:  # residual: resid_pre of layer 0 is the embedding itself
            hook = f"blocks.{layer}.hook_resid_pre"
            nodes.append((hook, Site(hook, "output"), attn_reads))
        if name == "residual":
            hook = f"blocks.{layer}.hook_resid_mid"
            nodes.append((hook, Site(hook, "output"), mlp_reads))
        else:
            nodes.append((f"blocks.{layer}.hook_mlp_in", Site(ln2, "input"), mlp_reads))
    # The logits node: the final residual state, whose only reader is the final norm.
    hook = f"blocks.{last}.hook_resid_post"
    nodes.append((hook, Site(hook, "output"), 1 + 2 * n_layers))
    names, sites, n_before = zip(*nodes, strict=True)
    return Graph(name, upstream_nodes(n_layers), names, sites, n_before)


def _heads_graph(n_layers: int, n_heads: int) -> Graph:
    """Every head a node; a layer's heads write after its own q/k/v inputs are read."""
    nodes: list[tuple[str, Site, int]] = []
    for layer in range(n_layers):
        attn_reads = 1 + layer * (n_heads + 1)
        for letter in "qkv":
            module = f"blocks.{layer}.attn.hook_{letter}"
            nodes += [
                (
                    f"blocks.{layer}.hook_{letter}_input[{h}]",
                    Site(module, "head", head=h),
                    attn_reads,
                )
                for h in range(n_heads)
            ]
        ln2 = f"blocks.{layer}.ln2"
        nodes.append((f"blocks.{layer}.hook_mlp_in", Site(ln2, "input"), attn_reads + n_heads))
    hook = f"blocks.{n_layers - 1}.hook_resid_post"
    nodes.append((hook, Site(hook, "output"), 1 + n_layers * (n_heads + 1)))
    names, sites, n_before = zip(*nodes, strict=True)
    return Graph("heads", upstream_nodes(n_layers, n_heads), names, sites, n_before)
