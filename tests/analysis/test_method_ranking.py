"""rank_methods on tiny float64 models: MIB's curve ends at f = 1, exact agrees with itself,
CPR/CMD are the curve's, intervals bracket them, RelP's q/k inputs are counted as unscored."""

import numpy as np
import pytest
import torch

from rl_circuits.analysis.faithfulness import MIB_FRACTIONS, cmd, cpr, mib_edge_counts
from rl_circuits.analysis.method_ranking import mib_faithfulness, rank_methods
from rl_circuits.engine.attribution import attribute
from rl_circuits.engine.circuits import evaluate_circuit, top_k_circuits
from rl_circuits.engine.graph import build_graph


def _batch(seed=0, batch=4, pos=10, start=5):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 90, (batch, pos), generator=gen)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, start:] = True
    return tokens, mask


def test_mib_faithfulness_is_a_ratio_of_means():
    losses = np.array([[3.0, 5.0], [1.0, 1.0]])
    clean, none = np.array([1.0, 1.0]), np.array([5.0, 5.0])
    # (5 - 4) / (5 - 1) and (5 - 1) / (5 - 1)
    np.testing.assert_allclose(mib_faithfulness(losses, clean, none), [0.25, 1.0], atol=1e-15)


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_rank_methods_rows(models64, ablation):
    model = models64["Qwen2ForCausalLM"]
    tokens, mask = _batch()
    rows = rank_methods(
        model,
        [(tokens[:2], mask[:2]), (tokens[2:], mask[2:])],
        ["eap", "relp", "exact"],
        ablation=ablation,
        n_exact=10,
        n_resamples=200,
    )
    by = {r["method"]: r for r in rows}
    g = build_graph("paper", model.cfg.n_layers)
    n_edges = int(g.edge_mask.sum())
    for r in rows:
        assert r["ks"] == mib_edge_counts(n_edges)
        assert r["f"][-1] == pytest.approx(1.0, abs=1e-9)  # all edges: the clean model
        assert r["cpr"] == pytest.approx(cpr(MIB_FRACTIONS, np.array(r["f"])), abs=1e-12)
        assert r["cmd"] == pytest.approx(cmd(MIB_FRACTIONS, np.array(r["f"])), abs=1e-12)
        assert r["cpr_low"] <= r["cpr"] <= r["cpr_high"]
        assert r["cmd_low"] <= r["cmd"] <= r["cmd_high"]
        assert r["n_exact"] == 10 and r["seconds"] > 0
    # exact's own scores are what the subsample measures (one edge removed from all edges).
    assert by["exact"]["spearman"] >= 0.98  # 1 up to one swap of float32-rounded near-ties
    assert -1 <= by["eap"]["spearman"] <= 1
    assert by["relp"]["unscored"] == 2 * model.cfg.n_layers and by["eap"]["unscored"] == 0


def test_curve_is_the_hand_evaluated_top_k(models64):
    """eap's f at every grid point from evaluate_circuit called here on its own top-k."""
    model = models64["LlamaForCausalLM"]
    tokens, mask = _batch(seed=1)
    (row,) = rank_methods(model, [(tokens, mask)], ["eap"], n_exact=8, n_resamples=50)
    scores = attribute(model, tokens, mask)
    edge_mask = scores.edge_mask.numpy()
    key = np.abs(scores.values.double().numpy()).mean(0)
    circuits = torch.from_numpy(top_k_circuits(key, edge_mask, row["ks"]))
    losses = evaluate_circuit(model, tokens, mask, circuits).double().numpy()
    none = evaluate_circuit(model, tokens, mask, torch.zeros_like(circuits[0])).double().numpy()
    clean = losses[-1]
    want = (none.mean() - losses.mean(1)) / (none.mean() - clean.mean())
    np.testing.assert_allclose(row["f"], want, atol=1e-12)


def test_bad_inputs_are_refused(models64):
    model = models64["LlamaForCausalLM"]
    tokens, mask = _batch()
    with pytest.raises(ValueError, match="at least 2 questions"):
        rank_methods(model, [(tokens[:1], mask[:1])], ["eap"])
    with pytest.raises(ValueError, match="n_exact must be >= 2"):
        rank_methods(model, [(tokens, mask)], ["eap"], n_exact=1)
