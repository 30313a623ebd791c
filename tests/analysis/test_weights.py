"""Joining weight changes to edge changes: the rank statistic and the figures."""

import numpy as np
import pandas as pd
import pytest

from rl_circuits.analysis.weights import (
    join_edges,
    model_fractions,
    outgoing_mass,
    rank_agreement,
    update_fractions,
    weight_edge_scatter,
)


def test_rank_agreement_is_spearman_with_a_permutation_p_value():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    x = rng.random(20)
    rho, p = rank_agreement(x, x**3 + 1, n_permutations=999)
    assert rho == pytest.approx(1.0) and p == pytest.approx(1 / 1000)
    y = rng.random(20)
    rho, p = rank_agreement(x, y, n_permutations=2000, seed=1)
    assert rho == pytest.approx(spearmanr(x, y).statistic)
    assert p == pytest.approx(spearmanr(x, y).pvalue, abs=0.05)
    assert np.isnan(rank_agreement([1.0, 2.0], [3.0, 4.0])[0])
    assert np.isnan(rank_agreement(x, np.ones(20))[1])


def _table(nodes):
    n = len(nodes)
    return pd.DataFrame(
        {
            "n_params": np.full(n, 100),
            "n_changed": np.arange(n),
            "fraction_changed": np.arange(n) / 100,
            "rel_norm": np.linspace(0.1, 1, n),
            "effective_rank": np.ones(n),
        },
        index=pd.Index(nodes, name="node"),
    )


def test_join_keeps_graph_nodes_and_the_figures_draw_them():
    nodes = ["hook_embed", "blocks.0.ln1", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out"]
    upstream = ["hook_embed", "blocks.0.hook_attn_out", "blocks.0.hook_mlp_out"]
    values = np.ones((2, 3, 2))
    mask = np.array([[True, True], [False, True], [False, False]])
    mass = outgoing_mass(values, mask)
    assert mass.tolist() == [2.0, 1.0, 0.0]
    joined = join_edges(_table(nodes), upstream, np.array([1.0, 2, 4]), np.array([2.0, 2, 1]))
    assert list(joined.index) == upstream
    assert joined["edge_change"].tolist() == [1.0, 0.0, -0.75]
    figure = weight_edge_scatter(joined, "t", {"edge_change": (0.5, 0.2)})
    assert len(figure.data) == 1 and "rho 0.50" in figure.data[0].name
    bars = update_fractions(_table(nodes), "t")
    assert list(bars.data[0].y) == ["embed", "blocks.0.ln1", "L0 attn", "L0 mlp"]
    assert bars.data[0].marker.color[1] == "#999999"  # a norm: no graph node
    totals = {"p": {"fraction_changed": 0.2, "dtype": "bfloat16"}}
    assert model_fractions(totals).data[0].y[0] == pytest.approx(20.0)
