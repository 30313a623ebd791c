"""`EdgeScores`, the one edge-score type of `attribute()` and of a run's stored scores: short
repr, node index, top edges and a tidy DataFrame (issue 18), shapes checked on construction;
Table 1 renders as HTML in notebooks."""

import pytest
import torch

from rl_circuits.engine.scores import EdgeScores
from rl_circuits.errors import DataError


@pytest.fixture(scope="module")
def both(tiny_checkpoints, tiny_run):
    from rl_circuits import load_run
    from rl_circuits.engine.attribution import attribute
    from rl_circuits.models.loading import load_model

    model = load_model(tiny_checkpoints["LlamaForCausalLM"], device="cpu")
    tokens = torch.arange(1, 9).reshape(2, 4) % model.cfg.d_vocab
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, -2:] = True
    edge = attribute(model, tokens, mask)
    base, _ = tiny_run
    stored = load_run(base / "run").scores("tiny", "after", "sevens", 1.0)
    return edge, stored


def test_attribute_and_the_store_give_the_same_type(both, tiny_run):
    import rl_circuits

    stored_config = rl_circuits.load_run(tiny_run[0] / "run").config
    edge, stored = both
    assert type(edge) is type(stored) is EdgeScores is rl_circuits.EdgeScores
    assert edge.ids is None and edge.loss.shape == (2,) and edge.meta == {}
    # a stored cell keeps what attribute() measured: graph, method, each question's loss
    attribute_cfg = stored_config.attribute
    assert (stored.graph, stored.method) == (attribute_cfg.graph, attribute_cfg.method)
    assert stored.loss.shape == (len(stored.ids),) and bool((stored.loss > 0).all())
    assert set(stored.meta) == {"t_cut"}


def test_construction_checks_shapes_and_names():
    values = torch.zeros(2, 3, 4)
    mask = torch.ones(3, 4, dtype=torch.bool)
    up, down = ("a", "b", "c"), ("d", "e", "f", "g")
    scores = EdgeScores(values, list(up), list(down), mask, ids=("q1", "q2"))
    assert scores.upstream == up and scores.ids == ["q1", "q2"]  # normalised
    bad = {
        "values have shape": dict(values=torch.zeros(2, 4, 3)),
        "but there are 1 ids": dict(ids=["q1"]),
        "edge_mask must be a bool tensor": dict(edge_mask=mask.int()),
        "edge_mask has shape": dict(edge_mask=mask.T),
        "loss must be a tensor of shape": dict(loss=torch.zeros(3)),
        "not one string": dict(upstream="abc"),
        "ids contain duplicates": dict(ids=["q", "q"]),
        "values must be a float tensor": dict(values=torch.zeros(2, 3, 4, dtype=torch.long)),
    }
    for message, change in bad.items():
        args = {"values": values, "upstream": up, "downstream": down, "edge_mask": mask, **change}
        with pytest.raises(DataError, match=message):
            EdgeScores(**args)


def test_repr_is_short_and_names_samples_edges_graph_and_method(both):
    edge, stored = both
    text = repr(edge)
    assert len(text) < 200 and text.startswith("EdgeScores(2 samples x ")
    n_edges = int(edge.edge_mask.sum())
    assert f"{n_edges} edges, graph paper, method eap" in text
    text = repr(stored)
    assert len(text) < 250 and text.startswith(f"EdgeScores({len(stored.ids)} samples x ")
    assert f"graph {stored.graph}" in text and repr(stored.ids[0]) in text


def test_index_top_edges_and_frame(both):
    for scores in both:
        assert scores.index("blocks.0.hook_mlp_out") == list(scores.upstream).index(
            "blocks.0.hook_mlp_out"
        )
        assert scores.index("blocks.1.hook_resid_post") == len(scores.downstream) - 1
        with pytest.raises(KeyError, match="node 'blocks.9.hook_mlp_out' is not in these"):
            scores.index("blocks.9.hook_mlp_out")

        # top edges: recomputed by brute force over every existing edge
        mean = scores.values.double().mean(0)
        edges = [
            (u, d, float(mean[i, j]))
            for i, u in enumerate(scores.upstream)
            for j, d in enumerate(scores.downstream)
            if scores.edge_mask[i, j]
        ]
        expected = sorted(edges, key=lambda e: -abs(e[2]))[:5]
        top = scores.top_edges(5)
        assert [t[:2] for t in top] == [e[:2] for e in expected]
        assert [t[2] for t in top] == pytest.approx([e[2] for e in expected])
        assert len(scores.top_edges(10**6)) == len(edges)

        frame = scores.to_frame()
        n = scores.values.shape[0]
        assert list(frame.columns) == ["id", "upstream", "downstream", "score"]
        assert len(frame) == n * len(edges)  # only existing edges
        assert list(frame["id"].unique()) == scores.sample_ids()
        last = frame.iloc[-1]
        i, j = scores.index(last["upstream"]), scores.index(last["downstream"])
        assert bool(scores.edge_mask[i, j])
        assert last["score"] == pytest.approx(float(scores.values[n - 1, i, j]))
    edge, stored = both
    assert edge.sample_ids() == ["0", "1"] and stored.sample_ids() == list(stored.ids)


def test_table1_renders_as_html_in_notebooks(tiny_run):
    from rl_circuits import load_run

    base, _ = tiny_run
    table = load_run(base / "run").table1()
    html = table._repr_html_()
    assert html == table.to_html() and html.startswith('<table class="table1">')
