"""The graphs own their index arithmetic: a node's position asked by what it is
(`Graph.forward_index`, `backward_index`, `forward_heads`, `backward_heads`) is the position of
the node of that name, in every graph."""

from __future__ import annotations

import pytest

from rl_circuits.engine.choices import GRAPHS
from rl_circuits.engine.graph import NodeKey, build_graph, node_key


@pytest.mark.parametrize("name", GRAPHS)
def test_every_node_is_found_by_what_it_is(name):
    graph = build_graph(name, 3, 4)
    for u, node in enumerate(graph.upstream):
        assert graph.forward_key(u) == node_key(node)
        assert graph.forward_index(*node_key(node)) == u
    for d, node in enumerate(graph.downstream):
        assert graph.backward_index(*node_key(node)) == d
    assert graph.downstream[graph.backward_index("logits")] == "blocks.2.hook_resid_post"
    assert graph.upstream[graph.forward_index("embed")] == "hook_embed"


def test_heads_are_found_in_runs_in_head_order():
    graph = build_graph("heads", 3, 4)
    heads = graph.forward_heads(1)
    assert [graph.upstream[u] for u in range(heads.start, heads.stop)] == [
        f"blocks.1.attn.hook_result[{h}]" for h in range(4)
    ]
    assert graph.upstream[graph.forward_index("mlp", 1)] == "blocks.1.hook_mlp_out"
    assert graph.forward_key(heads.start + 2) == NodeKey("attn", 1, 2)
    for letter in "qkv":
        inputs = graph.backward_heads(letter, 2)
        assert [graph.downstream[d] for d in range(inputs.start, inputs.stop)] == [
            f"blocks.2.hook_{letter}_input[{h}]" for h in range(4)
        ]
    assert graph.downstream[graph.backward_index("mlp", 2)] == "blocks.2.hook_mlp_in"
    paper = build_graph("paper", 3)
    assert paper.downstream[paper.backward_index("v", 1)] == "blocks.1.hook_v_input"


def test_a_node_the_graph_lacks_is_refused_by_name():
    with pytest.raises(KeyError, match="the paper graph has no upstream node"):
        build_graph("paper", 2).forward_index("attn", 0, 3)
    with pytest.raises(KeyError, match="no per-head q nodes in layer 0"):
        build_graph("block", 2).backward_heads("q", 0)
    with pytest.raises(ValueError, match="names no node of any graph"):
        node_key("blocks.0.attn.hook_pattern")
