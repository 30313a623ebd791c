"""Bad or unusual inputs to the engine's public functions get a clear error or work (issue 22):
array-like circuits, empty stacks, empty token tensors, metrics of the wrong shape, TransformerLens
flags left set by the user, sample ids, top_edges' k (tiny float64 models)."""

import numpy as np
import pytest
import torch
from checker import unchecked

from rl_circuits.engine.attribution import attribute, masked_nll
from rl_circuits.engine.circuits import evaluate_circuit
from rl_circuits.engine.graph import GRAPHS, build_graph


def _batch(seed=0, batch=2, pos=10, start=5):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 90, (batch, pos), generator=gen)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, start:] = True
    return tokens, mask


def test_evaluate_circuit_takes_lists_numpy_and_an_empty_stack(models64):
    model = models64["Qwen2ForCausalLM"]
    tokens, mask = _batch()
    edges = build_graph("paper", model.cfg.n_layers).edge_mask.clone()
    edges[0, 3] = False
    reference = evaluate_circuit(model, tokens, mask, edges)
    for circuit in (edges.numpy(), edges.tolist()):
        torch.testing.assert_close(evaluate_circuit(model, tokens, mask, circuit), reference)
    stack = np.stack([edges.numpy(), edges.numpy()])
    torch.testing.assert_close(
        evaluate_circuit(model, tokens, mask, stack), torch.stack([reference, reference])
    )
    for graph in ("paper", "heads"):
        g = build_graph(graph, model.cfg.n_layers, model.cfg.n_heads)
        empty = torch.zeros(0, len(g.upstream), len(g.downstream), dtype=torch.bool)
        out = evaluate_circuit(model, tokens, mask, empty, graph=graph)
        assert out.shape == (0, 2) and out.dtype == torch.float64
    with pytest.raises(ValueError, match="circuit must be a tensor, a numpy array"):
        evaluate_circuit(model, tokens, mask, [[True], [True, False]])


def test_tokens_without_positions_or_samples_are_refused(models64):
    model = models64["LlamaForCausalLM"]
    for shape in [(3, 0), (3, 1), (0, 5)]:
        tokens = torch.zeros(shape, dtype=torch.long)
        mask = torch.zeros(shape, dtype=torch.bool)
        with pytest.raises(ValueError, match=rf"tokens has shape \({shape[0]}, {shape[1]}\)"):
            attribute(model, tokens, mask)
        with pytest.raises(ValueError, match="at least 2 positions"):
            evaluate_circuit(model, tokens, mask, build_graph("paper", 2).edge_mask)


def test_a_metric_that_is_not_one_float_per_sample_is_refused_by_name(models64):
    model = models64["MistralForCausalLM"]
    tokens, mask = _batch(seed=1)

    def two_columns(logits, tokens, loss_mask):
        return torch.stack([masked_nll(logits, tokens, loss_mask)] * 2, dim=1)

    def summed(logits, tokens, loss_mask):
        return masked_nll(logits, tokens, loss_mask).sum()

    for metric, shape in ((two_columns, r"\[2, 2\]"), (summed, r"\[\]")):
        for graph in ("paper", "heads"):
            for method in ("eap", "exact"):
                with pytest.raises(ValueError, match=rf"metric {metric.__name__} .*\[2\].*{shape}"):
                    attribute(model, tokens, mask, graph=graph, method=method, metric=metric)
            with pytest.raises(ValueError, match=rf"metric {metric.__name__} "):
                edges = build_graph(graph, 2, model.cfg.n_heads).edge_mask
                evaluate_circuit(model, tokens, mask, edges, graph=graph, metric=metric)


@pytest.mark.parametrize("graph", GRAPHS)
def test_per_head_input_flags_left_set_by_the_user_give_the_same_results(models64, graph):
    """set_use_split_qkv_input(True) (and the other per-head copies) do not change the model's
    function, so they change no score or loss; the user's flags are restored."""
    model = models64["Qwen2ForCausalLM"]
    tokens, mask = _batch(seed=2)
    g = build_graph(graph, model.cfg.n_layers, model.cfg.n_heads)
    circuit = g.edge_mask & (torch.rand(g.edge_mask.shape, generator=torch.Generator()) < 0.7)
    plain = attribute(model, tokens, mask, graph=graph)
    plain_loss = evaluate_circuit(model, tokens, mask, circuit, graph=graph)
    model.set_use_split_qkv_input(True)
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)
    try:
        flagged = attribute(model, tokens, mask, graph=graph)
        flagged_loss = evaluate_circuit(model, tokens, mask, circuit, graph=graph)
        assert model.cfg.use_split_qkv_input and model.cfg.use_attn_result
        assert model.blocks[0].attn.cfg.use_split_qkv_input
    finally:
        model.set_use_split_qkv_input(False)
        model.set_use_attn_result(False)
        model.set_use_hook_mlp_in(False)
    torch.testing.assert_close(flagged.values, plain.values, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(flagged_loss, plain_loss, rtol=1e-12, atol=1e-12)


def test_sample_ids_are_checked_and_attached(models64):
    model = models64["LlamaForCausalLM"]
    tokens, mask = _batch(seed=3)
    scores = attribute(model, tokens, mask, sample_ids=["q-1", "q-2"])
    assert scores.ids == ["q-1", "q-2"] and scores.sample_ids() == ["q-1", "q-2"]
    assert attribute(model, tokens, mask, sample_ids=("a", "b")).ids == ["a", "b"]
    assert attribute(model, tokens, mask).ids is None
    for bad, message in (
        (["q-1"], "sample_ids must be 2 strings, one per sample of tokens; got 1"),
        (["q-1", "q-2", "q-3"], "got 3"),
        (["q-1", "q-1"], r"distinct .*repeated: \['q-1'\]"),
        ([1, 2], r"got 2 \(int\)"),
        ("ab", "must be a list of 2 strings"),
        (7, "must be a list of 2 strings"),
    ):
        with pytest.raises(ValueError, match=message), unchecked():  # [1, 2], 7: not the hint
            attribute(model, tokens, mask, sample_ids=bad)


def test_top_edges_needs_a_whole_number(models64):
    model = models64["LlamaForCausalLM"]
    tokens, mask = _batch(seed=4)
    scores = attribute(model, tokens, mask)
    assert len(scores.top_edges(np.int64(3))) == 3
    for k in (2.5, -1, "3", True, None):
        with pytest.raises(ValueError, match="k must be a whole number >= 0"), unchecked():
            scores.top_edges(k)
