"""The computational graphs whose edges are scored, named with TransformerLens hook names.

Upstream nodes are the writers to the residual stream (embedding, each attention and MLP
output); downstream nodes are its readers. Each downstream node also has a *site*: the place in
a HookedTransformer's forward pass where its input can be read, hooked and ablated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool

GraphName = Literal["paper", "block", "residual"]
GRAPHS: tuple[str, ...] = ("paper", "block", "residual")


@dataclass(frozen=True)
class Site:
    """Where a downstream node's input lives in the forward pass.

    `module` is a submodule path of the HookedTransformer. `kind="input"`: the input of a norm
    module, on the given `calls` of it within one forward (TransformerLens calls `ln1` three
    times, for the query, key and value inputs, in that order). `kind="output"`: the output
    of a HookPoint (a residual-stream state, seen by all of its readers).
    """

    module: str
    kind: Literal["input", "output"]
    calls: tuple[int, ...] = (0,)


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


def upstream_nodes(n_layers: int) -> tuple[str, ...]:
    """`hook_embed`, then per layer `hook_attn_out`, `hook_mlp_out`: residual order (1 + 2L)."""
    nodes = ["hook_embed"]
    for layer in range(n_layers):
        nodes += [f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out"]
    return tuple(nodes)


def build_graph(name: str, n_layers: int) -> Graph:
    """The `paper` (q/k/v/mlp inputs + logits, 4L+1 nodes), `block` (2L+1) or `residual` (2L)."""
    if name not in GRAPHS:
        raise ValueError(f"unknown graph {name!r}; choose one of {', '.join(GRAPHS)}")
    nodes: list[tuple[str, Site, int]] = []
    last = n_layers - 1
    for layer in range(n_layers):
        attn_reads, mlp_reads = 1 + 2 * layer, 2 + 2 * layer
        ln1, ln2 = f"blocks.{layer}.ln1", f"blocks.{layer}.ln2"
        if name == "paper":
            for call, part in enumerate("qkv"):
                nodes.append(
                    (f"blocks.{layer}.hook_{part}_input", Site(ln1, "input", (call,)), attn_reads)
                )
        elif name == "block":
            nodes.append(
                (f"blocks.{layer}.hook_attn_in", Site(ln1, "input", (0, 1, 2)), attn_reads)
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
