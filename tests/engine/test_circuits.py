"""Circuit evaluation against its identities and a hand-written ablation (tiny float64 models)."""

import math

import numpy as np
import pytest
import torch

from rl_circuits.analysis.faithfulness import (
    circuit_size,
    compare_circuit_sizes,
    faithfulness,
    jaccard,
    overlap_curve,
)
from rl_circuits.engine.attribution import attribute, masked_nll
from rl_circuits.engine.circuits import evaluate_circuit, log_grid, top_k_circuits
from rl_circuits.engine.graph import GRAPHS, build_graph

torch.set_num_threads(1)


def _batch(seed=0, batch=2, pos=12, start=6, vocab=90):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, vocab, (batch, pos), generator=gen)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, start:] = True
    return tokens, mask


def _clean(model, tokens, mask):
    with torch.no_grad():
        return masked_nll(model(tokens), tokens, mask)


@pytest.mark.parametrize("graph", GRAPHS)
def test_all_edges_give_the_clean_loss_and_none_the_uniform_one(models64, graph):
    tokens, mask = _batch()
    for model in models64.values():
        g = build_graph(graph, model.cfg.n_layers, model.cfg.n_heads)
        full = evaluate_circuit(model, tokens, mask, g.edge_mask, graph=graph)
        torch.testing.assert_close(full, _clean(model, tokens, mask), rtol=0, atol=1e-12)
        # No edge: the final residual state is zero, the logits are zero, every token is
        # equally likely (these families have no unembedding bias).
        none = evaluate_circuit(model, tokens, mask, torch.zeros_like(g.edge_mask), graph=graph)
        expected = torch.full_like(none, math.log(model.cfg.d_vocab))
        torch.testing.assert_close(none, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("graph", GRAPHS)
def test_removing_one_edge_equals_exact_ablation(models64, graph):
    tokens, mask = _batch(seed=1, pos=10, start=5)
    gen = torch.Generator().manual_seed(0)
    for model in models64.values():
        exact = attribute(model, tokens, mask, graph=graph, method="exact")
        edges = exact.edge_mask.nonzero().tolist()
        picks = [edges[i] for i in torch.randperm(len(edges), generator=gen)[:5].tolist()]
        circuits = torch.stack([exact.edge_mask.clone() for _ in picks])
        for i, (u, d) in enumerate(picks):
            circuits[i, u, d] = False
        losses = evaluate_circuit(model, tokens, mask, circuits, graph=graph)
        for i, (u, d) in enumerate(picks):
            got = losses[i] - exact.loss.double()
            torch.testing.assert_close(got, exact.values[:, u, d].double(), rtol=1e-5, atol=1e-6)


def _hand_circuit_loss(model, tokens, mask, keep, mean=None):
    """The circuit's loss through TransformerLens's own hook points: each upstream hook stores
    its output of this pass, each per-input hook subtracts the removed ones (paper graph)."""
    g = build_graph("paper", model.cfg.n_layers)
    outputs: dict[str, torch.Tensor] = {}

    def store(act, hook):
        outputs[hook.name] = act
        return act

    def subtract(d):
        def hook_fn(act, hook):
            for u in range(g.n_before[d]):
                if not keep[u, d]:
                    part = outputs[g.upstream[u]]
                    if mean is not None:
                        part = part - mean[u]
                    act = act - (part.unsqueeze(2) if act.ndim == 4 else part)
            return act

        return hook_fn

    hooks = [(name, store) for name in g.upstream]
    hooks += [(name, subtract(d)) for d, name in enumerate(g.downstream)]
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    try:
        with torch.no_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    finally:
        model.set_use_split_qkv_input(False)
        model.set_use_hook_mlp_in(False)
    return masked_nll(logits, tokens, mask)


def test_random_circuits_equal_hand_written_ablation_in_the_same_pass(models64):
    tokens, mask = _batch(seed=3)
    gen = torch.Generator().manual_seed(5)
    for model in models64.values():
        g = build_graph("paper", model.cfg.n_layers)
        keeps = torch.rand((4, *g.edge_mask.shape), generator=gen) < 0.6
        losses = evaluate_circuit(model, tokens, mask, keeps & g.edge_mask)
        for keep, loss in zip(keeps, losses, strict=True):
            expected = _hand_circuit_loss(model, tokens, mask, keep & g.edge_mask)
            torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-10)
        assert (losses != _clean(model, tokens, mask)).all()  # the ablations matter


def test_mean_ablation_subtracts_the_deviation_from_the_clean_mean(models64):
    model = models64["LlamaForCausalLM"]
    tokens, mask = _batch(seed=4, pos=12, start=6)
    mask[1, 10:] = False  # sample 1 ends earlier: its last two positions are padding
    g = build_graph("paper", model.cfg.n_layers)
    full = evaluate_circuit(model, tokens, mask, g.edge_mask, ablation="mean")
    torch.testing.assert_close(full, _clean(model, tokens, mask), rtol=0, atol=1e-12)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in g.upstream)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 10:] = False
    mean = [cache[name][valid].mean(0) for name in g.upstream]
    keep = torch.rand(g.edge_mask.shape, generator=torch.Generator().manual_seed(2)) < 0.5
    got = evaluate_circuit(model, tokens, mask, keep & g.edge_mask, ablation="mean")
    expected = _hand_circuit_loss(model, tokens, mask, keep & g.edge_mask, mean=mean)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


def test_batched_circuits_match_each_sample_alone(models64):
    model = models64["MistralForCausalLM"]
    tokens, mask = _batch(seed=6, batch=3, pos=12, start=5)
    tokens[2, 9:] = 0  # sample 2 is right-padded
    mask[2, 9:] = False
    g = build_graph("paper", model.cfg.n_layers)
    keep = torch.rand(g.edge_mask.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    together = evaluate_circuit(model, tokens, mask, keep)
    for b in range(3):
        alone = evaluate_circuit(model, tokens[b : b + 1], mask[b : b + 1], keep)
        torch.testing.assert_close(together[b : b + 1], alone, rtol=1e-10, atol=1e-10)


def test_bad_circuit_mask_is_refused_with_its_shape(models64):
    model = models64["Qwen2ForCausalLM"]
    tokens, mask = _batch()
    with pytest.raises(ValueError, match=r"bool mask \[n_upstream, n_downstream\] = \[5, 9\]"):
        evaluate_circuit(model, tokens, mask, torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="unknown ablation 'resample'"):
        evaluate_circuit(
            model, tokens, mask, build_graph("paper", 2).edge_mask, ablation="resample"
        )


def test_top_k_circuits_are_nested_and_ranked():
    scores = np.array([[0.5, -3.0, 0.0], [2.0, 0.1, 9.0]])
    mask = np.array([[True, True, False], [True, True, True]])
    circuits = top_k_circuits(scores, mask, [1, 2, 5], ranking="abs")
    assert circuits[0].sum() == 1 and circuits[0][1, 2]
    assert circuits[1][0, 1] and circuits[1].sum() == 2
    assert (circuits[2] == mask).all()  # all 5 edges; the masked-out 0.0 is never chosen
    assert (circuits[:-1] <= circuits[1:]).all()
    signed = top_k_circuits(scores, mask, [2], ranking="signed")
    assert signed[0][1, 2] and signed[0][1, 0] and signed[0].sum() == 2


def test_faithfulness_and_circuit_size():
    clean, none = np.array([1.0, 2.0]), np.array([5.0, 4.0])
    losses = np.array([[5.0, 4.0], [3.0, 3.0], [1.4, 2.1], [1.0, 2.0]])
    f = faithfulness(losses, clean, none)
    np.testing.assert_allclose(f, [[0, 0], [0.5, 0.5], [0.9, 0.95], [1, 1]])
    ks = [1, 3, 10, 30]
    np.testing.assert_array_equal(circuit_size(f.T, ks, 0.8), [10.0, 10.0])
    np.testing.assert_array_equal(circuit_size(f.mean(1), ks, 0.95), 30.0)
    assert np.isnan(circuit_size(np.array([0.1, 0.2]), [1, 2], 0.8))
    assert log_grid(1000, 4) == [1, 10, 100, 1000]
    assert log_grid(3, 20) == [1, 2, 3]
    a = np.array([True, True, False])
    assert jaccard(a, np.array([False, True, True])) == pytest.approx(1 / 3)


def test_circuit_size_comparison_finds_a_larger_circuit_and_its_interval():
    ks = [1, 2, 4, 8, 16, 32]
    rng = np.random.default_rng(0)
    n = 40
    # before reaches 0.8 at k = 4, after only at k = 16; per-question noise around that.
    base_b = np.array([0.1, 0.5, 0.85, 0.95, 0.99, 1.0])
    base_a = np.array([0.05, 0.2, 0.4, 0.7, 0.9, 1.0])
    before = base_b[:, None] + rng.normal(0, 0.02, (6, n))
    after = base_a[:, None] + rng.normal(0, 0.02, (6, n))
    rows, band = compare_circuit_sizes(before, after, ks, [0.8, 0.9], n_resamples=300)
    size80 = rows[0]
    assert size80["metric"] == "circuit_size_80" and size80["n"] == n
    assert (size80["before"], size80["after"], size80["diff"]) == (4.0, 16.0, 12.0)
    assert size80["ci_low"] > 0 and size80["significant"] and size80["p_value"] < 0.01
    assert rows[1]["before"] == 8.0 and rows[1]["after"] == 16.0
    assert len(band["before"]) == len(ks)
    assert all(
        lo <= m <= hi
        for lo, m, hi in zip(band["after_low"], band["after"], band["after_high"], strict=True)
    )
    # The same curves on both sides: no difference, interval around 0, not significant.
    same, _ = compare_circuit_sizes(before, before, ks, [0.8], n_resamples=300)
    assert same[0]["diff"] == 0 and not same[0]["significant"] and same[0]["p_value"] == 1.0
    mask = np.ones((2, 2), dtype=bool)
    scores = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert overlap_curve(scores, scores, mask, [1, 4]) == [1.0, 1.0]
    assert overlap_curve(scores, -scores, mask, [1], ranking="signed") == [0.0]
